"""Plugins: the base class, settings validation, entry-point discovery and the per-call hook manager."""

from __future__ import annotations

import importlib.metadata as md
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence, Union

import pluggy
from pydantic import BaseModel, ConfigDict, ValidationError

from . import hookspecs
from .hook_chain import is_wrapper
from .scope import Scope, split_scope

DEFAULT_SCOPE = Scope()
from .errors import PluginConflictError, PluginContractError, PluginError, PluginNotFoundError, SettingsError

ENTRY_POINT_GROUP = "diffsteer"


class NoSettings(BaseModel):
    """Settings of a plugin that takes none."""

    model_config = ConfigDict(extra="forbid")


class Plugin:
    """Base class of diffsteer plugins.

    Subclasses set ``name`` (the entry-point name) and ``Settings`` (a pydantic model, ideally with
    ``extra="forbid"``), and implement hooks from :mod:`diffsteer.hookspecs` as methods decorated with
    :data:`diffsteer.hookimpl`. Keyword arguments are validated into ``self.settings``::

        class Brighten(Plugin):
            name = "brighten"
            class Settings(BaseModel):
                amount: float = 0.1

            @hookimpl
            def diffsteer_post_step(self, call, step):
                step.latents = step.latents + self.settings.amount
    """

    name: ClassVar[str] = ""
    Settings: ClassVar[type[BaseModel]] = NoSettings
    #: Other names a user may give the scope's ``window_start``/``window_end``/``region`` by (diffusers'
    #: argument names, such as ControlNet's ``{"control_guidance_start": "window_start", ...}``).
    scope_aliases: ClassVar[Mapping[str, str]] = {}
    #: The hook contract version (``"MAJOR.MINOR"``) this plugin was written for: the newest whose hooks or
    #: services it uses. The core refuses it when it serves another major or an older minor.
    contract: ClassVar[str] = "1.0"

    def __init__(self, settings: Union[BaseModel, Mapping[str, Any], None] = None, **fields: Any) -> None:
        cls = type(self)
        settings, own_fields, self.scope = split_scope(
            cls.name or cls.__name__, cls.Settings.model_fields, cls.scope_aliases, settings, fields
        )
        self.settings = validate_settings(cls, settings, own_fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings!r})"

    def settings_dict(self) -> dict[str, Any]:
        """The settings (and the scope's fields that are not defaults) as JSON-compatible values, for metadata."""
        return {**self.settings.model_dump(mode="json"), **scope_of(self).settings()}


def scope_of(plugin: Any) -> Scope:
    """The plugin's step window and region (the default scope for a plugin that skipped ``Plugin.__init__``)."""
    scope = getattr(plugin, "scope", None)
    return scope if isinstance(scope, Scope) else DEFAULT_SCOPE


def validate_settings(
    cls: type[Plugin], settings: Union[BaseModel, Mapping[str, Any], None], fields: Mapping[str, Any]
) -> BaseModel:
    """Validate ``settings`` and/or keyword ``fields`` against ``cls.Settings``; bad values raise
    :class:`SettingsError` naming the plugin, the field and the reason."""
    name = cls.name or cls.__name__
    if isinstance(settings, cls.Settings) and not fields:
        return settings
    data: dict[str, Any] = {}
    if isinstance(settings, BaseModel):
        data.update(settings.model_dump())
    elif settings is not None:
        data.update(settings)
    data.update(fields)
    twice = _spelt_twice(cls.Settings, data)
    if twice:
        raise SettingsError(name, twice)
    try:
        return cls.Settings(**data)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]) or "<settings>", e["msg"]) for e in exc.errors()]
        raise SettingsError(name, problems) from None


def _spelt_twice(model: type[BaseModel], data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Fields given under two of their names (a diffusers alias and our name): pydantic would call the second
    an unknown input, which hides that it is the same setting."""
    problems = []
    for field, info in model.model_fields.items():
        alias = info.validation_alias
        names = [c for c in getattr(alias, "choices", []) if isinstance(c, str)] if alias is not None else []
        given = [n for n in dict.fromkeys([field, *names]) if n in data]
        if len(given) > 1:
            problems.append((field, f"is given twice, as {' and '.join(given)}: give one of them"))
    return problems


def _version(text: object) -> Optional[tuple[int, int]]:
    parts = text.split(".") if isinstance(text, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def check_contract(plugin_cls: type) -> None:
    """Refuse a plugin class written for a hook contract this core does not serve, naming it."""
    name = getattr(plugin_cls, "name", "") or plugin_cls.__name__
    declared = getattr(plugin_cls, "contract", "1.0")
    needed, core = _version(declared), _version(hookspecs.CONTRACT_VERSION)
    assert core is not None
    if needed is None:
        raise PluginContractError(name, f"declares contract {declared!r}; it must be 'MAJOR.MINOR', such as "
                                        f"{hookspecs.CONTRACT_VERSION!r}")
    if needed[0] != core[0] or needed[1] > core[1]:
        serves = f"{core[0]}.0 to {hookspecs.CONTRACT_VERSION}"
        fix = ("upgrade diffsteer" if needed > core else
               f"install a version of the plugin written for contract {core[0]}.x")
        raise PluginContractError(
            name, f"was written for hook contract {declared}, but this diffsteer serves contracts {serves}: {fix}"
        )


# -- discovery ----------------------------------------------------------------------------------------


def installed_plugins() -> dict[str, md.EntryPoint]:
    """Entry points of group ``diffsteer`` by name; nothing is imported."""
    return {ep.name: ep for ep in md.entry_points(group=ENTRY_POINT_GROUP)}


def load_plugin_class(name: str) -> type[Plugin]:
    """Import the plugin class registered under ``name``; only the named plugin is loaded."""
    eps = installed_plugins()
    if name not in eps:
        raise PluginNotFoundError(name, list(eps))
    obj = eps[name].load()
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        raise PluginError(name, f"entry point {eps[name].value!r} is not a diffsteer.Plugin subclass")
    if obj.name and obj.name != name:
        # Generation metadata records Plugin.name; --from must find the plugin again by that name.
        raise PluginError(name, f"entry point {eps[name].value!r} names a plugin called {obj.name!r}")
    check_contract(obj)
    return obj


PluginSpec = Union[Plugin, str, type, "tuple[str, Mapping[str, Any]]"]


def resolve_plugins(specs: Iterable[PluginSpec]) -> list[Plugin]:
    """Turn the user's list (instances, names, ``(name, settings)`` pairs, classes) into instances."""
    out: list[Plugin] = []
    for spec in specs:
        if isinstance(spec, Plugin):
            out.append(spec)
        elif isinstance(spec, str):
            out.append(load_plugin_class(spec)())
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
            out.append(load_plugin_class(spec[0])(spec[1]))
        elif isinstance(spec, type) and issubclass(spec, Plugin):
            out.append(spec())
        else:
            raise TypeError(
                f"plugins entries must be Plugin instances, names or (name, settings) pairs, got {spec!r}"
            )
    return out


# -- the per-call manager -------------------------------------------------------------------------------

def exclusive_hooks() -> dict[str, str]:
    """The exclusive hooks (the ``firstresult`` specs) and what each replaces, for conflict errors."""
    out = {}
    for name, fn in vars(hookspecs).items():
        opts = getattr(fn, "diffsteer_spec", None) or {}
        if name.startswith("diffsteer_") and opts.get("firstresult"):
            out[name] = f"{getattr(fn, 'diffsteer_place', name)} ({name})"
    return out


def plugin_label(plugin: Plugin) -> str:
    return plugin.name or type(plugin).__name__


def make_manager(plugins: Sequence[Plugin]) -> pluggy.PluginManager:
    """A fresh manager for one call, calling plugins in the order listed.

    pluggy calls implementations last-registered-first, so registering in reverse gives list order.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    seen: set[int] = set()
    for index in reversed(range(len(plugins))):
        plugin = plugins[index]
        if id(plugin) in seen:
            raise PluginError(plugin_label(plugin), "is listed twice; pass two instances to run it twice")
        seen.add(id(plugin))
        check_contract(type(plugin))
        try:
            pm.register(plugin, name=f"{plugin_label(plugin)}#{index}")
        except pluggy.PluginValidationError as exc:  # a misspelt hook or an unknown argument
            raise PluginError(plugin_label(plugin), str(exc)) from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(plugin_label(exc.plugin) if isinstance(exc.plugin, Plugin) else "?", str(exc)) from None
    for hook, place in exclusive_hooks().items():
        # A wrapper wraps whichever plugin replaces the core: it claims nothing.
        impls = [i for i in getattr(pm.hook, hook).get_hookimpls() if not is_wrapper(i)]
        if len(impls) > 1:
            # get_hookimpls() is in call order reversed; report in the user's order.
            names = [plugin_label(i.plugin) for i in reversed(impls)]
            raise PluginConflictError(place, names[0], names[1])
    return pm


def implemented_hooks(plugin_cls: type) -> list[str]:
    """Names of the hook specs that ``plugin_cls`` implements (for ``diffsteer plugins``)."""
    found = []
    for attr in dir(plugin_cls):
        if attr.startswith("diffsteer_") and hasattr(getattr(plugin_cls, attr), "diffsteer_impl"):
            found.append(attr)
    return found
