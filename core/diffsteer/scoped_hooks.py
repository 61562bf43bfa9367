"""The per-step hooks of a call, with each plugin's step window and region applied (see :mod:`diffsteer.scope`).

Without windows or regions in the call these are the plain pluggy hook calls. A plugin outside its window
is left out of the step's calls. With a region in the call, each plugin's per-step hooks run one plugin at a
time in list order, so the core can blend what that plugin changed into its region (a wrapper then wraps
its own plugin's implementation only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import pluggy
import torch

from .attention_patches import AttentionPatch
from .errors import PluginError
from .hook_chain import is_wrapper
from .plugins import Plugin, plugin_label, scope_of
from .scope import blend, latent_mask

if TYPE_CHECKING:  # pragma: no cover
    from .branches import BranchPredictions
    from .call import GenerationCall, StepState, UNetInputs
    from .views import ViewBatch

#: Hooks whose effect cannot be confined to a region: a plugin with a region may not implement them.
UNCONFINABLE = {
    "diffsteer_encode_prompt": "prompt encoding",
    "diffsteer_edit_embeddings": "embedding edits",
    "diffsteer_weight_overrides": "weight overrides",
    "diffsteer_decode": "decoding",
}


class _Without:
    """Hook callers of ``pm`` that leave some plugins out."""

    def __init__(self, pm: pluggy.PluginManager, left_out: list[Plugin]) -> None:
        self._pm, self._left_out = pm, left_out
        self._callers: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._callers:
            self._callers[name] = self._pm.subset_hook_caller(name, remove_plugins=self._left_out)
        return self._callers[name]


class ScopedHooks:
    """What a generation call's loop and ``call.predict`` call instead of ``call.hook`` for per-step hooks."""

    def __init__(self, call: "GenerationCall") -> None:
        self.call = call
        self.plugins = list(call.plugins)
        self.windowed = any(scope_of(p).windowed for p in self.plugins)
        req = call.request
        self.masks: dict[int, torch.Tensor] = {}
        for p in self.plugins:
            mask = scope_of(p).mask(plugin_label(p), req.height, req.width)
            if mask is not None:
                self.masks[id(p)] = mask.to(call.device)
                self._refuse_unconfinable(p)
        self._relays: dict[frozenset, Any] = {}
        self._alone: dict[tuple[str, int], Any] = {}
        self._cropped: dict[tuple[int, int], torch.Tensor] = {}

    def _refuse_unconfinable(self, plugin: Plugin) -> None:
        for hook, what in UNCONFINABLE.items():
            caller = getattr(self.call.hook, hook, None)
            if caller is not None and any(i.plugin is plugin for i in caller.get_hookimpls()):
                raise PluginError(plugin_label(plugin), f"cannot confine its {what} ({hook}) to a region: remove region=")

    def has_region(self, plugin: Plugin) -> bool:
        return id(plugin) in self.masks

    def _mask(self, plugin: Plugin, view: Optional["ViewBatch"]) -> Optional[torch.Tensor]:
        """The plugin's region, cropped to ``view``'s windows in a view pass (one row per image of each view)."""
        mask = self.masks.get(id(plugin))
        if mask is None or view is None:
            return mask
        key = (id(plugin), view.index)
        if key not in self._cropped:
            self._cropped[key] = view.crop_mask(mask)
        return self._cropped[key]

    def refuse_region(self, owner: str, what: str) -> None:
        """Raise when a plugin labelled ``owner`` has a region but does ``what``, which no region confines."""
        if any(plugin_label(p) == owner and self.has_region(p) for p in self.plugins):
            raise PluginError(owner, f"cannot confine {what} to a region: remove region=")

    # -- which plugins act at a step ------------------------------------------------------------------------
    def active(self, plugin: Plugin, step: Optional["StepState"]) -> bool:
        if step is None or step.window_index is None:
            return True
        return scope_of(plugin).active(step.window_index, step.num_steps)

    def relay(self, step: Optional["StepState"]) -> Any:
        """Hook callers without the plugins outside their window at ``step``."""
        if not self.windowed or step is None:
            return self.call.hook
        out = [p for p in self.plugins if not self.active(p, step)]
        if not out:
            return self.call.hook
        key = frozenset(id(p) for p in out)
        if key not in self._relays:
            self._relays[key] = _Without(self.call.pm, out)
        return self._relays[key]

    def _each(self, hook: str, step: Optional["StepState"]) -> list[tuple[Plugin, Any]]:
        """``(plugin, caller of that plugin alone)`` for the active plugins implementing ``hook``, in call order."""
        caller = getattr(self.call.hook, hook)
        impls = [i for i in reversed(caller.get_hookimpls()) if not is_wrapper(i)]
        out = []
        for impl in impls:
            plugin = impl.plugin
            if self.active(plugin, step):
                key = (hook, id(plugin))
                if key not in self._alone:  # the per-step hooks ask for the same callers every step
                    others = [p for p in self.plugins if p is not plugin]
                    self._alone[key] = self.call.pm.subset_hook_caller(hook, remove_plugins=others)
                out.append((plugin, self._alone[key]))
        return out

    def each(self, hook: str) -> list[tuple[Plugin, Any]]:
        """``(plugin, caller of that plugin alone)`` for every plugin implementing ``hook``, in call order."""
        return self._each(hook, None)

    def blend_latents(self, plugin: Any, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """A chained latents edit (``prepare_latents``) confined to the plugin's region."""
        mask = self.masks.get(id(plugin))
        return after if mask is None else blend(before, after, mask)

    # -- the per-step hooks -------------------------------------------------------------------------------------
    def latents_hook(self, hook: str, step: "StepState") -> None:
        """``pre_step`` or ``post_step``: latent edits confined to each plugin's region."""
        if not self.masks:
            getattr(self.relay(step), hook)(call=self.call, step=step)
            return
        for plugin, caller in self._each(hook, step):
            before = step.latents
            caller(call=self.call, step=step)
            if self.has_region(plugin) and step.latents is not before:
                step.latents = blend(before, step.latents, self.masks[id(plugin)])

    def model_inputs(self, step: Optional["StepState"], inputs: "UNetInputs") -> None:
        if not self.masks:
            self.relay(step).diffsteer_model_inputs(call=self.call, step=step, inputs=inputs)
            return
        for plugin, caller in self._each("diffsteer_model_inputs", step):
            inputs.region = self._mask(plugin, inputs.view)
            try:
                caller(call=self.call, step=step, inputs=inputs)
            finally:
                inputs.region = None

    def noise_prediction(self, step: "StepState", predictions: "BranchPredictions") -> None:
        if not self.masks:
            self.relay(step).diffsteer_noise_prediction(call=self.call, step=step, predictions=predictions)
            return
        for plugin, caller in self._each("diffsteer_noise_prediction", step):
            before = dict(predictions)
            caller(call=self.call, step=step, predictions=predictions)
            mask = self._mask(plugin, step.view)
            if mask is not None:
                for name, value in list(predictions.items()):
                    if name in before and value is not before[name]:
                        predictions[name] = blend(before[name], value, mask)

    def combine_guidance(
        self, step: "StepState", predictions: "BranchPredictions", core: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The guided prediction: an active plugin's formula (inside its region) or the core's ``core()``."""
        guided = self.relay(step).diffsteer_combine_guidance(call=self.call, step=step, predictions=predictions)
        if guided is None:
            return core()
        for plugin, _ in self._each("diffsteer_combine_guidance", step):
            mask = self._mask(plugin, step.view)
            if mask is not None:
                return blend(core(), guided, mask)
        return guided

    def guidance(self, step: "StepState", predictions: "BranchPredictions") -> list[torch.Tensor]:
        """The active plugins' additive terms, each confined to its plugin's region, ordered by plugin name.

        The hooks run in list order; the terms come back sorted by name (stable), so that their float sum, and
        with it any threshold a later step takes on the latents (SEGA's percentile mask), does not depend on the
        order the plugins were listed in. Two plugins of the same name keep their list order, and so do all terms
        when a wrapper wraps the hook (it sees the whole result list, which only the one hook call gives it)."""
        impls = self.call.hook.diffsteer_guidance.get_hookimpls()
        if not self.masks and (len(impls) <= 1 or any(is_wrapper(i) for i in impls)):
            return list(self.relay(step).diffsteer_guidance(call=self.call, step=step, predictions=predictions))
        terms: list[tuple[str, torch.Tensor]] = []
        for plugin, caller in self._each("diffsteer_guidance", step):
            mask = self._mask(plugin, step.view)
            for term in caller(call=self.call, step=step, predictions=predictions):
                if mask is not None:
                    term = term * latent_mask(mask, term)
                terms.append((plugin_label(plugin), term))
        return [term for _, term in sorted(terms, key=lambda named: named[0])]

    # -- attention patches ------------------------------------------------------------------------------------
    def collect_patches(self) -> list[tuple[Plugin, AttentionPatch]]:
        """Every plugin's attention patches with the plugin that registered them; edits under a region are refused."""
        found: list[tuple[Plugin, AttentionPatch]] = []
        for plugin, caller in self._each("diffsteer_attention_patches", None):
            caller(call=self.call, register=lambda patch, plugin=plugin: found.append((plugin, patch)))
        for plugin, patch in found:
            edits = [n for n in ("edit_qkv", "edit_probs", "edit_output") if getattr(patch, n) is not None]
            if edits and self.has_region(plugin):
                raise PluginError(
                    plugin_label(plugin), f"cannot confine attention edits ({', '.join(edits)}) to a region: remove region="
                )
        return found

    def active_patches(self, found: list[tuple[Plugin, AttentionPatch]], step: "StepState") -> list[AttentionPatch]:
        return [patch for plugin, patch in found if self.active(plugin, step)]
