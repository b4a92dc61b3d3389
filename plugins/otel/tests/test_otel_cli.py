"""ksi-otel under the real ``ksi-host`` command line, in subprocesses, with in-test plugins as a fake distribution."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import clean_env, run_python

PLUGINS = "fakequeue,echo,otel"


def _json_objects(text: str) -> list[dict[str, Any]]:
    """Every top-level JSON object in ``text`` (the console exporter prints indented JSON, one after another)."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        found.append(obj)
        i = end
    return found


def test_ksi_host_run_prints_the_spans_with_the_console_exporter(fake_site: Path, tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"request_id": "one", "model": "echo-1", "prompt": "hello", "session_id": "s1", "agent_id": "planner", "purpose": "demo"},
        {"request_id": "two", "model": "echo-2", "prompt": "again", "session_id": "s1"},
    ]) + "\n")
    env = clean_env(fake_site, KSI_HOST_PLUGINS=PLUGINS, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="cli-test")
    ran = run_python(["-m", "ksi_host.cli", "run", str(requests), "--out", str(tmp_path / "results.jsonl"),
                      "--db", str(tmp_path / "cli.db")], env, tmp_path)
    assert ran.returncode == 0, ran.stderr
    spans = {s["name"]: s for s in _json_objects(ran.stdout)}
    assert set(spans) == {"ksi.request echo-1", "chat echo-1", "ksi.request echo-2", "chat echo-2"}, ran.stdout

    request, chat = spans["ksi.request echo-1"], spans["chat echo-1"]
    assert request["attributes"]["ksi.request_id"] == "one" and request["attributes"]["gen_ai.conversation.id"] == "s1"
    assert request["attributes"]["ksi.agent_id"] == "planner" and request["attributes"]["ksi.purpose"] == "demo"
    assert chat["parent_id"] == request["context"]["span_id"] and chat["context"]["trace_id"] == request["context"]["trace_id"]
    assert chat["kind"] == "SpanKind.CLIENT"
    assert chat["attributes"]["gen_ai.provider.name"] == "echo-main"
    assert chat["attributes"]["gen_ai.usage.input_tokens"] == 3 and chat["attributes"]["gen_ai.usage.output_tokens"] == 2
    assert chat["attributes"]["gen_ai.response.finish_reasons"] == ["stop"]
    assert chat["resource"]["attributes"]["service.name"] == "cli-test"
    assert "gen_ai.input.messages" not in chat["attributes"]
    assert spans["ksi.request echo-2"]["context"]["trace_id"] != request["context"]["trace_id"]  # a trace per request


def test_the_sdk_is_imported_only_by_a_host_that_starts_and_the_exporter_only_when_selected(fake_site: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text('''
import asyncio, contextlib, io, json, os, sys

def loaded():
    return sorted({m.split(".")[2] if m.startswith("opentelemetry.exporter.") else m.split(".")[0]
                   for m in sys.modules if m.startswith("opentelemetry")})

from ksi_host.cli.main import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(["--help"])
    except SystemExit:
        pass
    main(["plugins"])
    main(["status", "--db", sys.argv[1]])   # a read-only host starts, and traces nothing
after_commands = loaded()

from ksi_host import Host
async def start():
    async with Host({}, sys.argv[1]):
        return loaded()
print(json.dumps({"commands": after_commands, "host": asyncio.run(start())}))
''')
    seen = {}
    for exporter in ("console", "otlp", "none"):
        env = clean_env(fake_site, KSI_HOST_PLUGINS=PLUGINS, OTEL_TRACES_EXPORTER=exporter)
        ran = run_python([str(probe), str(tmp_path / f"{exporter}.db")], env, tmp_path)
        assert ran.returncode == 0, ran.stderr
        seen[exporter] = json.loads(ran.stdout.strip().splitlines()[-1])
    for exporter, modules in seen.items():
        assert modules["commands"] == [], (exporter, modules)  # --help, plugins, status: no OpenTelemetry at all
    assert "otlp" in seen["otlp"]["host"] and "opentelemetry" in seen["otlp"]["host"]
    assert "otlp" not in seen["console"]["host"] and "opentelemetry" in seen["console"]["host"]
    assert "otlp" not in seen["none"]["host"]
