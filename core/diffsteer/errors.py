"""Errors the core raises on bad input: each names the plugin, field or file at fault and says why."""

from __future__ import annotations


class DiffsteerError(Exception):
    """Base class of diffsteer's own errors."""


class PluginError(DiffsteerError, ValueError):
    """A plugin cannot serve this model or request; the message starts with the plugin's name."""

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r}: {message}")


class PluginContractError(PluginError):
    """A plugin was written for a hook contract version this core does not serve."""


class PluginConflictError(DiffsteerError, ValueError):
    """Two plugins of one call claim the same exclusive place."""

    def __init__(self, place: str, first: str, second: str) -> None:
        self.place, self.plugins = place, (first, second)
        super().__init__(
            f"plugins {first!r} and {second!r} both replace {place}; only one plugin per call may do that"
        )


class PluginNotFoundError(DiffsteerError, LookupError):
    """A plugin was named that no installed distribution provides."""

    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        have = ", ".join(sorted(available)) or "none"
        super().__init__(
            f"plugin {name!r} is not installed (installed plugins: {have}); "
            f"install its distribution, e.g. `pip install diffsteer-{name}`"
        )


class SettingsError(DiffsteerError, ValueError):
    """A plugin setting failed validation; lists each bad field with the reason."""

    def __init__(self, plugin: str, problems: list[tuple[str, str]]) -> None:
        self.plugin, self.problems = plugin, problems
        lines = "; ".join(f"{plugin}.{field}: {reason}" for field, reason in problems)
        super().__init__(f"invalid settings for plugin {plugin!r}: {lines}")


class GenerationError(DiffsteerError, RuntimeError):
    """The denoising loop produced an unusable state (NaN or inf latents, a shape mismatch)."""


class RequestError(DiffsteerError, ValueError):
    """A generation argument has the wrong type or an impossible value; the message starts with its name."""

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        super().__init__(f"{argument} {message}")


class InputFileError(DiffsteerError, ValueError):
    """A file a generation reads (a control image, an embedding, a model) is missing or not the recorded one."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class DiffsteerWarning(UserWarning):
    """Input that runs but is probably not what the user meant (a truncated prompt, an unknown word, a huge size)."""
