"""``ksi-host ask``: one request through the queue and the database, its answer streamed to stdout.

The request goes through the queue like a line of ``ksi-host run`` (its session's turn, its
priority, stored with its result and its ledger rows). The answer is written to stdout piece by
piece as it arrives (``--no-stream``: once whole; ``--json``: the stored result as JSON), and one
usage line goes to stderr: status, tokens, cost, provider, time to the first piece and in all.

Ctrl-C leaves the answer: the request is cancelled (a streaming upstream call is closed) and its
cancelled result stored before the host stops, so it never runs again. A database that holds
unfinished requests of an interrupted ``ksi-host run`` is served without starting them (the Host
is made with ``resume=False``): they stay stored for the run to finish. A request of a session
that has some of them waiting could never start: the queue refuses it, and ask says so (exit 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import IO, Any

from ..errors import OperationalError, ValidationError
from ..models import ChatDelta, CompletionRequest, CompletionResult, RequestQuery

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Ctrl-C, and SIGTERM (``kill``, a service manager) alike: the request is cancelled and stored ``cancelled``."""

FLAGS = {"model": "--model", "session_id": "--session", "agent_id": "--agent", "purpose": "--purpose",
         "priority": "--priority", "max_tokens": "--max-tokens", "temperature": "--temperature", "timeout_s": "--timeout",
         "continue_session": "--continue"}
"""The option that sets each request field (for an error naming what to change)."""


def read_prompt(text: str, stdin: IO[str]) -> str:
    """PROMPT, or all of stdin for ``-`` (its trailing line ends dropped)."""
    return stdin.read().rstrip("\r\n") if text == "-" else text


def build_request(args: argparse.Namespace, prompt: str) -> CompletionRequest:
    """The request the options describe; a ValidationError names the option (``--temperature: ...``)."""
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + [
        {"role": "user", "content": prompt}]
    fields = {"model": args.model, "messages": messages, "session_id": args.session, "agent_id": args.agent,
              "purpose": args.purpose, "priority": args.priority or "normal", "max_tokens": args.max_tokens,
              "temperature": args.temperature, "timeout_s": args.timeout, "continue_session": args.continue_session}
    try:
        return CompletionRequest(**fields)
    except ValidationError as e:
        raise ValidationError(option(e.field, args.system is not None), e.reason) from None


def option(field: str, has_system: bool) -> str:
    """The option (or PROMPT) a request field comes from."""
    if field.startswith("messages"):
        return "--system" if has_system and field.startswith("messages[0]") else "PROMPT"
    return FLAGS.get(field, field)


class Answer:
    """Writes an answer's pieces to ``out`` as they come (text, refusals), then its tool calls."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.line_open = False  # something was written that no line end followed

    def write(self, text: str | None) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.line_open = not text.endswith("\n")

    def add(self, delta: ChatDelta) -> None:
        self.write(delta.content)
        self.write(delta.refusal)

    def whole(self, result: CompletionResult) -> None:
        message = result.message or {}
        self.write(result.text)
        self.write(message.get("refusal"))

    def end(self, result: CompletionResult | None) -> None:
        """Close the answer's last line; then one line per tool call the answer asks for."""
        if self.line_open:
            self.write("\n")
        for call in ((result.message or {}).get("tool_calls") or ()) if result is not None else ():
            fn = call.get("function") or {}
            self.write(f"[tool call {call.get('id')}] {fn.get('name')}({fn.get('arguments')})\n")


def usage_line(result: CompletionResult, elapsed_s: float, first_s: float | None) -> str:
    """One line for stderr: status, tokens, cost, provider, time to the first piece and in all."""
    u = result.usage
    tokens = f"{u.prompt_tokens:,} prompt + {u.completion_tokens:,} completion = {u.total_tokens:,} tokens"
    extra = [f"{n:,} {what}" for n, what in ((u.cached_tokens, "cached"), (u.reasoning_tokens, "reasoning")) if n]
    if extra:
        tokens += f" ({', '.join(extra)})"
    cost = f"cost ${u.cost_usd:.6f}" if u.cost_usd is not None else "cost unknown"
    timing = f"{elapsed_s:.2f}s" + (f" (first piece {first_s:.2f}s)" if first_s is not None else "")
    parts = [tokens, cost, f"provider {result.provider or 'none'}", timing]
    if len(result.attempts) > 1:
        parts.append(f"{len(result.attempts)} attempts")
    parts.append(f"request {result.request_id}")
    return f"ksi-host: {result.status}: " + ", ".join(parts)


def unserved(result: CompletionResult) -> bool:
    """Did ``result`` fail because no provider serves its model at all (no attempt reached one)?"""
    return (result.error is not None and result.error.get("type") == "NoProviderError"
            and all(a.provider is None for a in result.attempts))


class Ask:
    """One ``ksi-host ask`` on a started Host: :meth:`run` returns the exit code."""

    def __init__(self, host: Any, request: CompletionRequest, *, stream: bool, as_json: bool, out: IO[str],
                 err: IO[str]) -> None:
        self.host = host
        self.request = request
        self.stream = stream and not as_json
        self.as_json = as_json
        self.out = out
        self.err = err
        self.answer = Answer(out)
        self.pieces = 0
        self.started = time.monotonic()
        self.first_s: float | None = None

    def _say(self, message: str) -> None:
        print(f"ksi-host: {message}", file=self.err, flush=True)

    async def run(self) -> int:
        """Ask, on the started host; the exit code."""
        self.started = time.monotonic()
        task = asyncio.ensure_future(self._answer())
        interrupted = False
        loop = asyncio.get_running_loop()

        def on_interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            for sig in STOP_SIGNALS:  # a second Ctrl-C raises KeyboardInterrupt, a second SIGTERM kills: stop at once
                loop.remove_signal_handler(sig)
            task.cancel()

        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_interrupt)
        try:
            result: CompletionResult | None = None
            try:
                result = await task
            except asyncio.CancelledError:
                if not interrupted:
                    raise
            except ValidationError as e:  # the queue refused the request
                self._say(str(e))
                if e.field == "session_id":  # behind requests of an earlier run, which this host does not start
                    self._say("finish them with ksi-host run (the same file and --db), or ask with another --db")
                return EXIT_USAGE
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
        if result is None:  # left before its end (Ctrl-C)
            result = await self._settle()
            self.answer.end(None)
            if result is not None:
                print(usage_line(result, time.monotonic() - self.started, self.first_s), file=self.err)
            return EXIT_INTERRUPTED
        return await self._report(result)

    async def _answer(self) -> CompletionResult:
        if not self.stream:
            return await (await self.host.submit(self.request)).future
        stream = self.host.stream(self.request)
        try:
            async for delta in stream:
                if self.first_s is None:
                    self.first_s = time.monotonic() - self.started
                self.pieces += 1
                self.answer.add(delta)
        except OperationalError:
            if stream.result is None:  # refused before it ran
                raise
        assert stream.result is not None
        return stream.result

    async def _settle(self) -> CompletionResult | None:
        """The answer was left before its end: wait for the request's final result (stored), cancelling it
        where it may still run, so that it never runs again. None when it was never stored."""
        if not self.pieces:
            if not self.host.hooks.implemented("ksi_cancel"):
                return None
            if await self.host.cancel(self.request.request_id) is None:
                return None  # unknown to the queue: never accepted
        # a piece was handed out: the stream's end closes the attempt, and the request ends cancelled by itself
        ticket = await self.host.submit(self.request)  # the same run (or its stored result): never a new one
        try:
            return await ticket.future
        except OperationalError:
            return None

    async def _left_unstarted(self) -> bool:
        """Does the database hold unfinished requests (of an earlier run: this host started none of them)?"""
        if not self.host.hooks.implemented("ksi_list_requests"):
            return False
        return bool(await self.host.list_requests(RequestQuery(limit=1, status="queued")))

    async def _report(self, result: CompletionResult) -> int:
        if unserved(result):
            self._say(f"{FLAGS['model']}: {result.error['message']}")  # type: ignore[index]
            return EXIT_USAGE
        if self.as_json:
            print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False), file=self.out, flush=True)
        else:
            if not self.stream:
                self.answer.whole(result)
            self.answer.end(result)
            if not result.ok and result.error:
                self._say(f"{result.error['type']}: {result.error['message']}")
        print(usage_line(result, time.monotonic() - self.started, self.first_s), file=self.err, flush=True)
        if await self._left_unstarted():
            self._say(f"note: unfinished requests of an earlier run in {self.host.db_path} were left for ksi-host run "
                      "(not started)")
        return EXIT_OK if result.ok else EXIT_FAILED
