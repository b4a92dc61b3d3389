"""``ksi-host serve``: start the Host, listen, and stop the way ``ksi-host run`` does.

The ``[serve]`` table is checked before the Host starts (the queue would start running stored work): a
client whose token variable is unset, or no clients and an address other than loopback, stop start-up
(exit 2) with nothing run.

Stopping (Ctrl-C or SIGTERM): no new connections and no new requests (503 on an open connection); the
host drains (``host.drain()``: the running requests finish and are stored; the queued ones stay stored
for the next start); callers still waiting for a queued request get 503 with ``Retry-After`` (a retry
with the same ``Idempotency-Key`` after the restart gets its answer); streams still being written end;
then the host stops and the command exits 0. A second signal stops at once (exit 130; what was running
stays stored, unfinished, and runs again at the next start). A programming error in a handler or a
plugin answers its request 500 and stops the server the same way, and ``ksi-host`` exits 70 with its
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from aiohttp import web

from ksi_host import MissingPluginError, StartupError
from ksi_host.commands import host_from_args, tune_gc
from ksi_host.config import build_table, load_config
from ksi_host.hookspecs import INSTALL_HINTS

from .app import HTTP_LOG, Server
from .auth import Gate
from .config import ServeConfig, is_loopback, parse_listen
from .metrics import Metrics
from .plugin import TABLE, Plugin

log = logging.getLogger("ksi_serve")

REQUIRED_HOOKS = ("ksi_enqueue", "ksi_select_provider")
EXIT_OK, EXIT_INTERRUPTED = 0, 130
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf'
"""With ``-v``: the peer, the request line, the status, the size and the seconds taken; no header."""
SHUTDOWN_GRACE_S = 30.0
"""After the drain, how long open streams may take to write what they hold before their connections close."""


def _say(message: str) -> None:
    print(f"ksi-host serve: {message}", file=sys.stderr, flush=True)


def checked_config(args: argparse.Namespace, environ: Any = os.environ) -> tuple[ServeConfig, str, int, Gate]:
    """The ``[serve]`` table, the address to listen on and the client gate, checked before the Host starts."""
    raw = load_config(getattr(args, "config", None) or environ.get("KSI_HOST_CONFIG"))
    config: ServeConfig = build_table(ServeConfig, raw.get(TABLE), TABLE)
    listen = getattr(args, "listen", None) or config.listen
    host, port = parse_listen(listen)
    gate = Gate.from_config(config.clients, environ)
    if gate.open and not is_loopback(host):
        raise StartupError(f"serve: no [[serve.clients]] are configured, so anyone who reaches {listen} could call: "
                           "listen on a loopback address (127.0.0.1, ::1) or configure clients with bearer tokens")
    return config, host, port, gate


async def serve(args: argparse.Namespace) -> int:
    config, address, port, gate = checked_config(args)
    async with host_from_args(args, serve=True) as host:
        for hook in REQUIRED_HOOKS:
            if not host.hooks.implemented(hook):
                raise MissingPluginError(hook, INSTALL_HINTS.get(hook))
        plugin = Plugin.of(host)
        if plugin is None:
            raise StartupError("serve: the serve plugin is not loaded in this host (KSI_HOST_PLUGINS / KSI_HOST_DISABLE?)")
        metrics = plugin.metrics = Metrics()
        tune_gc()  # this process is the server's own: fewer collections (ksi_host.commands.tune_gc)
        stop = asyncio.Event()
        crashes: list[BaseException] = []

        def on_crash(exc: BaseException) -> None:
            crashes.append(exc)
            stop.set()

        server = Server(host, config, gate, metrics, on_crash)
        access = logging.getLogger("ksi_serve.access") if getattr(args, "verbose", 0) else None
        runner = web.AppRunner(server.app(), access_log=access, access_log_format=ACCESS_LOG_FORMAT, handle_signals=False,
                               shutdown_timeout=SHUTDOWN_GRACE_S, logger=HTTP_LOG, keepalive_timeout=config.idle_timeout_s)
        await runner.setup()
        site = web.TCPSite(runner, address, port, backlog=1024)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise StartupError(f"serve: cannot listen on {address}:{port}: {e.strerror or e}") from None
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        clients = f"{len(gate)} client(s)" if not gate.open else "no clients configured: loopback only"
        _say(f"listening on http://{shown}:{bound[1]} ({clients}; database {host.db_path})")
        code = await _until_stopped(stop, server, site, runner, host)
    if crashes:
        raise crashes[0]
    if code == EXIT_OK:
        _say("stopped")
    return code


async def _until_stopped(stop: asyncio.Event, server: Server, site: Any, runner: Any, host: Any) -> int:
    """Serve until a signal (or a programming error) sets ``stop``; drain; the exit code."""
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            stop.set()
        else:
            drain.cancel()

    drain = asyncio.ensure_future(stop.wait())
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        try:
            await drain
            _say(f"stopping: no new requests; {server.pending} being answered, the running ones finish and are "
                 "stored first (Ctrl-C again: stop now)")
            drain = asyncio.ensure_future(_drain(server, site, host))
            await drain
        except asyncio.CancelledError:
            if signals < 2:
                raise
            _say("stopping now: the requests still running stay stored and run again at the next start")
            server.release_waiters()
            for open_site in list(runner.sites):
                await open_site.stop()
            await runner.server.shutdown(0.5)  # streams still open are closed at once
            await runner.cleanup()
            return EXIT_INTERRUPTED
        await runner.cleanup()  # waits for streams still writing what they hold
        return EXIT_OK
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _drain(server: Server, site: Any, host: Any) -> None:
    server.stop_accepting()
    await site.stop()  # no new connections
    await host.drain()  # the running requests finish and are stored; the queued ones stay stored
    server.release_waiters()  # callers waiting for a queued request get 503 (retry with the same key)
