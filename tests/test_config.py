import attrs
import pytest

from ksi_host import ConfigError
from ksi_host.config import build_config, load_config


@attrs.define
class Deployment:
    name: str
    timeout_s: float = 60.0


@attrs.define
class Override:
    max_attempts: int = 3


def _positive(inst, a, v):
    if v <= 0:
        raise ValueError(f"{a.name} must be > 0")


@attrs.define
class Spec:
    concurrency: int = attrs.field(default=16, validator=_positive)
    deployments: list[Deployment] = attrs.field(factory=list)
    models: dict[str, Override] = attrs.field(factory=dict)
    label: str | None = None
    enabled: bool = True


def test_defaults_when_table_absent():
    cfg = build_config({}, {"queue": Spec})
    assert cfg["queue"] == Spec() and cfg["host"].concurrency is None


def test_nested_tables_and_lists():
    cfg = build_config({"queue": {"deployments": [{"name": "a", "timeout_s": 5}], "models": {"gpt*": {"max_attempts": 2}}}},
                       {"queue": Spec})
    assert cfg["queue"].deployments == [Deployment("a", 5.0)]
    assert cfg["queue"].models["gpt*"].max_attempts == 2


@pytest.mark.parametrize("raw, message", [
    ({"queue": {"concurency": 3}}, "config key queue.concurency: unknown key"),
    ({"queue": {"concurrency": "3"}}, "config key queue.concurrency: expected an integer, got '3'"),
    ({"queue": {"concurrency": True}}, "config key queue.concurrency: expected an integer"),
    ({"queue": {"enabled": 1}}, "config key queue.enabled: expected true or false"),
    ({"queue": {"deployments": [{"name": "a"}, {"name": "b", "timeout": 3}]}}, "config key queue.deployments[1].timeout: unknown key"),
    ({"queue": {"deployments": [{"name": "a", "timeout_s": "x"}]}}, "config key queue.deployments[0].timeout_s: expected a number"),
    ({"queue": {"concurrency": 0}}, "config table queue: concurrency must be > 0"),
    ({"queue": {"deployments": [{"timeout_s": 3}]}}, "config key queue.deployments[0].name: is required"),
    ({"openai": {}}, "config table [openai] belongs to ksi-provider-openai, which is not loaded: pip install ksi-provider-openai"),
    ({"qeue": {}}, "config table [qeue]: unknown table"),
    ({"queue": {"label": 3}}, "config key queue.label: expected a string"),
])
def test_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as e:
        build_config(raw, {"queue": Spec})
    assert message in str(e.value)


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text("[queue]\nconcurrency = 4\n")
    assert load_config(good) == {"queue": {"concurrency": 4}}
