"""``ksi-host show`` and ``ksi-host logs``: what happened to one request, and to the recent ones.

Both only read (a host that does not serve: no database is created, no request runs), through
the hooks ``ksi_request_details`` and ``ksi_list_requests`` (the queue and the ledger answer them).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from .tables import Printable, cut, money, parse_since, printable, render, terminal_width

STATUSES = ("queued", "running", "ok", "error", "cancelled")


def _when(value: Any) -> str:
    """A time as the results hold it (ISO text or unix seconds), shown in UTC to the second."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value).replace("T", " ")[:19]


def _content(message: dict[str, Any], width: int | None) -> str:
    """A message's text on one line (parts joined, tool calls named), cut to ``width`` on a terminal."""
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(p.get("text") or f"[{p.get('type')}]" for p in content if isinstance(p, dict))
    text = " ".join(str(content or "").split())
    calls = message.get("tool_calls") or ()
    if calls:
        text += (" " if text else "") + " ".join(
            f"[{c.get('function', {}).get('name')}({c.get('function', {}).get('arguments', '')})]" for c in calls)
    if message.get("tool_call_id"):
        text = f"[{message['tool_call_id']}] {text}"
    return cut(text, width) if width else text


def print_details(request_id: str, details: dict[str, Any], out: Any = sys.stdout) -> None:
    """The request, its result, its attempts and its ledger rows, for people."""
    width = terminal_width() if out.isatty() else None
    request = details.get("request") or {}
    result = details.get("result") or {}
    state = details.get("state") or result.get("status") or "?"
    print(f"request {request_id}: {state}", file=out)
    fields = [(k, request.get(k)) for k in ("model", "session_id", "agent_id", "originator_agent_id", "purpose",
                                             "priority", "timeout_s")]
    fields += [(k, v) for k, v in request.items() if k not in dict(fields) and k not in ("messages", "request_id")
               and v not in (None, {}, [], "normal")]
    for key, value in fields:
        if value is not None:
            print(f"  {key}: {value if not isinstance(value, (dict, list)) else json.dumps(value)}", file=out)
    print(f"  submitted: {_when(details.get('submitted_at'))}", file=out)
    messages = request.get("messages") or []
    if messages:
        print(f"-- messages ({len(messages)})", file=out)
        for m in messages:
            role = m.get("role", "?")
            print(f"  {role:>9}: " + _content(m, width - 13 if width else None), file=out)
    if result:
        print("-- result", file=out)
        answer = result.get("message") or ({"content": result.get("text")} if result.get("text") else None)
        if answer:
            print("  " + _content(answer, width - 2 if width else None), file=out)
        u = result.get("usage") or {}
        cost = "unknown" if u.get("cost_usd") is None else f"${money(u['cost_usd'])}"
        print(f"  status {result.get('status')}, model {result.get('model')}, provider {result.get('provider') or '-'}, "
              f"finish {result.get('finish_reason') or '-'}, {u.get('prompt_tokens', 0)}+{u.get('completion_tokens', 0)} "
              f"tokens, cost {cost}", file=out)
        if result.get("error"):
            print(f"  error {result['error'].get('type')}: {result['error'].get('message')}", file=out)
        print(f"  started {_when(result.get('started_at'))}, finished {_when(result.get('finished_at'))}", file=out)
        attempts = result.get("attempts") or []
        if attempts:
            print("-- attempts", file=out)
            print(render(attempts, [("number", "#"), ("provider", "provider"), ("error_type", "error"),
                                    ("error_message", "message"), ("delay_s", "delay_s"), ("latency_ms", "latency_ms"),
                                    ("ttft_ms", "ttft_ms")], width=width), file=out)
    calls = details.get("calls") or []
    if calls:
        print("-- ledger (one row per upstream call)", file=out)
        print(render(calls, [("attempt", "attempt"), ("provider", "provider"), ("outcome", "outcome"),
                             ("prompt_tokens", "prompt"), ("completion_tokens", "completion"), ("cost_usd", "cost_usd"),
                             ("latency_ms", "latency_ms")], width=width, missing={"cost_usd": "n/a"}), file=out)


async def show(args: argparse.Namespace, host_for: Any) -> int:
    async with host_for(args, serve=False) as host:
        details = await host.request_details(args.request_id)
    if details is None:
        print(f"ksi-host: no request {args.request_id!r} is known in {host.db_path}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(details, indent=2, default=str, ensure_ascii=False))
    else:
        print_details(args.request_id, details, Printable(sys.stdout))
    return 0


LOG_COLUMNS = [("request_id", "request"), ("session_id", "session"), ("agent_id", "agent"), ("model", "model"),
               ("status", "status"), ("attempts", "att"), ("total_tokens", "tokens"), ("cost_usd", "cost_usd"),
               ("latency_ms", "latency_ms"), ("submitted_at", "submitted")]


async def logs(args: argparse.Namespace, host_for: Any) -> int:
    from ..models import RequestQuery

    query = RequestQuery(limit=args.n, session_id=args.session, agent_id=args.agent, model=args.model,
                         status=args.status, since=parse_since(args.since))
    async with host_for(args, serve=False) as host:
        rows = await host.list_requests(query)
    if args.json:
        print(json.dumps(rows, indent=2, default=str, ensure_ascii=False))
        return 0
    if not rows:
        print("no requests" + (" match" if any((args.session, args.agent, args.model, args.status, args.since)) else ""))
        return 0
    shown = [{**r, "submitted_at": _when(r.get("submitted_at"))} for r in rows]
    print(printable(render(shown, LOG_COLUMNS, width=terminal_width(), missing={"cost_usd": "n/a"})))
    return 0


def add_arguments(sub: Any, common: argparse.ArgumentParser, since_type: Any, positive_type: Any) -> None:
    p = sub.add_parser("show", parents=[common], help="one request: its fields, result, attempts and ledger rows")
    p.add_argument("request_id")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("logs", parents=[common], help="recent requests, newest first, one line each")
    p.add_argument("-n", type=positive_type, default=20, metavar="N", help="how many (default 20)")
    p.add_argument("--session", metavar="S", help="only this session's")
    p.add_argument("--agent", metavar="A", help="only this agent's")
    p.add_argument("--model", metavar="M", help="only for this model")
    p.add_argument("--status", choices=STATUSES, help="only with this status")
    p.add_argument("--since", metavar="WHEN", type=since_type, help="only submitted since: 24h, 30m, 7d, or an ISO date")
    p.add_argument("--json", action="store_true", help="print a JSON list")
