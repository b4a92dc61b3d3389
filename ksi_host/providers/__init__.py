"""The provider kit: what every provider plugin builds on (public API).

A provider plugin subclasses :class:`ProviderPlugin` (the hooks) and
:class:`DeploymentProvider` (one attempt at one deployment), declares its
config as a :class:`ProviderConfig` subclass and its deployments as
:class:`Deployment` subclasses (keys checked by :mod:`ksi_host.providers.validators`),
and maps upstream failures with :mod:`ksi_host.providers.errormap`; a provider
of an OpenAI-compatible endpoint builds its body and reads its answers (whole or
streamed) with :mod:`ksi_host.providers.openai_wire`. Circuits
(:class:`CircuitBreaker`) come with the pool (:class:`DeploymentPool`) and are
kept in the host database by a :class:`CircuitStore`.

Everything a provider plugin imports is named here; the submodules
(``deployments``, ``circuit``, ``circuit_store``, ``config``, ``validators``,
``errormap``, ``deployment_provider``, ``openai_wire``, ``plugin``) are public too.
"""

from ..streaming import deltas_of
from . import errormap, openai_wire, validators
from .circuit import CircuitBreaker, CircuitConfig
from .circuit_store import CircuitStore
from .config import ProviderConfig, deployments_field
from .deployment_provider import DeploymentProvider
from .deployments import DEFAULT_PRIORITY, Deployment, DeploymentPool, check_keys, check_unique_names, is_pattern
from .errormap import (
    connection_error,
    context_window_error,
    error_detail,
    error_for_status,
    malformed_response,
    parse_retry_after,
    redact,
    timeout_error,
)
from .openai_wire import check_options, delta_of, request_body, response_of, sse_data, usage_of
from .plugin import ProviderPlugin

__all__ = [
    "DEFAULT_PRIORITY",
    "CircuitBreaker",
    "CircuitConfig",
    "CircuitStore",
    "Deployment",
    "DeploymentPool",
    "DeploymentProvider",
    "ProviderConfig",
    "ProviderPlugin",
    "check_keys",
    "check_options",
    "check_unique_names",
    "connection_error",
    "context_window_error",
    "delta_of",
    "deltas_of",
    "deployments_field",
    "error_detail",
    "error_for_status",
    "errormap",
    "is_pattern",
    "malformed_response",
    "openai_wire",
    "parse_retry_after",
    "redact",
    "request_body",
    "response_of",
    "sse_data",
    "timeout_error",
    "usage_of",
    "validators",
]
