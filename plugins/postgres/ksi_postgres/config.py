"""The ``[postgres]`` config table."""

from __future__ import annotations

import math
from typing import Any

import attrs


def _positive_int(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{a.name} must be a positive integer, got {value!r}")


def _seconds(low: float, high: float) -> Any:
    def check(inst: Any, a: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
            raise ValueError(f"{a.name} must be a number of seconds from {low:g} to {high:g}, got {value!r}")
    return check


def _env_name(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value or not value.replace("_", "").isalnum() or value[0].isdigit():
        raise ValueError(f"{a.name} must name an environment variable (letters, digits, _), got {value!r}")


def _model_limits(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"model_limits must be a table of model name = positive integer, got {value!r}")
    for model, limit in value.items():
        if not isinstance(model, str) or not model:
            raise ValueError(f"model_limits: model names must be non-empty strings, got {model!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"model_limits.{model} must be a positive integer, got {limit!r}")


@attrs.define
class PostgresConfig:
    """``[postgres]``. The plugin takes over the queue and the ledger only when ``dsn_env`` is set.

    ``dsn_env``: the environment variable holding the libpq DSN (it may hold a password: it is never
    written to the config, a log or the database). ``lease_s``: how long a host holds a request
    without renewing its lease (renewed every third of it); a host that stops renewing (killed, cut
    off) loses its requests to the others after this time. ``concurrency``: requests this host runs at
    once (``[host] concurrency`` / ``--concurrency`` override it); ``model_limits``: per requested
    model, on this host. ``poll_s``: how often a host looks for work nobody announced (expired leases,
    missed notifications). ``pool_size``: connections this host opens. ``stop_grace_s``: how long a stopping host
    lets the requests it runs (other hosts' included) finish before it stops them and gives their leases back.
    ``window_poll_s``: how often an attempt waiting for room in the shared rate windows (ksi-limits) looks again
    (room freed on another host wakes nobody here).
    """

    dsn_env: str | None = attrs.field(default=None, validator=_env_name)
    lease_s: float = attrs.field(default=30.0, validator=_seconds(0.5, 86400))
    concurrency: int = attrs.field(default=16, validator=_positive_int)
    model_limits: dict[str, int] = attrs.field(factory=dict, validator=_model_limits)
    poll_s: float = attrs.field(default=1.0, validator=_seconds(0.01, 3600))
    pool_size: int = attrs.field(default=6, validator=_positive_int)
    stop_grace_s: float = attrs.field(default=10.0, validator=_seconds(0, 86400))
    window_poll_s: float = attrs.field(default=0.2, validator=_seconds(0.01, 60))

    @property
    def configured(self) -> bool:
        return self.dsn_env is not None
