"""The ``serve`` plugin: the ``ksi-host serve`` command, the ``[serve]`` table, and the observers that feed
``GET /metrics``.

This module is imported by every ``ksi-host`` invocation (``ksi_cli_commands``), so it imports nothing
heavy: aiohttp and the server come in when ``ksi-host serve`` runs. The observer hooks cost one attribute
check per request when nothing is served (``ksi-host run`` with this plugin installed).
"""

from __future__ import annotations

import argparse
import weakref
from typing import Any

from ksi_host import Attempt, CompletionResult, OperationalError, hookimpl
from ksi_host.commands import Command

from .config import ServeConfig, parse_listen

TABLE = "serve"
_RUNNING: weakref.WeakKeyDictionary[Any, Plugin] = weakref.WeakKeyDictionary()  # host -> its serve plugin


def _listen(text: str) -> str:
    try:
        parse_listen(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("listen ")) from None
    return text


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", metavar="HOST:PORT", type=_listen,
                        help="address to listen on (default: [serve] listen, else 127.0.0.1:8787; port 0: any free port)")


async def _run(args: argparse.Namespace) -> int:
    from .command import serve

    return await serve(args)


COMMAND = Command(
    "serve", "serve the OpenAI chat-completions API over HTTP (queue, retry and ledger included)", _arguments, _run,
    description="An OpenAI-compatible service: POST /v1/chat/completions (streaming too), GET /v1/models, "
    "GET /v1/requests/{id}, POST /v1/requests/{id}/cancel, GET /healthz, GET /metrics. Ctrl-C or SIGTERM: stop "
    "accepting, let the running requests finish and be stored, exit 0 (a second one: stop now).",
)


class Plugin:
    """One instance per Host. ``metrics`` is set by ``ksi-host serve`` while it serves (None otherwise)."""

    def __init__(self) -> None:
        self.metrics: Any = None

    @classmethod
    def of(cls, host: Any) -> Plugin | None:
        """The serve plugin started in ``host`` (None when it is not loaded there)."""
        return _RUNNING.get(host)

    @hookimpl
    def ksi_config_spec(self) -> tuple[str, type]:
        return TABLE, ServeConfig

    @hookimpl
    def ksi_cli_commands(self) -> list[Command]:
        return [COMMAND]

    @hookimpl
    def ksi_startup(self, host: Any) -> None:
        _RUNNING[host] = self

    @hookimpl
    def ksi_shutdown(self, host: Any) -> None:
        _RUNNING.pop(host, None)
        self.metrics = None

    @hookimpl
    def ksi_attempt_finished(self, attempt: Attempt, error: OperationalError | None) -> None:
        if self.metrics is not None:
            self.metrics.attempt_finished(attempt, error)

    @hookimpl
    def ksi_request_finished(self, result: CompletionResult) -> None:
        if self.metrics is not None:
            self.metrics.request_finished(result)
