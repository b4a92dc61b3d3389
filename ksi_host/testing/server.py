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
so a test can check a key arrived —, ``user``/``metadata`` from the body, an
``X-Session-Id`` header if sent, when the answer was sent and the usage an OK
answer reported); ``hits`` counts them, ``counts`` counts them by fault and
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
``hang_s``, ``echo_auth``.

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
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

FAULTS = frozenset(
    {"ok", "429", "400", "401", "403", "500", "502", "503", "context_length", "hang", "malformed", "disconnect"}
)

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
    usage: dict[str, int] | None = None  # the usage an OK answer reported

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
                c = m.get("content")
                if isinstance(c, str):
                    return c
                if isinstance(c, list):
                    return " ".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
    return ""


class OpenAIServer:
    """An OpenAI-compatible chat completions server on ``host:port`` (0: any free port).

    See the module docstring for the fault modes and how one is chosen.
    ``reply``: the answer text (None: ``"echo: <last user message>"``).
    ``keep_bodies``: keep each request's JSON body in its Arrival.
    ``echo_auth``: the ``401`` answer repeats the key it was sent (to test redaction):
    True or a name of :data:`ECHO_FORMS`, or a list of them used in turn.
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
    ) -> None:
        self.host = host
        self.port = port
        self.delay_s = delay_s
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.reply = reply
        self.keep_bodies = keep_bodies
        self.echo_auth = echo_auth
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

    def usage(self) -> dict[str, int]:
        """The usage summed over every OK answer sent (``calls``: how many OK answers)."""
        usage = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for a in self.arrivals:
            if a.usage is not None:
                usage["calls"] += 1
                for k, v in a.usage.items():
                    usage[k] += v
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
                keep = await self._route(method, target.split("?", 1)[0], headers, body, writer, close)
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
                    extra: Mapping[str, str] | None = None, raw: bytes | None = None, close: bool = False) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "Content-Type: application/json",
                f"Content-Length: {len(data)}"]
        if close:
            head.append("Connection: close")
        for k, v in (extra or {}).items():
            head.append(f"{k}: {v}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
        await writer.drain()

    async def _route(self, method: str, path: str, headers: dict[str, str], body: bytes,
                     writer: asyncio.StreamWriter, close: bool) -> bool:
        """Answer one request; False to close the connection."""
        if path.startswith("/_ksi/"):
            return await self._control(method, path, body, writer, close)
        if path.endswith("/chat/completions"):
            if method != "POST":
                await self._send(writer, 405, {"error": {"message": "use POST"}}, close=close)
                return True
            return await self._completion(path, headers, body, writer, close)
        if path.endswith("/models") and method == "GET":
            await self._send(writer, 200, {"object": "list", "data": []}, close=close)
            return True
        await self._send(writer, 404, {"error": {"message": f"no route {method} {path}"}}, close=close)
        return True

    async def _completion(self, path: str, headers: dict[str, str], raw: bytes,
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
            body.get("user"), body.get("metadata"), body if self.keep_bodies else None,
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
        messages = body.get("messages")
        text = self.reply if self.reply is not None else f"echo: {_last_user_text(messages)}"
        prompt_tokens = sum(_words(m.get("content")) + 3 for m in messages if isinstance(m, dict)) if isinstance(messages, list) else 0
        completion_tokens = max(1, len(text.split()))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        self._next_id += 1
        await self._send(writer, 200, {
            "id": f"chatcmpl-test-{self._next_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model or "unknown",
            "system_fingerprint": "fp_ksi_test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": "stop"}],
            "usage": usage,
        }, extra={"x-request-id": f"req-{self._next_id}"}, close=close)
        arrival.answered_at = time.time()
        arrival.usage = usage
        return True

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
        elif path == "/_ksi/reset" and method == "POST":
            self.reset()
            await self._send(writer, 200, self.stats(), close=close)
        elif path == "/_ksi/faults" and method == "POST":
            try:
                cfg = json.loads(raw or b"{}")
                for key in ("delay_s", "retry_after", "hang_s", "echo_auth"):
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
    args = ap.parse_args(argv)
    try:
        server = OpenAIServer(
            args.host, args.port, script=[f.strip() for f in args.script.split(",") if f.strip()],
            rates=_parse_rates(args.rates), seed=args.seed, delay_s=args.delay,
            retry_after=None if args.retry_after.lower() == "none" else args.retry_after,
            hang_s=args.hang, reply=args.reply, keep_bodies=False,
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
