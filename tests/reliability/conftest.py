"""Reliability tests: real ``ksi-host`` processes against a real local HTTP server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ksi_host.testing.server import OpenAIServer


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    """The local OpenAI-compatible server in a thread: short Retry-After and hangs, answers after 5 ms."""
    s = OpenAIServer(delay_s=0.005, retry_after="0.1", hang_s=4.0, keep_bodies=True).start_in_thread()
    try:
        yield s
    finally:
        s.stop_thread()
