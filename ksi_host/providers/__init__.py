"""The provider kit: what every provider plugin builds on (public API).

A provider plugin subclasses :class:`ProviderPlugin` (the hooks) and
:class:`DeploymentProvider` (one attempt at one deployment), declares its
config as a :class:`ProviderConfig` subclass and its deployments as
:class:`Deployment` subclasses (keys checked by :mod:`ksi_host.providers.validators`),
and maps upstream failures with :mod:`ksi_host.providers.errormap`. Circuits
(:class:`CircuitBreaker`) come with the pool (:class:`DeploymentPool`) and are
kept in the host database by a :class:`CircuitStore`.

Everything a provider plugin imports is named here; the submodules
(``deployments``, ``circuit``, ``circuit_store``, ``config``, ``validators``,
``errormap``, ``deployment_provider``, ``plugin``) are public too.
"""

from . import errormap, validators
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
    "check_unique_names",
    "connection_error",
    "context_window_error",
    "deployments_field",
    "error_detail",
    "error_for_status",
    "errormap",
    "is_pattern",
    "malformed_response",
    "parse_retry_after",
    "redact",
    "timeout_error",
    "validators",
]
