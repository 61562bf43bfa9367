"""Call-scoped weight overrides: deltas, low-rank deltas and replacements of named weights for one call.

The oracle is a copy of the models with the same change written into their parameters: a call with the
override must give that copy's images, and the shared models must stay bit-identical.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch

from diffsteer import Plugin, PluginConflictError, PluginError, hookimpl
from diffsteer.models.context import ForwardContext, LowRank, WeightPatch, conv, linear, merge_is_cheaper
from diffsteer.pipeline import Pipeline
from diffsteer.testing import run_concurrently

KW = dict(prompt="a red circle", num_inference_steps=3, seed=0, output_type="latent")
CROSS_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CROSS_V = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"
CONV = "down_blocks.0.resnets.0.conv1"
PROJ_OUT = "mid_block.attentions.0.proj_out"


def randn(*shape: int, seed: int, scale: float = 0.1) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Overrides(Plugin):
    """A test plugin that registers what ``register(weights, owner)`` says (a LoRA, TIME or custom-diffusion stand-in)."""

    name = "overrides"

    def __init__(self, register: Callable[[Any, str], None], label: str = "overrides", **kw: Any) -> None:
        super().__init__(**kw)
        self.register, self.label = register, label

    @hookimpl
    def diffsteer_weight_overrides(self, call, weights):
        self.register(weights, self.label)


def lora(seed: int, scale: float = 1.0) -> Callable[[Any, str], None]:
    """Low-rank deltas on a cross-attention K and V and a resnet conv, and one on a text-encoder query."""

    def register(weights: Any, owner: str) -> None:
        weights.add_low_rank(owner, CROSS_K, randn(4, 32, seed=seed), randn(32, 4, seed=seed + 1), scale=scale)
        weights.add_low_rank(owner, CROSS_V, randn(2, 32, seed=seed + 2), randn(32, 2, seed=seed + 3), scale=scale)
        weights.add_low_rank(owner, CONV, randn(2, 32, 3, 3, seed=seed + 4), randn(32, 2, 1, 1, seed=seed + 5), scale=scale)
        weights.add_low_rank(
            owner, "encoder.layers.0.self_attn.q_proj", randn(2, 32, seed=seed + 6), randn(32, 2, seed=seed + 7),
            scale=scale, model="text_encoder",
        )

    return register


def edit(seed: int) -> Callable[[Any, str], None]:
    """TIME-like: replace a projection's weight and bias outright."""

    def register(weights: Any, owner: str) -> None:
        weights.replace(owner, f"{PROJ_OUT}.weight", randn(64, 64, 1, 1, seed=seed, scale=0.3))
        weights.replace(owner, f"{PROJ_OUT}.bias", randn(64, seed=seed + 1))

    return register


def text_layers(pipe: Pipeline) -> dict[str, torch.nn.Module]:
    return dict(pipe.text_encoder.named_modules())


def baked(pipe: Pipeline, changes: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]]) -> Pipeline:
    """A pipeline on copies of the UNet and text encoder with ``(model, parameter, new = f(old))`` written in."""
    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    params = {"unet": dict(unet.named_parameters()), "text_encoder": dict(text_encoder.named_parameters())}
    with torch.no_grad():
        for model, name, fn in changes:
            params[model][name].copy_(fn(params[model][name]))
    return Pipeline(unet, pipe.vae, text_encoder, pipe.tokenizer, pipe.scheduler, name=pipe.name)


def lora_changes(seed: int, scale: float = 1.0) -> list:
    def low_rank(down: torch.Tensor, up: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda w: w + scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)

    return [
        ("unet", f"{CROSS_K}.weight", low_rank(randn(4, 32, seed=seed), randn(32, 4, seed=seed + 1))),
        ("unet", f"{CROSS_V}.weight", low_rank(randn(2, 32, seed=seed + 2), randn(32, 2, seed=seed + 3))),
        ("unet", f"{CONV}.weight", low_rank(randn(2, 32, 3, 3, seed=seed + 4), randn(32, 2, 1, 1, seed=seed + 5))),
        ("text_encoder", "encoder.layers.0.self_attn.q_proj.weight",
         low_rank(randn(2, 32, seed=seed + 6), randn(32, 2, seed=seed + 7))),
    ]


def edit_changes(seed: int) -> list:
    return [
        ("unet", f"{PROJ_OUT}.weight", lambda w: randn(64, 64, 1, 1, seed=seed, scale=0.3)),
        ("unet", f"{PROJ_OUT}.bias", lambda b: randn(64, seed=seed + 1)),
    ]


@pytest.fixture
def pipe(tiny_pipe):
    return tiny_pipe


def snapshot(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {
        **{f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()},
        **{f"te.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()},
    }


def assert_unchanged(pipe: Pipeline, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_overrides_equal_the_weights_written_into_a_copy(pipe):
    if "encoder.layers.0.self_attn.q_proj.weight" not in dict(pipe.text_encoder.named_parameters()):
        pytest.skip("a transformers version that nests the CLIP text model under text_model")
    before = snapshot(pipe)
    plain = pipe(**KW).images
    ours = pipe(plugins=[Overrides(lora(0)), Overrides(edit(10), label="edit")], **KW).images
    oracle = baked(pipe, lora_changes(0) + edit_changes(10))(**KW).images
    assert (ours - plain).abs().max().item() > 1e-2
    assert (ours - oracle).abs().max().item() <= 1e-5
    assert_unchanged(pipe, before)


def test_text_encoder_overrides_reach_every_prompt_encoding_of_the_call(pipe):
    seen: dict[str, torch.Tensor] = {}

    class Encoder(Plugin):
        name = "encoder-spy"

        @hookimpl
        def diffsteer_guidance_branches(self, call, branches):
            seen["call"] = call.text.encode(["a red circle"])

    q = "encoder.layers.0.self_attn.q_proj"
    register = lambda w, owner: w.add_delta(owner, f"{q}.weight", randn(32, 32, seed=3), model="text_encoder")  # noqa: E731
    pipe(plugins=[Overrides(register), Encoder()], **dict(KW, num_inference_steps=1))
    shared = pipe.text.encode(["a red circle"])
    oracle = baked(pipe, [("text_encoder", f"{q}.weight", lambda w: w + randn(32, 32, seed=3))]).text.encode(["a red circle"])
    assert (seen["call"] - oracle).abs().max().item() <= 1e-5
    assert (seen["call"] - shared).abs().max().item() > 1e-3  # outside the call, the plain encoder


def test_deltas_of_several_plugins_sum(pipe):
    name = f"{CROSS_K}.weight"
    a, b = randn(32, 32, seed=1), randn(32, 32, seed=2)
    two = pipe(plugins=[
        Overrides(lambda w, o: w.add_delta(o, name, a), label="a"),
        Overrides(lambda w, o: w.add_delta(o, name, b), label="b"),
    ], **KW).images
    one = pipe(plugins=[Overrides(lambda w, o: w.add_delta(o, name, a + b))], **KW).images
    # A delta on top of a replacement adds to the replacement.
    both = pipe(plugins=[
        Overrides(lambda w, o: w.replace(o, name, a), label="a"),
        Overrides(lambda w, o: w.add_delta(o, name, b), label="b"),
    ], **KW).images
    replaced = pipe(plugins=[Overrides(lambda w, o: w.replace(o, name, a + b))], **KW).images
    assert (two - one).abs().max().item() <= 1e-5
    assert (both - replaced).abs().max().item() <= 1e-5


def test_two_replacements_of_one_parameter_name_both_plugins(pipe):
    name = f"{CROSS_K}.weight"
    plugins = [
        Overrides(lambda w, o: w.replace(o, name, randn(32, 32, seed=1)), label="time-edit"),
        Overrides(lambda w, o: w.replace(o, name, randn(32, 32, seed=2)), label="custom-k"),
    ]
    with pytest.raises(PluginConflictError, match=r"'time-edit' and 'custom-k'.*to_k\.weight"):
        pipe(plugins=plugins, **KW)


@pytest.mark.parametrize(
    "register, message",
    [
        (lambda w, o: w.add_delta(o, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_kk.weight",
                                  torch.zeros(1)), r"no linear or convolution layer .*to_kk.*close names.*to_k\.weight"),
        (lambda w, o: w.add_delta(o, "down_blocks.0.resnets.0.norm1.weight", torch.zeros(32)), r"norm1"),
        (lambda w, o: w.add_delta(o, CROSS_K, torch.zeros(32, 32)), r"only a layer's '\.weight' or '\.bias'"),
        (lambda w, o: w.add_delta(o, f"{CROSS_K}.bias", torch.zeros(32)), r"has no bias"),
        (lambda w, o: w.add_delta(o, f"{CROSS_K}.weight", torch.zeros(32, 16)), r"shape \(32, 16\).*\(32, 32\)"),
        (lambda w, o: w.replace(o, f"{CROSS_K}.weight", torch.full((32, 32), float("nan"))), r"NaN"),
        (lambda w, o: w.add_low_rank(o, CROSS_K, torch.zeros(4, 31), torch.zeros(32, 4)), r"do not fit"),
        (lambda w, o: w.add_delta(o, f"{CROSS_K}.weight", torch.zeros(32, 32), model="vae"), r"'vae'"),
    ],
    ids=["unknown", "norm", "no-kind", "no-bias", "shape", "nan", "low-rank-shape", "model"],
)
def test_bad_overrides_raise_an_error_naming_the_plugin(pipe, register, message):
    with pytest.raises(PluginError, match=r"plugin 'lora-file'.*" + message):
        pipe(plugins=[Overrides(register, label="lora-file")], **KW)


def test_every_overridable_unet_weight_takes_effect(pipe):
    # A layer that the forward runs without routing it through the context would ignore its override.
    from diffsteer.overrides import WeightOverrides

    unet = pipe.unet
    weights = WeightOverrides({"unet": unet})
    params = dict(unet.named_parameters())
    names = [n for n in weights.names("unet") if n.endswith(".weight")]
    assert len(names) == len(unet.weight_layers()) > 50
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    plain = unet(sample, torch.tensor(500), text)
    for name in names:
        # Random, not constant: a constant delta vanishes on the zero-mean rows a LayerNorm hands attention.
        delta = 0.05 * torch.randn(params[name].shape, generator=g)
        patch = {name[: -len(".weight")]: WeightPatch(delta=delta)}
        out = unet(sample, torch.tensor(500), text, context=ForwardContext(weights=patch))
        assert (out - plain).abs().max().item() > 1e-6, name


@pytest.mark.parametrize("tokens", [2, 4096], ids=["factored", "merged"])
def test_both_low_rank_paths_equal_the_dense_delta(tokens):
    torch.manual_seed(0)
    layer, cnv = torch.nn.Linear(64, 48), torch.nn.Conv2d(16, 24, 3, padding=1)
    for m, path in ((layer, "lin"), (cnv, "conv")):
        setattr(m, "_diffsteer_path", path)
    lr_lin = LowRank(torch.randn(4, 64), torch.randn(48, 4), 0.5)
    lr_conv = LowRank(torch.randn(4, 16, 3, 3), torch.randn(24, 4, 1, 1), 0.5)
    ctx = ForwardContext(weights={"lin": WeightPatch(low_rank=(lr_lin,)), "conv": WeightPatch(low_rank=(lr_conv,))})
    x = torch.randn(1, tokens, 64)
    side = int(tokens**0.5)
    img = torch.randn(1, 16, side, side)
    assert merge_is_cheaper(tokens, 64, 48) == (tokens == 4096)
    want_lin = torch.nn.functional.linear(x, layer.weight + lr_lin.dense(), layer.bias)
    want_conv = torch.nn.functional.conv2d(img, cnv.weight + lr_conv.dense(), cnv.bias, padding=1)
    assert torch.allclose(linear(layer, x, ctx), want_lin, atol=1e-4)
    assert torch.allclose(conv(cnv, img, ctx), want_conv, atol=1e-4)


def test_concurrent_calls_with_different_overrides_match_serial_calls(pipe):
    before = snapshot(pipe)
    jobs = [[Overrides(lora(0))], [Overrides(lora(20), label="other-lora")], [Overrides(edit(10))], []]
    serial = [pipe(plugins=p, **KW).images for p in jobs]
    assert all((serial[i] - serial[j]).abs().max().item() > 1e-3 for i in range(4) for j in range(i))

    def job(plugins: list) -> Callable[[], list]:
        return lambda: [pipe(plugins=plugins, **KW).images for _ in range(2)]

    results = run_concurrently([job(p) for p in jobs])
    for i, want in enumerate(serial):
        assert all(torch.equal(got, want) for got in results[i]), i
    assert_unchanged(pipe, before)


def test_patches_can_keep_only_some_plugins(pipe):
    # What a step window needs: the same registrations, without one plugin's changes.
    from diffsteer.overrides import WeightOverrides

    weights = WeightOverrides({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    lora(0)(weights, "lora")
    edit(10)(weights, "edit")
    weights.add_delta("tweak", f"{CROSS_K}.weight", randn(32, 32, seed=5))
    assert weights.owners() == ["lora", "edit", "tweak"]
    everything = weights.patches("unet")
    assert set(everything) == {CROSS_K, CROSS_V, CONV, PROJ_OUT}
    no_edit = weights.patches("unet", owners={"lora", "tweak"})
    assert set(no_edit) == {CROSS_K, CROSS_V, CONV}
    only_tweak = weights.patches("unet", owners={"tweak"})
    assert set(only_tweak) == {CROSS_K} and only_tweak[CROSS_K].low_rank == ()
    assert torch.equal(only_tweak[CROSS_K].delta, randn(32, 32, seed=5))
    assert len(everything[CROSS_K].low_rank) == 1 and everything[CROSS_K].delta is not None
    assert weights.patches("text_encoder", owners={"edit"}) == {}


class StepRecorder(Plugin):
    """Keeps each main-loop step's input latents and raw conditional prediction."""

    name = "step-recorder"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    @hookimpl
    def diffsteer_noise_prediction(self, call, step, predictions):
        self.seen.append((step.latents.clone(), predictions["cond"].clone()))


@pytest.mark.parametrize(("start", "end", "inside"), [(0.0, 0.5, [0, 1]), (0.5, 1.0, [2, 3]), (0.25, 0.75, [1, 2])])
def test_unet_overrides_follow_the_plugins_step_window(pipe, start, end, inside):
    """A per-step LoRA schedule: inside its window a plugin's UNet weights act, outside the shared ones do.
    Each step's prediction is checked against the UNet run on that step's latents with and without the LoRA
    written into a copy of it (guidance off, so the prediction is the UNet's output)."""
    recorder = StepRecorder()
    pipe("a red circle", num_inference_steps=4, seed=0, guidance_scale=1.0, output_type="latent",
         plugins=[Overrides(lora(0), window_start=start, window_end=end), recorder])
    patched = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        weights = patched.state_dict()
        for layer, (down, up) in {CROSS_K: ((4, 32), (32, 4)), CROSS_V: ((2, 32), (32, 2))}.items():
            seed = 0 if layer == CROSS_K else 2
            weights[f"{layer}.weight"] += randn(*up, seed=seed + 1) @ randn(*down, seed=seed)
        d, u = randn(2, 32, 3, 3, seed=4), randn(32, 2, 1, 1, seed=5)
        weights[f"{CONV}.weight"] += torch.einsum("or,rikl->oikl", u[:, :, 0, 0], d)
        patched.load_state_dict(weights)
    # The text encoder's LoRA acts on the prompt, encoded once: both oracles get the call's embeddings.
    probe = EmbeddingProbe()
    pipe("a red circle", num_inference_steps=1, seed=0, guidance_scale=1.0, output_type="latent",
         plugins=[Overrides(lora(0)), probe])
    hidden = probe.embeddings
    schedule = pipe.scheduler.fresh()
    schedule.set_timesteps(4)
    deltas = []
    for index, (latents, pred) in enumerate(recorder.seen):
        with torch.no_grad():
            want = (patched if index in inside else pipe.unet)(latents, schedule.timesteps[index], hidden)
        deltas.append(float((want - pred).abs().max()))
    assert max(deltas) <= 1e-5, deltas


class EmbeddingProbe(Plugin):
    """Keeps the conditional branch's embeddings of a call."""

    name = "embedding-probe"

    @hookimpl
    def diffsteer_guidance_branches(self, call, branches):
        self.embeddings = branches["cond"].embeddings.clone()
