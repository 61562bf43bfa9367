"""What one UNet forward pass may change without touching the shared model: attention processors and weights.

A :class:`ForwardContext` travels as an argument (``unet(..., context=ctx)``) from the UNet through its blocks
to every attention layer and every linear or convolution, instead of living in module attributes, a
thread-local or a ``ContextVar``. So one loaded model serves concurrent calls with different plugins, and
``torch.compile(unet, fullgraph=True)`` traces the whole pass: dynamo follows plain arguments and dict look-ups,
but not ``ContextVar.get``. A layer the context does not name takes its plain path.

Weight patches are keyed by module path (``"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"``)
and apply to :class:`torch.nn.Linear` and :class:`torch.nn.Conv2d` layers; :func:`name_layers` marks the ones a
model routes through :func:`linear` and :func:`conv`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .attention import AttentionProcessor

#: The attribute that holds a routed layer's module path.
PATH_ATTR = "_diffsteer_path"


@dataclass(frozen=True)
class LowRank:
    """A low-rank delta ``scale * up @ down`` of one layer's weight (LoRA, LoCon).

    Linear: ``down`` is ``(rank, in)``, ``up`` ``(out, rank)``. Conv2d: ``down`` is ``(rank, in, kh, kw)`` (it
    carries the layer's kernel, stride and padding) and ``up`` ``(out, rank, 1, 1)``.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    def dense(self) -> torch.Tensor:
        """The full delta, shaped like the layer's weight."""
        up, down = self.up.flatten(1), self.down.flatten(1)
        return (self.scale * (up @ down)).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True)
class WeightPatch:
    """How one layer's weights differ for this pass: a replacement and/or deltas (all in the layer's dtype).

    The effective weight is ``(weight or layer.weight) + delta + sum(low_rank)``, and likewise for the bias.
    """

    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    delta: Optional[torch.Tensor] = None
    bias_delta: Optional[torch.Tensor] = None
    low_rank: tuple[LowRank, ...] = ()


@dataclass(frozen=True)
class ForwardContext:
    """Per-call state of one model forward: attention processors and weight patches, keyed by module path."""

    processors: Mapping[str, "AttentionProcessor"] = field(default_factory=dict)
    weights: Mapping[str, WeightPatch] = field(default_factory=dict)


def name_layers(model: nn.Module) -> list[str]:
    """Mark every linear and convolution of ``model`` with its module path; return the paths in order.

    Only models whose forward routes each such layer through :func:`linear`/:func:`conv` may call this:
    the mark is what says that a weight patch for that path takes effect.
    """
    paths = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            setattr(module, PATH_ATTR, path)
            paths.append(path)
    return paths


def _patch_for(layer: nn.Module, context: Optional[ForwardContext]) -> Optional[WeightPatch]:
    if context is None or not context.weights:
        return None
    return context.weights.get(getattr(layer, PATH_ATTR, ""))


def merge_is_cheaper(tokens: int, in_features: int, out_features: int) -> bool:
    """Whether adding ``up @ down`` to the weight costs fewer flops than the factored pass over ``tokens`` rows.

    Merging costs ``rank * in * out`` (the product) plus a weight-sized add; the factored path costs
    ``rank * tokens * (in + out)``. Both scale with the rank, so it drops out. ``bench/bench_lowrank.py``
    measures the crossover.
    """
    return in_features * out_features < tokens * (in_features + out_features)


def _effective(
    base_w: torch.Tensor, base_b: Optional[torch.Tensor], patch: WeightPatch, tokens: int
) -> tuple[torch.Tensor, Optional[torch.Tensor], list[LowRank]]:
    weight = patch.weight if patch.weight is not None else base_w
    bias = patch.bias if patch.bias is not None else base_b
    if patch.delta is not None:
        weight = weight + patch.delta
    if patch.bias_delta is not None:
        bias = patch.bias_delta if bias is None else bias + patch.bias_delta
    factored = []
    out_f, in_f = base_w.shape[0], base_w[0].numel()
    for lr in patch.low_rank:
        if merge_is_cheaper(tokens, in_f, out_f):
            weight = weight + lr.dense()
        else:
            factored.append(lr)
    return weight, bias, factored


def linear(layer: nn.Linear, x: torch.Tensor, context: Optional[ForwardContext] = None) -> torch.Tensor:
    """``layer(x)``, with the weights that ``context`` gives this layer."""
    patch = _patch_for(layer, context)
    return layer(x) if patch is None else patched_linear(layer, x, patch)


def patched_linear(layer: nn.Linear, x: torch.Tensor, patch: WeightPatch) -> torch.Tensor:
    """``layer(x)`` with ``patch`` applied to its weights (the layer itself is not changed)."""
    weight, bias, factored = _effective(layer.weight, layer.bias, patch, x.numel() // x.shape[-1])
    out = F.linear(x, weight, bias)
    for lr in factored:
        out = out + lr.scale * F.linear(F.linear(x, lr.down), lr.up)
    return out


def conv(layer: nn.Conv2d, x: torch.Tensor, context: Optional[ForwardContext] = None) -> torch.Tensor:
    """``layer(x)``, with the weights that ``context`` gives this layer."""
    patch = _patch_for(layer, context)
    if patch is None:
        return layer(x)
    if layer.padding_mode != "zeros":
        raise NotImplementedError("weight patches support zero-padded convolutions only")
    out_h, out_w = (
        (x.shape[d - 2] + 2 * layer.padding[d] - layer.dilation[d] * (layer.kernel_size[d] - 1) - 1)  # type: ignore[index,operator]
        // layer.stride[d] + 1
        for d in (0, 1)
    )
    weight, bias, factored = _effective(layer.weight, layer.bias, patch, x.shape[0] * out_h * out_w)
    args = (layer.stride, layer.padding, layer.dilation, layer.groups)
    out = F.conv2d(x, weight, bias, *args)
    for lr in factored:
        out = out + lr.scale * F.conv2d(F.conv2d(x, lr.down, None, *args), lr.up)
    return out
