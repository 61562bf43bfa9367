"""Shared pieces of the pydantic model configs that read diffusers ``config.json`` files."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence, Tuple, TypeVar, Union

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class DiffusersConfig(BaseModel):
    """Base of the model configs: unknown keys (``_class_name``, fields of features we don't model) are
    dropped silently, and a config is immutable once a model is built from it."""

    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())

    #: Written as ``_class_name`` by :meth:`to_diffusers_dict`.
    diffusers_class_name: ClassVar[str] = ""

    def to_diffusers_dict(self) -> dict[str, Any]:
        """The config as a diffusers ``config.json`` mapping (JSON types, ``_class_name`` first)."""
        return {"_class_name": self.diffusers_class_name, **self.model_dump(mode="json")}


def reject_unsupported(model: str, data: Any, supported: Mapping[str, Sequence[Any]]) -> None:
    """Raise ``ValueError`` naming the first field of ``data`` whose value is not among ``supported[field]``.

    These are diffusers features (class embeddings, added embeddings, other norms...) whose default value
    is the only one our models implement; a config that turns one on would otherwise load and silently
    compute something else.
    """
    if not isinstance(data, Mapping):
        return
    for field, allowed in supported.items():
        if field not in data:
            continue
        value = data[field]
        values = value if isinstance(value, (list, tuple)) and field in _PER_BLOCK_FLAGS else [value]
        if any(v not in allowed for v in values):
            raise ValueError(
                f"{model}: config field {field}={value!r} is not supported (supported: "
                f"{', '.join(repr(a) for a in allowed)})"
            )


# Flags diffusers also accepts as one value per block; every entry must then be supported.
_PER_BLOCK_FLAGS = frozenset({"only_cross_attention"})


def per_block(value: Union[T, Sequence[T]], count: int, field: str) -> Tuple[T, ...]:
    """Expand a scalar-or-per-block config value to ``count`` entries, checking a sequence's length."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{field} has {len(value)} entries but the model has {count} blocks")
        return tuple(value)
    return (value,) * count  # type: ignore[return-value]
