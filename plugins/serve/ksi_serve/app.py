"""The HTTP side of ``ksi-host serve``: an aiohttp application over a running Host.

Every chat completion goes through ``host.submit`` (or ``host.stream``): the queue stores it before
anything is sent, runs it in its session's order at its priority, and the retry policy and the ledger
do what they do for ``ksi-host run``. A handler waits for the request's ticket; a client that goes away
does not cancel its request (aiohttp does not cancel a handler whose client left, and a stream is read
with ``cancel_on_exit=False``): it finishes and is stored, and a retry with the same request id gets it.

Limits: a body over ``max_body_bytes`` gets 413, one that takes longer than ``body_timeout_s`` to arrive 408;
more than ``max_pending`` handlers waiting (or their bodies over ``max_pending_bytes``) get 429 with
``Retry-After``, before the body is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ksi_host import CompletionRequest, CompletionResult, Host, OperationalError, ValidationError

from . import wire
from .auth import Client, Gate
from .config import ServeConfig
from .metrics import Metrics
from .wire import ApiError

log = logging.getLogger("ksi_serve")


class _UnparsedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a header line too long or holding a control character, a bad
    method, ...) at ERROR with its exception, whose message quotes the offending bytes: a header line, which may be
    ``Authorization: Bearer <token>``. Such a record becomes one WARNING line naming the error's kind, without them."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.args = (record.getMessage(), type(exc).__name__, exc.code)
            record.msg = "%s: not valid HTTP (%s), answered %s; its bytes are not logged (they may hold a token)"
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


HTTP_LOG = logging.getLogger("ksi_serve.http")
"""The logger of aiohttp's server (``AppRunner(..., logger=HTTP_LOG)``): what it logs of a request it could not parse
carries no byte of that request."""
HTTP_LOG.addFilter(_UnparsedRequests())

JSON = "application/json"
CLIENT_KEY: Any = web.RequestKey("ksi_client", Client) if hasattr(web, "RequestKey") else "ksi_client"  # (aiohttp < 3.13: str)


def _json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=wire.dumps(data), content_type=JSON, headers=headers)


def _error_response(error: ApiError) -> web.Response:
    return _json_response(error.status, error.body(), error.headers())


class Server:
    """The routes and their state. ``on_crash(exc)`` is called with a programming error (a plugin's or this
    plugin's own): the request gets a 500, and the command stops the server and exits 70 with its traceback."""

    def __init__(self, host: Host, config: ServeConfig, gate: Gate, metrics: Metrics,
                 on_crash: Callable[[BaseException], None]) -> None:
        self.host = host
        self.config = config
        self.gate = gate
        self.metrics = metrics
        self.on_crash = on_crash
        self.pending = 0  # chat completions being answered (waiting for their result, or streaming)
        self.pending_by_client: dict[str | None, int] = {}  # the same, by client name (for a client's max_pending)
        self.pending_bytes = 0
        self.stopping = False  # no new work: 503
        self._waiters: set[asyncio.Future[None]] = set()  # handlers waiting for a result (woken by release_waiters)
        self._released = False  # the drain is over: waiting handlers answer 503
        self._retry_after = config.retry_after_s

    # -- the application ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._middleware])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)  # (a model name may hold '/': mock/gpt-4o-mini)
        app.router.add_get("/v1/requests/{id}", self.request_details)
        app.router.add_post("/v1/requests/{id}/cancel", self.cancel)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.prometheus)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Auth (every route but /healthz), OpenAI-shaped errors for everything, metrics, programming errors."""
        started = time.perf_counter()
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        client: Client | None = None
        error: ApiError | None = None
        try:
            if route != "/healthz":
                client = self.gate.check(request.headers.get("Authorization"))
                if client is None:
                    raise ApiError(401, "a valid bearer token is required (Authorization: Bearer <token>)",
                                   "invalid_request_error", code="invalid_api_key", retry=False)
                request[CLIENT_KEY] = client
            response = await handler(request)
        except ApiError as e:
            error = e
        except web.HTTPException as e:  # aiohttp's own: 404, 405, 413, ...
            status = e.status
            if status == 413:
                error = ApiError(413, f"the request body is larger than {self.config.max_body_bytes} bytes",
                                 code="request_too_large", retry=False)
            elif status < 400:
                raise
            else:
                error = ApiError(status, f"{request.method} {request.path}: {e.reason}",
                                 code="not_found" if status == 404 else None)
        except Exception as e:  # a programming error: answered 500, then the server stops (exit 70)
            error = self._crashed(request, e)
        if error is not None:
            response = self._error_answer(request, error)
        self.metrics.answered(route, response.status, time.perf_counter() - started,
                              client.name if client is not None else None)
        return response

    def _error_answer(self, request: web.Request, error: ApiError) -> web.Response:
        """``error`` in the OpenAI shape. One that cannot be built is a programming error too: 500 (a fixed answer),
        and the server stops, instead of aiohttp's plain 500 with the server going on."""
        try:
            response = _error_response(error)
            if error.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="ksi-host"'
            return response
        except Exception as e:
            return _error_response(self._crashed(request, e))

    # -- chat completions ----------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        client = request[CLIENT_KEY]
        if self.stopping:
            raise self._stopping_error()
        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            raise ApiError(413, f"the request body is larger than {self.config.max_body_bytes} bytes",
                           code="request_too_large", retry=False)
        size = length or 0
        if self.pending >= self.config.max_pending or self.pending_bytes + size > self.config.max_pending_bytes:
            raise ApiError(429, f"the server has {self.pending} requests waiting for their answers, its limit: "
                           "try again later", "rate_limit_error", code="queue_full", retry=True,
                           retry_after=self._retry_after)
        mine = self.pending_by_client.get(client.name, 0)
        if client.max_pending is not None and mine >= client.max_pending:
            raise ApiError(429, f"client {client.name!r} has {mine} requests waiting for their answers, its limit "
                           "(max_pending): try again later", "rate_limit_error", code="client_queue_full", retry=True,
                           retry_after=self._retry_after)
        self.pending += 1
        self.pending_bytes += size
        self.pending_by_client[client.name] = mine + 1
        started = time.perf_counter()
        try:
            try:
                async with asyncio.timeout(self.config.body_timeout_s):  # a slot is held while the body comes
                    raw = await request.read()
            except ConnectionError:  # the client left before the end of its body: nobody reads this answer
                raise ApiError(400, "the connection closed before the end of the request body",
                               code="incomplete_body", retry=False) from None
            except web.RequestPayloadError as e:  # aiohttp could not decode the body (its Content-Encoding: bad gzip, ...)
                raise ApiError(400, f"the request body could not be read: {' '.join(str(e).split())}",
                               param="Content-Encoding" if "Content-Encoding" in request.headers else None,
                               code="invalid_body", retry=False) from None
            except TimeoutError:  # a client that stops sending must not keep its slot (max_pending of them: a full server)
                raise ApiError(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s "
                               "(body_timeout_s)", code="request_timeout") from None
            self.pending_bytes += len(raw) - size  # (a chunked body had no Content-Length)
            size = len(raw)
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
            except RecursionError:
                raise ApiError(400, "the body nests too deeply to read", code="invalid_json") from None
            req, stream, include_usage, visible = wire.parse_chat(body, request.headers, client.name, client.agent_id)
            if stream:
                return await self._stream(request, req, visible, include_usage)
            result = await self._result(req)
            if not result.ok:
                error = wire.result_error(result, self._retry_after, visible)
                return _json_response(error.status, error.body(), error.headers())
            self.metrics.added_seconds.observe(max(0.0, time.perf_counter() - started - _upstream_s(result)))
            return _json_response(200, wire.completion(result, visible, req.model), wire.id_headers(visible))
        finally:
            self.pending -= 1
            self.pending_bytes -= size
            left = self.pending_by_client[client.name] - 1
            if left:
                self.pending_by_client[client.name] = left
            else:
                del self.pending_by_client[client.name]

    async def _result(self, req: CompletionRequest) -> CompletionResult:
        """Submit ``req`` (stored before this returns) and wait for its final result (ApiError 503 when the
        server's drain ends first)."""
        try:
            ticket = await self.host.submit(req)
        except ValidationError as e:  # refused by the queue: a request id reused with another request
            raise wire.invalid(e) from None
        except OperationalError as e:  # could not be stored (a database fault): nothing was accepted
            raise self._not_accepted(e) from None
        future = ticket.future
        if not future.done():
            await self._until_done(future)
        try:
            return future.result()
        except OperationalError as e:  # the queue failed the ticket: the host stopped, a result could not be stored
            raise ApiError(503, f"{e.type}: {e.message} (the request stays stored: retry with the same "
                           "Idempotency-Key)", "server_error", code="not_finished", retry=True,
                           retry_after=self._retry_after) from None

    async def _until_done(self, future: asyncio.Future[Any]) -> None:
        """Wait for ``future`` (shared with other waiters: never cancelled here); ApiError 503 when the server's
        drain is over first."""
        waiter = asyncio.get_running_loop().create_future()

        def wake(_: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)

        future.add_done_callback(wake)
        if self._released:
            waiter.set_result(None)
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            future.remove_done_callback(wake)
        if not future.done():
            raise self._stopping_error()

    async def _stream(self, request: web.Request, req: CompletionRequest, visible: str,
                      include_usage: bool) -> web.StreamResponse:
        """Server-sent events: nothing is sent before the first piece (a failure before it is a plain HTTP
        error, which the client may retry); after it, a failure is an ``error`` event and no ``[DONE]``."""
        rid = req.request_id
        if rid in self.host.streams:  # the same request id is being streamed to another connection (a retry):
            result = await self._result(req)  # wait for it, and send its result as one piece
            if not result.ok:
                raise wire.result_error(result, self._retry_after, visible)
            return await self._send_whole(request, result, visible, include_usage, req.model)
        stream = self.host.stream(req, cancel_on_exit=False)
        pieces = stream.__aiter__()
        try:
            first = await self._first_piece(pieces)
        except OperationalError as e:
            result = getattr(e, "result", None)
            if result is not None:
                raise wire.result_error(result, self._retry_after, visible) from None
            if isinstance(e, ValidationError):
                raise wire.invalid(e) from None
            raise self._not_accepted(e) from None
        created = int(time.time())
        model = first.model or req.model
        fingerprint = first.system_fingerprint  # the upstream's: each chunk says the last one it sent
        response = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", **wire.id_headers(visible)})
        try:
            await response.prepare(request)
            await response.write(wire.chunk(visible, created, model, _delta(first, role=True), first.finish_reason,
                                            first.logprobs, fingerprint))
            async for delta in pieces:
                if delta.system_fingerprint is not None:
                    fingerprint = delta.system_fingerprint
                if delta.content is None and not delta.tool_calls and delta.finish_reason is None and delta.refusal is None \
                        and delta.logprobs is None:
                    continue  # only usage (or nothing): its numbers come in the usage chunk at the end
                await response.write(wire.chunk(visible, created, model, _delta(delta), delta.finish_reason,
                                                delta.logprobs, fingerprint))
        except OperationalError as e:  # the request failed after its first piece: an error event, never a clean end
            result = getattr(e, "result", None)
            error = wire.result_error(result, self._retry_after) if result is not None else ApiError(
                502, f"{e.type}: {e.message}", "upstream_error", retry=False)
            await _write_quietly(response, wire.error_event(error))
            return response
        except ConnectionError:  # the client left: the request goes on and is stored (cancel_on_exit=False)
            await pieces.aclose()
            return response
        except Exception as e:  # a programming error after the first piece: the stream ends with an error event
            # (its status line went out with the first piece), and the server stops as for any other
            await _write_quietly(response, wire.error_event(self._crashed(request, e)))
            return response
        result = stream.result
        if include_usage and result is not None:
            await _write_quietly(response, wire.usage_chunk(visible, created, model, result.usage, fingerprint))
        await _write_quietly(response, wire.DONE)
        return response

    async def _first_piece(self, pieces: Any) -> Any:
        """The stream's first piece; Stopping (503) when the server's drain is over before it came."""
        task = asyncio.ensure_future(pieces.__anext__())
        try:
            await self._until_done(task)
        except ApiError:
            task.cancel()  # the stream leaves: with cancel_on_exit=False the request stays queued and stored
            await asyncio.gather(task, return_exceptions=True)
            raise
        return task.result()

    async def _send_whole(self, request: web.Request, result: CompletionResult, visible: str, include_usage: bool,
                          requested_model: str) -> web.StreamResponse:
        body = wire.completion(result, visible, requested_model)
        choice = body["choices"][0]
        message = dict(choice["message"])
        if message.get("tool_calls"):
            message["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
        response = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", **wire.id_headers(visible)})
        await response.prepare(request)
        await _write_quietly(response, wire.chunk(visible, body["created"], body["model"], message, choice["finish_reason"],
                                                  choice["logprobs"], result.system_fingerprint))
        if include_usage:
            await _write_quietly(response, wire.usage_chunk(visible, body["created"], body["model"], result.usage,
                                                            result.system_fingerprint))
        await _write_quietly(response, wire.DONE)
        return response

    # -- the other routes ------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        """The models the provider plugins serve: one entry per model name or pattern (``ksi_pattern`` true for
        a glob such as ``llama-*``), with the deployments and plugins serving it."""
        seen: dict[str, dict[str, Any]] = {}
        for info in await self.host.providers(None):
            entry = seen.get(info.model)
            if entry is None:
                entry = seen[info.model] = _model_entry(info.model, info.plugin)
            entry["ksi_deployments"].append(_deployment(info))
        return _json_response(200, {"object": "list", "data": list(seen.values())})

    async def model(self, request: web.Request) -> web.Response:
        """One model (``client.models.retrieve``): a name or pattern ``/v1/models`` lists, or a name a pattern covers
        (``gpt-4o-mini`` for ``gpt-*``), with the deployments serving it in the order they are tried; 404
        ``model_not_found`` when none does."""
        name = request.match_info["model"]
        infos = await self.host.providers(name)
        if not infos:
            raise ApiError(404, f"no provider serves model {name!r}", param="model", code="model_not_found")
        entry = _model_entry(name, infos[0].plugin)
        entry["ksi_deployments"] = [_deployment(info) for info in infos]
        return _json_response(200, entry)

    def _stored_id(self, request: web.Request) -> tuple[str, str]:
        visible = request.match_info["id"]
        client = request[CLIENT_KEY]
        return visible, wire.scoped_id(client.name, visible)

    async def _details(self, request: web.Request) -> tuple[str, str, dict[str, Any]]:
        visible, rid = self._stored_id(request)
        details = await self.host.request_details(rid)
        if details is None and visible.startswith("chatcmpl-"):  # the id of a chat.completion
            visible = visible.removeprefix("chatcmpl-")
            rid = wire.scoped_id(request[CLIENT_KEY].name, visible)
            details = await self.host.request_details(rid)
        if details is None:
            raise ApiError(404, f"no request {visible!r} is known", code="request_not_found")
        return visible, rid, details

    async def request_details(self, request: web.Request) -> web.Response:
        """What the plugins know of one request: its fields, state, result with attempts, the ledger's calls."""
        visible, _, details = await self._details(request)
        return _json_response(200, {"id": visible, "object": "ksi.request", **details})

    async def cancel(self, request: web.Request) -> web.Response:
        """Cancel a queued or running request: ``cancelled`` true, or false when it was already final."""
        visible, rid, _ = await self._details(request)
        cancelled = await self.host.cancel(rid)
        return _json_response(200, {"id": visible, "object": "ksi.request.cancel", "cancelled": cancelled})

    async def healthz(self, request: web.Request) -> web.Response:
        status = 503 if self.stopping else 200
        return _json_response(status, {"status": "stopping" if self.stopping else "ok", "pending": self.pending})

    async def prometheus(self, request: web.Request) -> web.Response:
        queue = (await self.host.status()).get("queue") or {}
        gauges: dict[str, tuple[str, float]] = {
            "ksi_serve_pending": ("Chat completions this server is answering now.", self.pending),
            "ksi_serve_pending_bytes": ("Their request bodies, in bytes.", self.pending_bytes),
        }
        for key, help in (("queued", "Requests queued, waiting for their turn."), ("running", "Requests running now.")):
            if isinstance(queue.get(key), (int, float)):
                gauges[f"ksi_queue_{key}"] = (help, queue[key])
        return web.Response(text=self.metrics.render(gauges), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    # -- stopping ----------------------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self.stopping = True

    def release_waiters(self) -> None:
        """The drain is over: handlers still waiting (their requests were queued, not started) answer 503."""
        self._released = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _crashed(self, request: web.Request, e: Exception) -> ApiError:
        """Report a programming error (the server stops, exit 70, with its traceback); the 500 to answer."""
        log.error("programming error while answering %s %s: the server stops (its traceback follows at exit)",
                  request.method, request.path)
        self.on_crash(e)
        return ApiError(500, "internal error (the server stops; its log has the traceback)", "server_error",
                        retry=True, retry_after=self._retry_after)

    def _stopping_error(self) -> ApiError:
        return ApiError(503, "the server is stopping; a request it accepted stays stored and runs when it starts "
                        "again: retry with the same Idempotency-Key", "server_error", code="server_stopping",
                        retry=True, retry_after=self._retry_after)

    def _not_accepted(self, e: OperationalError) -> ApiError:
        return ApiError(503, f"{e.type}: {e.message}", "server_error", code="not_accepted", retry=True,
                        retry_after=self._retry_after)


def _model_entry(model: str, plugin: str) -> dict[str, Any]:
    """A ``model`` object as OpenAI's ``/v1/models`` gives it, with ``ksi_pattern`` (a glob such as ``llama-*``) and
    ``ksi_deployments`` (filled in by the caller)."""
    return {"id": model, "object": "model", "created": 0, "owned_by": plugin,
            "ksi_pattern": any(c in model for c in "*?["), "ksi_deployments": []}


def _deployment(info: Any) -> dict[str, Any]:
    return {"name": info.name, "plugin": info.plugin, "state": info.state}


def _delta(delta: Any, *, role: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {"role": "assistant"} if role else {}
    if delta.content is not None:
        d["content"] = delta.content
    if delta.tool_calls:
        d["tool_calls"] = list(delta.tool_calls)
    if delta.refusal is not None:
        d["refusal"] = delta.refusal
    return d


def _upstream_s(result: CompletionResult) -> float:
    return sum(a.latency_ms or 0.0 for a in result.attempts) / 1000


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    """Write, ignoring a client that left (its request is stored either way)."""
    try:
        await response.write(data)
    except ConnectionError:
        pass
