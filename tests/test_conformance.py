"""The provider conformance suite (:mod:`ksi_host.testing.conformance`) run against a tiny provider written on
the public provider kit (``tests/tiny_provider.py``), so the suite is tested without any plugin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from tiny_provider import Plugin, TinyProvider

from ksi_host.providers import CircuitBreaker, DeploymentPool, DeploymentProvider
from ksi_host.testing.conformance import DeploymentSpec, ProviderConformance


class TestTinyProviderConformance(ProviderConformance):
    def plugin(self) -> Plugin:
        return Plugin()

    def config(self, deployments: Sequence[DeploymentSpec]) -> dict[str, Any]:
        return {"tiny": {"deployments": [attrs.asdict(d) for d in deployments]}}  # the tiny plugin's keys are the spec's


class WholeProvider(TinyProvider):
    """The tiny provider without ``attempt_stream``: the kit answers a streamed request in one piece."""

    attempt_stream = DeploymentProvider.attempt_stream


class WholePlugin(Plugin):
    def build_pool(self, config: Any, host: Any) -> DeploymentPool[WholeProvider]:
        return DeploymentPool([WholeProvider(d, CircuitBreaker.from_config(config.circuit, clock=host.clock))
                               for d in config.deployments], priority=config.priority)


class TestAProviderThatDoesNotStreamConforms(TestTinyProviderConformance):
    """A provider that does not stream piece by piece passes the suite with ``STREAMS = False``: the tests of
    piece-by-piece streaming are left out (not skipped), the one-piece answer is checked."""

    STREAMS = False

    def plugin(self) -> WholePlugin:
        return WholePlugin()


def test_streams_false_leaves_out_the_piece_by_piece_tests_and_adds_the_one_piece_one() -> None:
    for name in ProviderConformance.PIECE_BY_PIECE:
        assert callable(getattr(TestTinyProviderConformance, name)) and getattr(TestAProviderThatDoesNotStreamConforms, name) is None
    assert TestTinyProviderConformance.test_a_stream_is_answered_in_one_piece is None
    assert callable(TestAProviderThatDoesNotStreamConforms.test_a_stream_is_answered_in_one_piece)
