"""Parity of diffsteer.schedulers with diffusers 0.42.1 (the oracle; imported here only), plus config handling."""

from __future__ import annotations

import inspect
import json
import math
from typing import Any, Callable, Optional

import pytest
import torch

from diffsteer.schedulers import (
    Scheduler,
    SchedulerConfig,
    SchedulerConfigError,
    make_scheduler,
    scheduler_names,
)

diffusers = pytest.importorskip("diffusers")

# diffusers 0.42 calls np.array() on tensors in a way numpy 2 deprecates; not our concern here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:PNDM ignores rescale_betas_zero_snr"),
]

ATOL = 1e-5
SHAPE = (2, 4, 8, 8)

# Stable Diffusion 1.x's scheduler_config.json, verbatim.
SD15_JSON = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD1 = {k: v for k, v in SD15_JSON.items() if not k.startswith("_")}
ZERO_SNR = {
    **SD1,
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
    "prediction_type": "v_prediction",
}
LINSPACE = {**SD1, "timestep_spacing": "linspace"}

# Our name -> (diffusers class, config entries the name implies).
ORACLES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "pndm": ("PNDMScheduler", {}),
}


def oracle(name: str, config: dict[str, Any]) -> Any:
    class_name, implied = ORACLES.get(name, (name, {}))
    return getattr(diffusers, class_name).from_config({**config, **implied})


def fake_model(x: torch.Tensor, t: Any) -> torch.Tensor:
    """A deterministic, smooth, bounded stand-in for a UNet."""
    tt = float(t) / 1000.0
    return torch.tanh(x) * (0.6 + 0.3 * tt) + 0.2 * torch.sin(3.0 * x + tt)


def accepts(fn: Callable[..., Any], arg: str) -> bool:
    return arg in inspect.signature(fn).parameters


def sample_loop(
    sched: Any,
    timesteps: torch.Tensor,
    latents: torch.Tensor,
    generator: Any,
    **step_kwargs: Any,
) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
    """Run the denoising loop the way diffusers' pipelines do; return per-step samples and x0 estimates."""
    samples, x0s = [], []
    kwargs = dict(step_kwargs)
    if accepts(sched.step, "generator"):
        kwargs["generator"] = generator
    for t in timesteps:
        model_in = sched.scale_model_input(latents, t)
        out = sched.step(fake_model(model_in, t), t, latents, **kwargs)
        latents = out.prev_sample
        samples.append(latents)
        x0s.append(getattr(out, "pred_original_sample", None))
    return samples, x0s


def run_seeded(sched: Any, seed: int, **step_kwargs: Any) -> tuple[list[torch.Tensor], list[Any]]:
    """The full loop over ``sched.timesteps`` from seed-0 latents, step noise from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return sample_loop(sched, sched.timesteps, initial_latents(sched), generator, **step_kwargs)


def initial_latents(sched: Any) -> torch.Tensor:
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    return noise * sched.init_noise_sigma


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
    delta = (ours - theirs).abs().max().item()
    assert delta <= ATOL, f"{what}: max |delta| = {delta:.3g}"


def assert_same_trajectory(
    ours: Scheduler, theirs: Any, steps: int = 10, seed: int = 7, **step_kwargs: Any
) -> None:
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps), (ours.timesteps, theirs.timesteps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-7)

    a, a0 = run_seeded(ours, seed, **step_kwargs)
    b, b0 = run_seeded(theirs, seed, **step_kwargs)
    for i, (x, y) in enumerate(zip(a, b)):
        assert_close(x, y, f"step {i}")
    for i, (x, y) in enumerate(zip(a0, b0)):
        if y is not None:
            assert_close(x, y, f"x0 at step {i}")
    assert torch.isfinite(a[-1]).all()


CONFIGS = {
    "sd1-eps": SD1,
    "sd1-v": {**SD1, "prediction_type": "v_prediction"},
    "zero-snr-v": ZERO_SNR,
    "linspace-eps": LINSPACE,
    "linspace-v": {**LINSPACE, "prediction_type": "v_prediction"},
}


@pytest.mark.parametrize("config_id", list(CONFIGS))
@pytest.mark.parametrize("name", list(ORACLES))
def test_trajectory_matches_diffusers(name: str, config_id: str) -> None:
    config = CONFIGS[config_id]
    if name == "pndm" and config.get("rescale_betas_zero_snr"):
        # diffusers' PNDM ignores the rescale (it would divide by zero); ours too, with a warning.
        with pytest.warns(UserWarning, match="rescale_betas_zero_snr"):
            ours = make_scheduler(name, config)
        assert make_scheduler("ddim", ours.config).config.rescale_betas_zero_snr  # carried on
    else:
        ours = make_scheduler(name, config)
    assert ours.name == name
    assert_same_trajectory(ours, oracle(name, config))


@pytest.mark.parametrize(
    "name, config, step_kwargs, options",
    [
        ("ddim", SD1, {"eta": 1.0}, {}),  # eta per step, as diffusers pipelines pass it
        ("ddim", ZERO_SNR, {"eta": 0.5}, {}),
        ("ddpm", {**SD1, "variance_type": "fixed_large"}, {}, {}),
        ("ddpm", {**SD1, "variance_type": "fixed_small_log"}, {}, {}),
        ("ddpm", {**SD1, "prediction_type": "sample", "clip_sample": True}, {}, {}),
        ("ddim", {**SD1, "prediction_type": "sample", "thresholding": True, "sample_max_value": 1.5}, {}, {}),
        ("dpmpp_2m", {**SD1, "thresholding": True, "sample_max_value": 1.5}, {}, {}),
        ("dpmpp_2m", {**SD1, "solver_type": "heun", "final_sigmas_type": "sigma_min"}, {}, {}),
        ("dpmpp_2m_sde", {**SD1, "solver_type": "heun"}, {}, {}),
        ("DPMSolverMultistepScheduler", {**SD1, "solver_order": 1}, {}, {}),
        ("dpmpp_2m", {**SD1, "use_exponential_sigmas": True}, {}, {}),
        ("dpmpp_2m", {**SD1, "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, {}, {}),
        ("euler", {**SD1, "use_karras_sigmas": True}, {}, {}),
        ("euler", {**SD1, "use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}, {}, {}),
        ("euler", {**SD1, "interpolation_type": "log_linear"}, {}, {}),
        ("euler", {**ZERO_SNR, "timestep_type": "continuous"}, {}, {}),
        ("euler", {**SD1, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, {}, {}),
        ("pndm", {**SD1, "skip_prk_steps": False}, {}, {}),
        ("pndm", {**LINSPACE, "skip_prk_steps": False, "prediction_type": "v_prediction"}, {}, {}),
    ],
)
def test_variant_trajectory_matches_diffusers(
    name: str, config: dict[str, Any], step_kwargs: dict[str, Any], options: dict[str, Any]
) -> None:
    assert_same_trajectory(make_scheduler(name, config, **options), oracle(name, config), **step_kwargs)


def test_euler_churn_matches_diffusers() -> None:
    churn = {"s_churn": 0.5, "s_tmin": 0.1, "s_tmax": 50.0, "s_noise": 1.003}
    ours = make_scheduler("euler", SD1, **churn)
    theirs = oracle("euler", SD1)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    a, _ = run_seeded(ours, 3)
    b, _ = run_seeded(theirs, 3, **churn)
    for i, (x, y) in enumerate(zip(a, b)):
        assert_close(x, y, f"step {i}")


def test_ddim_eta_as_constructor_option() -> None:
    ours = make_scheduler("ddim", SD1, eta=0.7)
    assert ours.fresh().eta == 0.7
    ours.set_timesteps(10)
    theirs = oracle("ddim", SD1)
    theirs.set_timesteps(10)
    a, _ = run_seeded(ours, 5)
    b, _ = run_seeded(theirs, 5, eta=0.7)
    assert_close(a[-1], b[-1], "last step")


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler_a", "dpmpp_2m_sde"])
def test_generator_list_draws_per_item(name: str) -> None:
    kwargs = {"eta": 1.0} if name == "ddim" else {}
    ours, theirs = make_scheduler(name, SD1), oracle(name, SD1)
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
    a, _ = sample_loop(ours, ours.timesteps, initial_latents(ours), gens(), **kwargs)
    b, _ = sample_loop(theirs, theirs.timesteps, initial_latents(theirs), gens(), **kwargs)
    assert_close(a[-1], b[-1], "last step")


@pytest.mark.parametrize("steps", [3, 7, 25, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", list(ORACLES))
def test_timesteps_and_sigmas_match(name: str, spacing: str, steps: int) -> None:
    config = {**SD1, "timestep_spacing": spacing}
    ours, theirs = make_scheduler(name, config), oracle(name, config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-7)
    if hasattr(theirs, "sigmas"):
        assert torch.equal(ours.sigmas, theirs.sigmas)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "euler"])
@pytest.mark.parametrize("config", [SD1, ZERO_SNR], ids=["sd1", "zero-snr"])
def test_karras_sigmas_match(name: str, config: dict[str, Any]) -> None:
    config = {**config, "use_karras_sigmas": True}
    for steps in (5, 20, 30):
        ours, theirs = make_scheduler(name, config), oracle(name, config)
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        assert torch.equal(ours.timesteps, theirs.timesteps)
        assert torch.equal(ours.sigmas, theirs.sigmas)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "name, config",
    [(n, c) for n in ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m_karras", "pndm") for c in (SD1, ZERO_SNR)],
)
def test_img2img_begin_index_and_add_noise(name: str, config: dict[str, Any]) -> None:
    """diffusers' img2img: skip the first steps, set the begin index, noise the image, denoise the rest."""
    ours, theirs = make_scheduler(name, config), oracle(name, config)
    steps, strength = 10, 0.6
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    results = []
    for sched in (ours, theirs):
        sched.set_timesteps(steps)
        start = steps - int(steps * strength)
        timesteps = sched.timesteps[start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start * sched.order)
        latents = sched.add_noise(image, noise, timesteps[:1].repeat(SHAPE[0]))
        results.append(latents)
        samples, _ = sample_loop(sched, timesteps, latents, torch.Generator().manual_seed(4))
        results.append(samples[-1])
    assert_close(results[0], results[2], "noised latents")
    assert_close(results[1], results[3], "final latents")


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "pndm"])
def test_add_noise_per_item_timesteps(name: str) -> None:
    ours, theirs = make_scheduler(name, SD1), oracle(name, SD1)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    t = torch.stack([ours.timesteps[1], ours.timesteps[6]])
    assert_close(ours.add_noise(x, noise, t), theirs.add_noise(x, noise, t.clone()), "add_noise")


@pytest.mark.parametrize("config_id", ["sd1-eps", "sd1-v", "zero-snr-v"])
@pytest.mark.parametrize("name", list(ORACLES))
def test_split_model_output_and_renoise_invert_each_other(name: str, config_id: str) -> None:
    """At every step, (x0, eps) from split_model_output re-noise to the sample (renoise), and x0 is the step's
    own clean estimate: the pair a guidance plugin (SAG) uses to rebuild a sample in the sampler's own space."""
    config = CONFIGS[config_id]
    if name == "pndm" and config.get("rescale_betas_zero_snr"):
        pytest.skip("PNDM ignores rescale_betas_zero_snr")
    sched = make_scheduler(name, config)
    sched.set_timesteps(8)
    latents = initial_latents(sched)
    generator = torch.Generator().manual_seed(3)
    for i, t in enumerate(sched.timesteps):
        output = fake_model(sched.scale_model_input(latents, t), t)
        x0, eps = sched.split_model_output(output, latents, t)
        again = sched.renoise(x0, eps, t)
        scale = float(latents.abs().max())
        assert (again - latents).abs().max() <= 1e-5 * max(scale, 1.0), f"step {i}: renoise(split(x)) != x"
        out = sched.step(output, t, latents, generator=generator)
        # PNDM's own estimate comes from its multistep blend of past outputs, not from this output alone.
        if out.pred_original_sample is not None and name != "pndm":
            assert_close(x0, out.pred_original_sample, f"x0 at step {i}")
        latents = out.prev_sample


def test_split_model_output_is_the_sag_reference_formula() -> None:
    """For variance-preserving samplers the split is diffusers' StableDiffusionSAGPipeline.pred_x0 / pred_epsilon."""
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        StableDiffusionSAGPipeline,
    )

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    for config in (SD1, {**SD1, "prediction_type": "v_prediction"}, ZERO_SNR):
        ours, theirs = make_scheduler("ddim", config), diffusers.DDIMScheduler.from_config(config)
        ours.set_timesteps(10)
        holder = type("Holder", (), {"scheduler": theirs})()  # pred_x0 / pred_epsilon only read self.scheduler
        for t in ours.timesteps[[0, 4, 9]]:
            x0, eps = ours.split_model_output(out, x, t)
            assert torch.equal(x0, StableDiffusionSAGPipeline.pred_x0(holder, x, out, t))
            assert torch.equal(eps, StableDiffusionSAGPipeline.pred_epsilon(holder, x, out, t))
            assert torch.equal(ours.renoise(x0, eps, t), theirs.add_noise(x0, eps, t[None]))


@pytest.mark.parametrize(
    "name, config",
    [
        (name, config)
        for name in scheduler_names()
        for config in (SD1, ZERO_SNR, {"beta_schedule": "squaredcos_cap_v2"})
        if not (name == "pndm" and config is ZERO_SNR)  # PNDM ignores the rescale, as in diffusers
    ],
)
def test_train_schedule_and_velocity_match_ddpm(name: str, config: dict[str, Any]) -> None:
    """alphas_cumprod is the training schedule and get_velocity the v target, whatever the sampler."""
    ours = make_scheduler(name, config)
    ddpm = diffusers.DDPMScheduler.from_config(config)
    assert torch.equal(ours.alphas_cumprod, ddpm.alphas_cumprod)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([999, 17])
    assert_close(ours.get_velocity(x, noise, t), ddpm.get_velocity(x, noise, t), "velocity")
    if name in ("ddim", "ddim_inverse", "ddpm", "pndm"):  # the sigma schedulers noise by schedule index
        assert_close(ours.add_noise(x, noise, t), ddpm.add_noise(x, noise, t), "training add_noise")


@pytest.mark.parametrize(
    "config",
    [
        SD1,
        {**SD1, "prediction_type": "v_prediction"},
        {**ZERO_SNR, "set_alpha_to_one": True},
        {**SD1, "clip_sample": True},
    ],
    ids=["sd1-eps", "sd1-v", "zero-snr-v", "clipped"],
)
def test_ddim_inversion_matches_diffusers(config: dict[str, Any]) -> None:
    ours = make_scheduler("ddim_inverse", config)
    theirs = diffusers.DDIMInverseScheduler.from_config(config)
    assert_same_trajectory(ours, theirs)


def test_ddim_inversion_round_trip_is_close() -> None:
    """Inverting then sampling with an x-independent model output returns the start exactly (up to fp)."""
    inv, fwd = make_scheduler("ddim_inverse", SD1), make_scheduler("ddim", {**SD1, "set_alpha_to_one": True})
    inv.set_timesteps(10)
    fwd.set_timesteps(10)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    eps = lambda t: torch.full(SHAPE, 0.1) * (float(t) / 1000)  # noqa: E731
    x = start
    for t in inv.timesteps:
        x = inv.step(eps(t), t, x).prev_sample
    for t in fwd.timesteps:
        x = fwd.step(eps(t), t, x).prev_sample
    assert (x - start).abs().max() < 0.05
    with pytest.raises(ValueError, match="eta"):
        inv.step(eps(1), inv.timesteps[0], start, eta=0.5)


@pytest.mark.parametrize("class_name", sorted({c for c, _ in ORACLES.values()} | {"DDIMInverseScheduler"}))
def test_diffusers_config_round_trip(class_name: str, tmp_path: Any) -> None:
    theirs = getattr(diffusers, class_name).from_config(SD15_JSON)
    theirs.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    for source in (dict(theirs.config), saved):
        ours = make_scheduler(None, source)
        assert type(ours).diffusers_class_name == class_name
        for key, value in ours.config.model_dump().items():
            assert theirs.config[key] == value, key
    # Ours written out loads back in diffusers with the same config, and is valid JSON.
    written = ours.to_diffusers_config()
    json.dumps(written)
    assert written["_class_name"] == class_name
    back = getattr(diffusers, class_name).from_config(written)
    for key in ours.config.model_dump():
        assert back.config[key] == theirs.config[key], key


def test_switching_scheduler_keeps_only_explicit_values() -> None:
    """Like diffusers' from_config, a class switch keeps given values and applies the new class's defaults."""
    pndm = make_scheduler(None, SD15_JSON)
    assert pndm.name == "pndm" and pndm.config.skip_prk_steps
    for source in (pndm.config, pndm.to_diffusers_config()):
        euler = make_scheduler("euler", source)
        ddim = make_scheduler("ddim", source)
        d_pndm = diffusers.PNDMScheduler.from_config(SD15_JSON)
        d_euler = diffusers.EulerDiscreteScheduler.from_config(d_pndm.config)
        d_ddim = diffusers.DDIMScheduler.from_config(d_pndm.config)
        assert euler.config.timestep_spacing == d_euler.config.timestep_spacing == "linspace"
        assert ddim.config.clip_sample is d_ddim.config.clip_sample is False  # carried from the SD json
        assert ddim.config.set_alpha_to_one is False and ddim.config.steps_offset == 1


def test_names_and_presets() -> None:
    required = {"ddim", "ddim_inverse", "ddpm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "pndm"}
    assert required <= set(scheduler_names())
    karras = make_scheduler("dpmpp_2m_karras", SD15_JSON)
    assert karras.config.use_karras_sigmas and karras.name == "dpmpp_2m_karras"
    # The plain name turns karras off even if the config had it on; an override wins over the name.
    assert not make_scheduler("dpmpp_2m", karras.config).config.use_karras_sigmas
    assert make_scheduler("dpmpp_2m", karras.config, use_karras_sigmas=True).name == "dpmpp_2m_karras"
    assert make_scheduler("EulerAncestralDiscreteScheduler").name == "euler_a"
    assert make_scheduler(None, karras.to_diffusers_config()).name == "dpmpp_2m_karras"
    assert make_scheduler(None, karras.config).name == "dpmpp_2m_karras"
    assert isinstance(make_scheduler("ddim").config, SchedulerConfig)
    # "pndm" is SD's PLMS unless the config says otherwise; the diffusers class name keeps its default.
    without = {k: v for k, v in SD15_JSON.items() if k != "skip_prk_steps"}
    ddim_json = dict(diffusers.DDIMScheduler.from_config(without).config)
    assert make_scheduler("pndm", ddim_json).config.skip_prk_steps is True
    assert make_scheduler("pndm", {**SD1, "skip_prk_steps": False}).config.skip_prk_steps is False
    assert make_scheduler("PNDMScheduler", ddim_json).config.skip_prk_steps is False
    # UniPC / DEIS configs name their own solvers; diffusers maps them, so do we.
    assert make_scheduler("dpmpp_2m", {"solver_type": "bh2"}).config.solver_type == "midpoint"


def test_fresh_is_independent() -> None:
    sched = make_scheduler("dpmpp_2m", SD1)
    sched.set_timesteps(10)
    first, _ = sample_loop(sched, sched.timesteps, initial_latents(sched), None)
    again = sched.fresh()
    assert again.config is sched.config and again.step_index is None and again.num_inference_steps is None
    again.set_timesteps(10)
    second, _ = sample_loop(again, again.timesteps, initial_latents(again), None)
    assert torch.equal(first[-1], second[-1])


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'lms'.*ddim.*euler_a.*dpmpp_2m_karras"):
        make_scheduler("lms")
    with pytest.raises(ValueError, match="_class_name"):
        make_scheduler(None, {"beta_schedule": "linear"})
    with pytest.raises(ValueError, match="LMSDiscreteScheduler"):
        make_scheduler(None, {"_class_name": "LMSDiscreteScheduler"})


@pytest.mark.parametrize(
    "name, config, field",
    [
        ("ddim", {"beta_schedule": "cosine"}, "beta_schedule"),
        ("ddim", {"prediction_type": "noise"}, "prediction_type"),
        ("euler", {"timestep_spacing": "middle"}, "timestep_spacing"),
        ("euler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
        ("euler", {"use_karras_sigmas": True, "use_exponential_sigmas": True}, "use_karras_sigmas"),
        ("DPMSolverMultistepScheduler", {"solver_order": 3}, "solver_order"),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, "algorithm_type"),
        ("ddpm", {"variance_type": "fixed_large_log"}, "variance_type"),
        ("ddim_inverse", {"timestep_spacing": "linspace"}, "timestep_spacing"),
        ("pndm", {"prediction_type": "sample"}, "prediction_type"),
        ("ddim", {"num_train_timesteps": 10, "trained_betas": [0.1] * 3}, "trained_betas"),
        ("ddim", {"beta_end": 2.0}, "beta_end"),
    ],
)
def test_bad_config_names_the_field(name: str, config: dict[str, Any], field: str) -> None:
    with pytest.raises(SchedulerConfigError, match=field) as err:
        make_scheduler(name, config)
    assert isinstance(err.value, ValueError)


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="'etta'"):
        make_scheduler("ddim", None, etta=0.5)
    with pytest.raises(ValueError, match="eta"):
        make_scheduler("ddim", None, eta=-1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_scheduler("ddim").set_timesteps(2000)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        make_scheduler("ddim").step(torch.zeros(SHAPE), 10, torch.zeros(SHAPE))


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_half_precision_model_output_matches(name: str) -> None:
    """A float16 model output with float32 latents: same values and dtype as diffusers (Euler casts to
    the output's dtype, DPM-Solver keeps float32)."""
    results = []
    for sched in (make_scheduler(name, SD1), oracle(name, SD1)):
        sched.set_timesteps(5)
        x = initial_latents(sched)
        t = sched.timesteps[0]
        out = fake_model(sched.scale_model_input(x, t), t).half()
        results.append(sched.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample)
    assert results[0].dtype == results[1].dtype and torch.equal(results[0], results[1])


def test_trained_betas_and_cosine() -> None:
    betas = torch.linspace(1e-4, 0.02, 1000).tolist()
    ours, theirs = make_scheduler("ddim", {"trained_betas": betas}), diffusers.DDIMScheduler(trained_betas=betas)
    assert torch.equal(ours.betas, theirs.betas)
    cosine = make_scheduler("ddpm", {"beta_schedule": "squaredcos_cap_v2"})
    assert math.isclose(float(cosine.betas[-1]), 0.999, rel_tol=1e-6)  # capped
    assert torch.equal(cosine.betas, diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas)
