"""Commands plugins add to ``ksi-host`` (the ``ksi_cli_commands`` hook), as ``llm`` plugins do.

A plugin returns :class:`Command` objects; ``ksi-host`` adds each as a
sub-command with the options every command takes (``--db``, ``--config``,
``-v``) and runs it with the parsed arguments. :func:`host_from_args` builds
the Host those options describe::

    from ksi_host import hookimpl
    from ksi_host.commands import Command, host_from_args

    async def hello(args):
        async with host_from_args(args, serve=False) as host:
            print(await host.status())
        return 0

    class Plugin:
        @hookimpl
        def ksi_cli_commands(self):
            return [Command("hello", "print the status", lambda parser: None, hello)]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from .service import Host


@attrs.frozen
class Command:
    """One ``ksi-host`` sub-command. ``add_arguments(parser)`` declares its own options; ``run(args)`` is a
    coroutine function that does the work and returns the exit code (0 ok, 1 something failed, 2 bad usage).
    Errors map as for every command: a StartupError exits 2, an OperationalError 1, anything else 70."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Awaitable[int]]
    description: str | None = None


def log_to_stderr(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def host_from_args(args: argparse.Namespace, *, serve: bool, resume: bool = True, **host_table: Any) -> Host:
    """The Host that ``--config`` and ``--db`` name (else ``$KSI_HOST_CONFIG``, ``$KSI_HOST_DB``); the config's
    ``[host] log_level`` logs to stderr unless ``-v`` chose a level; ``host_table`` overrides keys of ``[host]``;
    ``serve`` and ``resume`` as :class:`~ksi_host.Host` takes them."""
    from .config import LOG_LEVELS, load_config
    from .service import Host

    config = load_config(getattr(args, "config", None) or os.environ.get("KSI_HOST_CONFIG"))
    level = str(config.get("host", {}).get("log_level", "")).upper()
    if not getattr(args, "verbose", 0) and level in LOG_LEVELS and level != "WARNING":
        log_to_stderr(level)  # [host] log_level; the Host validates a bad value
    overrides = {k: v for k, v in host_table.items() if v is not None}
    if overrides:
        config.setdefault("host", {}).update(overrides)
    return Host(config, getattr(args, "db", None), serve=serve, resume=resume)


def plugin_commands(load_errors: list[Exception] | None = None) -> list[tuple[str, Command]]:
    """``(plugin name, command)`` for every command the installed plugins add (none when a plugin fails to
    load: the command that starts a Host reports that failure; it is appended to ``load_errors`` if given).

    An ``async def`` ``ksi_cli_commands`` is run to its answer, as the host awaits every hook. A hookimpl
    that raises, or answers anything but Command objects, is a programming error naming the plugin."""
    import pluggy

    from . import hookspecs
    from .errors import PluginLoadError
    from .plugins import register

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    try:
        register(pm, None)  # the selected entry points, under their names
    except PluginLoadError as e:
        if load_errors is not None:
            load_errors.append(e)
        return []
    found = []
    for impl in reversed(pm.hook.ksi_cli_commands.get_hookimpls()):
        where = f"raised by plugin {impl.plugin_name!r} in hook ksi_cli_commands"
        try:
            answer = impl.function()
            if answer is not None and hasattr(answer, "__await__"):
                import asyncio

                async def awaited(a: Any = answer) -> Any:
                    return await a

                answer = asyncio.run(awaited())
        except Exception as e:
            e.add_note(where)
            raise
        if not isinstance(answer, (list, tuple, type(None))):
            raise TypeError(f"plugin {impl.plugin_name!r}: ksi_cli_commands returned {answer!r}, "
                            "not a list of ksi_host.commands.Command")
        for command in answer or ():
            if not isinstance(command, Command):
                raise TypeError(f"plugin {impl.plugin_name!r}: ksi_cli_commands returned {command!r} in its list, "
                                "not a ksi_host.commands.Command")
            found.append((impl.plugin_name, command))
    return found


GC_GEN0_THRESHOLD = 50_000
"""First-generation GC threshold :func:`tune_gc` sets (CPython's default is 700)."""


def tune_gc() -> None:
    """GC settings for a command that owns its process and serves many requests (``ksi-host run``, ``ksi-host serve``).

    Call it once the host has started.

    Moves everything alive after start-up (modules, plugins, the host) out of the
    collector's sight with ``gc.freeze()`` and collects the youngest generation every
    ``GC_GEN0_THRESHOLD`` allocations instead of every 700: with thousands of requests
    in flight the default collects (and walks them all) every few requests. Not applied by
    :class:`~ksi_host.Host`: a library must not change its process's GC settings.
    """
    import gc

    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
