"""The ``[queue]`` config table."""

from __future__ import annotations

from typing import Any

import attrs


def _positive(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{a.name} must be a positive integer, got {value!r}")


def _model_limits(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"model_limits must be a table of model name = positive integer, got {value!r}")
    for model, limit in value.items():
        if not isinstance(model, str) or not model:
            raise ValueError(f"model_limits: model names must be non-empty strings, got {model!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"model_limits.{model} must be a positive integer, got {limit!r}")


@attrs.define
class QueueConfig:
    """``[queue]``.

    ``concurrency``: requests in flight at most (default 16); ``[host]
    concurrency`` (``ksi-host run --concurrency N``) overrides it.
    ``model_limits``: requests in flight at most per requested model name,
    for example ``{"gpt-4o" = 4}``; models not named are bound only by
    ``concurrency``.
    """

    concurrency: int = attrs.field(default=16, validator=_positive)
    model_limits: dict[str, int] = attrs.field(factory=dict, validator=_model_limits)
