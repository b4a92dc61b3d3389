"""Deployments: the upstream endpoints a provider plugin calls, and choosing one.

A :class:`Deployment` is one configured endpoint: a unique ``name`` (it shows
in results as ``provider``), the ``model`` name (or glob pattern) that requests
ask for, an optional ``api_base``, the *name* of the environment variable that
holds its API key (``api_key_env``; never the key) and the per-attempt
``timeout_s``. Provider plugins subclass it to add their own keys (the
LiteLLM plugin adds ``litellm_model``) and use it in their config table as
``deployments: list[MyDeployment]``.

A :class:`DeploymentPool` holds a plugin's deployments in the order written,
each with its :class:`~ksi_host.providers.circuit.CircuitBreaker`, and implements the
selection every provider plugin needs (:meth:`DeploymentPool.select`): the
first deployment serving the model that is neither excluded nor behind an open
circuit.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
import time
from collections.abc import Callable, Container, Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any, Generic, Protocol, TypeVar

import attrs

from ..errors import AuthFailed, ProviderUnavailable
from ..models import DEFAULT_PROVIDER_PRIORITY, ProviderInfo, iso
from .circuit import CircuitBreaker

log = logging.getLogger("ksi_host.providers.deployments")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_GLOB_CHARS = frozenset("*?[")


def _non_empty(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{a.name} must be a non-empty string")


def _opt_non_empty(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _non_empty(inst, a, value)


def _env_name(inst: Any, a: attrs.Attribute, value: Any) -> None:
    # The message never repeats the value: if someone pasted a key here, it must not reach a log.
    if value is not None and (not isinstance(value, str) or not _ENV_NAME.match(value)):
        raise ValueError(
            f"{a.name} must be the name of the environment variable that holds the key "
            "(like OPENAI_API_KEY), never the key itself"
        )


def _timeout(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{a.name} must be a positive number of seconds or absent, got {value!r}")


def _to_float(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def is_pattern(model: str) -> bool:
    """Does ``model`` hold glob characters (``*``, ``?``, ``[``)?"""
    return not _GLOB_CHARS.isdisjoint(model)


@attrs.define(frozen=True)
class Deployment:
    """One configured upstream endpoint (a TOML ``[[<plugin>.deployments]]`` entry).

    ``model`` may be a glob pattern (``gpt-4o*``, ``openai/*``), matched
    case-sensitively with :func:`fnmatch.fnmatchcase`.
    """

    name: str = attrs.field(validator=_non_empty)
    model: str = attrs.field(validator=_non_empty)
    api_base: str | None = attrs.field(default=None, validator=_opt_non_empty)
    api_key_env: str | None = attrs.field(default=None, validator=_env_name)
    timeout_s: float | None = attrs.field(default=60.0, converter=_to_float, validator=_timeout)

    def matches(self, model: str) -> bool:
        """Does this deployment serve requests for ``model``?"""
        return self.model == model or (is_pattern(self.model) and fnmatchcase(model, self.model))

    def api_key(self) -> str | None:
        """The key from the environment variable ``api_key_env``, read now.

        None when the deployment names no variable. Raises AuthFailed naming the
        variable (never a value) when it is unset or empty.
        """
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise AuthFailed(
                f"deployment {self.name!r}: environment variable {self.api_key_env} is not set "
                "(it must hold the API key)",
                provider=self.name,
            )
        return key


def check_unique_names(deployments: Iterable[Deployment], reserved: Mapping[str, str] | None = None) -> None:
    """Raise ValueError naming the first duplicated (or reserved) deployment name.

    ``reserved`` maps each reserved name to why it is reserved (appended to the message).
    """
    seen: set[str] = set()
    for i, d in enumerate(deployments):
        if reserved and d.name in reserved:
            raise ValueError(f"deployments[{i}].name {d.name!r} is reserved {reserved[d.name]}".rstrip())
        if d.name in seen:
            raise ValueError(f"deployments[{i}].name {d.name!r} is used by two deployments (names must be unique)")
        seen.add(d.name)


DEFAULT_PRIORITY = DEFAULT_PROVIDER_PRIORITY
"""The priority of a provider plugin that states none."""


class Member(Protocol):
    """What a :class:`DeploymentPool` holds: a provider plugin's runtime object for one deployment."""

    deployment: Deployment
    breaker: CircuitBreaker


M = TypeVar("M", bound=Member)


class DeploymentPool(Generic[M]):
    """A provider plugin's deployments, in try order, with their circuits.

    ``members`` are the plugin's own objects (often its Provider objects),
    each with ``.deployment`` and ``.breaker``. ``lease_s(member)`` is how long
    a half-open trial call may take before another one is allowed (default:
    the deployment's timeout plus one second). ``priority`` is the plugin's
    rank among provider plugins serving the same model (lower is tried first):
    :meth:`infos` reports it on each ProviderInfo, and the host orders the
    plugins by it (:mod:`ksi_host.ranking`).
    """

    def __init__(self, members: Iterable[M], *, priority: int = DEFAULT_PRIORITY,
                 lease_s: Callable[[M], float | None] | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.members: tuple[M, ...] = tuple(members)
        self.priority = priority
        check_unique_names(m.deployment for m in self.members)
        self._by_name = {m.deployment.name: m for m in self.members}
        self._facts: dict[str, tuple[dict[str, Any], list[str]]] = {}
        self._serving: dict[str, tuple[M, ...]] = {}
        self._lease_s = lease_s or (lambda m: None if m.deployment.timeout_s is None else m.deployment.timeout_s + 1.0)
        self._wall_clock = wall_clock
        self._db: Any = None
        self._table: str | None = None
        self._dirty: dict[str, M] = {}
        self._flusher: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.members)

    def get(self, name: str) -> M | None:
        return self._by_name.get(name)

    def serving(self, model: str) -> tuple[M, ...]:
        """The members whose deployment serves ``model``, in try order (cached per model name)."""
        found = self._serving.get(model)
        if found is None:
            found = tuple(m for m in self.members if m.deployment.matches(model))
            if len(self._serving) >= 4096:
                self._serving.clear()
            self._serving[model] = found
        return found

    def select(self, model: str, exclude: Container[str] = ()) -> M | None:
        """The member for the next attempt at ``model``.

        The first serving deployment, in the order written, that is not in
        ``exclude`` and whose circuit allows a call (claiming the half-open
        trial when that is what allows it). Returns None when no deployment
        serves the model, or every one that does is excluded. When the only
        ones left have open circuits, raises ProviderUnavailable naming them,
        with ``retry_after`` set to the shortest remaining cool-down: the
        request fails fast, and a retry policy may wait and try again.
        """
        blocked: list[M] = []
        for m in self.serving(model):
            if m.deployment.name in exclude:
                continue
            if m.breaker.try_acquire(self._lease_s(m)):
                return m
            blocked.append(m)
        if not blocked:
            return None
        waits = [(m.breaker.cooldown_left(), m) for m in blocked]
        soonest = min(w for w, _ in waits)
        detail = ", ".join(
            f"{m.deployment.name} ({m.breaker.state}" + (f", {w:.1f}s of cool-down left)" if w > 0 else ", trial call in flight)")
            for w, m in waits
        )
        raise ProviderUnavailable(
            f"every deployment left for model {model!r} has an open circuit: {detail}",
            retry_after=soonest if soonest > 0 else None,
            circuit_open=True,
        )

    def infos(self, model: str | None, plugin: str) -> list[ProviderInfo]:
        """ProviderInfo for the deployments serving ``model`` (all if None), in try order."""
        members = self.members if model is None else self.serving(model)
        return [
            ProviderInfo(m.deployment.name, m.deployment.model, plugin, m.breaker.state, self.describe(m), self.priority)
            for m in members
        ]

    def describe(self, m: M) -> dict[str, Any]:
        """One deployment's public facts, circuit state and the pool's ``priority`` (no secrets: only the key's variable name)."""
        b = m.breaker
        left = b.cooldown_left()
        cached = self._facts.get(m.deployment.name)
        if cached is None:  # a deployment is frozen: its facts are worked out once (asdict was most of the cost)
            facts = attrs.asdict(m.deployment)  # only names and settings: a deployment never holds a key
            facts.pop("name", None)
            facts.pop("model", None)
            cached = self._facts[m.deployment.name] = (facts, [k for k, v in facts.items() if isinstance(v, (dict, list))])
        facts, containers = cached
        if containers:  # each caller gets its own copies of the mutable values
            facts = {**facts, **{k: copy.deepcopy(facts[k]) for k in containers}}
        return {
            **facts,
            "failures": b.failures,
            "failures_to_open": b.failures_to_open,
            "cooldown_left_s": round(left, 3),
            "opens_until": iso(self._wall_clock() + left) if left > 0 else None,
            "opens": b.opens,
            "last_error": b.last_error,
            "priority": self.priority,
        }

    # -- persistence ------------------------------------------------------------------

    async def attach(self, db: Any, table: str) -> None:
        """Keep the circuits in ``table`` of ``db`` (a :class:`ksi_host.db.Database`).

        Creates the table (migrations owned by ``table``), restores each
        configured deployment's saved circuit (an open circuit keeps the rest of
        its cool-down, in wall-clock time), then writes every later change in
        the background (:meth:`flush` waits for the writes). So ``ksi-host
        status`` in another process shows the circuits of the running host,
        and a restarted host does not hammer a deployment it knew was down.
        """
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
            raise ValueError(f"table must be an SQL identifier, got {table!r}")
        await db.migrate(table, [
            f"CREATE TABLE {table} ("
            " name TEXT PRIMARY KEY,"
            " model TEXT NOT NULL,"
            " state TEXT NOT NULL,"
            " failures INTEGER NOT NULL,"
            " opens_until REAL,"  # unix seconds when an open circuit allows its trial call; NULL unless open
            " opens INTEGER NOT NULL,"
            " last_error TEXT,"
            " updated_at REAL NOT NULL)"
        ])
        rows = await db.fetchall(f"SELECT name, state, failures, opens_until, opens, last_error FROM {table}")
        now = self._wall_clock()
        for name, state, failures, opens_until, opens, last_error in rows:
            m = self._by_name.get(name)
            if m is not None:
                left = max(0.0, opens_until - now) if opens_until is not None else 0.0
                m.breaker.restore(state=state, failures=failures, cooldown_left=left, opens=opens, last_error=last_error)
        self._db, self._table = db, table
        for m in self.members:
            m.breaker.on_change = lambda _b, m=m: self._mark(m)

    def _mark(self, m: M) -> None:
        self._dirty[m.deployment.name] = m
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_dirty())

    async def _flush_dirty(self) -> None:
        while self._dirty and self._db is not None:
            batch = list(self._dirty.values())
            self._dirty.clear()
            now = self._wall_clock()
            rows = []
            for m in batch:
                b = m.breaker
                left = b.cooldown_left()
                state = "closed" if b.state == "closed" else "open"  # half-open is open with its cool-down over
                rows.append((m.deployment.name, m.deployment.model, state, b.failures,
                             now + left if state == "open" else None, b.opens, b.last_error, now))
            await self._db.executemany(
                f"INSERT INTO {self._table} (name, model, state, failures, opens_until, opens, last_error, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET model = excluded.model,"
                " state = excluded.state, failures = excluded.failures, opens_until = excluded.opens_until,"
                " opens = excluded.opens, last_error = excluded.last_error, updated_at = excluded.updated_at",
                rows,
            )

    async def flush(self) -> None:
        """Wait until every circuit change so far is written."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        if self._dirty and self._db is not None:
            await self._flush_dirty()

    async def detach(self) -> None:
        """Write pending changes and stop persisting (call before the database closes)."""
        await self.flush()
        for m in self.members:
            m.breaker.on_change = None
        self._db = None

    def status(self) -> list[dict[str, Any]]:
        """Every deployment's circuit, for ``ksi_status`` (``{"circuits": pool.status()}``)."""
        return [{"name": m.deployment.name, "model": m.deployment.model, "state": m.breaker.state, **self.describe(m)}
                for m in self.members]
