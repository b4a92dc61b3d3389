"""Progress of a batch: counters, a one-line bar for terminals (tqdm), the closing summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO, Any

import attrs

from ..models import CompletionResult


@attrs.define
class BatchStats:
    """Counters of one ``ksi-host run``.

    ``total``: the request lines of the input (None until known: stdin is counted as it is read).
    ``read``: lines read so far. ``submitted``: requests the queue accepted (bad lines never are).
    ``stored``: results that finished before this run began (an earlier run's, answered from the
    database: nothing was sent for them now; their tokens and cost are in the totals all the same).
    """

    total: int | None
    started: float = attrs.field(factory=time.monotonic)
    started_wall: float = attrs.field(factory=time.time)
    stored: int = 0
    read: int = 0
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
    def expected(self) -> int:
        """The total if known, else the lines read so far."""
        return self.total if self.total is not None else self.read

    def add(self, result: CompletionResult, *, rejected: bool = False) -> None:
        if result.status == "ok":
            self.ok += 1
        elif result.status == "cancelled":
            self.cancelled += 1
        else:
            self.failed += 1
        self.rejected += rejected
        self.stored += result.finished_at is not None and result.finished_at < self.started_wall
        u = result.usage
        self.prompt_tokens += u.prompt_tokens
        self.completion_tokens += u.completion_tokens
        self.total_tokens += u.total_tokens
        if u.cost_usd is not None:
            self.cost_usd = (self.cost_usd or 0.0) + u.cost_usd

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary(self, interrupted: bool = False) -> str:
        elapsed = self.elapsed()
        cost = f"${self.cost_usd:.6f}" if self.cost_usd is not None else "unknown"
        head = "Interrupted" if interrupted else "Done"
        left = self.expected - self.done
        return (
            f"{head}: {self.done} of {self.expected} requests in {elapsed:.2f}s: {self.ok} ok, {self.failed} failed, "
            f"{self.cancelled} cancelled" + (f", {left} not finished (run again to resume)" if left > 0 else "")
            + (f"; {self.stored} stored by an earlier run (not sent again)" if self.stored else "") + ". "
            f"Tokens: {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion = {self.total_tokens:,}; "
            f"cost {cost}. Throughput {self.done / elapsed if elapsed > 0 else 0:,.1f} requests/s, "
            f"{self.total_tokens / elapsed if elapsed > 0 else 0:,.0f} tokens/s."
        )


def _count(n: int) -> str:
    """12, 9.9k, 12k, 1.2M: a short count for the bar."""
    if n < 10_000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.0f}k"
    return f"{n / 1_000_000:.1f}M"


class ProgressBar:
    """One line on ``stream`` (a terminal), redrawn at most every ``interval`` seconds and cut to
    the terminal's width: done/total, failed, running, queued, tokens, rate, ETA.

    ``in_flight()`` gives (running, queued): requests of the batch being answered now, and
    submitted ones waiting for their turn. tqdm draws it; it is imported only when a bar is shown.
    """

    def __init__(self, stats: BatchStats, stream: IO[str], in_flight: Callable[[], tuple[int, int]] = lambda: (0, 0),
                 interval: float = 0.2, enabled: bool | None = None) -> None:
        self.stats = stats
        self.stream = stream
        self.in_flight = in_flight
        self.interval = interval
        self.enabled = stream.isatty() if enabled is None else enabled
        self.stopping = False
        self._last = 0.0
        self._bar: Any = None

    def _open(self) -> Any:
        from tqdm import tqdm

        # what matters most comes first: tqdm cuts the line's end to the terminal's width
        with_total = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"
        no_total = "{n_fmt} done{postfix}"
        return tqdm(total=self.stats.total, file=self.stream, ncols=self._width(), mininterval=0,
                    bar_format=with_total if self.stats.total is not None else no_total, leave=True)

    def _width(self) -> int:
        """The terminal's width less two columns: room for the ``^C`` a terminal echoes after the bar."""
        import os

        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 80
        return max(20, columns - 2)

    def update(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self._bar is None:
            self._bar = self._open()
        s = self.stats
        running, queued = self.in_flight()
        rate = s.done / max(s.elapsed(), 1e-9)
        postfix = f"{s.failed + s.cancelled} failed, {running} running, {queued} queued, {_count(s.total_tokens)} tok, {rate:,.0f}/s"
        if self.stopping:
            postfix += ", stopping"
        elif s.total is not None and rate > 0:
            postfix += f", ETA {self._bar.format_interval((s.total - s.done) / rate)}"
        self._bar.n = s.done
        self._bar.ncols = self._width()  # follows a resized terminal
        self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.refresh()

    def note(self, message: str) -> None:
        """Print ``message`` as a line of its own on the stream, the bar redrawn below it."""
        if self._bar is not None:
            self._bar.clear()
            self.stream.write("\r" + message + "\n")
            self.update(force=True)
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            self._bar.close()
