"""The ``ksi-host`` command line.

Exit codes: 0 all ok; 1 some request failed; 2 usage, config or plugin error
before anything ran; 70 a plugin's programming error (traceback printed);
130 interrupted (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import traceback
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CRASH, EXIT_INTERRUPTED = 0, 1, 2, 70, 130
USAGE_GROUPS = ("model", "agent", "session", "purpose", "provider", "day")


def _common(top: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name."""
    common = argparse.ArgumentParser(add_help=False)
    default = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    common.add_argument("--db", metavar="PATH", default=default(None),
                        help="database file (default: $KSI_HOST_DB or ./ksi-host.db)")
    common.add_argument("--config", metavar="PATH", default=default(None), help="TOML config file (default: $KSI_HOST_CONFIG)")
    common.add_argument("-v", "--verbose", action="count", default=default(0), help="log to stderr (-vv for debug)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ksi-host", description="Run LLM completions for agent systems through plugins.", parents=[_common(True)]
    )
    common = _common(False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", parents=[common], help="list installed plugins and their hooks")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = sub.add_parser("run", parents=[common], help="run a JSONL batch of requests",
                       description="Run one JSON request per line; write one JSON result per request. "
                       "Running the same command again with the same --db resumes the batch.")
    p.add_argument("requests", metavar="REQUESTS.jsonl", help="input file, or - for stdin")
    p.add_argument("--out", metavar="RESULTS.jsonl", default="-", help="results file, or - for stdout (default)")
    p.add_argument("--concurrency", type=int, metavar="N", help="requests in flight at most (overrides [queue] concurrency)")

    p = sub.add_parser("status", parents=[common], help="queue depth per session, circuits")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("usage", parents=[common], help="tokens and cost per group")
    p.add_argument("--by", choices=USAGE_GROUPS, default="model", help="group by (default: model)")
    p.add_argument("--since", metavar="WHEN", help="only calls since: 24h, 30m, 7d, or an ISO date")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = sub.add_parser("cancel", parents=[common], help="cancel one queued request")
    p.add_argument("request_id")

    p = sub.add_parser("clear-session", parents=[common], help="cancel every queued request of a session")
    p.add_argument("session_id")
    return parser


def _log_to_stderr(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _err(message: str) -> None:
    print(f"ksi-host: {message}", file=sys.stderr)


def _host(args: argparse.Namespace, *, serve: bool, concurrency: int | None = None) -> Any:
    from ..config import LOG_LEVELS, load_config
    from ..service import Host

    config = load_config(args.config or os.environ.get("KSI_HOST_CONFIG"))
    level = str(config.get("host", {}).get("log_level", "")).upper()
    if not args.verbose and level in LOG_LEVELS and level != "WARNING":
        _log_to_stderr(level)  # [host] log_level; the Host validates a bad value
    if concurrency is not None:
        config.setdefault("host", {})["concurrency"] = concurrency
    return Host(config, args.db, serve=serve)


def cmd_plugins(args: argparse.Namespace) -> int:
    import pluggy

    from .. import hookspecs
    from ..plugins import instantiate, load_plugins

    rows = []
    for info in load_plugins():
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        obj = instantiate(info.obj)
        pm.register(obj, name=info.name)
        hooks = sorted(h.name for h in pm.get_hookcallers(obj) or [])
        rows.append({"name": info.name, "distribution": info.distribution, "version": info.version, "hooks": hooks})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no plugins installed (pip install ksi-queue ksi-provider-litellm ksi-retry ksi-tokens)")
    else:
        for r in rows:
            print(f"{r['name']}  ({r['distribution']} {r['version']})\n    hooks: {', '.join(r['hooks'])}")
    return EXIT_OK


async def _run(args: argparse.Namespace) -> int:
    from ..errors import MissingPluginError
    from ..hookspecs import INSTALL_HINTS
    from .runner import REQUIRED_HOOKS, BatchRunner, open_requests, read_lines, tune_gc

    try:
        with open_requests(args.requests) as f:
            lines = read_lines(f)
    except OSError as e:
        _err(f"cannot read {args.requests}: {e.strerror}")
        return EXIT_USAGE
    if args.concurrency is not None and args.concurrency < 1:
        _err("--concurrency must be at least 1")
        return EXIT_USAGE
    host = _host(args, serve=True, concurrency=args.concurrency)
    async with host:
        for hook in REQUIRED_HOOKS:
            if not host.hooks.implemented(hook):
                _err(str(MissingPluginError(hook, INSTALL_HINTS.get(hook))))
                return EXIT_USAGE
        out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")  # noqa: SIM115
        runner = BatchRunner(host, out, sys.stderr)
        tune_gc()  # this process is the batch's own: fewer collections (see ksi_host.cli.runner)
        task = asyncio.ensure_future(runner.run(lines))
        loop = asyncio.get_running_loop()
        interrupted = False

        def on_interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C stops at once
            task.cancel()

        loop.add_signal_handler(signal.SIGINT, on_interrupt)
        try:
            stats = await task
        except asyncio.CancelledError:
            if not interrupted:
                raise
            stats = runner.stats
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            if out is not sys.stdout:
                out.close()
    print(stats.summary(interrupted), file=sys.stderr)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if stats.ok == stats.total else EXIT_FAILED


async def _status(args: argparse.Namespace) -> int:
    from .tables import render

    async with _host(args, serve=False) as host:
        status = await host.status()
        providers = await host.providers(None)
    status.setdefault("providers", [
        {"name": p.name, "model": p.model, "plugin": p.plugin, "state": p.state} for p in providers
    ])
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return EXIT_OK
    for section, data in status.items():
        print(f"== {section}")
        if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
            keys = list(dict.fromkeys(k for r in data for k in r if not isinstance(r[k], (dict, list))))
            print(render(data, [(k, k) for k in keys]))
        elif isinstance(data, dict):
            scalars = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
            for k, v in scalars.items():
                print(f"{k}: {v}")
            for k, v in data.items():
                if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
                    keys = list(dict.fromkeys(kk for r in v for kk in r if not isinstance(r[kk], (dict, list))))
                    print(f"-- {k}")
                    print(render(v, [(kk, kk) for kk in keys]))
        else:
            print(data if data not in (None, [], {}) else "(empty)")
    return EXIT_OK


async def _usage(args: argparse.Namespace) -> int:
    from .tables import parse_since, render

    since = parse_since(args.since)
    async with _host(args, serve=False) as host:
        rows = await host.usage_report(args.by, since)
        # requests are counted once each (a request that failed over belongs to two providers)
        totals = await host.usage_report("total", since)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no usage recorded" + (f" since {args.since}" if args.since else ""))
        return EXIT_OK
    total: dict[str, Any] = {**(totals[0] if totals else {}), "key": "TOTAL"}
    shown = [{**r, "key": "(none)" if r.get("key") is None else r["key"]} for r in rows]
    print(render(shown + [total], [
        ("key", args.by), ("calls", "calls"), ("requests", "requests"), ("prompt_tokens", "prompt"),
        ("completion_tokens", "completion"), ("total_tokens", "total"), ("cost_usd", "cost_usd"),
    ]))
    return EXIT_OK


async def _cancel(args: argparse.Namespace) -> int:
    async with _host(args, serve=False) as host:
        done = await host.cancel(args.request_id)
    print("cancelled" if done else f"not cancelled: {args.request_id} is unknown or already final")
    return EXIT_OK if done else EXIT_FAILED


async def _clear(args: argparse.Namespace) -> int:
    async with _host(args, serve=False) as host:
        n = await host.clear_session(args.session_id)
    print(f"cancelled {n} queued request(s) of session {args.session_id}")
    return EXIT_OK


COMMANDS = {"run": _run, "status": _status, "usage": _usage, "cancel": _cancel, "clear-session": _clear}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.verbose:
        _log_to_stderr("DEBUG" if args.verbose > 1 else "INFO")
    from ..errors import MissingPluginError, OperationalError, StartupError

    try:
        if args.command == "plugins":
            return cmd_plugins(args)
        return asyncio.run(COMMANDS[args.command](args))
    except (StartupError, MissingPluginError) as e:
        _err(str(e))
        return EXIT_USAGE
    except OperationalError as e:
        _err(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        _err("stopped by a programming error (traceback above); stored work resumes on the next run")
        return EXIT_CRASH


