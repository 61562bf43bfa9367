"""Which parameters train: parameter groups from plugins, or the default set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch


@dataclass
class ParamGroup:
    """A named set of parameters to train, with optional per-group AdamW overrides.

    Example (custom-diffusion style, cross-attention K/V only)::

        ParamGroup("kv", [p for n, p in unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n])
    """

    name: str
    params: Sequence[torch.nn.Parameter]
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    #: Filled by the trainer: a stable name per parameter (``unet.<path>`` where known), used as the
    #: checkpoint key.
    names: list[str] = field(default_factory=list)


GroupLike = Union[ParamGroup, "tuple[str, Iterable[torch.nn.Parameter]]"]


def as_group(value: GroupLike, owner: str) -> ParamGroup:
    if isinstance(value, ParamGroup):
        group = value
    elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        group = ParamGroup(value[0], list(value[1]))
    else:
        raise TypeError(f"{owner} must return ParamGroup or (name, params) items, got {value!r}")
    group.params = list(group.params)
    for p in group.params:
        if not isinstance(p, torch.nn.Parameter):
            raise TypeError(f"{owner}: group {group.name!r} holds a {type(p).__name__}, not a torch.nn.Parameter")
    return group


def name_parameters(groups: Sequence[ParamGroup], modules: Mapping[str, Optional[torch.nn.Module]]) -> None:
    """Give every parameter a unique, stable name and refuse a parameter listed twice."""
    known: dict[int, str] = {}
    for prefix, module in modules.items():
        if module is not None:
            for n, p in module.named_parameters(remove_duplicate=False):
                known.setdefault(id(p), f"{prefix}.{n}")
    owner: dict[int, str] = {}
    for group in groups:
        group.names = []
        for i, p in enumerate(group.params):
            if id(p) in owner:
                raise ValueError(
                    f"parameter {known.get(id(p), f'#{i}')!r} is in two training groups: "
                    f"{owner[id(p)]!r} and {group.name!r}"
                )
            owner[id(p)] = group.name
            group.names.append(known.get(id(p), f"{group.name}.{i}"))
    names = [n for g in groups for n in g.names]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"training groups give the same parameter name twice: {dupes[:5]}; rename a group")
