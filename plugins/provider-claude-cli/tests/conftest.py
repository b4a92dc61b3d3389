"""Fixtures of the ksi-provider-claude-cli tests: a fake ``claude`` first on PATH, and Hosts using it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fake_claude
import pytest
from ksi_provider_claude_cli.plugin import Plugin

from ksi_host import Host
from ksi_host.testing import DirectQueue


class FakeCli:
    """The installed fake CLI: its path, its state folder, and the calls it logged."""

    def __init__(self, path: Path, state: Path) -> None:
        self.path = path
        self.state = state

    def calls(self) -> list[dict[str, Any]]:
        return fake_claude.calls(self.state)


@pytest.fixture
def fake_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCli:
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    path = fake_claude.install(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_CLAUDE_DIR", str(state))
    monkeypatch.delenv("FAKE_CLAUDE_FORK", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    return FakeCli(path, state)


@pytest.fixture
def cc_host(make_host: Callable[..., Host], fake_cli: FakeCli) -> Callable[..., Host]:
    """``cc_host(*extra_plugins, table={...}, config={...}, **host_kw)``: a Host with the claude_cli plugin
    (built-in deployment ``claude-cli`` serving ``claude-cli/*``) and DirectQueue."""

    def factory(*extra: Any, table: dict[str, Any] | None = None, config: dict[str, Any] | None = None, **kw: Any) -> Host:
        return make_host(Plugin(), DirectQueue(), *extra, config={"claude_cli": table or {}, **(config or {})}, **kw)

    return factory
