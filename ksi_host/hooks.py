"""Calling hooks: the one helper that awaits async hookimpls.

pluggy calls hookimpls synchronously; an ``async def`` hookimpl would hand it
a coroutine, which pluggy's ``firstresult`` would take for an answer. So the
host calls hookimpls itself, in pluggy's order, awaiting each answer that is
awaitable before deciding whether it counts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from operator import itemgetter
from typing import Any

import pluggy

from .errors import KsiError


def _note(exc: BaseException, plugin: str, hook: str) -> None:
    note = f"raised by plugin {plugin!r} in hook {hook}"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


class HookCaller:
    """Calls hooks of one :class:`pluggy.PluginManager`, awaiting async hookimpls."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._calls: dict[str, list[tuple[str, Any, Callable[[dict[str, Any]], tuple[Any, ...]]]]] = {}

    def reset(self) -> None:
        """Forget the cached hookimpl lists (call after registering plugins)."""
        self._calls.clear()

    def impls(self, hook: str) -> list[tuple[str, Any, tuple[str, ...]]]:
        """``(plugin_name, function, argnames)`` in call order (read from pluggy at each call: start-up
        and shut-down use it; hook calls go through the cache of :meth:`_callables`)."""
        caller = getattr(self.pm.hook, hook)
        return [(i.plugin_name, i.function, tuple(i.argnames)) for i in reversed(caller.get_hookimpls())]

    def _callables(self, hook: str) -> list[tuple[str, Any, Callable[[dict[str, Any]], tuple[Any, ...]]]]:
        """``(plugin_name, function, args)``, cached per hook: ``args(kwargs)`` is the tuple of arguments the
        function takes."""
        found = self._calls[hook] = [(plugin, fn, _args_getter(names)) for plugin, fn, names in self.impls(hook)]
        return found

    def implemented(self, hook: str) -> bool:
        return bool(self._calls.get(hook) or self._callables(hook))

    def call(self, hook: str, /, **kwargs: Any) -> Awaitable[list[Any]]:
        """``await hooks.call(hook, **kwargs)``: every hookimpl of ``hook``; their non-None answers."""
        return self._run(False, hook, kwargs)

    def first(self, hook: str, /, **kwargs: Any) -> Awaitable[Any]:
        """``await hooks.first(hook, **kwargs)``: hookimpls until one answers something other than None."""
        return self._run(True, hook, kwargs)

    # call() and first() hand back _run's coroutine: one loop, no extra coroutine per hook call.
    async def _run(self, stop_at_first: bool, hook: str, kwargs: dict[str, Any]) -> Any:
        results = []
        for plugin, fn, args in self._calls.get(hook) or self._callables(hook):
            try:
                r = fn(*args(kwargs))
                if r is not None and hasattr(r, "__await__"):
                    r = await r
            except KsiError:
                raise
            except Exception as e:
                _note(e, plugin, hook)
                raise
            if r is not None:
                if stop_at_first:
                    return r
                results.append(r)
        return None if stop_at_first else results


def _no_args(kwargs: dict[str, Any]) -> tuple[Any, ...]:
    return ()


def _args_getter(names: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """A function from the hook's keyword arguments to the tuple of those ``names`` asks for, in order."""
    if not names:
        return _no_args
    if len(names) == 1:
        name = names[0]
        return lambda kwargs: (kwargs[name],)
    return itemgetter(*names)
