"""pluggy hygiene: wrappers on chained and exclusive hooks, and one list of exclusive hooks (the firstresult specs)."""

from __future__ import annotations

import pytest
import torch

from diffsteer import Plugin, PluginConflictError, PluginError, hookimpl, hookspecs
from diffsteer.plugins import exclusive_hooks
from diffsteer.testing.doubles import run as shared_run


def run(pipe, plugins=(), **kw):
    return shared_run(pipe, plugins, **{"num_inference_steps": 1, **kw}).images


class AddOne(Plugin):
    name = "add-one"

    @hookimpl
    def diffsteer_prepare_latents(self, call, latents):
        return latents + 1


class Capture(Plugin):
    """Records the latents the first step starts from."""

    name = "capture"

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    @hookimpl
    def diffsteer_pre_step(self, call, step):
        if step.index == 0:
            self.seen.append(step.latents.clone())


class HalveAround(Plugin):
    """A new-style wrapper around the latents chain: sees the value in, replaces the value out."""

    name = "halve-around"

    def __init__(self, log):
        super().__init__()
        self.log = log

    @hookimpl(wrapper=True)
    def diffsteer_prepare_latents(self, call, latents):
        self.log.append(("in", float(latents.mean())))
        result = yield
        self.log.append(("out", float(result.mean())))
        return result / 2


class OldStyleZero(Plugin):
    name = "old-style-zero"

    @hookimpl(hookwrapper=True)
    def diffsteer_prepare_latents(self, call, latents):
        outcome = yield
        outcome.force_result(torch.zeros_like(outcome.get_result()))


def test_new_style_wrapper_wraps_the_whole_chain_in_any_list_position(tiny_pipe):
    seen: list[torch.Tensor] = []
    plain = run(tiny_pipe, [Capture(seen)])
    start = seen.pop()
    for order in ("wrapper-last", "wrapper-first"):
        log: list = []
        wrapper = HalveAround(log)
        plugins = [AddOne(), wrapper, Capture(seen)] if order == "wrapper-last" else [wrapper, AddOne(), Capture(seen)]
        run(tiny_pipe, plugins)
        got = seen.pop()
        # the wrapper saw the core's latents going in, AddOne's result coming out, and halved it
        assert log[0] == ("in", pytest.approx(float(start.mean()), abs=1e-6))
        assert log[1] == ("out", pytest.approx(float(start.mean()) + 1, abs=1e-5))
        assert torch.allclose(got, (start + 1) / 2, atol=1e-6), order
    assert plain.shape == got.shape


def test_old_style_hookwrapper_can_force_the_chain_result(tiny_pipe):
    seen: list[torch.Tensor] = []
    run(tiny_pipe, [AddOne(), OldStyleZero(), Capture(seen)])
    assert torch.count_nonzero(seen[0]) == 0


def test_wrapper_that_does_not_yield_is_a_plugin_error(tiny_pipe):
    class NotAGenerator(Plugin):
        name = "not-a-generator"

        @hookimpl(wrapper=True)
        def diffsteer_prepare_latents(self, call, latents):
            return latents

    class NoYield(Plugin):
        name = "no-yield"

        @hookimpl(wrapper=True)
        def diffsteer_prepare_latents(self, call, latents):
            if latents is None:
                yield

    with pytest.raises(PluginError, match="(?s)'not-a-generator'.*not a generator function"):
        run(tiny_pipe, [NotAGenerator()])
    with pytest.raises(PluginError, match="'no-yield'.*must be a generator that yields once"):
        run(tiny_pipe, [NoYield()])


class CondOnly(Plugin):
    name = "cond-only"

    @hookimpl
    def diffsteer_combine_guidance(self, call, step, predictions):
        return predictions["cond"]


class CountingWrapper(Plugin):
    """Wraps an exclusive hook without replacing anything: never a conflict."""

    name = "counting-wrapper"

    def __init__(self):
        super().__init__()
        self.results: list = []

    @hookimpl(wrapper=True)
    def diffsteer_combine_guidance(self, call, step, predictions):
        result = yield
        self.results.append(result is None)
        return result


def test_wrappers_on_exclusive_hooks_never_conflict(tiny_pipe):
    counting = CountingWrapper()
    out = run(tiny_pipe, [CondOnly(), counting, CountingWrapper()])
    assert counting.results == [False]  # it wrapped cond-only's replacement
    assert torch.equal(out, run(tiny_pipe, [CondOnly()]))
    alone = CountingWrapper()
    run(tiny_pipe, [alone])
    assert alone.results == [True]  # no replacement: the core's formula follows

    class Other(CondOnly):
        name = "other"

    with pytest.raises(PluginConflictError, match="'cond-only' and 'other'.*guidance formula"):
        run(tiny_pipe, [CondOnly(), counting, Other()])


def test_exclusive_hooks_are_exactly_the_firstresult_specs():
    firstresult = sorted(
        n for n, f in vars(hookspecs).items()
        if n.startswith("diffsteer_") and (getattr(f, "diffsteer_spec", None) or {}).get("firstresult")
    )
    assert sorted(exclusive_hooks()) == firstresult
    assert firstresult == ["diffsteer_combine_guidance", "diffsteer_decode", "diffsteer_encode_prompt",
                           "diffsteer_plan_views"]
    assert not hasattr(hookspecs, "EXCLUSIVE_HOOKS")  # one list, not two
