"""Which provider plugin is asked first: the host's policy across provider plugins.

Each provider plugin answers ``ksi_select_provider`` only for its own
deployments. When several plugins serve one model, the host asks them in the
order of what they declare through ``ksi_list_providers``: the lowest
``ProviderInfo.priority`` among a plugin's deployments serving the model, then
the plugin's name (``ProviderInfo.plugin``). Plugins that list nothing for the model (but
implement ``ksi_select_provider``) come after them, in hook order.

Plugins, their deployments, priorities and what each deployment supports do
not change while a host runs, so they are worked out once per model name;
circuit states change, which is why selection still asks each plugin in turn.
"""

from __future__ import annotations

from typing import Any

import attrs

from .hooks import HookCaller, Impl

MAX_MODELS = 4096
"""How many model names' orders are kept (a host fed arbitrary model names must not grow without bound)."""


@attrs.frozen
class Ranked:
    """What the host knows of the providers of one model name."""

    order: tuple[Impl, ...]  # the ``ksi_select_provider`` hookimpls, in the order to ask them
    supports: dict[str, frozenset[str] | None]  # deployment name -> what it supports (None: everything)

    @property
    def limited(self) -> bool:
        """Does any deployment of the model declare what it supports (so a request's needs must be checked)?"""
        return any(can is not None for can in self.supports.values())

    def unable(self, needs: frozenset[str]) -> dict[str, list[str]]:
        """The deployments that lack something of ``needs``: name -> what they lack."""
        return {name: sorted(needs - can) for name, can in self.supports.items() if can is not None and not needs <= can}


class ProviderRanking:
    """The order in which provider plugins are asked, per model name."""

    def __init__(self, hooks: HookCaller, host: Any) -> None:
        self.hooks = hooks
        self.host = host
        self._ranked: dict[str, Ranked] = {}

    async def of(self, model: str) -> Ranked:
        """The order to ask plugins in for ``model``, and what its deployments support."""
        found = self._ranked.get(model)
        if found is None:
            found = await self._rank(model)
            if len(self._ranked) >= MAX_MODELS:
                self._ranked.clear()
            self._ranked[model] = found
        return found

    async def _rank(self, model: str) -> Ranked:
        best: dict[str, tuple[int, str]] = {}  # registered plugin -> its best (priority, name) for the model
        supports: dict[str, frozenset[str] | None] = {}
        args = {"host": self.host, "model": model}
        for impl in self.hooks.impls("ksi_list_providers"):
            infos = await self.hooks.call_impl(impl, "ksi_list_providers", args)
            if infos:
                best[impl.plugin] = min((info.priority, info.plugin) for info in infos)
                supports.update((info.name, info.supports) for info in infos)
        selectors = self.hooks.impls("ksi_select_provider")
        ranked = sorted((s for s in selectors if s.plugin in best), key=lambda s: best[s.plugin])
        return Ranked(tuple(ranked) + tuple(s for s in selectors if s.plugin not in best), supports)
