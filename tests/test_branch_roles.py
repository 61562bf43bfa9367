"""Branch roles that injectors read, and chained edits of a branch's embeddings."""

from __future__ import annotations

import pytest
import torch

from diffsteer import Plugin, PluginError, hookimpl
from diffsteer.branches import CONDITIONAL, EXTRA, UNCONDITIONAL, BranchLayout
from diffsteer.testing.doubles import run as shared_run


def run(pipe, plugins=(), **kw):
    return shared_run(pipe, plugins, **{"num_inference_steps": 1, **kw}).images


class ImageOnly(Plugin):
    """instruct-pix2pix's layout in miniature: an extra branch with the negative text (conditioned on an image)."""

    name = "image-only"

    @hookimpl
    def diffsteer_guidance_branches(self, call, branches):
        branches.add("image-only", branches["uncond"].embeddings, owner=self.name)


class Roles(Plugin):
    """An injector that records, per UNet pass, each branch's role and what it would condition."""

    name = "roles"

    def __init__(self):
        super().__init__()
        self.seen: list = []
        self.hidden: list = []

    @hookimpl
    def diffsteer_model_inputs(self, call, step, inputs):
        layout = inputs.layout
        self.seen.append({b.name: b.role for b in layout})
        self.hidden.append({b.name: inputs.encoder_hidden_states[layout.rows(b.name)].clone() for b in layout})


def test_core_and_plugin_branches_carry_roles(tiny_pipe):
    roles = Roles()
    run(tiny_pipe, [ImageOnly(), roles])
    assert roles.seen[0] == {"uncond": UNCONDITIONAL, "cond": CONDITIONAL, "image-only": EXTRA}
    without_cfg = Roles()
    run(tiny_pipe, [without_cfg], guidance_scale=1.0)
    assert without_cfg.seen[0] == {"cond": CONDITIONAL}


def test_layout_refuses_bad_branches_naming_the_plugin():
    layout = BranchLayout(2)
    layout.add("uncond", torch.zeros(2, 3, 4), role=UNCONDITIONAL)
    with pytest.raises(PluginError, match="'p': branch 'x' has role 'negative'; roles are unconditional"):
        layout.add("x", torch.zeros(2, 3, 4), owner="p", role="negative")
    with pytest.raises(PluginError, match="'p': branch 'uncond' already exists \\(added by 'core'\\)"):
        layout.add("uncond", torch.zeros(2, 3, 4), owner="p")
    with pytest.raises(PluginError, match="'p': branch 'y' has 1 rows"):
        layout.add("y", torch.zeros(1, 3, 4), owner="p")
    layout.add("c", torch.ones(2, 3, 4), role=CONDITIONAL)
    sub = layout.subset(["c"])
    assert sub["c"].role == CONDITIONAL and layout.with_role(UNCONDITIONAL) == ["uncond"]


def test_controlnet_guess_mode_reads_the_role_not_the_name(tiny_pipe):
    from diffsteer_controlnet import ControlNet
    from diffsteer_controlnet.model import ControlNetModel
    from diffsteer_controlnet.train import default_embedding_channels

    torch.manual_seed(0)
    net = ControlNetModel.from_unet(
        tiny_pipe.unet, conditioning_embedding_out_channels=default_embedding_channels(tiny_pipe.vae_scale_factor)
    )
    with torch.no_grad():
        for p in net.parameters():  # the zero convolutions would make every residual zero
            p.add_(torch.randn_like(p) * 0.05)
    captured = {}

    class Residuals(Plugin):
        name = "residuals"

        @hookimpl
        def diffsteer_model_inputs(self, call, step, inputs):
            first = inputs.down_residuals[0]
            captured.update({n: first[inputs.layout.rows(n)].abs().max().item() for n in inputs.layout.names})

    size = tiny_pipe.default_size
    control = ControlNet(image=torch.rand(3, size, size), controlnet=net, guess_mode=True)
    run(tiny_pipe, [ImageOnly(), control, Residuals()])
    # the image-only branch is text-unconditional but not the unconditional branch: it gets the control
    assert captured["uncond"] == 0.0 and captured["cond"] > 0 and captured["image-only"] > 0


class Direction(Plugin):
    """pix2pix-zero's edit in miniature: add a direction to the conditional branch's embeddings."""

    name = "direction"

    def __init__(self, offset=0.0, factor=1.0):
        super().__init__()
        self.offset, self.factor = offset, factor
        self.received: list = []

    @hookimpl
    def diffsteer_edit_embeddings(self, call, branch, embeddings):
        self.received.append(branch.name)
        if branch.role != CONDITIONAL:
            return None
        return embeddings * self.factor + self.offset


def test_embedding_edits_chain_in_list_order_on_the_conditional_branch(tiny_pipe):
    base = Roles()
    run(tiny_pipe, [base])
    cond, uncond = base.hidden[0]["cond"], base.hidden[0]["uncond"]

    first, second, roles = Direction(offset=1.0), Direction(factor=2.0), Roles()
    out = run(tiny_pipe, [first, second, roles])
    assert first.received == ["uncond", "cond"]  # every branch, in layout order
    assert torch.allclose(roles.hidden[0]["cond"], (cond + 1) * 2)
    assert torch.equal(roles.hidden[0]["uncond"], uncond)
    swapped = Roles()
    run(tiny_pipe, [Direction(factor=2.0), Direction(offset=1.0), swapped])
    assert torch.allclose(swapped.hidden[0]["cond"], cond * 2 + 1)
    assert not torch.allclose(out, run(tiny_pipe))


def test_an_embedding_edit_stacks_with_prompt_weighting(tiny_pipe):
    from diffsteer_prompt_weighting import PromptWeighting

    weighted = Roles()
    run(tiny_pipe, [PromptWeighting(), weighted], prompt="a (red)1.4 circle")
    both = Roles()
    run(tiny_pipe, [PromptWeighting(), Direction(offset=0.5), both], prompt="a (red)1.4 circle")
    assert torch.allclose(both.hidden[0]["cond"], weighted.hidden[0]["cond"] + 0.5)
    plain = Roles()
    run(tiny_pipe, [plain], prompt="a (red)1.4 circle")
    assert not torch.allclose(weighted.hidden[0]["cond"], plain.hidden[0]["cond"])  # the weighting acted


def test_an_edit_of_another_shape_is_refused_naming_the_plugin(tiny_pipe):
    class Truncate(Plugin):
        name = "truncate"

        @hookimpl
        def diffsteer_edit_embeddings(self, call, branch, embeddings):
            return embeddings[:, :10]

    with pytest.raises(PluginError, match=r"'truncate': edited embeddings of branch 'uncond' are \(1, 10, 32\)"):
        run(tiny_pipe, [Truncate()])
