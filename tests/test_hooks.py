"""The hook API: order, exclusivity, attention patch compilation, branch layout, residuals, errors."""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from diffsteer import (
    AttentionPatch,
    Plugin,
    PluginConflictError,
    PluginError,
    PluginNotFoundError,
    SettingsError,
    hookimpl,
    hookspecs,
)
from diffsteer.errors import GenerationError
from diffsteer.pipeline import Pipeline
from diffsteer.testing.doubles import run as shared_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pipe(tiny_pipe):
    """The fixture kit's tiny SD1 pipeline (DDIM), loaded once per session."""
    return tiny_pipe


def run(pipe, plugins=(), **kw):
    return shared_run(pipe, plugins, **{"num_inference_steps": 3, **kw}).images


class Recorder(Plugin):
    """Implements every hook and records the order in which they fire."""

    name = "recorder"

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tag: str = "r"

    def __init__(self, log, **kw):
        super().__init__(**kw)
        self.log = log

    def _rec(self, what):
        self.log.append(f"{self.settings.tag}:{what}")

    @hookimpl
    def diffsteer_setup(self, call):
        self._rec("setup")
        call.state_for(self)["steps"] = 0

    @hookimpl
    def diffsteer_guidance_branches(self, call, branches):
        self._rec(f"branches={','.join(branches.names)}")

    @hookimpl
    def diffsteer_prepare_latents(self, call, latents):
        self._rec("prepare")

    @hookimpl
    def diffsteer_attention_patches(self, call, register):
        self._rec("patches")

    @hookimpl
    def diffsteer_pre_step(self, call, step):
        self._rec(f"pre{step.index}")

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        self._rec(f"inputs:{inputs.pass_name}:{inputs.sample.shape[0]}")

    @hookimpl
    def diffsteer_noise_prediction(self, call, step, predictions):
        self._rec(f"pred:{','.join(predictions)}")

    @hookimpl
    def diffsteer_guidance(self, call, step, predictions):
        self._rec("guidance")

    @hookimpl
    def diffsteer_post_step(self, call, step):
        call.state_for(self)["steps"] += 1
        self._rec(f"post{step.index}")

    @hookimpl
    def diffsteer_teardown(self, call, error):
        self._rec(f"teardown:{call.state_for(self)['steps']}:{type(error).__name__ if error else None}")


def test_hooks_fire_in_documented_order_and_plugin_order(pipe):
    log: list[str] = []
    run(pipe, [Recorder(log, tag="a"), Recorder(log, tag="b")], num_inference_steps=2)
    assert log[:2] == ["a:setup", "b:setup"]
    assert log[2:4] == ["a:branches=uncond,cond", "b:branches=uncond,cond"]
    mine = [e for e in log if e.startswith("a:")]
    # patches come before prepare_latents, so a sub-loop started there runs with them
    assert mine[2:4] == ["a:patches", "a:prepare"]
    assert mine[4:9] == ["a:pre0", "a:inputs:main:2", "a:pred:uncond,cond", "a:guidance", "a:post0"]
    assert log[-2:] == ["a:teardown:2:None", "b:teardown:2:None"]
    # every a-hook comes right before the matching b-hook: list order is call order
    assert all(x[2:] == y[2:] for x, y in zip(log[::2], log[1::2]))


def test_no_op_plugins_leave_output_unchanged(pipe):
    base = run(pipe)
    assert torch.equal(base, run(pipe, [Recorder([]), Recorder([], tag="x")]))


def test_teardown_sees_errors(pipe):
    log: list[str] = []

    class Boom(Plugin):
        name = "boom"

        @hookimpl
        def diffsteer_pre_step(self, call, step):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(pipe, [Recorder(log), Boom()])
    assert log[-1] == "r:teardown:0:RuntimeError"


class EncodeA(Plugin):
    name = "encode-a"

    @hookimpl
    def diffsteer_encode_prompt(self, call, texts):
        return None


class EncodeB(EncodeA):
    name = "encode-b"


def test_exclusive_hooks_conflict_names_both(pipe):
    with pytest.raises(PluginConflictError, match="'encode-a' and 'encode-b'.*prompt encoding"):
        run(pipe, [EncodeA(), EncodeB()])
    run(pipe, [EncodeA()])  # one alone is fine


def test_encode_prompt_replaces_core_encoder(pipe):
    seen = []

    class Zero(Plugin):
        name = "zero"

        @hookimpl
        def diffsteer_encode_prompt(self, call, texts):
            seen.append(list(texts))
            return torch.zeros(len(texts), 77, 32)

    a = run(pipe, [Zero()], prompt="a red circle")
    b = run(pipe, [Zero()], prompt="a blue square")
    assert torch.equal(a, b)  # the prompt no longer matters
    assert seen[0] == ["a red circle"] and seen[1] == [""]  # positive, then the default negative


class AddOne(Plugin):
    name = "add-one"

    @hookimpl
    def diffsteer_prepare_latents(self, call, latents):
        return latents + 1


class Double(Plugin):
    name = "double"

    @hookimpl
    def diffsteer_prepare_latents(self, call, latents):
        return latents * 2


def test_prepare_latents_chains_in_list_order(pipe):
    captured = {}

    class Capture(Plugin):
        name = "capture"

        @hookimpl
        def diffsteer_pre_step(self, call, step):
            captured.setdefault(len(captured), step.latents.clone())

    run(pipe, [AddOne(), Double(), Capture()], num_inference_steps=1)
    ab = captured[0]
    captured.clear()
    run(pipe, [Double(), AddOne(), Capture()], num_inference_steps=1)
    ba = captured[0]
    # (x + 1) * 2 - (2x + 1) == 1
    assert torch.allclose(ab - ba, torch.ones_like(ab))


def test_attention_patches_compile_once_per_layer_and_share_probs(pipe, monkeypatch):
    calls = {"probs": 0}
    seen: dict[str, list] = {"a": [], "b": []}
    from diffsteer.models.attention import Attention

    original = Attention.attention_probs

    def counting(self, q, k):
        calls["probs"] += 1
        return original(self, q, k)

    monkeypatch.setattr(Attention, "attention_probs", counting)

    class Observer(Plugin):
        name = "observer"

        def __init__(self, key):
            super().__init__()
            self.key = key

        @hookimpl
        def diffsteer_attention_patches(self, call, register):
            register(AttentionPatch(self.name, "*attn2", observe=lambda layer, p: seen[self.key].append((layer, p.shape))))

    base = run(pipe, num_inference_steps=2)
    out = run(pipe, [Observer("a"), Observer("b")], num_inference_steps=2)
    cross_layers = [n for n in pipe.unet.attention_layers() if n.endswith("attn2")]
    assert len(seen["a"]) == len(seen["b"]) == 2 * len(cross_layers)
    assert calls["probs"] == 2 * len(cross_layers)  # once per layer per step, shared by both observers
    assert seen["a"][0][1][-1] == 77  # key tokens of the cross-attention
    print("explicit softmax vs SDPA max|Δ|:", float((base - out).abs().max()))
    assert torch.allclose(base, out, atol=1e-4)  # explicit softmax path equals SDPA


def test_attention_patch_edits_apply_in_order(pipe):
    class ZeroSelfAttention(Plugin):
        name = "zero-self"

        @hookimpl
        def diffsteer_attention_patches(self, call, register):
            register(AttentionPatch(self.name, ["*attn1"], edit_output=lambda layer, out: out * 0))

    base = run(pipe)
    assert not torch.allclose(base, run(pipe, [ZeroSelfAttention()]))


def test_attention_patch_that_selects_nothing_names_owner(pipe):
    class Typo(Plugin):
        name = "typo"

        @hookimpl
        def diffsteer_attention_patches(self, call, register):
            register(AttentionPatch(self.name, "mid_blok.*", observe=lambda *a: None))

    with pytest.raises(PluginError, match="'typo'.*selects no layer"):
        run(pipe, [Typo()])


def down_residual_shapes(cfg, h, w):
    """(channels, h, w) of each down-block output a ControlNet residual is added to."""
    shapes = [(cfg.block_out_channels[0], h, w)]
    for i, c in enumerate(cfg.block_out_channels):
        shapes += [(c, h, w)] * cfg.layers_per_block
        if i < len(cfg.block_out_channels) - 1:
            h, w = h // 2, w // 2
            shapes.append((c, h, w))
    return shapes


def test_extra_branch_is_batched_and_residuals_follow_every_branch(pipe):
    shapes = []

    class Concept(Plugin):
        name = "concept"

        @hookimpl
        def diffsteer_guidance_branches(self, call, branches):
            branches.add("concept", call.encode_per_image(["red"]), owner=self.name)

        @hookimpl
        def diffsteer_guidance(self, call, step, predictions):
            return 0.5 * (predictions["concept"] - predictions["uncond"])

    class Residual(Plugin):
        name = "residual"

        @hookimpl
        def diffsteer_model_inputs(self, call, step, inputs):
            shapes.append(inputs.sample.shape[0])
            # a zero residual per down-block output, over every row of the batch
            downs = [torch.zeros(inputs.sample.shape[0], c, h, w) for c, h, w in call.state_for(self)["shapes"]]
            inputs.add_residuals(self.name, downs)

        @hookimpl
        def diffsteer_setup(self, call):
            call.state_for(self)["shapes"] = down_residual_shapes(call.unet.config, 16, 16)

    out = run(pipe, [Concept(), Residual()], num_inference_steps=2)
    assert shapes == [3, 3]  # uncond, cond, concept in one UNet call
    assert not torch.allclose(out, run(pipe, num_inference_steps=2))


def test_guidance_terms_sum_the_same_whatever_the_plugin_order(pipe):
    """The terms are summed in the order of the plugins' names: listing the plugins the other way round gives
    bit-identical latents (a different float rounding could flip a later threshold, such as SEGA's mask)."""

    def term_plugin(label: str, scale: float) -> Plugin:
        class Term(Plugin):
            name = label

            @hookimpl
            def diffsteer_guidance(self, call, step, predictions):
                return scale * (predictions["cond"] - predictions["uncond"]) + scale**2 * predictions["cond"]

        return Term()

    a, b, c = term_plugin("alpha", 0.37), term_plugin("beta", -0.213), term_plugin("gamma", 1.7e-3)
    forward = run(pipe, [a, b, c], output_type="latent")
    assert torch.equal(forward, run(pipe, [c, b, a], output_type="latent"))
    assert torch.equal(forward, run(pipe, [b, c, a], output_type="latent"))
    assert not torch.allclose(forward, run(pipe, [a, b], output_type="latent"))

    # A wrapper on the hook still sees every term (the terms then stay in list order).
    seen = []

    class Watch(Plugin):
        name = "watch"

        @hookimpl(wrapper=True)
        def diffsteer_guidance(self, call, step, predictions):
            terms = yield
            seen.append(len(terms))
            return terms

    run(pipe, [a, b, Watch()], output_type="latent")
    assert seen == [2, 2, 2]


def test_residual_with_wrong_rows_is_refused_naming_plugin(pipe):
    class Bad(Plugin):
        name = "bad-residual"

        @hookimpl
        def diffsteer_model_inputs(self, call, step, inputs):
            inputs.add_residuals(self.name, [torch.zeros(1, 32, 16, 16)])

    with pytest.raises(PluginError, match="'bad-residual'.*1 rows.*stacks 2 rows"):
        run(pipe, [Bad()])


def test_combine_guidance_replaces_cfg(pipe):
    class CondOnly(Plugin):
        name = "cond-only"

        @hookimpl
        def diffsteer_combine_guidance(self, call, step, predictions):
            return predictions["cond"]

    # same math; the CFG run batches two rows, whose CPU kernels round differently from one row
    assert torch.allclose(run(pipe, [CondOnly()]), run(pipe, guidance_scale=1.0), atol=1e-4)


def test_decode_hook_replaces_vae(pipe):
    class Grey(Plugin):
        name = "grey"

        @hookimpl
        def diffsteer_decode(self, call, latents):
            return torch.zeros(latents.shape[0], 3, 32, 32)

    img = run(pipe, [Grey()], output_type="np")
    assert img.shape == (1, 32, 32, 3) and (img == 0.5).all()


def test_nan_latents_get_a_clear_error(pipe):
    class Poison(Plugin):
        name = "poison"

        @hookimpl
        def diffsteer_post_step(self, call, step):
            step.latents = step.latents * float("nan")

    with pytest.raises(GenerationError, match="NaN or inf at step 0.*poison"):
        run(pipe, [Poison()])


def test_settings_errors_name_plugin_and_field():
    class Scaled(Plugin):
        name = "scaled"

        class Settings(BaseModel):
            model_config = ConfigDict(extra="forbid")
            scale: float = Field(1.0, ge=0)

    with pytest.raises(SettingsError, match=r"scaled\.scale: Input should be greater than or equal to 0"):
        Scaled(scale=-1)
    with pytest.raises(SettingsError, match=r"scaled\.sclae: Extra inputs are not permitted"):
        Scaled(sclae=2)
    assert Scaled(scale=2).settings.scale == 2


# -- entry points ----------------------------------------------------------------------------------


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A real distribution on sys.path with an entry point in group 'diffsteer'."""
    pkg = tmp_path / "diffsteer_shift"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from pydantic import BaseModel
            from diffsteer import Plugin, hookimpl
            LOADED = True

            class Shift(Plugin):
                name = "shift"
                class Settings(BaseModel):
                    amount: float = 0.0

                @hookimpl
                def diffsteer_prepare_latents(self, call, latents):
                    return latents + self.settings.amount
            """
        )
    )
    info = tmp_path / "diffsteer_shift-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: diffsteer-shift\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[diffsteer]\nshift = diffsteer_shift:Shift\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "shift"
    sys.modules.pop("diffsteer_shift", None)


def test_entry_point_plugins_load_only_when_named(pipe, installed_plugin):
    from diffsteer.plugins import installed_plugins

    assert "shift" in installed_plugins()
    run(pipe)
    assert "diffsteer_shift" not in sys.modules  # discovery imports nothing
    shifted = run(pipe, [("shift", {"amount": 0.5})], num_inference_steps=1)
    assert "diffsteer_shift" in sys.modules
    assert not torch.allclose(shifted, run(pipe, ["shift"], num_inference_steps=1))


def test_unknown_plugin_is_not_installed_error(pipe):
    with pytest.raises(PluginNotFoundError, match="'nonesuch' is not installed"):
        run(pipe, ["nonesuch"])


# -- meta-tests: the contract is documented and exercised ------------------------------------------------

SPECS = [name for name, obj in inspect.getmembers(hookspecs) if name.startswith("diffsteer_") and callable(obj)]


def test_every_hook_spec_is_documented():
    assert len(SPECS) >= 12
    for name in SPECS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        for section in ("When:", "Receives:", "May change:", "Returns:"):
            assert section in doc, f"{name} docstring lacks {section!r}"


def test_every_hook_spec_is_exercised_by_a_test():
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("*.py"))
    sources += "\n".join(p.read_text() for p in (ROOT / "plugins").rglob("tests/*.py"))
    missing = [n for n in SPECS if not re.search(rf"def {n}\(", sources)]
    assert not missing, f"hook specs no test implements: {missing}"


def test_hook_reference_is_generated_from_the_specs():
    from diffsteer.hookdoc import render

    doc = (ROOT / "docs" / "hooks.md").read_text()
    assert all(f"`{n}(" in doc for n in SPECS)
    assert doc == render(), "docs/hooks.md is stale: run `python -m diffsteer.hookdoc > docs/hooks.md`"


# -- plugin-author safety nets ----------------------------------------------------------------------------


def test_same_instance_twice_and_misspelt_hook_are_plugin_errors(pipe):
    rec = Recorder([])
    with pytest.raises(PluginError, match="'recorder': is listed twice"):
        run(pipe, [rec, rec])

    class Misspelt(Plugin):
        name = "misspelt"

        @hookimpl
        def diffsteer_pre_stpe(self, call, step):
            pass

    with pytest.raises(PluginError, match="'misspelt'.*diffsteer_pre_stpe"):
        run(pipe, [Misspelt()])


def test_plugins_report_extras_and_see_the_pass_layout(pipe):
    class Reporter(Plugin):
        name = "reporter"

        @hookimpl
        def diffsteer_attention_patches(self, call, register):
            def observe(layer, probs):
                rows = call.pass_layout.total
                call.outputs.setdefault(self.name, []).append((call.pass_name, rows, probs.shape[0]))

            register(AttentionPatch(self.name, "mid_block.*attn1", observe=observe))

        @hookimpl
        def diffsteer_guidance(self, call, step, predictions):
            call.predict(step.latents, step.timestep, call.layout.subset(["cond"]), pass_name="probe")

    out = pipe("a circle", num_inference_steps=1, seed=0, output_type="latent", plugins=[Reporter()])
    seen = out.extras["reporter"]
    assert ("main", 2, 2) in seen and ("probe", 1, 1) in seen


def test_mid_residual_alone_and_float32_residuals_on_bf16(tiny_sd1):
    bf16 = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim", torch_dtype=torch.bfloat16)

    class MidOnly(Plugin):
        name = "mid-only"

        @hookimpl
        def diffsteer_model_inputs(self, call, step, inputs):
            n, _, h, w = inputs.sample.shape
            inputs.add_residuals(self.name, mid=torch.ones(n, 64, h // 2, w // 2))  # float32 on purpose

    base = run(bf16)
    assert not torch.allclose(base, run(bf16, [MidOnly()]))


def test_eta_given_at_load_is_kept_unless_the_call_overrides(tiny_sd1):
    kw = dict(prompt="a circle", num_inference_steps=3, seed=0, output_type="latent")
    det = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim")(**kw).images
    noisy = Pipeline.from_pretrained(tiny_sd1, scheduler="ddim", eta=1.0)
    assert not torch.allclose(noisy(**kw).images, det)
    assert torch.allclose(noisy(eta=0.0, **kw).images, det)


def test_entry_point_name_must_match_plugin_name(pipe, tmp_path, monkeypatch):
    pkg = tmp_path / "diffsteer_alias"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from diffsteer import Plugin\nclass A(Plugin):\n    name = 'other'\n")
    info = tmp_path / "diffsteer_alias-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: diffsteer-alias\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[diffsteer]\nalias = diffsteer_alias:A\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="'alias'.*names a plugin called 'other'"):
        run(pipe, ["alias"])
