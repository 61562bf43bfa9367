"""Gradients through the UNet: a hook runs a differentiable pass inside ``call.gradients()``."""

from __future__ import annotations

import torch

from diffsteer import AttentionPatch, Plugin, hookimpl
from diffsteer.testing.doubles import run as shared_run


def run(pipe, plugins=(), **kw):
    return shared_run(pipe, plugins, **{"num_inference_steps": 2, **kw}).images


class Excite(Plugin):
    """attend-and-excite in miniature: a gradient step on the latents that raises one token's cross-attention."""

    name = "excite"

    def __init__(self, token=2, step_size=20.0):
        super().__init__()
        self.token, self.step_size = token, step_size
        self.log: list = []

    @hookimpl
    def diffsteer_attention_patches(self, call, register):
        def observe(layer, probs):
            if call.pass_name == self.name:
                call.state_for(self).setdefault("maps", []).append(probs[..., self.token])

        register(AttentionPatch(self.name, "*attn2", observe=observe))

    def loss(self, call, latents, timestep):
        state = call.state_for(self)
        state["maps"] = []
        preds = call.predict(latents, timestep, call.layout.subset(["cond"]), pass_name=self.name)
        attention = torch.stack([m.mean() for m in state["maps"]]).mean()
        return -attention, preds

    @hookimpl
    def diffsteer_pre_step(self, call, step):
        with call.gradients():
            x = step.latents.detach().requires_grad_(True)
            loss, preds = self.loss(call, x, step.timestep)
            (grad,) = torch.autograd.grad(loss, x)
        self.log.append({"grad": grad, "x": x.detach(), "t": step.timestep, "pred_grad": preds["cond"].requires_grad})
        step.latents = step.latents - self.step_size * grad


def test_a_gradient_step_on_attention_changes_the_image_and_matches_finite_differences(tiny_pipe):
    excite = Excite()
    out = run(tiny_pipe, [excite])
    assert not torch.allclose(out, run(tiny_pipe))
    first = excite.log[0]
    grad = first["grad"]
    assert first["pred_grad"] and torch.isfinite(grad).all() and float(grad.abs().max()) > 0

    # the gradient is the derivative of the attention loss: check it along one direction
    captured = {}
    observer = Excite(step_size=0.0)  # its patch records the maps of the probe's passes

    class Probe(Plugin):
        name = "probe"

        @hookimpl
        def diffsteer_pre_step(self, call, step):
            if step.index:
                return
            direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(1))
            eps = 1e-2
            with torch.no_grad():
                plus, _ = observer.loss(call, first["x"] + eps * direction, first["t"])
                minus, _ = observer.loss(call, first["x"] - eps * direction, first["t"])
            captured["fd"] = float((plus - minus) / (2 * eps))
            captured["ad"] = float((grad * direction).sum())

    run(tiny_pipe, [observer, Probe()], num_inference_steps=1)
    print("directional derivative: autograd", captured["ad"], "finite differences", captured["fd"])
    assert abs(captured["ad"] - captured["fd"]) <= 0.02 * abs(captured["fd"]) + 1e-6


class Injector(Plugin):
    """A stand-in for ControlNet: a small network whose residual follows every pass."""

    name = "injector"

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Conv2d(4, 64, 1)  # trainable as far as it knows
        self.residual_grads: list = []

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        n, _, h, w = inputs.sample.shape
        mid = torch.nn.functional.avg_pool2d(self.net(inputs.sample.float()), 2)
        self.residual_grads.append((inputs.pass_name, mid.requires_grad))
        inputs.add_residuals(self.name, mid=mid)


def test_gradient_passes_build_no_graph_through_models_or_injectors(tiny_pipe):
    injector = Injector()
    excite = Excite()
    run(tiny_pipe, [injector, excite])
    # the conditioning of a gradient pass is a constant of it: no graph through the injector's network
    assert ("excite", False) in injector.residual_grads
    assert all(not needs for _, needs in injector.residual_grads)
    assert all(p.grad is None for p in injector.net.parameters())
    assert all(p.grad is None and not p.requires_grad for p in tiny_pipe.unet.parameters())
    assert float(excite.log[0]["grad"].abs().max()) > 0


def test_outside_call_gradients_no_pass_tracks_gradients(tiny_pipe):
    seen = {}

    class Look(Plugin):
        name = "look"

        @hookimpl
        def diffsteer_noise_prediction(self, call, step, predictions):
            seen["grad_mode"] = torch.is_grad_enabled()
            seen["requires_grad"] = predictions["cond"].requires_grad

    run(tiny_pipe, [Look()], num_inference_steps=1)
    assert seen == {"grad_mode": False, "requires_grad": False}
