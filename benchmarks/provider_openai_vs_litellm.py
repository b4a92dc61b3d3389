"""Throughput of ksi-provider-openai against ksi-provider-litellm, through the whole Host.

One local OpenAI-compatible server (``python -m ksi_host.testing.server``, a
separate process, zero delay); N requests at concurrency C through a Host with
the real queue, retry and tokens plugins and one provider plugin:

* ``litellm``: ksi-provider-litellm (litellm -> OpenAI SDK -> httpx)
* ``openai``: ksi-provider-openai (one pooled aiohttp client)
* ``both``: both installed and both serving the model, ``[openai] priority = 1``:
  the openai plugin answers, after its cross-plugin look-up (``host.providers``)

Each run is its own process (fresh interpreter, fresh database) after a
warm-up of 100 requests that is not counted (litellm's import and first call);
the cases are run in interleaved rounds and their medians compared. Prints a
table and the ratio openai / litellm; the target is >= 3x.

    python benchmarks/provider_openai_vs_litellm.py [-n 1000] [-c 16] [--rounds 3] [--cases litellm,openai,both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MODEL = "gpt-bench"
KEY_ENV = "KSI_BENCH_KEY"
PLUGINS = {
    "litellm": "queue,litellm,retry,tokens",
    "openai": "queue,openai,retry,tokens",
    "both": "queue,litellm,openai,retry,tokens",
}


def config(case: str, url: str, concurrency: int) -> dict:
    cfg: dict = {"queue": {"concurrency": concurrency}}
    if case in ("litellm", "both"):
        cfg["litellm"] = {"mock": False, "deployments": [
            {"name": "lit-main", "model": MODEL, "litellm_model": f"openai/{MODEL}", "api_base": url,
             "api_key_env": KEY_ENV, "timeout_s": 30}]}
    if case in ("openai", "both"):
        cfg["openai"] = {"priority": 1, "deployments": [
            {"name": "oa-main", "model": MODEL, "api_base": url, "api_key_env": KEY_ENV, "timeout_s": 30}]}
    return cfg


async def run_case(case: str, url: str, n: int, concurrency: int, warmup: int) -> dict:
    os.environ["KSI_HOST_PLUGINS"] = PLUGINS[case]
    os.environ[KEY_ENV] = "sk-bench-not-a-real-key"
    from ksi_host import Host

    with tempfile.TemporaryDirectory() as tmp:
        async with Host(config(case, url, concurrency), Path(tmp) / "bench.db") as host:
            async def batch(count: int, tag: str) -> list:
                tickets = [await host.submit({"model": MODEL, "prompt": f"hello {tag} {i}", "request_id": f"{tag}-{i}"})
                           for i in range(count)]
                return [await t.result() for t in tickets]

            await batch(warmup, "warm")
            t0 = time.perf_counter()
            results = await batch(n, "run")
            elapsed = time.perf_counter() - t0
    ok = sum(r.ok for r in results)
    providers = sorted({r.provider for r in results if r.provider})
    errors = sorted({r.error["type"] for r in results if r.error})
    return {"case": case, "n": n, "ok": ok, "elapsed_s": round(elapsed, 3), "rps": round(n / elapsed, 1),
            "ms_per_req": round(elapsed / n * 1000 * concurrency, 2), "providers": providers, "errors": errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=1000, help="requests per case and round (default 1000)")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--cases", default="litellm,openai,both")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each case, interleaved (default 3); medians are compared")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case against --url, print JSON
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(run_case(args.one, args.url, args.n, args.concurrency, args.warmup))))
        return 0

    server = subprocess.Popen([sys.executable, "-m", "ksi_host.testing.server", "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = json.loads(server.stdout.readline())["url"]
        cases = args.cases.split(",")
        runs: dict[str, list[dict]] = {case: [] for case in cases}
        for _ in range(args.rounds):  # interleaved, so a burst of load elsewhere hits every case alike
            for case in cases:
                p = subprocess.run([sys.executable, __file__, "--one", case, "--url", url, "-n", str(args.n),
                                    "-c", str(args.concurrency), "--warmup", str(args.warmup)],
                                   capture_output=True, text=True)
                if p.returncode != 0:
                    print(p.stderr, file=sys.stderr)
                    return 1
                runs[case].append(json.loads(p.stdout.strip().splitlines()[-1]))
    finally:
        server.terminate()
        server.wait()
    print(f"{args.n} requests per case and round, {args.rounds} round(s), concurrency {args.concurrency}, "
          "local server in its own process, zero delay")
    print(f"{'case':<8} {'ok':>6} {'median req/s':>13} {'min':>7} {'max':>7} {'ms/req':>7}  providers")
    median: dict[str, float] = {}
    for case, rs in runs.items():
        rps = sorted(r["rps"] for r in rs)
        median[case] = statistics.median(rps)
        errors = sorted({e for r in rs for e in r["errors"]})
        providers = sorted({p for r in rs for p in r["providers"]})
        print(f"{case:<8} {min(r['ok'] for r in rs):>6} {median[case]:>13.1f} {rps[0]:>7.1f} {rps[-1]:>7.1f} "
              f"{1000 * args.concurrency / median[case]:>7.2f}  {','.join(providers)}"
              f"{'  errors: ' + ','.join(errors) if errors else ''}")
    if "litellm" in median:
        for case in ("openai", "both"):
            if case in median:
                print(f"throughput {case} / litellm (medians): {median[case] / median['litellm']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
