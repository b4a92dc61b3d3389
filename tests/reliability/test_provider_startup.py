"""Config values that validated and then crashed or misbehaved at run time now stop start-up (exit 2).

Real ``ksi-host`` processes with the litellm and openai plugins. Each bad value is refused
before anything runs, with one line naming the table and key: a header value with CR/LF and
credentials in ``api_base`` (both crashed the HTTP client: exit 70; ``ksi-host status``
printed the password), ``cooldown_s = inf`` (OverflowError in ``ksi_list_providers``) and
``nan`` (the circuit never blocked), ``timeout_s = inf`` (every call failed),
``input_cost_per_mtok = nan`` (results held NaN, invalid JSON), an ``api_base`` without a
scheme (litellm failed every call as an HTTP 500), one at the cloud metadata address. A
deployment whose key variable is unset is a warning; a model that no deployment with its key
serves stops ``ksi-host run`` (exit 2), not ``ksi-host status`` (it calls nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rel import env, ksi, write_requests

PASSWORD = "hunter2-S3CRET-pw"
GOOD = 'name = "main"\nmodel = "m"\napi_key_env = "KSI_REL_KEY"\n'


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ksi.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "words"), [
    (f'[[openai.deployments]]\n{GOOD}headers = {{ "X-Title" = "a\\r\\nX-Evil: 1" }}\n',
     "openai.deployments[0]: headers.X-Title must be printable ASCII"),
    (f'[[openai.deployments]]\n{GOOD}api_base = "http://user:{PASSWORD}@127.0.0.1:9/v1"\n',
     "openai.deployments[0]: api_base must not hold credentials"),
    (f'[[litellm.deployments]]\n{GOOD}api_base = "https://user:{PASSWORD}@example.org/v1"\n',
     "litellm.deployments[0]: api_base must not hold credentials"),
    ('[litellm.circuit]\ncooldown_s = inf\n', "litellm.circuit: cooldown_s must be a number of seconds"),
    ('[openai.circuit]\ncooldown_s = nan\n', "openai.circuit: cooldown_s must be a number of seconds"),
    (f'[[litellm.deployments]]\n{GOOD}timeout_s = inf\n', "litellm.deployments[0]: timeout_s must be"),
    (f'[[openai.deployments]]\n{GOOD}input_cost_per_mtok = nan\n', "input_cost_per_mtok must be a number of USD"),
    (f'[[litellm.deployments]]\n{GOOD}api_base = "127.0.0.1:45425"\n', "api_base must be an http:// or https:// URL"),
    (f'[[openai.deployments]]\n{GOOD}api_base = "http://169.254.169.254/latest"\n',
     "api_base points at a link-local address"),
    (f'[[litellm.deployments]]\n{GOOD}api_base = "file:///etc/passwd"\n', "scheme 'file'"),
])
@pytest.mark.parametrize("command", ["run", "status"])
def test_a_bad_value_stops_start_up_naming_the_key(tmp_path: Path, text: str, words: str, command: str) -> None:
    cfg = config(tmp_path, text)
    args = ["--config", str(cfg), "--db", str(tmp_path / "ksi.db")]
    if command == "run":
        args = [str(write_requests(tmp_path / "r.jsonl", [{"model": "m", "prompt": "hi"}])), *args]
    p = ksi([sys.executable, "-m", "ksi_host.cli", command, *args],
            environ=env(plugins="queue,litellm,openai,retry,tokens"))
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert words in p.stderr and "Traceback" not in p.stderr
    assert PASSWORD not in p.stderr + p.stdout


def test_an_unset_key_stops_run_but_not_status(tmp_path: Path) -> None:
    cfg = config(tmp_path, '[[openai.deployments]]\nname = "main"\nmodel = "m"\napi_key_env = "KSI_REL_UNSET_KEY"\n'
                           '[[openai.deployments]]\nname = "other"\nmodel = "n"\napi_key_env = "KSI_REL_KEY"\n')
    requests = write_requests(tmp_path / "r.jsonl", [{"model": "m", "prompt": "hi"}])
    environ = env(plugins="queue,openai,retry,tokens")
    environ.pop("KSI_REL_UNSET_KEY", None)
    base = [sys.executable, "-m", "ksi_host.cli"]
    run = ksi([*base, "run", str(requests), "--config", str(cfg), "--db", str(tmp_path / "ksi.db")], environ=environ)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "[openai] no deployment serving model 'm' has its API key: set KSI_REL_UNSET_KEY (deployment 'main')" in run.stderr
    assert "deployment 'main': environment variable KSI_REL_UNSET_KEY is not set" in run.stderr  # the warning
    status = ksi([*base, "status", "--config", str(cfg), "--db", str(tmp_path / "ksi.db")], environ=environ)
    assert status.returncode == 0, status.stderr[-2000:]
    assert "main" in status.stdout
