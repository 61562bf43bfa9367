"""Call-scoped weight overrides: plugins change named weights for one call; the shared models never change.

Plugins register changes in :func:`~diffsteer.hookspecs.diffsteer_weight_overrides` on a
:class:`WeightOverrides`: a dense delta, a low-rank delta (LoRA, LoCon) or a replacement of a linear or
convolution ``weight``/``bias`` of the UNet or the text encoder. The core turns them into one
:class:`~diffsteer.models.context.WeightPatch` per layer. The UNet receives them in the
:class:`~diffsteer.models.context.ForwardContext` of every pass of the call (an argument, so
``torch.compile`` traces them); the text encoder through the call's
:class:`~diffsteer.text.EncoderScope`, the same object that carries the call's added tokens. Concurrent
calls on one pipeline each see only their own weights.

Deltas of several plugins on one parameter sum. Two replacements of one parameter are a
:class:`~diffsteer.errors.PluginConflictError` naming both plugins; deltas add to a replacement.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Collection, Mapping, Optional

import torch
from torch import nn

from .errors import PluginConflictError, PluginError
from .models.context import LowRank, WeightPatch, name_layers

if TYPE_CHECKING:  # pragma: no cover
    from .call import GenerationCall

#: The models a plugin may override, by the name it passes as ``model=``.
MODELS = ("unet", "text_encoder")


@dataclass
class _Layer:
    """What the plugins of one call registered for one layer."""

    module: nn.Module
    weight: Optional[tuple[str, torch.Tensor]] = None  # (owner, replacement)
    bias: Optional[tuple[str, torch.Tensor]] = None
    deltas: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (owner, float32 delta)
    bias_deltas: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    low_rank: list[tuple[str, LowRank]] = field(default_factory=list)


class WeightOverrides:
    """The weight changes of one call, keyed by parameter name (``"<module path>.weight"`` or ``".bias"``).

    Names are those of the model's ``named_parameters()``. Only the weights and biases of linear and
    convolution layers can be overridden (every LoRA, custom-diffusion and TIME target is one). Tensors
    are copied to the parameter's device and dtype when registered.
    """

    def __init__(self, models: Mapping[str, nn.Module]) -> None:
        self._models = {name: getattr(m, "_orig_mod", m) for name, m in models.items()}  # compiled: the inner model
        self._layers: dict[str, dict[str, _Layer]] = {name: {} for name in self._models}
        self._owners: dict[str, None] = {}  # insertion-ordered set
        #: the plugin whose hook is registering now, and so the plugin behind each owner (for step windows).
        self.registering: Any = None
        self._plugins: dict[str, Any] = {}

    # -- what may be overridden ----------------------------------------------------------------------------------------
    def names(self, model: str = "unet") -> list[str]:
        """The parameter names of ``model`` that may be overridden."""
        return [f"{path}.{kind}" for path, mod in self._routed(model).items() for kind in ("weight", "bias")
                if getattr(mod, kind, None) is not None]

    def parameter(self, name: str, model: str = "unet") -> torch.Tensor:
        """The shared value of parameter ``name`` of ``model`` (read it, never write it), e.g. for its shape or
        for an edit computed from it (TIME's closed form)."""
        params = dict(self._models[model].named_parameters()) if model in self._models else {}
        if name not in params:
            raise KeyError(f"the {model} has no parameter {name!r}")
        return params[name].detach()

    def _routed(self, model: str) -> dict[str, nn.Module]:
        target = self._models[model]
        modules = dict(target.named_modules())
        # The UNet routes its layers itself; the text encoder's linears are routed by the call's EncoderScope.
        paths = target.weight_layers() if hasattr(target, "weight_layers") else name_layers(target)
        return {path: modules[path] for path in paths}

    def _layer(self, owner: str, model: str, path: str) -> _Layer:
        if model not in self._models:
            raise PluginError(owner, f"cannot override weights of {model!r}: the models are {sorted(self._models)}")
        layers = self._layers[model]
        if path not in layers:
            routed = self._routed(model)
            if path not in routed:
                names = self.names(model)
                close = difflib.get_close_matches(path + ".weight", names, n=3)
                hint = f"; close names: {close}" if close else f"; e.g. {names[:2]}"
                raise PluginError(
                    owner, f"the {model} has no linear or convolution layer {path!r} whose weights can be "
                    f"overridden{hint}",
                )
            layers[path] = _Layer(routed[path])
        return layers[path]

    def _split(self, owner: str, name: str) -> tuple[str, str]:
        path, _, kind = name.rpartition(".")
        if kind not in ("weight", "bias") or not path:
            raise PluginError(owner, f"cannot override {name!r}: only a layer's '.weight' or '.bias' can be overridden")
        return path, kind

    def _tensor(self, owner: str, what: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise PluginError(owner, f"{what} must be a tensor, not {type(value).__name__}")
        if tuple(value.shape) != tuple(like.shape):
            raise PluginError(owner, f"{what} has shape {tuple(value.shape)}, the parameter {tuple(like.shape)}")
        if not torch.isfinite(value).all():
            raise PluginError(owner, f"{what} contains NaN or inf")
        return value.detach()

    # -- registration --------------------------------------------------------------------------------------------------
    def _param(self, owner: str, name: str, model: str) -> tuple[_Layer, str, torch.Tensor]:
        """The layer entry, ``"weight"``/``"bias"`` and the shared parameter that ``name`` names."""
        path, kind = self._split(owner, name)
        layer = self._layer(owner, model, path)
        param = getattr(layer.module, kind)
        if param is None:
            raise PluginError(owner, f"cannot override {name!r}: the layer has no bias")
        return layer, kind, param

    def add_delta(self, owner: str, name: str, delta: torch.Tensor, *, model: str = "unet") -> None:
        """Add ``delta`` to parameter ``name`` for this call (summed with other plugins' deltas)."""
        layer, kind, param = self._param(owner, name, model)
        delta = self._tensor(owner, f"the delta of {name!r}", delta, param).to(param.device, torch.float32)
        (layer.deltas if kind == "weight" else layer.bias_deltas).append((owner, delta))
        self._owned(owner)

    def add_low_rank(
        self, owner: str, layer: str, down: torch.Tensor, up: torch.Tensor, *, scale: float = 1.0,
        model: str = "unet",
    ) -> None:
        """Add ``scale * up @ down`` to the weight of ``layer`` (a module path) for this call.

        Linear: ``down`` ``(rank, in)``, ``up`` ``(out, rank)``. Convolution: ``down`` ``(rank, in, kh, kw)``
        (the layer's kernel size), ``up`` ``(out, rank, 1, 1)``. The full weight is built only where that
        is cheaper than the factored product (:func:`~diffsteer.models.context.merge_is_cheaper`).
        """
        entry = self._layer(owner, model, layer)
        weight = entry.module.weight
        conv = weight.ndim == 4
        want_down = (None, *weight.shape[1:]) if conv else (None, weight.shape[1])
        for what, t in (("down", down), ("up", up)):
            if not isinstance(t, torch.Tensor) or t.ndim != weight.ndim:
                raise PluginError(owner, f"the low-rank {what} of {layer!r} must be a {weight.ndim}-d tensor")
        rank = down.shape[0]
        want_up = (weight.shape[0], rank, 1, 1) if conv else (weight.shape[0], rank)
        if tuple(down.shape[1:]) != want_down[1:] or tuple(up.shape) != want_up:
            raise PluginError(
                owner, f"low-rank delta of {layer!r}: down {tuple(down.shape)} and up {tuple(up.shape)} do not fit "
                f"its weight {tuple(weight.shape)} (want down (rank, {', '.join(map(str, want_down[1:]))}) and "
                f"up {want_up})",
            )
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise PluginError(owner, f"the low-rank delta of {layer!r} contains NaN or inf")
        # The scale goes into `up`, so a compiled UNet sees tensors only and a new scale needs no recompile.
        up = up.detach().to(weight.device, torch.float32) * float(scale)
        entry.low_rank.append((owner, LowRank(down.detach().to(weight.device, weight.dtype), up.to(weight.dtype))))
        self._owned(owner)

    def replace(self, owner: str, name: str, value: torch.Tensor, *, model: str = "unet") -> None:
        """Use ``value`` as parameter ``name`` for this call; a second replacement of it is a conflict."""
        layer, kind, param = self._param(owner, name, model)
        value = self._tensor(owner, f"the replacement of {name!r}", value, param)
        current = getattr(layer, kind)
        if current is not None:
            raise PluginConflictError(f"parameter {name!r} of the {model}", current[0], owner)
        setattr(layer, kind, (owner, value.to(param.device, param.dtype)))
        self._owned(owner)

    def _owned(self, owner: str) -> None:
        self._owners.setdefault(owner)
        self._plugins.setdefault(owner, self.registering)

    # -- what the models receive ---------------------------------------------------------------------------------------
    def __bool__(self) -> bool:
        return any(self._layers.values())

    def owners(self) -> list[str]:
        """The plugins that registered a change, in registration order."""
        return list(self._owners)

    def plugin_of(self, owner: str) -> Any:
        """The plugin object whose hook registered ``owner``'s first change (``None`` if not known)."""
        return self._plugins.get(owner)

    def patches(self, model: str = "unet", owners: Optional[Collection[str]] = None) -> dict[str, WeightPatch]:
        """One :class:`WeightPatch` per changed layer of ``model``, keyed by module path, in its dtype.

        ``owners`` keeps only those plugins' changes (a plugin outside its step window, say); default: all.
        """
        def mine(entry: Optional[tuple[str, Any]]) -> bool:
            return entry is not None and (owners is None or entry[0] in owners)

        def total(deltas: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> Optional[torch.Tensor]:
            kept = [d for d in deltas if mine(d)]
            return None if not kept else torch.stack([d for _, d in kept]).sum(0).to(dtype)

        out = {}
        for path, layer in self._layers[model].items():
            dtype = layer.module.weight.dtype
            patch = WeightPatch(
                weight=layer.weight[1] if mine(layer.weight) else None,  # type: ignore[index]
                bias=layer.bias[1] if mine(layer.bias) else None,  # type: ignore[index]
                delta=total(layer.deltas, dtype),
                bias_delta=total(layer.bias_deltas, dtype),
                low_rank=tuple(entry[1] for entry in layer.low_rank if mine(entry)),
            )
            fields = (patch.weight, patch.bias, patch.delta, patch.bias_delta)
            if patch.low_rank or any(f is not None for f in fields):
                out[path] = patch
        return out


def collect_weight_overrides(call: "GenerationCall", unet: nn.Module, text_encoder: nn.Module) -> WeightOverrides:
    """Fire :func:`~diffsteer.hookspecs.diffsteer_weight_overrides` and hand the result to the call's models.

    A plugin with a step window changes the UNet's weights only in the steps of its window (a per-step LoRA
    schedule); its text-encoder changes act on the prompts, which are encoded once, before any step. With a
    window in the call each plugin's hook runs alone, so every change is known by the plugin that made it.
    """
    weights = WeightOverrides({"unet": unet, "text_encoder": text_encoder})
    if call.scoped.windowed:
        for plugin, caller in call.scoped.each("diffsteer_weight_overrides"):
            weights.registering = plugin
            caller(call=call, weights=weights)
        weights.registering = None
    else:
        call.hook.diffsteer_weight_overrides(call=call, weights=weights)
    call.set_weight_patches(weights.patches("unet"), weights.patches("text_encoder"), overrides=weights)
    return weights
