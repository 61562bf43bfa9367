"""The hook contract between the diffsteer core and its plugins.

This module is the whole contract. Every hook below says **when** it fires, what it **receives**,
what it **may change** and what it **returns**. Implement a hook by defining a method of the same name
on a :class:`diffsteer.Plugin` subclass, decorated with :data:`hookimpl`; pluggy prunes arguments, so an
implementation may accept only the arguments it uses, and keeps working when new ones are added.

Order and exclusivity:

* Plugins run in the order the user listed them (``plugins=[a, b]``: ``a`` sees each hook first).
* Hooks marked *exclusive* replace core behaviour (:func:`diffsteer_encode_prompt`,
  :func:`diffsteer_combine_guidance`, :func:`diffsteer_decode`, :func:`diffsteer_plan_views`); they are
  exactly the ``firstresult``
  specs. When two plugins of one call implement the same exclusive hook, the call fails before any work
  with a :class:`~diffsteer.errors.PluginConflictError` naming both: nothing is silently overwritten.
* pluggy wrappers (``@hookimpl(wrapper=True)``, or the older ``hookwrapper=True``) work on every hook,
  the chained ones included (:func:`diffsteer_prepare_latents`): they wrap all implementations, see the
  value going in and the result coming out, and may replace it. A wrapper never conflicts on an
  exclusive hook: it wraps whichever plugin replaces the core.
* A plugin declares the contract version it was written for (``contract = "1.1"`` on its class; ``"1.0"``
  when it declares none). A call, a training run or ``diffsteer train`` refuses a plugin written for
  another major version or a newer minor with a :class:`~diffsteer.errors.PluginContractError` naming
  it. Each hook below says which version added it; *Contract versions* at the end lists the rest.
* Every plugin has a **step window** and a **region** (``window_start``/``window_end``/``region``
  keywords, applied by the core; :mod:`diffsteer.scope`). Outside its window none of a plugin's per-step hooks
  (``pre_step``, ``model_inputs``, ``noise_prediction``, ``combine_guidance``, ``guidance``,
  ``post_step``) is called, its attention patches are left out and its UNet weight overrides do not act.
  A region (an image-sized mask)
  confines what the plugin changes in a step: its guidance term, residuals, formula, and edits of
  latents and predictions are blended in with the mask at their resolution; the following UNet passes
  see the whole latent, so the effect spreads from there as the image forms. What cannot be confined
  (``encode_prompt``, ``edit_embeddings``, ``weight_overrides``, ``decode``, added tokens, attention
  edits, extra input channels) raises a :class:`~diffsteer.errors.PluginError` naming the plugin.
  With a region in the call, per-step hooks run one plugin at a time (a wrapper wraps its own
  plugin's implementation only).
* A generation call runs under ``torch.no_grad``. A hook that needs gradients with respect to the
  latents (attend-and-excite, pix2pix-zero) runs its passes inside ``with call.gradients():``
  (:meth:`~diffsteer.call.GenerationCall.gradients`): ``call.predict`` is then differentiable, attention
  observers see probabilities that carry the graph, the model weights stay frozen and conditioning from
  ``model_inputs`` is a constant of the pass (no graph through a ControlNet).
* A plugin may run a **sub-loop** (DDIM inversion for DiffEdit and pix2pix-zero, or any scheduler) with
  ``call.invert(...)`` / ``call.run_subloop(...)`` (:meth:`~diffsteer.call.GenerationCall.run_subloop`)
  from ``prepare_latents`` or later (earlier, overrides and patches are not in place: it is refused). It
  runs on a fresh scheduler instance of its own and returns the :class:`~diffsteer.subloop.Trajectory`;
  the call's tokens, weight overrides, ``model_inputs`` conditioning and attention patches act in it
  (patches are registered before ``prepare_latents`` for this); the main loop's per-step hooks do not
  fire. Hooks then see the sub-loop's own step (``step.loop`` is its name, ``index``/``num_steps`` count
  its steps); a ``call.predict`` outside any loop passes a one-step ``StepState`` with
  ``loop="predict"``, never ``None``.
* Per-call state belongs in ``call.state_for(self)``, never on the plugin object: one plugin instance
  may serve concurrent calls.

A generation call fires, in order::

    setup → weight_overrides → encode_prompt* → guidance_branches → edit_embeddings (per branch)
          → attention_patches → prepare_latents → plan_views
    for each step:  pre_step → model_inputs → noise_prediction → combine_guidance → guidance → post_step
                    (with a view plan: pre_step, then the middle four per batch of views, then post_step)
    decode → teardown (always, even after an error)

A training run (:class:`diffsteer.training.DiffusionTrainer`) fires the training hooks instead::

    train_parameters (once) → for each micro-step: train_batch → train_model_inputs → train_loss
    train_save (on export)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import pluggy
import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .attention_patches import AttentionPatch
    from .branches import Branch, BranchLayout, BranchPredictions
    from .call import GenerationCall, StepState, UNetInputs
    from .overrides import WeightOverrides
    from .commands import TrainCommand
    from .views import ViewPlan

PROJECT = "diffsteer"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def exclusive(place: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Mark a spec as exclusive: ``firstresult``, with ``place`` naming what it replaces in conflict errors."""

    def mark(fn: Callable[..., object]) -> Callable[..., object]:
        fn.diffsteer_place = place  # type: ignore[attr-defined]
        return hookspec(firstresult=True)(fn)

    return mark


#: The hook contract this core provides, ``"MAJOR.MINOR"``. A minor version only adds (hooks, arguments,
#: services); a major version changes or removes something. A plugin declares the version it needs in
#: :attr:`diffsteer.Plugin.contract`; the core serves it when the majors match and the plugin's minor is
#: not newer (see :func:`diffsteer.plugins.check_contract`).
CONTRACT_VERSION = "1.2"

#: What each contract version added; ``docs/hooks.md`` prints it.
CONTRACT_HISTORY = {
    "1.0": "the hooks and call services of diffsteer 0.1 (plugins that declare no version are 1.0 plugins)",
    "1.1": "pluggy wrappers on chained hooks; ``Plugin.contract``; call-scoped weight overrides; the call owns "
    "its run (timesteps before ``setup``, ``call.narrow_steps``, ``call.latent_shape``, ``call.vae_scale_factor``, "
    "``call.init_image``, ``call.init_latents``, ``call.encode_images``, ``call.decode_latents``); branch roles "
    "(``Branch.role``, ``BranchLayout.with_role``); every plugin's step window and region (``window_start``, "
    "``window_end``, ``region``, ``Plugin.scope_aliases``); gradient passes (``call.gradients()``); sub-loops and "
    "inversion (``call.run_subloop``, ``call.invert``, ``call.step_scheduler``, ``StepState.loop``), with "
    "``attention_patches`` fired before ``prepare_latents``",
    "1.2": "per-view UNet passes (MultiDiffusion: ``diffsteer.views``, ``StepState.view``, ``UNetInputs.view``, "
    "``call.view_state_for``, ``call.view_states``); UNet weight overrides follow the plugin's step window",
}


def since(version: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Record the contract version that added a hook spec (``docs/hooks.md`` prints it)."""
    if version not in CONTRACT_HISTORY:
        raise ValueError(f"unknown contract version {version!r}")

    def mark(fn: Callable[..., object]) -> Callable[..., object]:
        fn.diffsteer_since = version  # type: ignore[attr-defined]
        return fn

    return mark


@since("1.0")
@hookspec
def diffsteer_setup(call: "GenerationCall") -> None:
    """Prepare this plugin for one generation call.

    When: once per call, after the plugin set is resolved and the call owns its run: a fresh scheduler
    with its timesteps set, img2img's window included; before any prompt is encoded.
    Receives: ``call``, the :class:`~diffsteer.call.GenerationCall`: model parts, request parameters,
    generator, and the run: ``call.timesteps`` and ``call.num_steps`` (what the loop will run),
    ``call.latent_shape`` ``(batch, channels, h, w)``, ``call.vae_scale_factor``, ``call.init_image``
    and ``call.init_latents`` (img2img's image and its latents before noise, encoded once on first use
    with the call's generator), ``call.encode_images(pixels, sample=...)`` and
    ``call.decode_latents(latents)`` (the VAE with its scaling and shift factors). Check settings
    against these here, so a call that cannot work fails before any work.
    May change: the denoising window, narrowed only, through ``call.narrow_steps(owner, strength)``
    (the last ``strength`` of the schedule, counted like img2img's; the narrowest wins; only here);
    ``call.state_for(self)`` (per-call state) and the call's vocabulary through
    ``call.add_tokens(owner, {token: vectors})`` (textual inversion: every prompt encoder of the call,
    the core's or an ``encode_prompt`` plugin's, then reads the token; the shared models stay unchanged;
    add tokens from a ``@hookimpl(tryfirst=True)`` setup, so plugins that tokenize in their own setup,
    whatever their place in the list, see them);
    it may raise :class:`~diffsteer.errors.PluginError` to reject a model or request it cannot serve
    (wrong channel count, size mismatch).
    Returns: nothing.
    """


@since("1.1")
@hookspec
def diffsteer_weight_overrides(call: "GenerationCall", weights: "WeightOverrides") -> None:
    """Change model weights for this call only (LoRA, custom diffusion's K/V, TIME's edited projections).

    When: once per call, right after :func:`diffsteer_setup`, before any prompt is encoded.
    Receives: ``weights``, the call's :class:`~diffsteer.overrides.WeightOverrides`. Register with
    ``weights.add_delta(owner, name, delta)``, ``weights.add_low_rank(owner, layer, down, up, scale=...)``
    or ``weights.replace(owner, name, value)``; ``model="text_encoder"`` targets the text encoder
    (default ``"unet"``). Names are the model's parameter names (``weights.names(model)`` lists those
    that can be overridden: the weights and biases of linear and convolution layers).
    May change: nothing else. The shared models are never modified: every UNet pass of the call (also
    compiled, also plugins' extra passes) and every prompt encoding of the call (also a plugin's, through
    ``call.text``) sees the changed weights, and concurrent calls on the pipeline do not. With a step window
    (since 1.2) the plugin's UNet changes act only in the steps of its window; its text-encoder changes act
    on the prompts, which are encoded once, before the steps. Deltas of
    several plugins on one parameter sum; a second replacement of a parameter raises
    :class:`~diffsteer.errors.PluginConflictError` naming both plugins; a name, shape or non-finite value
    that does not fit raises :class:`~diffsteer.errors.PluginError` naming the plugin.
    Returns: nothing.
    """


@since("1.0")
@exclusive("prompt encoding")
def diffsteer_encode_prompt(call: "GenerationCall", texts: list[str]) -> Optional[torch.Tensor]:
    """Encode prompt texts into text-encoder hidden states. *Exclusive.*

    When: for each list of texts the core encodes: the positive prompts, the negative prompts and any
    branch prompts that plugins request through ``call.encode``. A call given ``prompt_embeds`` or
    ``negative_prompt_embeds`` (prompts encoded elsewhere) refuses a plugin that implements this hook with
    a :class:`~diffsteer.errors.PluginError` naming it, before any work: its prompts are already encoded.
    Receives: ``texts``, one string per batch item.
    May change: nothing on ``call``.
    Returns: a tensor ``(len(texts), tokens, hidden)`` in ``call.dtype``, or ``None`` to use the core
    encoder (``call.text.encode``). All embeddings stacked into one UNet batch must have the same
    token count (a plugin that chunks long prompts pads every text of the call alike); otherwise the
    core raises a :class:`~diffsteer.errors.GenerationError` giving both shapes.
    """


@since("1.0")
@hookspec
def diffsteer_guidance_branches(call: "GenerationCall", branches: "BranchLayout") -> None:
    """Add extra guidance branches to the batched UNet call.

    When: once per call, after the positive/negative prompts are encoded and the ``uncond``/``cond``
    branches are in ``branches``.
    Receives: ``branches``, the call's :class:`~diffsteer.branches.BranchLayout`. Each branch has a
    ``role``: ``"unconditional"`` (the core's ``uncond``), ``"conditional"`` (the core's ``cond``) or
    ``"extra"``; injectors decide by role, not by name, what a branch gets (ControlNet's guess mode gives
    nothing to the unconditional one).
    May change: ``branches`` (``branches.add(name, embeddings, owner=..., role="extra")``); every branch
    runs in the same UNet call as classifier-free guidance. A duplicate name, an unknown role or
    embeddings of another shape raise :class:`~diffsteer.errors.PluginError` naming ``owner``.
    Returns: nothing.
    """


@since("1.1")
@hookspec
def diffsteer_edit_embeddings(
    call: "GenerationCall", branch: "Branch", embeddings: torch.Tensor
) -> Optional[torch.Tensor]:
    """Edit one branch's text embeddings (pix2pix-zero's edit direction), without replacing the encoder.

    When: once per branch of the layout, in layout order, after :func:`diffsteer_guidance_branches`
    and before :func:`diffsteer_prepare_latents`. Chained in list order: each plugin receives the
    previous one's result, so edits stack with each other and with an ``encode_prompt`` plugin (prompt
    weighting encodes, then the edits apply).
    Receives: ``branch`` (its ``name``, ``owner`` and ``role``; ``branch.embeddings`` as encoded) and
    ``embeddings``, the branch's embeddings as the previous plugin left them, ``(batch, tokens, hidden)``
    with one row per image.
    May change: nothing else.
    Returns: new embeddings of the same shape, or ``None`` to keep them; another shape raises
    :class:`~diffsteer.errors.PluginError` naming the plugin.
    """


@since("1.0")
@hookspec
def diffsteer_prepare_latents(call: "GenerationCall", latents: torch.Tensor) -> Optional[torch.Tensor]:
    """Replace or adjust the initial latents.

    When: once per call, after the core has drawn the starting latents (txt2img noise scaled by the
    scheduler's ``init_noise_sigma``, or the noised image latents for img2img) and before the first step.
    Attention patches are already in place, so a plugin may invert ``call.init_latents`` here with
    ``call.invert`` and start from ``trajectory.final`` (DiffEdit, pix2pix-zero).
    Receives: ``latents`` ``(batch, channels, h, w)``, the result of the previous plugin in the chain.
    May change: nothing else.
    Returns: new latents (the next plugin receives them) or ``None`` to keep them.
    """


@since("1.0")
@hookspec
def diffsteer_attention_patches(call: "GenerationCall", register: Callable[["AttentionPatch"], None]) -> None:
    """Register attention patches for this call.

    When: once per call, after the branches are built and before ``prepare_latents`` (so sub-loops run
    with the patches). The core compiles all patches into one processor per patched layer; attention
    itself never calls back into pluggy. ``call.pass_name`` tells an observer which pass it sees
    (``"main"``, a sub-loop's name, or a plugin's extra pass).
    Receives: ``register``, to be called with :class:`~diffsteer.attention_patches.AttentionPatch` objects.
    May change: nothing else.
    Returns: nothing.
    """


@since("1.2")
@exclusive("the views of the canvas")
def diffsteer_plan_views(call: "GenerationCall") -> Optional["ViewPlan"]:
    """Denoise the canvas as windows (MultiDiffusion panoramas and region prompts). *Exclusive.*

    When: once per call, after :func:`diffsteer_prepare_latents`, before the first step.
    Receives: ``call``; ``call.latent_shape`` is the canvas.
    May change: nothing.
    Returns: a :class:`~diffsteer.views.ViewPlan` (``ViewPlan.grid(canvas, window, stride, batch_size=...,
    wrap=...)``, or views of one size with per-cell weights and per-view branch embeddings), or ``None`` to
    denoise the whole canvas at once. With a plan, every step of the main loop fires ``pre_step`` on the
    canvas, then for each batch of views crops the latents and runs ``model_inputs``, ``noise_prediction``,
    ``combine_guidance``, ``guidance`` and the scheduler step on the crop, with that batch's own scheduler
    state; the views' results are averaged into the canvas, weighted per cell, and ``post_step`` sees the
    canvas. In a view pass ``step.view`` and ``inputs.view`` are the :class:`~diffsteer.views.ViewBatch`:
    an injector crops canvas-sized conditioning with ``inputs.view.crop(owner, tensor)``; ``call.layout``
    stacks every branch over the batch's views (view-major) and ``call.step_scheduler`` is the batch's
    scheduler; ``call.view_state_for(plugin, factory)`` keeps state per view batch (guidance momentum).
    Regions are cropped by the core. Sub-loops and lone ``call.predict`` passes see the whole canvas. A
    plan that leaves a latent cell without weight, leaves the canvas or mixes view sizes raises
    :class:`~diffsteer.errors.PluginError` naming the plugin.
    """


@since("1.0")
@hookspec
def diffsteer_pre_step(call: "GenerationCall", step: "StepState") -> None:
    """Act before a denoising step.

    When: at the start of every step, before the UNet input is built.
    Receives: ``step``: index, timestep, ``latents``.
    May change: ``step.latents`` (for example a gradient update toward an attention target: run the
    differentiable pass inside ``with call.gradients():``, see the module docs).
    Returns: nothing.
    """


@since("1.0")
@hookspec
def diffsteer_model_inputs(call: "GenerationCall", step: "StepState", inputs: "UNetInputs") -> None:
    """Add conditioning to a UNet pass.

    When: before every UNet pass of the call: the main batched pass, any extra pass a plugin runs
    through ``call.predict`` and every pass of a sub-loop (``inputs.pass_name`` tells which; ``step`` is
    the sub-loop's own step there, and a one-step ``loop="predict"`` state for a pass outside any loop).
    Receives: ``inputs``: the batched ``sample``, ``timestep``, ``encoder_hidden_states`` and the
    ``layout`` of branches they stack.
    May change: ``inputs`` through ``add_residuals`` (ControlNet-style down/mid residuals, summed
    across plugins), ``add_intrablock_residuals`` (T2I-Adapter) and ``add_channels`` (extra input
    channels such as depth or image latents). Anything added must cover every branch of
    ``inputs.layout``: the core checks batch sizes and names the plugin on a mismatch.
    Returns: nothing.
    """


@since("1.0")
@hookspec
def diffsteer_noise_prediction(
    call: "GenerationCall", step: "StepState", predictions: "BranchPredictions"
) -> None:
    """Observe or adjust the raw per-branch UNet predictions.

    When: after the main UNet pass of every step, before guidance.
    Receives: ``predictions``, the UNet output split by branch name.
    May change: ``predictions[name] = tensor`` (same shape).
    Returns: nothing.
    """


@since("1.0")
@hookspec
def diffsteer_guidance(
    call: "GenerationCall", step: "StepState", predictions: "BranchPredictions"
) -> Optional[torch.Tensor]:
    """Contribute an additive guidance term.

    When: every step, after :func:`diffsteer_noise_prediction`.
    Receives: ``predictions`` per branch (``uncond`` is absent when guidance is off).
    May change: nothing; it may run extra UNet passes through ``call.predict``.
    Returns: a tensor shaped like one branch's prediction, added to the guided prediction (terms from
    all plugins are summed, in the order of the plugins' names so that the list order does not change the
    rounding; in list order when a wrapper wraps this hook), or ``None``.
    """


@since("1.0")
@exclusive("the guidance formula")
def diffsteer_combine_guidance(
    call: "GenerationCall", step: "StepState", predictions: "BranchPredictions"
) -> Optional[torch.Tensor]:
    """Replace the classifier-free guidance formula. *Exclusive.*

    When: every step, to combine the branches into one prediction, before the additive terms of
    :func:`diffsteer_guidance` are added and ``guidance_rescale`` is applied.
    Receives: ``predictions`` per branch.
    May change: nothing.
    Returns: the combined prediction, or ``None`` for the core's ``uncond + scale * (cond - uncond)``, where
    ``scale`` is ``call.guidance_scale_at(step)``: the request's ``guidance_scale`` inside its
    ``guidance_interval``, 1 (the ``cond`` prediction alone) outside it. A formula that should honour the
    interval reads the same method.
    """


@since("1.0")
@hookspec
def diffsteer_post_step(call: "GenerationCall", step: "StepState") -> None:
    """Act after the scheduler step.

    When: at the end of every step, after ``scheduler.step``.
    Receives: ``step``: ``latents`` is now the previous-timestep sample; ``prediction`` is the final
    guided prediction and ``pred_original`` the scheduler's x0 estimate (if it gives one).
    May change: ``step.latents`` (masked blending, view averaging, ...).
    Returns: nothing.
    """


@since("1.0")
@exclusive("decoding")
def diffsteer_decode(call: "GenerationCall", latents: torch.Tensor) -> Optional[torch.Tensor]:
    """Decode final latents into images. *Exclusive.*

    When: once per call, after the last step, unless ``output_type="latent"``.
    Receives: the final ``latents``.
    May change: nothing.
    Returns: images ``(batch, 3, H, W)`` in ``[-1, 1]``, or ``None`` for the core's VAE decode.
    """


@since("1.0")
@hookspec
def diffsteer_teardown(call: "GenerationCall", error: Optional[BaseException]) -> None:
    """Release what :func:`diffsteer_setup` took.

    When: once per call, last, also when the call failed (``error`` is then the exception).
    Receives: ``error`` or ``None``.
    May change: nothing on the call's result.
    Returns: nothing.
    """


@since("1.0")
@hookspec
def diffsteer_train_commands(register: Callable[["TrainCommand"], None]) -> None:
    """Offer ``diffsteer train NAME`` commands (textual inversion, ControlNet, ...).

    When: when a user runs ``diffsteer train NAME`` and ``NAME`` is not a core recipe. The CLI loads
    only the plugin whose entry point is ``NAME`` and calls this hook on its *class*, so implement it
    as a ``@staticmethod`` (no settings exist yet).
    Receives: ``register``, to be called with :class:`~diffsteer.commands.TrainCommand` objects.
    May change: nothing.
    Returns: nothing. The command named like the entry point runs; a plugin may register others, which
    ``diffsteer train NAME --help`` lists.
    """


# =====================================================================================================
# Training hooks
# =====================================================================================================
#
# Fired by :class:`diffsteer.training.DiffusionTrainer`, never by a generation call. One optimizer step
# fires, in order::
#
#     (once, at setup: train_parameters)
#     for each micro-step:  train_batch → train_model_inputs → train_loss
#     (on export: train_save)
#
# Training plugins keep their state on themselves: a trainer runs one plugin set for its whole life.

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pathlib import Path

    from .training import DiffusionTrainer, ParamGroup, TrainBatch, TrainOutputs


@since("1.0")
@hookspec
def diffsteer_train_parameters(trainer: "DiffusionTrainer") -> Optional[list[ParamGroup]]:
    """Choose the parameters that train (and prepare the models for training).

    When: once, when the trainer sets up: before the optimizer is built and before a checkpoint is
    restored, so models changed here (a token added, embeddings resized, layers added) match the saved
    state on resume.
    Receives: ``trainer`` with ``unet``, ``text_encoder``, ``tokenizer``, ``scheduler``, ``config``.
    May change: the models and tokenizer. To train part of a tensor (one embedding row), register a
    gradient hook on it that zeroes the rest and give its group ``weight_decay=0.0``: AdamW then leaves
    the other rows bit for bit unchanged.
    Returns: a list of :class:`~diffsteer.training.ParamGroup` (or ``(name, params)`` pairs), or
    ``None``. The groups of all plugins train together and replace the default set (the whole UNet,
    plus the text encoder when ``config.train_text_encoder``); every other parameter of the UNet and
    text encoder is frozen. A parameter in two groups is an error naming both.
    """


@since("1.0")
@hookspec
def diffsteer_train_batch(trainer: "DiffusionTrainer", batch: "TrainBatch") -> None:
    """Extend or adjust one micro-batch.

    When: every micro-step, after the rows of this process are read from the data and before any
    noise is drawn or caption encoded.
    Receives: ``batch``, a dict with per-row ``latents`` ``(b, 4, h, w)`` (or ``pixel_values`` when
    the trainer has a VAE), ``captions`` (``b`` strings), ``keys`` (``(b,)`` int64: the row's position
    in the step, which seeds its noise, timestep and caption dropout), ``loss_weight`` (``(b,)``, ones)
    and whatever else the data returned; ``trainer.step`` is the optimizer step.
    May change: ``batch`` in place: replace items, add items for other hooks, or append rows with
    :func:`diffsteer.training.append_rows` (DreamBooth class images), which extends every per-row item
    and gives the new rows their own keys. The core loss is ``sum(loss_weight * row_loss) / b`` over
    the ``b`` rows the data gave, so appended rows with weight ``w`` add ``w`` times their mean loss.
    Returns: nothing.
    """


@since("1.0")
@hookspec
def diffsteer_train_model_inputs(
    trainer: "DiffusionTrainer", batch: "TrainBatch", inputs: "UNetInputs"
) -> None:
    """Add conditioning to the training UNet pass (ControlNet, T2I-Adapter, extra input channels).

    When: every micro-step, after the noisy latents and text embeddings are built, right before the
    UNet forward (inside autocast when mixed precision is on, with gradients enabled).
    Receives: ``batch`` (as :func:`diffsteer_train_batch` left it) and ``inputs``, the same
    :class:`~diffsteer.call.UNetInputs` that generation uses, with one branch named ``"train"``.
    May change: ``inputs`` through ``add_residuals``, ``add_intrablock_residuals`` and ``add_channels``
    (summed or concatenated across plugins, rows checked as in generation); a trainable conditioning
    network runs here, and its parameters train when :func:`diffsteer_train_parameters` returns them.
    Returns: nothing.
    """


@since("1.0")
@hookspec
def diffsteer_train_loss(
    trainer: "DiffusionTrainer", batch: "TrainBatch", outputs: "TrainOutputs"
) -> Optional[torch.Tensor]:
    """Contribute an extra loss term.

    When: every micro-step, after the UNet forward and the core loss, before backward.
    Receives: ``outputs``: ``prediction``, ``target``, ``row_loss`` (``(rows,)`` unweighted MSE per row),
    ``loss`` (the core loss), ``timesteps``, ``noise``, ``noisy_latents``, ``encoder_hidden_states`` and
    ``captions`` (what those states encode: ``""`` where caption dropout hit).
    May change: nothing.
    Returns: a scalar tensor added to the loss (terms of all plugins are summed), or ``None``. Like the
    core loss it is a per-process mean: gradients are averaged over processes and micro-steps.
    """


@since("1.0")
@hookspec
def diffsteer_train_save(trainer: "DiffusionTrainer", directory: Path) -> Optional[bool]:
    """Write this plugin's artifacts when the trained model is exported.

    When: on :meth:`~diffsteer.training.DiffusionTrainer.export` (at the end of ``train()`` into
    ``<out_dir>/final``), in the main process only, with the EMA weights applied when EMA is on.
    ``directory`` is a temp directory renamed into place once every writer succeeded.
    Receives: ``directory``, the (empty) export directory.
    May change: files inside ``directory``; nothing on the models.
    Returns: ``True`` when this plugin's files are the whole result (learned embeddings, K/V deltas),
    so the core skips its default export of the trained models (``unet/``, ``text_encoder/`` and
    ``tokenizer/``); ``None`` to keep it.
    """
