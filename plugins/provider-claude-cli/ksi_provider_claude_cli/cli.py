"""Talking to the ``claude`` command line: the command, the prompt, and what its output means.

Pure functions, no processes: :func:`command` builds the argument vector,
:func:`prompt_of` the text fed on stdin, :func:`system_prompt` what goes to
``--append-system-prompt``, :func:`refusal` what the CLI cannot do for a request,
:func:`parse_output` finds the CLI's JSON result on stdout, :class:`StreamReader`
reads the lines of ``--output-format stream-json``, :func:`usage_of` reads its
usage and cost, :func:`check_json` checks a JSON answer, and
:func:`result_error` / :func:`exit_error` turn a failure into a ksi_host error.

What the CLI can do with a request's chat parameters (:data:`SUPPORTS`, declared
as the deployments' ``ProviderInfo.supports``, so the host refuses the rest before
any process starts):

* honoured: ``response_format`` (``json_object`` / ``json_schema``: an
  instruction appended to the system prompt, and the answer checked to be JSON:
  ProviderUnavailable when it is not);
* accepted and not passed on (the CLI has no flag for them; the answer is still
  a valid answer): ``max_tokens``, ``max_completion_tokens``, ``temperature``,
  ``top_p``, ``presence_penalty``, ``frequency_penalty``, ``seed``,
  ``reasoning_effort``, ``verbosity``, ``service_tier``, ``store``, ``user``,
  ``prompt_cache_key``, ``safety_identifier``, and ``n`` (the host takes only 1);
* refused (they change what the answer is, or promise what the CLI cannot
  keep): ``tools`` (and tool calls or results in the conversation),
  ``tool_choice``, ``parallel_tool_calls``, ``stop``, ``logprobs``,
  ``top_logprobs``, ``logit_bias``, ``modalities``, ``audio``, ``prediction``,
  ``web_search_options``, content parts other than text (``image_url``, ...);
  and ``provider_options`` (BadRequest from the plugin, before any process
  starts: give flags in the deployment's ``extra_args``).

The CLI's stream (``--output-format stream-json --verbose
--include-partial-messages``) is one JSON object per line::

    {"type": "system", "subtype": "init", "session_id": "<uuid>", "model": "...", ...}
    {"type": "stream_event", "event": {"type": "content_block_delta", "index": 0,
     "delta": {"type": "text_delta", "text": "Hel"}}, "parent_tool_use_id": null, "session_id": "..."}
    ...
    {"type": "assistant", "message": {"content": [{"type": "text", "text": "Hello"}], ...}, ...}
    {"type": "result", "subtype": "success", "is_error": false, "result": "Hello", ...}

(``stream_event`` lines carry the Anthropic API's streaming events; a CLI that
does not write them still writes each ``assistant`` message whole.)

The CLI's JSON result (``--output-format json``) is one object::

    {"type": "result", "subtype": "success", "is_error": false, "duration_ms": 2345, "num_turns": 1,
     "result": "...", "session_id": "<uuid>", "total_cost_usd": 0.0123,
     "usage": {"input_tokens": 10, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 25}}

Failures are ``is_error: true`` with a ``subtype`` (``error_max_turns``,
``error_during_execution``, or ``success`` with the API's error as ``result``),
or a non-zero exit with text on stderr.

================================================  =========================================
failure                                           error
================================================  =========================================
``API Error: <status> ...`` in the text           by the status, as for HTTP (:func:`ksi_host.providers.errormap.error_for_status`):
                                                  429 RateLimited, 529/5xx ProviderUnavailable, 401/403 AuthFailed, ...
usage limit reached (``...|<unix time>``)         RateLimited, ``retry_after`` until that time
rate limit / too many requests                    RateLimited
overloaded                                        ProviderUnavailable
invalid API key, ``/login``, not logged in        AuthFailed
prompt too long / context window                  ContextWindowExceeded
no conversation found (a ``--resume`` id gone)    BadRequest (retrying cannot bring it back)
``error_max_turns``                               BadRequest (the request needs more turns than allowed)
anything else                                     ProviderUnavailable (with the exit code and stderr's end)
================================================  =========================================
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ksi_host import (
    AuthFailed,
    BadRequest,
    CompletionRequest,
    ContextWindowExceeded,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    Usage,
)
from ksi_host.providers.errormap import MAX_MESSAGE, error_for_status, is_context_length, malformed_response, redact

_API_ERROR = re.compile(r"API Error:\s*(\d{3})\b\s*(.*)", re.DOTALL)
_USAGE_LIMIT = re.compile(r"usage limit reached\|(\d{9,})", re.IGNORECASE)
_RATE = re.compile(r"rate[ _-]?limit|too many requests|\b429\b|usage limit", re.IGNORECASE)
_OVERLOAD = re.compile(r"overloaded|\b529\b|\b50[0-4]\b|service unavailable|internal server error", re.IGNORECASE)
_AUTH = re.compile(r"invalid api key|/login|not logged in|authentication|unauthori[sz]ed|\b401\b|\b403\b|forbidden",
                   re.IGNORECASE)
_NO_SESSION = re.compile(r"no conversation found", re.IGNORECASE)
TAIL = 300

SUPPORTS = frozenset({
    "response_format",
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed",
    "reasoning_effort", "verbosity", "service_tier", "store", "user", "prompt_cache_key", "safety_identifier", "n",
})
"""What a request may ask of a claude CLI deployment (``ProviderInfo.supports``): see the module docstring."""

STREAM_FLAGS = ("--output-format", "stream-json", "--verbose", "--include-partial-messages")
"""The flags of a streamed call (the CLI wants ``--verbose`` with ``stream-json`` in ``-p`` mode)."""


def command(executable: str, *, model: str | None, resume: str | None, system: str | None,
            extra_args: Sequence[str] = (), stream: bool = False) -> list[str]:
    """The argument vector of one call (``stream``: the CLI's stream-json output). The prompt goes on
    stdin, never on the command line."""
    argv = [executable, "-p", *(STREAM_FLAGS if stream else ("--output-format", "json"))]
    if model is not None:
        argv += ["--model", model]
    if resume is not None:
        argv += ["--resume", resume]
    if system:
        argv += ["--append-system-prompt", system]
    argv += list(extra_args)
    return argv


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:  # (an assistant message without content)
        return ""
    return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("text"))


def seen_hash(messages: Sequence[Mapping[str, Any]]) -> str:
    """A hash of the conversation ``messages`` as the CLI sees it: each message's role and text, the system
    (and developer) messages left out (they go to ``--append-system-prompt`` with every call). Stored with the
    CLI session after each answer (the request's messages and the answer) and compared with a continuing
    request's earlier turns: equal, the CLI session has seen exactly those turns and is resumed."""
    turns = [[m.get("role"), _text(m.get("content"))] for m in messages if m.get("role") not in ("system", "developer")]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()


def system_prompt(request: CompletionRequest) -> str | None:
    """The request's system (and developer) messages, joined, and the instruction its ``response_format``
    makes: passed as ``--append-system-prompt`` (the CLI keeps its own system prompt before it)."""
    parts = [_text(m["content"]) for m in request.messages if m.get("role") in ("system", "developer")]
    instruction = json_instruction(request.response_format)
    if instruction:
        parts.append(instruction)
    return "\n\n".join(p for p in parts if p) or None


def json_instruction(fmt: dict[str, Any] | None) -> str | None:
    """What the system prompt says for a JSON ``response_format`` (None: no JSON asked)."""
    kind = (fmt or {}).get("type")
    if kind == "json_object":
        return ("Answer with one JSON object and nothing else: no prose before or after it, no Markdown code "
                "fences.")
    if kind == "json_schema":
        spec = fmt.get("json_schema") or {}  # type: ignore[union-attr]
        schema = json.dumps(spec.get("schema", {"type": "object"}), ensure_ascii=False)
        return ("Answer with one JSON value that conforms to this JSON schema"
                + (f" ({spec['name']})" if spec.get("name") else "") + f", and nothing else: no prose before or "
                f"after it, no Markdown code fences.\nJSON schema: {schema}")
    return None


def check_json(provider: str, text: str, fmt: dict[str, Any] | None) -> None:
    """ProviderUnavailable (malformed response) when ``fmt`` asks for JSON and ``text`` is not JSON (an object,
    for ``json_object``)."""
    kind = (fmt or {}).get("type")
    if kind not in ("json_object", "json_schema"):
        return
    try:
        value = json.loads(text)
    except ValueError:
        raise malformed_response(provider, f"the answer is not the JSON its response_format ({kind}) asks for: "
                                           f"{_tail(text)[:120]!r}") from None
    if kind == "json_object" and not isinstance(value, dict):
        raise malformed_response(provider, f"the answer is JSON but not an object, as response_format json_object "
                                           f"asks ({type(value).__name__})")


def refusal(provider: str, request: CompletionRequest) -> BadRequest | None:
    """What the CLI cannot do for ``request`` beyond :data:`SUPPORTS` (the host checked those):
    ``provider_options``. None when it can do it all."""
    if request.provider_options:
        return BadRequest(f"{provider}: provider_options ({', '.join(sorted(request.provider_options))}): the claude "
                          "CLI takes no request options; give flags in the deployment's extra_args "
                          "(no claude process was started)", provider=provider)
    return None


def prompt_of(request: CompletionRequest, *, resuming: bool) -> str:
    """The text fed to ``claude -p`` on stdin.

    Resuming a CLI session (it holds the conversation): the last user message.
    Otherwise, when the request carries earlier turns, they are written out
    before it as a transcript, so the CLI sees the whole conversation.
    Raises BadRequest when the request has no user message.
    """
    turns = [m for m in request.messages if m.get("role") not in ("system", "developer")]
    last = next((i for i in range(len(turns) - 1, -1, -1) if turns[i].get("role") == "user"), None)
    if last is None:
        raise BadRequest("the claude CLI needs a user message to answer; the request has none")
    text = _text(turns[last]["content"])
    if resuming or last == 0:
        return text
    lines = ["The conversation so far:", ""]
    lines += [f"{m['role'].capitalize()}: {_text(m['content'])}" for m in turns[:last]]
    lines += ["", "Answer the next user message.", "", text]
    return "\n".join(lines)


def parse_output(stdout: bytes) -> dict[str, Any] | None:
    """The CLI's result object from its stdout, or None when stdout holds no such JSON.

    Accepts the one object of ``--output-format json``, a JSON array of
    messages (older CLIs with ``--verbose``) and JSON lines, taking the last
    ``{"type": "result", ...}``.
    """
    text = stdout.decode("utf-8", "replace").strip()
    if not text:
        return None
    candidates: list[Any]
    try:
        parsed = json.loads(text)
        candidates = parsed if isinstance(parsed, list) else [parsed]
    except ValueError:
        candidates = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    candidates.append(json.loads(line))
                except ValueError:
                    continue
    for obj in reversed(candidates):
        if isinstance(obj, dict) and obj.get("type") == "result":
            return obj
    return None


class StreamReader:
    """The CLI's stream-json output, line by line: :meth:`feed` bytes, get the pieces of text to hand out;
    :attr:`result` is the result object once its line came."""

    def __init__(self) -> None:
        self.buffer = b""
        self.result: dict[str, Any] | None = None
        self.session_id: str | None = None
        self._deltas_of_message = False  # text deltas came for the current assistant message

    def feed(self, data: bytes) -> list[str]:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [text for line in lines for text in self._line(line)]

    def end(self) -> list[str]:
        """The last line (not ended by a newline), at the end of the output."""
        line, self.buffer = self.buffer, b""
        return self._line(line)

    def _line(self, line: bytes) -> list[str]:
        line = line.strip()
        if not line.startswith(b"{"):
            return []
        try:
            event = json.loads(line)
        except ValueError:
            return []
        if not isinstance(event, dict):
            return []
        if isinstance(event.get("session_id"), str):
            self.session_id = event["session_id"]
        kind = event.get("type")
        if kind == "result":
            self.result = event
            return []
        if event.get("parent_tool_use_id") is not None:  # a sub-agent's messages are not the answer
            return []
        if kind == "stream_event" and isinstance(event.get("event"), dict):
            inner = event["event"]
            if inner.get("type") == "message_start":
                self._deltas_of_message = False
            delta = inner.get("delta")
            if inner.get("type") == "content_block_delta" and isinstance(delta, dict) and delta.get("type") == "text_delta":
                text = delta.get("text")
                if isinstance(text, str) and text:
                    self._deltas_of_message = True
                    return [text]
            return []
        if kind == "assistant" and not self._deltas_of_message:  # a CLI without partial messages: the message whole
            message = event.get("message")
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                text = "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
                return [text] if text else []
        if kind == "assistant":
            self._deltas_of_message = False
        return []


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def usage_of(result: dict[str, Any]) -> Usage | None:
    """Usage and cost of one call.

    Prompt tokens are ``input_tokens`` plus the cache's
    ``cache_creation_input_tokens`` and ``cache_read_input_tokens`` (all three
    are prompt the model read); completion tokens are ``output_tokens``. Cost
    is the CLI's ``total_cost_usd`` (``cost_usd`` in older CLIs), None if absent.
    """
    u = result.get("usage")
    cost = result.get("total_cost_usd", result.get("cost_usd"))
    cost = float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0 else None
    if not isinstance(u, dict):
        return None if cost is None else Usage(0, 0, 0, cost)
    prompt = _count(u.get("input_tokens")) + _count(u.get("cache_creation_input_tokens")) + _count(
        u.get("cache_read_input_tokens"))
    completion = _count(u.get("output_tokens"))
    return Usage(prompt, completion, prompt + completion, cost)


def _message(provider: str, what: str, detail: str | None, secrets: Sequence[str | None]) -> str:
    text = f"{provider}: {what}" + (f": {detail}" if detail else "")
    text = redact(text, secrets)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _tail(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TAIL else "..." + text[-TAIL:]


def classify_text(provider: str, what: str, text: str, *, usage: Usage | None = None,
                  secrets: Sequence[str | None] = (), now: float | None = None) -> ProviderError:
    """The error for a failure the CLI described in ``text`` (see the module table)."""
    detail = _tail(text) or None
    m = _API_ERROR.search(text)
    if m is not None:
        return error_for_status(int(m.group(1)), body=m.group(2).strip(), message=None, provider=provider, usage=usage,
                                secrets=secrets)
    common: dict[str, Any] = {"provider": provider, "usage": usage}
    if _NO_SESSION.search(text):
        return BadRequest(_message(provider, f"{what}: the CLI session to resume is gone", detail, secrets), **common)
    m = _USAGE_LIMIT.search(text)
    if m is not None:
        retry_after = max(0.0, int(m.group(1)) - (time.time() if now is None else now))
        return RateLimited(_message(provider, f"{what}: usage limit reached (retry after {retry_after:.0f}s)", detail,
                                    secrets), retry_after=retry_after, **common)
    if _RATE.search(text):
        return RateLimited(_message(provider, f"{what}: rate limited", detail, secrets), retry_after=None, **common)
    if _OVERLOAD.search(text):
        return ProviderUnavailable(_message(provider, f"{what}: overloaded", detail, secrets), **common)
    if _AUTH.search(text):
        return AuthFailed(_message(provider, f"{what}: authentication failed", detail, secrets), **common)
    if is_context_length(text):
        return ContextWindowExceeded(_message(provider, f"{what}: context window exceeded", detail, secrets), **common)
    return ProviderUnavailable(_message(provider, what, detail, secrets), **common)


def result_error(provider: str, result: dict[str, Any], *, returncode: int, stderr: str,
                 secrets: Sequence[str | None] = ()) -> ProviderError:
    """The error for a result object with ``is_error: true`` (or a subtype other than ``success``)."""
    subtype = str(result.get("subtype") or "unknown")
    usage = usage_of(result)
    text = result.get("result") if isinstance(result.get("result"), str) else ""
    if subtype == "error_max_turns":
        turns = result.get("num_turns")
        return BadRequest(_message(provider, f"the CLI stopped at its maximum number of turns ({turns}; error_max_turns)",
                                   _tail(text) or None, secrets), provider=provider, usage=usage)
    what = f"the CLI reported an error ({subtype}, exit code {returncode})"
    return classify_text(provider, what, "\n".join(t for t in (text, stderr) if t), usage=usage, secrets=secrets)


def exit_error(provider: str, returncode: int, stderr: str, stdout: str, *,
               secrets: Sequence[str | None] = ()) -> ProviderError:
    """The error for a process that exited non-zero without a JSON result."""
    if returncode < 0:
        return ProviderUnavailable(_message(provider, f"the claude process was killed by signal {-returncode}",
                                            _tail(stderr) or None, secrets), provider=provider)
    return classify_text(provider, f"the claude process exited with code {returncode}",
                         stderr.strip() or stdout.strip(), secrets=secrets)


def garbage_error(provider: str, stdout: bytes, *, secrets: Sequence[str | None] = ()) -> ProviderUnavailable:
    """Exit 0 but stdout is not the CLI's JSON result."""
    head = stdout[:120].decode("utf-8", "replace")
    return malformed_response(provider, f"stdout is not the CLI's JSON result ({len(stdout)} bytes: {head!r})",
                              secrets=secrets)
