"""The other routes (models, requests, cancel, healthz, metrics), the limits (413, 429) and stopping (503)."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import openai
import pytest
from conftest import until

from ksi_host import ProviderInfo, ProviderResponse, ProviderUnavailable, Usage, hookimpl
from ksi_host.testing import FailOver, FakeProvider, ScriptedProviders

MESSAGES = [{"role": "user", "content": "hello"}]


class Blocking:
    """A provider script item that waits until ``release`` is set, counting how many wait."""

    def __init__(self, text: str = "released") -> None:
        self.release = asyncio.Event()
        self.waiting = 0
        self.text = text

    async def __call__(self, request):
        self.waiting += 1
        await self.release.wait()
        return ProviderResponse(self.text, Usage(2, 2, 4, 0.001))


class TwoPlugins:
    @hookimpl
    def ksi_list_providers(self, model):
        return [ProviderInfo("local-llama", "llama-*", "openai"), ProviderInfo("gpt-main", "gpt-4o", "openai"),
                ProviderInfo("gpt-backup", "gpt-4o", "litellm", state="open")]


async def test_models_lists_names_and_patterns(serve):
    async with serve(TwoPlugins()) as s:
        models = await s.client().models.list()
    by_id = {m.id: m for m in models.data}
    assert set(by_id) == {"llama-*", "gpt-4o"}
    assert by_id["llama-*"].ksi_pattern is True and by_id["gpt-4o"].ksi_pattern is False
    assert [d["name"] for d in by_id["gpt-4o"].ksi_deployments] == ["gpt-main", "gpt-backup"]
    assert by_id["gpt-4o"].ksi_deployments[1]["state"] == "open"


async def test_a_model_is_retrieved_by_its_name_or_a_pattern_serving_it(serve):
    providers = ScriptedProviders(FakeProvider("main", "gpt-*"), FakeProvider("local", "mock/*"),
                                  FakeProvider("backup", "gpt-4o*"))
    async with serve(providers) as s:
        client = s.client()
        named = await client.models.retrieve("gpt-4o-mini")
        slashed = await client.models.retrieve("mock/gpt-4o-mini")
        pattern = await client.models.retrieve("gpt-*")
        with pytest.raises(openai.NotFoundError) as e:
            await client.models.retrieve("claude-3")
    assert (named.id, named.object, named.owned_by) == ("gpt-4o-mini", "model", "fake")
    assert [d["name"] for d in named.ksi_deployments] == ["main", "backup"] and named.ksi_pattern is False
    assert slashed.id == "mock/gpt-4o-mini" and [d["name"] for d in slashed.ksi_deployments] == ["local"]
    assert pattern.ksi_pattern is True and [d["name"] for d in pattern.ksi_deployments] == ["main"]
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


async def test_a_request_is_read_back_by_its_id(serve):
    providers = ScriptedProviders(FakeProvider("p1", script=[ProviderUnavailable("blip")]), FakeProvider("p2", script=["fine"]))
    async with serve(providers, FailOver()) as s:
        client = s.client()
        answer = await client.chat.completions.create(model="m1", messages=MESSAGES, extra_headers={"Idempotency-Key": "r1"})
        details = await client.get("/requests/r1", cast_to=object)
        by_completion_id = await client.get(f"/requests/{answer.id}", cast_to=object)
        with pytest.raises(openai.NotFoundError) as e:
            await client.get("/requests/never-seen", cast_to=object)
    assert details == by_completion_id and details["id"] == "r1" and details["object"] == "ksi.request"
    assert details["state"] == "ok" and details["request"]["messages"] == MESSAGES
    assert [a["error_type"] for a in details["result"]["attempts"]] == ["ProviderUnavailable", None]
    assert e.value.body["code"] == "request_not_found"


async def test_a_running_request_is_cancelled_and_its_caller_told(serve):
    blocking = Blocking()
    async with serve(ScriptedProviders(FakeProvider("p1", script=[blocking]))) as s:
        client = s.client()
        call = asyncio.ensure_future(client.chat.completions.create(model="m1", messages=MESSAGES,
                                                                    extra_headers={"Idempotency-Key": "c1"}))
        await until(lambda: blocking.waiting > 0)
        cancelled = await client.post("/requests/c1/cancel", cast_to=object)
        with pytest.raises(openai.ConflictError) as e:
            await call
        again = await client.post("/requests/c1/cancel", cast_to=object)
        with pytest.raises(openai.NotFoundError):
            await client.post("/requests/nope/cancel", cast_to=object)
    assert cancelled == {"id": "c1", "object": "ksi.request.cancel", "cancelled": True}
    assert e.value.body["code"] == "request_cancelled" and again["cancelled"] is False


async def test_healthz_and_metrics(serve):
    provider = FakeProvider("p1", script=["a", ProviderUnavailable("down")])
    async with serve(ScriptedProviders(provider)) as s:
        client = s.client()
        await client.chat.completions.create(model="m1", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(model="m1", messages=MESSAGES)
        async with aiohttp.ClientSession() as http:
            async with http.get(s.base + "/healthz") as resp:
                health = await resp.json()
            async with http.get(s.base + "/metrics") as resp:
                text = await resp.text()
                content_type = resp.headers["Content-Type"]
    assert health == {"status": "ok", "pending": 0}
    assert content_type.startswith("text/plain")
    samples = dict(re.findall(r"^(\S+) (\S+)$", text, re.M))
    assert samples['ksi_requests_total{status="ok"}'] == "1" and samples['ksi_requests_total{status="error"}'] == "1"
    assert samples['ksi_attempts_total{outcome="ProviderUnavailable"}'] == "1"
    assert samples['ksi_tokens_total{kind="prompt"}'] == "10"  # FakeProvider's usage: 10 + 5 (the failure has none)
    assert samples["ksi_request_duration_seconds_count"] == "2"
    assert samples['ksi_serve_http_responses_total{route="/v1/chat/completions",code="200"}'] == "1"
    assert samples['ksi_serve_http_responses_total{route="/v1/chat/completions",code="502"}'] == "1"
    assert samples["ksi_serve_added_seconds_count"] == "1" and samples["ksi_serve_pending"] == "0"
    for line in text.splitlines():  # every line is a comment or a sample: the text format
        assert line.startswith("# ") or re.match(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? \S+$', line), line



async def test_metrics_parse_with_the_prometheus_client(serve):
    """The official Python client's parser (what a Prometheus scrape reads the same way) takes the whole page:
    each family once with its type, histograms' buckets cumulative up to +Inf = _count, label values escaped."""
    from prometheus_client.parser import text_string_to_metric_families

    provider = FakeProvider("p1", script=["a", ProviderUnavailable("down"), "b"])
    async with serve(ScriptedProviders(provider)) as s:
        client = s.client()
        await client.chat.completions.create(model="m1", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(model="m1", messages=MESSAGES)
        stream = await client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "b"
        s.server.metrics.answered('/odd "route"\\\n', 200, 0.01, 'a "client"')  # escaping, as a scrape reads it
        async with aiohttp.ClientSession() as http, http.get(s.base + "/metrics") as resp:
            text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {families[n].type for n in ("ksi_requests", "ksi_attempts", "ksi_tokens")} == {"counter"}
    assert families["ksi_serve_pending"].type == "gauge"
    requests = {sample.labels["status"]: sample.value for sample in families["ksi_requests"].samples}
    assert requests["ok"] == 2 and requests["error"] == 1
    for name in ("ksi_request_duration_seconds", "ksi_attempt_duration_seconds", "ksi_time_to_first_token_seconds",
                 "ksi_serve_http_duration_seconds", "ksi_serve_added_seconds"):
        family = families[name]
        assert family.type == "histogram", name
        series: dict[tuple, list] = {}
        for sample in family.samples:
            key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            series.setdefault(key, []).append(sample)
        for samples in series.values():
            buckets = [x.value for x in samples if x.name.endswith("_bucket")]
            count = next(x.value for x in samples if x.name.endswith("_count"))
            assert buckets == sorted(buckets) and buckets[-1] == count, name  # cumulative, ending at +Inf
            assert [x.labels["le"] for x in samples if x.name.endswith("_bucket")][-1] == "+Inf"
    assert families["ksi_time_to_first_token_seconds"].samples[-1].value == 1  # the streamed attempt
    routes = {x.labels["route"] for x in families["ksi_serve_http_responses"].samples}
    assert '/odd "route"\\\n' in routes and "/v1/chat/completions" in routes
    clients = {x.labels["client"] for x in families["ksi_serve_client_requests"].samples}
    assert 'a "client"' in clients

async def test_a_body_over_the_limit_gets_413(serve):
    async with serve(ScriptedProviders(FakeProvider("p1")), serve={"max_body_bytes": 1000}) as s:
        big = [{"role": "user", "content": "x" * 2000}]
        with pytest.raises(openai.APIStatusError) as e:
            await s.client().chat.completions.create(model="m1", messages=big)
        assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"

        async def chunked():  # no Content-Length: the limit holds while reading
            yield b'{"model": "m1", "messages": [{"role": "user", "content": "'
            for _ in range(30):
                yield b"x" * 100
            yield b'"}]}'

        async with aiohttp.ClientSession() as http, http.post(f"{s.url}/chat/completions", data=chunked()) as resp:
            body = await resp.json()
        assert resp.status == 413 and body["error"]["code"] == "request_too_large"
        ok = await s.client().chat.completions.create(model="m1", messages=MESSAGES)
    assert ok.choices[0].message.content == "ok"


async def test_a_full_server_answers_429_with_retry_after_and_takes_nothing_more(serve):
    blocking = Blocking()
    provider = FakeProvider("p1", script=[blocking])
    async with serve(ScriptedProviders(provider), serve={"max_pending": 3, "retry_after_s": 2}) as s:
        client = s.client()
        calls = [asyncio.ensure_future(client.chat.completions.create(model="m1", messages=MESSAGES)) for _ in range(3)]
        await until(lambda: blocking.waiting >= 3)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.post(f"{s.url}/chat/completions", json={"model": "m1", "messages": MESSAGES}) as resp:
                body = await resp.json()
                headers = resp.headers
        assert resp.status == 429 and body["error"]["code"] == "queue_full"
        assert headers["Retry-After"] == "2" and headers["x-should-retry"] == "true"
        assert len(provider.calls) == 3  # the refused one was not queued
        blocking.release.set()
        answers = await asyncio.gather(*calls)
        after = await client.chat.completions.create(model="m1", messages=MESSAGES)
    assert [a.choices[0].message.content for a in answers] == ["released"] * 3
    assert after.choices[0].message.content == "released"


async def test_a_client_at_its_own_max_pending_gets_429_and_the_others_go_on(serve):
    blocking = Blocking()
    provider = FakeProvider("p1", script=[blocking])
    tokens = {"KSI_T_GREEDY": "greedy-token-0123456789", "KSI_T_OTHER": "other-token-0123456789"}
    clients = {"clients": [{"name": "greedy", "key_env": "KSI_T_GREEDY", "max_pending": 2},
                           {"name": "other", "key_env": "KSI_T_OTHER"}], "retry_after_s": 3}
    async with serve(ScriptedProviders(provider), serve=clients, environ=tokens) as s:
        greedy, other = s.client(key=tokens["KSI_T_GREEDY"]), s.client(key=tokens["KSI_T_OTHER"])
        held = [asyncio.ensure_future(greedy.chat.completions.create(model="m1", messages=MESSAGES)) for _ in range(2)]
        await until(lambda: blocking.waiting >= 2)
        with pytest.raises(openai.RateLimitError) as refused:
            await greedy.chat.completions.create(model="m1", messages=MESSAGES)
        others = asyncio.ensure_future(other.chat.completions.create(model="m1", messages=MESSAGES))
        await until(lambda: blocking.waiting >= 3)  # the other client's call was taken
        assert len(provider.calls) == 3 and s.server.pending_by_client == {"greedy": 2, "other": 1}
        blocking.release.set()
        answers = await asyncio.gather(*held, others)
        again = await greedy.chat.completions.create(model="m1", messages=MESSAGES)  # its slots came back
    assert refused.value.body["code"] == "client_queue_full" and "'greedy'" in refused.value.body["message"]
    assert refused.value.response.headers["Retry-After"] == "3"
    assert [a.choices[0].message.content for a in answers] == ["released"] * 3
    assert again.choices[0].message.content == "released" and s.server.pending_by_client == {}


async def test_pending_bytes_are_bounded_too(serve):
    blocking = Blocking()
    async with serve(ScriptedProviders(FakeProvider("p1", script=[blocking])), serve={"max_pending_bytes": 600}) as s:
        client = s.client()
        first = asyncio.ensure_future(client.chat.completions.create(model="m1", messages=[
            {"role": "user", "content": "y" * 400}]))
        await until(lambda: blocking.waiting > 0)
        with pytest.raises(openai.RateLimitError) as e:
            await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "z" * 400}])
        blocking.release.set()
        await first
    assert e.value.body["code"] == "queue_full"


async def test_stopping_refuses_new_work_and_releases_waiters_with_503(serve):
    blocking = Blocking()
    async with serve(ScriptedProviders(FakeProvider("p1", script=[blocking]))) as s:
        client = s.client()
        waiting = asyncio.ensure_future(client.chat.completions.create(model="m1", messages=MESSAGES,
                                                                       extra_headers={"Idempotency-Key": "w"}))
        await until(lambda: blocking.waiting > 0)
        s.server.stop_accepting()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{s.url}/chat/completions", json={"model": "m1", "messages": MESSAGES}) as resp:
                refused = resp.status, resp.headers.get("Retry-After"), (await resp.json())["error"]["code"]
            async with http.get(s.base + "/healthz") as resp:
                health = resp.status
        s.server.release_waiters()
        with pytest.raises(openai.InternalServerError) as e:
            await asyncio.wait_for(waiting, 10)
        blocking.release.set()
    assert refused == (503, "1", "server_stopping") and health == 503
    assert e.value.status_code == 503 and e.value.body["code"] == "server_stopping"
    assert e.value.response.headers["x-should-retry"] == "true"


async def test_unknown_routes_and_methods_answer_in_the_openai_shape(serve):
    async with serve(ScriptedProviders(FakeProvider("p1"))) as s, aiohttp.ClientSession() as http:
        async with http.get(f"{s.url}/embeddings") as resp:
            missing = resp.status, await resp.json()
        async with http.get(f"{s.url}/chat/completions") as resp:
            wrong = resp.status, await resp.json()
    assert missing[0] == 404 and set(missing[1]["error"]) == {"message", "type", "param", "code"}
    assert wrong[0] == 405 and "GET" in wrong[1]["error"]["message"]


async def test_route_labels_ids_in_the_path_and_head(serve):
    async with serve(ScriptedProviders(FakeProvider("p1"))) as s, aiohttp.ClientSession() as http:
        await s.client().chat.completions.create(model="m1", messages=MESSAGES, extra_headers={"Idempotency-Key": "a/b?c"})
        async with http.get(f"{s.url}/requests/a%2Fb%3Fc") as resp:  # {id} is one percent-decoded path segment
            details = resp.status, await resp.json()
        async with http.post(f"{s.url}/requests/a%2Fb%3Fc/cancel") as resp:
            cancelled = resp.status, await resp.json()
        async with http.get(f"{s.url}/requests/a/b") as resp:
            two_segments = resp.status
        async with http.head(s.base + "/healthz") as resp:  # a GET route answers HEAD: its headers, no body
            head = resp.status, resp.headers["Content-Length"], await resp.read()
        async with http.delete(f"{s.url}/models") as resp:
            wrong = resp.status
    assert details[0] == 200 and details[1]["id"] == "a/b?c" and details[1]["state"] == "ok"
    assert cancelled == (200, {"id": "a/b?c", "object": "ksi.request.cancel", "cancelled": False})
    assert two_segments == 404 and wrong == 405
    assert head[0] == 200 and int(head[1]) > 0 and head[2] == b""
    http_answers = s.server.metrics.http
    assert http_answers[("/v1/requests/{id}", 200)] == 1 and http_answers[("/v1/requests/{id}/cancel", 200)] == 1
    assert http_answers[("unmatched", 404)] == 1 and http_answers[("unmatched", 405)] == 1
    assert http_answers[("/healthz", 200)] == 1


@pytest.mark.parametrize("framing", [b"Content-Length: 1000\r\n\r\n", b"Transfer-Encoding: chunked\r\n\r\n10\r\n"])
async def test_a_body_that_stops_coming_gives_its_slot_back_after_body_timeout_s(serve, framing):
    # found by fuzzing: a client that sent half a body (or a chunked body without its last chunk) and waited held one
    # of max_pending's slots for as long as it kept the connection open: max_pending such clients refused every call
    async with serve(ScriptedProviders(FakeProvider("p1")), serve={"max_pending": 1, "body_timeout_s": 0.3}) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(s.base.rsplit(":", 1)[1]))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing
                     + b'{"model": "m1", ')
        await writer.drain()
        await until(lambda: s.server.pending == 1)  # the body is being read: the only slot is taken
        answer = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
        after = await s.client().chat.completions.create(model="m1", messages=MESSAGES)
    status, _, rest = answer.partition(b"\r\n")
    assert status.endswith(b" 408 Request Timeout"), answer
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_timeout" and "0.3 s" in error["message"]
    assert after.choices[0].message.content == "ok" and s.crashes == []


async def test_an_error_answer_that_cannot_be_built_is_a_reported_programming_error(serve, monkeypatch):
    from ksi_serve import wire

    body = wire.ApiError.body

    def broken(self):
        if self.code == "not_found":
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")  # (as a lone surrogate did)
        return body(self)

    monkeypatch.setattr(wire.ApiError, "body", broken)
    async with serve(ScriptedProviders(FakeProvider("p1"))) as s, aiohttp.ClientSession() as http:
        async with http.get(f"{s.url}/no-such-route") as resp:
            status, error = resp.status, (await resp.json())["error"]
        answer = await s.client().chat.completions.create(model="m1", messages=MESSAGES)
    assert status == 500 and error["type"] == "server_error"  # the OpenAI shape, not aiohttp's plain 500
    assert [type(c) for c in s.crashes] == [UnicodeEncodeError]  # reported: the command stops, exit 70
    assert answer.choices[0].message.content == "ok"
