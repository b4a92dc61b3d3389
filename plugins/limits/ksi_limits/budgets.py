"""Spending budgets: :class:`BudgetBook`.

What an agent, a purpose or everything has spent in the current UTC day or
month is the ledger's cost since the period began (``host.usage_report(by,
since)``, ``cost_usd``; calls whose cost the ledger does not know count as
zero), plus what this process saw since it last read the ledger (the cost of
every call it trued up), plus the estimated cost of its calls in flight.

The ledger is read once per grouping and period (``agent``, ``purpose``,
``total`` times ``day``, ``month``: only those the budgets use), when the
period begins and then at most every ``budget_refresh_s`` seconds, by the
admission that finds the reading stale; every other admission decides from
memory. The cost of a call reaches the ledger before the host tells the
observers it ended (``ksi_record_usage`` before ``ksi_attempt_finished``), so a
reading started after a true-up includes it: the true-ups seen before a
reading starts are dropped when it completes.

A call in flight counts its estimated cost: the deployment's price (a provider
or its ``deployment`` with a ``cost(prompt_tokens, completion_tokens)``
method, as ksi-provider-openai's deployments have) times the attempt's token
estimate. Without a price it counts zero, so calls in flight together can
overshoot a budget by what they cost.
"""

from __future__ import annotations

import asyncio
import calendar
from collections.abc import Awaitable, Callable, Hashable
from datetime import UTC, datetime
from typing import Any

import attrs

from ksi_host.errors import BudgetExceeded
from ksi_host.models import CompletionRequest, iso

from .config import BudgetRule, is_glob, matches

GROUPING = {"agent": "agent", "purpose": "purpose", "total": "total"}
"""Budget scope -> the ``by`` of ``host.usage_report``."""


def period_bounds(period: str, wall: float) -> tuple[float, float]:
    """The UTC day or month holding unix time ``wall``: (start, end) in unix seconds."""
    d = datetime.fromtimestamp(wall, UTC)
    if period == "day":
        start = d.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.timestamp(), start.timestamp() + 86400
    start = d.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    days = calendar.monthrange(start.year, start.month)[1]
    return start.timestamp(), start.timestamp() + days * 86400


def name_in(request: CompletionRequest, scope: str) -> str | None:
    """What a budget of ``scope`` is keyed by for ``request`` ("" for the total; None: the request has none)."""
    if scope == "agent":
        return request.agent_id
    if scope == "purpose":
        return request.purpose
    return ""


@attrs.define
class View:
    """The ledger's spend for one grouping (``agent``, ``purpose``, ``total``) in the current period."""

    scope: str
    period: str
    start: float | None = None  # unix seconds; None: not read yet
    end: float = 0.0
    read_at: float = 0.0  # host.clock reading of the last read
    spent: dict[str, float] = attrs.field(factory=dict)  # name -> USD, from the ledger
    unpriced: dict[str, int] = attrs.field(factory=dict)  # name -> the ledger's calls of unknown cost (spent leaves them out)
    recent: dict[str, float] = attrs.field(factory=dict)  # name -> USD trued up since the last reading began
    pending: dict[str, float] = attrs.field(factory=dict)  # name -> USD trued up before the reading under way began
    task: asyncio.Task[None] | None = None  # the reading under way

    def total(self, name: str) -> float:
        return self.spent.get(name, 0.0) + self.pending.get(name, 0.0) + self.recent.get(name, 0.0)


@attrs.frozen(slots=True)
class Hold:
    """What one admitted attempt holds in the budgets: its names per scope and its estimated cost."""

    names: tuple[tuple[str, str], ...]  # (scope, name) for every scope in use
    usd: float


class BudgetBook:
    """Every budget's spend, and the check of one attempt against them."""

    def __init__(self, budgets: list[BudgetRule], refresh_s: float,
                 report: Callable[[str, float], Awaitable[list[dict[str, Any]]]],
                 clock: Callable[[], float], wall: Callable[[], float]) -> None:
        self.budgets = list(enumerate(budgets))
        self.refresh_s = refresh_s
        self.report = report
        self.clock = clock
        self.wall = wall
        self.views = {(b.scope, b.period): View(b.scope, b.period) for b in budgets}
        self.scopes = tuple(dict.fromkeys(b.scope for b in budgets))
        self.in_flight: dict[tuple[str, str], float] = {}  # (scope, name) -> USD reserved by calls in flight
        self.holds: dict[Hashable, Hold] = {}

    def _stale(self, view: View, wall: float, now: float) -> bool:
        return view.start is None or wall >= view.end or (view.task is None and now - view.read_at >= self.refresh_s)

    def stale(self) -> bool:
        """Must the ledger be read before the next check (see :meth:`fresh`)?"""
        wall, now = self.wall(), self.clock()
        return any(self._stale(view, wall, now) for view in self.views.values())

    async def fresh(self) -> None:
        """Read the ledger where a period began (every admission waits for that reading) or where the reading
        is older than ``refresh_s`` (the admission that notices waits; the others go on with the last one)."""
        wall, now = self.wall(), self.clock()
        for view in self.views.values():
            if self._stale(view, wall, now):
                await self._reading(view, wall)

    async def _reading(self, view: View, wall: float) -> None:
        if view.task is None:
            view.task = asyncio.ensure_future(self._read(view, wall))
            view.task.add_done_callback(lambda _: setattr(view, "task", None))
        await asyncio.shield(view.task)  # a waiter cut off by its deadline leaves the reading to the others

    async def _read(self, view: View, wall: float) -> None:
        start, end = period_bounds(view.period, wall)
        view.pending, view.recent = view.recent, {}  # (still counted while the reading is under way)
        try:
            rows = await self.report(GROUPING[view.scope], start)
        except BaseException:
            for name, usd in view.pending.items():  # not read: what was seen still counts
                view.recent[name] = view.recent.get(name, 0.0) + usd
            raise
        finally:
            view.pending = {}
        rows = [r for r in rows if view.scope == "total" or r["key"] is not None]
        view.spent = {("" if view.scope == "total" else r["key"]): float(r.get("cost_usd") or 0.0) for r in rows}
        view.unpriced = {("" if view.scope == "total" else r["key"]): int(r.get("unpriced_calls") or 0) for r in rows}
        view.start, view.end, view.read_at = start, end, self.clock()

    def check(self, request: CompletionRequest, usd: float, provider: str) -> None:
        """Raise BudgetExceeded (naming the agent, the budget and what was spent) if a call of ``usd`` would
        pass a budget of ``request``'s agent, purpose or the total."""
        for i, budget in self.budgets:
            name = name_in(request, budget.scope)
            if name is None or not (budget.scope == "total" or matches(budget.match, name)):
                continue
            view = self.views[budget.scope, budget.period]
            spent = view.total(name)
            flying = self.in_flight.get((budget.scope, name), 0.0)
            if spent + flying >= budget.usd or spent + flying + usd > budget.usd:
                raise BudgetExceeded(self._message(i, budget, request, name, view, spent, flying, usd, provider))

    @staticmethod
    def _message(i: int, budget: BudgetRule, request: CompletionRequest, name: str, view: View, spent: float,
                 flying: float, usd: float, provider: str) -> str:
        whose = {"agent": "it", "purpose": f"purpose {name!r}", "total": "all agents together"}[budget.scope]
        message = (f"budget exceeded for agent {request.agent_id!r}: {whose} spent ${spent:.6f} of the {budget.period}'s "
                   f"${budget.usd:.2f} (limits.budgets[{i}]: {budget.scope} {budget.match!r}, since {iso(view.start)})")
        if flying:
            message += f"; ${flying:.6f} more is in flight"
        if usd and spent + flying < budget.usd:
            message += f"; this call to {provider} is estimated at ${usd:.6f}"
        return message + "; nothing was sent"

    def hold(self, lease: Hashable, request: CompletionRequest, usd: float) -> None:
        """Count ``usd`` in flight for ``lease`` under every name of ``request`` the budgets use."""
        names = tuple((scope, name) for scope in self.scopes if (name := name_in(request, scope)) is not None)
        for key in names:
            self.in_flight[key] = self.in_flight.get(key, 0.0) + usd
        self.holds[lease] = Hold(names, usd)

    def settle(self, lease: Hashable, cost: float | None) -> None:
        """The lease's attempt ended: it no longer counts in flight; ``cost`` (USD, None: nothing known) is
        counted as spent until the next reading of the ledger."""
        hold = self.holds.pop(lease, None)
        if hold is None:
            return
        for key in hold.names:
            left = self.in_flight[key] - hold.usd
            if left > 1e-12:
                self.in_flight[key] = left
            else:
                del self.in_flight[key]
        if cost:
            names = dict(hold.names)
            for view in self.views.values():
                name = names.get(view.scope)
                if name is not None:
                    view.recent[name] = view.recent.get(name, 0.0) + cost

    async def status(self) -> list[dict[str, Any]]:
        """One row per budget and name: spent, in flight, left, and the calls of unknown cost that ``spent``
        leaves out (as of the last reading of the ledger: a model without a price is never stopped by a budget)."""
        await self.fresh()
        rows = []
        for i, budget in self.budgets:
            view = self.views[budget.scope, budget.period]
            if budget.scope == "total":
                names = [""]
            else:
                seen = {*view.spent, *view.pending, *view.recent, *(n for s, n in self.in_flight if s == budget.scope)}
                names = sorted(n for n in seen if matches(budget.match, n))
                if budget.match not in names and not is_glob(budget.match):
                    names.insert(0, budget.match)
            for name in names:
                spent = view.total(name)
                flying = self.in_flight.get((budget.scope, name), 0.0)
                rows.append({"budget": f"budgets[{i}]", "scope": budget.scope, "name": name or None,
                             "period": budget.period, "since": iso(view.start), "usd": budget.usd,
                             "spent_usd": round(spent, 6), "in_flight_usd": round(flying, 6),
                             "left_usd": round(max(0.0, budget.usd - spent - flying), 6),
                             "unpriced_calls": view.unpriced.get(name, 0)})
        return rows
