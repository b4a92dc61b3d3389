"""Who may call: bearer tokens of configured clients, scoped request ids, fixed agent ids, no token anywhere."""

from __future__ import annotations

import argparse
import logging

import aiohttp
import openai
import pytest
from ksi_serve.auth import Gate
from ksi_serve.command import checked_config
from ksi_serve.config import ClientConfig

from ksi_host import StartupError
from ksi_host.testing import FakeProvider, ScriptedProviders

MESSAGES = [{"role": "user", "content": "hello"}]
TOKENS = {"KSI_T_PLANNER": "planner-token-0123456789", "KSI_T_CODER": "coder-token-abcdefghijkl"}
CLIENTS = {"clients": [{"name": "planner", "key_env": "KSI_T_PLANNER", "agent_id": "planner-agent"},
                       {"name": "coder", "key_env": "KSI_T_CODER"}]}


async def test_with_clients_every_call_needs_a_valid_token(serve):
    provider = FakeProvider("p1")
    async with serve(ScriptedProviders(provider), serve=CLIENTS, environ=TOKENS) as s:
        for key in ("wrong-token-0123456789", TOKENS["KSI_T_PLANNER"] + "x", TOKENS["KSI_T_PLANNER"][:-1]):
            with pytest.raises(openai.AuthenticationError) as e:
                await s.client(key=key).chat.completions.create(model="m1", messages=MESSAGES)
            assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
            assert set(e.value.body) == {"message", "type", "param", "code"}
        async with aiohttp.ClientSession() as http:
            async with http.post(s.url + "/chat/completions", json={"model": "m1", "messages": MESSAGES}) as resp:
                assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            for path in ("/v1/models", "/metrics", "/v1/requests/x"):
                async with http.get(s.base + path) as resp:
                    assert resp.status == 401, path
            async with http.get(s.base + "/healthz") as resp:  # open: a load balancer's probe has no token
                assert resp.status == 200
            async with http.get(s.base + "/v1/models", headers={"Authorization": "Basic " + TOKENS["KSI_T_CODER"]}) as resp:
                assert resp.status == 401
        answer = await s.client(key=TOKENS["KSI_T_CODER"]).chat.completions.create(model="m1", messages=MESSAGES)
    assert answer.choices[0].message.content == "ok" and len(provider.calls) == 1


async def test_a_clients_agent_id_cannot_be_overridden_and_ids_are_scoped(serve):
    provider = FakeProvider("p1", script=["one", "two", "three"])
    async with serve(ScriptedProviders(provider), serve=CLIENTS, environ=TOKENS) as s:
        planner = s.client(key=TOKENS["KSI_T_PLANNER"])
        coder = s.client(key=TOKENS["KSI_T_CODER"])
        a = await planner.chat.completions.create(model="m1", messages=MESSAGES,
                                                  extra_headers={"Idempotency-Key": "k", "X-KSI-Agent-Id": "someone-else"})
        b = await coder.chat.completions.create(model="m1", messages=MESSAGES,
                                                extra_headers={"Idempotency-Key": "k", "X-KSI-Agent-Id": "coder-7"})
        c = await planner.chat.completions.create(model="m1", messages=MESSAGES, extra_headers={"Idempotency-Key": "k"})
        # a client reads its own requests by the id it gave, and never another client's
        details = await planner.get("/requests/k", cast_to=object)
        with pytest.raises(openai.NotFoundError):
            await planner.get("/requests/coder:k", cast_to=object)
    assert [r.request_id for r in provider.calls] == ["planner:k", "coder:k"]
    assert [r.agent_id for r in provider.calls] == ["planner-agent", "coder-7"]
    assert (a.choices[0].message.content, b.choices[0].message.content, c.choices[0].message.content) == ("one", "two", "one")
    assert a.id == b.id == "chatcmpl-k"  # each client sees the id it gave
    assert details["id"] == "k" and details["request"]["request_id"] == "planner:k"


async def test_tokens_never_reach_the_log_or_the_database(serve, caplog, ksi_db_path):
    caplog.set_level(logging.DEBUG)
    async with serve(ScriptedProviders(FakeProvider("p1")), serve=CLIENTS, environ=TOKENS) as s:
        await s.client(key=TOKENS["KSI_T_PLANNER"]).chat.completions.create(model="m1", messages=MESSAGES)
        with pytest.raises(openai.AuthenticationError):
            await s.client(key="not-a-token-but-long-enough").chat.completions.create(model="m1", messages=MESSAGES)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKENS['KSI_T_CODER']}"}) as http:
            async with http.get(s.base + "/metrics") as resp:
                metrics = await resp.text()
    stored = b"".join(p.read_bytes() for p in ksi_db_path.parent.glob(ksi_db_path.name + "*"))
    for token in TOKENS.values():
        assert token not in caplog.text and token not in metrics and token.encode() not in stored
    assert 'client="planner"' in metrics


def test_the_gate_compares_every_client_and_needs_the_bearer_scheme():
    gate = Gate.from_config([ClientConfig("a", "A"), ClientConfig("b", "B", agent_id="bee")],
                            {"A": "a" * 20, "B": "b" * 20})
    assert gate.check(f"Bearer {'b' * 20}").name == "b" and gate.check(f"bearer {'a' * 20}").name == "a"
    assert gate.check(f"Bearer {'b' * 20}").agent_id == "bee"
    assert gate.check(None) is None and gate.check("b" * 20) is None and gate.check(f"Token {'a' * 20}") is None
    assert Gate.from_config([], {}).check(None).name is None  # no clients: everyone is the same caller


@pytest.mark.parametrize(("environ", "says"), [
    ({}, "KSI_T_PLANNER (its bearer token) is not set"),
    ({"KSI_T_PLANNER": "tiny-9", "KSI_T_CODER": "c" * 20}, "shorter than 16 characters"),
    ({"KSI_T_PLANNER": "s" * 20, "KSI_T_CODER": "s" * 20}, "have the same token"),
])
def test_client_tokens_are_checked_at_start_up(environ, says):
    with pytest.raises(StartupError) as e:
        Gate.from_config([ClientConfig(**c) for c in CLIENTS["clients"]], environ)
    assert says in str(e.value)
    for value in environ.values():
        assert value not in str(e.value)


def _args(tmp_path, config: str, listen: str | None = None) -> argparse.Namespace:
    path = tmp_path / "ksi.toml"
    path.write_text(config)
    return argparse.Namespace(config=str(path), listen=listen, db=None, verbose=0)


@pytest.mark.parametrize("listen", ["0.0.0.0:8787", "[::]:8787", "192.168.1.5:80", "example.org:80"])
def test_without_clients_only_loopback_is_allowed(tmp_path, listen):
    with pytest.raises(StartupError) as e:
        checked_config(_args(tmp_path, "", listen), {})
    assert "no [[serve.clients]] are configured" in str(e.value) and listen in str(e.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:8787", "localhost:9000", "127.3.4.5:1"])
def test_loopback_needs_no_clients(tmp_path, listen):
    config, host, port, gate = checked_config(_args(tmp_path, "", listen), {})
    assert gate.open and f"{host}:{port}".endswith(listen.rsplit(":", 1)[1])


def test_with_clients_any_address_is_allowed(tmp_path):
    cfg = '[serve]\nlisten = "0.0.0.0:8787"\n[[serve.clients]]\nname = "a"\nkey_env = "KSI_T_A"\n'
    config, host, port, gate = checked_config(_args(tmp_path, cfg), {"KSI_T_A": "t" * 32})
    assert (host, port, len(gate)) == ("0.0.0.0", 8787, 1)


@pytest.mark.parametrize(("table", "says"), [
    ('[[serve.clients]]\nname = "a:b"\nkey_env = "K"\n', "serve.clients[0]: name must be 1 to 64 letters"),
    ('[[serve.clients]]\nname = "a"\nkey_env = "sk-live-abcdef0123456789"\n', "never the key itself"),
    ('[[serve.clients]]\nname = "a"\n', "serve.clients[0].key_env: is required"),
    ('[[serve.clients]]\nname = "a"\nkey_env = "K"\n[[serve.clients]]\nname = "a"\nkey_env = "L"\n', "given twice"),
    ('[serve]\nlisten = "8787"\n', "listen must be host:port"),
    ('[serve]\nmax_pending = 0\n', "max_pending must be an integer >= 1"),
    ('[serve]\nbody_timeout_s = 0\n', "serve: body_timeout_s must be a positive number, got 0"),
    ('[serve]\nidle_timeout_s = -1.5\n', "serve: idle_timeout_s must be a positive number, got -1.5"),
    ('[[serve.clients]]\nname = "a"\nkey_env = "K"\nmax_pending = 0\n', "serve.clients[0]: max_pending must be an integer >= 1"),
])
def test_bad_config_names_the_key(tmp_path, table, says):
    from ksi_host import ConfigError

    with pytest.raises(ConfigError) as e:
        checked_config(_args(tmp_path, table), {"K": "k" * 20, "L": "l" * 20})
    assert says in str(e.value)
    assert "sk-live-abcdef0123456789" not in str(e.value)
