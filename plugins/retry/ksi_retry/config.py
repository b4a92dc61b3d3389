"""The ``[retry]`` config table and the per-model overrides.

::

    [retry]
    base_delay_s = 1      # first backoff window (seconds)
    max_delay_s = 60      # cap of the backoff window (seconds)
    max_attempts = 5      # attempts per request, across all deployments
    seed = 7              # optional: seeds the jitter (reproducible delays)

    [retry.models."gpt-4o*"]   # glob pattern over the requested model name
    max_attempts = 8           # keys left out inherit from [retry]

:meth:`RetryConfig.settings_for` resolves the effective :class:`RetrySettings`
of one model: an exact key wins, else the first matching pattern in file order.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Any

import attrs


def _delay(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is None and a.default is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{a.name} must be a finite number of seconds >= 0, got {value!r}")


def _attempts(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is None and a.default is None:
        return
    if type(value) is not int or value < 1:
        raise ValueError(f"{a.name} must be an integer >= 1, got {value!r}")


def _seed(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is not None and type(value) is not int:
        raise ValueError(f"{a.name} must be an integer or absent, got {value!r}")


def _ordered(base: float, cap: float, where: str) -> None:
    if cap < base:
        raise ValueError(f"{where}max_delay_s ({cap}) must not be less than base_delay_s ({base})")


@attrs.frozen(slots=True)
class RetrySettings:
    """The effective retry settings of one model (overrides applied)."""

    base_delay_s: float
    max_delay_s: float
    max_attempts: int
    pattern: str | None = None  # the [retry.models] key that applied, if any


@attrs.define
class ModelRetry:
    """One ``[retry.models."<pattern>"]`` table; a key left out inherits from ``[retry]``."""

    base_delay_s: float | None = attrs.field(default=None, validator=_delay)
    max_delay_s: float | None = attrs.field(default=None, validator=_delay)
    max_attempts: int | None = attrs.field(default=None, validator=_attempts)


def _models(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"models must be a table of model patterns, got {value!r}")
    for pattern, override in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"models: a model pattern must be a non-empty string, got {pattern!r}")
        if not isinstance(override, ModelRetry):
            raise ValueError(f"models.{pattern!r} must be a table of base_delay_s, max_delay_s, max_attempts")


@attrs.define
class RetryConfig:
    """The ``[retry]`` table. See the module docstring."""

    base_delay_s: float = attrs.field(default=1.0, validator=_delay)
    max_delay_s: float = attrs.field(default=60.0, validator=_delay)
    max_attempts: int = attrs.field(default=5, validator=_attempts)
    seed: int | None = attrs.field(default=None, validator=_seed)
    models: dict[str, ModelRetry] = attrs.field(factory=dict, validator=_models)

    def __attrs_post_init__(self) -> None:
        _ordered(self.base_delay_s, self.max_delay_s, "")
        for pattern in self.models:
            s = self._merge(pattern)
            _ordered(s.base_delay_s, s.max_delay_s, f"models.{pattern!r}: ")

    def _merge(self, pattern: str) -> RetrySettings:
        o = self.models[pattern]
        return RetrySettings(
            self.base_delay_s if o.base_delay_s is None else float(o.base_delay_s),
            self.max_delay_s if o.max_delay_s is None else float(o.max_delay_s),
            self.max_attempts if o.max_attempts is None else o.max_attempts,
            pattern,
        )

    def settings_for(self, model: str) -> RetrySettings:
        """The settings for requests of ``model``: an exact key of ``models`` wins,
        else the first pattern (in file order) that matches, else ``[retry]`` itself."""
        if model in self.models:
            return self._merge(model)
        for pattern in self.models:
            if fnmatchcase(model, pattern):
                return self._merge(pattern)
        return RetrySettings(float(self.base_delay_s), float(self.max_delay_s), self.max_attempts)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)
