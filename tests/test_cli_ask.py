"""``ksi-host ask`` end to end in subprocesses, with in-test plugins installed as a fake distribution:
a queue that keeps the hookspec's contract (a running request id gets a ticket for that run, a
finished one its result; ksi_cancel), a streaming provider that holds its last piece until the test
releases it, and providers that echo, fail, crash or call tools. What they do is logged to a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_dist, run_cli

ASK_PLUGINS = '''
import asyncio
import os
from pathlib import Path

from ksi_host import Cancelled, ChatDelta, CompletionResult, ProviderResponse, RateLimited, Ticket, Usage, hookimpl
from ksi_host.testing import FakeProvider, FakeStreamingProvider, ScriptedProviders

DIR = Path(os.environ["KSI_ASK_TEST_DIR"])


def log(line):
    with open(DIR / "events.log", "a") as f:
        f.write(line + "\\n")


class Release:
    """An awaitable piece: waits until the test creates the file 'release' (each stream waits anew)."""

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        log("holding")
        try:
            while not (DIR / "release").exists():
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            log("closed")  # the host closed the stream before its end
            raise


class Queue:
    def __init__(self):
        self.runs, self.tickets, self.results = {}, {}, {}

    @hookimpl
    def ksi_enqueue(self, host, request):
        rid = request.request_id
        if rid in self.results:
            return Ticket.done(self.results[rid])
        ticket = Ticket(rid)
        if rid in self.runs:
            self.tickets[rid].append(ticket)
            return ticket
        self.tickets[rid] = [ticket]
        log(f"run {rid}")

        async def run():
            try:
                result = await host.execute(request)
            except asyncio.CancelledError:
                result = CompletionResult.failed(rid, Cancelled("cancelled while running"), model=request.model)
            except BaseException as e:
                for t in self.tickets.pop(rid):
                    t.set_exception(e)
                return
            self.results[rid] = result
            del self.runs[rid]
            log(f"result {rid} {result.status} {result.text!r}")
            for t in self.tickets.pop(rid):
                t.set_result(result)

        self.runs[rid] = asyncio.ensure_future(run())
        return ticket

    @hookimpl
    async def ksi_cancel(self, host, request_id):
        task = self.runs.get(request_id)
        if task is None:
            return False if request_id in self.results else None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return True


async def echo(request):
    return ProviderResponse(" | ".join(f"{m['role']}: {m['content']}" for m in request.messages),
                            usage=Usage(7, 3, 10, 0.0025), model="echo-1")


async def held(request):
    await Release()
    return ProviderResponse("one two three", usage=Usage(5, 3, 8, None))


async def crash(request):
    raise RuntimeError("a bug in the provider")


TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}


class Providers(ScriptedProviders):
    def __init__(self):
        super().__init__(
            FakeStreamingProvider("streamer", "stream/*", script=[["one ", "two ", Release(), "three"]],
                                  usage=Usage(5, 3, 8, None, cached_tokens=2)),
            FakeProvider("echo", "echo/*", script=[echo]),
            FakeProvider("holder", "hold/*", script=[held]),
            FakeProvider("limited", "rate/*", script=[RateLimited("slow down", retry_after=0.0)]),
            FakeProvider("crashing", "crash/*", script=[crash]),
            FakeProvider("tools", "tools/*", script=[ProviderResponse("", usage=Usage(4, 6, 10, None), tool_calls=(TOOL_CALL,),
                                                                      finish_reason="tool_calls")]),
        )
'''

PLUGINS = {"KSI_HOST_PLUGINS": "askqueue,askproviders"}


@pytest.fixture
def ask_site(tmp_path: Path) -> Path:
    return make_dist(tmp_path / "site", "ksi-ask-fake", "ksi_ask_fake", ASK_PLUGINS,
                     {"askqueue": "ksi_ask_fake:Queue", "askproviders": "ksi_ask_fake:Providers"})


def ask(tmp_path: Path, site: Path, *args: str, input: str | None = None, env: dict[str, str] | None = None):
    return run_cli(["ask", *args, "--db", str(tmp_path / "k.db")], site=site, input=input,
                   env={**PLUGINS, "KSI_ASK_TEST_DIR": str(tmp_path), **(env or {})})


def events(tmp_path: Path) -> list[str]:
    log = tmp_path / "events.log"
    return log.read_text().splitlines() if log.exists() else []


class PtyRun:
    """``ksi-host ask`` with its stdout on a pseudo-terminal (stderr a pipe): what it printed, as it printed it."""

    def __init__(self, tmp_path: Path, site: Path, *args: str) -> None:
        import fcntl
        import struct
        import termios

        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        # (PYTHONUNBUFFERED would hide a missing flush: a user's terminal has Python's own buffering)
        env = {k: v for k, v in os.environ.items() if k not in ("KSI_HOST_PLUGINS", "KSI_HOST_DISABLE", "PYTHONUNBUFFERED")}
        env.update(PLUGINS, KSI_ASK_TEST_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join([str(site), env.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "ksi_host.cli", "ask", *args, "--db", str(tmp_path / "k.db")],
                                     stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=env, text=True)
        os.close(slave)
        os.set_blocking(self.master, False)
        self.seen = b""

    def read(self, until: str | None = None, timeout: float = 30) -> str:
        """What the terminal showed so far, reading until ``until`` shows (or ``timeout`` passes)."""
        deadline = time.monotonic() + (timeout if until is not None else 0.3)  # None: what is there now
        while time.monotonic() < deadline and (until is None or until not in self.text):
            try:
                chunk = os.read(self.master, 65536)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            self.seen += chunk
        return self.text

    @property
    def text(self) -> str:
        return self.seen.decode().replace("\r\n", "\n")

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        """Wait for the end; the exit code and stderr."""
        err = self.proc.stderr.read()  # until the child closes it: its end
        code = self.proc.wait(timeout)
        self.read()  # what is left on the terminal
        os.close(self.master)
        return code, err


def wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_answer_streams_to_the_terminal_before_it_ends(tmp_path, ask_site):
    run = PtyRun(tmp_path, ask_site, "count to three", "--model", "stream/x")
    shown = run.read(until="two ")
    assert shown == "one two "  # the first pieces, on the terminal ...
    wait_for(lambda: "holding" in events(tmp_path))
    time.sleep(0.3)
    assert run.proc.poll() is None and run.read() == "one two "  # ... while the answer is still being written
    (tmp_path / "release").touch()
    code, err = run.finish()
    assert code == 0, err
    assert run.text == "one two three\n"  # the rest, and a line end
    usage = err.strip().splitlines()[-1]
    assert usage.startswith("ksi-host: ok: 5 prompt + 3 completion = 8 tokens (2 cached), cost unknown, provider streamer, ")
    assert "(first piece " in usage and "request " in usage


def test_no_stream_prints_the_answer_once_whole(tmp_path, ask_site):
    run = PtyRun(tmp_path, ask_site, "count to three", "--model", "hold/x", "--no-stream")
    wait_for(lambda: "holding" in events(tmp_path))
    time.sleep(0.3)
    assert run.read() == ""  # nothing while the answer is not whole
    (tmp_path / "release").touch()
    code, err = run.finish()
    assert code == 0, err
    assert run.text == "one two three\n"
    assert "first piece" not in err and "ksi-host: ok: " in err


def test_ctrl_c_leaves_the_answer_cancels_the_request_and_exits_130(tmp_path, ask_site):
    run = PtyRun(tmp_path, ask_site, "count to three", "--model", "stream/x")
    assert run.read(until="two ") == "one two "
    wait_for(lambda: "holding" in events(tmp_path))
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 130, err
    assert run.text == "one two \n"  # the line is closed
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("ksi-host: cancelled: ")
    log = events(tmp_path)
    assert "closed" in log  # the upstream stream was closed ...
    runs = [e for e in log if e.startswith("run ")]
    results = [e for e in log if e.startswith("result ")]
    assert len(runs) == 1 and len(results) == 1  # ... the request ran once ...
    assert results[0].split(" ", 3)[2:] == ["cancelled", "'one two '"]  # ... and ended cancelled with what it had handed out


@pytest.mark.parametrize(("options", "sig"), [(["--no-stream"], signal.SIGINT), (["--json"], signal.SIGINT),
                                             ([], signal.SIGTERM)])  # SIGTERM (kill, a service manager) as Ctrl-C
def test_ctrl_c_without_streaming_cancels_the_request_too(tmp_path, ask_site, options, sig):
    run = PtyRun(tmp_path, ask_site, "count to three", "--model", "hold/x", *options)
    wait_for(lambda: "holding" in events(tmp_path))
    run.proc.send_signal(sig)
    code, err = run.finish()
    assert code == 130, err
    assert run.text == "" and err.strip().splitlines()[-1].startswith("ksi-host: cancelled: ")
    log = events(tmp_path)
    assert "closed" in log and [e.split()[2] for e in log if e.startswith("result ")] == ["cancelled"]


def test_json_prints_the_stored_result_and_no_streamed_text(tmp_path, ask_site):
    (tmp_path / "release").touch()
    p = ask(tmp_path, ask_site, "count", "--model", "hold/x", "--json", "--session", "s1", "--agent", "a1",
            "--purpose", "demo")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)  # stdout is the JSON alone
    assert result["status"] == "ok" and result["text"] == "one two three" and result["session_id"] == "s1"
    assert result["usage"]["total_tokens"] == 8 and result["provider"] == "holder"
    assert "ksi-host: ok: " in p.stderr


def test_prompt_from_stdin_system_message_and_request_fields(tmp_path, ask_site):
    p = ask(tmp_path, ask_site, "-", "--model", "echo/x", "--system", "be brief", input="what is KSI?\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "system: be brief | user: what is KSI?\n"
    assert p.stderr.startswith("ksi-host: ok: 7 prompt + 3 completion = 10 tokens, cost $0.002500, provider echo, ")


def test_a_failed_request_exits_1_naming_the_error(tmp_path, ask_site):
    p = ask(tmp_path, ask_site, "hi", "--model", "rate/x")
    assert p.returncode == 1
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith("ksi-host: RateLimited: slow down")
    assert lines[1].startswith("ksi-host: error: 0 prompt + 0 completion = 0 tokens, cost unknown, provider limited, ")


def test_tool_calls_are_shown(tmp_path, ask_site):
    p = ask(tmp_path, ask_site, "look it up", "--model", "tools/x", "--no-stream")
    assert p.returncode == 0, p.stderr
    assert p.stdout == '[tool call call_1] lookup({"q": "x"})\n'
    p = ask(tmp_path, ask_site, "look it up", "--model", "tools/x")
    assert p.returncode == 0 and p.stdout == '[tool call call_1] lookup({"q": "x"})\n'


def test_a_model_nothing_serves_is_a_usage_error(tmp_path, ask_site):
    p = ask(tmp_path, ask_site, "hi", "--model", "nowhere/x")
    assert p.returncode == 2
    assert p.stderr.strip() == ("ksi-host: --model: no provider serves model 'nowhere/x' (configured models: crash/*, "
                                "echo/*, hold/*, rate/*, stream/*, tools/*)")


@pytest.mark.parametrize(("args", "stdin", "message"), [
    (["hi"], None, "the following arguments are required: -m/--model"),
    (["hi", "--model", "echo/x", "--continue"], None, "ksi-host: --continue needs --session"),
    (["   ", "--model", "echo/x"], None, "ksi-host: PROMPT is empty"),
    (["-", "--model", "echo/x"], "", "ksi-host: PROMPT is empty (stdin held nothing)"),
    (["hi", "--model", "echo/x", "--temperature", "3"], None, "ksi-host: --temperature: must be a number from 0 to 2"),
    (["hi", "--model", "echo/x", "--temperature", "nan"], None, "ksi-host: --temperature: must be a number from 0 to 2"),
    (["hi", "--model", "echo/x", "--timeout", "0"], None, "--timeout: must be a positive number of seconds"),
    (["hi", "--model", "echo/x", "--max-tokens", "0"], None, "--max-tokens: must be at least 1"),
    (["hi", "--model", "echo/x", "--priority", "urgent"], None, "--priority: invalid choice: 'urgent'"),
    (["hi", "--model", " "], None, "ksi-host: --model: is required and must be a non-empty string"),
    (["hi", "--model", "echo/x", "--session", ""], None, "ksi-host: --session: must be a non-empty string"),
    (["hi", "--model", "echo/x", "--system", b"\xff"], None, "ksi-host: --system: is not valid Unicode text"),
])
def test_bad_options_are_usage_errors_naming_the_option(tmp_path, ask_site, args, stdin, message):
    p = ask(tmp_path, ask_site, *args, input=stdin)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert events(tmp_path) == []  # nothing was sent


def test_continue_sets_continue_session_which_needs_a_session_plugin(tmp_path, ask_site):
    p = ask(tmp_path, ask_site, "and then?", "--model", "echo/x", "--session", "s1", "--continue", "--json")
    assert p.returncode == 1, p.stderr  # no plugin continues conversations here: said, not ignored
    result = json.loads(p.stdout)
    assert result["session_id"] == "s1" and "ksi_prepare_request: install ksi-sessions" in result["error"]["message"]


def test_programming_error_exits_70_with_the_traceback(tmp_path, ask_site):
    p = ask(tmp_path, ask_site, "hi", "--model", "crash/x")
    assert p.returncode == 70
    assert "RuntimeError: a bug in the provider" in p.stderr and "raised by provider 'crashing'" in p.stderr


def test_without_a_queue_plugin_exits_2_saying_what_to_install(tmp_path, ask_site):
    p = ask(tmp_path, ask_site, "hi", "--model", "echo/x", env={"KSI_HOST_PLUGINS": "askproviders"})
    assert p.returncode == 2
    assert "no plugin implements ksi_enqueue: install ksi-queue" in p.stderr


def test_ask_is_listed_in_help(ask_site):
    p = run_cli(["--help"], site=ask_site)
    assert p.returncode == 0 and "ask" in p.stdout
    p = run_cli(["ask", "--help"], site=ask_site)
    for option in ("--model", "--session", "--continue", "--agent", "--system", "--json", "--no-stream", "--purpose",
                   "--priority", "--max-tokens", "--temperature", "--timeout", "--db", "--config"):
        assert option in p.stdout, option


def test_priority_choices_are_the_hosts():
    from ksi_host.cli.main import PRIORITY_NAMES
    from ksi_host.models import PRIORITIES

    assert PRIORITY_NAMES == tuple(PRIORITIES)
