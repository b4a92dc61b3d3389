"""The provider conformance suite (:mod:`ksi_host.testing.conformance`) run against a tiny provider written on
the public provider kit (``tests/tiny_provider.py``), so the suite is tested without any plugin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from tiny_provider import Plugin

from ksi_host.testing.conformance import DeploymentSpec, ProviderConformance


class TestTinyProviderConformance(ProviderConformance):
    def plugin(self) -> Plugin:
        return Plugin()

    def config(self, deployments: Sequence[DeploymentSpec]) -> dict[str, Any]:
        return {"tiny": {"deployments": [attrs.asdict(d) for d in deployments]}}  # the tiny plugin's keys are the spec's
