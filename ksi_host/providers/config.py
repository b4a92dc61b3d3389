"""The config table every provider plugin shares: :class:`ProviderConfig`.

A provider plugin's config class subclasses it, adds its own keys and declares
``deployments`` with its own :class:`~ksi_host.providers.deployments.Deployment`
subclass (the host builds the table from the type annotations)::

    @attrs.define(frozen=True)
    class MyConfig(ProviderConfig):
        max_connections: int = attrs.field(default=100, validator=positive_int)
        deployments: list[MyDeployment] = deployments_field()

The keys it brings: ``priority`` (this plugin's rank among provider plugins
serving one model: lower first; the host orders the plugins by it),
``circuit`` (a :class:`~ksi_host.providers.circuit.CircuitConfig`) and
``deployments`` (tried in the order written; names unique, and not one of
:meth:`ProviderConfig.reserved_names`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from . import validators as v
from .circuit import CircuitConfig
from .deployments import DEFAULT_PRIORITY, Deployment, check_unique_names


def unique_deployments(inst: Any, a: attrs.Attribute, value: Any) -> None:
    """The ``deployments`` validator: unique names, none of ``inst.reserved_names()``."""
    check_unique_names(value, inst.reserved_names())


def deployments_field() -> Any:
    """The ``deployments`` field of a :class:`ProviderConfig` subclass (a list, names checked)."""
    return attrs.field(factory=list, validator=unique_deployments)


@attrs.define(frozen=True)
class ProviderConfig:
    """The keys every provider plugin's table has: ``priority``, ``circuit``, ``deployments``.

    ``priority``: this plugin's rank among provider plugins serving the same
    model (lower first; plugins stating none rank at 100; ties by plugin name).
    ``circuit``: when a deployment's circuit opens, and for how long.
    ``deployments``: tried in the order written.
    """

    priority: int = attrs.field(default=DEFAULT_PRIORITY, validator=v.priority)
    circuit: CircuitConfig = attrs.field(factory=CircuitConfig)
    deployments: list[Deployment] = deployments_field()

    def reserved_names(self) -> Mapping[str, str]:
        """Deployment names the plugin keeps for itself (a built-in deployment), each with why.

        Override it when the plugin adds a deployment of its own; the message of
        a clash ends with the reason (``"for the built-in deployment ..."``).
        """
        return {}


__all__ = ["ProviderConfig", "deployments_field", "unique_deployments"]
