"""Sub-loops and DDIM inversion: ``call.run_subloop`` / ``call.invert`` run with the call's tokens, weight
overrides, conditioning and attention patches, on a scheduler instance of their own."""

from __future__ import annotations

import re
from typing import Any, Optional

import pytest
import torch

from diffsteer import AttentionPatch, Plugin, PluginError, hookimpl
from diffsteer.pipeline import Pipeline
from diffsteer.schedulers import make_scheduler
from diffsteer.testing import max_abs_diff, pass_recorder, residual_shapes

STEPS = 10
CROSS_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def init_latents(pipe: Pipeline, seed: int = 1) -> torch.Tensor:
    """Clean-ish latents to invert (unit-scale noise stands in for an encoded image on the tiny model)."""
    f = pipe.vae_scale_factor
    size = pipe.default_size // f
    return torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))


class Inverter(Plugin):
    """DiffEdit's first stage in miniature: invert the call's image in prepare_latents and start from it."""

    name = "inverter"

    def __init__(self, steps: int = STEPS, guidance_scale: float = 1.0, use: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.steps, self.guidance_scale, self.use = steps, guidance_scale, use
        self.trajectory: Any = None
        self.main_scheduler: Any = None

    @hookimpl
    def diffsteer_prepare_latents(self, call: Any, latents: torch.Tensor) -> Optional[torch.Tensor]:
        self.main_scheduler = call.scheduler
        self.trajectory = call.invert(self.name, call.init_latents, self.steps, strength=call.request.strength,
                                      guidance_scale=self.guidance_scale, keep_predictions=True, name="invert")
        return self.trajectory.final if self.use else None


def invert(pipe: Pipeline, image: torch.Tensor, plugins=(), prompt: str = "a red circle", **kw: Any) -> Any:
    inverter = Inverter(**{k: kw.pop(k) for k in ("guidance_scale", "use") if k in kw})
    out = pipe(prompt, image=image, strength=kw.pop("strength", 1.0), num_inference_steps=STEPS,
               guidance_scale=kw.pop("main_guidance", 1.0), plugins=[*plugins, inverter], output_type="latent",
               seed=0, **kw)
    return inverter.trajectory, out.images


def diffusers_inversion(folder, prompt: str, image: torch.Tensor, strength: float, guidance_scale: float) -> list:
    """The inversion loop of diffusers' DiffEdit/pix2pix-zero ``invert``, without their regulariser."""
    from diffusers import DDIMInverseScheduler

    from diffsteer.testing import diffusers_pipeline

    pipe = diffusers_pipeline(folder)
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(STEPS)
    kept = min(int(STEPS * strength), STEPS)
    timesteps = inverse.timesteps if kept == STEPS else inverse.timesteps[: -(STEPS - kept)]  # get_inverse_timesteps
    cfg = guidance_scale > 1
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, cfg)
    embeds = torch.cat([uncond, cond]) if cfg else cond
    x, out = image.clone(), [image.clone()]
    with torch.no_grad():
        for t in timesteps:
            model_in = inverse.scale_model_input(torch.cat([x] * 2) if cfg else x, t)
            eps = pipe.unet(model_in, t, encoder_hidden_states=embeds).sample
            if cfg:
                u, c = eps.chunk(2)
                eps = u + guidance_scale * (c - u)
            x = inverse.step(eps, t, x).prev_sample
            out.append(x.clone())
    return out


@pytest.mark.parametrize("kind, strength, guidance_scale", [("sd1", 1.0, 1.0), ("sd1", 0.8, 3.0), ("sd2", 0.8, 1.0)])
def test_inversion_matches_diffusers_ddim_inverse_loop(request, kind, strength, guidance_scale):
    folder = request.getfixturevalue(f"tiny_{kind}")  # sd2: v-prediction, trailing spacing, zero terminal SNR
    pipe = Pipeline.from_pretrained(folder, scheduler="ddim")
    image = init_latents(pipe)
    trajectory, _ = invert(pipe, image, strength=strength, guidance_scale=guidance_scale)
    ref = diffusers_inversion(folder, "a red circle", image, strength, guidance_scale)
    assert len(trajectory.latents) == len(ref) == int(STEPS * strength) + 1
    d = max(max_abs_diff(a, b) for a, b in zip(trajectory.latents, ref))
    print(f"{kind} inversion strength={strength} guidance={guidance_scale}: max|Δ| over the trajectory = {d:.2e}")
    assert d <= 1e-4
    assert len(trajectory.predictions) == len(trajectory.pred_original) == len(ref) - 1


def test_invert_then_regenerate_reconstructs_the_image(tiny_pipe):
    """DDIM inversion then DDIM sampling with the same prompt and guidance 1 gives the image back, up to the
    inversion's approximation (the model is queried at the next timestep), which grows with the noise reached."""
    image = init_latents(tiny_pipe)
    # the same prompt from other noise: what a reconstruction is measured against
    other = torch.randn(image.shape, generator=torch.Generator().manual_seed(7))
    baseline = tiny_pipe("a red circle", latents=other, num_inference_steps=STEPS, guidance_scale=1.0,
                         output_type="latent").images
    base_error = float((baseline - image).abs().mean())
    errors = {}
    for strength in (1.0, 0.5):
        trajectory, rebuilt = invert(tiny_pipe, image, strength=strength)
        errors[strength] = float((rebuilt - image).abs().mean())
        assert not torch.allclose(trajectory.final, image)
    scale = float(image.abs().mean())
    print(f"reconstruction mean|Δ| (image mean|x| {scale:.2f}): strength 1.0 {errors[1.0]:.3f}, "
          f"strength 0.5 {errors[0.5]:.3f}; from other noise {base_error:.3f}")
    assert errors[0.5] <= 0.1 * scale
    assert errors[1.0] <= 0.25 * base_error


def test_a_discarded_subloop_leaves_the_main_loop_alone(tiny_pipe):
    """The sub-loop's scheduler state, step and random stream are its own: main-loop images are unchanged."""
    image = init_latents(tiny_pipe)
    kw = dict(strength=0.6, main_guidance=5.0)
    trajectory, with_subloop = invert(tiny_pipe, image, use=False, **kw)
    plain = tiny_pipe("a red circle", image=image, strength=0.6, num_inference_steps=STEPS, guidance_scale=5.0,
                      seed=0, output_type="latent").images
    assert torch.equal(with_subloop, plain)
    assert len(trajectory.timesteps) == int(STEPS * 0.6)


def test_a_sampling_subloop_equals_the_main_loop(tiny_sd1):
    """Any scheduler runs as a sub-loop: Euler with CFG from the call's noise gives the Euler pipeline's latents."""
    pipe = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim")
    euler = make_scheduler("euler", pipe.scheduler.to_diffusers_config())
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    probe = euler.fresh()
    probe.set_timesteps(4)  # Euler's initial sigma depends on its schedule
    seen: dict = {}

    class Sampler(Plugin):
        name = "sampler"

        @hookimpl
        def diffsteer_prepare_latents(self, call, latents):
            run = call.run_subloop(self.name, noise * probe.init_noise_sigma, euler, 4, guidance_scale=6.0)
            seen["final"], seen["unused"] = run.final, euler.num_inference_steps

    pipe("a red circle", num_inference_steps=2, guidance_scale=6.0, plugins=[Sampler()], output_type="latent")
    ref = pipe.with_scheduler("euler")("a red circle", latents=noise, num_inference_steps=4, guidance_scale=6.0,
                                       output_type="latent").images
    assert seen["unused"] is None  # a fresh copy ran; the instance passed in is untouched
    assert max_abs_diff(seen["final"], ref) <= 1e-5


class Observer(Plugin):
    """Counts cross-attention calls per pass name (an attention observer patch)."""

    name = "observer"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls: dict[str, int] = {}

    @hookimpl
    def diffsteer_attention_patches(self, call, register):
        def observe(layer, probs):
            self.calls[call.pass_name] = self.calls.get(call.pass_name, 0) + 1

        register(AttentionPatch(self.name, "*attn2", observe=observe))


class Override(Plugin):
    name = "override"

    @hookimpl
    def diffsteer_weight_overrides(self, call, weights):
        weights.add_delta(self.name, CROSS_K, 0.5 * torch.randn(32, 32, generator=torch.Generator().manual_seed(5)))


class Token(Plugin):
    name = "token"

    def __init__(self, seed: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.seed = seed

    @hookimpl(tryfirst=True)
    def diffsteer_setup(self, call):
        call.add_tokens(self.name, {"<thing>": torch.randn(32, generator=torch.Generator().manual_seed(self.seed))})


class Residual(Plugin):
    """A ControlNet stand-in: a fixed mid-block residual on every pass."""

    name = "residual"

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        _, (c, h, w) = residual_shapes(call.unet.config, *inputs.sample.shape[-2:])
        inputs.add_residuals(self.name, mid=torch.ones(inputs.sample.shape[0], c, h, w))


def test_patches_overrides_tokens_and_conditioning_act_inside_the_subloop(tiny_pipe):
    image = init_latents(tiny_pipe)
    observer, passes = Observer(), []
    plain, _ = invert(tiny_pipe, image, plugins=[observer, pass_recorder(passes)])
    layers = sum(1 for name in tiny_pipe.unet.attention_layers() if name.endswith("attn2"))
    assert observer.calls["invert"] == STEPS * layers  # patches were ready before prepare_latents
    inverted = [p for p in passes if p["pass_name"] == "invert"]
    assert [p["step"] for p in inverted] == list(range(STEPS))  # model_inputs saw the sub-loop's own steps

    overridden, _ = invert(tiny_pipe, image, plugins=[Override()])
    d = max_abs_diff(overridden.final, plain.final)
    print(f"weight override changes the inverted latents by max|Δ| = {d:.2e}")
    assert d > 1e-3

    residual, _ = invert(tiny_pipe, image, plugins=[Residual()])
    assert max_abs_diff(residual.final, plain.final) > 1e-3  # ControlNet-style residuals reach the sub-loop

    first, _ = invert(tiny_pipe, image, plugins=[Token(seed=1)], prompt="a <thing>")
    second, _ = invert(tiny_pipe, image, plugins=[Token(seed=2)], prompt="a <thing>")
    assert max_abs_diff(first.final, second.final) > 1e-3  # the call's token vectors reach the sub-loop


def test_windows_cover_the_same_noise_levels_in_an_inversion(tiny_pipe):
    """A windowed injector acts at the same timesteps going up (inversion) as coming down (the main loop)."""
    timesteps: dict[str, list[int]] = {}

    class Injector(Plugin):
        name = "injector"

        @hookimpl
        def diffsteer_model_inputs(self, call, step, inputs):
            timesteps.setdefault(step.loop, []).append(int(inputs.timestep))

    invert(tiny_pipe, init_latents(tiny_pipe), plugins=[Injector(window_start=0.6)])
    assert len(timesteps["invert"]) == len(timesteps["main"]) == 4
    assert sorted(timesteps["invert"]) == sorted(timesteps["main"])
    assert max(timesteps["main"]) < 400  # the least noisy 40% of the schedule


def test_predict_outside_any_loop_gets_a_one_step_state(tiny_pipe):
    seen = []

    class Lone(Plugin):
        name = "lone"

        @hookimpl
        def diffsteer_prepare_latents(self, call, latents):
            call.predict(latents, call.timesteps[0], pass_name="lone")

        @hookimpl
        def diffsteer_model_inputs(self, call, step, inputs):
            seen.append((inputs.pass_name, step.loop, step.index, step.num_steps, step.window_index))

    tiny_pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, plugins=[Lone()], output_type="latent")
    assert seen[0] == ("lone", "predict", 0, 1, None)
    assert seen[1] == ("main", "main", 0, 2, 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheduler="no-such"), "unknown scheduler 'no-such'"),
    (dict(strength=0.0), "strength must lie in (0, 1]"),
    (dict(strength=0.05), "leaves no steps out of 10"),
    (dict(guidance_scale=3.0, layout="cond-only"), "needs one unconditional branch"),
    (dict(name="main"), "cannot be named 'main'"),
])
def test_bad_subloop_arguments_name_the_plugin(tiny_pipe, kwargs, message):
    class Bad(Plugin):
        name = "bad"

        @hookimpl
        def diffsteer_prepare_latents(self, call, latents):
            args = {"scheduler": "ddim_inverse", **kwargs}
            if args.get("layout") == "cond-only":
                args["layout"] = call.layout.subset(["cond"])
            call.run_subloop(self.name, latents, args.pop("scheduler"), STEPS, **args)

    with pytest.raises(PluginError, match=r"plugin 'bad'.*" + re.escape(message)):
        tiny_pipe("a red circle", num_inference_steps=2, plugins=[Bad()], output_type="latent")


def test_a_subloop_before_prepare_latents_is_refused(tiny_pipe):
    """In setup the call's weight overrides and attention patches are not in place: an inversion there would
    silently run without them."""

    class Early(Plugin):
        name = "early"

        @hookimpl
        def diffsteer_setup(self, call):
            call.invert(self.name, torch.zeros(call.latent_shape), STEPS, layout=None)

    with pytest.raises(PluginError, match=r"plugin 'early'.*before prepare_latents"):
        tiny_pipe("a red circle", num_inference_steps=2, plugins=[Early()], output_type="latent")
