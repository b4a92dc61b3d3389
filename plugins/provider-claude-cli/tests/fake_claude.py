"""A fake ``claude`` executable that speaks the real CLI's JSON shape.

:func:`install` writes it into a folder as an executable file named
``claude`` (its shebang is this interpreter). It reads the prompt on stdin
and answers like ``claude -p --output-format json``. What it does depends on
the prompt's last line:

=================  ==========================================================
``!hang``          starts a child process, writes both pids, sleeps 60 s
``!garbage``       prints text that is not JSON, exits 0
``!ratelimit``     stderr ``API Error: 429 ...``, exits 1
``!ratetext``      stderr ``Rate limit exceeded, slow down``, exits 1
``!overloaded``    stderr ``API Error: 529 {...overloaded_error...}``, exits 1
``!crash``         stderr ``Error: something broke``, exits 2
``!maxturns``      JSON ``is_error: true``, ``subtype: error_max_turns``, exits 1
``!execerror``     JSON ``is_error: true``, ``subtype: error_during_execution``, exits 1
``!usagelimit``    JSON ``is_error: true``, result ``Claude AI usage limit reached|<in 120 s>``
``!authfail``      JSON ``is_error: true``, result ``Invalid API key · Please run /login``
``!toolong``       JSON ``is_error: true``, result ``Prompt is too long``
``!array``         the older output: a JSON array of messages ending with the result
``!noresult``      JSON ``type: result`` without ``result``, exits 0
``!linger``        starts a child with its own stdio that sleeps 60 s, answers, exits 0
``!lingerpipe``    the same, but the child keeps stdout open
``!setsid``        a child whose own child calls ``setsid`` (leaves the process group); sleeps 60 s
``!setsidexit``    the same, then answers and exits 0
``!huge``          writes ``$FAKE_CLAUDE_HUGE_MB`` MiB (default 300) on stdout, then answers
``!hugeerr``       the same on stderr
``!notjson``       success, plain text even when the system prompt asks for JSON
``!streamhold``    (stream-json) the first text delta, then nothing until ``$FAKE_CLAUDE_DIR/release`` exists
``!streamcut``     (stream-json) two text deltas, then exit 0 without a result line
``!streamcrash``   (stream-json) two text deltas, then stderr ``API Error: 529 ...``, exit 1
anything else      success: ``turn <n>: echo: <last line>`` (``{"echo": "<last line>"}`` when the
                   system prompt asks for JSON)
=================  ==========================================================

With ``--output-format stream-json`` (which, as in the real CLI, needs ``--verbose``) it
writes the real CLI's lines: ``system``/``init``, then with ``--include-partial-messages``
(unless ``FAKE_CLAUDE_NO_PARTIAL=1``, an older CLI) ``stream_event`` lines carrying the
API's streaming events (one ``text_delta`` per word), the ``assistant`` message whole,
and the ``result`` line (the same object as ``--output-format json`` prints).

The processes of the ``!linger``, ``!setsid`` and ``!hang`` modes note themselves in
``$FAKE_CLAUDE_DIR/pids.log`` (``<role> <pid>`` lines; :func:`pids`), the ``setsid``
grandchild after it left the group.

Sessions live in ``$FAKE_CLAUDE_DIR/sessions/<id>`` (one prompt per line):
``--resume ID`` continues one (``No conversation found`` when it does not
exist); with ``FAKE_CLAUDE_FORK=1`` a resumed call answers under a new id,
as some CLI versions do. Every call appends a JSON line to
``$FAKE_CLAUDE_DIR/calls.jsonl``: argv, the prompt, the model, whether
``ANTHROPIC_API_KEY`` was set (and its SHA-256, never the value), and
``ANTHROPIC_BASE_URL``.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

SCRIPT = r'''
import hashlib, json, os, subprocess, sys, time, uuid
from pathlib import Path

state = Path(os.environ["FAKE_CLAUDE_DIR"])
(state / "sessions").mkdir(parents=True, exist_ok=True)
argv = sys.argv[1:]
def opt(name):
    return argv[argv.index(name) + 1] if name in argv else None
prompt = sys.stdin.read()
last = prompt.strip().splitlines()[-1] if prompt.strip() else ""
key = os.environ.get("ANTHROPIC_API_KEY")
stream = opt("--output-format") == "stream-json"
partial = "--include-partial-messages" in argv and os.environ.get("FAKE_CLAUDE_NO_PARTIAL") != "1"
if stream and "--verbose" not in argv:
    print("Error: When using --print, --output-format=stream-json requires --verbose", file=sys.stderr)
    sys.exit(1)
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps({"argv": argv, "prompt": prompt, "model": opt("--model"), "resume": opt("--resume"),
                        "system": opt("--append-system-prompt"), "key_set": key is not None,
                        "key_sha256": hashlib.sha256(key.encode()).hexdigest() if key else None,
                        "base_url": os.environ.get("ANTHROPIC_BASE_URL"), "pid": os.getpid(),
                        "stream": stream, "partial": partial}) + "\n")
usage = {"input_tokens": len(prompt.split()), "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
         "output_tokens": 0}
def line(obj):
    print(json.dumps(obj), flush=True)
def init(sid):
    line({"type": "system", "subtype": "init", "session_id": sid, "model": opt("--model") or "claude-default",
          "tools": [], "mcp_servers": [], "permissionMode": "default", "uuid": str(uuid.uuid4())})
def event(sid, ev):
    line({"type": "stream_event", "event": ev, "session_id": sid, "parent_tool_use_id": None, "uuid": str(uuid.uuid4())})
def words(text):
    return [w + " " for w in text.split(" ")[:-1]] + [text.split(" ")[-1]]
def deltas(sid, text, hold=False, upto=None):
    event(sid, {"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant",
                                                      "content": [], "model": opt("--model") or "claude-default"}})
    event(sid, {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    for i, word in enumerate(words(text)[:upto]):
        event(sid, {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}})
        if hold and i == 0:
            deadline = time.monotonic() + 30
            while not (state / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
    if upto is None:
        event(sid, {"type": "content_block_stop", "index": 0})
        event(sid, {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": len(text.split())}})
        event(sid, {"type": "message_stop"})
def result(subtype="success", is_error=False, text=None, code=0, sid=None, **extra):
    sid = sid or str(uuid.uuid4())
    obj = {"type": "result", "subtype": subtype, "is_error": is_error, "duration_ms": 12, "duration_api_ms": 10,
           "num_turns": 1, "session_id": sid, "total_cost_usd": 0.0123, "usage": usage, **extra}
    if text is not None:
        obj["result"] = text
        usage["output_tokens"] = len(text.split())
    if stream:
        init(sid)
        if text is not None and not is_error:
            if partial:
                deltas(sid, text, hold=last == "!streamhold")
            line({"type": "assistant", "message": {"id": "msg_fake", "role": "assistant", "model": "claude-fake",
                  "content": [{"type": "text", "text": text}]}, "session_id": sid, "parent_tool_use_id": None})
    print(json.dumps(obj))
    sys.exit(code)
def note(role, pid):
    with open(state / "pids.log", "a") as f:
        f.write(f"{role} {pid}\n")
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
if last == "!hang":
    child = subprocess.Popen(SLEEPER)
    (state / "hang.pids").write_text(f"{os.getpid()} {child.pid}")
    note("claude", os.getpid())
    note("child", child.pid)
    time.sleep(60)
if last in ("!linger", "!lingerpipe"):
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    child = subprocess.Popen(SLEEPER, **(quiet if last == "!linger" else {}))
    note("claude", os.getpid())
    note("child", child.pid)
    result(text="left a child behind")
if last in ("!setsid", "!setsidexit"):
    grandchild = ("import os, sys, time; os.setsid(); "
                  "open(sys.argv[1], 'a').write(f'grandchild {os.getpid()}\\n'); time.sleep(60)")
    child_code = ("import subprocess, sys, time; d = subprocess.DEVNULL; "
                  f"subprocess.Popen([sys.executable, '-c', {grandchild!r}, sys.argv[1]], stdin=d, stdout=d, stderr=d); "
                  "time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", child_code, str(state / "pids.log")])
    note("claude", os.getpid())
    note("child", child.pid)
    deadline = time.monotonic() + 20
    while "grandchild" not in (state / "pids.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    if last == "!setsid":
        time.sleep(60)
    result(text="a grandchild left the group")
if last in ("!huge", "!hugeerr"):
    out = sys.stdout.buffer if last == "!huge" else sys.stderr.buffer
    chunk = b"x" * (1 << 20)
    for _ in range(int(os.environ.get("FAKE_CLAUDE_HUGE_MB", "300"))):
        out.write(chunk)
    out.flush()
    result(text="that was a lot")
if last == "!garbage":
    print("Welcome to Claude! <<this is not json>>")
    sys.exit(0)
if last == "!ratelimit":
    print("API Error: 429 {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"Number of requests has exceeded your rate limit\"}}", file=sys.stderr)
    sys.exit(1)
if last == "!ratetext":
    print("Rate limit exceeded, slow down", file=sys.stderr)
    sys.exit(1)
if last == "!overloaded":
    print("API Error: 529 {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}", file=sys.stderr)
    sys.exit(1)
if last == "!crash":
    print("Error: something broke", file=sys.stderr)
    sys.exit(2)
if last == "!maxturns":
    result("error_max_turns", True, code=1, num_turns=3)
if last == "!execerror":
    usage["output_tokens"] = 4
    result("error_during_execution", True, code=1)
if last == "!usagelimit":
    result("success", True, f"Claude AI usage limit reached|{int(time.time()) + 120}", code=1)
if last == "!authfail":
    result("success", True, "Invalid API key \u00b7 Please run /login", code=1)
if last == "!toolong":
    result("success", True, "Prompt is too long", code=1)
if stream and last in ("!streamcut", "!streamcrash"):
    sid = str(uuid.uuid4())
    init(sid)
    deltas(sid, "half an answer that never ends", upto=2)
    if last == "!streamcrash":
        print("API Error: 529 {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
if last == "!noresult":
    print(json.dumps({"type": "result", "subtype": "success", "is_error": False, "session_id": "x"}))
    sys.exit(0)
resume = opt("--resume")
history = []
if resume is not None:
    path = state / "sessions" / resume
    if not path.exists():
        print(f"No conversation found with session ID: {resume}", file=sys.stderr)
        sys.exit(1)
    history = path.read_text().splitlines()
    sid = str(uuid.uuid4()) if os.environ.get("FAKE_CLAUDE_FORK") == "1" else resume
    usage["cache_read_input_tokens"] = 100
else:
    sid = str(uuid.uuid4())
    usage["cache_creation_input_tokens"] = 7
history.append(last)
(state / "sessions" / sid).write_text("\n".join(history) + "\n")
text = f"turn {len(history)}: echo: {last}"
if "Answer with one JSON" in (opt("--append-system-prompt") or "") and last != "!notjson":
    text = json.dumps({"echo": last, "turn": len(history)})
if last == "!array":
    usage["output_tokens"] = len(text.split())
    print(json.dumps([{"type": "system", "subtype": "init", "session_id": sid},
                      {"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}},
                      {"type": "result", "subtype": "success", "is_error": False, "result": text, "session_id": sid,
                       "total_cost_usd": 0.0123, "usage": usage}]))
    sys.exit(0)
result(text=text, sid=sid)
'''


def install(folder: Path, name: str = "claude") -> Path:
    """Write the fake CLI into ``folder`` as an executable ``name``; return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{SCRIPT}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def calls(state: Path) -> list[dict]:
    """The calls the fake CLI logged, oldest first."""
    import json

    log = state / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def pids(state: Path) -> dict[str, list[int]]:
    """The pids the fake CLI noted, by role (``claude``, ``child``, ``grandchild``)."""
    found: dict[str, list[int]] = {}
    log = state / "pids.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        role, pid = line.split()
        found.setdefault(role, []).append(int(pid))
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
