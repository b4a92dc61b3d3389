"""Which provider plugin is asked first: the host's policy across provider plugins.

Each provider plugin answers ``ksi_select_provider`` only for its own
deployments. When several plugins serve one model, the host asks them in the
order of what they declare through ``ksi_list_providers``: the lowest
``ProviderInfo.priority`` among a plugin's deployments serving the model, then
the plugin's name (``ProviderInfo.plugin``). Plugins that list nothing for the model (but
implement ``ksi_select_provider``) come after them, in hook order.

Plugins, their deployments and priorities do not change while a host runs, so
the order is worked out once per model name; circuit states change, which is
why selection still asks each plugin in turn.
"""

from __future__ import annotations

from typing import Any

from .hooks import HookCaller, Impl

MAX_MODELS = 4096
"""How many model names' orders are kept (a host fed arbitrary model names must not grow without bound)."""


class ProviderRanking:
    """The order in which provider plugins are asked, per model name."""

    def __init__(self, hooks: HookCaller, host: Any) -> None:
        self.hooks = hooks
        self.host = host
        self._orders: dict[str, tuple[Impl, ...]] = {}

    async def order(self, model: str) -> tuple[Impl, ...]:
        """The ``ksi_select_provider`` hookimpls in the order to ask them for ``model``."""
        found = self._orders.get(model)
        if found is None:
            found = await self._rank(model)
            if len(self._orders) >= MAX_MODELS:
                self._orders.clear()
            self._orders[model] = found
        return found

    async def _rank(self, model: str) -> tuple[Impl, ...]:
        best: dict[str, tuple[int, str]] = {}  # registered plugin -> its best (priority, name) for the model
        args = {"host": self.host, "model": model}
        for impl in self.hooks.impls("ksi_list_providers"):
            infos = await self.hooks.call_impl(impl, "ksi_list_providers", args)
            if infos:
                best[impl.plugin] = min((info.priority, info.plugin) for info in infos)
        selectors = self.hooks.impls("ksi_select_provider")
        ranked = sorted((s for s in selectors if s.plugin in best), key=lambda s: best[s.plugin])
        return tuple(ranked) + tuple(s for s in selectors if s.plugin not in best)
