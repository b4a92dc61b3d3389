"""Fixtures of the ksi-postgres tests: a fresh database per test in one throw-away cluster (the testing kit's
``postgres_dsn``), its DSN in ``KSI_PG_DSN``, and hosts built from explicit plugins (``make_host``)."""

from __future__ import annotations

from typing import Any

import pytest

ENV = "KSI_PG_DSN"


@pytest.fixture
def pg_env(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(ENV, postgres_dsn)
    return postgres_dsn


def pg_config(**postgres: Any) -> dict[str, Any]:
    """A config whose [postgres] table is set (fast leases and polls for tests)."""
    return {"postgres": {"dsn_env": ENV, "lease_s": 1.0, "poll_s": 0.05, "stop_grace_s": 0.2, **postgres}}
