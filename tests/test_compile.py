"""torch.compile over the UNet: zero graph breaks, and compiled output equal to eager, with and without plugins.

Most tests compile with a counting backend that runs the captured graphs eagerly (cheap on CPU, and it sees
every graph dynamo makes); ``fullgraph=True`` turns any graph break into an error. One test uses the default
inductor backend end to end.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import torch

from diffsteer import AttentionPatch, Plugin, hookimpl
from diffsteer.models import ForwardContext
from diffsteer.testing import residual_shapes, run_concurrently

KW = dict(prompt="a red circle", num_inference_steps=3, seed=0, output_type="latent", height=32, width=32)


class GraphCounter:
    """A dynamo backend that records each captured graph and runs it unchanged."""

    def __init__(self) -> None:
        self.graphs: list[Any] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture
def fresh(tiny_pipe):
    """A pipeline sharing the tiny models, so compiling it leaves the session's ``tiny_pipe`` eager."""
    torch._dynamo.reset()
    yield tiny_pipe.with_scheduler("ddim")
    torch._dynamo.reset()


class Residuals(Plugin):
    """Adds seeded random ControlNet-shaped residuals to every pass (different per step)."""

    name = "residuals"

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        h, w = inputs.sample.shape[-2:]
        down, mid = residual_shapes(call.unet.config, h, w)
        g = torch.Generator().manual_seed(step.index)
        rows = inputs.sample.shape[0]
        inputs.add_residuals(
            self.name,
            down=[0.1 * torch.randn(rows, *s, generator=g) for s in down],
            mid=0.1 * torch.randn(rows, *mid, generator=g),
        )


class ProbsEditor(Plugin):
    """Sharpens every cross-attention's probabilities and records a sum of the mid-block self-attention's.

    The observer stores into a fixed slot and ``post_step`` collects it: appending to a list from inside the
    compiled UNet would make dynamo guard on the list's length, and recompile every step.
    """

    name = "probs-editor"

    def __init__(self, seen: list, **kw: Any) -> None:
        super().__init__(**kw)
        self.seen = seen

    @hookimpl
    def diffsteer_attention_patches(self, call, register):
        def sharpen(layer, probs):
            probs = probs**2
            return probs / probs.sum(-1, keepdim=True)

        state = call.state_for(self)

        def observe(layer, probs):
            state["sum"] = probs.sum()

        register(AttentionPatch(self.name, "*attn2", edit_probs=sharpen))
        register(AttentionPatch(self.name, "mid_block.*attn1", observe=observe))

    @hookimpl
    def diffsteer_post_step(self, call, step):
        self.seen.append(call.state_for(self).pop("sum"))


class LowRankCrossKV(Plugin):
    """A LoRA stand-in: seeded low-rank deltas on every cross-attention's K and V (and a replaced bias)."""

    name = "low-rank-kv"

    def __init__(self, seed: int, scale: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.seed, self.scale = seed, scale

    @hookimpl
    def diffsteer_weight_overrides(self, call, weights):
        g = torch.Generator().manual_seed(self.seed)
        for layer in (n for n in call.unet.attention_layers() if n.endswith("attn2")):
            for proj in ("to_k", "to_v"):
                out_dim, in_dim = weights.parameter(f"{layer}.{proj}.weight").shape
                down, up = torch.randn(4, in_dim, generator=g), torch.randn(out_dim, 4, generator=g)
                weights.add_low_rank(self.name, f"{layer}.{proj}", 0.2 * down, 0.2 * up, scale=self.scale)
        bias = weights.parameter("mid_block.attentions.0.proj_out.bias")
        weights.replace(self.name, "mid_block.attentions.0.proj_out.bias", torch.randn(bias.shape, generator=g))


def test_the_unet_traces_as_one_graph_with_processors(tiny_pipe):
    from diffsteer.attention_patches import compile_patches

    unet = tiny_pipe.unet
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    seen: list = []
    patches = [
        AttentionPatch("t", "*attn2", edit_output=lambda layer, out: out * 0.5),
        AttentionPatch("t", "mid_block.*attn1", observe=lambda layer, probs: seen.append(probs.shape)),
    ]
    context = ForwardContext(processors=compile_patches(patches, unet.attention_layers()))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(unet)(sample, torch.tensor(500), text, context=context)
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert len(seen) == 1


def test_compiled_plain_call_equals_eager_and_compiles_once(fresh):
    eager = fresh(**KW).images
    counter = GraphCounter()
    assert fresh.compile(backend=counter) is fresh
    first = fresh(**KW).images
    again = fresh(**dict(KW, seed=1)).images
    assert len(counter.graphs) == 1  # one graph, reused by every step of both calls
    assert (first - eager).abs().max().item() <= 1e-5
    assert not torch.equal(first, again)


def test_the_diffusers_idiom_works_with_controlnet_residuals(fresh):
    eager = fresh(plugins=[Residuals()], **KW).images
    assert (eager - fresh(**KW).images).abs().max().item() > 1e-3  # the residuals matter
    counter = GraphCounter()
    fresh.unet = torch.compile(fresh.unet, backend=counter, fullgraph=True)
    compiled = fresh(plugins=[Residuals()], **KW).images
    assert len(counter.graphs) == 1
    assert (compiled - eager).abs().max().item() <= 1e-5


def test_compiled_attention_patches_equal_eager(fresh):
    seen_eager: list = []
    eager = fresh(plugins=[ProbsEditor(seen_eager)], **KW).images
    counter = GraphCounter()
    fresh.compile(backend=counter)
    seen: list = []
    compiled = fresh(plugins=[ProbsEditor(seen)], **KW).images
    # The observer's side effect survives compilation: once per step, with the eager values.
    assert len(seen) == len(seen_eager) == 3
    assert torch.allclose(torch.stack(seen), torch.stack(seen_eager), atol=1e-5)
    assert (compiled - eager).abs().max().item() <= 1e-5
    assert len(counter.graphs) == 1


def test_compiled_weight_overrides_equal_eager_without_recompiling(fresh):
    eager = fresh(plugins=[LowRankCrossKV(0, 1.0)], **KW).images
    other = fresh(plugins=[LowRankCrossKV(1, 0.5)], **KW).images
    assert (eager - fresh(**KW).images).abs().max().item() > 1e-3
    counter = GraphCounter()
    fresh.compile(backend=counter)
    compiled = fresh(plugins=[LowRankCrossKV(0, 1.0)], **KW).images
    # Other weights and another scale are new tensors for the same graph: no recompile.
    compiled_other = fresh(plugins=[LowRankCrossKV(1, 0.5)], **KW).images
    assert len(counter.graphs) == 1
    assert (compiled - eager).abs().max().item() <= 1e-5
    assert (compiled_other - other).abs().max().item() <= 1e-5


def test_compiled_sag_observer_equals_eager_without_recompiling(fresh):
    sag = pytest.importorskip("diffsteer_sag")
    kw = dict(KW, height=64, width=64)  # SAG's blur needs latents larger than its kernel
    eager = fresh(plugins=[sag.Sag(sag_scale=0.75)], **kw)
    counter = GraphCounter()
    fresh.compile(backend=counter)
    compiled = fresh(plugins=[sag.Sag(sag_scale=0.75)], **kw)
    fresh(plugins=[sag.Sag(sag_scale=0.5)], **dict(kw, seed=3))
    # The main pass and SAG's degraded pass (another batch, no observer) are two graphs; a second call with
    # new plugin objects reuses them.
    assert len(counter.graphs) == 2
    assert (compiled.images - eager.images).abs().max().item() <= 1e-5
    assert torch.allclose(compiled.extras["sag"]["masks"].float(), eager.extras["sag"]["masks"].float())


def test_compiled_sega_sag_controlnet_stack_equals_eager(fresh):
    # The stack the GPU bench compiles: SEGA's concept branch, SAG's observer and extra pass, and the
    # ControlNet plugin's residuals on both passes.
    sag = pytest.importorskip("diffsteer_sag")
    sega = pytest.importorskip("diffsteer_sega")
    controlnet = pytest.importorskip("diffsteer_controlnet")
    from diffsteer_controlnet.model import ControlNetModel

    torch.manual_seed(0)
    net = ControlNetModel.from_unet(fresh.unet, conditioning_embedding_out_channels=(8, 16))  # the VAE downsamples by 2
    with torch.no_grad():  # zero convolutions would add nothing
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def stack() -> list:
        return [
            sega.Sega(concepts=[dict(prompt="red", warmup_steps=1)]),
            sag.Sag(sag_scale=0.75),
            controlnet.ControlNet(controlnet=net, image=image),
        ]

    kw = dict(KW, height=64, width=64)
    eager = fresh(plugins=stack(), **kw).images
    assert (eager - fresh(**kw).images).abs().max().item() > 1e-3
    counter = GraphCounter()
    fresh.compile(backend=counter)
    compiled = fresh(plugins=stack(), **kw).images
    fresh(plugins=stack(), **kw)
    assert len(counter.graphs) == 2  # the main pass (uncond, cond, concept) and SAG's pass
    assert (compiled - eager).abs().max().item() <= 1e-5


def test_a_compiled_pipeline_serves_concurrent_calls_with_different_patches(fresh):
    jobs = [[], [ProbsEditor([])], [ProbsEditor([]), Residuals()]]
    expected = [fresh(plugins=p, **KW).images for p in jobs]
    fresh.compile(backend=GraphCounter())
    for p in jobs:  # compile each variant before the threads race
        fresh(plugins=p, **KW)
    results = run_concurrently([lambda p=p: fresh(plugins=p, **KW).images for p in jobs])
    for i, want in enumerate(expected):
        assert (results[i] - want).abs().max().item() <= 1e-5, i


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_inductor_compiled_unet_with_patches_equals_eager(tiny_pipe):
    # The default backend, as users call it, on one UNet pass with attention patches (about 40 s on an idle
    # 2-core CPU). One pass, not a whole call: inductor's fused kernels round differently, and DDIM steps
    # would amplify that past 1e-5.
    from diffsteer.attention_patches import compile_patches

    unet = tiny_pipe.unet
    patches = [
        AttentionPatch("t", "*attn2", edit_probs=lambda layer, p: p.square() / p.square().sum(-1, keepdim=True)),
        AttentionPatch("t", "up_blocks.*attn1", edit_output=lambda layer, out: out * 0.5),
    ]
    context = ForwardContext(processors=compile_patches(patches, unet.attention_layers()))
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    eager = unet(sample, torch.tensor(500), text, context=context)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(unet, fullgraph=True)(sample, torch.tensor(500), text, context=context)
    finally:
        torch._dynamo.reset()
    assert (eager - unet(sample, torch.tensor(500), text)).abs().max().item() > 1e-3  # the patches matter
    assert (compiled - eager).abs().max().item() <= 1e-5
