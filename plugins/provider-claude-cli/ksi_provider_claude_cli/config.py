"""The ``[claude_cli]`` config table.

::

    [claude_cli]
    executable = "claude"             # a name looked up on PATH, or a path
    priority = 100                    # lower is tried first when another provider plugin serves the model too
    builtin = true                    # the deployment "claude-cli" serving "claude-cli/<model>"
    max_output_bytes = 4194304        # a process writing more on stdout or stderr is stopped (BadRequest)

    [[claude_cli.deployments]]
    name = "claude-sonnet"            # unique across the host; shows in results as `provider`
    model = "sonnet"                  # the model name requests ask for; glob patterns allowed
    cli_model = "sonnet"              # the --model value; "{model}": the requested name; "{suffix}": after its first "/"
    timeout_s = 300                   # per attempt; the process (group) is killed at the deadline
    api_key_env = "ANTHROPIC_API_KEY" # optional: given to the process as ANTHROPIC_API_KEY (never on its command line)
    api_base = "https://..."          # optional: given to the process as ANTHROPIC_BASE_URL (http(s), no credentials)
    extra_args = ["--max-turns", "3"] # optional: more flags for the command line (no secrets)

    [claude_cli.circuit]
    failures_to_open = 5
    cooldown_s = 30
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ksi_host.providers import Deployment, ProviderConfig, deployments_field, redact
from ksi_host.providers.validators import no_control_chars, non_empty, opt_str, positive_int

BUILTIN_NAME = "claude-cli"
"""The built-in deployment: serves ``claude-cli/<model>`` with ``--model <model>`` (``claude-cli/default``: no --model)."""
BUILTIN_PATTERN = "claude-cli/*"
BUILTIN_TIMEOUT_S = 600.0

DEFAULT_MAX_OUTPUT_BYTES = 4 * 1024 * 1024
"""How much a ``claude`` process may write on stdout (and on stderr) before it is stopped: 4 MiB."""
MAX_OUTPUT_BYTES_LIMIT = 1024 * 1024 * 1024

MANAGED_FLAGS = frozenset({"-p", "--print", "--output-format", "--resume", "-r", "--continue", "-c", "--model",
                           "--append-system-prompt", "--session-id", "--input-format", "--include-partial-messages"})
"""Flags the plugin sets itself; ``extra_args`` may not repeat them."""


def bad_model_arg(value: str) -> str | None:
    """Why ``value`` may not be a ``--model`` value (it would read as a flag, or split), or None."""
    if value.startswith("-"):
        return "starts with '-' (it would read as a flag)"
    if any(c.isspace() or not c.isprintable() for c in value):
        return "holds whitespace or control characters"
    return None


def _cli_model(inst: Any, a: attrs.Attribute, value: Any) -> None:
    opt_str(inst, a, value)
    if value is not None and "{" not in value and (why := bad_model_arg(value)) is not None:
        raise ValueError(f"{a.name} {why}")


def _extra_args(inst: Any, a: attrs.Attribute, value: Any) -> None:
    no_control_chars(inst, a, value)
    for i, arg in enumerate(value):
        if arg.split("=", 1)[0] in MANAGED_FLAGS:
            raise ValueError(f"extra_args[{i}]: {arg.split('=', 1)[0]} is set by the plugin itself")
        if redact(arg) != arg:  # never a key on a command line (ps shows it to every user)
            raise ValueError(f"extra_args[{i}] looks like it holds a secret; name an environment variable instead")


def _max_output(inst: Any, a: attrs.Attribute, value: Any) -> None:
    positive_int(inst, a, value)
    if not 1024 <= value <= MAX_OUTPUT_BYTES_LIMIT:
        raise ValueError(f"{a.name} must be between 1024 and {MAX_OUTPUT_BYTES_LIMIT} bytes, got {value!r}")


@attrs.define(frozen=True)
class ClaudeCliDeployment(Deployment):
    """One ``[[claude_cli.deployments]]`` entry: the shared Deployment keys plus this plugin's own."""

    cli_model: str | None = attrs.field(default=None, validator=_cli_model)
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


@attrs.define(frozen=True)
class ClaudeCliConfig(ProviderConfig):
    """The ``[claude_cli]`` table: the keys of every provider plugin
    (:class:`ksi_host.providers.ProviderConfig`: ``priority``, ``circuit``,
    ``deployments`` tried in the order written) and this plugin's own.

    ``executable``: the ``claude`` command (looked up on PATH at call time).
    ``builtin``: add the deployment ``claude-cli`` serving
    ``claude-cli/<model>`` after the configured ones. ``max_output_bytes``:
    how much one process may write on stdout (or stderr) before it is
    stopped and the attempt fails (BadRequest naming this key).
    """

    executable: str = attrs.field(default="claude", validator=non_empty)
    builtin: bool = True
    max_output_bytes: int = attrs.field(default=DEFAULT_MAX_OUTPUT_BYTES, validator=_max_output)
    deployments: list[ClaudeCliDeployment] = deployments_field()

    def reserved_names(self) -> Mapping[str, str]:
        if not self.builtin:
            return {}
        return {BUILTIN_NAME: f"for the built-in deployment serving {BUILTIN_PATTERN} (set builtin = false to use it)"}
