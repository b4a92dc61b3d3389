"""ksi_host.cli.runner.submit_all: in order, windowed; refusals and programming errors."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from ksi_host import hookimpl
from ksi_host.cli.runner import submit_all
from ksi_host.errors import ValidationError
from ksi_host.models import CompletionRequest, Ticket
from ksi_host.testing import FakeProvider, ScriptedProviders


class RecordingQueue:
    """Accepts after a turn of the loop (as a group commit would), runs each request in a task."""

    def __init__(self, refuse: tuple[str, ...] = (), boom: str | None = None, fail_run: str | None = None) -> None:
        self.order: list[str] = []
        self.refuse, self.boom, self.fail_run = refuse, boom, fail_run
        self.unfinished = self.most_unfinished = 0

    @hookimpl
    async def ksi_enqueue(self, host: Any, request: CompletionRequest) -> Ticket:
        self.order.append(request.request_id)
        if request.request_id == self.boom:
            raise ZeroDivisionError("a bug in ksi_enqueue")
        if request.request_id in self.refuse:
            raise ValidationError("model", "refused by the queue")
        await asyncio.sleep(0)
        ticket = Ticket(request.request_id)
        self.unfinished += 1
        self.most_unfinished = max(self.most_unfinished, self.unfinished)

        async def run() -> None:
            result = await host.execute(request)
            self.unfinished -= 1
            if request.request_id == self.fail_run:
                ticket.set_exception(RuntimeError("a bug while running"))
            else:
                ticket.set_result(result)

        asyncio.ensure_future(run())
        return ticket


async def _answer_late(request: CompletionRequest) -> str:
    await asyncio.sleep(random.random() / 200)  # finish out of order
    return f"answer {request.request_id}"


def _items(n: int) -> list[tuple[int, CompletionRequest]]:
    return [(i, CompletionRequest.from_dict({"model": "m", "prompt": f"q{i}", "request_id": f"r{i:03d}"})) for i in range(n)]


async def test_every_item_is_submitted_in_order_within_the_window_and_answered(make_host: Any) -> None:
    queue = RecordingQueue()
    results: dict[int, Any] = {}
    submitted: list[int] = []
    async with make_host(queue, ScriptedProviders(FakeProvider("p", script=[_answer_late]))) as host:
        await submit_all(host, _items(300), window=25, on_result=results.__setitem__,
                         on_refused=lambda *a: pytest.fail(f"refused {a}"), on_submitted=submitted.append)
    assert queue.order == [f"r{i:03d}" for i in range(300)]  # the queue saw the file's order
    assert sorted(submitted) == list(range(300)) and len(results) == 300
    assert all(results[i].text == f"answer r{i:03d}" for i in range(300))
    assert 8 <= queue.most_unfinished <= 25  # requests overlapped, never more than the window


async def test_a_refused_request_gets_its_callback_and_the_others_run(make_host: Any) -> None:
    queue = RecordingQueue(refuse=("r002",))
    results: dict[int, Any] = {}
    refused: list[tuple[int, str]] = []
    async with make_host(queue, ScriptedProviders(FakeProvider("p"))) as host:
        await submit_all(host, _items(5), window=2, on_result=results.__setitem__,
                         on_refused=lambda key, request, e: refused.append((key, str(e))))
    assert refused == [(2, "model: refused by the queue")]
    assert sorted(results) == [0, 1, 3, 4]


@pytest.mark.parametrize("where", ["boom", "fail_run"])
async def test_a_programming_error_stops_the_submission_and_is_raised(make_host: Any, where: str) -> None:
    queue = RecordingQueue(**{where: "r010"})
    results: dict[int, Any] = {}
    async with make_host(queue, ScriptedProviders(FakeProvider("p", script=[_answer_late]))) as host:
        with pytest.raises((ZeroDivisionError, RuntimeError), match="a bug"):
            await submit_all(host, _items(500), window=4, on_result=results.__setitem__, on_refused=lambda *a: None)
    assert len(queue.order) < 100  # it stopped submitting soon after
