"""Fixtures of the ksi-provider-litellm tests.

litellm is imported once per test session (on the first call, by the plugin);
every test after that reuses it.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from ksi_provider_litellm.plugin import Plugin  # noqa: E402
from provider_helpers import KEY_ENV, SECRET_KEY, FakeClock, deployment  # noqa: E402

from ksi_host import Host  # noqa: E402
from ksi_host.testing import DirectQueue  # noqa: E402


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET_KEY)
    return SECRET_KEY


@pytest.fixture
def lit_host(make_host: Callable[..., Host], openai_server: Any, api_key: str) -> Callable[..., Host]:
    """``lit_host(*extra_plugins, deployments=[...], circuit={...}, settings={...}, **host_kw)``: a Host
    with the litellm plugin and DirectQueue; deployments default to one ``main`` on the test server;
    ``settings`` are more keys of the ``[litellm]`` table."""

    def factory(*extra: Any, deployments: list[dict[str, Any]] | None = None, circuit: dict[str, Any] | None = None,
                settings: dict[str, Any] | None = None, config: dict[str, Any] | None = None, **kw: Any) -> Host:
        table: dict[str, Any] = {"deployments": deployments if deployments is not None else [deployment(openai_server)],
                                 **(settings or {})}
        if circuit is not None:
            table["circuit"] = circuit
        return make_host(Plugin(), DirectQueue(), *extra, config={"litellm": table, **(config or {})}, **kw)

    return factory
