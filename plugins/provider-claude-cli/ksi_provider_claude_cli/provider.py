"""One deployment, ready to call: :class:`ClaudeCliProvider` runs one ``claude`` process per attempt.

``claude -p --output-format json [--model M] [--resume ID] [--append-system-prompt S] [extra args]``
in its own process group, the prompt on stdin. At the attempt's deadline the
whole group is killed (SIGKILL) and the attempt is a ProviderTimeout; a
cancelled call kills it too. Outcomes:

* exit with the CLI's JSON result, ``is_error: false``: the answer, its usage
  and cost, and the CLI's session id, remembered for the host's session;
* the JSON result with ``is_error: true``, or a non-zero exit with text on
  stderr: mapped by :mod:`ksi_provider_claude_cli.cli` (rate limits,
  overload, auth, ...);
* stdout that holds no JSON result: ProviderUnavailable (malformed response);
* the executable missing or not executable: ProviderUnavailable naming it
  (retryable: the retry plugin fails over to another deployment first; the
  circuit opens after ``failures_to_open`` such calls, so requests then fail
  fast until the cool-down ends).

The API key (``api_key_env``) reaches the process only through its
environment (``ANTHROPIC_API_KEY``), never its command line; ``api_base``
becomes ``ANTHROPIC_BASE_URL``. The circuit records every outcome
(:meth:`ksi_host.providers.circuit.CircuitBreaker.record_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from ksi_host.errors import ProviderUnavailable
from ksi_host.models import CompletionRequest, ProviderResponse
from ksi_host.providers.circuit import CircuitBreaker
from ksi_host.providers.deployment_provider import DeploymentProvider
from ksi_host.providers.errormap import timeout_error

from . import cli
from .config import ClaudeCliDeployment
from .sessions import SessionStore

log = logging.getLogger("ksi_host.provider.claude_cli")


class ClaudeCliProvider(DeploymentProvider):
    """A configured deployment: :class:`~ksi_host.providers.deployment_provider.DeploymentProvider` (the key, the
    circuit, the outcome) around one ``claude`` process."""

    plugin = "claude_cli"
    log = log

    def __init__(self, deployment: ClaudeCliDeployment, breaker: CircuitBreaker, *, executable: str,
                 sessions: SessionStore | None) -> None:
        super().__init__(deployment, breaker)
        self.executable = executable
        self.sessions = sessions
        self.calls = 0  # processes started (for status and tests)

    def _env(self, key: str | None) -> dict[str, str]:
        env = dict(os.environ)
        if key is not None:
            env["ANTHROPIC_API_KEY"] = key
        if self.deployment.api_base is not None:
            env["ANTHROPIC_BASE_URL"] = self.deployment.api_base
        return env

    async def attempt(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> ProviderResponse:
        """One ``claude`` process (killed at the timeout); its exit, output and result mapped (:mod:`.cli`)."""
        resume = None
        if request.session_id is not None and self.sessions is not None:
            resume = await self.sessions.claude_session(request.session_id)
        model = self.deployment.model_arg(request.model)
        argv = cli.command(self.executable, model=model, resume=resume, system=cli.system_prompt(request),
                           extra_args=self.deployment.extra_args)
        prompt = cli.prompt_of(request, resuming=resume is not None)
        secrets = (key,)
        stdout, stderr, returncode = await self._spawn(argv, prompt.encode(), self._env(key), timeout_s)
        err_text = stderr.decode("utf-8", "replace")
        result = cli.parse_output(stdout)
        if result is None:
            if returncode != 0:
                raise cli.exit_error(self.name, returncode, err_text, stdout.decode("utf-8", "replace"), secrets=secrets)
            raise cli.garbage_error(self.name, stdout, secrets=secrets)
        if result.get("is_error") is not False or result.get("subtype") != "success":
            raise cli.result_error(self.name, result, returncode=returncode, stderr=err_text, secrets=secrets)
        text = result.get("result")
        if not isinstance(text, str):
            raise cli.garbage_error(self.name, stdout, secrets=secrets)
        usage = cli.usage_of(result)
        claude_session = result.get("session_id")
        session_id = request.session_id
        if isinstance(claude_session, str) and claude_session and self.sessions is not None:
            session_id = session_id or claude_session  # a new conversation continues under the CLI's id
            await self.sessions.save(session_id, claude_session, self.name)
        return ProviderResponse(text, usage=usage, model=model, session_id=session_id)

    async def _spawn(self, argv: list[str], stdin: bytes, env: dict[str, str],
                     timeout_s: float | None) -> tuple[bytes, bytes, int]:
        self.calls += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=env, start_new_session=True,  # its own process group: killed whole at the deadline
            )
        except FileNotFoundError:
            raise ProviderUnavailable(
                f"{self.name}: the claude executable {self.executable!r} was not found on PATH "
                "(install Claude Code, or set [claude_cli] executable)", provider=self.name, executable_missing=True,
            ) from None
        except PermissionError:
            raise ProviderUnavailable(f"{self.name}: the claude executable {self.executable!r} is not executable",
                                      provider=self.name, executable_missing=True) from None
        try:
            async with asyncio.timeout(timeout_s):
                stdout, stderr = await proc.communicate(stdin)
        except TimeoutError:
            await _kill(proc)
            raise timeout_error(self.name, timeout_s, "the claude process was killed") from None
        finally:
            if proc.returncode is None:  # cancelled: no process outlives its call
                await _kill(proc)
        assert proc.returncode is not None
        return stdout, stderr, proc.returncode


async def _kill(proc: Any) -> None:
    """SIGKILL the process's whole group, then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
