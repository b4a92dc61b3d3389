"""4. Bad input: requests and JSONL lines from hypothesis, then one CLI run with a mixed file.

* :meth:`CompletionRequest.from_dict` on arbitrary JSON-like data returns a
  request or raises ValidationError naming a field of the input (or
  ``request`` for a non-object); nothing else ever escapes.
* :func:`ksi_host.cli.runner.parse_line` on arbitrary text returns a request or an
  ``error`` result whose message names the line and the field; it never raises.
* Whatever from_dict accepts, the real ksi-queue stores and runs (in-process,
  in-memory database, a FakeProvider): no hang, no crash.
* A JSONL file of good and bad lines through :class:`BatchRunner` (in-process,
  with the host's DirectQueue and a FakeProvider): one result per line, every
  good line ok with its own answer, every bad line an error naming its line.
* The db helper: a value sqlite3 cannot bind fails its own write only.
* The CLI, real plugins: the same, for a file of known-nasty lines (a BOM,
  bytes that are not UTF-8, lone surrogates, an int past 64 bits, a repeated
  request id, ...).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksi_host import Host
from ksi_host.cli.runner import BatchRunner, line_request_id, open_requests, parse_line, read_lines
from ksi_host.errors import ValidationError
from ksi_host.models import CompletionRequest, CompletionResult, ProviderResponse, Usage
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

FIELDS = ["model", "messages", "prompt", "request_id", "session_id", "agent_id", "originator_agent_id", "purpose",
          "priority", "max_tokens", "temperature", "timeout_s", "metadata"]

# any text, lone surrogates included (JSON can carry them: "\ud800")
any_text = st.text(st.characters(blacklist_categories=()), max_size=12)
scalars = st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62) | st.floats() | any_text
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(any_text, c, max_size=3),
                           max_leaves=8)
# values that have broken things before: non-finite floats, ints past SQLite's 64 bits, lone surrogates, ...
nasty = st.sampled_from([math.inf, -math.inf, math.nan, 2**63, 2**70, -(2**63) - 1, -1, 0, 0.0, True, False, "\ud800",
                         "a\udfffb", "", " ", "\x00", [], {}, [[]], {"": None}])
field_values = nasty | json_values | st.sampled_from(["user", "assistant", "nobody", "normal", "urgent", "m"])
messages = st.lists(st.fixed_dictionaries({}, optional={"role": field_values, "content": field_values}) | json_values,
                    max_size=3)
valid_requests = st.fixed_dictionaries(
    {"model": st.sampled_from(["fake-a", "fake-b"])},
    optional={"prompt": st.sampled_from(["hi", "hello there"]), "session_id": st.sampled_from(["s1", "s2"]),
              "priority": st.sampled_from(["high", "low"]), "max_tokens": st.integers(1, 4096),
              "temperature": st.floats(0, 2), "timeout_s": st.floats(1, 600), "metadata": st.just({"k": "v"})},
).map(lambda d: d if "prompt" in d else {**d, "messages": [{"role": "user", "content": "hi"}]})


@st.composite
def mutated_requests(draw: Any) -> dict[str, Any]:
    """A valid request with one or two fields replaced by anything (messages: by odd messages)."""
    d = dict(draw(valid_requests))
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from(FIELDS) | st.sampled_from(FIELDS) | any_text)
        if key == "messages":
            d.pop("prompt", None)
            d[key] = draw(messages | json_values)
        else:
            if key == "prompt":
                d.pop("messages", None)
            d[key] = draw(field_values)
    return d


request_dicts = mutated_requests() | st.dictionaries(st.sampled_from(FIELDS) | any_text, field_values, max_size=6)

# requests that are valid but for, perhaps, one value at the edge of its type
edge_text = any_text.filter(str.strip) | st.sampled_from(["\ud800", "a\udfffb", "\x00", "é", "\U0001f600"])
edge_values = {
    "model": edge_text, "prompt": edge_text, "request_id": edge_text, "session_id": edge_text, "agent_id": edge_text,
    "purpose": edge_text, "max_tokens": st.integers(1, 2**80), "timeout_s": st.floats(min_value=1e-3),
    "temperature": st.floats(0, 2), "metadata": st.dictionaries(edge_text, edge_text | st.integers() | st.floats()),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                "content": edge_text | st.lists(st.fixed_dictionaries(
                                                    {"type": st.just("text"), "text": edge_text}), max_size=2)}),
                         min_size=1, max_size=2),
}
edge_requests = st.builds(lambda d, kv: {**{k: v for k, v in d.items() if not (kv[0] == "messages" and k == "prompt")
                                            and not (kv[0] == "prompt" and k == "messages")}, kv[0]: kv[1]},
                          valid_requests, st.sampled_from(sorted(edge_values)).flatmap(
                              lambda k: st.tuples(st.just(k), edge_values[k])))


def field_root(field: str) -> str:
    return re.split(r"[.\[]", field, maxsplit=1)[0]


@settings(max_examples=400, deadline=None)
@given(edge_requests | request_dicts | json_values)
def test_from_dict_validates_or_names_the_field(data: Any) -> None:
    try:
        request = CompletionRequest.from_dict(data)
    except ValidationError as e:
        assert isinstance(e.field, str) and e.reason
        root = field_root(e.field)
        if isinstance(data, dict):
            escaped = {str(k).encode("utf-8", "backslashreplace").decode("utf-8") for k in data}  # lone surrogates named escaped
            assert e.field in data or root in data or root in ("model", "messages") or e.field in escaped, (e.field, data)
        else:
            assert e.field == "request"
        assert str(e).startswith(f"{e.field}: ")
    else:
        assert isinstance(data, dict)
        # what was accepted can be queued and sent: JSON text, UTF-8
        json.dumps(request.to_dict(), ensure_ascii=False).encode("utf-8")


lines_text = any_text | json_values.map(json.dumps) | request_dicts.map(json.dumps) | request_dicts.map(
    lambda d: json.dumps(d)[:-1])


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=1, max_value=10**6), lines_text)
def test_parse_line_never_raises(lineno: int, text: str) -> None:
    item = parse_line(lineno, text)
    if isinstance(item, CompletionResult):
        assert item.status == "error" and item.error is not None
        assert item.error["type"] == "ValidationError"
        assert item.error["message"].startswith(f"line {lineno}: ")
        assert item.request_id
        json.dumps(item.to_dict(), ensure_ascii=False).encode("utf-8")  # the error result can be written out
    else:
        assert isinstance(item, CompletionRequest)
        json.dumps(item.to_dict(), ensure_ascii=False).encode("utf-8")


@settings(max_examples=150, deadline=None)
@given(st.lists(edge_requests | request_dicts, min_size=1, max_size=4))
def test_the_real_queue_takes_whatever_validation_accepts(batch: list[dict[str, Any]]) -> None:
    """What from_dict accepts, ksi-queue stores and runs (no hang, no crash); the rest is a ValidationError."""
    from ksi_queue.plugin import Plugin as Queue

    async def main() -> None:
        provider = FakeProvider("fake", model="*", script=["answer"])
        async with Host({}, ":memory:", plugins=[Queue(), ScriptedProviders(provider)]) as host:
            seen: set[str] = set()
            for data in batch:
                try:
                    request = CompletionRequest.from_dict(data)
                except ValidationError:
                    continue
                try:
                    result = await asyncio.wait_for(host.complete(request), 10)
                except ValidationError as e:  # an id used before with another request: refused, naming it
                    assert request.request_id in seen and "request_id" in e.message, e.message
                    continue
                seen.add(request.request_id)
                assert result.status == "ok" and result.text == "answer", result
                again = await asyncio.wait_for(host.complete(request), 10)  # stored: answered from the store
                assert again.text == "answer" and again.request_id == request.request_id

    asyncio.run(main())


# -- a whole file through the batch runner --------------------------------------------

safe_text = st.text(st.characters(whitelist_categories=("L", "N", "Zs")), min_size=1, max_size=10).filter(str.strip)


@st.composite
def good_lines(draw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"model": draw(st.sampled_from(["fake-a", "fake-b"])), "prompt": draw(safe_text)}
    for key, strategy in (("session_id", st.sampled_from(["s1", "s2", "s3"])), ("agent_id", safe_text),
                          ("priority", st.sampled_from(["critical", "high", "normal", "low", "background"])),
                          ("max_tokens", st.integers(1, 10**6)), ("temperature", st.floats(0, 2)),
                          ("timeout_s", st.floats(1, 1e6)), ("metadata", st.dictionaries(safe_text, safe_text, max_size=2))):
        if draw(st.booleans()):
            d[key] = draw(strategy)
    return d


bad_lines = st.one_of(
    st.just("{not json"), st.just("[1, 2]"), st.just("null"), st.just('"just a string"'), st.just("42"),
    st.builds(lambda p: json.dumps({"prompt": p}), safe_text),  # no model
    st.builds(lambda m: json.dumps({"model": m, "prompt": "x"}), st.sampled_from(["", " ", 5, None, [1]])),
    st.builds(lambda r: json.dumps({"model": "fake-a", "messages": [{"role": r, "content": "x"}]}),
              st.sampled_from(["robot", 7, None, [], {}])),
    st.builds(lambda p: json.dumps({"model": "fake-a", "prompt": "x", "priority": p}), st.sampled_from(["urgent", 3, [], {}])),
    st.builds(lambda t: json.dumps({"model": "fake-a", "prompt": "x", "temperature": t}), st.sampled_from([-1, 2.5, "hot", True])),
    st.builds(lambda k: json.dumps({"model": "fake-a", "prompt": "x", k: 1}), st.sampled_from(["colour", "promt", "best_of"])),
    st.just(json.dumps({"model": "fake-a", "prompt": "x", "metadata": {"k": [1, 2]}})),
    st.just(json.dumps({"model": "nobody-serves-this", "prompt": "x"})),
    st.builds(lambda k: json.dumps({"model": "fake-a", "prompt": "x", k: "\ud800"}), st.sampled_from(["session_id", "agent_id"])),
    st.just(json.dumps({"model": "\ud800", "prompt": "x", "session_id": "a\udfff"})),
    st.just(json.dumps({"model": "fake-a", "prompt": "x", "max_tokens": 2**70})),
)


async def echo(request: CompletionRequest) -> ProviderResponse:
    return ProviderResponse(text=f"echo: {request.messages[-1]['content']}", usage=Usage(1, 1, 2, None))


async def run_file(path: Path, out_path: Path) -> Any:
    """``path`` through a BatchRunner as ``ksi-host run`` drives it (same file handling), fakes for the rest."""
    provider = FakeProvider("fake", model="fake-*", script=[echo])
    async with Host({}, ":memory:", plugins=[DirectQueue(), ScriptedProviders(provider)]) as host:
        with open_requests(str(path)) as f:
            lines = read_lines(f)
        with open(out_path, "w", encoding="utf-8") as out, open(out_path.with_suffix(".progress"), "w") as progress:
            return await BatchRunner(host, out, progress).run(lines)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), good_lines(), bad_lines), min_size=1, max_size=25), st.data())
def test_a_jsonl_file_loses_no_good_line(tmp_path: Path, mix: list[tuple[bool, dict[str, Any], str]], data: Any) -> None:
    lines: list[str] = []
    expected: dict[int, dict[str, Any] | None] = {}
    for n, (good, request, bad) in enumerate(mix, 1):
        if good:
            if data.draw(st.booleans()):
                request = {**request, "request_id": f"given-{n}"}
            lines.append(json.dumps(request))
            expected[n] = request
        else:
            lines.append(bad)
            expected[n] = None
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = asyncio.run(run_file(path, out))
    got = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(got) == len(lines) == stats.total
    by_id = {r["request_id"]: r for r in got}
    assert len(by_id) == len(got)
    for n, request in expected.items():
        rid = request.get("request_id") if request else None
        rid = rid or line_request_id(n, lines[n - 1])
        if request is None:
            bad = by_id[rid]
            assert bad["status"] == "error" and bad["error"]["message"].startswith(f"line {n}: "), bad
        else:
            r = by_id[rid]
            assert r["status"] == "ok", r
            assert r["text"] == f"echo: {request['prompt']}"
            assert r["session_id"] == request.get("session_id")
    assert stats.ok == sum(1 for r in expected.values() if r is not None)


async def test_the_db_helper_hands_an_unbindable_value_to_its_writer() -> None:
    """A value sqlite3 cannot bind fails its own write; the writes sharing its commit still commit."""
    from ksi_host.db import Database

    async with Database(":memory:") as db:
        await db.execute("CREATE TABLE t (x)")
        for bad in ("\ud800", 2**70):
            outcome = await asyncio.wait_for(asyncio.gather(
                db.execute("INSERT INTO t VALUES (?)", (bad,)), db.execute("INSERT INTO t VALUES (?)", ("good",)),
                return_exceptions=True), 10)
            assert isinstance(outcome[0], (UnicodeEncodeError, OverflowError)) and outcome[1] is None
        assert [tuple(r) for r in await db.fetchall("SELECT x FROM t")] == [("good",), ("good",)]


# -- the CLI, real plugins ----------------------------------------------------------------

MIXED = [  # (line, what it is: "ok", or the field its error names; None: a blank line, skipped)
    ('{"request_id": "g1", "model": "mock/m", "prompt": "first", "session_id": "a"}', "ok"),  # after a BOM
    ("{not json", "json"),
    ("[1, 2]", "request"),
    ('{"model": "mock/m", "prompt": "no id here", "session_id": "b"}', "ok"),
    ('{"model": "nobody-serves-this", "prompt": "x"}', "model"),
    ('{"model": "mock/m", "prompt": "x", "priority": []}', "priority"),
    ('{"model": "mock/m", "messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
    ('{"model": "mock/m", "prompt": "lone \\ud800 surrogate"}', "prompt"),
    ('{"model": "\\ud800", "prompt": "x", "session_id": "s\\udfff"}', "model"),
    ('{"model": "mock/m", "prompt": "big", "max_tokens": 1180591620717411303424}', "max_tokens"),
    ('{"model": "mock/m", "prompt": "x", "colour": "red"}', "colour"),
    ('{"model": "mock/m", "prompt": "h\\u00e9llo \\ud83d\\ude00 caf\u00e9", "session_id": "a"}', "ok"),
    ('{"model": "mock/m", "prompt": "latin-1 caf\udce9"}', "prompt"),  # the byte 0xe9: not UTF-8
    ("", None),
    ('{"request_id": 5, "model": "mock/m", "prompt": "x"}', "request_id"),
    ('{"request_id": "g2", "model": "mock/m", "prompt": "second", "session_id": "a", "temperature": 0.5}', "ok"),
    ('{"request_id": "g1", "model": "mock/m", "prompt": "another request, same id"}', "request_id"),
    ("null", "request"),
    ('{"request_id": "g3", "model": "mock/m", "prompt": "last line, no newline at its end"}', "ok"),
]


def test_cli_mixed_file(tmp_path: Path) -> None:
    """A file of known-nasty lines (a BOM, bytes that are not UTF-8, a repeated id...) through ksi-host run."""
    import sys

    from rel import env, ksi, results

    path = tmp_path / "mixed.jsonl"
    text = "\ufeff" + "\n".join(line for line, _ in MIXED)  # a byte-order mark first; no newline after the last line
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    out, db = tmp_path / "out.jsonl", tmp_path / "ksi.db"
    ran = ksi([sys.executable, "-m", "ksi_host.cli", "run", str(path), "--out", str(out), "--db", str(db)], environ=env())
    assert ran.returncode == 1, ran.stderr  # some requests failed; nothing crashed
    assert "Traceback" not in ran.stderr
    got = results(out)
    expected = [(n, line, what) for n, (line, what) in enumerate(MIXED, 1) if what is not None]
    assert len(got) == len(expected)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in got:
        by_id.setdefault(r["request_id"], []).append(r)
    for n, line, what in expected:
        data = json.loads(line) if what != "json" else None
        rid = data.get("request_id") if isinstance(data, dict) and isinstance(data.get("request_id"), str) else None
        mine = [r for r in by_id[rid or line_request_id(n, line)]
                if (r["status"] == "ok") == (what == "ok") and (what == "ok" or r["error"]["message"].startswith(f"line {n}: "))]
        assert len(mine) == 1, (n, line, by_id[rid or line_request_id(n, line)])
        r = mine[0]
        if what == "ok":
            assert r["text"] == f"mock response to: {data['prompt']}", r
        else:
            assert r["error"]["type"] == "ValidationError"
            assert r["error"]["message"].startswith(f"line {n}: {what}: "), (what, r["error"])
    assert "Done: 18 of 18 requests" in ran.stderr and "5 ok, 13 failed" in ran.stderr
