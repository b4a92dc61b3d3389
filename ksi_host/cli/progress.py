"""Progress of a batch: counters, a one-line bar for terminals, the closing summary."""

from __future__ import annotations

import time
from typing import IO

import attrs

from ..models import CompletionResult


@attrs.define
class BatchStats:
    """Counters of one ``ksi-host run``."""

    total: int
    started: float = attrs.field(factory=time.monotonic)
    submitted: int = 0
    ok: int = 0
    failed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = None
    rejected: int = 0  # lines that never reached the queue (bad input)

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.cancelled

    @property
    def in_flight(self) -> int:
        return self.submitted - (self.done - self.rejected)

    def add(self, result: CompletionResult, *, rejected: bool = False) -> None:
        if result.status == "ok":
            self.ok += 1
        elif result.status == "cancelled":
            self.cancelled += 1
        else:
            self.failed += 1
        self.rejected += rejected
        u = result.usage
        self.prompt_tokens += u.prompt_tokens
        self.completion_tokens += u.completion_tokens
        self.total_tokens += u.total_tokens
        if u.cost_usd is not None:
            self.cost_usd = (self.cost_usd or 0.0) + u.cost_usd

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def bar(self, width: int = 24) -> str:
        elapsed = max(self.elapsed(), 1e-9)
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * width)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else None
        eta_s = f"{eta:,.0f}s" if eta is not None else "?"
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} done, {self.failed + self.cancelled} failed, "
            f"{self.in_flight} in flight, {self.total_tokens:,} tokens, {rate:,.1f} req/s, ETA {eta_s}"
        )

    def summary(self, interrupted: bool = False) -> str:
        elapsed = self.elapsed()
        cost = f"${self.cost_usd:.6f}" if self.cost_usd is not None else "unknown"
        head = "Interrupted" if interrupted else "Done"
        left = self.total - self.done
        return (
            f"{head}: {self.done} of {self.total} requests in {elapsed:.2f}s: {self.ok} ok, {self.failed} failed, "
            f"{self.cancelled} cancelled" + (f", {left} not finished (run again to resume)" if left else "") + ". "
            f"Tokens: {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion = {self.total_tokens:,}; "
            f"cost {cost}. Throughput {self.done / elapsed if elapsed > 0 else 0:,.1f} requests/s, "
            f"{self.total_tokens / elapsed if elapsed > 0 else 0:,.0f} tokens/s."
        )


class ProgressBar:
    """Redraws ``stats.bar()`` on ``stream`` (a terminal) at most every ``interval`` seconds."""

    def __init__(self, stats: BatchStats, stream: IO[str], interval: float = 0.2) -> None:
        self.stats = stats
        self.stream = stream
        self.interval = interval
        self.enabled = stream.isatty()
        self._last = 0.0

    def update(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self.stream.write("\r\x1b[2K" + self.stats.bar())
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            self.stream.write("\n")
            self.stream.flush()
