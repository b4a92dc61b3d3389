"""A local OpenAI-compatible HTTP server for tests and benchmarks (stdlib only).

It answers ``POST /v1/chat/completions`` (and ``/chat/completions``) with a
real OpenAI-shaped chat completion, usage included, and can be told to fail:

* ``"ok"``: a normal answer (after ``delay_s``).
* ``"429"``: rate limited, with a ``Retry-After: <retry_after>`` header when
  ``retry_after`` is not None.
* ``"500"``, ``"502"``, ``"503"``: server errors; ``"400"``: a bad request;
  ``"401"``, ``"403"``: authentication errors (OpenAI's error bodies).
* ``"context_length"``: HTTP 400 with OpenAI's ``context_length_exceeded`` body.
* ``"hang"``: answer nothing for ``hang_s`` seconds (past any client timeout).
* ``"malformed"``: HTTP 200 whose body is not valid JSON.
* ``"disconnect"``: close the connection without answering.
* ``"cut"``: start the answer and close the connection halfway: a stream after
  ``cut_after`` chunks (no ``finish_reason``, no ``[DONE]``), a whole answer
  after half its body.
* ``"hold"``: answer all but the end, then wait until :meth:`OpenAIServer.release`
  (or ``POST /_ksi/release``) or ``hang_s``: a stream holds its last chunk (the
  one with ``finish_reason``), a whole answer is held entirely.
* ``"refusal"``: an answer whose message is a ``refusal`` (content null).

The answer follows the request as a model would, deterministically:

* ``tools`` (and ``tool_choice`` not ``none``), the last message not a ``tool``
  result: a call of the first tool (or the one ``tool_choice`` names), its
  arguments built from the tool's parameter schema, ``finish_reason:
  "tool_calls"``;
* the last message a ``tool`` result: ``"the tool said: <its content>"``;
* ``response_format`` ``json_object``: ``{"echo": "<last user message>"}``;
  ``json_schema``: a JSON value of the schema (every property filled in);
* otherwise ``reply``, or ``"echo: <last user message>"``.

``"logprobs": true`` adds the choice's ``logprobs`` (OpenAI's shape): one entry
per word of the content (a refusal's under ``refusal``), each with its
``token``, a ``logprob`` made from the word (deterministic), its UTF-8
``bytes`` and ``top_logprobs`` entries (``top_logprobs`` of them: the word
first, then made-up alternatives); a stream carries each word's entry in its
chunk. Without it, ``logprobs`` is null.

``cached_tokens`` / ``reasoning_tokens`` (when set) are reported in the usage as
``prompt_tokens_details.cached_tokens`` and ``completion_tokens_details.reasoning_tokens``
(the reasoning tokens counted in ``completion_tokens``, as OpenAI does).

Every answer, whole or streamed (each chunk), says ``system_fingerprint``:
``system_fingerprint`` (:data:`SYSTEM_FINGERPRINT` unless set; None: null, as
an upstream that sends none).

``"stream": true`` answers with server-sent events: ``data: {chat.completion.chunk}``
lines (the role, then the content word by word, or a tool call's name and then
its arguments in pieces; the last with the ``finish_reason``), a last chunk with
``usage`` and no choices when ``stream_options.include_usage``, then ``data: [DONE]``.
``first_chunk_delay_s`` is waited between the headers and the first chunk (the
time to first token of a benchmark). A client that closes the connection before
the end of a stream is noticed at once (also while a chunk is held) and counted
in ``closed_early`` (and the Arrival's ``closed_early``).

With ``echo_auth`` set, the ``"401"`` answer repeats the key it was sent (the
``Authorization`` header without ``Bearer ``), like a careless upstream, to
test redaction: ``True`` or ``"raw"`` as it came, or one of :data:`ECHO_FORMS`
(percent-encoded, JSON-escaped, base64, a Basic ``user:key`` credential); a
list of them is used in turn, one per echoing answer.

Which fault a request gets, first match wins: ``faults_by_model[model]``;
the next item of ``script`` (one item per request, in arrival order); a draw
from ``rates`` (``{"429": 0.25, "500": 0.2, "hang": 0.03}``, seeded with
``seed``); else ``"ok"``.

Every completion request is logged in ``arrivals`` (an :class:`Arrival` with
the time, model, fault, the ``Authorization`` header as sent — test-only data
so a test can check a key arrived —, ``user``/``metadata`` from the body, the
whole JSON body as it arrived (unless ``keep_bodies=False``: what reached the
upstream, for tests), an ``X-Session-Id`` header if sent, when the answer was
sent, the usage an OK answer reported, and for a stream the chunks sent and
whether the client left early); ``hits`` counts them, ``counts`` counts them by fault and
``usage()`` sums the usage of every OK answer sent.

Use it in-process::

    async with OpenAIServer() as server:        # on the running loop
        ...
    with OpenAIServer(script=["429", "ok"]) as server:   # its own loop in a thread
        litellm.completion(model="openai/x", api_base=server.url, ...)

or as a process (for subprocess tests)::

    python -m ksi_host.testing.server --port 0 --rates 429=0.25,500=0.2 --seed 1

which prints one JSON line ``{"port": ..., "url": ...}`` and serves until
killed. A running server is controlled over HTTP too (control requests are not
counted as hits): ``GET /_ksi/stats``, ``GET /_ksi/arrivals``, ``POST
/_ksi/reset``, ``POST /_ksi/faults`` with a JSON body of any of ``script``,
``rates``, ``seed``, ``faults_by_model``, ``delay_s``, ``retry_after``,
``hang_s``, ``echo_auth``, ``cut_after``, ``first_chunk_delay_s``, ``cached_tokens``,
``reasoning_tokens``, ``system_fingerprint``; ``POST /_ksi/release`` releases the held answers, ``GET
/_ksi/streams`` reports ``{"streams", "closed_early", "holding"}``.

The pytest fixture ``openai_server`` (function scope) yields a started server
running in a background thread; its ``url`` ends in ``/v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

from ..chat import content_text, schema_example

FAULTS = frozenset(
    {"ok", "429", "400", "401", "403", "500", "502", "503", "context_length", "hang", "malformed", "disconnect",
     "cut", "hold", "refusal"}
)

REFUSAL = "I can't help with that (test server)."
SYSTEM_FINGERPRINT = "fp_ksi_test"
"""The ``system_fingerprint`` every answer and chunk says unless the server is told another."""

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable"}

_ERRORS: dict[str, tuple[int, str, str, str | None]] = {
    # fault: (status, type, message, code)
    "429": (429, "rate_limit_error", "Rate limit reached for requests (test server).", "rate_limit_exceeded"),
    "400": (400, "invalid_request_error", "Invalid request (test server).", None),
    "401": (401, "invalid_request_error", "Incorrect API key provided (test server).", "invalid_api_key"),
    "403": (403, "permission_error", "You are not allowed to use this model (test server).", None),
    "500": (500, "server_error", "The server had an error while processing your request (test server).", None),
    "502": (502, "server_error", "Bad gateway (test server).", None),
    "503": (503, "server_error", "The engine is currently overloaded, please try again later (test server).", None),
    "context_length": (
        400,
        "invalid_request_error",
        "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens. "
        "Please reduce the length of the messages.",
        "context_length_exceeded",
    ),
}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


ECHO_FORMS: dict[str, Any] = {
    "raw": lambda key: key,
    "json": lambda key: json.dumps(key)[1:-1].replace("/", "\\/"),  # as an encoder that escapes "/" writes it
    "quote": lambda key: quote(key, safe=""),
    "quote_lower": lambda key: quote(key, safe="").replace("%2F", "%2f").replace("%2B", "%2b").replace("%3D", "%3d"),
    "quote_plus": lambda key: quote_plus(key),
    "base64": _b64,
    "base64_nopad": lambda key: _b64(key).rstrip("="),
    "basic": lambda key: "Basic " + _b64(f"ksi-user:{key}"),
    "basic_nopad": lambda key: "Basic " + _b64(f"u:{key}").rstrip("="),
}
"""How the ``401`` answer spells the key it echoes (``echo_auth``), by name."""


def echo_form(key: str, how: str) -> str:
    """``key`` spelt as :data:`ECHO_FORMS` names it."""
    if how not in ECHO_FORMS:
        raise ValueError(f"unknown echo form {how!r} (known: {', '.join(ECHO_FORMS)})")
    return ECHO_FORMS[how](key)


def _check_fault(fault: str) -> str:
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r} (known: {', '.join(sorted(FAULTS))})")
    return fault


@dataclass(slots=True)
class Arrival:
    """One completion request as the server received it."""

    t: float  # time.time() at arrival
    path: str
    model: str | None
    fault: str
    authorization: str | None  # the header as sent (test-only data)
    session_id: str | None  # the X-Session-Id header, if sent
    user: str | None
    metadata: Any
    body: dict[str, Any] | None = field(repr=False, default=None)
    answered_at: float | None = None  # time.time() when the answer was sent (None: none sent, e.g. a hang cut short)
    usage: dict[str, Any] | None = None  # the usage an OK answer reported
    stream: bool = False  # answered with server-sent events
    chunks: int = 0  # stream: the data chunks sent ([DONE] not counted)
    closed_early: bool = False  # stream: the client closed the connection before its end

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _words(text: Any) -> int:
    if isinstance(text, str):
        return len(text.split())
    if isinstance(text, list):  # content parts
        return sum(_words(p.get("text")) for p in text if isinstance(p, dict))
    return 0


def _last_user_text(messages: Any) -> str:
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                return content_text(m.get("content"))
    return ""


def _tool_called(body: dict[str, Any]) -> dict[str, Any] | None:
    """The function the answer calls: the one ``tool_choice`` names, else the first of ``tools``; None: no call."""
    tools = [t.get("function") for t in body.get("tools") or () if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        named = choice["function"].get("name")
        return next((t for t in tools if t.get("name") == named), tools[0])
    return tools[0]


def _pieces(text: str) -> list[str]:
    """``text`` cut into the pieces a stream sends: each word with the spaces after it."""
    return re.findall(r"\S+\s*|\s+", text) or [text]


def token_logprob(token: str) -> float:
    """The log probability the server gives ``token``: made from its text, so the same word always gets the same."""
    return -round((sum(token.encode()) % 97 + 1) / 100, 2)


def logprob_entries(text: str | None, top: int) -> list[dict[str, Any]] | None:
    """OpenAI's log probability entries for ``text`` (one per piece a stream sends; None for no text), each with
    ``top`` alternatives (the piece itself first)."""
    if text is None:
        return None
    entries = []
    for piece in _pieces(text):
        lp = token_logprob(piece)
        alternatives = [{"token": piece, "logprob": lp, "bytes": list(piece.encode())}]
        alternatives += [{"token": f"{piece.strip()}~{k}", "logprob": round(lp - k, 2),
                          "bytes": list(f"{piece.strip()}~{k}".encode())} for k in range(1, top)]
        entries.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": alternatives[:top]})
    return entries


def _top(body: dict[str, Any]) -> int | None:
    """How many alternatives per token a request asks (``top_logprobs``, 0 when not given); None when it asks no
    log probabilities."""
    if body.get("logprobs") is not True:
        return None
    top = body.get("top_logprobs")
    return top if isinstance(top, int) and not isinstance(top, bool) and top > 0 else 0


def _arguments_pieces(arguments: str, size: int = 8) -> list[str]:
    return [arguments[i:i + size] for i in range(0, len(arguments), size)] or [""]


def _chunk_logprobs(delta: dict[str, Any], top: int | None) -> dict[str, Any] | None:
    """A stream chunk's ``logprobs``: the entry of the piece of content (or refusal) it carries; None when the request
    asks none or the chunk carries no text."""
    if top is None or not (delta.get("content") or delta.get("refusal")):
        return None
    return {"content": logprob_entries(delta.get("content") or None, top),
            "refusal": logprob_entries(delta.get("refusal"), top)}


def _client_gone(reader: asyncio.StreamReader) -> bool:
    """Has the client left mid-answer? A client that closes its end is seen as EOF (nothing else arrives
    mid-answer); one that closes with our bytes still unread in its socket resets the connection, which
    the reader holds as an exception, never as EOF."""
    return reader.at_eof() or reader.exception() is not None


class OpenAIServer:
    """An OpenAI-compatible chat completions server on ``host:port`` (0: any free port).

    See the module docstring for the fault modes and how one is chosen.
    ``reply``: the answer text (None: ``"echo: <last user message>"``).
    ``keep_bodies``: keep each request's JSON body in its Arrival.
    ``echo_auth``: the ``401`` answer repeats the key it was sent (to test redaction):
    True or a name of :data:`ECHO_FORMS`, or a list of them used in turn.
    ``cut_after``: the chunks a ``cut`` stream sends before it closes the connection.
    ``first_chunk_delay_s``: seconds between a stream's headers and its first chunk.
    ``cached_tokens``, ``reasoning_tokens``: report them in every answer's usage (None: not reported).
    ``system_fingerprint``: every answer's and chunk's (None: null).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        script: Iterable[str] = (),
        rates: Mapping[str, float] | None = None,
        seed: int | None = None,
        faults_by_model: Mapping[str, str] | None = None,
        delay_s: float = 0.0,
        retry_after: str | float | None = "1",
        hang_s: float = 300.0,
        reply: str | None = None,
        keep_bodies: bool = True,
        echo_auth: bool | str | Sequence[str] = False,
        cut_after: int = 2,
        first_chunk_delay_s: float = 0.0,
        cached_tokens: int | None = None,
        reasoning_tokens: int | None = None,
        system_fingerprint: str | None = SYSTEM_FINGERPRINT,
    ) -> None:
        self.host = host
        self.port = port
        self.delay_s = delay_s
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.reply = reply
        self.keep_bodies = keep_bodies
        self.echo_auth = echo_auth
        self.cut_after = cut_after
        self.first_chunk_delay_s = first_chunk_delay_s
        self.cached_tokens = cached_tokens
        self.reasoning_tokens = reasoning_tokens
        self.system_fingerprint = system_fingerprint
        self.streams = 0  # streamed answers begun
        self.closed_early = 0  # streams whose client closed the connection before their end
        self._held: list[asyncio.Event] = []  # the answers waiting for release()
        self._releases = 0  # releases that came while nothing was held: the next holds pass
        self._echoes = 0
        self.arrivals: list[Arrival] = []
        self.counts: Counter[str] = Counter()
        self._script: list[str] = []
        self._rates: list[tuple[str, float]] = []
        self._rng = random.Random(seed)
        self.faults_by_model: dict[str, str] = {}
        self.set_faults(script=script, rates=rates, seed=seed, faults_by_model=faults_by_model)
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._next_id = 0

    # -- configuration -----------------------------------------------------------

    def set_faults(
        self,
        *,
        script: Iterable[str] | None = None,
        rates: Mapping[str, float] | None = None,
        seed: int | None = None,
        faults_by_model: Mapping[str, str] | None = None,
    ) -> None:
        """Replace the fault script, the fault rates (re-seeding when ``seed`` is given)
        and/or the per-model faults. Arguments left None are unchanged."""
        if script is not None:
            self._script = [_check_fault(f) for f in script]
        if rates is not None:
            pairs = [(_check_fault(f), float(p)) for f, p in rates.items()]
            if any(p < 0 for _, p in pairs) or sum(p for _, p in pairs) > 1.0 + 1e-9:
                raise ValueError(f"fault rates must be >= 0 and sum to at most 1, got {dict(rates)!r}")
            self._rates = pairs
        if seed is not None:
            self._rng = random.Random(seed)
        if faults_by_model is not None:
            self.faults_by_model = {m: _check_fault(f) for m, f in faults_by_model.items()}

    def script(self, *faults: str) -> None:
        """Shorthand: the next requests get ``faults`` in order, then the usual choice."""
        self.set_faults(script=faults)

    def reset(self) -> None:
        """Forget arrivals and counts, the script, the rates and the per-model faults."""
        self.arrivals.clear()
        self.counts.clear()
        self.streams = self.closed_early = self._releases = 0
        self._script = []
        self._rates = []
        self.faults_by_model = {}

    @property
    def hits(self) -> int:
        """How many completion requests arrived."""
        return len(self.arrivals)

    @property
    def url(self) -> str:
        """The OpenAI base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits, "counts": dict(self.counts)}

    def stream_stats(self) -> dict[str, int]:
        """Streams begun, streams the client left before their end, answers held now."""
        return {"streams": self.streams, "closed_early": self.closed_early, "holding": self.holding}

    @property
    def holding(self) -> int:
        """How many answers (``hold``) are waiting for :meth:`release` now."""
        return len(self._held)

    def release(self) -> None:
        """Let every held answer finish (from any thread). With none held, the next ``hold`` passes at once."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._release()
        else:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                self._release()
            else:
                loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        if not self._held:
            self._releases += 1
        for event in self._held:
            event.set()
        self._held.clear()

    def usage(self) -> dict[str, int]:
        """The usage summed over every OK answer sent (``calls``: how many OK answers)."""
        usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for a in self.arrivals:
            if a.usage is not None:
                usage["calls"] += 1
                for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
                    usage[k] += a.usage[k]
        return usage

    def _choose(self, model: str | None) -> str:
        if model is not None and model in self.faults_by_model:
            return self.faults_by_model[model]
        if self._script:
            return self._script.pop(0)
        if self._rates:
            x = self._rng.random()
            for fault, p in self._rates:
                if x < p:
                    return fault
                x -= p
        return "ok"

    # -- life cycle (same loop) ------------------------------------------------

    async def start(self) -> OpenAIServer:
        """Start serving on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop serving: close the listener and every open connection."""
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            if self._conns:
                await asyncio.gather(*self._conns, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> OpenAIServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- life cycle (own loop in a thread) ------------------------------------

    def start_in_thread(self) -> OpenAIServer:
        """Start serving on a new event loop in a daemon thread; returns once listening."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:  # reported to the starting thread
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"openai-test-server:{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop_thread(self) -> None:
        """Stop a server started with :meth:`start_in_thread`."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_thread()

    # -- HTTP ---------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, target, version = lines[0].split(" ", 2)
                except ValueError:
                    await self._send(writer, 400, {"error": {"message": "bad request line"}}, close=True)
                    return
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                try:
                    body = await self._read_body(reader, headers)
                except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                    return
                close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
                keep = await self._route(method, target.split("?", 1)[0], headers, body, reader, writer, close)
                if not keep or close:
                    return
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    return b"".join(chunks)
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
        n = int(headers.get("content-length") or 0)
        return await reader.readexactly(n) if n else b""

    async def _send(self, writer: asyncio.StreamWriter, status: int, payload: Any, *,
                    extra: Mapping[str, str] | None = None, raw: bytes | None = None, close: bool = False,
                    upto: int | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "Content-Type: application/json",
                f"Content-Length: {len(data)}"]
        if close:
            head.append("Connection: close")
        for k, v in (extra or {}).items():
            head.append(f"{k}: {v}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data[:upto])
        await writer.drain()

    async def _route(self, method: str, path: str, headers: dict[str, str], body: bytes,
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter, close: bool) -> bool:
        """Answer one request; False to close the connection."""
        if path.startswith("/_ksi/"):
            return await self._control(method, path, body, writer, close)
        if path.endswith("/chat/completions"):
            if method != "POST":
                await self._send(writer, 405, {"error": {"message": "use POST"}}, close=close)
                return True
            return await self._completion(path, headers, body, reader, writer, close)
        if path.endswith("/models") and method == "GET":
            await self._send(writer, 200, {"object": "list", "data": []}, close=close)
            return True
        await self._send(writer, 404, {"error": {"message": f"no route {method} {path}"}}, close=close)
        return True

    async def _completion(self, path: str, headers: dict[str, str], raw: bytes, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, close: bool) -> bool:
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            await self._send(writer, 400, {"error": {"message": "body is not a JSON object", "type": "invalid_request_error"}},
                             close=close)
            return True
        model = body.get("model") if isinstance(body.get("model"), str) else None
        fault = self._choose(model)
        arrival = Arrival(
            time.time(), path, model, fault, headers.get("authorization"), headers.get("x-session-id"),
            body.get("user"), body.get("metadata"), body if self.keep_bodies else None, stream=body.get("stream") is True,
        )
        self.arrivals.append(arrival)
        self.counts[fault] += 1
        if fault == "disconnect":
            return False
        if fault == "hang":
            await asyncio.sleep(self.hang_s)
        elif self.delay_s:
            await asyncio.sleep(self.delay_s)
        if fault == "malformed":
            await self._send(writer, 200, None, raw=b'{"id": "chatcmpl-malformed", "object": "chat.completion", "choices": [',
                             close=close)
            arrival.answered_at = time.time()
            return True
        if fault in _ERRORS:
            status, typ, message, code = _ERRORS[fault]
            if fault == "401" and self.echo_auth:  # like an upstream that repeats the key it got
                token = (headers.get("authorization") or "").removeprefix("Bearer ")
                message = f"Incorrect API key provided: {self._echo(token)}. You can find your API key at example.invalid."
            extra = {"Retry-After": str(self.retry_after)} if fault == "429" and self.retry_after is not None else None
            await self._send(writer, status, {"error": {"message": message, "type": typ, "param": None, "code": code}},
                             extra=extra, close=close)
            arrival.answered_at = time.time()
            return True
        message, finish_reason = self._answer(body, fault)
        usage = self._usage(body.get("messages"), message)
        self._next_id += 1
        if arrival.stream:
            return await self._stream(body, model, message, finish_reason, usage, fault, arrival, reader, writer)
        payload = json.dumps({
            "id": f"chatcmpl-test-{self._next_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model or "unknown",
            "system_fingerprint": self.system_fingerprint,
            "choices": [{"index": 0, "message": message, "logprobs": self._logprobs(body, message),
                         "finish_reason": finish_reason}],
            "usage": usage,
        }).encode()
        extra = {"x-request-id": f"req-{self._next_id}"}
        if fault == "cut":  # the head promises the whole body; half of it comes, then the connection closes
            await self._send(writer, 200, None, raw=payload, extra=extra, close=close, upto=len(payload) // 2)
            return False
        if fault == "hold" and not await self._hold(reader, self._holder()):
            return False
        await self._send(writer, 200, None, raw=payload, extra=extra, close=close)
        arrival.answered_at = time.time()
        arrival.usage = usage
        return True

    def _answer(self, body: dict[str, Any], fault: str) -> tuple[dict[str, Any], str]:
        """The assistant message for ``body`` and its finish reason (see the module docstring)."""
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        if fault == "refusal":
            return {"role": "assistant", "content": None, "refusal": REFUSAL}, "stop"
        tool = None if last.get("role") == "tool" else _tool_called(body)
        if tool is not None:
            params = tool.get("parameters") if isinstance(tool.get("parameters"), dict) else {"type": "object"}
            arguments = schema_example(params, _last_user_text(messages))
            call = {"id": f"call_test_{self._next_id + 1}", "type": "function",
                    "function": {"name": str(tool.get("name")), "arguments": json.dumps(arguments)}}
            return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        if last.get("role") == "tool":
            text = f"the tool said: {content_text(last.get('content'))}"
        else:
            text = self.reply if self.reply is not None else f"echo: {_last_user_text(messages)}"
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_object":
            text = json.dumps({"echo": text})
        elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            schema = fmt.get("json_schema") if isinstance(fmt.get("json_schema"), dict) else {}
            text = json.dumps(schema_example(schema.get("schema", {"type": "object"}), text))
        return {"role": "assistant", "content": text}, "stop"

    @staticmethod
    def _logprobs(body: dict[str, Any], message: dict[str, Any]) -> dict[str, Any] | None:
        """The choice's ``logprobs`` for ``message`` (None when the request asks none)."""
        top = _top(body)
        if top is None:
            return None
        return {"content": logprob_entries(message.get("content") or None, top),
                "refusal": logprob_entries(message.get("refusal"), top)}

    def _usage(self, messages: Any, message: dict[str, Any]) -> dict[str, Any]:
        prompt_tokens = sum(_words(m.get("content")) + 3 for m in messages if isinstance(m, dict)) if isinstance(messages, list) else 0
        said = message.get("content") or message.get("refusal") or " ".join(
            c["function"]["arguments"] for c in message.get("tool_calls") or ())
        completion_tokens = max(1, len(said.split())) + (self.reasoning_tokens or 0)
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.reasoning_tokens is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return usage

    @staticmethod
    def _chunk_deltas(message: dict[str, Any]) -> list[dict[str, Any]]:
        """The deltas of a streamed ``message``: the role, then its content, refusal or tool calls in pieces."""
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": "" if message.get("content") is not None else None}]
        if message.get("content"):
            deltas += [{"content": piece} for piece in _pieces(message["content"])]
        if message.get("refusal"):
            deltas += [{"refusal": piece} for piece in _pieces(message["refusal"])]
        for i, call in enumerate(message.get("tool_calls") or ()):
            fn = call["function"]
            deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                           "function": {"name": fn["name"], "arguments": ""}}]})
            deltas += [{"tool_calls": [{"index": i, "function": {"arguments": piece}}]}
                       for piece in _arguments_pieces(fn["arguments"])]
        return deltas

    async def _stream(self, body: dict[str, Any], model: str | None, message: dict[str, Any], finish_reason: str,
                      usage: dict[str, Any], fault: str, arrival: Arrival, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> bool:
        """Answer with server-sent events; False when the connection is to be closed (cut, or the client left)."""
        self.streams += 1
        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        base = {"id": f"chatcmpl-test-{self._next_id}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model or "unknown", "system_fingerprint": self.system_fingerprint}
        extra_usage = {"usage": None} if with_usage else {}
        top = _top(body)
        chunks = [{**base, "choices": [{"index": 0, "delta": d, "logprobs": _chunk_logprobs(d, top), "finish_reason": None}],
                   **extra_usage} for d in self._chunk_deltas(message)]
        chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}],
                       **extra_usage})
        if with_usage:
            chunks.append({**base, "choices": [], "usage": usage})
        last = len(chunks) - (2 if with_usage else 1)  # the index of the chunk with the finish reason
        held = self._holder() if fault == "hold" else None  # held from now on: a release may come any time
        head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream; charset=utf-8", "Cache-Control: no-cache",
                "Transfer-Encoding: chunked", f"x-request-id: req-{self._next_id}"]
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            await writer.drain()
            if self.first_chunk_delay_s and not await self._pause(reader, self.first_chunk_delay_s):
                return self._left(arrival)
            for i, chunk in enumerate(chunks):
                if fault == "cut" and i >= self.cut_after:
                    return False  # closed without the chunked body's end: the client sees a cut
                if i == last and held is not None and not await self._hold(reader, held):
                    return self._left(arrival)
                self._event(writer, json.dumps(chunk))
                arrival.chunks += 1
                await writer.drain()
                if _client_gone(reader):
                    return self._left(arrival)
            if fault == "cut":
                return False
            arrival.answered_at = time.time()  # (before the end goes out: a client may look as soon as it has it)
            arrival.usage = usage
            self._event(writer, "[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            return self._left(arrival)
        finally:
            if held is not None and held in self._held:
                self._held.remove(held)
        return True

    @staticmethod
    def _event(writer: asyncio.StreamWriter, data: str) -> None:
        event = f"data: {data}\n\n".encode()
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))

    def _left(self, arrival: Arrival) -> bool:
        arrival.closed_early = True
        self.closed_early += 1
        return False

    async def _pause(self, reader: asyncio.StreamReader, seconds: float | None, event: asyncio.Event | None = None) -> bool:
        """Wait ``seconds`` (or for ``event``, at most ``seconds``); False as soon as the client closes the connection."""
        async def gone() -> None:
            while not _client_gone(reader):
                await asyncio.sleep(0.005)

        waits = [asyncio.ensure_future(gone()),
                 asyncio.ensure_future(event.wait() if event is not None else asyncio.sleep(seconds or 0))]
        try:
            await asyncio.wait(waits, timeout=seconds if event is not None else None,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return not _client_gone(reader)

    def _holder(self) -> asyncio.Event:
        """A held answer's event, counted in :attr:`holding` until :meth:`release` sets it (already set when
        a release came while nothing was held)."""
        event = asyncio.Event()
        if self._releases:
            self._releases -= 1
            event.set()
        else:
            self._held.append(event)
        return event

    async def _hold(self, reader: asyncio.StreamReader, event: asyncio.Event) -> bool:
        """Wait for ``event`` (:meth:`release`), at most ``hang_s``; False when the client left meanwhile."""
        try:
            return await self._pause(reader, self.hang_s, event)
        finally:
            if event in self._held:
                self._held.remove(event)

    def _echo(self, token: str) -> str:
        how = self.echo_auth
        if how is True:
            how = "raw"
        elif not isinstance(how, str):
            how = list(how)[self._echoes % len(how)]  # type: ignore[arg-type]
        self._echoes += 1
        return echo_form(token, how)

    async def _control(self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter, close: bool) -> bool:
        if path == "/_ksi/stats" and method == "GET":
            await self._send(writer, 200, self.stats(), close=close)
        elif path == "/_ksi/arrivals" and method == "GET":
            await self._send(writer, 200, [a.to_dict() for a in self.arrivals], close=close)
        elif path == "/_ksi/streams" and method == "GET":
            await self._send(writer, 200, self.stream_stats(), close=close)
        elif path == "/_ksi/release" and method == "POST":
            self._release()
            await self._send(writer, 200, self.stream_stats(), close=close)
        elif path == "/_ksi/reset" and method == "POST":
            self.reset()
            await self._send(writer, 200, self.stats(), close=close)
        elif path == "/_ksi/faults" and method == "POST":
            try:
                cfg = json.loads(raw or b"{}")
                for key in ("delay_s", "retry_after", "hang_s", "echo_auth", "cut_after", "first_chunk_delay_s",
                            "cached_tokens", "reasoning_tokens", "system_fingerprint"):
                    if key in cfg:
                        setattr(self, key, cfg.pop(key))
                self.set_faults(**{k: cfg[k] for k in ("script", "rates", "seed", "faults_by_model") if k in cfg})
                unknown = sorted(set(cfg) - {"script", "rates", "seed", "faults_by_model"})
                if unknown:
                    raise ValueError(f"unknown key {unknown[0]!r}")
            except (ValueError, TypeError, AttributeError) as e:
                await self._send(writer, 400, {"error": {"message": str(e)}}, close=close)
                return True
            await self._send(writer, 200, self.stats(), close=close)
        else:
            await self._send(writer, 404, {"error": {"message": f"no route {method} {path}"}}, close=close)
        return True


def _parse_rates(text: str) -> dict[str, float]:
    rates = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        fault, _, p = part.partition("=")
        rates[fault.strip()] = float(p)
    return rates


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ksi_host.testing.server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    ap.add_argument("--script", default="", help="comma-separated faults for the first requests, e.g. 429,500,ok")
    ap.add_argument("--rates", default="", help="fault probabilities, e.g. 429=0.25,500=0.2,hang=0.03")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    ap.add_argument("--retry-after", default="1", help="the Retry-After value sent with 429 ('none' for no header)")
    ap.add_argument("--hang", type=float, default=300.0, help="seconds a 'hang' fault waits")
    ap.add_argument("--reply", default=None, help="the answer text (default: echo of the last user message)")
    ap.add_argument("--first-chunk-delay", type=float, default=0.0, help="seconds before a stream's first chunk")
    args = ap.parse_args(argv)
    try:
        server = OpenAIServer(
            args.host, args.port, script=[f.strip() for f in args.script.split(",") if f.strip()],
            rates=_parse_rates(args.rates), seed=args.seed, delay_s=args.delay,
            retry_after=None if args.retry_after.lower() == "none" else args.retry_after,
            hang_s=args.hang, reply=args.reply, keep_bodies=False, first_chunk_delay_s=args.first_chunk_delay,
        )
    except ValueError as e:
        ap.error(str(e))

    async def serve() -> None:
        await server.start()
        print(json.dumps({"port": server.port, "url": server.url}), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    sys.exit(main())
