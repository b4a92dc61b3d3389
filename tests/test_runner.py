"""ksi_host.cli.runner: submit_all (in order, windowed; refusals and programming errors) and BatchRunner
(stored results first, bad lines, streaming input, stopping)."""

from __future__ import annotations

import asyncio
import io
import json
import random
from typing import Any

import pytest

from ksi_host import Host, hookimpl
from ksi_host.cli.runner import BatchRunner, parse_line, submit_all
from ksi_host.errors import ValidationError
from ksi_host.models import CompletionRequest, CompletionResult, Ticket
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders


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


# -- BatchRunner ------------------------------------------------------------------------------------


class StoringQueue:
    """Keeps final results in ``store`` (shared between hosts, as a database is) and answers a stored id from it;
    runs at most ``concurrency`` requests at once, each in a task; leaves the others queued when the host stops.
    ``ksi_drain``: nothing more starts; returns once the running ones are stored and their tickets completed."""

    def __init__(self, store: dict[str, CompletionResult], concurrency: int = 4) -> None:
        self.store = store
        self.slots = asyncio.Semaphore(concurrency)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.running: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.started: list[str] = []  # the requests handed to host.execute

    @hookimpl
    def ksi_enqueue(self, host: Any, request: CompletionRequest) -> Ticket:
        if request.request_id in self.store:
            return Ticket.done(self.store[request.request_id])
        ticket = Ticket(request.request_id)

        async def run() -> None:
            async with self.slots:
                if self.draining:
                    await asyncio.get_running_loop().create_future()  # never started: cancelled when the host stops
                self.running.add(task)
                self.started.append(request.request_id)
                result = await host.execute(request)
            self.store[request.request_id] = result
            await asyncio.sleep(0)  # stored, then the ticket completes (as after a commit)
            ticket.set_result(result)
            self.running.discard(task)

        task = asyncio.ensure_future(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return ticket

    @hookimpl
    async def ksi_drain(self) -> None:
        self.draining = True
        await asyncio.gather(*self.running)

    @hookimpl
    async def ksi_shutdown(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _lines(*requests: Any) -> list[tuple[int, str]]:
    return [(n, r if isinstance(r, str) else json.dumps(r)) for n, r in enumerate(requests, 1)]


async def _run(host: Host, lines: Any, **kw: Any) -> tuple[Any, list[dict[str, Any]]]:
    out = io.StringIO()
    stats = await BatchRunner(host, out, io.StringIO(), **kw).run(lines)
    return stats, [json.loads(x) for x in out.getvalue().splitlines()]


async def test_a_stored_result_wins_over_a_model_nothing_serves_now(tmp_path: Any) -> None:
    """A finished batch run again where no provider serves its model: the stored results, not errors."""
    store: dict[str, CompletionResult] = {}
    batch = _lines(*({"model": "m", "prompt": f"q{i}", "request_id": f"r{i}"} for i in range(5)))
    async with Host({}, tmp_path / "a.db", plugins=[StoringQueue(store), ScriptedProviders(FakeProvider("p", model="m"))]) as host:
        _, first = await _run(host, batch)
    assert [r["status"] for r in first] == ["ok"] * 5
    elsewhere = ScriptedProviders(FakeProvider("q", model="other"))
    async with Host({}, tmp_path / "b.db", plugins=[StoringQueue(store), elsewhere]) as host:
        stats, again = await _run(host, batch + [(6, json.dumps({"model": "m", "prompt": "new", "request_id": "r-new"}))])
    assert sorted((r["request_id"], r["status"]) for r in again) == [("r-new", "error")] + [(f"r{i}", "ok") for i in range(5)]
    new = next(r for r in again if r["request_id"] == "r-new")
    # a request with nothing stored still fails naming its line and the field
    assert new["error"] == {"type": "ValidationError",
                            "message": "line 6: model: no provider serves model 'm' (configured models: other)"}
    assert stats.ok == 5 and stats.failed == 1


def _nested(where: str, depth: int) -> str:
    line = {"metadata": {"model": "m", "prompt": "deep", "metadata": {"k": "["}},  # 2 KB and 1,000 deep: json gives up
            "content": {"model": "m", "messages": [{"role": "user", "content": "["}]}}[where]  # json reads it, validation recurses
    return json.dumps(line).replace('"["', "[" * depth + "]" * depth)


@pytest.mark.parametrize("where, depth", [("content", 900), ("metadata", 1000), ("metadata", 100_000)])
async def test_a_deeply_nested_line_is_that_lines_error_and_the_others_run(make_host: Any, where: str, depth: int) -> None:
    item = parse_line(2, _nested(where, depth))
    assert isinstance(item, CompletionResult) and item.error["message"].startswith("line 2: "), item
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("p"))) as host:
        stats, got = await _run(host, _lines({"model": "m", "prompt": "a"}, _nested(where, depth), {"model": "m", "prompt": "b"}))
    assert [r["status"] for r in got].count("ok") == 2 and stats.failed == 1
    bad = next(r for r in got if r["status"] == "error")
    assert bad["error"]["type"] == "ValidationError" and bad["error"]["message"].startswith("line 2: ")


async def test_the_runner_reads_its_input_as_the_window_has_room(make_host: Any) -> None:
    consumed = 0
    at_first_result: list[int] = []

    def lines() -> Any:
        nonlocal consumed
        for n in range(1, 1001):
            consumed = n
            yield n, json.dumps({"model": "m", "prompt": f"q{n}"})

    class Out(io.StringIO):
        def write(self, text: str) -> int:
            at_first_result.append(consumed)
            return super().write(text)

    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("p", script=[_answer_late]))) as host:
        stats = await BatchRunner(host, Out(), io.StringIO(), window=10).run(lines())
    assert stats.ok == stats.total == 1000
    assert at_first_result[0] <= 20  # the first result was out while most of the input was still unread


async def test_stop_starts_nothing_new_and_writes_what_ran(tmp_path: Any) -> None:
    """runner.stop() (the first Ctrl-C): requests running then finish and are written; no other reaches a provider."""
    calls: list[str] = []

    async def slow(request: CompletionRequest) -> str:
        calls.append(request.request_id)
        await asyncio.sleep(0.05)
        return "done"

    store: dict[str, CompletionResult] = {}
    queue = StoringQueue(store, concurrency=4)
    batch = _lines(*({"model": "m", "prompt": f"q{i}", "request_id": f"r{i:02d}"} for i in range(40)))
    async with Host({}, tmp_path / "k.db", plugins=[queue, ScriptedProviders(FakeProvider("p", script=[slow]))]) as host:
        out = io.StringIO()
        runner = BatchRunner(host, out, io.StringIO())
        task = asyncio.ensure_future(runner.run(batch))
        while len(calls) < 6:
            await asyncio.sleep(0.01)
        assert runner.in_flight()[0] == len(host.executing) == 4  # the bar's running: the requests host.execute runs
        runner.stop()
        stats = await asyncio.wait_for(task, 5)
        written = [json.loads(x) for x in out.getvalue().splitlines()]
        assert queue.draining and "execute" not in vars(host)  # stopped through host.drain(), host.execute untouched
    assert 6 <= len(written) < 40 and stats.done == len(written)
    assert sorted(r["request_id"] for r in written) == sorted(calls) == sorted(store)  # each call: stored and written
    assert sorted(queue.started) == sorted(calls)  # the queue handed host.execute nothing after the stop


def test_the_summary_says_how_many_results_an_earlier_run_had_stored():
    """A rerun answers finished requests from the database: its summary says so, or its tokens and cost read
    as if everything had been sent again."""
    import time

    from ksi_host.cli.progress import BatchStats
    from ksi_host.models import CompletionResult, Usage

    stats = BatchStats(3)
    usage = Usage(10, 20, 30, 0.5)
    stats.add(CompletionResult("a", "ok", usage=usage, finished_at=stats.started_wall - 3600))  # an earlier run's
    stats.add(CompletionResult("b", "ok", usage=usage, finished_at=time.time()))
    stats.add(CompletionResult("c", "error", error={"type": "ValidationError", "message": "line 3: bad"},
                               finished_at=time.time()))
    summary = stats.summary()
    assert "Done: 3 of 3 requests in " in summary
    assert ": 2 ok, 1 failed, 0 cancelled; 1 stored by an earlier run (not sent again). Tokens: 20 prompt" in summary
    stats = BatchStats(1)
    stats.add(CompletionResult("b", "ok", usage=usage, finished_at=time.time()))
    assert "earlier run" not in stats.summary()


class _LongFirstLine(io.TextIOBase):
    """A first line of ``length`` characters, then ``rest``, handed out as readline asks; remembers the most
    characters one call returned (what the reader held at once)."""

    def __init__(self, length: int, rest: str) -> None:
        self.left, self.rest, self.most = length, rest, 0

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> str:
        if self.left > 0:
            n = self.left if size is None or size < 0 else min(size, self.left)
            self.left -= n
            text = "x" * n + ("\n" if self.left == 0 else "")
        else:
            text, self.rest = self.rest, ""
        self.most = max(self.most, len(text))
        return text


async def test_a_line_longer_than_the_limit_is_refused_unread_and_the_others_run(make_host: Any, monkeypatch: Any) -> None:
    from ksi_host.cli import runner

    monkeypatch.setattr(runner, "MAX_LINE_CHARS", 1000)
    stream = _LongFirstLine(10_000_000, json.dumps({"model": "m", "prompt": "after", "request_id": "after"}) + "\n")
    async with make_host(DirectQueue(), ScriptedProviders(FakeProvider("p"))) as host:
        out = io.StringIO()
        stats = await BatchRunner(host, out, io.StringIO()).run(runner.iter_lines(stream))
    assert stream.most <= 1024 * 1024 + 1  # never the whole line in memory
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["status"], r["request_id"]) for r in got] == [("error", got[0]["request_id"]), ("ok", "after")]
    assert got[0]["error"]["message"] == "line 1: line: longer than 1,000 characters (not read)"
    assert stats.failed == 1 and stats.ok == 1


def test_a_first_line_too_long_to_read_does_not_decide_the_format() -> None:
    from ksi_host.cli.main import _line_format
    from ksi_host.cli.runner import LongLine

    batch_line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}})
    fmt, lines = _line_format("auto", iter([(1, LongLine("{")), (2, batch_line)]))
    assert fmt.name == "openai-batch" and fmt.detected_from == 2
    assert list(lines) == [(1, "{"), (2, batch_line)]
