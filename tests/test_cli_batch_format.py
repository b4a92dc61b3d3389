"""OpenAI's Batch format for ``ksi-host run`` (ksi_host.cli.openai_batch, ksi_host.cli.formats): input lines
to requests, results to output lines, detection, mixed files; through BatchRunner and the CLI."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from conftest import run_cli

from ksi_host.cli.formats import KsiFormat, Rejected, detect, make
from ksi_host.cli.openai_batch import OpenAIBatchFormat, chat_completion
from ksi_host.cli.runner import BatchRunner
from ksi_host.errors import (
    BadRequest,
    Cancelled,
    ContextWindowExceeded,
    NoProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    ValidationError,
)
from ksi_host.models import Attempt, CompletionRequest, CompletionResult, ProviderResponse, Usage
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

FMT = OpenAIBatchFormat(detected_from=1)
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}


def line(custom_id: Any = "q1", body: Any = None, **extra: Any) -> str:
    d = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]} if body is None else body}
    d.update(extra)
    return json.dumps({k: v for k, v in d.items() if v is not ...})


# -- input --------------------------------------------------------------------------------------


def test_a_batch_line_becomes_a_request_with_its_custom_id_as_request_id():
    body = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 100, "temperature": 0.2, "tools": [{"type": "function", "function": {"name": "lookup"}}],
            "tool_choice": "auto", "response_format": {"type": "json_object"}, "seed": 7, "metadata": {"team": "a"},
            "stream": False}
    r = FMT.parse(3, line("q-7", body, ksi={"session_id": "s1", "agent_id": "a1", "priority": "high", "purpose": "triage",
                                            "timeout_s": 30}))
    assert isinstance(r, CompletionRequest)
    assert r.request_id == "q-7" and r.model == "gpt-4o-mini" and len(r.messages) == 2
    assert (r.max_tokens, r.temperature, r.seed, r.tool_choice) == (100, 0.2, 7, "auto")
    assert r.tools == ({"type": "function", "function": {"name": "lookup"}},) and r.response_format == {"type": "json_object"}
    assert r.metadata == {"team": "a"}  # body.metadata: the request's metadata
    assert (r.session_id, r.agent_id, r.priority, r.purpose, r.timeout_s) == ("s1", "a1", "high", "triage", 30)


def reject(text: str, lineno: int = 4) -> Rejected:
    r = FMT.parse(lineno, text)
    assert isinstance(r, Rejected), r
    assert isinstance(r.error, ValidationError) and r.error.line == lineno
    return r


@pytest.mark.parametrize(("text", "field", "reason"), [
    ("{nope", "json", "not valid JSON"),
    ("[1, 2]", "line", "must be a JSON object (custom_id, method, url, body), got list"),
    (line(...), "custom_id", "is required"),
    (line(None), "custom_id", "is required"),
    (line(7), "custom_id", "must be a non-empty string"),
    (line(""), "custom_id", "must be a non-empty string"),
    (line(method="GET"), "method", "must be POST, got 'GET'"),
    (line(method=...), "method", "must be POST, got None"),
    (line(url="/v1/embeddings"), "url", "must be /v1/chat/completions (the one endpoint served here), got '/v1/embeddings'"),
    (line(url="/v1/responses"), "url", "must be /v1/chat/completions"),
    (line(body="hi"), "body", "must be an object (the chat-completions request), got 'hi'"),
    (line(extra=1), "extra", "unknown key of a Batch line"),
    (line(ksi=["s1"]), "ksi", "must be an object of the host's own fields"),
    (line(ksi={"colour": "red"}), "ksi.colour", "not one of the host's own fields"),
    (line(ksi={"temperature": 1}), "ksi.temperature", "it goes in body"),
    (line(ksi={"priority": "urgent"}), "ksi.priority", "must be one of critical, high, normal, low, background"),
    (line(ksi={"continue_session": True}), "ksi.continue_session", "needs a session_id"),
    (line(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "session_id": "s"}), "body.session_id",
     "put it in the line's 'ksi' object"),
    (line(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "request_id": "r"}), "body.request_id",
     "the line's custom_id is its request id"),
    (line(body={"model": "m", "prompt": "x"}), "body.prompt", "unknown chat-completions parameter"),
    (line(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "functions": []}), "body.functions",
     "unknown chat-completions parameter"),
    (line(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}), "body.stream",
     "a batch does not stream"),
    (line(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}), "body.stream",
     "must be false or absent"),
    (line(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}),
     "body.stream_options", "only goes with stream"),
    (line(body={"model": "m", "messages": [{"role": "bogus", "content": "x"}]}), "body.messages[0].role", "must be one of"),
    (line(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 9}), "body.temperature",
     "must be a number from 0 to 2"),
    (line(body={"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}), "body.n", "only 1 is supported"),
    (line(body={"messages": [{"role": "user", "content": "x"}]}), "body.model", "is required"),
    (line(body={"model": "m"}), "body.messages", "is required"),
    (json.dumps({"model": "m", "prompt": "a KSI line"}), "format",
     "a KSI request line (no custom_id, method, url, body) in an OpenAI Batch file (the format was detected from line 1"),
])
def test_a_bad_line_is_an_error_naming_the_line_and_the_field(text, field, reason):
    r = reject(text)
    assert r.error.field == field and reason in r.error.reason, r.error
    assert str(r.error).startswith(f"line 4: {field}: ")


def test_a_rejected_line_keeps_what_it_can_of_the_line():
    r = reject(line("q9", {"model": "m", "messages": [], "stream": True}, ksi={"session_id": "s2"}))
    assert (r.request_id, r.own_id, r.model, r.session_id) == ("q9", True, "m", "s2")
    r = reject(line(None))
    assert r.own_id is False and r.request_id.startswith("line4-")
    r = reject(line("\ud800"))  # a custom_id that cannot be written out: the line's own id instead
    assert r.own_id is False and r.error.field == "custom_id"


def test_a_batch_line_in_a_ksi_file_is_an_error_saying_so():
    r = KsiFormat(detected_from=1).parse(3, line())
    assert isinstance(r, Rejected) and r.error.field == "format"
    assert str(r.error).startswith("line 3: format: an OpenAI Batch line (custom_id, body) in a file of KSI requests "
                                   "(the format was detected from line 1")
    assert "chosen with --format" in str(KsiFormat().parse(3, line()).error)


@pytest.mark.parametrize(("first", "expected"), [
    (line(), "openai-batch"),
    (json.dumps({"custom_id": "x"}), "openai-batch"),
    (json.dumps({"body": {}}), "openai-batch"),
    (json.dumps({"model": "m", "prompt": "hi"}), "ksi"),
    ("not json", "ksi"),
    ("[1]", "ksi"),
    (None, "ksi"),
])
def test_the_format_is_detected_from_the_first_line(first, expected):
    assert detect(first) == expected
    assert make(expected).name == expected


def test_request_fields_are_named_where_the_line_holds_them():
    assert [FMT.field(f) for f in ("model", "messages[0].role", "request_id", "session_id", "priority", "request")] == [
        "body.model", "body.messages[0].role", "custom_id", "ksi.session_id", "ksi.priority", "line"]
    assert KsiFormat().field("messages[0].role") == "messages[0].role"


# -- output -------------------------------------------------------------------------------------


def ok_result(**kw: Any) -> CompletionResult:
    response = kw.pop("response", ProviderResponse("hello", finish_reason="stop"))
    fields = dict(request_id="q1", status="ok", text=response.message()["content"], model="gpt-4o-mini-2024-07-18",
                  provider="openai-main", usage=Usage(12, 5, 17, 0.0001, cached_tokens=4, reasoning_tokens=2),
                  attempts=(Attempt(1, "openai-main"),), started_at=1_700_000_000.25, finished_at=1_700_000_001.75,
                  message=response.message(), finish_reason=response.finish_reason)
    fields.update(kw)
    return CompletionResult(**fields)


def test_an_ok_result_is_a_200_with_a_chat_completion_body():
    out = FMT.render(ok_result())
    assert set(out) == {"id", "custom_id", "response", "error"}
    assert out["custom_id"] == "q1" and out["error"] is None and out["id"].startswith("batch_req_")
    assert out["response"]["status_code"] == 200 and out["response"]["request_id"] == "q1"
    body = out["response"]["body"]
    assert body == {
        "id": body["id"], "object": "chat.completion", "created": 1_700_000_001, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello", "refusal": None}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                  "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}},
        "system_fingerprint": None,  # the upstream said none
    }
    assert body["id"].startswith("chatcmpl-")
    assert FMT.render(ok_result()) == out  # the same result, the same line (a rerun writes what the first run did)
    assert FMT.render(ok_result(request_id="q2"))["id"] != out["id"]
    said = FMT.render(ok_result(system_fingerprint="fp_44709d6fcb"))["response"]["body"]
    assert said == {**body, "system_fingerprint": "fp_44709d6fcb"}


def test_tool_calls_and_their_finish_reason_are_in_the_message():
    result = ok_result(response=ProviderResponse("", tool_calls=(TOOL_CALL,), finish_reason="tool_calls"))
    choice = FMT.render(result)["response"]["body"]["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL], "refusal": None}
    assert choice["finish_reason"] == "tool_calls"


def test_usage_details_are_left_out_when_unknown():
    usage = chat_completion(ok_result(usage=Usage(3, 2, 5, None)))["usage"]
    assert usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_a_result_stored_without_its_message_gets_one_of_its_text():
    body = chat_completion(ok_result(message=None, finish_reason=None))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("error", "status", "code"), [
    (BadRequest("bad"), 400, "invalid_request"),
    (ContextWindowExceeded("too long"), 400, "context_length_exceeded"),
    (RateLimited("slow down"), 429, "rate_limit_exceeded"),
    (NoProviderError("no provider serves model 'x'"), 404, "model_not_found"),
    (ProviderTimeout("timed out"), None, "request_timeout"),
    (ProviderUnavailable("502 from upstream"), None, "server_error"),
    (Cancelled("cancelled while running"), None, "batch_cancelled"),
])
def test_a_failed_request_gets_an_error_and_openais_status_when_one_fits(error, status, code):
    result = CompletionResult.failed("q1", error, model="m", attempts=(Attempt(1, "p", error.type, error.message),))
    out = FMT.render(result)
    assert out["custom_id"] == "q1" and out["error"] == {"code": code, "message": error.message}
    if status is None:
        assert out["response"] is None  # no answer at all
    else:
        assert out["response"]["status_code"] == status and out["response"]["request_id"] == "q1"
        assert out["response"]["body"] == {"error": {"message": error.message, "type": out["response"]["body"]["error"]["type"],
                                                     "param": None, "code": code}}


def test_a_rejected_line_names_its_line_and_param_and_its_custom_id_when_it_has_one():
    r = reject(line("q1", {"model": "m", "messages": [{"role": "bogus", "content": "x"}]}), lineno=6)
    out = FMT.render(r.result(), r)
    assert out["custom_id"] == "q1" and out["response"]["status_code"] == 400
    assert out["error"] == {"code": "invalid_request", "message": str(r.error), "line": 6, "param": "body.messages[0].role"}
    assert out["response"]["body"]["error"]["param"] == "body.messages[0].role"
    r = reject("{nope", lineno=2)
    assert FMT.render(r.result(), r)["custom_id"] is None


# -- through the runner and the CLI ---------------------------------------------------------------


async def run_batch(host: Any, lines: list[str], fmt: Any) -> tuple[Any, list[dict[str, Any]]]:
    out = io.StringIO()
    stats = await BatchRunner(host, out, io.StringIO(), line_format=fmt).run(list(enumerate(lines, 1)))
    return stats, [json.loads(x) for x in out.getvalue().splitlines()]


async def test_a_batch_file_runs_and_each_line_gets_one_output_line(make_host: Any) -> None:
    provider = FakeProvider("p", model="m*", script=["an answer"], usage=Usage(5, 2, 7, None))
    lines = [line("a", {"model": "m1", "messages": [{"role": "user", "content": "x"}]}),
             line("b", {"model": "m1", "messages": [{"role": "user", "content": "y"}]}, ksi={"session_id": "s"}),
             line("a", {"model": "m1", "messages": [{"role": "user", "content": "dup"}]}),
             line("c", {"model": "nowhere", "messages": [{"role": "user", "content": "z"}]}),
             json.dumps({"model": "m1", "prompt": "a KSI line"})]
    async with make_host(DirectQueue(), ScriptedProviders(provider)) as host:
        stats, out = await run_batch(host, lines, OpenAIBatchFormat(detected_from=1))
    assert stats.ok == 2 and stats.failed == 3 and len(out) == 5
    by_line = {o["error"]["line"]: o for o in out if o["error"] and "line" in o["error"]}
    assert [o["custom_id"] for o in out if o["error"] is None] == ["a", "b"]
    assert by_line[3]["custom_id"] == "a" and by_line[3]["error"]["param"] == "custom_id"
    assert "'a' is the custom_id of line 1 too (custom_ids must be unique within a file)" in by_line[3]["error"]["message"]
    assert by_line[4]["response"]["status_code"] == 404 and by_line[4]["error"]["code"] == "model_not_found"
    assert by_line[4]["error"]["param"] == "body.model"
    assert by_line[5]["error"]["param"] == "format" and by_line[5]["custom_id"] is None
    assert len({o["id"] for o in out}) == 5  # every output line has its own id, a repeated custom_id too
    assert [r.request_id for r in provider.calls] == ["a", "b"]  # the bad lines reached no provider


def write(tmp_path: Any, lines: list[str]) -> Any:
    f = tmp_path / "batch.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


ONLY = {"KSI_HOST_PLUGINS": "fakequeue,echo,fakeretry"}


def test_run_detects_the_batch_format_and_writes_batch_output(tmp_path, fake_site):
    f = write(tmp_path, ["", line("a", {"model": "echo", "messages": [{"role": "user", "content": "one"}]}),
                         line("b", {"model": "echo", "messages": [{"role": "user", "content": "rate"}]}),
                         json.dumps({"model": "echo", "prompt": "ksi"})])
    p = run_cli(["run", str(f), "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
    assert p.returncode == 1, p.stderr
    out = {o["custom_id"]: o for o in map(json.loads, p.stdout.splitlines())}
    assert out["a"]["response"]["body"]["choices"][0]["message"]["content"] == "echo: one"
    assert out["b"]["response"]["status_code"] == 429 and out["b"]["error"]["code"] == "rate_limit_exceeded"
    assert out[None]["error"]["message"].startswith("line 4: format: a KSI request line")
    assert "(the format was detected from line 2; one file holds one format)" in out[None]["error"]["message"]
    assert "Done: 3 of 3 requests" in p.stderr and "1 ok, 2 failed" in p.stderr


def test_format_chooses_the_format_over_detection(tmp_path, fake_site):
    f = write(tmp_path, [line("a", {"model": "echo", "messages": [{"role": "user", "content": "one"}]}),
                         json.dumps({"model": "echo", "prompt": "two", "request_id": "k2"})])
    p = run_cli(["run", str(f), "--db", str(tmp_path / "k.db"), "--format", "ksi"], site=fake_site, env=ONLY)
    assert p.returncode == 1, p.stderr
    out = {o["request_id"]: o for o in map(json.loads, p.stdout.splitlines())}
    assert out["k2"]["status"] == "ok"  # KSI results
    bad = next(o for o in out.values() if o["status"] == "error")
    assert bad["error"]["message"].startswith("line 1: format: an OpenAI Batch line (custom_id, body) in a file of KSI "
                                              "requests (the format was chosen with --format")
    p = run_cli(["run", str(f), "--db", str(tmp_path / "k2.db"), "--format", "openai-batch"], site=fake_site, env=ONLY)
    assert {o["custom_id"] for o in map(json.loads, p.stdout.splitlines())} == {"a", None}
    p = run_cli(["run", str(f), "--format", "csv"], site=fake_site, env=ONLY)
    assert p.returncode == 2 and "--format: invalid choice: 'csv'" in p.stderr


def test_an_empty_file_runs_as_nothing(tmp_path, fake_site):
    f = write(tmp_path, [""])
    p = run_cli(["run", str(f), "--db", str(tmp_path / "k.db")], site=fake_site, env=ONLY)
    assert p.returncode == 0 and p.stdout == "" and "Done: 0 of 0 requests" in p.stderr
