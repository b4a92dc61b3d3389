"""The ``[otel]`` config table.

::

    [otel]
    enabled = true           # false: the plugin stays loaded and does nothing (the SDK is not imported)
    record_content = false   # true: messages in and out go on the attempt spans (gen_ai.input/output.messages)
    service_name = "agents"  # service.name when OTEL_SERVICE_NAME does not set it (default "ksi-host")

Where spans go is not configured here: the standard ``OTEL_*`` environment
variables decide it (see :mod:`ksi_otel.setup`).
"""

from __future__ import annotations

from typing import Any

import attrs

DEFAULT_SERVICE_NAME = "ksi-host"


def _service_name(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"service_name must be a non-empty string or absent, got {value!r}")


@attrs.define
class OtelConfig:
    """The ``[otel]`` table. See the module docstring."""

    enabled: bool = True
    record_content: bool = False
    service_name: str | None = attrs.field(default=None, validator=_service_name)
