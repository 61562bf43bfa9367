"""The public :class:`Pipeline`: loads a model once and runs generation calls with their own plugin sets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from .branches import CONDITIONAL, UNCONDITIONAL, BranchLayout
from .call import GenerationCall, GenerationRequest, StepState
from .errors import GenerationError, RequestError
from .hook_chain import chain
from .images import ImageInput, postprocess, to_model_tensor
from .latent_codec import decode_latents, encode_images, vae_scale_factor
from .overrides import collect_weight_overrides
from .models.random import randn_tensor
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL
from .plugins import Plugin, PluginSpec, make_manager, plugin_label, resolve_plugins
from .prompt_checks import warn_about_prompts
from .prompt_embeds import describe as describe_embeddings
from .prompt_embeds import mismatch_error, per_image, prompt_inputs, refuse_prompt_encoders
from .request_checks import check_arguments, check_guidance_interval, check_prompts, check_size
from .schedulers import Scheduler, make_scheduler
from .text import PromptEncoder, TokenTable, token_table_for
from .views import plan_views

ProgressFn = Callable[[int, int], None]


@dataclass
class PipelineOutput:
    """What a call returns: ``images`` in the requested ``output_type`` and the call's parameters."""

    images: Any
    parameters: dict[str, Any] = field(default_factory=dict)
    #: What plugins report back (attention maps, masks, ...), keyed by plugin name: ``call.outputs``.
    extras: dict[str, Any] = field(default_factory=dict)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, amount: float) -> torch.Tensor:
    """Pull the guided prediction's per-image std back toward the conditional one's (arXiv 2305.08891 §3.4)."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return amount * rescaled + (1 - amount) * guided


class Pipeline:
    """A loaded latent-diffusion model (UNet, VAE, CLIP text encoder, scheduler config).

    The pipeline holds no per-call state: each call makes its own scheduler, generator and plugin
    manager, so one pipeline can serve concurrent calls from several threads.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: Scheduler,
        *,
        name: str = "",
        guidance_interval: Sequence[float] = (0.0, 1.0),
    ) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.name = name
        #: where classifier-free guidance acts when a call does not say (``guidance_interval`` of
        #: :meth:`__call__`); a model folder may recommend one in its ``model_index.json``.
        self.guidance_interval: tuple[float, float] = check_guidance_interval(guidance_interval)
        self.text = PromptEncoder(tokenizer, text_encoder)
        #: tokens every call of this pipeline knows (:meth:`add_tokens`); each call starts from a copy.
        self.tokens: TokenTable = token_table_for(tokenizer, text_encoder)
        self.vae_scale_factor = vae_scale_factor(vae)

    # -- loading --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: Union[str, os.PathLike],
        *,
        scheduler: Optional[str] = None,
        torch_dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        vae_dtype: Optional[torch.dtype] = None,
        **scheduler_overrides: Any,
    ) -> "Pipeline":
        """Load a diffusers-format folder, a hub id, or ``"shapes"`` (single files: :meth:`from_single_file`).

        ``scheduler`` picks a scheduler by name (``"ddim"``, ``"euler_a"``, ...) with the model's
        ``scheduler_config.json``; ``scheduler_overrides`` change its config fields. The VAE follows
        ``torch_dtype`` except under float16, where it stays float32; ``vae_dtype`` overrides that
        (see :func:`~diffsteer.loading.pipeline_loader.default_vae_dtype`).
        """
        from .loading.pipeline_loader import load_pipeline_parts

        parts = load_pipeline_parts(model, torch_dtype=torch_dtype, device=device, vae_dtype=vae_dtype)
        sched = make_scheduler(scheduler, parts.scheduler_config, **scheduler_overrides)
        return cls(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, sched, name=parts.name,
                   guidance_interval=parts.guidance_interval)

    @classmethod
    def from_single_file(
        cls,
        path: Union[str, os.PathLike],
        *,
        tokenizer: Union[str, os.PathLike, CLIPTokenizer],
        prediction_type: Optional[str] = None,
        scheduler: Optional[str] = None,
        torch_dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        vae_dtype: Optional[torch.dtype] = None,
        **scheduler_overrides: Any,
    ) -> "Pipeline":
        """Load an original-layout single-file checkpoint (``.safetensors``, or ``.ckpt`` read safely).

        Such files carry no tokenizer: pass a tokenizer folder (or object). SD 2.x v-models must be
        told ``prediction_type="v_prediction"``: the file does not say.
        """
        from .loading.pipeline_loader import load_single_file_parts

        parts = load_single_file_parts(
            path, tokenizer=tokenizer, prediction_type=prediction_type, torch_dtype=torch_dtype, device=device,
            vae_dtype=vae_dtype,
        )
        sched = make_scheduler(scheduler, parts.scheduler_config, **scheduler_overrides)
        return cls(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, sched, name=parts.name,
                   guidance_interval=parts.guidance_interval)

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> None:
        """Write the pipeline in the diffusers folder layout (diffusers can load it too)."""
        from .loading.pipeline_writer import save_pipeline

        save_pipeline(
            folder, unet=self.unet, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            scheduler_config=self.scheduler.to_diffusers_config(),
            guidance_interval=None if self.guidance_interval == (0.0, 1.0) else self.guidance_interval,
        )

    def save_single_file(self, path: Union[str, os.PathLike]) -> None:
        """Write UNet, VAE and text encoder as one original-layout (A1111/civitai) ``.safetensors``."""
        from .loading.single_file import write_single_file

        write_single_file(
            path, self.unet.state_dict(), self.vae.state_dict(), self.text_encoder.state_dict(),
            self.unet.config.to_diffusers_dict(), vae_config=self.vae.config.to_diffusers_dict(),
        )

    def with_scheduler(self, scheduler: str, **overrides: Any) -> "Pipeline":
        """A pipeline sharing these models with another scheduler (no weights are copied)."""
        sched = make_scheduler(scheduler, self.scheduler.to_diffusers_config(), **overrides)
        pipe = Pipeline(self.unet, self.vae, self.text_encoder, self.tokenizer, sched, name=self.name,
                        guidance_interval=self.guidance_interval)
        pipe.tokens = self.tokens
        return pipe

    def add_tokens(self, embeddings: "Mapping[str, torch.Tensor]", owner: str = "pipeline") -> None:
        """Add tokens that every later call knows: ``{token: (hidden,) or (n, hidden) vectors}``.

        Like :meth:`GenerationCall.add_tokens <diffsteer.call.GenerationCall.add_tokens>` but kept on the
        pipeline (calls already running keep the tokens they started with; pipelines made by
        :meth:`with_scheduler` share them). The models are not changed: ``save_pretrained`` does not
        write these tokens.
        """
        self.tokens.add_all(embeddings, owner=owner, tokenizer=self.tokenizer)

    def compile(self, **kwargs: Any) -> "Pipeline":
        """Compile the UNet with :func:`torch.compile` (``fullgraph=True`` unless ``kwargs`` say otherwise).

        The same as ``pipe.unet = torch.compile(pipe.unet, fullgraph=True, **kwargs)``. Attention patches,
        weight overrides and residuals reach the UNet as arguments, so plugin calls trace without graph
        breaks; a new set of patched layers compiles once more. Returns the pipeline.
        """
        self.unet = torch.compile(self.unet, **{"fullgraph": True, **kwargs})  # type: ignore[assignment]
        return self

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # -- generation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        negative_prompt: Union[str, Sequence[str], None] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: Optional[int] = None,
        width: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
        latents: Optional[torch.Tensor] = None,
        image: Optional[ImageInput] = None,
        strength: float = 0.8,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        plugins: Sequence[PluginSpec] = (),
        eta: Optional[float] = None,
        guidance_rescale: float = 0.0,
        clip_skip: Optional[int] = None,
        progress: Optional[ProgressFn] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        guidance_interval: Optional[Sequence[float]] = None,
    ) -> PipelineOutput:
        """Generate images; parameters follow diffusers' ``StableDiffusionPipeline`` names.

        ``image`` switches to img2img (``strength`` of 1.0 starts from pure noise). ``seed`` makes a
        CPU generator; pass ``generator`` instead to share one. ``plugins`` run in the listed order.
        ``eta`` (DDIM) overrides the scheduler's own value for this call. ``prompt_embeds`` and
        ``negative_prompt_embeds`` (``(prompts, tokens, hidden)``, e.g. from compel) replace ``prompt`` and
        ``negative_prompt``, as in diffusers (:mod:`diffsteer.prompt_embeds`). ``guidance_interval``
        ``(lo, hi)`` applies classifier-free guidance only at timesteps ``t`` with ``lo <= t / T <= hi``
        (Kynkäänniemi et al. 2024, arXiv 2404.07724); other steps take the conditional prediction alone.
        ``None`` is the pipeline's :attr:`guidance_interval`: the model's recommendation, else ``(0, 1)``.
        """
        request = self._request(
            prompt, negative_prompt, num_inference_steps, guidance_scale, height, width, seed,
            strength, num_images_per_prompt, output_type, eta, guidance_rescale, clip_skip, image,
            prompt_embeds, negative_prompt_embeds, guidance_interval,
        )
        if generator is not None and seed is not None:
            raise RequestError("generator", "and seed cannot both be given: pass either generator or seed, not both")
        if seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        plugin_objs = resolve_plugins(plugins)
        # Recorded before any work: settings that cannot be serialised fail now, not after generating.
        parameters = self._parameters(request, plugin_objs)
        pm = make_manager(plugin_objs)
        refuse_prompt_encoders(pm, request)
        call = GenerationCall(
            unet=self.unet, vae=self.vae, text=self.text, scheduler=self.scheduler.fresh(), request=request,
            generator=generator, plugins=plugin_objs, hooks=pm, model_name=self.name,
            tokens=token_table_for(self.tokenizer, self.text_encoder, parent=self.tokens),
            init_image=None if image is None else to_model_tensor(image, multiple=self.vae_scale_factor).to(self.unet.device),
        )
        if image is not None and latents is not None:
            raise RequestError("latents", "and image cannot both be given: pass either latents or image, not both")
        # The call owns the run: plugins see its timesteps (img2img window included) in setup.
        call._plan_steps()
        error: Optional[BaseException] = None
        try:
            call.hook.diffsteer_setup(call=call)
            call._close_steps()
            collect_weight_overrides(call, self.unet, self.text_encoder)
            warn_about_prompts(call)
            images = self._generate(call, latents, progress)
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.hook.diffsteer_teardown(call=call, error=error)
        return PipelineOutput(images=images, parameters=parameters, extras=dict(call.outputs))

    def _request(
        self, prompt, negative_prompt, steps, guidance_scale, height, width, seed, strength,
        num_images, output_type, eta, guidance_rescale, clip_skip, image, prompt_embeds=None,
        negative_prompt_embeds=None, guidance_interval=None,
    ) -> GenerationRequest:
        prompts, prompt_embeds, negative_prompt_embeds = prompt_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
            hidden=int(self.unet.config.cross_attention_dim),
        )
        negatives = check_prompts("negative_prompt", negative_prompt, optional=True)
        if negatives is not None and isinstance(negative_prompt, str):
            negatives = negatives * len(prompts)
        if negatives is not None and len(negatives) != len(prompts):
            raise RequestError("negative_prompt", f"has {len(negatives)} entries for {len(prompts)} prompts")
        check_arguments(
            steps=steps, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, height=height, width=width,
            seed=seed, strength=strength, num_images=num_images, eta=eta, clip_skip=clip_skip,
        )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise RequestError("output_type", f"must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if self.scheduler.name == "ddim_inverse":
            raise RequestError("scheduler", "'ddim_inverse' runs DDIM backwards (clean latents to noise, for "
                               "inversion); it cannot generate: use 'ddim'")
        height = self.default_size if height is None else int(height)
        width = self.default_size if width is None else int(width)
        for label, value in (("height", height), ("width", width)):
            if value % self.vae_scale_factor:
                raise RequestError(label, f"must be a multiple of {self.vae_scale_factor}, got {value}")
        rows = len(prompts) * num_images * (2 if guidance_scale > 1.0 else 1)
        check_size(height, width, native=self.default_size, vae_factor=self.vae_scale_factor, rows=rows,
                   unet_channels=int(self.unet.config.block_out_channels[0]),
                   vae_channels=int(self.vae.config.block_out_channels[0]))
        return GenerationRequest(
            prompts=prompts, negative_prompts=negatives, num_inference_steps=steps,
            guidance_scale=float(guidance_scale), guidance_rescale=float(guidance_rescale), height=height,
            width=width, num_images_per_prompt=num_images, strength=strength if image is not None else 1.0,
            eta=eta, clip_skip=clip_skip, output_type=output_type, seed=seed,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            guidance_interval=self.guidance_interval if guidance_interval is None
            else check_guidance_interval(guidance_interval),
        )

    def _parameters(self, request: GenerationRequest, plugins: Sequence[Plugin]) -> dict[str, Any]:
        return {
            "model": self.name,
            "scheduler": self.scheduler.name,
            "prompt": None if request.prompt_embeds is not None
            else request.prompts if len(request.prompts) > 1 else request.prompts[0],
            "negative_prompt": request.negative_prompts,
            "prompt_embeds": describe_embeddings(request.prompt_embeds),
            "negative_prompt_embeds": describe_embeddings(request.negative_prompt_embeds),
            "steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "guidance_rescale": request.guidance_rescale,
            "guidance_interval": list(request.guidance_interval),
            "height": request.height,
            "width": request.width,
            "seed": request.seed,
            "eta": request.eta,
            "strength": request.strength,
            "clip_skip": request.clip_skip,
            "num_images_per_prompt": request.num_images_per_prompt,
            "plugins": [{"name": plugin_label(p), "settings": p.settings_dict()} for p in plugins],
        }

    def _generate(
        self, call: GenerationCall, latents: Optional[torch.Tensor], progress: Optional[ProgressFn],
    ) -> Any:
        req = call.request
        timesteps = call.timesteps

        layout = BranchLayout(call.batch_size)
        given, given_negative = req.prompt_embeds, req.negative_prompt_embeds
        positive = call.encode_per_image(req.prompts) if given is None else per_image(call, given)
        if req.do_cfg:
            if given_negative is not None:
                negative = per_image(call, given_negative)
            else:
                negative = call.encode_per_image(req.negative_prompts or [""] * len(req.prompts))
            if negative.shape[1:] != positive.shape[1:]:
                raise mismatch_error(req, negative.shape, positive.shape)
            layout.add("uncond", negative, role=UNCONDITIONAL)
        layout.add("cond", positive, role=CONDITIONAL)
        call.layout = layout
        call.hook.diffsteer_guidance_branches(call=call, branches=layout)
        call._edit_branch_embeddings()
        # Patches are ready before prepare_latents, where a plugin may run a sub-loop (DiffEdit's inversion).
        call._collect_patches()

        latents = self._initial_latents(call, latents, timesteps)
        latents = chain(call.hook.diffsteer_prepare_latents, "latents", latents, blend_in=call.scoped.blend_latents,
                        call=call)

        views = plan_views(call)
        scoped = call.scoped
        call._use_patches(None)
        for index, t in enumerate(timesteps):
            step = StepState(index=index, timestep=t, latents=latents, num_steps=len(timesteps))
            call.step = step
            if scoped.windowed:
                # Plugins outside their step window leave their patches out of that step's processors.
                call._use_patches(step)
            scoped.latents_hook("diffsteer_pre_step", step)
            if views is None:
                self._denoise(call, step)
            else:
                views.step(step, lambda view_step: self._denoise(call, view_step))
            scoped.latents_hook("diffsteer_post_step", step)
            latents = step.latents
            if not torch.isfinite(latents).all():
                active = ", ".join(plugin_label(p) for p in call.plugins) or "none"
                raise GenerationError(
                    f"latents became NaN or inf at step {index} (timestep {int(t)}); plugins: {active}"
                )
            if progress is not None:
                progress(index + 1, len(timesteps))

        if req.output_type == "latent":
            return latents
        decoded = call.hook.diffsteer_decode(call=call, latents=latents)
        if decoded is None:
            decoded = self.decode_latents(latents)
        return postprocess(decoded, req.output_type)

    def _denoise(self, call: GenerationCall, step: StepState) -> None:
        """One step's prediction, guidance and scheduler step over ``step.latents`` (the canvas, or a view
        batch's crop); sets ``step.latents``, ``prediction`` and ``pred_original``."""
        req, t, scoped = call.request, step.timestep, call.scoped
        preds = call.predict(step.latents, t, pass_name="main")
        scoped.noise_prediction(step, preds)

        # Outside the guidance interval the step is unguided: the conditional prediction, and no rescale (it
        # corrects what guidance does to the prediction's spread).
        scale = call.guidance_scale_at(step) if req.do_cfg else 1.0

        def cfg() -> torch.Tensor:
            return preds["uncond"] + scale * (preds["cond"] - preds["uncond"]) if scale != 1.0 else preds["cond"]

        guided = scoped.combine_guidance(step, preds, cfg)
        for term in scoped.guidance(step, preds):
            guided = guided + term
        if scale != 1.0 and req.guidance_rescale > 0:
            guided = rescale_guidance(guided, preds["cond"], req.guidance_rescale)
        out = call.step_scheduler.step(guided, t, step.latents, generator=call.generator, **self._step_kwargs(req))
        step.latents, step.prediction, step.pred_original = out.prev_sample, guided, out.pred_original_sample

    def _step_kwargs(self, req: GenerationRequest) -> dict[str, Any]:
        return {"eta": req.eta} if req.eta is not None and self.scheduler.name == "ddim" else {}

    def _initial_latents(
        self, call: GenerationCall, latents: Optional[torch.Tensor], timesteps: torch.Tensor
    ) -> torch.Tensor:
        shape = call.latent_shape
        init = call.init_latents
        if init is None:
            if latents is None:
                latents = randn_tensor(shape, generator=call.generator, device=call.device, dtype=torch.float32)
            elif tuple(latents.shape) != shape:
                raise RequestError("latents", f"have shape {tuple(latents.shape)}, this call needs {shape}")
            return latents.to(call.device, torch.float32) * call.scheduler.init_noise_sigma
        noise = randn_tensor(tuple(init.shape), generator=call.generator, device=call.device, dtype=torch.float32)
        return call.scheduler.add_noise(init, noise, timesteps[:1].repeat(call.batch_size))

    # -- VAE helpers ------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Scaled latents of ``[-1, 1]`` images, sampled from the VAE posterior with ``generator``."""
        return encode_images(self.vae, pixels, generator=generator)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` images from scaled latents."""
        return decode_latents(self.vae, latents)
