"""The provider kit: what every provider plugin builds on (public API).

A provider plugin subclasses :class:`ProviderPlugin` (the hooks) and
:class:`DeploymentProvider` (one attempt at one deployment), declares its
deployments as :class:`Deployment` subclasses, and maps upstream failures with
:mod:`ksi_host.providers.errormap`. Circuits (:class:`CircuitBreaker`) come with
the pool (:class:`DeploymentPool`).
"""

from .circuit import CircuitBreaker, CircuitConfig
from .deployment_provider import DeploymentProvider
from .deployments import DEFAULT_PRIORITY, Deployment, DeploymentPool, check_unique_names, is_pattern
from .plugin import ProviderPlugin

__all__ = [
    "DEFAULT_PRIORITY",
    "CircuitBreaker",
    "CircuitConfig",
    "Deployment",
    "DeploymentPool",
    "DeploymentProvider",
    "ProviderPlugin",
    "check_unique_names",
    "is_pattern",
]
