"""The ``ksi-host`` command line.

Exit codes: 0 all ok; 1 some request failed; 2 usage, config or plugin error
before anything ran; 70 a plugin's programming error (traceback printed);
130 interrupted (run the same command again to resume); 141 the reader of stdout left
(``ksi-host logs | head``), as for a command killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import traceback
from typing import IO, Any

from ..commands import host_from_args, log_to_stderr, plugin_commands
from . import inspect

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CRASH, EXIT_INTERRUPTED = 0, 1, 2, 70, 130
EXIT_PIPE = 128 + 13  # SIGPIPE's: what a shell reports for a command whose reader left
USAGE_GROUPS = ("model", "agent", "session", "purpose", "provider", "day")
PRIORITY_NAMES = ("critical", "high", "normal", "low", "background")  # ksi_host.models.PRIORITIES (not imported: --help stays fast)


def _common(top: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name."""
    common = argparse.ArgumentParser(add_help=False)
    default = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    common.add_argument("--db", metavar="PATH", default=default(None),
                        help="database file (default: $KSI_HOST_DB or ./ksi-host.db)")
    common.add_argument("--config", metavar="PATH", default=default(None), help="TOML config file (default: $KSI_HOST_CONFIG)")
    common.add_argument("-v", "--verbose", action="count", default=default(0), help="log to stderr (-vv for debug)")
    return common


def _since(text: str) -> str:
    """``--since``, checked as it is parsed: a bad value is a usage error (exit 2) that argparse names."""
    from ..errors import ValidationError
    from .tables import parse_since

    try:
        parse_since(text)
    except ValidationError as e:
        raise argparse.ArgumentTypeError(e.reason) from None
    return text


MAX_COUNT = 1_000_000_000
"""The most a whole-number option (``--concurrency``, ``-n``, ``--max-tokens``) takes."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value > MAX_COUNT:  # a database's integers end at 2**63 - 1: more would crash the query that reads it
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT:,}, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="ksi-host", description="Run LLM completions for agent systems through plugins.", parents=[_common(True)]
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = _common(False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", parents=[common], help="list installed plugins and their hooks")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = sub.add_parser("run", parents=[common], help="run a JSONL batch of requests",
                       description="Run one JSON request per line; write one JSON result per request. "
                       "Running the same command again with the same --db resumes the batch.")
    p.add_argument("requests", metavar="REQUESTS.jsonl", help="input file, or - for stdin")
    p.add_argument("--out", metavar="RESULTS.jsonl", default="-", help="results file, or - for stdout (default)")
    p.add_argument("--concurrency", type=_positive, metavar="N", help="requests running at most (overrides [queue] concurrency)")
    p.add_argument("--format", choices=("auto", "ksi", "openai-batch"), default="auto",
                   help="the input's line format, and so the output's: ksi (one request per line) or openai-batch "
                   "(OpenAI's Batch API file: custom_id, method, url, body); auto (default): from the first line")

    p = sub.add_parser("ask", parents=[common], help="ask one question; the answer streams to stdout",
                       description="Send one request through the queue and the database; its answer is written to "
                       "stdout as it arrives, a usage line (tokens, cost, provider, time) to stderr. Ctrl-C cancels it.")
    p.add_argument("prompt", metavar="PROMPT", help="the question, or - to read it from stdin")
    p.add_argument("-m", "--model", required=True, help="the model to ask (e.g. mock/gpt-4o-mini, served offline)")
    p.add_argument("--system", metavar="TEXT", help="a system message before the question")
    p.add_argument("--session", metavar="ID", help="the session it belongs to (its turn comes after the session's earlier requests)")
    p.add_argument("--continue", dest="continue_session", action="store_true",
                   help="continue the session's conversation (needs --session and a session plugin)")
    p.add_argument("--agent", metavar="ID", help="the agent asking (agent_id)")
    p.add_argument("--purpose", metavar="NAME", help="what it is for (purpose)")
    p.add_argument("--priority", choices=PRIORITY_NAMES, help="its place in the queue (default: normal)")
    p.add_argument("--max-tokens", type=_positive, metavar="N", help="the answer's length at most, in tokens")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature, 0 to 2")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="a deadline over all attempts")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="print the answer once it is whole")
    p.add_argument("--json", action="store_true", help="print the stored result as JSON at the end (no streamed text)")

    p = sub.add_parser("status", parents=[common], help="queue depth per session, circuits")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("usage", parents=[common], help="tokens and cost per group")
    p.add_argument("--by", choices=USAGE_GROUPS, default="model", help="group by (default: model)")
    p.add_argument("--since", metavar="WHEN", type=_since, help="only calls since: 24h, 30m, 7d, or an ISO date")
    p.add_argument("--json", action="store_true", help="print a JSON list")

    p = sub.add_parser("cancel", parents=[common], help="cancel one queued request")
    p.add_argument("request_id")

    p = sub.add_parser("clear-session", parents=[common], help="cancel every queued request of a session")
    p.add_argument("session_id")

    inspect.add_arguments(sub, common, _since, _positive)

    load_errors: list[Exception] = []
    for plugin, command in plugin_commands(load_errors):
        if command.name in sub.choices:
            parser.error(f"plugin {plugin!r} adds a command {command.name!r}, which ksi-host or another plugin has already")
        p = sub.add_parser(command.name, parents=[common], help=command.help, description=command.description)
        command.add_arguments(p)
        p.set_defaults(plugin_command=command)
    for p in sub.choices.values():
        p.set_defaults(command_parser=p)  # an unknown option is then reported with its command's usage
    if load_errors:  # a command a plugin adds is missing when any plugin fails to load: say why, not only "invalid choice"
        usage_error = parser.error

        def error(message: str) -> Any:
            _err(f"{load_errors[0]} (the commands plugins add are not available)")
            return usage_error(message)

        parser.error = error  # type: ignore[method-assign]
    return parser




def _stdout_reader_left() -> bool:
    """Is stdout a pipe whose reader has closed it (``ksi-host logs | head``)? Then a BrokenPipeError is not a
    programming error: the output is no longer wanted. stdout then goes to /dev/null, so that the flush at exit
    does not fail again. A BrokenPipeError from anything else (a plugin's socket) stays a programming error."""
    import os
    import select

    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poll.poll(0))  # a pipe with no reader left
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout is not a file
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return gone


def _err(message: str) -> None:
    print(f"ksi-host: {message}", file=sys.stderr)


def missing_plugin(hook: str) -> str:
    """The message for a hook no loaded plugin implements, with how to install the plugin that does."""
    from ..hookspecs import INSTALL_HINTS
    from ..plugins import install_hint

    dist = INSTALL_HINTS.get(hook)
    return f"no plugin implements {hook}" + (f": {install_hint(dist)}" if dist else "")


def _host(args: argparse.Namespace, *, serve: bool, resume: bool = True, concurrency: int | None = None) -> Any:
    return host_from_args(args, serve=serve, resume=resume, concurrency=concurrency)


def cmd_plugins(args: argparse.Namespace) -> int:
    import pluggy

    from .. import hookspecs
    from ..plugins import load_plugins, misspelled_groups, register_one

    for group, ep in misspelled_groups():  # an author's slip that would otherwise leave the plugin silently unlisted
        dist = ep.dist.name if ep.dist else "a distribution"
        _err(f"warning: {dist} declares the entry point {ep.name!r} in group {group!r}, which the host does not read "
             "(the group is ksi_host: [project.entry-points.ksi_host])")
    rows = []
    for info in load_plugins():
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        obj = register_one(pm, info.obj, info.name)
        hooks = sorted(h.name for h in pm.get_hookcallers(obj) or [])
        rows.append({"name": info.name, "distribution": info.distribution, "version": info.version, "hooks": hooks})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        from ..plugins import install_hint

        print("no plugins installed; the four of the project:\n" + "\n".join(
            f"  {install_hint(d)}" for d in ("ksi-queue", "ksi-provider-litellm", "ksi-retry", "ksi-tokens")))
    else:
        for r in rows:
            print(f"{r['name']}  ({r['distribution']} {r['version']})\n    hooks: {', '.join(r['hooks'])}")
    return EXIT_OK


def _line_format(choice: str, lines: Any) -> tuple[Any, Any]:
    """The line format of ``lines`` (``choice``, or detected from the first line) and the lines, none lost."""
    import itertools

    from .formats import detect, make
    from .runner import LongLine

    if choice != "auto":
        return make(choice), lines
    long_lines = []  # too long to be read: the first line read decides
    while (first := next(lines, None)) is not None and isinstance(first[1], LongLine):
        long_lines.append(first)
    if first is None:
        return make("ksi"), iter(long_lines)
    return make(detect(first[1]), detected_from=first[0]), itertools.chain(long_lines, [first], lines)


async def _run(args: argparse.Namespace) -> int:
    from ..commands import tune_gc
    from .runner import REQUIRED_HOOKS, BatchRunner, count_lines, iter_lines, open_requests

    clash = _out_clash(args)
    if clash:
        _err(f"--out {args.out} is {clash}: writing the results there would destroy it (choose another file)")
        return EXIT_USAGE
    if _same_file(args.requests, _db_path(args)):
        _err(f"--db {_db_path(args)} is the input file {args.requests}: the database needs a file of its own")
        return EXIT_USAGE
    try:
        total = count_lines(args.requests)
        requests = open_requests(args.requests)
    except OSError as e:
        _err(f"cannot read {args.requests}: {e.strerror}")
        return EXIT_USAGE
    with requests:
        host = _host(args, serve=True, concurrency=args.concurrency)
        async with host:
            for hook in REQUIRED_HOOKS:
                if not host.hooks.implemented(hook):
                    _err(missing_plugin(hook))
                    return EXIT_USAGE
            try:  # opened once the database is ours: a second run refused there leaves the first's results file be
                out = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8")  # noqa: SIM115
            except OSError as e:
                _err(f"cannot write {args.out}: {e.strerror}")
                return EXIT_USAGE
            runner = None
            try:
                # no bar when the results themselves scroll on the same terminal
                bar = sys.stderr.isatty() and not (out is sys.stdout and sys.stdout.isatty())
                line_format, lines = _line_format(args.format, iter_lines(requests))
                runner = BatchRunner(host, out, sys.stderr, total=total, progress=bar, line_format=line_format)
                tune_gc()  # this process is the batch's own: fewer collections (see ksi_host.commands)
                stats, interrupted = await _run_interruptible(runner, lines)
            finally:
                _close_out(out, runner)
    print(stats.summary(interrupted), file=sys.stderr)
    assert runner is not None
    if runner.output_error is not None:
        where = "stdout" if out is sys.stdout else args.out
        _err(f"cannot write the results to {where}: {runner.output_error.strerror or runner.output_error}; "
             "every finished result is stored: run the same command again to write them")
        return EXIT_FAILED
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if stats.ok == stats.expected else EXIT_FAILED


def _db_path(args: argparse.Namespace) -> str:
    from ..db import default_db_path

    return getattr(args, "db", None) or default_db_path()


def _same_file(a: str, b: str) -> bool:
    """Are ``a`` and ``b`` one existing file (``-`` is none)?"""
    import os

    try:
        return a != "-" and b != "-" and os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _out_clash(args: argparse.Namespace) -> str | None:
    """What ``--out`` would overwrite that must not be: the input file or the database (None: nothing)."""
    for path, what in ((args.requests, "the input file"), (_db_path(args), "the database")):
        if _same_file(path, args.out):
            return what
    return None


def _close_out(out: IO[str], runner: Any) -> None:
    """Close the results file; a failure to write its last lines is the runner's output error."""
    if out is sys.stdout:
        return
    try:
        out.close()
    except OSError as e:
        if runner is not None and runner.output_error is None:
            runner.output_error = e


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""What stops ``ksi-host run`` gently: Ctrl-C, and SIGTERM (``kill``, systemd, ``docker stop``, ``timeout``) alike, so
a request running when a service manager stops the batch is finished and stored, not sent again by the rerun."""


async def _run_interruptible(runner: Any, lines: Any) -> tuple[Any, bool]:
    """Run the batch; the first Ctrl-C (or SIGTERM) stops it gently (the running requests finish, their results
    are written), the second at once (the host stops; running requests stay stored unfinished)."""
    task = asyncio.ensure_future(runner.run(lines))
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            running, _ = runner.in_flight()
            runner.progress.note(f"ksi-host: stopping; {running} running request(s) finish first (Ctrl-C again: stop now)")
            runner.stop()
        else:
            for sig in STOP_SIGNALS:  # a third Ctrl-C raises KeyboardInterrupt, a third SIGTERM kills
                loop.remove_signal_handler(sig)
            task.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_interrupt)
    try:
        stats = await task
    except asyncio.CancelledError:
        if not interrupts:
            raise
        stats = runner.stats
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    return stats, interrupts > 0


async def _ask(args: argparse.Namespace) -> int:
    from ..errors import ValidationError
    from .ask import Ask, build_request, read_prompt
    from .runner import REQUIRED_HOOKS

    if args.continue_session and args.session is None:
        _err("--continue needs --session (the session whose conversation continues)")
        return EXIT_USAGE
    try:
        prompt = read_prompt(args.prompt, sys.stdin)
    except (OSError, UnicodeDecodeError) as e:
        _err(f"cannot read the prompt from stdin: {e}")
        return EXIT_USAGE
    if not prompt.strip():
        _err("PROMPT is empty" + (" (stdin held nothing)" if args.prompt == "-" else ""))
        return EXIT_USAGE
    try:
        request = build_request(args, prompt)
    except ValidationError as e:
        _err(str(e))
        return EXIT_USAGE
    # the requests an interrupted run left in the database are not started: they stay for ksi-host run
    async with _host(args, serve=True, resume=False) as host:
        for hook in REQUIRED_HOOKS:
            if not host.hooks.implemented(hook):
                _err(missing_plugin(hook))
                return EXIT_USAGE
        return await Ask(host, request, stream=args.stream, as_json=args.json, out=sys.stdout, err=sys.stderr).run()


async def _status(args: argparse.Namespace) -> int:
    from .tables import Printable

    async with _host(args, serve=False) as host:
        status = await host.status()
        providers = await host.providers(None)
    status.setdefault("providers", [
        {"name": p.name, "model": p.model, "plugin": p.plugin, "state": p.state} for p in providers
    ])
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return EXIT_OK
    with contextlib.redirect_stdout(Printable(sys.stdout)):  # an upstream's error text cannot drive the terminal
        _print_status(status)
    return EXIT_OK


def _print_status(status: dict[str, Any]) -> None:
    from .tables import cut, fmt, render, terminal_width

    width = terminal_width()

    def table(rows: list[dict[str, Any]]) -> str:
        keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
        return render(rows, [(k, k) for k in keys], width=width)

    def is_table(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)

    for section, data in status.items():
        print(f"== {section}")
        if is_table(data):
            print(table(data))
        elif isinstance(data, dict):
            for k, v in data.items():
                if not isinstance(v, (dict, list)):
                    print(cut(f"{k}: {fmt(v, k)}", width))
            for k, v in data.items():
                if is_table(v):
                    print(f"-- {k}")
                    print(table(v))
        else:
            print(cut(fmt(data), width) if data not in (None, [], {}) else "(empty)")


async def _usage(args: argparse.Namespace) -> int:
    from .tables import Printable, parse_since

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
    with contextlib.redirect_stdout(Printable(sys.stdout)):  # the groups are what requests named
        _print_usage(args, rows, totals)
    return EXIT_OK


def _print_usage(args: argparse.Namespace, rows: list[dict[str, Any]], totals: list[dict[str, Any]]) -> None:
    from .tables import render, terminal_width

    total: dict[str, Any] = {**(totals[0] if totals else {}), "key": "TOTAL"}
    shown = [{**r, "key": "(none)" if r.get("key") is None else r["key"]} for r in rows]
    columns = [("key", args.by), ("calls", "calls"), ("requests", "requests"), ("prompt_tokens", "prompt"),
               ("completion_tokens", "completion"), ("total_tokens", "total"), ("cost_usd", "cost_usd")]
    if any("unpriced_calls" in r for r in rows):  # calls whose cost nobody knew: cost_usd leaves them out
        columns.append(("unpriced_calls", "unpriced calls"))
    print(render(shown + [total], columns, width=terminal_width(), missing={"cost_usd": "n/a"}))
    unknown, in_flight = total.get("unknown_calls") or 0, total.get("in_flight_calls") or 0
    if unknown:  # sent, and nobody saw how they ended: a timeout, a cancel, a killed process
        print(f"{unknown:,} calls of unknown outcome, possibly billed" + (f" ({in_flight:,} still in flight)" if in_flight else ""))


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


async def _show(args: argparse.Namespace) -> int:
    return await inspect.show(args, _host)


async def _logs(args: argparse.Namespace) -> int:
    return await inspect.logs(args, _host)


COMMANDS = {"run": _run, "ask": _ask, "status": _status, "usage": _usage, "cancel": _cancel, "clear-session": _clear,
            "show": _show, "logs": _logs}


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    try:  # now, not at exit: stdout's reader having left is seen here (at exit, Python would print "Exception
        # ignored" and exit 120, since stdout to a pipe keeps what it could not write in its buffer)
        sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_reader_left():
            raise
        return EXIT_PIPE if code == EXIT_OK else code
    return code


def _main(argv: list[str] | None) -> int:
    try:
        parser = build_parser()  # asks the plugins for their commands
    except Exception:  # a plugin's programming error (its note names the plugin), as in any command
        traceback.print_exc()
        _err("stopped by a programming error (traceback above)")
        return EXIT_CRASH
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # `ksi-host run x --outt y`: say it with run's usage, not the top-level one
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.verbose:
        log_to_stderr("DEBUG" if args.verbose > 1 else "INFO")
    from ..errors import MissingPluginError, OperationalError, StartupError

    try:
        if args.command == "plugins":
            return cmd_plugins(args)
        command = getattr(args, "plugin_command", None)
        return asyncio.run(command.run(args) if command is not None else COMMANDS[args.command](args))
    except MissingPluginError as e:
        _err(missing_plugin(e.hook))
        return EXIT_USAGE
    except StartupError as e:
        _err(str(e))
        return EXIT_USAGE
    except OperationalError as e:
        _err(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:
        if isinstance(e, BrokenPipeError) and _stdout_reader_left():
            return EXIT_PIPE
        traceback.print_exc()
        _err("stopped by a programming error (traceback above); stored work resumes on the next run")
        return EXIT_CRASH


