"""``ksi-host show-session S`` and ``ksi-host forget-session S``: the commands ksi-sessions adds."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ksi_host.commands import Command, host_from_args

EXIT_OK, EXIT_FAILED = 0, 1


def _session_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("session_id", metavar="SESSION_ID")


def _show_args(parser: argparse.ArgumentParser) -> None:
    _session_arg(parser)
    parser.add_argument("--json", action="store_true", help="print the turns as JSON (every message as it is sent)")


def _store(host: Any) -> Any:
    from .store import TranscriptStore

    return TranscriptStore(host.db)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(p.get("text") or p.get("refusal") or f"[{p.get('type')}]" for p in content if isinstance(p, dict))


def message_line(m: dict[str, Any]) -> str:
    """One message as ``show-session`` prints it: its role, then its text, tool calls and refusal."""
    role = m["role"] + (f" [{m['tool_call_id']}]" if m.get("tool_call_id") else "")
    parts = [_text(m.get("content"))] if m.get("content") is not None else []
    for call in m.get("tool_calls") or ():
        fn = call.get("function") or {}
        parts.append(f"[tool call {call.get('id')}] {fn.get('name')}({fn.get('arguments')})")
    if m.get("refusal"):
        parts.append(f"[refusal] {m['refusal']}")
    return f"  {role}: " + "\n    ".join(" ".join(parts).splitlines() or [""])


def render(session_id: str, turns: list[dict[str, Any]]) -> str:
    """The transcript as text: one header line per turn, then its messages."""
    from ksi_host.models import iso

    lines = [f"session {session_id}: {len(turns)} turn(s)"]
    for t in turns:
        how = "continued" if t["continues"] else "new conversation"
        lines.append(f"turn {t['turn']}  {how}  request {t['request_id']}  ~{t['tokens']} tokens  "
                     f"provider {t['provider'] or '-'}  {iso(t['created_at'])}")
        lines += [message_line(m) for m in t["messages"]]
    return "\n".join(lines)


async def show_session(args: argparse.Namespace) -> int:
    async with host_from_args(args, serve=False) as host:
        turns = await _store(host).session(args.session_id)
    if args.json:
        print(json.dumps(turns, ensure_ascii=False, indent=2))
    elif turns:
        print(render(args.session_id, turns))
    else:
        print(f"ksi-host: session {args.session_id} has no transcript", file=sys.stderr)
    return EXIT_OK if turns else EXIT_FAILED


async def forget_session(args: argparse.Namespace) -> int:
    async with host_from_args(args, serve=False) as host:
        n = await _store(host).forget(args.session_id)
    print(f"forgot {n} turn(s) of session {args.session_id}")
    return EXIT_OK


COMMANDS = [
    Command("show-session", "print a session's conversation (its transcript)", _show_args, show_session,
            description="Print the transcript of a session: every turn (a request's own messages and its answer, "
            "tool calls included), oldest first."),
    Command("forget-session", "forget a session's conversation (its transcript)", _session_arg, forget_session,
            description="Forget the transcript of a session: its next request that continues the session is sent "
            "without earlier turns. Queued requests are not touched (ksi-host clear-session cancels those)."),
]
