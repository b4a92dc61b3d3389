"""Helpers of the ksi-postgres tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg

from ksi_host.models import CompletionRequest, ProviderResponse, Usage


async def rows(dsn: str, sql: str, *args: Any) -> list[Any]:
    """Read with a connection of its own (another process would see the same)."""
    con = await asyncpg.connect(dsn)
    try:
        return list(await con.fetch(sql, *args))
    finally:
        await con.close()


class Gate:
    """A provider script item that holds each call until ``open()``; ``arrived`` counts the calls held."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.arrived: list[str] = []

    async def __call__(self, request: CompletionRequest) -> ProviderResponse:
        self.arrived.append(request.request_id)
        await self.event.wait()
        return ProviderResponse(text=f"answer to {request.request_id}", usage=Usage(3, 2, 5, 0.001))

    def open(self) -> None:
        self.event.set()


async def until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "the condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def answered(request: CompletionRequest) -> ProviderResponse:
    return ProviderResponse(text=f"answer to {request.request_id}", usage=Usage(3, 2, 5, 0.001))
