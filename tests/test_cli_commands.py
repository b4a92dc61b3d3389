"""Commands plugins add to ``ksi-host`` (the ``ksi_cli_commands`` hook)."""

from __future__ import annotations

from pathlib import Path

from conftest import make_dist, run_cli

GREETER = '''
from ksi_host import hookimpl
from ksi_host.commands import Command, host_from_args


def add_arguments(parser):
    parser.add_argument("name")
    parser.add_argument("--shout", action="store_true")


async def hello(args):
    async with host_from_args(args, serve=True) as host:  # the --db the user gave
        plugins = [p.name for p in host.plugins]
    text = f"hello {args.name} from {len(plugins)} plugin(s), db {args.db}"
    print(text.upper() if args.shout else text)
    return 0 if args.name != "nobody" else 1


class Greeter:
    @hookimpl
    def ksi_cli_commands(self):
        return [Command("hello", "say hello", add_arguments, hello)]


class Clash:
    @hookimpl
    def ksi_cli_commands(self):
        return [Command("run", "a second run", lambda p: None, hello)]
'''


def site(tmp_path: Path, clash: bool = False) -> Path:
    entry_points = {"greeter": "ksi_greeter:Greeter"}
    if clash:
        entry_points["clash"] = "ksi_greeter:Clash"
    return make_dist(tmp_path / "site", "ksi-greeter", "ksi_greeter", GREETER, entry_points)


def test_a_plugin_command_is_listed_parsed_and_run(tmp_path: Path) -> None:
    s = site(tmp_path)
    assert "hello" in run_cli(["--help"], site=s).stdout
    db = tmp_path / "k.db"
    p = run_cli(["hello", "world", "--shout", "--db", str(db)], site=s, env={"KSI_HOST_PLUGINS": "greeter"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"HELLO WORLD FROM 1 PLUGIN(S), DB {db}".upper()
    assert run_cli(["hello", "nobody", "--db", str(db)], site=s, env={"KSI_HOST_PLUGINS": "greeter"}).returncode == 1
    bad = run_cli(["hello"], site=s)  # its own arguments are checked by argparse: a usage error
    assert bad.returncode == 2 and "name" in bad.stderr


def test_a_command_name_taken_already_is_a_usage_error_naming_the_plugin(tmp_path: Path) -> None:
    p = run_cli(["--help"], site=site(tmp_path, clash=True))
    assert p.returncode == 2 and "plugin 'clash' adds a command 'run'" in p.stderr
