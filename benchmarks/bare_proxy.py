"""The floor of serve_vs_litellm_proxy.py: the least an aiohttp server forwarding with aiohttp's client adds here.

An aiohttp application with one route, ``POST /v1/chat/completions``: it checks the bearer token, reads the
body, sends it on to the upstream with one pooled ``aiohttp.ClientSession`` and answers with the upstream's
body. No queue, no database, no retries, no ledger: what ``ksi-host serve`` is built on (aiohttp's server and
client, one event loop), with nothing of its own. Started by the benchmark on the servers' CPU:

    python benchmarks/bare_proxy.py UPSTREAM_BASE_URL PORT   (token in $KSI_BENCH_CLIENT_TOKEN)
"""

from __future__ import annotations

import asyncio
import hmac
import os
import sys

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web


async def main(upstream: str, port: int) -> None:
    expected = f"Bearer {os.environ['KSI_BENCH_CLIENT_TOKEN']}".encode()
    http = ClientSession(connector=TCPConnector(limit=256), timeout=ClientTimeout(total=None))
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-upstream"}

    async def chat(request: web.Request) -> web.Response:
        if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
            return web.json_response({"error": {"message": "unauthorized"}}, status=401)
        body = await request.read()
        async with http.post(f"{upstream}/chat/completions", data=body, headers=headers) as resp:
            answer = await resp.read()
            return web.Response(body=answer, status=resp.status, content_type="application/json")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
