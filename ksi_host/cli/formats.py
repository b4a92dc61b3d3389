"""The line formats of ``ksi-host run``: its own (``ksi``) and OpenAI's Batch format (``openai-batch``).

A format turns one input line into a :class:`~ksi_host.models.CompletionRequest` or a
:class:`Rejected` (the line's error, naming the line and the field), and a final result into
the output line. The format of a file is chosen with ``--format`` or detected from its first
non-blank line (:func:`detect`); a line of the other format in it is rejected, saying so.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Protocol

import attrs

from ..errors import OperationalError, ValidationError
from ..models import CompletionRequest, CompletionResult

INPUT_ERRORS = "surrogateescape"
"""Bytes that are not UTF-8 become lone surrogates: that line is rejected, naming the field; the others run."""

FORMATS = ("ksi", "openai-batch")


@attrs.frozen
class Rejected:
    """A line refused before it reached the queue.

    ``request_id`` is what its error result is written under: the line's own id when it has a
    usable one (``own_id``), else :func:`line_request_id`. ``model`` and ``session_id`` are the
    line's own when they can be written out.
    """

    request_id: str
    error: OperationalError  # a ValidationError naming the line and the field, or why the queue refused it
    model: str | None = None
    session_id: str | None = None
    own_id: bool = True
    cause: str | None = None  # the error type the line's error stands for (NoProviderError: a model nothing serves)

    def result(self) -> CompletionResult:
        return CompletionResult.failed(self.request_id, self.error, model=self.model, session_id=self.session_id)


class LineFormat(Protocol):
    """What :class:`~ksi_host.cli.runner.BatchRunner` needs of a format."""

    name: str
    id_field: str  # where a line holds its request id: request_id, custom_id

    def parse(self, lineno: int, text: str) -> CompletionRequest | Rejected: ...

    def field(self, name: str) -> str:
        """Where the request field ``name`` (``model``, ``messages[0].role``) is in a line of this format."""
        ...

    def render(self, result: CompletionResult, rejected: Rejected | None = None) -> dict[str, Any]:
        """The output line of ``result`` (``rejected``: the line's error, when it never reached the queue)."""
        ...


def line_request_id(lineno: int, text: str) -> str:
    """The request id given to a line that has none: stable across reruns of the same file."""
    text = text.strip()
    try:
        raw = text.encode("utf-8", INPUT_ERRORS)  # the line's own bytes, as read
    except UnicodeEncodeError:  # a lone surrogate that no undecodable byte made (one JSON could not carry either)
        raw = text.encode("utf-8", "surrogatepass")
    return f"line{lineno}-{hashlib.sha256(raw).hexdigest()[:16]}"


def writable(value: Any) -> str | None:
    """``value`` if it is text that can be written out (UTF-8: no lone surrogate), else None."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def load_json(lineno: int, text: str) -> Any:
    """The line's JSON value; ValidationError (field ``json``) when it cannot be read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValidationError("json", f"not valid JSON ({e.msg} at column {e.colno})", line=lineno) from None
    except RecursionError:
        raise ValidationError("json", "nested too deeply to read", line=lineno) from None


def root(field: str) -> str:
    """The top-level name of a field path: ``messages`` of ``messages[0].role``."""
    return re.split(r"[.\[]", field, maxsplit=1)[0]


def build(data: dict[str, Any], lineno: int, locate: Any = lambda field: field) -> CompletionRequest:
    """``CompletionRequest.from_dict(data)``; its ValidationError located at ``lineno`` and at the field
    ``locate(field)`` names in the line."""
    try:
        return CompletionRequest.from_dict(data)
    except ValidationError as e:
        raise ValidationError(locate(e.field), e.reason, line=lineno) from None
    except TypeError as e:  # a wrong shape attrs itself caught
        raise ValidationError(locate("request"), str(e), line=lineno) from None
    except RecursionError:  # a value nested deeper than validation can walk
        raise ValidationError(locate("request"), "nested too deeply to check", line=lineno) from None


def is_batch_line(data: Any) -> bool:
    """Does this JSON value look like a line of OpenAI's Batch format (``custom_id`` or ``body``)?"""
    return isinstance(data, dict) and ("custom_id" in data or "body" in data)


def detect(text: str | None) -> str:
    """The format of a file from its first non-blank line: ``openai-batch`` for a JSON object with
    ``custom_id`` or ``body``, else ``ksi`` (an empty file, or a first line that is not JSON, too)."""
    if text is None:
        return "ksi"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return "ksi"
    return "openai-batch" if is_batch_line(data) else "ksi"


class KsiFormat:
    """One JSON request per line (the fields of CompletionRequest, ``prompt`` as a shorthand); one
    JSON result per request (:meth:`CompletionResult.to_dict`)."""

    name = "ksi"
    id_field = "request_id"

    def __init__(self, detected_from: int | None = None) -> None:
        self.detected_from = detected_from  # the line the format was detected from (None: --format)

    def parse(self, lineno: int, text: str) -> CompletionRequest | Rejected:
        request_id = line_request_id(lineno, text)
        try:
            data = load_json(lineno, text)
        except ValidationError as e:
            return Rejected(request_id, e, own_id=False)
        if isinstance(data, dict) and writable(data.get("request_id")):
            request_id = data["request_id"]  # (an id that cannot be written out keeps the line's own)
        elif isinstance(data, dict) and data.get("request_id") is None:
            data["request_id"] = request_id
        d = data if isinstance(data, dict) else {}
        model, session = writable(d.get("model")), writable(d.get("session_id"))
        if is_batch_line(data):
            how = f"detected from line {self.detected_from}" if self.detected_from else "chosen with --format"
            return Rejected(request_id, ValidationError(
                "format", f"an OpenAI Batch line (custom_id, body) in a file of KSI requests (the format was {how}; "
                "one file holds one format)", line=lineno), model, session)
        try:
            return build(data, lineno)
        except ValidationError as e:
            return Rejected(request_id, e, model, session)

    def field(self, name: str) -> str:
        return name

    def render(self, result: CompletionResult, rejected: Rejected | None = None) -> dict[str, Any]:
        return result.to_dict()


def make(name: str, detected_from: int | None = None) -> LineFormat:
    """The format called ``name`` (one of :data:`FORMATS`)."""
    if name == "ksi":
        return KsiFormat(detected_from)
    from .openai_batch import OpenAIBatchFormat

    return OpenAIBatchFormat(detected_from)
