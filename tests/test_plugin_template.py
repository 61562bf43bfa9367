"""One template for plugins: every shipped plugin, and what `diffsteer new-plugin` writes, has the same shape.

The shape (docs/plugin-authors.md, "Packaging"): a ``src/`` layout with ``py.typed`` and a README; one
``pyproject.toml`` template (entry-point group ``diffsteer``, ``requires-python``, license, a dependency on
diffsteer, a ``test`` extra on ``diffsteer[test]``); hook methods typed exactly as their specs; settings
models that forbid unknown fields; a declared hook contract.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
import pkgutil
import sys
import tomllib
import typing
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel

from diffsteer import hookspecs
from diffsteer.errors import GenerationError
from diffsteer.hookdoc import hook_names
from diffsteer.plugins import NoSettings, Plugin
from diffsteer.scaffold import new_plugin

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["controlnet", "prompt-weighting", "sag", "sega", "textual-inversion"]
SPECS = hook_names()


def package(name: str) -> str:
    return "diffsteer_" + name.replace("-", "_")


def type_namespace() -> dict:
    """The names the specs' string annotations use (imported there only for type checkers)."""
    import torch

    from diffsteer.attention_patches import AttentionPatch
    from diffsteer.branches import Branch, BranchLayout, BranchPredictions
    from diffsteer.call import GenerationCall, StepState, UNetInputs
    from diffsteer.commands import TrainCommand
    from diffsteer.overrides import WeightOverrides
    from diffsteer.training import DiffusionTrainer, ParamGroup, TrainBatch, TrainOutputs
    from diffsteer.views import ViewPlan

    return {**vars(typing), "torch": torch, "Path": Path, **{c.__name__: c for c in (
        AttentionPatch, Branch, BranchLayout, BranchPredictions, GenerationCall, StepState, UNetInputs,
        TrainCommand, WeightOverrides, DiffusionTrainer, ParamGroup, TrainOutputs, ViewPlan)}, "TrainBatch": TrainBatch}


def hints(fn: object, module: ModuleType) -> dict:
    """``fn``'s annotations resolved against its module and the specs' typing-only names."""
    return typing.get_type_hints(fn, globalns={**type_namespace(), **vars(module)})


def accepts(impl: object, spec: object) -> bool:
    """An implementation's parameter type accepts what the spec passes: the same type, or a union holding it."""
    return impl == spec or (typing.get_origin(impl) in (typing.Union, getattr(__import__("types"), "UnionType"))
                            and spec in typing.get_args(impl))


def returns_within(impl: object, spec: object) -> bool:
    """An implementation returns the spec's type, or one arm of the spec's ``Optional``/union."""
    return impl == spec or (typing.get_origin(spec) is typing.Union and impl in typing.get_args(spec))


def plugin_classes(pkg: str) -> list[type[Plugin]]:
    """Every Plugin subclass defined in the package ``pkg`` (the user-facing one and any training plugin)."""
    root = importlib.import_module(pkg)
    modules = [root] + [importlib.import_module(m.name) for m in pkgutil.walk_packages(root.__path__, pkg + ".")]
    found = {c for m in modules for c in vars(m).values()
             if inspect.isclass(c) and issubclass(c, Plugin) and c.__module__.startswith(pkg)}
    return sorted(found, key=lambda c: c.__qualname__)


def check_layout(folder: Path, name: str) -> None:
    pkg = package(name)
    src = folder / "src" / pkg
    assert (src / "__init__.py").is_file(), f"{name}: the package belongs in src/{pkg}/"
    assert (src / "py.typed").is_file(), f"{name}: src/{pkg}/py.typed marks the package as typed (PEP 561)"
    assert not (folder / pkg).exists(), f"{name}: a package beside src/ would shadow the installed one"
    readme = (folder / "README.md").read_text()
    assert readme.startswith(f"# diffsteer-{name}\n"), f"{name}: README.md starts with '# diffsteer-{name}'"


def check_pyproject(folder: Path, name: str, cls: str) -> None:
    meta = tomllib.loads((folder / "pyproject.toml").read_text())
    project, pkg = meta["project"], package(name)
    assert project["name"] == f"diffsteer-{name}"
    assert project["readme"] == "README.md" and project["requires-python"] == ">=3.10"
    assert project["license"] == {"text": "Apache-2.0"}
    assert any(d.split(">")[0].split("=")[0].strip() == "diffsteer" for d in project["dependencies"]), \
        f"{name}: depends on diffsteer"
    assert "diffsteer[test]" in project["optional-dependencies"]["test"]
    assert project["entry-points"] == {"diffsteer": {name: f"{pkg}:{cls}"}}
    setuptools = meta["tool"]["setuptools"]
    assert setuptools["packages"] == {"find": {"where": ["src"]}}
    assert "py.typed" in setuptools["package-data"][pkg], f"{name}: py.typed must ship in the wheel"


def check_hooks_typed(plugin: type[Plugin]) -> None:
    module = sys.modules[plugin.__module__]
    hooks = [n for n in SPECS if callable(getattr(plugin, n, None))]
    assert hooks, f"{plugin.__qualname__} implements no hook"
    for hook in hooks:
        impl = getattr(plugin, hook)
        spec = getattr(hookspecs, hook)
        where = f"{plugin.__qualname__}.{hook}"
        params = [p for p in inspect.signature(impl).parameters if p != "self"]
        spec_hints, impl_hints = hints(spec, hookspecs), hints(impl, module)
        assert set(params) <= set(inspect.signature(spec).parameters), f"{where}: arguments the spec lacks"
        for p in params:
            assert p in impl_hints, f"{where}: argument {p!r} has no annotation"
            assert accepts(impl_hints[p], spec_hints[p]), \
                f"{where}: {p}: {impl_hints[p]} does not accept the spec's {spec_hints[p]}"
        assert "return" in impl_hints, f"{where}: no return annotation"
        assert returns_within(impl_hints["return"], spec_hints["return"]), \
            f"{where}: returns {impl_hints['return']}, the spec {spec_hints['return']}"


def check_state_typed(folder: Path) -> None:
    """Per-call state is a dataclass (``call.state_for(self, MyCallState)``), never a bare dict of string keys."""
    for source in (folder / "src").rglob("*.py"):
        assert "state_for(self)" not in source.read_text(), f"{source}: call.state_for(self) without a state class"


def check_settings(plugin: type[Plugin]) -> None:
    assert issubclass(plugin.Settings, BaseModel)
    if plugin.Settings is not NoSettings:
        assert plugin.Settings.model_config.get("extra") == "forbid", \
            f"{plugin.__qualname__}.Settings must forbid unknown fields, so a typo is an error, not a default"
    assert plugin.contract == hookspecs.CONTRACT_VERSION or plugin.contract in hookspecs.CONTRACT_HISTORY


def test_the_shipped_plugins_are_the_five_folders():
    assert sorted(p.parent.name for p in (ROOT / "plugins").glob("*/pyproject.toml")) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_plugin_follows_the_template(name):
    folder = ROOT / "plugins" / name
    (ep,) = [e for e in md.entry_points(group="diffsteer") if e.name == name]
    cls = ep.load()
    check_layout(folder, name)
    check_pyproject(folder, name, cls.__name__)
    check_state_typed(folder)
    # The entry point resolves to this checkout's src/ (an editable install), to the class that bears its name.
    assert Path(inspect.getfile(cls)).resolve().is_relative_to(folder / "src")
    assert issubclass(cls, Plugin) and cls.name == name
    for plugin in plugin_classes(package(name)):
        check_hooks_typed(plugin)
        check_settings(plugin)


def test_scaffolded_plugin_follows_the_template(tmp_path, monkeypatch):
    folder = new_plugin("tmpl-check", tmp_path)
    check_layout(folder, "tmpl-check")
    check_pyproject(folder, "tmpl-check", "TmplCheck")
    check_state_typed(folder)
    monkeypatch.syspath_prepend(str(folder / "src"))
    module = importlib.import_module("diffsteer_tmpl_check")
    check_hooks_typed(module.TmplCheck)
    check_settings(module.TmplCheck)


@pytest.mark.parametrize("hook", SPECS)
def test_hook_spec_is_typed_and_versioned(hook):
    """Each spec resolves its annotations (the check above compares against them) and names its version."""
    spec = getattr(hookspecs, hook)
    spec_hints = hints(spec, hookspecs)
    assert set(spec_hints) == set(inspect.signature(spec).parameters) | {"return"}, f"{hook}: unannotated"
    assert getattr(spec, "diffsteer_since", None) in hookspecs.CONTRACT_HISTORY


@pytest.mark.parametrize("hook", SPECS)
def test_a_misspelt_argument_of_hook_is_refused(hook):
    """The typed template leaves no room for a typo: an argument no spec has fails at registration."""
    from diffsteer import PluginError, hookimpl
    from diffsteer.plugins import make_manager

    class Typo(Plugin):
        name = "typo"

    def impl(self, calll):  # noqa: ARG001 - the misspelling is the point
        return None

    impl.__name__ = hook
    setattr(Typo, hook, hookimpl(impl))
    with pytest.raises(PluginError, match="typo"):
        make_manager([Typo()])


def test_token_count_mismatch_raises_what_the_spec_says(tiny_pipe):
    """diffsteer_encode_prompt: encodings of different token counts end the call with a GenerationError."""
    import torch

    from diffsteer import hookimpl

    class LongNegative(Plugin):
        name = "long-negative"

        @hookimpl
        def diffsteer_encode_prompt(self, call, texts):
            rows = call.text.encode(texts)
            return torch.cat([rows, rows], dim=1) if texts == [""] else rows

    with pytest.raises(GenerationError, match="pad both alike"):
        tiny_pipe("a red circle", num_inference_steps=1, seed=0, output_type="latent", plugins=[LongNegative()])


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(seed=1, generator="torch.Generator()"), "generator"),
        (dict(latents="torch.zeros(1, 4, 16, 16)", image="torch.rand(1, 3, 32, 32)"), "latents"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(latents="torch.zeros(1, 4, 8, 8)"), "latents"),
        (dict(image="torch.rand(2, 3, 32, 32)", num_images_per_prompt=3, strength=1.0), "image"),
        (dict(image="torch.rand(1, 3, 32, 32)", strength=0.5), "strength"),  # no step left of 1
    ],
)
def test_bad_call_arguments_raise_request_errors_naming_the_argument(tiny_pipe, kwargs, argument):
    import torch

    from diffsteer.errors import RequestError

    args = {k: eval(v, {"torch": torch}) if isinstance(v, str) and v.startswith("torch.") else v
            for k, v in kwargs.items()}
    with pytest.raises(RequestError) as info:
        tiny_pipe("a circle", num_inference_steps=1, output_type=args.pop("output_type", "latent"), **args)
    assert info.value.argument == argument and str(info.value).startswith(argument)


def test_plugin_checks_name_their_plugin(tiny_pipe):
    from diffsteer import PluginError
    from diffsteer_prompt_weighting import WeightedPromptEncoder

    with pytest.raises(PluginError, match="^plugin 'prompt-weighting': syntax must be"):
        WeightedPromptEncoder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, syntax="markdown")
    encoder = WeightedPromptEncoder(tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    with pytest.raises(PluginError, match="^plugin 'prompt-weighting': .* chunks, more than the 1 allowed"):
        encoder.encode([" ".join(["red circle"] * 60)], chunks=1)


def test_typed_call_state_is_made_once_per_call_and_kept_apart(tiny_pipe):
    """``call.state_for(plugin, Factory)``: one object per plugin and call, fresh in the next call."""
    from dataclasses import dataclass, field

    from diffsteer import PluginError, hookimpl

    @dataclass
    class Seen:
        steps: list[int] = field(default_factory=list)

    @dataclass
    class Other:
        pass

    class Counter(Plugin):
        name = "counter"

        def __init__(self, log: list, **kw: object) -> None:
            super().__init__(**kw)
            self.log = log

        @hookimpl
        def diffsteer_pre_step(self, call: "GenerationCall", step: "StepState") -> None:
            call.state_for(self, Seen).steps.append(step.index)

        @hookimpl
        def diffsteer_teardown(self, call: "GenerationCall", error: "Optional[BaseException]") -> None:
            self.log.append(call.state_for(self, Seen).steps)

    class Mixed(Counter):
        @hookimpl
        def diffsteer_post_step(self, call: "GenerationCall", step: "StepState") -> None:
            call.state_for(self, Other)

    log: list = []
    counter = Counter(log)
    tiny_pipe("a circle", num_inference_steps=3, seed=0, output_type="latent", plugins=[counter])
    tiny_pipe("a circle", num_inference_steps=2, seed=0, output_type="latent", plugins=[counter])
    assert log == [[0, 1, 2], [0, 1]]
    with pytest.raises(PluginError, match="'counter'.*as Other, but it is a Seen"):
        tiny_pipe("a circle", num_inference_steps=1, seed=0, output_type="latent", plugins=[Mixed([])])
