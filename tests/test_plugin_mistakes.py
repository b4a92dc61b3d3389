"""Mistakes a plugin author plausibly makes: the host says what is wrong and names the plugin."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import attrs
import pytest
from conftest import make_dist, run_cli

from ksi_host import ConfigError, PluginLoadError, RateLimited, StartupError, hookimpl
from ksi_host.providers.validators import positive_int
from ksi_host.testing import DirectQueue, FakeProvider, ScriptedProviders

MISTAKES = '''
from ksi_host import hookimpl
from ksi_host.commands import Command


async def run(args):
    print("ran", args.command)
    return 0


class ArgTypo:
    @hookimpl
    def ksi_request_finished(self, host, reslt):
        pass


class Wrapper:
    @hookimpl(hookwrapper=True)
    def ksi_request_finished(self, result):
        yield


class InitFails:
    def __init__(self):
        raise KeyError("OOPS_URL")


class AsyncCommands:
    @hookimpl
    async def ksi_cli_commands(self):
        return [Command("hello", "say hello", lambda p: None, run)]


class CommandsRaise:
    @hookimpl
    def ksi_cli_commands(self):
        raise RuntimeError("no commands today")


class NotACommand:
    @hookimpl
    def ksi_cli_commands(self):
        return [("hello", "say hello")]


class Tally:
    @hookimpl
    def ksi_cli_commands(self):
        return [Command("tally", "count", lambda p: None, run)]
'''

KINDS = ("ArgTypo", "Wrapper", "InitFails", "AsyncCommands", "CommandsRaise", "NotACommand", "Tally")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    entry_points = {k.lower(): f"ksi_mistakes:{k}" for k in KINDS}
    entry_points["broken"] = "ksi_no_such_module:Plugin"
    return make_dist(tmp_path / "site", "ksi-mistakes", "ksi_mistakes", MISTAKES, entry_points)


def only(*names: str) -> dict[str, str]:
    return {"KSI_HOST_PLUGINS": ",".join(names)}


def test_an_argument_the_hook_does_not_have_is_one_line_naming_plugin_hook_and_argument(site: Path) -> None:
    for args in (["plugins"], ["status", "--db", str(site / "k.db")]):
        p = run_cli(args, site=site, env=only("argtypo"))
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip() == (
            "ksi-host: plugin 'argtypo' implements ksi_request_finished(host, reslt), but the hook has no argument "
            "'reslt' (did you mean result? its arguments: host, request, result)")


async def test_an_argument_typo_stops_make_host_too(make_host) -> None:
    class Plugin:
        @hookimpl
        def ksi_attempt_finished(self, attempts):
            pass

    with pytest.raises(PluginLoadError, match=r"'Plugin' implements ksi_attempt_finished\(attempts\).*did you mean attempt\?"):
        async with make_host(Plugin(), DirectQueue()):
            pass


def test_a_hookwrapper_is_refused_naming_the_plugin(site: Path) -> None:
    p = run_cli(["plugins"], site=site, env=only("wrapper"))
    assert p.returncode == 2 and p.stderr.strip() == (
        "ksi-host: plugin 'wrapper' implements ksi_request_finished as a hookwrapper, which KSI host does not support "
        "(write a plain hookimpl; tryfirst/trylast order it)")


def test_a_plugin_class_that_fails_to_start_is_a_programming_error_naming_it(site: Path) -> None:
    for args in (["plugins"], ["--help"]):
        p = run_cli(args, site=site, env=only("initfails"))
        assert p.returncode == 70, p.stderr
        assert "KeyError: 'OOPS_URL'" in p.stderr and "raised by plugin 'initfails' when the host created it" in p.stderr


def test_an_async_ksi_cli_commands_is_awaited(site: Path) -> None:
    p = run_cli(["hello"], site=site, env=only("asynccommands"))
    assert p.returncode == 0 and p.stdout.strip() == "ran hello", p.stderr


def test_a_ksi_cli_commands_that_raises_or_answers_no_command_names_the_plugin(site: Path) -> None:
    p = run_cli(["--help"], site=site, env=only("commandsraise"))
    assert p.returncode == 70 and "RuntimeError: no commands today" in p.stderr
    assert "raised by plugin 'commandsraise' in hook ksi_cli_commands" in p.stderr
    p = run_cli(["--help"], site=site, env=only("notacommand"))
    assert p.returncode == 70 and "plugin 'notacommand': ksi_cli_commands returned ('hello', 'say hello')" in p.stderr


def test_a_plugin_command_missing_because_another_plugin_failed_to_load_says_so(site: Path) -> None:
    p = run_cli(["tally"], site=site, env=only("tally", "broken"))
    assert p.returncode == 2
    assert "plugin 'broken' (ksi_no_such_module:Plugin) failed to load" in p.stderr and "invalid choice: 'tally'" in p.stderr


def spec_plugin(answer: object) -> object:
    class Plugin:
        @hookimpl
        def ksi_config_spec(self):
            return answer

    return Plugin()


@attrs.define(frozen=True)
class Window:
    window_s: int = attrs.field(default=0, validator=positive_int)  # a default its own validator refuses


@dataclasses.dataclass
class NotAttrs:
    n: int = 1


@pytest.mark.parametrize("answer", [Window, ("win", NotAttrs), ("win", Window, "extra"), ("win", Window(window_s=1))],
                         ids=["no-table", "dataclass", "three", "an-instance"])
async def test_a_config_spec_of_the_wrong_shape_names_the_plugin(make_host, answer: object) -> None:
    with pytest.raises(PluginLoadError, match=r"^plugin 'Plugin': ksi_config_spec must return \(table name, attrs class\) or None, got"):
        async with make_host(spec_plugin(answer), DirectQueue()):
            pass


async def test_a_table_two_plugins_declare_names_both(make_host) -> None:
    class First:
        @hookimpl
        def ksi_config_spec(self):
            return "win", Window

    with pytest.raises(StartupError, match=r"^config table \[win\] is declared by plugin 'Plugin' and by plugin 'First'$"):
        async with make_host(First(), spec_plugin(("win", Window))):
            pass
    with pytest.raises(StartupError, match=r"^config table \[host\] is declared by the host itself and by plugin 'Plugin'$"):
        async with make_host(spec_plugin(("host", Window))):
            pass


async def test_defaults_that_fail_their_own_validator_blame_the_plugin_not_the_file(make_host) -> None:
    with pytest.raises(ConfigError) as info:
        async with make_host(spec_plugin(("win", Window))):
            pass
    assert str(info.value) == (
        "plugin 'Plugin': its defaults for config table [win] fail its own checks (config table win: window_s must be "
        "an integer >= 1, got 0); a bug in the plugin (setting the key in [win] works around it)")
    async with make_host(spec_plugin(("win", Window)), config={"win": {"window_s": 5}}) as host:
        assert host.config["win"].window_s == 5
    with pytest.raises(ConfigError, match=r"^config table win: window_s must be an integer >= 1, got 0$"):  # the user's
        async with make_host(spec_plugin(("win", Window)), config={"win": {"window_s": 0}}):
            pass


class StrProvider:
    name, timeout_s = "s", 5.0

    async def complete(self, request, *, timeout_s):
        return "just text"  # not a ProviderResponse


def answering(hook: str, answer: object) -> object:
    """A plugin whose ``hook`` answers ``answer``."""
    def impl(self):
        return answer

    impl.__name__ = hook
    return type("Plugin", (), {hook: hookimpl(impl)})()


@pytest.mark.parametrize(("plugins", "message"), [
    ([answering("ksi_select_provider", "a-provider-name")],
     "plugin 'Plugin': ksi_select_provider returned 'a-provider-name' (str), not a Provider"),
    ([ScriptedProviders(FakeProvider("a", script=[RateLimited("slow")])), answering("ksi_handle_failure", True)],
     "plugin 'Plugin': ksi_handle_failure returned True (bool), not a FailureDecision or None"),
    ([answering("ksi_prepare_request", {"model": "m"})],
     "plugin 'Plugin': ksi_prepare_request returned {'model': 'm'} (dict), not a CompletionRequest"),
    ([answering("ksi_select_provider", StrProvider())], "Provider.complete returned str, not a ProviderResponse"),
], ids=["select", "failure", "prepare", "complete"])
async def test_a_hook_answer_of_the_wrong_type_is_a_programming_error_naming_the_plugin(make_host, plugins, message) -> None:
    async with make_host(DirectQueue(), *plugins) as host:
        with pytest.raises(TypeError) as info:
            await host.complete({"model": "m", "prompt": "hi"})
    assert str(info.value).startswith(message)
    assert any(n.startswith(("raised by plugin 'Plugin'", "raised by provider 's' (test_plugin_mistakes)"))
               for n in info.value.__notes__)


async def test_a_status_that_is_not_a_dict_names_the_plugin(make_host) -> None:
    async with make_host(answering("ksi_status", ["x"])) as host:
        with pytest.raises(TypeError, match=r"^plugin 'Plugin': ksi_status returned \['x'\] \(list\), not a dict"):
            await host.status()


async def test_a_method_named_as_a_hook_but_not_marked_stops_start_up(make_host) -> None:
    class Observer:
        def ksi_request_finished(self, result):  # the @hookimpl forgotten: pluggy would never call it
            pass

    class Base:
        @hookimpl
        def ksi_status(self):
            return {"base": {}}

    class Override(Base):
        def ksi_status(self):  # overrides a hookimpl without the mark (the provider walk-through's warning)
            return {"mine": {}}

    for plugin, method in ((Observer(), "ksi_request_finished"), (Override(), "ksi_status")):
        with pytest.raises(PluginLoadError, match=rf"^plugin '{type(plugin).__name__}' has a method {method} that is not "
                                                  r"marked @hookimpl, so it would never be called"):
            async with make_host(plugin, DirectQueue()):
                pass


@attrs.define(frozen=True)
class Folder:
    folder: Path = attrs.field(default=Path("/tmp"), converter=Path)  # attrs' way to get a Path from a string
    ttl_s: float = attrs.field(default=1.0, converter=float)  # a TOML-native type: still checked as a number


async def test_a_field_with_a_converter_gets_the_toml_value_for_a_type_toml_has_not(make_host) -> None:
    async with make_host(spec_plugin(("files", Folder)), config={"files": {"folder": "/var/x"}}) as host:
        assert host.config["files"].folder == Path("/var/x")
    with pytest.raises(ConfigError, match=r"^config key files.ttl_s: expected a number, got 'soon'$"):
        async with make_host(spec_plugin(("files", Folder)), config={"files": {"ttl_s": "soon"}}):
            pass


async def test_a_config_class_whose_annotation_names_nothing_names_the_plugin(make_host) -> None:
    @attrs.define(frozen=True)
    class Prices:
        price: Decimal | None = None  # noqa: F821  (imported only under TYPE_CHECKING, say)

    for config in ({}, {"prices": {"price": 1}}):
        with pytest.raises(NameError) as info:
            async with make_host(spec_plugin(("prices", Prices)), config=config):
                pass
        assert info.value.__notes__ == [
            "raised by the config class test_a_config_class_whose_annotation_names_nothing_names_the_plugin.<locals>.Prices "
            "of table [prices], declared by plugin 'Plugin'"]


def test_plugins_warns_of_an_entry_point_in_a_misspelled_group(tmp_path: Path) -> None:
    site = make_dist(tmp_path / "s", "ksi-dashed", "ksi_dashed", "class Plugin:\n    pass\n", {})
    info = next(site.glob("*.dist-info"))
    (info / "entry_points.txt").write_text("[ksi-host]\ndashed = ksi_dashed:Plugin\n")
    p = run_cli(["plugins", "--json"], site=site)
    assert p.returncode == 0 and "dashed" not in p.stdout
    assert ("ksi-host: warning: ksi-dashed declares the entry point 'dashed' in group 'ksi-host', which the host does "
            "not read (the group is ksi_host: [project.entry-points.ksi_host])") in p.stderr.splitlines()
