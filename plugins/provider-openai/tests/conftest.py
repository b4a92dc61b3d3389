"""Fixtures of the ksi-provider-openai tests (the ``openai_server`` fixture comes from ksi_host.testing)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from ksi_provider_openai.client import HttpClient
from ksi_provider_openai.config import OpenAIConfig, OpenAIDeployment
from ksi_provider_openai.plugin import Plugin, build_pool
from ksi_provider_openai.provider import OpenAIProvider
from openai_helpers import KEY_ENV, SECRET_KEY, FakeClock, deployment

from ksi_host import Host
from ksi_host.providers.circuit import CircuitConfig
from ksi_host.testing import DirectQueue


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET_KEY)
    return SECRET_KEY


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    c = HttpClient(max_connections=8)
    yield c
    await c.close()


@pytest.fixture
def make_provider(openai_server: Any, client: HttpClient) -> Callable[..., OpenAIProvider]:
    """``make_provider(**deployment_keys, circuit=None)``: one OpenAIProvider on the test server."""

    def factory(circuit: dict[str, Any] | None = None, clock: Any = None, **kw: Any) -> OpenAIProvider:
        d = OpenAIDeployment(**deployment(openai_server, **kw))
        cfg = OpenAIConfig(deployments=[d], circuit=CircuitConfig(**(circuit or {})))
        pool = build_pool(cfg, client, clock=clock or FakeClock())
        p = pool.get(d.name)
        assert p is not None
        return p

    return factory


@pytest.fixture
def oa_host(make_host: Callable[..., Host], openai_server: Any, api_key: str) -> Callable[..., Host]:
    """``oa_host(*extra_plugins, deployments=[...], table={...}, config={...}, **host_kw)``: a Host with
    the openai plugin and DirectQueue; deployments default to one ``main`` on the test server."""

    def factory(*extra: Any, deployments: list[dict[str, Any]] | None = None, table: dict[str, Any] | None = None,
                config: dict[str, Any] | None = None, **kw: Any) -> Host:
        t: dict[str, Any] = {"deployments": deployments if deployments is not None else [deployment(openai_server)]}
        t.update(table or {})
        return make_host(Plugin(), DirectQueue(), *extra, config={"openai": t, **(config or {})}, **kw)

    return factory
