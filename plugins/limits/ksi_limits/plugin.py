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

``ksi_attempt_finished`` trues each window up and frees the budget hold.
``ksi_status`` shows every window and budget.

Both hooks answer at once, without a coroutine, when the attempt's windows
have room and the budgets' reading is fresh (the common case); only waiting,
reading the ledger and the first admission (which seeds the windows from the
ledger) go through ``async`` code. That bought about 7 us of CPU per request
on host_only with one limit (``benchmarks/limits_admission.py``, against the
all-``async`` version, interleaved: 6,140 -> 7,480 completions/s).
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
from ksi_host.windows import Claim, Key, Limit, WindowStore

from .admission import Admission, answer
from .budgets import BudgetBook
from .config import LimitRule, LimitsConfig, is_glob, matches
from .estimate import Estimate, estimate
from .store import LocalWindowStore

TABLE = "limits"
log = logging.getLogger("ksi_host.limits")

SCOPES = ("deployment", "agent", "model")
_LEDGER_BY = {"deployment": "provider", "agent": "agent", "model": "model"}
"""Rule scope -> the ``by`` of ``host.usage_report`` (to seed the windows from the ledger)."""
_NO_GUESS = Estimate(0, 0)


@attrs.frozen(slots=True)
class Rule:
    """A configured rule with its index and the limit each of its windows keeps."""

    index: int
    rule: LimitRule
    limit: Limit


@attrs.frozen(slots=True)
class Matched:
    """The windows of one (deployment, agent, model): each matching rule with the name it matched."""

    rules: tuple[tuple[Rule, str], ...]
    tokens: bool  # does one of them limit tokens (so the attempt's tokens must be estimated)?


def _price(provider: Provider) -> Any:
    """The deployment's ``cost(prompt_tokens, completion_tokens)``, if the provider offers one."""
    for holder in (provider, getattr(provider, "deployment", None)):
        cost = getattr(holder, "cost", None)
        if callable(cost):
            return cost
    return None


def _tokens(call: UpstreamCall) -> int | None:
    """What a call that was sent leaves in its windows (None: its reservation). See the README's table."""
    if call.usage is not None:
        u = call.usage
        return max(u.total_tokens, u.prompt_tokens + u.completion_tokens)
    if call.outcome in (OUTCOME_OK, OUTCOME_UNKNOWN):  # served, or maybe served: the reservation stays
        return None
    return 0  # failed without usage: its tokens go, its request stays counted


class Plugin:
    """Rate limits and spending budgets. ``store``: the window store (default: the one a plugin offers through
    ``ksi_window_store``, such as ksi-postgres's shared by every host on its database; else
    :class:`LocalWindowStore`, this process's memory)."""

    def __init__(self, store: WindowStore | None = None) -> None:
        self._store = store
        self.store: WindowStore = store or LocalWindowStore()
        self.config = LimitsConfig()
        self.rules: dict[str, list[Rule]] = {}
        self._matched: dict[tuple[str, str | None, str], Matched] = {}
        self.admission = Admission(self.store, time.monotonic, asyncio.sleep)
        self.budgets: BudgetBook | None = None
        self.leases: dict[Hashable, bool] = {}  # admitted attempts -> do they hold windows (else only a budget)?
        self.active = False
        self._seeded = False
        self._seeding: asyncio.Task[None] | None = None

    # -- life cycle ------------------------------------------------------------------

    @hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        return TABLE, LimitsConfig

    @hookimpl
    async def ksi_startup(self, host: Any) -> None:
        config = host.config.get(TABLE)
        self.config = config if isinstance(config, LimitsConfig) else LimitsConfig()
        self.rules = {scope: [] for scope in SCOPES}
        for i, r in enumerate(self.config.rules):
            self.rules[r.scope].append(Rule(i, r, Limit(r.window_s, r.rpm, r.tpm, r.concurrency)))
        self._matched = {}
        self.store = self._store or LocalWindowStore()
        if self._store is None and self.config.rules:  # a plugin keeping state shared by hosts may offer its windows
            self.store = await host.hooks.first("ksi_window_store", host=host) or self.store
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

    def _match(self, request: CompletionRequest, provider: Provider) -> Matched:
        """The rules matching the attempt's deployment, agent and model (remembered per three names)."""
        names = (provider.name, request.agent_id, request.model)
        found = self._matched.get(names)
        if found is None:
            rules = tuple((r, name) for scope, name in zip(SCOPES, names, strict=True) if name is not None
                          for r in self.rules[scope] if matches(r.rule.match, name))
            found = self._matched[names] = Matched(rules, any(r.limit.tpm is not None for r, _ in rules))
        return found

    def _guess(self, request: CompletionRequest) -> Estimate:
        return estimate(request, self.config.chars_per_token, self.config.default_max_tokens)

    @staticmethod
    def _claims(matched: Matched, guess: Estimate, provider: Provider) -> list[Claim]:
        """One claim per window; BadRequest naming the rule whose ``tpm`` the estimate alone exceeds."""
        tokens = guess.total if matched.tokens else 0
        claims = []
        for r, name in matched.rules:
            if r.limit.tpm is not None and tokens > r.limit.tpm:
                raise BadRequest(
                    f"request needs an estimated {tokens:,} tokens (prompt ~{guess.prompt:,}, answer up to "
                    f"{guess.completion:,}) but limits.rules[{r.index}] ({r.rule.scope} {name!r}) allows "
                    f"{r.limit.tpm:,} tokens per {r.limit.window_s:g} s: it could never be sent (nothing was sent)",
                    provider=provider.name)
            claims.append(Claim((r.index, name), r.limit, tokens))
        return claims

    @hookimpl
    def ksi_admit(self, host: Any, request: CompletionRequest, provider: Provider, attempt: int) -> Awaitable[None] | None:
        if not self.active:
            return None
        if not self._seeded or (self.budgets is not None and self.budgets.stale()):
            return self._read_then_admit(host, request, provider, attempt)
        return self._admit(host, request, provider, attempt)

    async def _read_then_admit(self, host: Any, request: CompletionRequest, provider: Provider, attempt: int) -> None:
        """Seed the windows from the ledger (once), read the budgets' spend (when stale), then admit."""
        if not self._seeded:
            await self._ready(host)
        if self.budgets is not None:
            await self.budgets.fresh()
        waiting = self._admit(host, request, provider, attempt)
        if waiting is not None:
            await waiting

    def _admit(self, host: Any, request: CompletionRequest, provider: Provider, attempt: int) -> Awaitable[None] | None:
        """Admit the attempt now (None) or refuse it (raise), or return what waits for room."""
        matched = self._match(request, provider)
        book = self.budgets
        if not matched.rules and book is None:
            return None
        guess = self._guess(request) if matched.tokens or book is not None else _NO_GUESS
        usd = 0.0
        if book is not None:
            price = _price(provider)
            usd = (price(guess.prompt, guess.completion) or 0.0) if price is not None else 0.0
            book.check(request, usd, provider.name)  # over a budget: refused before anything waits
        lease = (request.request_id, attempt)
        self.leases[lease] = bool(matched.rules)  # from here on, ksi_attempt_finished releases what the store holds
        if matched.rules:
            waiting = self.admission.acquire(lease, self._claims(matched, guess, provider))
            if waiting is not None:
                return self._after_wait(host, waiting, lease, request, provider, usd)
        if book is not None:
            book.hold(lease, request, usd)
        return None

    async def _after_wait(self, host: Any, waiting: Awaitable[None], lease: Hashable, request: CompletionRequest,
                          provider: Provider, usd: float) -> None:
        await waiting
        book = self.budgets
        if book is not None:
            try:
                await book.fresh()
                book.check(request, usd, provider.name)  # what was spent while it waited
            except BaseException:
                self.admission.wake(await answer(self.store.release(lease, host.clock())))
                raise
            book.hold(lease, request, usd)

    # -- the true-up ------------------------------------------------------------------------

    @hookimpl
    def ksi_attempt_finished(self, host: Any, request: CompletionRequest, attempt: Attempt,
                             error: OperationalError | None, call: UpstreamCall | None) -> Awaitable[None] | None:
        """Nothing sent: the reservation goes. Sent: see :func:`_tokens`. The budget hold goes; the call's cost
        counts as spent (a call of unknown outcome: its estimated cost)."""
        lease = (request.request_id, attempt.number)
        windows = self.leases.pop(lease, None)
        if windows is None:  # not admitted here (refused, or no rule applied)
            return None
        if self.budgets is not None:
            cost = None
            if call is not None and call.usage is not None:
                cost = call.usage.cost_usd
            elif call is not None and call.outcome == OUTCOME_UNKNOWN:
                hold = self.budgets.holds.get(lease)
                cost = hold.usd if hold is not None else None
            self.budgets.settle(lease, cost)
        if not windows:
            return None
        now = host.clock()
        held = self.store.release(lease, now) if call is None else self.store.settle(lease, _tokens(call), now)
        if hasattr(held, "__await__"):  # a shared store's answer
            return self._wake_after(held)
        self.admission.wake(held)
        return None

    async def _wake_after(self, held: Awaitable[tuple[Key, ...]]) -> None:
        self.admission.wake(await held)

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
                        await answer(self.store.seed((r.index, name), r.limit, int(row["calls"] or 0),
                                                     int(row["total_tokens"] or 0), now))

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
        states = await answer(self.store.snapshot(host.clock()))
        rows = []
        for r in sorted((r for rules in self.rules.values() for r in rules), key=lambda r: r.index):
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
        return rows
