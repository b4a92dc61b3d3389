"""The ``[claude_cli]`` config table.

::

    [claude_cli]
    executable = "claude"             # a name looked up on PATH, or a path
    priority = 100                    # lower is tried first when another provider plugin serves the model too
    builtin = true                    # the deployment "claude-cli" serving "claude-cli/<model>"

    [[claude_cli.deployments]]
    name = "claude-sonnet"            # unique across the host; shows in results as `provider`
    model = "sonnet"                  # the model name requests ask for; glob patterns allowed
    cli_model = "sonnet"              # the --model value; "{model}": the requested name; "{suffix}": after its first "/"
    timeout_s = 300                   # per attempt; the process (group) is killed at the deadline
    api_key_env = "ANTHROPIC_API_KEY" # optional: given to the process as ANTHROPIC_API_KEY (never on its command line)
    api_base = "https://..."          # optional: given to the process as ANTHROPIC_BASE_URL
    extra_args = ["--max-turns", "3"] # optional: more flags for the command line (no secrets)

    [claude_cli.circuit]
    failures_to_open = 5
    cooldown_s = 30
"""

from __future__ import annotations

from typing import Any

import attrs

from ksi_host.providers.circuit import CircuitConfig
from ksi_host.providers.deployments import DEFAULT_PRIORITY, Deployment, check_unique_names
from ksi_host.providers.errormap import redact

BUILTIN_NAME = "claude-cli"
"""The built-in deployment: serves ``claude-cli/<model>`` with ``--model <model>`` (``claude-cli/default``: no --model)."""
BUILTIN_PATTERN = "claude-cli/*"
BUILTIN_TIMEOUT_S = 600.0

MANAGED_FLAGS = frozenset({"-p", "--print", "--output-format", "--resume", "-r", "--continue", "-c", "--model",
                           "--append-system-prompt", "--session-id"})
"""Flags the plugin sets itself; ``extra_args`` may not repeat them."""


def _opt_str(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{a.name} must be a non-empty string or absent")


def _extra_args(inst: Any, a: attrs.Attribute, value: Any) -> None:
    for i, arg in enumerate(value):
        if not isinstance(arg, str):
            raise ValueError(f"extra_args[{i}] must be a string")
        if arg.split("=", 1)[0] in MANAGED_FLAGS:
            raise ValueError(f"extra_args[{i}]: {arg.split('=', 1)[0]} is set by the plugin itself")
        if redact(arg) != arg:  # never a key on a command line (ps shows it to every user)
            raise ValueError(f"extra_args[{i}] looks like it holds a secret; name an environment variable instead")


@attrs.define(frozen=True)
class ClaudeCliDeployment(Deployment):
    """One ``[[claude_cli.deployments]]`` entry: the shared Deployment keys plus this plugin's own."""

    cli_model: str | None = attrs.field(default=None, validator=_opt_str)
    extra_args: list[str] = attrs.field(factory=list, validator=_extra_args)

    def model_arg(self, requested: str) -> str | None:
        """The ``--model`` value for a request of model ``requested`` (None: the CLI's default)."""
        if self.cli_model is None:
            return None
        suffix = requested.split("/", 1)[1] if "/" in requested else requested
        value = self.cli_model.replace("{model}", requested).replace("{suffix}", suffix)
        return None if value == "default" else value


def builtin_deployment() -> ClaudeCliDeployment:
    return ClaudeCliDeployment(name=BUILTIN_NAME, model=BUILTIN_PATTERN, cli_model="{suffix}", timeout_s=BUILTIN_TIMEOUT_S)


def _priority(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"priority must be an integer (lower is tried first), got {value!r}")


def _deployments(inst: Any, a: attrs.Attribute, value: Any) -> None:
    why = f"for the built-in deployment serving {BUILTIN_PATTERN} (set builtin = false to use it)"
    check_unique_names(value, {BUILTIN_NAME: why} if inst.builtin else None)


@attrs.define(frozen=True)
class ClaudeCliConfig:
    """The ``[claude_cli]`` table.

    ``executable``: the ``claude`` command (looked up on PATH at call time).
    ``priority``: this plugin's rank among provider plugins serving the same
    model (lower first; plugins stating none rank at 100; ties by plugin
    name). ``builtin``: add the deployment ``claude-cli`` serving
    ``claude-cli/<model>`` after the configured ones. ``deployments``: tried
    in the order written. ``circuit``: when a deployment's circuit opens.
    """

    executable: str = attrs.field(default="claude", validator=_opt_str)
    priority: int = attrs.field(default=DEFAULT_PRIORITY, validator=_priority)
    builtin: bool = True
    circuit: CircuitConfig = attrs.field(factory=CircuitConfig)
    deployments: list[ClaudeCliDeployment] = attrs.field(factory=list, validator=_deployments)
