"""The ``limits`` plugin: ``ksi_admit`` holds an attempt until its windows have room, or refuses it over a budget.

For each attempt (``ksi_admit``, once its provider is selected):

1. budgets: if the request's agent, purpose or the total has spent its budget
   for the day or month, BudgetExceeded (nothing is sent, nothing waits);
2. limits: the rules matching the deployment (``provider.name``), the agent
   (``request.agent_id``) and the model (``request.model``) give the windows
   the attempt needs; an attempt whose estimate alone exceeds a rule's ``tpm``
   fails with BadRequest naming the rule; otherwise it waits, in arrival
   order, until every window has room (:mod:`ksi_limits.admission`); the host
   ends the wait at the request's deadline;
3. budgets again (spend may have grown while it waited), and its estimated
   cost is held until the attempt ends.

``ksi_attempt_finished`` trues each window up (:meth:`_settle`) and frees the
budget hold. ``ksi_status`` shows every window and budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Hashable
from typing import Any

import attrs

from ksi_host import hookimpl
from ksi_host.errors import BadRequest, OperationalError, StartupError
from ksi_host.models import OUTCOME_OK, OUTCOME_UNKNOWN, Attempt, CompletionRequest, Provider, UpstreamCall

from .admission import Admission
from .budgets import BudgetBook
from .config import LimitRule, LimitsConfig, is_glob, matches
from .estimate import Estimate, estimate
from .store import Claim, Key, Limit, LocalWindowStore, WindowStore

TABLE = "limits"
log = logging.getLogger("ksi_host.limits")

_LEDGER_BY = {"deployment": "provider", "agent": "agent", "model": "model"}
"""Rule scope -> the ``by`` of ``host.usage_report`` (to seed the windows from the ledger)."""


@attrs.frozen(slots=True)
class Rule:
    """A configured rule with its index and the limit each of its windows keeps."""

    index: int
    rule: LimitRule
    limit: Limit

    def claim(self, name: str, tokens: int) -> Claim:
        return Claim((self.index, name), self.limit, tokens)


@attrs.frozen(slots=True)
class Lease:
    """An admitted attempt: does it hold windows (besides a budget hold)?"""

    has_windows: bool


def _price(provider: Provider) -> Any:
    """The deployment's ``cost(prompt_tokens, completion_tokens)``, if the provider offers one."""
    for holder in (provider, getattr(provider, "deployment", None)):
        cost = getattr(holder, "cost", None)
        if callable(cost):
            return cost
    return None


class Plugin:
    """Rate limits and spending budgets. ``store``: the window store (default: :class:`LocalWindowStore`)."""

    def __init__(self, store: WindowStore | None = None) -> None:
        self._store = store
        self.store: WindowStore = store or LocalWindowStore()
        self.config = LimitsConfig()
        self.rules: dict[str, list[Rule]] = {}
        self._matched: dict[tuple[str, str], tuple[Rule, ...]] = {}
        self.admission: Admission | None = None
        self.budgets: BudgetBook | None = None
        self.leases: dict[Hashable, Lease] = {}
        self.active = False
        self.tokens_needed = False
        self._seeded = False
        self._seeding: asyncio.Task[None] | None = None

    # -- life cycle ------------------------------------------------------------------

    @hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        return TABLE, LimitsConfig

    @hookimpl
    def ksi_startup(self, host: Any) -> None:
        config = host.config.get(TABLE)
        self.config = config if isinstance(config, LimitsConfig) else LimitsConfig()
        self.rules = {"deployment": [], "agent": [], "model": []}
        for i, r in enumerate(self.config.rules):
            self.rules[r.scope].append(Rule(i, r, Limit(r.window_s, r.rpm, r.tpm, r.concurrency)))
        self._matched = {}
        self.tokens_needed = any(r.tpm is not None for r in self.config.rules)
        self.store = self._store or LocalWindowStore()
        self.admission = Admission(self.store, host.clock, host.sleep)
        self.budgets = None
        if self.config.budgets:
            if not host.hooks.implemented("ksi_usage_report"):
                raise StartupError("[limits] budgets need the usage ledger (ksi_usage_report), which no loaded plugin "
                                   "implements: pip install ksi-tokens (or remove limits.budgets)")
            self.budgets = BudgetBook(self.config.budgets, self.config.budget_refresh_s, host.usage_report,
                                      host.clock, time.time)
        self.active = bool(self.config.rules or self.config.budgets)
        self.leases = {}
        self._seeded = False
        self._seeding = None

    @hookimpl
    async def ksi_shutdown(self) -> None:
        """Stop a ledger reading still under way (its admissions are gone: the host is stopping)."""
        tasks = [self._seeding] if self._seeding is not None else []
        if self.budgets is not None:
            tasks += [view.task for view in self.budgets.views.values() if view.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- admission ----------------------------------------------------------------------

    def _rules_for(self, scope: str, name: str | None) -> tuple[Rule, ...]:
        """The rules of ``scope`` matching ``name`` (remembered per name)."""
        if name is None:
            return ()
        found = self._matched.get((scope, name))
        if found is None:
            found = self._matched[scope, name] = tuple(r for r in self.rules[scope] if matches(r.rule.match, name))
        return found

    @hookimpl
    def ksi_admit(self, host: Any, request: CompletionRequest, provider: Provider, attempt: int) -> Awaitable[None] | None:
        if not self.active:
            return None
        return self._admit(host, request, provider, attempt)

    async def _admit(self, host: Any, request: CompletionRequest, provider: Provider, attempt: int) -> None:
        if not self._seeded:
            await self._ready(host)
        matched = [(r, name) for scope, name in (("deployment", provider.name), ("agent", request.agent_id),
                                                   ("model", request.model)) for r in self._rules_for(scope, name)]
        book = self.budgets
        if not matched and book is None:
            return
        guess = (estimate(request, self.config.chars_per_token, self.config.default_max_tokens)
                 if self.tokens_needed or book is not None else Estimate(0, 0))
        usd = 0.0
        if book is not None:
            price = _price(provider)
            usd = (price(guess.prompt, guess.completion) or 0.0) if price is not None else 0.0
            await book.fresh()
            book.check(request, usd, provider.name)  # over a budget: refused before anything waits
        lease = (request.request_id, attempt)
        if matched:
            tokens = guess.total if self.tokens_needed else 0
            for r, name in matched:
                if r.limit.tpm is not None and tokens > r.limit.tpm:
                    raise BadRequest(
                        f"request needs an estimated {tokens:,} tokens (prompt ~{guess.prompt:,}, answer up to "
                        f"{guess.completion:,}) but limits.rules[{r.index}] ({r.rule.scope} {name!r}) allows "
                        f"{r.limit.tpm:,} tokens per {r.limit.window_s:g} s: it could never be sent (nothing was sent)",
                        provider=provider.name)
            assert self.admission is not None
            await self.admission.acquire(lease, [r.claim(name, tokens) for r, name in matched])
        if book is not None:
            try:
                await book.fresh()
                book.check(request, usd, provider.name)  # what was spent while it waited
            except BaseException:
                if matched:
                    self.admission.wake(await self.store.release(lease, host.clock()))  # type: ignore[union-attr]
                raise
            book.hold(lease, request, usd)
        self.leases[lease] = Lease(bool(matched))

    # -- the true-up ------------------------------------------------------------------------

    @hookimpl
    def ksi_attempt_finished(self, host: Any, request: CompletionRequest, attempt: Attempt,
                             error: OperationalError | None, call: UpstreamCall | None) -> Awaitable[None] | None:
        lease = self.leases.pop((request.request_id, attempt.number), None)
        if lease is None:  # not admitted here (refused, or no rule applied)
            return None
        return self._settle(host, (request.request_id, attempt.number), lease, call)

    async def _settle(self, host: Any, key: Hashable, lease: Lease, call: UpstreamCall | None) -> None:
        """Nothing sent: the reservation goes. Usage reported: it replaces the reservation. An answer without
        usage, or a call of unknown outcome: the reservation stays (the upstream may have counted it). A
        failed call without usage: its tokens go, its request stays counted."""
        if self.budgets is not None:
            cost = None
            if call is not None and call.usage is not None:
                cost = call.usage.cost_usd
            elif call is not None and call.outcome == OUTCOME_UNKNOWN:
                cost = self.budgets.holds[key].usd if key in self.budgets.holds else None
            self.budgets.settle(key, cost)
        if not lease.has_windows:
            return
        now = host.clock()
        if call is None:
            keys = await self.store.release(key, now)
        else:
            if call.usage is not None:
                u = call.usage
                tokens: int | None = max(u.total_tokens, u.prompt_tokens + u.completion_tokens)
            elif call.outcome in (OUTCOME_OK, OUTCOME_UNKNOWN):
                tokens = None
            else:
                tokens = 0
            keys = await self.store.settle(key, tokens, now)
        assert self.admission is not None
        self.admission.wake(keys)

    # -- the windows before this process ---------------------------------------------------

    async def _ready(self, host: Any) -> None:
        """Seed the windows once (every early admission waits for it)."""
        if self._seeding is None:
            self._seeding = asyncio.ensure_future(self._seed(host))
        await asyncio.shield(self._seeding)
        self._seeded = True

    async def _seed(self, host: Any) -> None:
        """Count what the ledger holds of the last ``window_s`` seconds (sent by an earlier process on this
        database) in the windows, as if sent now: a restart does not reopen a full window."""
        if self.store.shared or not host.hooks.implemented("ksi_usage_report"):
            return
        wall, now = time.time(), host.clock()
        asked: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for scope, rules in self.rules.items():
            for r in rules:
                if r.limit.rpm is None and r.limit.tpm is None:
                    continue
                key = (scope, r.limit.window_s)
                if key not in asked:
                    asked[key] = await host.usage_report(_LEDGER_BY[scope], wall - r.limit.window_s)
                for row in asked[key]:
                    name = row["key"]
                    if name is not None and matches(r.rule.match, name) and (row["calls"] or row["total_tokens"]):
                        await self.store.seed((r.index, name), r.limit, int(row["calls"] or 0),
                                              int(row["total_tokens"] or 0), now)

    # -- status ------------------------------------------------------------------------------

    @hookimpl
    async def ksi_status(self, host: Any) -> dict[str, Any] | None:
        if not self.active:
            return None
        if not self._seeded:
            await self._ready(host)
        out: dict[str, Any] = {}
        if self.config.rules:
            out["limits"] = await self._window_rows(host)
        if self.budgets is not None:
            out["budgets"] = await self.budgets.status()
        return out

    async def _window_rows(self, host: Any) -> list[dict[str, Any]]:
        states = await self.store.snapshot(host.clock())
        assert self.admission is not None
        rows = []
        for scope_rules in self.rules.values():
            for r in scope_rules:
                names = sorted(name for (i, name) in states if i == r.index)
                if not is_glob(r.rule.match) and r.rule.match not in names:
                    names.insert(0, r.rule.match)
                for name in names:
                    key: Key = (r.index, name)
                    state = states.get(key)
                    rows.append({
                        "rule": f"rules[{r.index}]", "scope": r.rule.scope, "name": name, "window_s": r.limit.window_s,
                        "requests": state.requests if state else 0, "rpm": r.limit.rpm,
                        "tokens": state.tokens if state else 0, "tpm": r.limit.tpm,
                        "in_flight": state.in_flight if state else 0, "concurrency": r.limit.concurrency,
                        "waiting": self.admission.waiting(key),
                    })
        rows.sort(key=lambda row: (int(row["rule"][6:-1]), row["name"]))
        return rows
