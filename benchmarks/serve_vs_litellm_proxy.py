"""ksi-host serve against LiteLLM's proxy: throughput at concurrency 64 and added latency at a fixed rate.

The servers run at once, in their own processes, each on one CPU (every thread pinned), in front of the
same local upstream (``ksi_host.testing.server`` with a fixed latency, its own process) which shares the
other CPU with the load generator (this process: aiohttp client coroutines, one connection pool):

* ``serve``: ``ksi-host serve`` with ksi-queue, ksi-provider-openai, ksi-retry, ksi-tokens and ksi-serve,
  one configured client (a bearer token), on a database file: every request, result and ledger row
  durable before the answer.
* ``litellm``: LiteLLM's proxy started as its docs say (``litellm --config litellm.yaml --port P``), a
  master key (it refuses to start without one), no database; one worker (its default).
* ``bare``: ``benchmarks/bare_proxy.py``, aiohttp's server forwarding with aiohttp's client and nothing else
  (no queue, database, retries or ledger): the floor of any server built as serve is, on this machine in
  this run. Serve's own share is its added latency minus the bare proxy's.

The same requests go to each (a prompt holding a unique id, ``Authorization: Bearer``), in interleaved
rounds. Two phases per round and server:

* throughput: ``-c`` workers, each sending its next request when it has its answer, for ``--tp-seconds``;
  completions/s;
* added latency: an open loop at ``--rate`` requests/s (or half the server's throughput, if that is lower:
  a server that cannot keep up only queues, unless ``--same-rate``) for ``--seconds``; for each request the client's
  time (sending to the end of the answer) minus the upstream's own time for it (from its arrival log:
  arrival to answer sent, matched by the prompt's id); p50, p99, mean. A direct run (client -> upstream,
  no server between) in the same round shows the floor of that measure: the client's own share (its aiohttp
  client building the request and reading the answer) and the network's, which no server can take away.
  The targets are for the server's time minus the upstream's (the issue's words): each server's numbers with
  that round's direct p50 taken off ("net"). The raw numbers are printed too; only the floor's median is taken
  off the p99 (its tail stays in), so the net p99 errs against the server.

Neither the load generator nor the upstream collects garbage while a phase runs (both collect between
phases): a collection there stops that process for up to 15 ms here, and the requests it holds up would
count as the server's added latency (measured: the clusters of slow requests above the p99 matched the load
generator's own collections).

Afterwards the serve database is checked: a stored ``ok`` result and a ledger row for every request sent.
Prints the tables, the ratios, and PASS or MISS for the targets (throughput >= 5x LiteLLM's, added p50
<= 1 ms and p99 <= 5 ms at 500/s).

    python benchmarks/serve_vs_litellm_proxy.py --litellm /path/to/venv/bin/litellm
        [--delay 0.02] [--tp-seconds 10] [-c 64] [--rate 500] [--seconds 10] [--rounds 2] [--json out.json]

``litellm[proxy]`` is large: install it in a venv of its own, with the OpenTelemetry SDK (its key check
imports ``opentelemetry.sdk`` on every request without depending on it; missing, each request retries the
failed import, about 20 ms more per request here), and pass its ``litellm``::

    python -m venv /tmp/lp && /tmp/lp/bin/pip install 'litellm[proxy]' opentelemetry-sdk
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, verdict  # noqa: E402

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MODEL = "gpt-bench"
TARGET_RATIO, TARGET_P50_MS, TARGET_P99_MS = 5.0, 1.0, 5.0


# -- processes -----------------------------------------------------------------------------------------


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus`` (threads started later inherit it from theirs)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def server_env() -> dict[str, str]:
    """The servers' environment: bytecode cached as after any ``pip install`` (a sandbox or tox may set
    PYTHONDONTWRITEBYTECODE: LiteLLM's proxy imports modules lazily while it answers, and would compile them)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server started next)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> Any:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def wait_ready(url: str, what: str, proc: subprocess.Popen[Any], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} was not ready within {timeout_s} s")


class Upstream:
    """The running upstream: its base URL, and a way to have it collect its garbage (it does not on its own)."""

    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid = url, pid

    def collect(self) -> None:
        os.kill(self.pid, signal.SIGUSR1)


@contextmanager
def upstream(delay_s: float, cpus: set[int]) -> Iterator[Upstream]:
    """The local OpenAI-compatible server, keeping bodies (to match arrivals to requests), its garbage collector off
    but for SIGUSR1 (:meth:`Upstream.collect`, between phases)."""
    code = ("import asyncio, gc, json, signal; from ksi_host.testing.server import OpenAIServer\n"
            f"s = OpenAIServer(delay_s={delay_s!r}, keep_bodies=True)\n"
            "async def main():\n"
            "    await s.start(); gc.disable()\n"
            "    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, gc.collect)\n"
            "    print(json.dumps({'url': s.url}), flush=True); await asyncio.Event().wait()\n"
            "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = json.loads(proc.stdout.readline())["url"]
        pin(proc.pid, cpus)
        yield Upstream(url, proc.pid)
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def serve_process(tmp: Path, url: str, token: str, cpus: set[int]) -> Iterator[tuple[str, Path]]:
    from ksi_serve.testing import ServeProcess, toml

    cfg = tmp / "ksi.toml"
    cfg.write_text(toml({
        "serve": {"clients": [{"name": "bench", "key_env": "KSI_BENCH_CLIENT_TOKEN"}], "max_pending": 4096},
        "queue": {"concurrency": 256},
        "openai": {"max_connections": 256, "deployments": [
            {"name": "local", "model": MODEL, "api_base": url, "api_key_env": "KSI_BENCH_KEY", "timeout_s": 30.0}]},
    }))
    env = {k: v for k, v in server_env().items() if not k.startswith("KSI_HOST_")}
    env.update(KSI_HOST_PLUGINS="queue,openai,retry,tokens,serve", KSI_BENCH_CLIENT_TOKEN=token,
               KSI_BENCH_KEY="sk-bench-upstream", OTEL_TRACES_EXPORTER="none")
    db = tmp / "serve.db"
    proc = ServeProcess(cfg, db, env=env).start()
    try:
        pin(proc.pid, cpus)
        yield proc.url, db
    finally:
        code = proc.stop()
        if code != 0:
            print(proc.log(), file=sys.stderr)


@contextmanager
def litellm_proxy(litellm: str, tmp: Path, url: str, token: str, cpus: set[int]) -> Iterator[str]:
    cfg = tmp / "litellm.yaml"
    cfg.write_text(f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {url}
      api_key: os.environ/KSI_BENCH_KEY
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
""")
    port = free_port()
    env = dict(server_env(), LITELLM_MASTER_KEY=token, KSI_BENCH_KEY="sk-bench-upstream")
    env.pop("DATABASE_URL", None)
    log = open(tmp / "litellm.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([litellm, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=log, env=env, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health/liveliness", "the litellm proxy", proc)
        pin(proc.pid, cpus)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextmanager
def bare_proxy(tmp: Path, url: str, token: str, cpus: set[int]) -> Iterator[str]:
    """benchmarks/bare_proxy.py: aiohttp's server and client with nothing of their own (the floor)."""
    port = free_port()
    log = open(tmp / "bare.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("bare_proxy.py")), url.removesuffix("/"),
                             str(port)], stdout=log, stderr=log, env=dict(server_env(), KSI_BENCH_CLIENT_TOKEN=token))
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", "the bare proxy", proc)
        pin(proc.pid, cpus)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait()
        log.close()


# -- the load ------------------------------------------------------------------------------------------


@contextmanager
def quiet_gc(up: Upstream | None = None) -> Iterator[None]:
    """No garbage collection in this process while the block runs; afterwards this process and ``up`` collect."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()
        if up is not None:
            up.collect()


class Load:
    """The load generator: one aiohttp session, requests with unique ids, their client-side times."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.sent = 0

    async def __aenter__(self) -> Load:
        import aiohttp

        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024, force_close=False),
                                          headers={"Authorization": f"Bearer {self.token}"})
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.http.close()

    async def one(self, url: str, rid: str) -> tuple[str, float, int]:
        """(rid, client seconds, HTTP status); status 0 when the connection failed (an error, counted as one: a
        server may close an idle kept-alive connection just as the next request goes out on it)."""
        import aiohttp

        body = {"model": MODEL, "messages": [{"role": "user", "content": f"benchmark request {rid}"}], "max_tokens": 16}
        started = time.perf_counter()
        try:
            async with self.http.post(f"{url}/chat/completions", json=body) as resp:
                await resp.read()
                status = resp.status
        except aiohttp.ClientConnectionError:
            return rid, time.perf_counter() - started, 0
        self.sent += 1
        return rid, time.perf_counter() - started, status

    async def closed_loop(self, url: str, tag: str, seconds: float, concurrency: int) -> tuple[float, int]:
        """``concurrency`` workers, each sending its next request when it has its answer, for ``seconds``:
        (completions/s, errors)."""
        errors = done = 0
        counter = iter(range(10**9))
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal errors, done
            while time.perf_counter() < deadline:
                _, _, status = await self.one(url, f"{tag}-{next(counter)}")
                errors += status != 200
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - started), errors

    async def open_loop(self, url: str, tag: str, rate: float, seconds: float) -> tuple[list[tuple[str, float, int]], float]:
        """One request every ``1/rate`` s for ``seconds``, whatever the answers do; (rid, client s, status) and
        the rate achieved (sent / elapsed)."""
        n = int(rate * seconds)
        tasks = []
        started = time.perf_counter()
        for i in range(n):
            wait = started + i / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.ensure_future(self.one(url, f"{tag}-{i}")))
        sent_in = time.perf_counter() - started
        return list(await asyncio.gather(*tasks)), n / sent_in


def upstream_times(base: str) -> dict[str, float]:
    """Request id -> the upstream's own time for it (arrival to answer sent), from its log; the log is reset."""
    arrivals = get_json(f"{base}/_ksi/arrivals")
    get_json(f"{base}/_ksi/reset", data=b"{}")
    out = {}
    for a in arrivals:
        rid = a["body"]["messages"][-1]["content"].split()[-1]
        if a.get("answered_at") is not None:
            out[rid] = a["answered_at"] - a["t"]
    return out


def added_ms(samples: list[tuple[str, float, int]], up: dict[str, float]) -> dict[str, Any]:
    added = sorted((client - up[rid]) * 1000 for rid, client, status in samples if status == 200 and rid in up)
    errors = sum(status != 200 for _, _, status in samples)

    def pct(p: float) -> float:
        return added[min(len(added) - 1, int(p * len(added)))] if added else float("nan")

    return {"n": len(added), "errors": errors, "p50": pct(0.50), "p99": pct(0.99), "mean": statistics.fmean(added),
            "max": added[-1]}


# -- the run -------------------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, up: Upstream, servers: dict[str, str], tokens: dict[str, str]) -> dict[str, Any]:
    up_url = up.url
    base = up_url.removesuffix("/v1")
    runs: dict[str, dict[str, list[Any]]] = {name: {"rps": [], "errors": [], "latency": []} for name in servers}
    runs["direct"] = {"rps": [], "errors": [], "latency": []}
    loads = {name: Load(tokens.get(name, "sk-bench-upstream")) for name in [*servers, "direct"]}
    for load in loads.values():
        await load.__aenter__()
    try:
        for name, url in servers.items():  # warm-up: connections, first-call costs
            await loads[name].closed_loop(url, f"warm-{name}", args.warmup, args.concurrency)
        upstream_times(base)
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                with quiet_gc(up):
                    rps, errors = await loads[name].closed_loop(servers[name], f"tp{r}-{name}", args.tp_seconds,
                                                                args.concurrency)
                runs[name]["rps"].append(rps)
                runs[name]["errors"].append(errors)
                print(f"  round {r + 1}: {name} throughput {rps:,.0f}/s ({errors} errors)", file=sys.stderr, flush=True)
                upstream_times(base)
            for name in [*order, "direct"]:
                url = up_url if name == "direct" else servers[name]
                rate = args.rate
                if name != "direct" and not args.same_rate:  # a rate the server can keep up with, at most --rate
                    rate = min(args.rate, round(0.5 * statistics.median(runs[name]["rps"]), 1))
                with quiet_gc(up):
                    samples, achieved = await loads[name].open_loop(url, f"lat{r}-{name}", rate, args.seconds)
                stats = added_ms(samples, upstream_times(base))
                stats["rate"] = achieved
                runs[name]["latency"].append(stats)
                if name == "direct":  # this round's floor, taken off the servers' numbers of the same round
                    for server in order:
                        row = runs[server]["latency"][-1]
                        row["net_p50"], row["net_p99"] = row["p50"] - stats["p50"], row["p99"] - stats["p50"]
                print(f"  round {r + 1}: {name} at {achieved:,.0f}/s: added p50 {stats['p50']:.2f} ms, "
                      f"p99 {stats['p99']:.2f} ms ({stats['errors']} errors)", file=sys.stderr, flush=True)
    finally:
        for load in loads.values():
            await load.__aexit__()
    runs["serve"]["sent"] = loads["serve"].sent if "serve" in loads else 0
    return runs


def durable(db: Path) -> tuple[int, int]:
    """(requests stored with an ok result, ledger rows with outcome ok) in the serve database."""
    con = sqlite3.connect(db)
    try:
        ok = con.execute("SELECT count(*) FROM ksi_queue_requests WHERE status = 'ok'").fetchone()[0]
        rows = con.execute("SELECT count(*) FROM token_usage WHERE outcome = 'ok'").fetchone()[0]
        return ok, rows
    finally:
        con.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--litellm", help="the litellm command of a venv with litellm[proxy] (without it: serve alone)")
    ap.add_argument("--delay", type=float, default=0.02, help="the upstream's fixed latency, seconds (default 0.02)")
    ap.add_argument("--tp-seconds", type=float, default=10.0, help="length of each throughput run (default 10)")
    ap.add_argument("-c", "--concurrency", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load per server (default 3)")
    ap.add_argument("--rate", type=float, default=500.0, help="requests/s of the latency runs (default 500)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each latency run (default 10)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2); medians are compared")
    ap.add_argument("--same-rate", action="store_true",
                    help="measure every server's latency at --rate, also one that cannot keep up with it (by default a "
                         "server is measured at --rate or half its throughput, whichever is lower)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the servers and the load to CPUs")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()

    if args.litellm:
        python = Path(args.litellm).with_name("python")
        if subprocess.run([str(python), "-c", "import opentelemetry.sdk"], capture_output=True).returncode != 0:
            print(f"warning: {python} lacks opentelemetry-sdk: LiteLLM's proxy will retry importing it on every "
                  "request (see --help)", file=sys.stderr)
    cpus = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(cpus) < 2:
        server_cpus = load_cpus = set(cpus)
    else:
        server_cpus, load_cpus = {cpus[-1]}, set(cpus[:-1])
        os.sched_setaffinity(0, load_cpus)
    tokens = {"serve": "ksi-bench-" + secrets.token_urlsafe(24), "litellm": "sk-" + secrets.token_urlsafe(24),
              "bare": "sk-" + secrets.token_urlsafe(24)}
    started, load_before = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmpdir, upstream(args.delay, load_cpus) as up:
        tmp = Path(tmpdir)
        up_url = up.url
        with serve_process(tmp, up_url, tokens["serve"], server_cpus) as (serve_url, db), \
                bare_proxy(tmp, up_url, tokens["bare"], server_cpus) as bare_url:
            servers = {"serve": serve_url, "bare": bare_url}
            if args.litellm:
                with litellm_proxy(args.litellm, tmp, up_url, tokens["litellm"], server_cpus) as lp_url:
                    servers["litellm"] = lp_url
                    runs = asyncio.run(measure(args, up, servers, tokens))
            else:
                runs = asyncio.run(measure(args, up, servers, tokens))
        stored_ok, ledger_ok = durable(db)
    sent = runs["serve"].pop("sent")

    print(f"\nksi-host serve against LiteLLM's proxy: upstream latency {args.delay * 1000:g} ms, "
          f"{args.rounds} round(s), {'each server on one CPU, the load and the upstream on the other' if not args.no_pin and len(cpus) > 1 else 'not pinned'}, "
          f"{time.time() - started:.0f} s, load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after\n")
    def med(name: str, key: str) -> float | str:
        lat = runs[name]["latency"]
        return statistics.median(x[key] for x in lat) if key in lat[0] else "-"

    rows = []
    for name, run in runs.items():
        lat = run["latency"]
        rows.append([name, statistics.median(run["rps"]) if run["rps"] else "-", sum(run["errors"]) if run["rps"] else "-",
                     med(name, "rate"), med(name, "p50"), med(name, "p99"), med(name, "net_p50"), med(name, "net_p99"),
                     med(name, "mean"), max(x["max"] for x in lat), sum(x["errors"] for x in lat)])
    print(table(["server", f"req/s at c={args.concurrency}", "errors", "rate req/s", "raw p50 ms", "raw p99 ms",
                 "net p50 ms", "net p99 ms", "raw mean ms", "raw max ms", "errors"], rows))
    print("(raw: the client's time minus the upstream's; net: minus the direct run's p50 too, the client's and the "
          "network's own share: the server's time minus the upstream's)")
    serve_rps = statistics.median(runs["serve"]["rps"])
    serve_rate = med("serve", "rate")
    p50, p99 = med("serve", "net_p50"), med("serve", "net_p99")
    assert isinstance(p50, float) and isinstance(p99, float)
    print()
    if "litellm" in runs:
        ratio = serve_rps / statistics.median(runs["litellm"]["rps"])
        print(f"throughput serve / litellm proxy: {ratio:.2f}x (target >= {TARGET_RATIO:g}x)  {verdict(ratio >= TARGET_RATIO)}")
    print(f"serve added latency (net) at {serve_rate:,.0f}/s: p50 {p50:.2f} ms (target <= {TARGET_P50_MS:g})  "
          f"{verdict(p50 <= TARGET_P50_MS)}; p99 {p99:.2f} ms (target <= {TARGET_P99_MS:g})  {verdict(p99 <= TARGET_P99_MS)}")
    bare_p50, bare_p99 = med("bare", "net_p50"), med("bare", "net_p99")
    assert isinstance(bare_p50, float) and isinstance(bare_p99, float)
    print(f"the bare aiohttp proxy (the floor here) adds p50 {bare_p50:.2f} ms, p99 {bare_p99:.2f} ms (net): serve's "
          f"own share p50 +{p50 - bare_p50:.2f} ms, p99 +{p99 - bare_p99:.2f} ms")
    print(f"serve durability: {sent:,} requests sent, {stored_ok:,} stored ok, {ledger_ok:,} ledger rows ok  "
          f"{verdict(stored_ok == sent == ledger_ok)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "sent": sent, "stored_ok": stored_ok,
                                               "ledger_ok": ledger_ok}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
