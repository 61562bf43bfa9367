"""The training micro-batch: a dict of per-row items, and the helper that appends rows to it."""

from __future__ import annotations

from typing import Any, Callable, Mapping, MutableMapping, Sequence, Union

import torch

#: A micro-batch: ``latents`` or ``pixel_values``, ``captions``, ``keys``, ``loss_weight``, and whatever
#: else the data or plugins put in.
TrainBatch = MutableMapping[str, Any]

#: The data source: dataset indices to a dict with ``latents`` ``(B, C, h, w)`` (VAE-encoded and
#: scaled) or ``pixel_values`` ``(B, 3, H, W)`` in [-1, 1] (the trainer then needs a VAE), and
#: ``captions`` (``B`` strings); optionally per-row ``loss_weight`` and any per-row conditioning. The
#: same index must always give the same item. Give the callable a ``__len__`` to have epochs shuffled;
#: without one, indices run 0, 1, 2, ... (unbounded procedural data).
DataFn = Callable[[list[int]], Mapping[str, Any]]

# Keys of appended rows: the source row's key plus this stride times the append generation, so an
# appended row's noise does not depend on how the step is split over processes or micro-steps.
_KEY_STRIDE = 1 << 40


def batch_rows(batch: Mapping[str, Any]) -> int:
    return int(batch["keys"].shape[0])


def is_per_row(value: Any, rows: int) -> bool:
    """Whether a batch item has one entry per row (a tensor or list of length ``rows``)."""
    if isinstance(value, torch.Tensor):
        return value.ndim > 0 and value.shape[0] == rows
    return isinstance(value, (list, tuple)) and len(value) == rows


def append_rows(batch: TrainBatch, extra: Mapping[str, Any]) -> None:
    """Append rows to ``batch``: every per-row item of ``batch`` must be in ``extra`` (except ``keys``
    and ``loss_weight``), with the same number of rows in each.

    New row ``i`` gets a key derived from row ``i``'s key when ``extra`` has no more rows than the
    batch (one class image per instance row), so its noise and timestep do not depend on how the step
    is split over processes or micro-steps; otherwise keys derive from the count. ``loss_weight``
    defaults to ones. Pass ``keys`` or ``loss_weight`` in ``extra`` to choose them.
    """
    rows = batch_rows(batch)
    lengths = {k: (v.shape[0] if isinstance(v, torch.Tensor) else len(v)) for k, v in extra.items()
               if isinstance(v, (torch.Tensor, list, tuple))}
    if not lengths:
        raise ValueError("append_rows: extra has no per-row items")
    n = next(iter(lengths.values()))
    if any(v != n for v in lengths.values()):
        raise ValueError(f"append_rows: extra items have different row counts: {lengths}")
    per_row = [k for k, v in batch.items() if is_per_row(v, rows)]
    missing = [k for k in per_row if k not in extra and k not in ("keys", "loss_weight")]
    if missing:
        raise ValueError(f"append_rows: extra lacks per-row items {missing} of the batch")
    unknown = [k for k in extra if k not in batch]
    if unknown:
        raise ValueError(f"append_rows: extra has items {unknown} that the batch lacks")
    keys = batch["keys"]
    if "keys" in extra:
        new_keys = torch.as_tensor(extra["keys"], dtype=torch.long)
    else:
        generation = int(keys.max().item()) // _KEY_STRIDE + 1
        base = keys[:n] if n <= rows else torch.arange(n)
        new_keys = base % _KEY_STRIDE + generation * _KEY_STRIDE
    weights = extra.get("loss_weight", torch.ones(n))
    for k in per_row:
        if k == "keys":
            batch[k] = torch.cat([keys, new_keys])
        elif k == "loss_weight":
            batch[k] = torch.cat([batch[k], torch.as_tensor(weights, dtype=batch[k].dtype)])
        else:
            batch[k] = _concat(batch[k], extra[k])


def _concat(a: Union[torch.Tensor, Sequence[Any]], b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, torch.as_tensor(b).to(device=a.device, dtype=a.dtype)])
    return [*a, *b]
