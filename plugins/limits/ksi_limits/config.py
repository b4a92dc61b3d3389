"""The ``[limits]`` config table.

::

    [limits]
    chars_per_token = 4.0         # the prompt estimate: characters / this, plus 4 tokens per message
    default_max_tokens = 1024     # the completion estimate of a request that sets no max_tokens
    budget_refresh_s = 5.0        # re-read the ledger's spend at most this often

    [[limits.rules]]
    scope = "deployment"          # or "agent", "model"
    match = "openai-main"         # a name or a glob: each matching name gets its own window
    rpm = 600                     # requests per window   } each optional,
    tpm = 200000                  # tokens per window     } at least one
    concurrency = 8               # attempts in flight    }
    window_s = 60                 # default 60 (rpm and tpm count per window_s seconds)

    [[limits.budgets]]
    scope = "agent"               # or "purpose", "total"
    match = "planner"             # a name or a glob ("*": each agent its own budget); "total" takes none
    usd = 5.0
    period = "day"                # or "month" (UTC)
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Any

import attrs

from ksi_host.providers.validators import positive_number

RULE_SCOPES = ("deployment", "agent", "model")
BUDGET_SCOPES = ("agent", "purpose", "total")
PERIODS = ("day", "month")
_GLOB = frozenset("*?[")


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(inst: Any, a: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{a.name} must be one of {', '.join(choices)}; got {value!r}")

    return check


def _name(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{a.name} must be a non-empty name or glob, got {value!r}")


def _positive_int(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is not None and (type(value) is not int or value < 1):
        raise ValueError(f"{a.name} must be a positive integer or absent, got {value!r}")


def _count(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"{a.name} must be a positive integer, got {value!r}")


def _non_negative(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{a.name} must be a number >= 0, got {value!r}")


def matches(pattern: str, name: str) -> bool:
    """Does ``name`` match ``pattern`` (an exact name, or a case-sensitive glob)?"""
    return pattern == name or (not _GLOB.isdisjoint(pattern) and fnmatchcase(name, pattern))


def is_glob(pattern: str) -> bool:
    return not _GLOB.isdisjoint(pattern)


@attrs.define
class LimitRule:
    """One ``[[limits.rules]]`` entry: what a deployment, an agent or a model may use per window.

    Every name ``match`` fits (a deployment's name, a request's ``agent_id`` or
    requested ``model``) gets its own window under this rule.
    """

    scope: str = attrs.field(validator=_one_of(RULE_SCOPES))
    match: str = attrs.field(default="*", validator=_name)
    rpm: int | None = attrs.field(default=None, validator=_positive_int)
    tpm: int | None = attrs.field(default=None, validator=_positive_int)
    concurrency: int | None = attrs.field(default=None, validator=_positive_int)
    window_s: float = attrs.field(default=60.0, converter=lambda v: float(v) if type(v) is int else v, validator=positive_number)

    def __attrs_post_init__(self) -> None:
        if self.rpm is None and self.tpm is None and self.concurrency is None:
            raise ValueError("a rule needs at least one of rpm, tpm, concurrency")


@attrs.define
class BudgetRule:
    """One ``[[limits.budgets]]`` entry: USD an agent, a purpose or everything may spend per UTC day or month."""

    scope: str = attrs.field(validator=_one_of(BUDGET_SCOPES))
    usd: float = attrs.field(converter=lambda v: float(v) if type(v) is int else v, validator=_non_negative)
    match: str = attrs.field(default="*", validator=_name)
    period: str = attrs.field(default="day", validator=_one_of(PERIODS))

    def __attrs_post_init__(self) -> None:
        if self.scope == "total" and self.match != "*":
            raise ValueError(f"a total budget covers everything: leave match out (got {self.match!r})")


def _rules(inst: Any, a: attrs.Attribute, value: Any) -> None:
    for i, r in enumerate(value):
        if not isinstance(r, LimitRule):
            raise ValueError(f"rules[{i}] must be a table (scope, match, rpm, tpm, concurrency, window_s)")


def _budgets(inst: Any, a: attrs.Attribute, value: Any) -> None:
    for i, b in enumerate(value):
        if not isinstance(b, BudgetRule):
            raise ValueError(f"budgets[{i}] must be a table (scope, match, usd, period)")


@attrs.define
class LimitsConfig:
    """The ``[limits]`` table. See the module docstring."""

    rules: list[LimitRule] = attrs.field(factory=list, validator=_rules)
    budgets: list[BudgetRule] = attrs.field(factory=list, validator=_budgets)
    chars_per_token: float = attrs.field(default=4.0, converter=lambda v: float(v) if type(v) is int else v,
                                         validator=positive_number)
    default_max_tokens: int = attrs.field(default=1024, validator=_count)
    budget_refresh_s: float = attrs.field(default=5.0, converter=lambda v: float(v) if type(v) is int else v,
                                          validator=_non_negative)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)
