"""The hook contract version: plugins declare the version they need; the core refuses one it cannot serve."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from diffsteer import Plugin, hookimpl, hookspecs
from diffsteer.errors import PluginContractError, PluginError
from diffsteer.hookdoc import hook_names
from diffsteer.plugins import load_plugin_class, make_manager

ROOT = Path(__file__).resolve().parents[1]


def plugin_for(version: str) -> Plugin:
    class Versioned(Plugin):
        name = f"needs-{version}"
        contract = version

        @hookimpl
        def diffsteer_setup(self, call):
            call.state_for(self)["ran"] = True

    return Versioned()


def core_major_minor() -> tuple[int, int]:
    major, minor = hookspecs.CONTRACT_VERSION.split(".")
    return int(major), int(minor)


def test_plugins_of_this_major_up_to_this_minor_run(tiny_pipe):
    major, minor = core_major_minor()
    plugins = [plugin_for(f"{major}.{m}") for m in range(minor + 1)]
    tiny_pipe("a circle", num_inference_steps=1, seed=0, output_type="latent", plugins=plugins)
    assert Plugin.contract == "1.0"  # a plugin that declares nothing was written for the first contract


@pytest.mark.parametrize("kind", ["newer minor", "newer major", "older major"])
def test_an_incompatible_plugin_is_refused_naming_it(tiny_pipe, kind):
    major, minor = core_major_minor()
    version = {"newer minor": f"{major}.{minor + 1}", "newer major": f"{major + 1}.0", "older major": f"{major - 1}.9"}[kind]
    with pytest.raises(PluginContractError, match=rf"'needs-{version}': was written for hook contract {version}, "
                                                 rf"but this diffsteer serves contracts {major}\.0 to {major}\.{minor}"):
        tiny_pipe("a circle", num_inference_steps=1, output_type="latent", plugins=[plugin_for(version)])
    # training runs build their plugin set the same way
    with pytest.raises(PluginContractError, match="upgrade diffsteer" if kind != "older major" else "written for contract"):
        make_manager([plugin_for(version)])


def test_a_malformed_version_is_refused():
    with pytest.raises(PluginContractError, match="'needs-v1': declares contract 'v1'; it must be 'MAJOR.MINOR'"):
        make_manager([plugin_for("v1")])
    assert issubclass(PluginContractError, PluginError)


def test_an_entry_point_plugin_is_checked_when_loaded(tmp_path, monkeypatch):
    pkg = tmp_path / "diffsteer_future"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(
        """
        from diffsteer import Plugin
        class Future(Plugin):
            name = "future"
            contract = "99.0"
        """
    ))
    info = tmp_path / "diffsteer_future-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: diffsteer-future\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[diffsteer]\nfuture = diffsteer_future:Future\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(PluginContractError, match="'future': was written for hook contract 99.0"):
            load_plugin_class("future")
    finally:
        sys.modules.pop("diffsteer_future", None)


def test_every_hook_says_which_version_added_it_and_the_reference_prints_it():
    doc = (ROOT / "docs" / "hooks.md").read_text()
    for name in hook_names():
        since = getattr(getattr(hookspecs, name), "diffsteer_since", None)
        assert since in hookspecs.CONTRACT_HISTORY, f"{name} lacks @since(...)"
        section = doc.split(f"## `{name}(", 1)[1]
        assert section.split("\n", 3)[2] == f"*Since contract {since}.*"
    assert max(hookspecs.CONTRACT_HISTORY, key=lambda v: tuple(map(int, v.split(".")))) == hookspecs.CONTRACT_VERSION
    for version in hookspecs.CONTRACT_HISTORY:
        assert f"- **{version}**:" in doc


def test_shipped_plugins_declare_the_contract_they_use():
    from diffsteer_controlnet import ControlNet
    from diffsteer_prompt_weighting import PromptWeighting
    from diffsteer_sag import Sag
    from diffsteer_sega import Sega
    from diffsteer_textual_inversion import TextualInversion

    for cls in (ControlNet, PromptWeighting, Sag, Sega, TextualInversion):
        assert "contract" in vars(cls), f"{cls.__name__} declares no contract version"
        make_manager([cls.__new__(cls)])  # accepted by this core
