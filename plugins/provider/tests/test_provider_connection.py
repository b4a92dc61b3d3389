"""An upstream that never answers, through real litellm: a connection it could not make (refused, a name that
does not resolve) or lost before the answer (closed, cut), and one that hangs, each read as what happened, with
no HTTP status of litellm's making (it reports them as an HTTP 500 it never received); a real HTTP 500 still
reads as HTTP 500."""

from __future__ import annotations

import re
import socket
from typing import Any

import pytest
from ksi_provider_litellm.config import LitellmConfig, LitellmDeployment
from ksi_provider_litellm.plugin import build_pool
from ksi_provider_litellm.provider import LitellmProvider
from provider_helpers import SECRET_KEY, FakeClock, deployment, request

from ksi_host import ProviderError, ProviderTimeout, ProviderUnavailable
from ksi_host.testing.faults import leak


def provider(server: Any, **kw: Any) -> LitellmProvider:
    d = LitellmDeployment(**deployment(server, **kw))
    p = build_pool(LitellmConfig(deployments=[d]), clock=FakeClock()).get(d.name)
    assert p is not None
    return p


def closed_port() -> int:
    """A local port nothing listens on (bound once, then closed): connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def call(p: LitellmProvider, streamed: bool, timeout_s: float = 5) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        if streamed:
            [d async for d in p.stream(request(), timeout_s=timeout_s)]
        else:
            await p.complete(request(), timeout_s=timeout_s)
    return info.value


def no_status(e: ProviderError) -> None:
    assert e.status_code is None and "HTTP" not in e.message and "500" not in e.message, e.message
    assert e.provider == "main" and leak(e.message, SECRET_KEY) is None


STREAMED = pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])


@STREAMED
async def test_a_refused_connection_says_it_could_not_connect_to_the_api_base(openai_server: Any, api_key: str,
                                                                             streamed: bool) -> None:
    port = closed_port()
    e = await call(provider(openai_server, api_base=f"http://127.0.0.1:{port}/v1"), streamed)
    assert type(e) is ProviderUnavailable and e.retryable
    assert re.fullmatch(rf"main: connection failed: could not connect to http://127\.0\.0\.1:{port}/v1 "
                        r"\(ConnectionRefusedError: .+\)", e.message), e.message
    no_status(e)


@STREAMED
async def test_a_name_that_does_not_resolve_says_it_could_not_connect(openai_server: Any, api_key: str,
                                                                      streamed: bool) -> None:
    e = await call(provider(openai_server, api_base="http://ksi-no-such-host.invalid/v1"), streamed)
    assert type(e) is ProviderUnavailable
    assert e.message.startswith("main: connection failed: could not connect to http://ksi-no-such-host.invalid/v1 ("), e.message
    no_status(e)


@STREAMED
@pytest.mark.parametrize("fault", ["disconnect", "cut"])
async def test_a_connection_closed_before_the_answer_ends_says_it_was_lost(openai_server: Any, api_key: str,
                                                                           fault: str, streamed: bool) -> None:
    openai_server.script(fault)
    e = await call(provider(openai_server), streamed)
    assert type(e) is ProviderUnavailable
    assert e.message.startswith(f"main: connection failed: lost the connection to {openai_server.url} ("), e.message
    no_status(e)
    assert openai_server.hits == 1


async def test_without_an_api_base_the_url_called_is_named_without_its_query(
        openai_server: Any, api_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1?key={SECRET_KEY}")  # litellm's default base
    e = await call(provider(openai_server, api_base=None), streamed=False)
    assert e.message.startswith(
        f"main: connection failed: could not connect to http://127.0.0.1:{port}/v1"), e.message
    assert "key=" not in e.message  # (the SDK joins the path after the query: /v1/?key=.../chat/completions)
    no_status(e)


@STREAMED
async def test_a_hang_is_a_timeout_not_an_http_status(openai_server: Any, api_key: str, streamed: bool) -> None:
    openai_server.script("hang")
    e = await call(provider(openai_server), streamed, timeout_s=0.3)
    assert type(e) is ProviderTimeout and e.message.startswith("main: no answer within 0.3s"), e.message
    no_status(e)


@STREAMED
async def test_a_real_http_500_still_reads_as_http_500(openai_server: Any, api_key: str, streamed: bool) -> None:
    openai_server.script("500")
    e = await call(provider(openai_server), streamed)
    assert type(e) is ProviderUnavailable and e.retryable and e.status_code == 500
    assert e.message.startswith("main: unavailable (HTTP 500): "), e.message


async def test_the_result_of_a_refused_call_says_so(lit_host: Any, openai_server: Any) -> None:
    port = closed_port()
    async with lit_host(deployments=[deployment(openai_server, api_base=f"http://127.0.0.1:{port}/v1")]) as host:
        r = await host.complete({"model": "gpt-test", "prompt": "hi"})
    assert r.error is not None and r.error["type"] == "ProviderUnavailable", r.error
    assert r.error["message"].startswith(f"main: connection failed: could not connect to http://127.0.0.1:{port}/v1 (")
    assert "HTTP" not in r.error["message"]
