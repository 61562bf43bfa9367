"""``diffsteer new-plugin NAME``: a ready-to-install plugin package to start from."""

from __future__ import annotations

import keyword
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import PluginError
from .hookspecs import CONTRACT_VERSION

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))


def _files(name: str) -> dict[str, str]:
    pkg = "diffsteer_" + name.replace("-", "_")
    cls = _class_name(name)
    return {
        "pyproject.toml": f'''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "diffsteer-{name}"
version = "0.1.0"
description = "diffsteer plugin: {name}"
readme = "README.md"
requires-python = ">=3.10"
license = {{ text = "Apache-2.0" }}
# The core brings torch and pydantic; the plugin declares the hook contract it needs in its `contract`.
dependencies = ["diffsteer>=0.1"]

[project.optional-dependencies]
test = ["diffsteer[test]"]

# diffsteer finds plugins through this group; the name is what users write in plugins=[...].
[project.entry-points.diffsteer]
{name} = "{pkg}:{cls}"

[tool.setuptools.packages.find]
where = ["src"]

[tool.setuptools.package-data]
{pkg} = ["py.typed"]
''',
        "README.md": f'''# diffsteer-{name}

What the technique does, and the paper it comes from. Settings and an example: [docs/{name}.md](docs/{name}.md).

```bash
pip install -e ".[test]" && python -m pytest -q tests
```
''',
        f"src/{pkg}/py.typed": "",
        f"src/{pkg}/__init__.py": f'''"""diffsteer plugin `{name}`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from diffsteer import Plugin, hookimpl

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffsteer import BranchPredictions, GenerationCall, StepState


@dataclass
class {cls}CallState:
    """What the plugin keeps for one call: one plugin object may serve concurrent calls, so never ``self.x``."""

    steps: int = 0  # guidance steps applied so far


class {cls}(Plugin):
    """Multiplies the guidance direction (cond - uncond) by ``strength``: a placeholder technique."""

    name = "{name}"
    # The hook contract version this plugin is written for (docs/hooks.md, "Contract versions").
    contract = "{CONTRACT_VERSION}"

    class Settings(BaseModel):
        # Unknown fields are errors, so a typo never silently becomes a default.
        model_config = ConfigDict(extra="forbid")

        strength: float = Field(1.0, gt=0, description="factor on the guidance direction")

    # Hook arguments are annotated exactly as the specs in diffsteer.hookspecs (docs/hooks.md).
    @hookimpl
    def diffsteer_guidance(
        self, call: "GenerationCall", step: "StepState", predictions: "BranchPredictions"
    ) -> Optional[torch.Tensor]:
        # Additive terms from all plugins are summed onto uncond + scale * (cond - uncond).
        if "uncond" not in predictions:
            return None
        call.state_for(self, {cls}CallState).steps += 1
        direction = predictions["cond"] - predictions["uncond"]
        return (self.settings.strength - 1.0) * call.request.guidance_scale * direction
''',
        f"tests/test_{name.replace('-', '_')}.py": f'''"""Tests of the `{name}` plugin; fixtures (tiny_pipe, shapes_pipe, ...) come from diffsteer.testing."""

import pytest

from diffsteer import SettingsError
from {pkg} import {cls}


def test_strength_one_changes_nothing_and_two_changes_the_image(tiny_pipe):
    kw = dict(prompt="a red circle", num_inference_steps=2, seed=0, output_type="latent")
    base = tiny_pipe(**kw).images
    assert (tiny_pipe(plugins=[{cls}(strength=1.0)], **kw).images - base).abs().max() < 1e-5
    assert (tiny_pipe(plugins=[{cls}(strength=2.0)], **kw).images - base).abs().max() > 1e-3


def test_bad_settings_name_the_field():
    with pytest.raises(SettingsError, match="{name}.strength"):
        {cls}(strength=-1)
''',
        f"docs/{name}.md": f'''# {name}

What the technique does, and the paper it comes from.

| setting | default | meaning |
|---|---|---|
| `strength` | 1.0 | factor on the guidance direction |

```python
from diffsteer import Pipeline
from {pkg} import {cls}

pipe = Pipeline.from_pretrained("shapes")
image = pipe("a red circle", num_inference_steps=20, seed=0, plugins=[{cls}(strength=1.0)]).images[0]
```
''',
    }


def new_plugin(name: str, directory: os.PathLike | str = ".") -> Path:
    """Write the package ``diffsteer-NAME`` into ``directory/NAME``, in the template the shipped plugins follow
    (``src/`` layout, ``py.typed``, README, typed hooks); refuses to overwrite anything with a
    :class:`~diffsteer.errors.PluginError` naming the plugin."""
    if not _NAME.match(name) or keyword.iskeyword(name.replace("-", "_")):
        raise PluginError(name, "a plugin name must be lower-case words joined by '-', e.g. 'my-guidance'")
    target = Path(directory) / name
    if target.exists():
        raise PluginError(name, f"{target} already exists; choose another directory or name")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        for rel, text in _files(name).items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
