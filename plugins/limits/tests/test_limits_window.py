"""The sliding window of one key, and taking several keys at once (LocalWindowStore), with explicit times."""

from __future__ import annotations

from ksi_limits.store import Claim, Limit, LocalWindowStore, Refusal

TPM = Limit(60.0, tpm=100)


def test_tokens_count_from_the_reservation_until_a_window_after_the_call_ended() -> None:
    store = LocalWindowStore()
    assert store.take("a", [Claim((0, "d"), TPM, 60)], now=0.0) is None
    refused = store.take("b", [Claim((0, "d"), TPM, 60)], now=1.0)
    assert refused == Refusal(((0, "d"),), None)  # only the end of "a" can make room: no time to wait for
    store.settle("a", 50, now=10.0)  # the upstream reported 50: that replaces the 60 reserved
    assert store.take("b", [Claim((0, "d"), TPM, 60)], now=11.0) == Refusal(((0, "d"),), 70.0)
    assert store.take("b", [Claim((0, "d"), TPM, 60)], now=69.99) is not None
    assert store.take("b", [Claim((0, "d"), TPM, 60)], now=70.0) is None  # 60 s after "a" ended


def test_the_window_slides_entry_by_entry() -> None:
    store = LocalWindowStore()
    for i, t in enumerate((0.0, 10.0, 20.0)):
        assert store.take(i, [Claim((0, "d"), TPM, 30)], now=t) is None
        store.settle(i, 30, now=t)
    # 90 counted: 50 more needs the first two entries gone
    assert (store.take("x", [Claim((0, "d"), TPM, 50)], now=25.0)).retry_at == 70.0  # type: ignore[union-attr]
    assert store.take("x", [Claim((0, "d"), TPM, 50)], now=69.0) is not None
    assert store.take("x", [Claim((0, "d"), TPM, 50)], now=70.0) is None
    state = (store.snapshot(70.0))[(0, "d")]
    assert (state.tokens, state.requests, state.in_flight) == (80, 2, 1)


def test_requests_per_window_and_concurrency() -> None:
    store = LocalWindowStore()
    limit = Limit(10.0, rpm=2, concurrency=1)
    assert store.take(1, [Claim((0, "a"), limit, 0)], now=0.0) is None
    assert (store.take(2, [Claim((0, "a"), limit, 0)], now=0.0)).retry_at is None  # type: ignore[union-attr]
    store.settle(1, None, now=1.0)
    assert store.take(2, [Claim((0, "a"), limit, 0)], now=1.0) is None
    store.settle(2, None, now=2.0)
    assert (store.take(3, [Claim((0, "a"), limit, 0)], now=2.0)).retry_at == 11.0  # type: ignore[union-attr]
    assert store.take(3, [Claim((0, "a"), limit, 0)], now=11.0) is None


def test_all_keys_or_none() -> None:
    store = LocalWindowStore()
    small = Limit(60.0, tpm=10)
    big = Limit(60.0, tpm=1000)
    refused = store.take(1, [Claim((0, "dep"), big, 20), Claim((1, "agent"), small, 20)], now=0.0)
    assert refused is not None and refused.keys == ((1, "agent"),)
    assert (store.snapshot(0.0))[(0, "dep")].tokens == 0  # the key that had room took nothing


def test_release_leaves_no_trace_and_unknown_leases_are_ignored() -> None:
    store = LocalWindowStore()
    limit = Limit(60.0, rpm=1, tpm=100)
    assert store.take(1, [Claim((0, "d"), limit, 100)], now=0.0) is None
    assert store.release(1, now=1.0) == ((0, "d"),)
    assert store.take(2, [Claim((0, "d"), limit, 100)], now=1.0) is None
    assert store.settle("unknown", 5, now=2.0) == ()
    assert store.release("unknown", now=2.0) == ()


def test_a_settled_call_without_tokens_still_counts_its_request() -> None:
    store = LocalWindowStore()
    limit = Limit(60.0, rpm=1, tpm=100)
    assert store.take(1, [Claim((0, "d"), limit, 80)], now=0.0) is None
    store.settle(1, 0, now=1.0)
    state = (store.snapshot(1.0))[(0, "d")]
    assert (state.tokens, state.requests) == (0, 1)
    assert (store.take(2, [Claim((0, "d"), limit, 80)], now=2.0)).retry_at == 61.0  # type: ignore[union-attr]


def test_seeded_usage_counts_from_the_seed() -> None:
    store = LocalWindowStore()
    store.seed((0, "d"), TPM, 3, 90, now=5.0)
    assert store.take(1, [Claim((0, "d"), TPM, 20)], now=6.0) == Refusal(((0, "d"),), 65.0)


def test_calls_that_end_close_together_share_one_entry_counted_from_the_later_end() -> None:
    store = LocalWindowStore()
    limit = Limit(60.0, rpm=10**6, tpm=10**9)
    for i in range(10_000):  # 10,000 calls over 1 s
        assert store.take(i, [Claim((0, "d"), limit, 5)], now=i / 10_000) is None
        store.settle(i, 3, now=i / 10_000)
    window = store.windows[(0, "d")]
    assert len(window.log) <= 1 / 0.06 + 1
    assert (window.log_tokens, window.log_requests) == (30_000, 10_000)
    first_end, tokens, requests = window.log[0]
    window.expire(first_end + 60.0 - 1e-9)
    assert window.log_tokens == 30_000  # nothing leaves before its own end + 60 s
    window.expire(60.0 + 0.9999 + 0.06)
    assert window.log_tokens == 0
