"""The ``litellm`` plugin: provider selection and upstream calls through litellm.

Hooks: ``ksi_config_spec`` (the ``[litellm]`` table), ``ksi_startup`` (builds
one :class:`~ksi_provider_litellm.provider.LitellmProvider` and circuit per
deployment), ``ksi_select_provider``, ``ksi_list_providers`` and
``ksi_status`` (``{"circuits": [...]}``). The circuits are kept in the
table ``litellm_circuits`` of the host database: restored at start-up, written
in the background on every change (never a key: names and states only).

Selection: the deployments serving the requested model (exact name or glob),
in the order written; the first that is not in ``exclude`` and whose circuit
allows a call wins. None when no deployment serves the model or every one
that does is excluded (the host then raises NoProviderError). When the only
deployments left have open circuits, selection fails fast with a retryable
ProviderUnavailable whose ``retry_after`` is the shortest remaining cool-down.

Between provider plugins: the host orders them by ``priority`` (lower first,
then plugin name; see ``ksi_select_provider`` in :mod:`ksi_host.hookspecs`),
and asks the next when this one answers None or raises ProviderUnavailable.

At start-up (when the host serves) a deployment whose ``api_key_env`` names
an unset variable is logged as a warning; a model no deployment with its key
serves stops start-up (StartupError). The built-in ``mock`` needs no key.

``mock/<anything>`` is served by the built-in deployment ``mock`` (unless
``mock = false``) through litellm's ``mock_response``: no network, no key.

Importing this module does not import litellm.
"""

from __future__ import annotations

from typing import Any

from ksi_host.providers import CircuitBreaker, DeploymentPool, ProviderPlugin

from .config import MOCK_NAME, MOCK_PATTERN, LitellmConfig, LitellmDeployment
from .provider import LitellmProvider, log

TABLE = "litellm"
CIRCUITS_TABLE = "litellm_circuits"
"""Where the circuits are kept in the host database (so ``ksi-host status`` in another process sees them)."""


class Plugin(ProviderPlugin):
    """One instance per Host; holds the deployments and their circuits (the hooks: :class:`ksi_host.providers.ProviderPlugin`)."""

    TABLE = TABLE
    CONFIG = LitellmConfig
    CIRCUITS_TABLE = CIRCUITS_TABLE
    log = log

    def build_pool(self, config: LitellmConfig, host: Any) -> DeploymentPool[LitellmProvider]:
        return build_pool(config, clock=host.clock)


def build_pool(config: LitellmConfig, *, clock: Any) -> DeploymentPool[LitellmProvider]:
    """The deployments of ``config`` in order, then the built-in mock deployment (if enabled)."""
    providers = [
        LitellmProvider(d, CircuitBreaker.from_config(config.circuit, clock=clock)) for d in config.deployments
    ]
    if config.mock:
        mock = LitellmDeployment(name=MOCK_NAME, model=MOCK_PATTERN, timeout_s=60.0)
        providers.append(LitellmProvider(mock, CircuitBreaker.from_config(config.circuit, clock=clock), mock=True))
    return DeploymentPool(providers, priority=config.priority)
