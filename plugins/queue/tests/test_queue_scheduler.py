"""The in-memory schedule alone (no Host, no I/O)."""

from __future__ import annotations

from ksi_queue.scheduler import ACCEPTING, DONE, QUEUED, RUNNING, STORING, Entry, Scheduler


def entry(seq: int, session: str | None = None, model: str = "m", rank: int = 2) -> Entry:
    return Entry(seq, f"r{seq}", session, model, rank, 0.0)


def submit(s: Scheduler, *entries: Entry) -> None:
    for e in entries:
        s.add(e)
    for e in entries:
        s.queued(e)


def finish(s: Scheduler, e: Entry) -> None:
    s.executed(e)
    s.done(e)


def ids(entries: list[Entry]) -> list[int]:
    return [e.seq for e in entries]


def test_only_a_sessions_head_is_ready_and_it_moves_on_when_done() -> None:
    s = Scheduler(10)
    a1, a2, a3, n = entry(1, "A"), entry(2, "A"), entry(3, "A"), entry(4)
    submit(s, a1, a2, a3, n)
    assert ids(s.take()) == [1, 4]
    s.executed(a1)
    assert s.take() == [] and a1.state == STORING  # the slot is free, the session still waits for the store
    s.done(a1)
    assert ids(s.take()) == [2]
    finish(s, a2)
    assert ids(s.take()) == [3]
    finish(s, a3)
    assert s.sessions == {}


def test_an_accepting_head_blocks_its_session_until_stored() -> None:
    s = Scheduler(10)
    a1, a2 = entry(1, "A"), entry(2, "A")
    s.add(a1)
    s.add(a2)
    s.queued(a2)  # stored first, but a1 is ahead of it
    assert s.take() == [] and a1.state == ACCEPTING
    s.queued(a1)
    assert ids(s.take()) == [1]


def test_dropped_and_cancelled_entries_are_skipped() -> None:
    s = Scheduler(1)
    a1, a2, a3 = entry(1, "A"), entry(2, "A"), entry(3, "A")
    n1, n2 = entry(4), entry(5)
    submit(s, a1, a2, a3, n1, n2)
    assert ids(s.take()) == [1]
    n1.state = STORING  # cancelled while queued (lazy deletion from the heap)
    a2.state = STORING
    s.done(a2)  # stored before it reached the head: removed when it does
    finish(s, a1)
    assert ids(s.take()) == [3]
    finish(s, a3)
    assert ids(s.take()) == [5] and "A" not in s.sessions


def test_global_and_model_limits() -> None:
    s = Scheduler(3, {"slow": 1})
    slow = [entry(i, model="slow") for i in range(1, 4)]
    fast = [entry(i, model="fast") for i in range(4, 7)]
    submit(s, *slow, *fast)
    started = s.take()
    assert ids(started) == [1, 4, 5]  # slow2, slow3 wait for the model, fast6 for the global limit
    assert s.in_flight == 3 and s.model_in_flight["slow"] == 1
    finish(s, fast[0])
    assert ids(s.take()) == [6]
    finish(s, slow[0])
    assert ids(s.take()) == [2]
    assert [e.state for e in slow] == [DONE, RUNNING, QUEUED]


def test_priority_then_submission_order_among_ready_entries() -> None:
    s = Scheduler(1)
    es = [entry(1, rank=4), entry(2, rank=0), entry(3, rank=2), entry(4, rank=0), entry(5, "A", rank=3),
          entry(6, "A", rank=0)]
    submit(s, *es)
    order = []
    while True:
        started = s.take()
        if not started:
            break
        order += ids(started)
        finish(s, started[0])
    assert order == [2, 4, 3, 5, 6, 1]  # 6 (critical) still waits for 5, its session's earlier request


def test_restore_makes_each_sessions_first_entry_ready() -> None:
    s = Scheduler(100)
    es = [Entry(i, f"r{i}", f"s{i % 3}" if i % 4 else None, "m", 2, 0.0, None, QUEUED) for i in range(1, 13)]
    s.restore(es)
    assert ids(s.take()) == [1, 2, 3, 4, 8, 12]
