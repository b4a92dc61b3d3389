"""``GET /metrics``: counters and histograms in the Prometheus text format (version 0.0.4).

Fed by the host's observer hooks (every request and attempt the host runs, whoever submitted it) and by
the HTTP handlers (calls answered by this server). Labels take only values from a bounded set (statuses,
error types, configured client and deployment names, routes): a model name a caller made up never becomes
a label.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
"""Upper bounds (seconds) of every latency histogram."""


class Histogram:
    """Counts per bucket (cumulated when rendered), the sum and the count."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> Iterable[str]:
        sep = "," if labels else ""
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            yield f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}'
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}'
        braces = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{braces} {self.sum!r}"
        yield f"{name}_count{braces} {self.count}"


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """What ``/metrics`` reports. ``request_finished`` and ``attempt_finished`` are called by the plugin's
    observer hooks; ``http`` by the server for each answer."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # status -> finished requests
        self.attempts: Counter[str] = Counter()  # outcome ("ok" or the error type) -> attempts
        self.tokens: Counter[str] = Counter()  # prompt, completion, cached, reasoning
        self.cost_usd = 0.0
        self.unpriced = 0  # finished requests whose cost nobody knew
        self.request_seconds = Histogram()  # submitted (or started) -> final result
        self.attempt_seconds = Histogram()  # one upstream call
        self.ttft_seconds = Histogram()  # streamed attempts: to the first piece
        self.http: Counter[tuple[str, int]] = Counter()  # (route, status) -> answers
        self.http_seconds: dict[str, Histogram] = {}  # route -> time to answer (streams: to their end)
        self.added_seconds = Histogram()  # chat completions answered ok: server time minus upstream call time
        self.by_client: Counter[tuple[str, str]] = Counter()  # (client, route) -> calls

    # -- observers ------------------------------------------------------------------------------

    def request_finished(self, result: Any) -> None:
        self.requests[result.status] += 1
        u = result.usage
        if u.total_tokens:
            self.tokens["prompt"] += u.prompt_tokens
            self.tokens["completion"] += u.completion_tokens
            if u.cached_tokens:
                self.tokens["cached"] += u.cached_tokens
            if u.reasoning_tokens:
                self.tokens["reasoning"] += u.reasoning_tokens
        if u.cost_usd is not None:
            self.cost_usd += u.cost_usd
        elif u.total_tokens:
            self.unpriced += 1
        begun = result.submitted_at or result.started_at
        if begun is not None and result.finished_at is not None:
            self.request_seconds.observe(max(0.0, result.finished_at - begun))

    def attempt_finished(self, attempt: Any, error: Any) -> None:
        self.attempts["ok" if error is None else error.type] += 1
        if attempt.latency_ms is not None:
            self.attempt_seconds.observe(attempt.latency_ms / 1000)
        if attempt.ttft_ms is not None:
            self.ttft_seconds.observe(attempt.ttft_ms / 1000)

    # -- the server -----------------------------------------------------------------------------

    def answered(self, route: str, status: int, seconds: float, client: str | None) -> None:
        self.http[route, status] += 1
        h = self.http_seconds.get(route)
        if h is None:
            h = self.http_seconds[route] = Histogram()
        h.observe(seconds)
        if client is not None:
            self.by_client[client, route] += 1

    def render(self, gauges: Mapping[str, tuple[str, float]]) -> str:
        """The text format; ``gauges``: name -> (help, value), read at scrape time."""
        out: list[str] = []

        def family(name: str, kind: str, help: str) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")

        family("ksi_requests_total", "counter", "Requests the host finished, by final status.")
        for status in sorted(set(self.requests) | {"ok", "error", "cancelled"}):
            out.append(f'ksi_requests_total{{status="{_label(status)}"}} {self.requests[status]}')
        family("ksi_attempts_total", "counter", "Upstream attempts, by outcome (ok or the error type).")
        for outcome in sorted(set(self.attempts) | {"ok"}):
            out.append(f'ksi_attempts_total{{outcome="{_label(outcome)}"}} {self.attempts[outcome]}')
        family("ksi_tokens_total", "counter", "Tokens of finished requests (retries included), by kind.")
        for kind in ("prompt", "completion", "cached", "reasoning"):
            out.append(f'ksi_tokens_total{{kind="{kind}"}} {self.tokens[kind]}')
        family("ksi_cost_usd_total", "counter", "Cost of finished requests where the provider priced them (USD).")
        out.append(f"ksi_cost_usd_total {self.cost_usd!r}")
        family("ksi_unpriced_requests_total", "counter", "Finished requests that used tokens at an unknown cost.")
        out.append(f"ksi_unpriced_requests_total {self.unpriced}")
        family("ksi_request_duration_seconds", "histogram", "From a request's acceptance to its final result.")
        out.extend(self.request_seconds.lines("ksi_request_duration_seconds"))
        family("ksi_attempt_duration_seconds", "histogram", "One upstream call, from sending to its end.")
        out.extend(self.attempt_seconds.lines("ksi_attempt_duration_seconds"))
        family("ksi_time_to_first_token_seconds", "histogram", "Streamed attempts: from sending to the first piece.")
        out.extend(self.ttft_seconds.lines("ksi_time_to_first_token_seconds"))
        family("ksi_serve_http_responses_total", "counter", "HTTP answers of ksi-host serve, by route and status.")
        for (route, status), n in sorted(self.http.items()):
            out.append(f'ksi_serve_http_responses_total{{route="{_label(route)}",code="{status}"}} {n}')
        family("ksi_serve_http_duration_seconds", "histogram", "Time to answer, by route (a stream: to its end).")
        for route, h in sorted(self.http_seconds.items()):
            out.extend(h.lines("ksi_serve_http_duration_seconds", f'route="{_label(route)}"'))
        family("ksi_serve_added_seconds", "histogram",
               "Chat completions answered ok: the server's time minus the upstream calls' time "
               "(the queue's wait, retries' backoff and the host's own work).")
        out.extend(self.added_seconds.lines("ksi_serve_added_seconds"))
        family("ksi_serve_client_requests_total", "counter", "Calls by configured client and route.")
        for (client, route), n in sorted(self.by_client.items()):
            out.append(f'ksi_serve_client_requests_total{{client="{_label(client)}",route="{_label(route)}"}} {n}')
        for name, (help, value) in gauges.items():
            family(name, "gauge", help)
            out.append(f"{name} {value!r}" if isinstance(value, float) else f"{name} {value}")
        return "\n".join(out) + "\n"
