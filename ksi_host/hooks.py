"""Calling hooks: the one helper that awaits async hookimpls.

pluggy calls hookimpls synchronously; an ``async def`` hookimpl would hand it
a coroutine, which pluggy's ``firstresult`` would take for an answer. So the
host calls hookimpls itself, in pluggy's order, awaiting each answer that is
awaitable before deciding whether it counts.

Every hook call goes through :meth:`HookCaller.call_impl`, which keeps the one
rule for errors: a :class:`~ksi_host.errors.KsiError` passes unchanged; any
other exception propagates with a note naming the plugin and the hook.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import attrs
import pluggy

from .config import HOST_TABLE
from .errors import KsiError, OperationalError, PluginLoadError, StartupError
from .models import CompletionRequest, FailureDecision, ProviderInfo, Ticket

log = logging.getLogger("ksi_host.hooks")

_HOUSEKEEPING = frozenset({"ksi_config_spec", "ksi_exclusive_hooks", "ksi_startup", "ksi_shutdown", "ksi_status",
                           "ksi_cli_commands", "ksi_attempt_finished", "ksi_request_finished"})
"""Hooks that do not keep a plugin worth starting once its others are taken over (see ``ksi_exclusive_hooks``):
a queue that also observes its results has nothing to observe when another plugin queues."""


def _is_provider(a: Any) -> bool:
    return hasattr(a, "name") and hasattr(a, "timeout_s") and callable(getattr(a, "complete", None))


def _list_of(*types: type) -> Any:
    return lambda a: isinstance(a, list | tuple) and all(isinstance(i, types) for i in a)


ANSWERS: dict[str, tuple[Any, str]] = {
    "ksi_enqueue": (lambda a: isinstance(a, Ticket), "a Ticket"),
    "ksi_prepare_request": (lambda a: isinstance(a, CompletionRequest), "a CompletionRequest (attrs.evolve of the one given)"),
    "ksi_select_provider": (_is_provider, "a Provider (name, timeout_s and async complete(request, *, timeout_s))"),
    "ksi_list_providers": (_list_of(ProviderInfo), "a list of ProviderInfo"),
    "ksi_handle_failure": (lambda a: isinstance(a, FailureDecision), "a FailureDecision"),
    "ksi_exclusive_hooks": (_list_of(str), "a list of hook names"),
    "ksi_status": (lambda a: isinstance(a, dict), "a dict {section: data}"),
    "ksi_request_details": (lambda a: isinstance(a, dict), "a dict {section: data}"),
    "ksi_usage_report": (_list_of(dict), "a list of dicts"),
    "ksi_list_requests": (_list_of(dict), "a list of dicts"),
}
"""What each hook's non-None answer must be (the manual's words for the message): an answer that is not is a
programming error naming the plugin, where the host would otherwise fail later on an attribute, unnamed."""


def check_answer(plugin: str, hook: str, answer: Any) -> None:
    """Raise TypeError naming ``plugin`` when ``answer`` (not None) is not what ``hook`` answers."""
    check = ANSWERS.get(hook)
    if check is not None and not check[0](answer):
        shown = repr(answer)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        raise TypeError(f"plugin {plugin!r}: {hook} returned {shown} ({type(answer).__name__}), not {check[1]} or None")


@attrs.frozen
class Impl:
    """One hookimpl: the plugin's registered name, the function, the parameters it takes."""

    plugin: str
    function: Any
    argnames: tuple[str, ...]


def _note(exc: BaseException, plugin: str, hook: str) -> None:
    note = f"raised by plugin {plugin!r} in hook {hook}"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


def check_hook_names(pm: pluggy.PluginManager) -> None:
    """Raise PluginLoadError naming the plugin and the hookimpl whose name matches no hook (pluggy's
    ``check_pending``; a typo such as ``ksi_enqeue`` would otherwise be ignored, and the hook reported missing)."""
    for name in sorted(dir(pm.hook)):
        caller = getattr(pm.hook, name)
        if isinstance(caller, pluggy.HookCaller) and not caller.has_spec():
            impls = [i for i in caller.get_hookimpls() if not i.optionalhook]
            if impls:
                import difflib

                known = sorted(n for n in dir(pm.hook) if isinstance(getattr(pm.hook, n), pluggy.HookCaller) and getattr(pm.hook, n).has_spec())
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]}?" if close else f"the hooks are: {', '.join(known)}"
                raise PluginLoadError(f"plugin {impls[0].plugin_name!r} implements {name!r}, which is not a hook ({hint})")


class HookCaller:
    """Calls hooks of one :class:`pluggy.PluginManager`, awaiting async hookimpls."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._impls: dict[str, tuple[Impl, ...]] = {}
        self._owners: dict[str, str] = {}  # hook -> the one plugin whose implementation is called (ksi_exclusive_hooks)
        self.table_owners: dict[str, str] = {}  # config table -> the plugin that declares it (config_specs)

    def reset(self) -> None:
        """Forget the cached hookimpl lists (call after registering plugins)."""
        self._impls.clear()

    def impls(self, hook: str) -> tuple[Impl, ...]:
        """The hookimpls of ``hook`` in call order (newest registered first, ``tryfirst``/``trylast`` applied),
        read from pluggy once per hook (an empty answer is cached too)."""
        found = self._impls.get(hook)
        if found is None:
            caller = getattr(self.pm.hook, hook)
            owner = self._owners.get(hook)
            found = self._impls[hook] = tuple(
                Impl(i.plugin_name, i.function, tuple(i.argnames)) for i in reversed(caller.get_hookimpls())
                if owner is None or i.plugin_name == owner
            )
        return found

    async def config_specs(self) -> dict[str, type]:
        """``ksi_config_spec`` of every plugin: table name -> attrs class (and :attr:`table_owners`: table name ->
        the plugin that declared it). An answer that is not ``(str, attrs class)`` raises PluginLoadError, and a
        table two plugins declare (or the host's own ``[host]``) StartupError, naming the plugins."""
        specs: dict[str, type] = {}
        owners: dict[str, str] = {}
        for impl in self.impls("ksi_config_spec"):
            spec = await self.call_impl(impl, "ksi_config_spec", {})
            if spec is None:
                continue
            if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str)
                    and isinstance(spec[1], type) and attrs.has(spec[1])):
                raise PluginLoadError(f"plugin {impl.plugin!r}: ksi_config_spec must return (table name, attrs class) "
                                      f"or None, got {spec!r}")
            table, cls = spec
            if table in owners or table == HOST_TABLE:
                first = f"plugin {owners[table]!r}" if table in owners else "the host itself"
                raise StartupError(f"config table [{table}] is declared by {first} and by plugin {impl.plugin!r}")
            specs[table] = cls
            owners[table] = impl.plugin
        self.table_owners = owners
        return specs

    async def claim_exclusive(self, host: Any) -> list[str]:
        """``ksi_exclusive_hooks``: the plugins that take hooks over get them; the plugins that are left with
        nothing to do are unregistered (their names are returned)."""
        owners: dict[str, str] = {}
        for impl in self.impls("ksi_exclusive_hooks"):
            for hook in await self.call_impl(impl, "ksi_exclusive_hooks", {"host": host}) or ():
                if hook in owners and owners[hook] != impl.plugin:
                    raise StartupError(f"plugins {owners[hook]!r} and {impl.plugin!r} both claim {hook} for themselves")
                owners[hook] = impl.plugin
        if not owners:
            return []
        idle = self.give_exclusively(owners)
        for name in idle:
            self.pm.unregister(name=name)
            log.info("plugin %r is not started: its hooks are served by another plugin", name)
        self.reset()
        return idle

    @property
    def claimed(self) -> bool:
        """Has a plugin taken hooks over (``ksi_exclusive_hooks``)?"""
        return bool(self._owners)

    def give_exclusively(self, owners: dict[str, str]) -> list[str]:
        """From now on call only ``owners[hook]``'s implementation of each hook in ``owners``. Returns the
        plugins that lost hooks to the owners and are left with nothing to do of their own (only the hooks of
        :data:`_HOUSEKEEPING`: see ``ksi_exclusive_hooks``)."""
        self._owners.update(owners)
        self.reset()
        left = []
        for name, plugin in self.pm.list_name_plugin():
            hooks = {c.name for c in self.pm.get_hookcallers(plugin) or ()}
            lost = any(owner != name for hook, owner in owners.items() if hook in hooks)
            if lost and not any(any(i.plugin == name for i in self.impls(h)) for h in hooks - _HOUSEKEEPING):
                left.append(name)
        return left

    def implemented(self, hook: str) -> bool:
        return bool(self.impls(hook))

    async def call_impl(self, impl: Impl, hook: str, kwargs: Mapping[str, Any]) -> Any:
        """Call one hookimpl with the arguments it asks for; await its answer if it is awaitable."""
        try:
            answer = impl.function(*[kwargs[name] for name in impl.argnames])
            if answer is not None and hasattr(answer, "__await__"):
                answer = await answer
            if answer is not None:
                check_answer(impl.plugin, hook, answer)
        except KsiError:
            raise
        except Exception as e:
            _note(e, impl.plugin, hook)
            raise
        return answer

    async def call(self, hook: str, /, **kwargs: Any) -> list[Any]:
        """Every hookimpl of ``hook``; their non-None answers, in call order."""
        answers = []
        for impl in self.impls(hook):
            answer = await self.call_impl(impl, hook, kwargs)
            if answer is not None:
                answers.append(answer)
        return answers

    async def first(self, hook: str, /, **kwargs: Any) -> Any:
        """Hookimpls of ``hook`` in call order until one answers something other than None."""
        for impl in self.impls(hook):
            answer = await self.call_impl(impl, hook, kwargs)
            if answer is not None:
                return answer
        return None

    async def notify(self, hook: str, /, **kwargs: Any) -> None:
        """Every hookimpl of an observer hook. An OperationalError is logged (naming the plugin) and the
        next observer is called; a programming error propagates as for every hook."""
        for impl in self.impls(hook):
            try:
                await self.call_impl(impl, hook, kwargs)
            except OperationalError as e:
                log.warning("plugin %r in hook %s: %s: %s", impl.plugin, hook, e.type, e.message)
