"""otel_overhead: what ksi-otel costs the host, on host_only's workload, with no exporter.

The workload is benchmarks/host_only.py's (its instant in-process provider, the
real queue, retry and tokens plugins on a database file, requests submitted as
``ksi-host run`` submits them, ``ksi-host run``'s GC settings, one CPU), run
three ways, interleaved round by round, each round a fresh process and database:

* ``without``: those plugins alone;
* ``otel``: the same plus ksi-otel, with ``OTEL_TRACES_EXPORTER=none`` (the
  plugin loaded, its hooks called; it builds no span, since none would go anywhere);
* ``spans``: the same plus ksi-otel building every span (a request span and a
  ``chat`` span per attempt, through the SDK's tracer) and handing them to a
  BatchSpanProcessor whose exporter drops them: the cost of tracing itself,
  without the network.

Reported: completions/s and CPU per request of each (medians over rounds), and
the ratios of their throughput to ``without``. Target (``otel``): within 10%
(ratio >= 0.90); ``spans`` is reported beside it.

    python benchmarks/otel_overhead.py [--n 20000] [--sessions 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import host_only

TARGET_RATIO = 0.90
MODES = ("without", "otel", "spans")


def dropping_provider() -> Any:
    """A tracer provider whose batch span processor exports to an exporter that drops every span."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    return provider


async def run_one(mode: str, n: int, sessions: int, concurrency: int, warmup: int, submit: str, window: int) -> dict[str, Any]:
    """One round of ``mode``: host_only's host (plus ksi-otel for ``otel``), ``warmup`` requests, then ``n`` measured."""
    from ksi_queue.plugin import Plugin as Queue
    from ksi_retry.plugin import Plugin as Retry
    from ksi_tokens.plugin import Plugin as Tokens

    import ksi_host
    from ksi_host.commands import tune_gc

    host_only._mark_hookimpls()
    plugins: list[Any] = [Queue(), Retry(), Tokens(), host_only.InstantPlugin()]
    config: dict[str, Any] = {"queue": {"concurrency": concurrency}}
    provider = None
    if mode != "without":
        from ksi_otel.plugin import Plugin as Otel

        provider = dropping_provider() if mode == "spans" else None
        plugins.append(Otel(tracer_provider=provider))
        config["otel"] = {}

    def requests(tag: str, count: int) -> list[dict[str, Any]]:
        return [{"model": "bench-model", "prompt": f"{tag} question {i}", "session_id": f"s{i % sessions}",
                 "agent_id": "bench", "purpose": "benchmark"} for i in range(count)]

    with tempfile.TemporaryDirectory() as tmp:
        async with ksi_host.Host(config, Path(tmp) / "otel_overhead.db", plugins=plugins) as host:
            otel = next((p for p in plugins if type(p).__module__ == "ksi_otel.plugin"), None)
            spans_built = otel is not None and otel.active
            await host_only.submit_all(host, requests("warm", warmup), submit, window)
            tune_gc()  # what ksi-host run does once its host has started
            c0, t0 = time.process_time(), time.perf_counter()
            results = await host_only.submit_all(host, requests("run", n), submit, window)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if provider is not None:
        provider.shutdown()
    return {"mode": mode, "n": n, "ok": sum(r.ok for r in results), "wall_s": wall, "cpu_s": cpu, "rps": n / wall,
            "cpu_us": cpu / n * 1e6, "spans_built": spans_built}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="requests per round (default 20000)")
    ap.add_argument("--sessions", type=int, default=100, help="sessions the requests are spread over (default 100)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--submit", choices=("batch", "agents"), default="batch",
                    help="how requests are submitted (host_only's modes; default batch, as ksi-host run)")
    ap.add_argument("--window", type=int, default=2000, help="batch: requests in flight at most (default 2000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each mode, interleaved (default 5)")
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--no-pin", action="store_true", help="do not pin each round to one CPU")
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # internal: one round of this mode, JSON out
    args = ap.parse_args()
    if args.one:
        cpu = None if args.no_pin else common.pin_to_one_core()
        reference = common.reference_ms()
        out = asyncio.run(run_one(args.one, args.n, args.sessions, args.concurrency, args.warmup, args.submit, args.window))
        out["cpu"] = cpu
        out["reference_ms"] = (reference + common.reference_ms()) / 2
        print(json.dumps(out))
        return 0

    env = {**os.environ, "OTEL_TRACES_EXPORTER": "none"}
    env.pop("OTEL_SDK_DISABLED", None)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for i in range(args.rounds):  # interleaved, and the order alternates, so load elsewhere hits both alike
        for mode in MODES if i % 2 == 0 else reversed(MODES):
            child = [__file__, "--one", mode, "--n", str(args.n), "--sessions", str(args.sessions), "--concurrency",
                     str(args.concurrency), "--warmup", str(args.warmup), "--submit", args.submit, "--window", str(args.window)]
            if args.no_pin:
                child.append("--no-pin")
            runs[mode].append(common.run_json(child, env))
    if any(r["spans_built"] for r in runs["otel"]) or not all(r["spans_built"] for r in runs["spans"]):
        print("otel_overhead: ksi-otel built spans with OTEL_TRACES_EXPORTER=none, or none in the spans mode "
              "(is OTEL_SDK_DISABLED set?)", file=sys.stderr)
        return 1
    pinned = runs["without"][0]["cpu"]
    print(f"otel_overhead: host_only's workload, {args.n:,} requests per round over {args.sessions} sessions, queue "
          f"concurrency {args.concurrency}, submitted as {args.submit}; "
          f"{'pinned to CPU ' + str(pinned) if pinned is not None else 'not pinned'}; {args.rounds} rounds per mode, "
          f"interleaved; load average {common.load_average()}")
    print("  without: queue, retry, tokens and the instant provider; otel: the same plus ksi-otel, OTEL_TRACES_EXPORTER=none "
          "(no span built); spans: ksi-otel building every span, exported by a batch processor to an exporter that drops them")
    rows = []
    for mode, rs in runs.items():
        rows.append([mode, f"{sum(r['ok'] for r in rs):,}/{sum(r['n'] for r in rs):,}", common.median([r["rps"] for r in rs]),
                     min(r["rps"] for r in rs), max(r["rps"] for r in rs), common.median([r["cpu_us"] for r in rs]),
                     common.median([r["reference_ms"] for r in rs])])
    print(common.table(["mode", "ok", "completions/s", "min", "max", "CPU us/req", "ref ms"], rows))
    print("(medians over rounds; ref ms = CPU time of a fixed Python loop around each round, lower is faster)")
    base_rps, base_cpu = common.median([r["rps"] for r in runs["without"]]), common.median([r["cpu_us"] for r in runs["without"]])
    ratios = {}
    for mode in MODES[1:]:
        per_round = [m["rps"] / w["rps"] for m, w in zip(runs[mode], runs["without"], strict=True)]
        ratios[mode] = common.median([r["rps"] for r in runs[mode]]) / base_rps
        cpu_delta = common.median([r["cpu_us"] for r in runs[mode]]) - base_cpu
        print(f"{mode}/without: throughput {ratios[mode]:.3f} (rounds {', '.join(f'{r:.3f}' for r in per_round)}); "
              f"{cpu_delta:+.1f} us of CPU per request")
    print(f"target: otel/without throughput >= {TARGET_RATIO:.2f} (within 10%): "
          f"{common.verdict(ratios['otel'] >= TARGET_RATIO)} ({ratios['otel']:.3f})")
    print(f"(not a target: with every span built and batch-exported, spans/without = {ratios['spans']:.3f})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
