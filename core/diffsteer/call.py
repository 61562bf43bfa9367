"""Per-call state: everything one generation call owns, so one pipeline can serve concurrent calls."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, TypeVar, Union, overload

import pluggy
import torch

from .attention_patches import AttentionPatch, PatchedAttention, compile_patches
from .branches import Branch, BranchLayout, BranchPredictions
from .errors import PluginError, RequestError
from .hook_chain import chain
from .latent_codec import decode_latents, encode_images, vae_scale_factor
from .models.context import ForwardContext, WeightPatch
from .plugins import Plugin, plugin_label
from .schedulers import Scheduler
from .scope import latent_mask
from .scoped_hooks import ScopedHooks
from .text import EncoderScope, PromptEncoder, TokenTable, token_table_for

if TYPE_CHECKING:  # pragma: no cover
    from .models.unet import UNet2DConditionModel
    from .models.vae import AutoencoderKL
    from .subloop import PredictionEdit, Trajectory
    from .overrides import WeightOverrides
    from .views import ViewBatch

_State = TypeVar("_State")


@dataclass
class GenerationRequest:
    """The user's parameters of one call, after defaults are filled in (diffusers' names)."""

    prompts: list[str]
    negative_prompts: Optional[list[str]]
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    height: int
    width: int
    num_images_per_prompt: int
    strength: float
    eta: Optional[float]
    clip_skip: Optional[int]
    output_type: str
    seed: Optional[int]
    #: classifier-free guidance acts only at timesteps ``t`` with ``lo <= t / T <= hi`` (``T``: the scheduler's
    #: training timesteps); other steps take the conditional prediction alone (:meth:`guidance_scale_at`).
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    #: ``(prompts, tokens, hidden)`` embeddings the caller passed instead of text (:mod:`diffsteer.prompt_embeds`);
    #: ``prompts`` then holds one ``""`` per row.
    prompt_embeds: Optional[torch.Tensor] = field(default=None, repr=False)
    #: the same for the negative prompts (then ``negative_prompts`` is None).
    negative_prompt_embeds: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def guidance_scale_at(self, timestep: Union[int, torch.Tensor], num_train_timesteps: int) -> float:
        """The classifier-free guidance scale at ``timestep``: ``guidance_scale`` inside
        :attr:`guidance_interval`, 1 (the conditional prediction alone) outside it."""
        lo, hi = self.guidance_interval
        return self.guidance_scale if lo <= float(timestep) / num_train_timesteps <= hi else 1.0


@dataclass
class StepState:
    """One denoising step, as hooks see it; ``latents`` is the only field hooks normally replace.

    ``index``/``num_steps`` count the steps of the loop the step belongs to (``loop``): the main loop, a
    sub-loop (:meth:`GenerationCall.run_subloop`: its own steps), or ``"predict"``, the one-step state a
    lone :meth:`GenerationCall.predict` outside any loop gets (``index`` 0 of 1, its timestep and latents).
    """

    index: int
    timestep: torch.Tensor
    latents: torch.Tensor
    num_steps: int
    prediction: Optional[torch.Tensor] = None
    pred_original: Optional[torch.Tensor] = None
    #: ``"main"``, a sub-loop's name, or ``"predict"`` (a lone pass outside any loop).
    loop: str = "main"
    #: the step's place in denoising order when it differs from ``index`` (an ascending sub-loop: inversion).
    denoise_index: Optional[int] = None
    #: the views this step's prediction covers (a view plan's pass: ``latents`` is their crop), else ``None``.
    view: Optional["ViewBatch"] = None

    @property
    def window_index(self) -> Optional[int]:
        """The step index that step windows read: the place in denoising order, so a window covers the same
        noise levels in an inversion as in the main loop; ``None`` for a lone pass, which no window leaves out."""
        if self.loop == "predict":
            return None
        return self.index if self.denoise_index is None else self.denoise_index


@dataclass
class UNetInputs:
    """The inputs of one batched UNet pass; plugins add conditioning through the ``add_*`` methods."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    layout: BranchLayout
    pass_name: str
    down_residuals: Optional[list[torch.Tensor]] = None
    mid_residual: Optional[torch.Tensor] = None
    intrablock_residuals: Optional[list[torch.Tensor]] = None
    extra_channels: list[torch.Tensor] = field(default_factory=list)
    #: the region of the plugin adding conditioning now (set by the core): its residuals are confined to it.
    #: In a view pass it is already cropped to the views (one row per image of each view).
    region: Optional[torch.Tensor] = field(default=None, repr=False)
    #: the views this pass covers (:mod:`diffsteer.views`): crop canvas-sized conditioning with
    #: ``inputs.view.crop(owner, tensor)``; ``None`` when the pass covers the whole canvas.
    view: Optional["ViewBatch"] = None

    def _confined(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.region is None:
            return list(tensors)
        # One mask row per image (of each view) serves every branch of the pass.
        branches = len(self.layout) if self.region.shape[0] > 1 else 1
        return [t * latent_mask(self.region, t).repeat(branches, 1, 1, 1) for t in tensors]

    def _check_rows(self, owner: str, what: str, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            if t.shape[0] != self.sample.shape[0]:
                raise PluginError(
                    owner,
                    f"{what} has {t.shape[0]} rows but this UNet pass ({self.pass_name!r}) stacks "
                    f"{self.sample.shape[0]} rows for branches {self.layout.names}",
                )

    def add_residuals(
        self, owner: str, down: Optional[Sequence[torch.Tensor]] = None, mid: Optional[torch.Tensor] = None
    ) -> None:
        """Add ControlNet-style residuals (summed with those of other plugins); either part may be omitted."""
        if down:
            self._check_rows(owner, "a down-block residual", down)
            down = self._confined(down)
            if self.down_residuals is not None and len(down) != len(self.down_residuals):
                raise PluginError(owner, f"gave {len(down)} down residuals, others gave {len(self.down_residuals)}")
            self.down_residuals = (
                list(down) if self.down_residuals is None else [a + b for a, b in zip(self.down_residuals, down)]
            )
        if mid is not None:
            self._check_rows(owner, "the mid-block residual", [mid])
            mid = self._confined([mid])[0]
            self.mid_residual = mid if self.mid_residual is None else self.mid_residual + mid

    def add_intrablock_residuals(self, owner: str, residuals: Sequence[torch.Tensor]) -> None:
        """Add T2I-Adapter-style residuals inside the down blocks (summed across plugins)."""
        self._check_rows(owner, "an intrablock residual", residuals)
        residuals = self._confined(residuals)
        if self.intrablock_residuals is None:
            self.intrablock_residuals = list(residuals)
        elif len(residuals) != len(self.intrablock_residuals):
            raise PluginError(
                owner, f"gave {len(residuals)} intrablock residuals, others gave {len(self.intrablock_residuals)}"
            )
        else:
            self.intrablock_residuals = [a + b for a, b in zip(self.intrablock_residuals, residuals)]

    def add_channels(self, owner: str, channels: torch.Tensor) -> None:
        """Append input channels (image or depth latents), concatenated after the latents in call order."""
        self._check_rows(owner, "the extra input channels", [channels])
        if self.region is not None:
            raise PluginError(owner, "cannot confine extra input channels to a region: remove region=")
        if channels.shape[-2:] != self.sample.shape[-2:]:
            raise PluginError(
                owner, f"extra channels are {tuple(channels.shape[-2:])}, latents {tuple(self.sample.shape[-2:])}"
            )
        self.extra_channels.append(channels)


    def run(
        self,
        unet: "UNet2DConditionModel",
        *,
        channel_error: Callable[[int, int], Exception],
        residual_dtype: Optional[torch.dtype] = None,
        context: Optional[ForwardContext] = None,
    ) -> torch.Tensor:
        """Run ``unet`` on these inputs: the one UNet invocation that generation and training share.

        Extra channels are concatenated after the latents in the sample's dtype; residuals are cast to
        ``residual_dtype`` when given. A channel count the UNet does not take raises
        ``channel_error(expected, built)``.
        """
        sample = self.sample
        if self.extra_channels:
            extra = [c.to(device=sample.device, dtype=sample.dtype) for c in self.extra_channels]
            sample = torch.cat([sample, *extra], dim=1)
        expected = int(unet.config.in_channels)
        if sample.shape[1] != expected:
            raise channel_error(expected, int(sample.shape[1]))
        return unet(
            sample,
            self.timestep,
            self.encoder_hidden_states,
            down_block_additional_residuals=_cast(self.down_residuals, residual_dtype),
            mid_block_additional_residual=(
                self.mid_residual if self.mid_residual is None or residual_dtype is None
                else self.mid_residual.to(residual_dtype)
            ),
            down_intrablock_additional_residuals=_cast(self.intrablock_residuals, residual_dtype),
            context=context,
        )


def _cast(tensors: Optional[list[torch.Tensor]], dtype: Optional[torch.dtype]) -> Optional[list[torch.Tensor]]:
    # No dtype: the tensors as they are (training passes none; dropping them lost ControlNet's down residuals).
    if tensors is None or dtype is None:
        return tensors
    return [t.to(dtype) for t in tensors]


class GenerationCall:
    """Everything one generation call owns; hooks receive it as ``call``.

    Shared, read-only: ``unet``, ``vae`` and the models behind ``text``. Owned by the call:
    ``scheduler`` (a fresh instance), ``generator``, ``layout``, plugin state, the step, and ``tokens``:
    the tokens added for this call (:meth:`add_tokens`), which ``text`` (its tokenizer and encoder) knows.
    """

    def __init__(
        self,
        *,
        unet: "UNet2DConditionModel",
        vae: "AutoencoderKL",
        text: PromptEncoder,
        scheduler: Scheduler,
        request: GenerationRequest,
        generator: Optional[torch.Generator],
        plugins: Sequence[Plugin],
        hooks: pluggy.PluginManager,
        model_name: str = "",
        tokens: Optional[TokenTable] = None,
        init_image: Optional[torch.Tensor] = None,
    ) -> None:
        self.unet = unet
        self.vae = vae
        #: tokens added for this call only (textual inversion); starts as a copy of the pipeline's own.
        self.tokens = tokens if tokens is not None else token_table_for(text.tokenizer, text.encoder)
        #: what this call changes in the shared text encoder: its tokens and weight patches.
        self.text_scope = EncoderScope(self.tokens)
        #: the call's prompt encoder: the shared tokenizer and encoder, seen through ``text_scope``.
        self.text = text.with_tokens(self.text_scope)
        self.scheduler = scheduler
        self.request = request
        self.generator = generator
        self.plugins = list(plugins)
        self.pm = hooks
        self.hook = hooks.hook
        self.model_name = model_name
        self.layout: Optional[BranchLayout] = None
        self.step: Optional[StepState] = None
        #: the UNet pass running now ("main", or a plugin's extra pass); attention observers read it.
        self.pass_name: str = ""
        #: the branch layout of the UNet pass running now (the main layout, or an extra pass's).
        self.pass_layout: Optional[BranchLayout] = None
        #: what every UNet pass of this call hands the UNet: attention processors and weight patches.
        self.unet_context: Optional[ForwardContext] = None
        #: what plugins report back to the caller, keyed by plugin name (``PipelineOutput.extras``).
        self.outputs: dict[str, Any] = {}
        self._state: dict[int, dict[str, Any]] = {}
        self._view_state: dict[int, dict[Optional[int], Any]] = {}
        self._overrides: Optional["WeightOverrides"] = None
        self._weight_sets: dict[tuple[str, ...], dict[str, WeightPatch]] = {}
        #: img2img's image as the model takes it (``[-1, 1]`` pixels, or latents given as such), else ``None``.
        self.init_image = init_image
        self._init_latents: Optional[torch.Tensor] = None
        self._first_step = 0
        self._steps_open = False
        self._gradient_depth = 0
        #: the per-step hooks with each plugin's step window and region applied (:mod:`diffsteer.scope`).
        self.scoped = ScopedHooks(self)
        self.timesteps: torch.Tensor = torch.empty(0)
        #: every plugin's attention patches, collected before prepare_latents (so sub-loops see them).
        self._patches: list[tuple[Plugin, AttentionPatch]] = []
        self._patches_ready = False
        self._processors: dict[tuple[int, ...], dict[str, PatchedAttention]] = {}
        #: the scheduler of a running sub-loop (its own instance), else None.
        self._loop_scheduler: Optional[Scheduler] = None

    # -- conveniences ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's compute dtype; latents and scheduler arithmetic stay in float32."""
        return self.unet.dtype

    @property
    def batch_size(self) -> int:
        """Images this call makes (prompts × images per prompt)."""
        return len(self.request.prompts) * self.request.num_images_per_prompt

    @overload
    def state_for(self, plugin: Plugin) -> dict[str, Any]: ...

    @overload
    def state_for(self, plugin: Plugin, factory: Callable[[], _State]) -> _State: ...

    def state_for(self, plugin: Plugin, factory: Optional[Callable[[], Any]] = None) -> Any:
        """The per-call state of ``plugin`` (plugin objects may be shared between calls): a dict, or, typed,
        the object ``factory()`` made on the first request of the call (a dataclass of the plugin's per-call
        fields). One plugin asks with one factory, or with none, throughout a call."""
        key = id(plugin)
        if key not in self._state:
            self._state[key] = {} if factory is None else factory()
        state = self._state[key]
        if factory is not None and isinstance(factory, type) and not isinstance(state, factory):
            raise PluginError(plugin_label(plugin), f"asked for its call state as {factory.__name__}, "
                              f"but it is a {type(state).__name__} already")
        return state

    def view_state_for(self, plugin: Plugin, factory: Callable[[], _State]) -> _State:
        """Per-call state of ``plugin`` for the views running now: one ``factory()`` object per view batch of a
        view plan (:mod:`diffsteer.views`), and one for the call without a plan or outside view passes. State
        that follows the latents from step to step (SEGA's momentum) belongs here, so each window keeps its own."""
        view = self.step.view if self.step is not None else None
        per_view = self._view_state.setdefault(id(plugin), {})
        key = None if view is None else view.index
        if key not in per_view:
            per_view[key] = factory()
        return per_view[key]

    def view_states(self, plugin: Plugin) -> dict[Optional[int], Any]:
        """Every :meth:`view_state_for` object of ``plugin`` in this call, by view batch index (``None``: the
        whole canvas), for ``teardown`` to report."""
        return dict(self._view_state.get(id(plugin), {}))

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell per side (8 for SD)."""
        return vae_scale_factor(self.vae)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(batch, channels, h, w)`` of the call's latents (one row per image)."""
        f = self.vae_scale_factor
        return (self.batch_size, int(self.unet.config.out_channels), self.request.height // f, self.request.width // f)

    def guidance_scale_at(self, step: "StepState") -> float:
        """The main loop's classifier-free guidance scale at ``step`` (see
        :meth:`GenerationRequest.guidance_scale_at`); a plugin that replaces the guidance formula reads it to
        honour the request's ``guidance_interval``."""
        return self.request.guidance_scale_at(step.timestep, int(self.scheduler.config.num_train_timesteps))

    @property
    def step_scheduler(self) -> Scheduler:
        """The scheduler of the loop running now: a sub-loop's own instance while it runs, else ``scheduler``."""
        return self._loop_scheduler or self.scheduler

    @property
    def num_steps(self) -> int:
        """Denoising steps this call runs: ``len(call.timesteps)`` (fewer than requested for img2img)."""
        return len(self.timesteps)

    # -- the schedule: set before setup, narrowed only in setup -------------------------------------------
    def _plan_steps(self) -> None:
        """Set the scheduler's timesteps and img2img's window; the core calls it before ``setup``."""
        req = self.request
        self.scheduler.set_timesteps(req.num_inference_steps, device=self.device)
        self._steps_open = True
        if self.init_image is not None:
            # img2img starts part-way down the schedule, as diffusers' get_timesteps does.
            self._narrow("strength", req.strength, lambda msg: RequestError("strength", f"is too small: {msg}"))
        else:
            self._apply_first_step()

    def narrow_steps(self, owner: str, strength: float) -> None:
        """Denoise only the last ``strength`` fraction of the schedule (DiffEdit's ``inpaint_strength``).

        Counted as img2img's ``strength`` is (``int(steps * strength)`` steps remain); with img2img, or
        several plugins narrowing, the narrowest window wins. Only from
        :func:`~diffsteer.hookspecs.diffsteer_setup`: ``call.timesteps`` is fixed once setup ends. The latents
        the first step starts from are then the plugin's to supply (``diffsteer_prepare_latents``) unless
        img2img noises its image to the new first timestep.
        """
        if not self._steps_open:
            raise PluginError(owner, "can narrow the denoising steps only in diffsteer_setup")
        if not 0 < strength <= 1:
            raise PluginError(owner, f"strength must lie in (0, 1], got {strength}")
        self._narrow(owner, strength, lambda msg: PluginError(owner, msg))

    def _narrow(self, who: str, strength: float, error: Callable[[str], Exception]) -> None:
        steps = self.request.num_inference_steps
        first = max(steps - min(int(steps * strength), steps), 0)
        if first >= steps:
            raise error(f"strength={strength} leaves no denoising steps out of {steps}")
        self._first_step = max(self._first_step, first)
        self._apply_first_step()

    def _apply_first_step(self) -> None:
        order = self.scheduler.order
        self.timesteps = self.scheduler.timesteps[self._first_step * order:]
        if self._first_step or self.init_image is not None:
            self.scheduler.set_begin_index(self._first_step * order)

    def _close_steps(self) -> None:
        self._steps_open = False

    # -- the latent space --------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor, *, sample: bool = True) -> torch.Tensor:
        """Scaled float32 latents of ``[-1, 1]`` images, as img2img makes them.

        ``sample=True`` draws from the VAE posterior with the call's generator (so it advances the call's
        random stream); ``sample=False`` takes the posterior mean and draws nothing.
        """
        return encode_images(self.vae, pixels.to(self.device), generator=self.generator if sample else None,
                             sample=sample)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` float32 images from scaled latents (the core's decode)."""
        return decode_latents(self.vae, latents)

    @property
    def init_latents(self) -> Optional[torch.Tensor]:
        """img2img's image in latent space, one row per image of the call, before any noise; ``None`` without
        an image. Encoded once, on first use, with the call's generator (the core reads it before noising)."""
        if self.init_image is None:
            return None
        if self._init_latents is None:
            image = self.init_image
            init = image.float().to(self.device) if image.shape[1] == self.vae.config.latent_channels else self.encode_images(image)
            if init.shape[0] != self.batch_size:
                if self.batch_size % init.shape[0]:
                    raise RequestError("image", f"has {init.shape[0]} images, which cannot be spread evenly over the "
                                       f"call's {self.batch_size} outputs")
                init = torch.cat([init] * (self.batch_size // init.shape[0]))
            self._init_latents = init
        return self._init_latents

    # -- services for plugins ------------------------------------------------------------------------
    def add_tokens(self, owner: str, embeddings: Mapping[str, torch.Tensor]) -> None:
        """Add tokens for this call only: ``{token: (hidden,) or (n, hidden) vectors}`` (textual inversion).

        The call's ``text`` tokenizer and encoder (and so every prompt encoder, also a plugin's own built
        on ``call.text.tokenizer``/``call.text.encoder``) then read ``token`` as its vectors; an ``n``-vector
        token stands for ``n`` ids, spelt ``token token_1 ... token_{n-1}``. The shared models are not
        changed, so concurrent calls on one pipeline each see only their own tokens. Call it from a
        ``@hookimpl(tryfirst=True)`` :func:`~diffsteer.hookspecs.diffsteer_setup`, before any plugin
        tokenizes the call's prompts. A token the tokenizer or the call already has, or
        vectors of the wrong size, raise :class:`~diffsteer.errors.PluginError` naming ``owner``.
        """
        self.scoped.refuse_region(owner, "added tokens")
        # The view delegates get_vocab to the shared tokenizer: its own words, not the added tokens.
        self.tokens.add_all(embeddings, owner=owner, tokenizer=self.text.tokenizer)

    def set_weight_patches(
        self, unet: Mapping[str, WeightPatch], text_encoder: Mapping[str, WeightPatch],
        overrides: Optional["WeightOverrides"] = None,
    ) -> None:
        """Patch the weights of every later UNet pass and prompt encoding of this call (the core calls it with
        what :func:`~diffsteer.hookspecs.diffsteer_weight_overrides` registered; see :mod:`diffsteer.overrides`).
        With ``overrides`` given, each step's UNet passes keep only the changes of plugins inside their step
        window."""
        self.unet_context = dataclasses.replace(self.unet_context or ForwardContext(), weights=dict(unet))
        self.text_scope.weights = dict(text_encoder)
        self._overrides = overrides
        self._weight_sets = {}

    def _use_weights(self, step: Optional[StepState]) -> None:
        """Hand later UNet passes the weight changes of the plugins active at ``step`` (``None``: all)."""
        weights = self._overrides
        if not weights or not self.scoped.windowed:  # no window: the set the call started with is final
            return
        owners = tuple(o for o in weights.owners()
                       if step is None or weights.plugin_of(o) is None or self.scoped.active(weights.plugin_of(o), step))
        if owners not in self._weight_sets:
            self._weight_sets[owners] = weights.patches("unet", owners=set(owners))
        self.unet_context = dataclasses.replace(self.unet_context or ForwardContext(), weights=self._weight_sets[owners])

    def _edit_branch_embeddings(self) -> None:
        """Fire ``diffsteer_edit_embeddings`` for every branch of the layout, chained in list order."""
        assert self.layout is not None
        for branch in list(self.layout):
            def check(owner: str, edited: torch.Tensor, branch: Branch = branch) -> None:
                if not isinstance(edited, torch.Tensor) or edited.shape != branch.embeddings.shape:
                    got = tuple(edited.shape) if isinstance(edited, torch.Tensor) else type(edited).__name__
                    raise PluginError(
                        owner, f"edited embeddings of branch {branch.name!r} are {got}; they must stay a tensor "
                        f"shaped {tuple(branch.embeddings.shape)}"
                    )

            edited = chain(self.hook.diffsteer_edit_embeddings, "embeddings", branch.embeddings, check=check,
                           call=self, branch=branch)
            if edited is not branch.embeddings:
                self.layout.replace_embeddings(branch.name, edited.to(device=self.device, dtype=self.dtype), "core")

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Encode texts through the encode-prompt hook (or the core encoder), in the UNet's dtype."""
        texts = list(texts)
        out = self.hook.diffsteer_encode_prompt(call=self, texts=texts)
        if out is None:
            out = self.text.encode(texts, clip_skip=self.request.clip_skip)
        return out.to(device=self.device, dtype=self.dtype)

    def encode_per_image(self, texts: Sequence[str]) -> torch.Tensor:
        """Encode one text per prompt and repeat each for ``num_images_per_prompt`` (diffusers' order)."""
        return self.encode(texts).repeat_interleave(self.request.num_images_per_prompt, dim=0)

    @contextlib.contextmanager
    def gradients(self) -> Iterator[None]:
        """Run UNet passes with gradients with respect to their latents (attend-and-excite, pix2pix-zero).

        A generation call runs under ``torch.no_grad``. Inside ``with call.gradients():`` gradient tracking is
        on, so a plugin can do::

            with call.gradients():
                x = step.latents.detach().requires_grad_(True)
                preds = call.predict(x, step.timestep, call.layout.subset(["cond"]), pass_name="mine")
                (grad,) = torch.autograd.grad(loss_of(preds, observed_attention), x)
            step.latents = step.latents - lr * grad

        Attention observers of such a pass see probabilities that carry the graph. The model weights are
        frozen, and conditioning from :func:`~diffsteer.hookspecs.diffsteer_model_inputs` (ControlNet
        residuals, extra channels) is computed without gradients: it is a constant of the pass, so no graph
        is built through a plugin's network and the gradient flows through the UNet alone.
        """
        self._gradient_depth += 1
        try:
            with torch.enable_grad():
                yield
        finally:
            self._gradient_depth -= 1

    # -- attention patches and sub-loops ---------------------------------------------------------------
    def _collect_patches(self) -> None:
        """Fire ``diffsteer_attention_patches`` and install every patch; the core calls it once, before
        ``prepare_latents``, so a sub-loop started there already runs with the patches."""
        self._patches = self.scoped.collect_patches()
        self._patches_ready = True
        self._use_patches(None)

    def _use_patches(self, step: Optional[StepState]) -> None:
        """Hand later UNet passes the processors of the patches and the weight changes active at ``step``
        (``None``: all of them)."""
        self._use_weights(step)
        patches = [p for _, p in self._patches] if step is None else self.scoped.active_patches(self._patches, step)
        key = tuple(id(p) for p in patches)
        if key not in self._processors:
            self._processors[key] = compile_patches(patches, self.unet.attention_layers()) if patches else {}
        self.unet_context = dataclasses.replace(self.unet_context or ForwardContext(), processors=self._processors[key])

    def run_subloop(
        self,
        owner: str,
        latents: torch.Tensor,
        scheduler: "Scheduler | str",
        num_steps: int,
        *,
        strength: float = 1.0,
        layout: Optional[BranchLayout] = None,
        guidance_scale: float = 1.0,
        adjust: Optional["PredictionEdit"] = None,
        keep_predictions: bool = False,
        name: Optional[str] = None,
        generator: Optional[torch.Generator] = None,
    ) -> "Trajectory":
        """Run a loop of steps with its own scheduler from ``latents`` and return its :class:`~diffsteer.subloop.Trajectory`.

        ``scheduler`` is a name (``"ddim_inverse"``, ``"ddim"``, ...), built from the model's scheduler config,
        or a :class:`~diffsteer.schedulers.Scheduler`, of which a fresh copy runs: the sub-loop's scheduler
        state is its own, and ``call.scheduler``, ``call.step`` and ``call.timesteps`` are left as they were.
        It runs ``int(num_steps * strength)`` steps: the least noisy ones of a ``num_steps`` schedule (an
        inversion then ends at the timestep where a main loop narrowed by :meth:`narrow_steps` with the same
        strength starts). Each step is one :meth:`predict` over ``layout`` (default: the call's conditional
        branch, with its unconditional one when ``guidance_scale > 1``), classifier-free guidance with
        ``guidance_scale``, then ``adjust(step, guided)`` if given (pix2pix-zero's regulariser; it returns
        the new prediction or ``None``), then the scheduler step, drawing from ``generator`` (default: the
        call's). ``keep_predictions`` also keeps each step's guided prediction and x0 estimate.

        Inside, the call's tokens, weight overrides, ``model_inputs`` conditioning and attention patches
        act as in the main loop; hooks see ``call.step`` as the sub-loop's own :class:`StepState` (``loop`` is
        ``name``, default ``owner``; ``index``/``num_steps`` count the sub-loop's steps) and
        ``call.pass_name`` as that name, and ``call.step_scheduler`` is the sub-loop's scheduler. Step windows
        read the place in denoising order, so in an inversion (ascending timesteps) a window covers the same
        noise levels as in the main loop. Call it from ``prepare_latents`` (DiffEdit inverts its image there) or
        later: before, the call's weight overrides and attention patches are not in place yet, so an earlier
        call is refused. Bad arguments raise :class:`~diffsteer.errors.PluginError` naming ``owner``.
        """
        from .subloop import run_subloop

        return run_subloop(
            self, owner, latents, scheduler, num_steps, strength=strength, layout=layout,
            guidance_scale=guidance_scale, adjust=adjust, keep_predictions=keep_predictions, name=name,
            generator=generator,
        )

    def invert(self, owner: str, latents: torch.Tensor, num_steps: int, **options: Any) -> "Trajectory":
        """DDIM inversion of clean ``latents`` toward noise: :meth:`run_subloop` with ``"ddim_inverse"``.

        ``trajectory.final`` is the noise from which a deterministic DDIM main loop of ``num_steps`` steps
        (narrowed by the same ``strength``) regenerates ``latents``; ``options`` are :meth:`run_subloop`'s.
        """
        return self.run_subloop(owner, latents, "ddim_inverse", num_steps, **options)

    def _channel_error(self, expected: int, built: int) -> PluginError:
        latent = int(self.unet.config.out_channels)
        return PluginError(
            ", ".join(plugin_label(p) for p in self.plugins) or "core",
            f"the UNet takes {expected} input channels but this pass built {built} "
            f"({latent} latent channels + {built - latent} extra); "
            "this model needs a plugin that supplies its conditioning channels"
            if built < expected
            else f"the UNet takes {expected} input channels but plugins added {built - latent} extra channels",
        )

    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        layout: Optional[BranchLayout] = None,
        *,
        pass_name: str = "extra",
    ) -> BranchPredictions:
        """Run one batched UNet pass over ``layout`` (default: the call's) for per-image ``latents``.

        Fires :func:`~diffsteer.hookspecs.diffsteer_model_inputs` first, so every conditioning plugin
        follows extra passes too. Its ``step`` is ``call.step`` (the main loop's or a sub-loop's step); outside
        any loop it is a one-step :class:`StepState` with ``loop="predict"``, ``index`` 0 of 1, this
        ``timestep`` and ``latents``. The input is scaled by :attr:`step_scheduler`. Returns float32
        predictions split by branch.
        """
        layout = layout or self.layout
        assert layout is not None, "predict() is available once prompts are encoded"
        step = self.step if self.step is not None else StepState(
            index=0, timestep=timestep, latents=latents, num_steps=1, loop="predict"
        )
        sample = layout.repeat(latents) if len(layout) > 1 else latents
        sample = self.step_scheduler.scale_model_input(sample, timestep)
        inputs = UNetInputs(
            sample=sample.to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=layout.embeddings(),
            layout=layout,
            pass_name=pass_name,
            view=step.view,
        )
        previous = (self.pass_name, self.pass_layout)
        self.pass_name, self.pass_layout = pass_name, layout
        try:
            # Conditioning is a constant of a gradient pass (see gradients()).
            with torch.no_grad() if self._gradient_depth else contextlib.nullcontext():
                self.scoped.model_inputs(step, inputs)
            # Plugins may compute residuals in float32; the UNet adds them in its own dtype.
            out = inputs.run(
                self.unet, channel_error=self._channel_error, residual_dtype=self.dtype, context=self.unet_context
            )
        finally:
            self.pass_name, self.pass_layout = previous
        return layout.split(out.float())
