import logging

import attrs
import pytest
from conftest import make_dist

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
    ({"queue": {"concurency": 3}}, "config key queue.concurency: unknown key, did you mean 'concurrency'? (known keys of queue: "),
    ({"queue": {"parallel": 3}}, "config key queue.parallel: unknown key (known keys of queue: "),  # nothing close
    ({"queue": {"concurrency": "3"}}, "config key queue.concurrency: expected an integer, got '3'"),
    ({"queue": {"concurrency": True}}, "config key queue.concurrency: expected an integer"),
    ({"queue": {"enabled": 1}}, "config key queue.enabled: expected true or false"),
    ({"queue": {"deployments": [{"name": "a"}, {"name": "b", "timeout": 3}]}}, "config key queue.deployments[1].timeout: unknown key, "
                                                                        "did you mean 'timeout_s'?"),
    ({"queue": {"deployments": [{"name": "a", "timeout_s": "x"}]}}, "config key queue.deployments[0].timeout_s: expected a number"),
    ({"queue": {"concurrency": 0}}, "config table queue: concurrency must be > 0"),
    ({"queue": {"deployments": [{"timeout_s": 3}]}}, "config key queue.deployments[0].name: is required"),
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


@pytest.mark.parametrize(("content", "message"), [
    (b"[queue]\n# caf\xe9\n", "not valid TOML: not UTF-8 text (byte 13)"),
    (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "not valid TOML: nested too deeply to read"),
    (None, "cannot read it: Is a directory"),
])
def test_a_config_file_that_cannot_be_read_as_toml_is_a_config_error(tmp_path, content, message):
    path = tmp_path / "ksi.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"config file {path}: {message}"


TABLED = """
import attrs
from ksi_host import hookimpl

@attrs.define
class Cfg:
    level: int = 1

class Plugin:
    @hookimpl
    def ksi_config_spec(self):
        return ("tabled", Cfg)
"""


@pytest.fixture
def tabled(tmp_path, monkeypatch):
    """An installed plugin ``tabled`` (distribution ksi-tabled) declaring the table ``[tabled]``."""
    monkeypatch.delenv("KSI_HOST_PLUGINS", raising=False)
    monkeypatch.delenv("KSI_HOST_DISABLE", raising=False)
    monkeypatch.syspath_prepend(str(make_dist(tmp_path / "site", "ksi-tabled", "ksi_tabled", TABLED, {"tabled": "ksi_tabled:Plugin"})))


def test_the_table_of_an_installed_plugin_not_loaded_is_an_error_naming_it(tabled):
    with pytest.raises(ConfigError) as e:
        build_config({"tabled": {"level": 2}}, {"queue": Spec})
    assert str(e.value) == ("config table [tabled] belongs to plugin 'tabled' (ksi-tabled), which is installed but not "
                            "loaded (load it, or remove the table)")


@pytest.mark.parametrize("var, value", [("KSI_HOST_DISABLE", "tabled"), ("KSI_HOST_PLUGINS", "queue")])
def test_the_table_of_a_plugin_left_out_on_purpose_is_ignored_with_a_warning(tabled, monkeypatch, caplog, var, value):
    monkeypatch.setenv(var, value)
    with caplog.at_level(logging.WARNING, logger="ksi_host.config"):
        cfg = build_config({"tabled": {"level": "not even checked"}, "queue": {"concurrency": 2}}, {"queue": Spec})
    assert "tabled" not in cfg and cfg["queue"].concurrency == 2
    assert caplog.messages == [f"config table [tabled] is ignored: plugin 'tabled' (ksi-tabled) is left out by {var}"]
