"""The rate windows shared by hosts (PgWindowStore, offered through ksi_window_store), against a real database:
room and refusal, all keys or none, the true-up, release, expiry, concurrency slots, a gone host's leases, and
hosts taking at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import pg_config
from ksi_postgres.plugin import Plugin
from ksi_postgres.windows import PgWindowStore
from pg_helpers import rows

from ksi_host.windows import Claim, Limit, Refusal, WindowState

D = (0, "dep")
A = (1, "agent7")


def claim(key: Any, tokens: int = 0, **limit: Any) -> Claim:
    return Claim(key, Limit(limit.pop("window_s", 10.0), **limit), tokens)


async def store_of(make_host: Any, tmp_path: Any, name: str = "a", **postgres: Any) -> tuple[Any, PgWindowStore]:
    plugin = Plugin()
    host = make_host(plugin, config=pg_config(**postgres), db_path=tmp_path / f"{name}.db")
    await host.__aenter__()
    assert plugin.windows is not None and host.hooks.implemented("ksi_window_store")
    return host, plugin.windows


@pytest.fixture
async def store(make_host: Any, pg_env: str, tmp_path: Any) -> Any:
    host, windows = await store_of(make_host, tmp_path)
    yield windows
    await host.__aexit__(None, None, None)


async def test_unconfigured_it_offers_nothing(make_host: Any) -> None:
    plugin = Plugin()
    async with make_host(plugin, config={}) as host:
        assert await host.hooks.first("ksi_window_store", host=host) is None
        assert plugin.windows is None


async def test_it_takes_while_there_is_room_and_says_which_key_lacks_it_and_when(store: PgWindowStore) -> None:
    assert store.shared and store.poll_s == 0.2
    assert await store.take("a", [claim(D, 60, tpm=100)], 5.0) is None
    # a is in flight: only its end can make room
    assert await store.take("b", [claim(D, 60, tpm=100)], 5.0) == Refusal((D,), None)
    assert await store.settle("a", 50, 5.0) == (D,)
    # a's 50 tokens count until 10 s after its end; retry_at is on the caller's clock (here 1,000,000 + ~10 s)
    refusal = await store.take("b", [claim(D, 60, tpm=100)], 1_000_000.0)
    assert refusal is not None and refusal.keys == (D,)
    assert refusal.retry_at is not None and 1_000_009.0 < refusal.retry_at <= 1_000_010.0
    assert await store.take("c", [claim(D, 50, tpm=100)], 5.0) is None  # 50 + 50 fits exactly
    assert (await store.snapshot(0.0))[D] == WindowState(requests=2, tokens=100, in_flight=1)


async def test_all_keys_or_none(store: PgWindowStore) -> None:
    assert await store.take("x", [claim(A, 0, rpm=1)], 0.0) is None
    refusal = await store.take("y", [claim(D, 10, tpm=100), claim(A, 10, rpm=1)], 0.0)
    assert refusal is not None and refusal.keys == (A,)
    snap = await store.snapshot(0.0)
    assert snap[D] == WindowState(0, 0, 0)  # nothing was taken in the key that had room
    assert snap[A] == WindowState(1, 0, 1)
    assert await store.release("y", 0.0) == ()  # nothing held


async def test_settle_trues_up_and_release_leaves_no_trace(store: PgWindowStore, pg_env: str) -> None:
    for lease in ("kept", "trued", "gone"):
        assert await store.take(lease, [claim(D, 40, tpm=1000), claim(A, 40)], 0.0) is None
    assert await store.settle("kept", None, 0.0) == (D, A)  # unknown usage: the reservation stays
    assert set(await store.settle("trued", 7, 0.0)) == {D, A}
    assert set(await store.release("gone", 0.0)) == {D, A}
    assert await store.settle("gone", 5, 0.0) == ()  # unknown lease: nothing
    snap = await store.snapshot(0.0)
    assert snap[D] == snap[A] == WindowState(requests=2, tokens=47, in_flight=0)
    left = await rows(pg_env, "SELECT lease, tokens, ended_at IS NOT NULL AS ended FROM ksi_pg_window_leases"
                              " WHERE rule = 0 ORDER BY lease")
    assert [(r["lease"], r["tokens"], r["ended"]) for r in left] == [("'kept'", 40, True), ("'trued'", 7, True)]


async def test_a_failed_call_keeps_its_request_not_its_tokens(store: PgWindowStore) -> None:
    assert await store.take("f", [claim(D, 40, rpm=1, tpm=100)], 0.0) is None
    await store.settle("f", 0, 0.0)
    refusal = await store.take("g", [claim(D, 1, rpm=1, tpm=100)], 0.0)
    assert refusal is not None and refusal.retry_at is not None  # rpm: the window must slide
    assert (await store.snapshot(0.0))[D] == WindowState(1, 0, 0)


async def test_rows_slide_out_and_are_deleted(store: PgWindowStore, pg_env: str) -> None:
    for i in range(3):
        assert await store.take(f"l{i}", [claim(D, 10, rpm=3, window_s=0.3)], 0.0) is None
        await store.settle(f"l{i}", None, 0.0)
    refusal = await store.take("late", [claim(D, 10, rpm=3, window_s=0.3)], 100.0)
    assert refusal is not None and 100.0 < refusal.retry_at <= 100.3  # type: ignore[operator]
    await asyncio.sleep(0.35)
    assert (await store.snapshot(0.0))[D] == WindowState(0, 0, 0)
    assert await store.take("late", [claim(D, 10, rpm=3, window_s=0.3)], 0.0) is None
    left = await rows(pg_env, "SELECT lease FROM ksi_pg_window_leases")
    assert [r["lease"] for r in left] == ["'late'"]  # the three that slid out were deleted by the take


async def test_a_concurrency_slot_is_freed_when_the_call_ends(store: PgWindowStore) -> None:
    assert await store.take("one", [claim(D, concurrency=1)], 0.0) is None
    assert await store.take("two", [claim(D, concurrency=1)], 0.0) == Refusal((D,), None)
    await store.settle("one", 3, 0.0)
    assert await store.take("two", [claim(D, concurrency=1)], 0.0) is None
    await store.release("two", 0.0)
    assert await store.take("three", [claim(D, concurrency=1)], 0.0) is None


async def test_the_leases_of_a_host_that_is_gone_end_and_free_their_slots(make_host: Any, pg_env: str,
                                                                         tmp_path: Any) -> None:
    """A host killed mid-call never settles its lease: once its heartbeat is older than its lease_s, the
    others end its lease (its reservation still counts for window_s, as a call of unknown outcome)."""
    host_a, a = await store_of(make_host, tmp_path, "a", lease_s=0.6)
    host_b, b = await store_of(make_host, tmp_path, "b", lease_s=0.6)
    try:
        assert await b.take("mid-call", [claim(D, 30, concurrency=1, tpm=100)], 0.0) is None
        assert await a.take("x", [claim(D, 30, concurrency=1, tpm=100)], 0.0) == Refusal((D,), None)
        host_b_plugin = [p for p in host_b.pm.get_plugins() if isinstance(p, Plugin)][0]
        for task in host_b_plugin.queue._tasks:  # b is cut off: no more heartbeats
            task.cancel()
        await asyncio.sleep(1.0)
        assert await a.take("x", [claim(D, 30, concurrency=1, tpm=100)], 0.0) is None
        gone = await rows(pg_env, "SELECT tokens, ended_at IS NOT NULL AS ended, host_id FROM ksi_pg_window_leases"
                                  " WHERE lease = $1", repr("mid-call"))
        assert [(r["tokens"], r["ended"], r["host_id"]) for r in gone] == [(30, True, b.host_id)]
        assert (await a.snapshot(0.0))[D] == WindowState(2, 60, 1)
    finally:
        await host_b.__aexit__(None, None, None)
        await host_a.__aexit__(None, None, None)


async def test_a_stopped_host_leaves_no_lease_in_flight(make_host: Any, pg_env: str, tmp_path: Any) -> None:
    host_a, a = await store_of(make_host, tmp_path, "a")
    host_b, b = await store_of(make_host, tmp_path, "b")
    try:
        assert await b.take("held", [claim(D, concurrency=1)], 0.0) is None
        await host_b.__aexit__(None, None, None)  # stopped without settling
        assert await a.take("next", [claim(D, concurrency=1)], 0.0) is None
    finally:
        await host_a.__aexit__(None, None, None)


async def test_hosts_taking_at_once_never_pass_the_limit(make_host: Any, pg_env: str, tmp_path: Any) -> None:
    host_a, a = await store_of(make_host, tmp_path, "a", pool_size=8)
    host_b, b = await store_of(make_host, tmp_path, "b", pool_size=8)
    try:
        limit = {"rpm": 17, "tpm": 10_000}
        answers = await asyncio.gather(*(s.take(f"{i}", [claim(A, 100, **limit), claim(D, 100, **limit)], 0.0)
                                         for i in range(30) for s in (a, b)))
        assert sum(r is None for r in answers) == 17
        snap = await a.snapshot(0.0)
        assert snap[A] == snap[D] == WindowState(17, 1700, 17)
        # a lease is named by its host too: the same name taken on two hosts is two leases
        assert await a.take("same", [claim(D, 1)], 0.0) is None and await b.take("same", [claim(D, 1)], 0.0) is None
        assert await a.release("same", 0.0) == (D,) and await b.release("same", 0.0) == (D,)
    finally:
        await host_b.__aexit__(None, None, None)
        await host_a.__aexit__(None, None, None)


async def test_after_its_stop_the_store_fails_as_the_database_would(make_host: Any, pg_env: str, tmp_path: Any) -> None:
    from ksi_host.errors import DatabaseError

    host, windows = await store_of(make_host, tmp_path)
    await host.__aexit__(None, None, None)
    with pytest.raises(DatabaseError, match="ksi-postgres has stopped"):
        await windows.take("x", [claim(D, rpm=1)], 0.0)
    with pytest.raises(RuntimeError, match="before ksi-postgres started"):
        await PgWindowStore(0.2).take("x", [claim(D, rpm=1)], 0.0)
