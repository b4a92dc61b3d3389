"""The README's "Several hosts" section: its config is valid as shown and starts a host on PostgreSQL."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from readme import README, snippet  # noqa: E402

from ksi_host import Host  # noqa: E402


def section() -> str:
    text = README.read_text(encoding="utf-8")
    return text[text.index("## Several hosts"):text.index("## Benchmarks")]


async def test_the_several_hosts_config_starts_a_host_that_takes_the_queue_over(tmp_path: Path, postgres_dsn: str,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    config = tomllib.loads(snippet("toml", 'dsn_env = "KSI_PG_DSN"'))
    monkeypatch.setenv("KSI_PG_DSN", postgres_dsn)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-readme-test")
    monkeypatch.setenv("KSI_HOST_PLUGINS", "queue,tokens,postgres,openai,retry")
    async with Host(config, tmp_path / "host1.db") as host:
        assert [p.name for p in host.plugins if p.name in ("queue", "tokens")] == []  # not started
        status = await host.status()
    assert [(h["state"], h["pid"], h["this"]) for h in status["hosts"]] == [("alive", os.getpid(), True)]
    assert status["queue"]["hosts_alive"] == 1


def test_the_section_shows_the_commands_it_describes() -> None:
    text = section()
    for needed in ("pip install -e plugins/postgres", "export KSI_PG_DSN=", "ksi-host run part1.jsonl",
                   "ksi-host run part2.jsonl", "ksi-host status", "== hosts"):
        assert needed in text, needed
