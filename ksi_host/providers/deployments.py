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
circuit. :func:`check_keys` tells at start-up which deployments miss their key.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, Generic, Protocol, TypeVar

import attrs

from ..errors import AuthFailed, ProviderUnavailable, StartupError
from ..models import DEFAULT_PROVIDER_PRIORITY, ProviderInfo, iso
from . import validators as v
from .circuit import CircuitBreaker

_GLOB_CHARS = frozenset("*?[")


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
    case-sensitively with :func:`fnmatch.fnmatchcase`. ``api_base`` must be an
    http(s) URL without credentials and, unless ``allow_link_local`` is true, not
    at a link-local or cloud metadata address (:func:`ksi_host.providers.validators.check_url`).
    ``timeout_s``: seconds per attempt (finite, at most a week), or None for no limit.
    """

    name: str = attrs.field(validator=v.non_empty)
    model: str = attrs.field(validator=v.non_empty)
    api_base: str | None = attrs.field(default=None, validator=v.api_base)
    api_key_env: str | None = attrs.field(default=None, validator=v.env_name)
    timeout_s: float | None = attrs.field(default=60.0, converter=_to_float, validator=v.opt_timeout)
    allow_link_local: bool = False

    def matches(self, model: str) -> bool:
        """Does this deployment serve requests for ``model``?

        Given a pattern (another deployment's ``model``), whether this one's pattern
        covers it: ``gpt-*`` matches ``gpt-4o*`` (glob characters match themselves).
        """
        return self.model == model or (is_pattern(self.model) and fnmatchcase(model, self.model))

    def key_missing(self) -> bool:
        """Does this deployment name a key variable that is unset (or empty) now?"""
        return self.api_key_env is not None and not os.environ.get(self.api_key_env)

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


def check_keys(deployments: Sequence[Deployment], *, table: str, log: logging.Logger) -> None:
    """Say at start-up what the first request would otherwise find out, call by call.

    Every deployment whose ``api_key_env`` names an unset (or empty) variable is
    logged as a warning on ``log`` (naming the deployment and the variable, never a
    value): its calls fail with AuthFailed. When no deployment serving one of those
    deployments' models (the same name or pattern, or a pattern covering it) has
    its key, raises StartupError naming the model and the variables to set.
    Deployments that name no variable need no key.
    """
    missing = [d for d in deployments if d.key_missing()]
    if not missing:
        return
    usable = [d for d in deployments if not d.key_missing()]
    for d in missing:
        log.warning("[%s] deployment %r: environment variable %s is not set; its calls fail (AuthFailed) until it is",
                    table, d.name, d.api_key_env)
    uncovered: dict[str, list[Deployment]] = {}
    for d in missing:
        if not any(u.matches(d.model) for u in usable):
            uncovered.setdefault(d.model, []).append(d)
    if uncovered:
        model, ds = next(iter(uncovered.items()))
        need = " or ".join(f"{d.api_key_env} (deployment {d.name!r})" for d in ds)
        more = f" ({len(uncovered) - 1} more model(s) like it)" if len(uncovered) > 1 else ""
        raise StartupError(f"[{table}] no deployment serving model {model!r} has its API key: set {need}{more}")


DEFAULT_PRIORITY = DEFAULT_PROVIDER_PRIORITY
"""The priority of a provider plugin that states none."""


class Member(Protocol):
    """What a :class:`DeploymentPool` holds: a provider plugin's runtime object for one deployment
    (it may also have ``supports``: :attr:`ksi_host.models.ProviderInfo.supports`)."""

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
    plugins by it (:mod:`ksi_host.ranking`). ``wall_clock`` (unix seconds) dates
    the end of open circuits in :meth:`describe` (and in the
    :class:`~ksi_host.providers.circuit_store.CircuitStore` that keeps them).
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
        self.wall_clock = wall_clock

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
        """ProviderInfo for the deployments serving ``model`` (all if None), in try order; each member's
        ``supports`` (what it can send, None: everything) goes with its deployment."""
        members = self.members if model is None else self.serving(model)
        return [
            ProviderInfo(m.deployment.name, m.deployment.model, plugin, m.breaker.state, self.describe(m), self.priority,
                         getattr(m, "supports", None))
            for m in members
        ]

    def describe(self, m: M) -> dict[str, Any]:
        """One deployment's public facts and circuit state (no secrets: only the key's variable name)."""
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
            "opens_until": iso(self.wall_clock() + left) if left > 0 else None,
            "opens": b.opens,
            "last_error": b.last_error,
        }

    def status(self) -> list[dict[str, Any]]:
        """Every deployment's circuit, for ``ksi_status`` (``{"circuits": pool.status()}``)."""
        return [{"name": m.deployment.name, "model": m.deployment.model, "state": m.breaker.state, **self.describe(m)}
                for m in self.members]
