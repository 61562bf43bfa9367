"""Training commands that plugins add to the CLI: ``diffsteer train NAME ...``.

The core has one built-in recipe (``shapes``). Any other ``NAME`` is the entry-point name of a plugin
(group ``diffsteer``); the CLI loads that plugin only and asks its class, through
:func:`~diffsteer.hookspecs.diffsteer_train_commands`, for the command called ``NAME``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import pluggy

from . import hookspecs
from .errors import PluginError


@dataclass(frozen=True)
class TrainCommand:
    """One ``diffsteer train NAME`` command.

    Attributes:
        name: what users type after ``diffsteer train``.
        help: one line for ``--help``.
        add_arguments: adds the command's options to its ``argparse`` parser.
        run: runs the command with the parsed options; returns the exit status.

    Example:
        >>> cmd = TrainCommand("noop", "does nothing", lambda p: p.add_argument("--out"), lambda a: 0)
        >>> parser = argparse.ArgumentParser(prog="diffsteer train noop"); cmd.add_arguments(parser)
        >>> cmd.run(parser.parse_args(["--out", "x"]))
        0
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def plugin_train_commands(plugin: object, owner: str) -> dict[str, TrainCommand]:
    """The train commands that ``plugin`` (a plugin class or instance) registers, by name."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    try:
        pm.register(plugin, name=owner)
    except pluggy.PluginValidationError as exc:
        raise PluginError(owner, str(exc)) from None
    found: dict[str, TrainCommand] = {}

    def register(command: TrainCommand) -> None:
        if not isinstance(command, TrainCommand):
            raise PluginError(owner, f"diffsteer_train_commands registered {command!r}, not a TrainCommand")
        if command.name in found:
            raise PluginError(owner, f"registers two train commands named {command.name!r}")
        found[command.name] = command

    pm.hook.diffsteer_train_commands(register=register)
    return found
