"""One deployment, ready to call: :class:`ClaudeCliProvider` runs one ``claude`` process per attempt.

``claude -p --output-format json [--model M] [--resume ID] [--append-system-prompt S] [extra args]``
(a streamed attempt: ``--output-format stream-json --verbose --include-partial-messages``, each
text delta handed out as its line arrives, the result line ending the stream with its usage),
the prompt on stdin, started through :mod:`ksi_provider_claude_cli.reaper`: a
small script in a session of its own that runs ``claude`` in its own process
group and, whenever ``claude`` exits or the reaper gets SIGTERM, SIGKILLs that
group and every process left below it (on Linux it is their child subreaper, so
a grandchild that called ``setsid`` is caught too), and gets SIGTERM itself
when the host dies (``PR_SET_PDEATHSIG``: a SIGKILLed ``ksi-host run`` too).
The provider sends it SIGTERM on every other way out: the attempt's deadline
(a ProviderTimeout), a cancelled call, an output past ``max_output_bytes``
(a BadRequest; reading stops there). No process outlives its call.

Outcomes:

* exit with the CLI's JSON result, ``is_error: false``: the answer, its usage
  and cost, and the CLI's session id, remembered for the host's session;
* the JSON result with ``is_error: true``, or a non-zero exit with text on
  stderr: mapped by :mod:`ksi_provider_claude_cli.cli` (rate limits,
  overload, auth, ...);
* stdout that holds no JSON result: ProviderUnavailable (malformed response);
* the executable missing or not executable: ProviderUnavailable naming it
  (retryable: the retry plugin fails over to another deployment first; the
  circuit opens after ``failures_to_open`` such calls, so requests then fail
  fast until the cool-down ends);
* a ``--model`` value that would read as a flag (it starts with ``-``) or holds
  whitespace or control characters: BadRequest, before any process starts;
* what the CLI cannot do (:data:`ksi_provider_claude_cli.cli.SUPPORTS`: tools,
  logprobs, ...) is refused by the host before any process starts, naming the
  parameter and the deployment; ``n`` > 1 and ``provider_options`` by the
  plugin, the same way; a ``response_format`` asking for JSON whose answer is
  not JSON: ProviderUnavailable (malformed response).

The API key (``api_key_env``) reaches the process only through its
environment (``ANTHROPIC_API_KEY``), never its command line; ``api_base``
becomes ``ANTHROPIC_BASE_URL``. The circuit records every outcome
(:meth:`ksi_host.providers.CircuitBreaker.record_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs

from ksi_host import BadRequest, ChatDelta, CompletionRequest, ProviderResponse, ProviderUnavailable
from ksi_host.providers import CircuitBreaker, DeploymentProvider, timeout_error

from . import cli, reaper
from .config import DEFAULT_MAX_OUTPUT_BYTES, ClaudeCliDeployment, bad_model_arg
from .sessions import SessionStore

log = logging.getLogger("ksi_host.provider.claude_cli")


REAPER = str(Path(reaper.__file__).resolve())
STOP_GRACE_S = 5.0
"""How long the reaper may take to clean up after SIGTERM before its own group is SIGKILLed."""
READ_CHUNK = 64 * 1024


class OutputTooLarge(Exception):
    def __init__(self, stream: str) -> None:
        self.stream = stream


class ClaudeCliProvider(DeploymentProvider):
    """A configured deployment: :class:`~ksi_host.providers.DeploymentProvider` (the key, the
    circuit, the outcome) around one ``claude`` process."""

    log = log
    supports = cli.SUPPORTS

    def __init__(self, deployment: ClaudeCliDeployment, breaker: CircuitBreaker, *, executable: str,
                 sessions: SessionStore | None, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> None:
        super().__init__(deployment, breaker)
        self.executable = executable
        self.sessions = sessions
        self.max_output_bytes = max_output_bytes
        self.calls = 0  # processes started (for status and tests)

    def _env(self, key: str | None) -> dict[str, str]:
        env = dict(os.environ)
        if key is not None:
            env["ANTHROPIC_API_KEY"] = key
        if self.deployment.api_base is not None:
            env["ANTHROPIC_BASE_URL"] = self.deployment.api_base
        return env

    async def _command(self, request: CompletionRequest, *, stream: bool = False) -> tuple[list[str], str, str | None]:
        """The argument vector, the prompt and the ``--model`` value of one call; BadRequest (no process
        started) for what the CLI cannot do."""
        model = self.deployment.model_arg(request.model)
        if model is not None and (why := bad_model_arg(model)) is not None:
            raise BadRequest(f"{self.name}: the model name {model!r} {why}; no claude process was started",
                             provider=self.name)
        refused = cli.refusal(self.name, request)
        if refused is not None:
            raise refused
        resume = None  # the CLI's own conversation goes on only for a request that continues its session, with the
        # earlier turns the host's session plugin put first (history), and only when the CLI session has seen exactly
        # those (not when a turn was answered elsewhere: failover, another host); it then gets only the new turn
        if request.continue_session and request.history and self.sessions is not None:
            found = await self.sessions.claude_session(request.session_id)
            if found is not None and found.seen == cli.seen_hash(request.messages[:request.history]):
                resume = found.claude_session_id
        argv = cli.command(self.executable, model=model, resume=resume, system=cli.system_prompt(request),
                           extra_args=self.deployment.extra_args, stream=stream)
        new_turn = attrs.evolve(request, messages=request.messages[request.history:], history=0) if resume else request
        return argv, cli.prompt_of(new_turn, resuming=resume is not None), model

    async def attempt(self, request: CompletionRequest, timeout_s: float | None, key: str | None) -> ProviderResponse:
        """One ``claude`` process (stopped at the timeout); its exit, output and result mapped (:mod:`.cli`)."""
        argv, prompt, model = await self._command(request)
        secrets = (key,)
        stdout, stderr, returncode = await self._spawn(argv, prompt.encode(), self._env(key), timeout_s)
        err_text = stderr.decode("utf-8", "replace")
        result = cli.parse_output(stdout)
        if result is None:
            if returncode != 0:
                raise cli.exit_error(self.name, returncode, err_text, stdout.decode("utf-8", "replace"), secrets=secrets)
            raise cli.garbage_error(self.name, stdout, secrets=secrets)
        text = self._answer(result, returncode, err_text, secrets, request)
        if text is None:
            raise cli.garbage_error(self.name, stdout, secrets=secrets)
        session_id = await self._remember(request, result)
        return ProviderResponse(text, usage=cli.usage_of(result), model=model, session_id=session_id,
                                finish_reason="stop")

    def _answer(self, result: dict[str, Any], returncode: int, err_text: str, secrets: tuple[str | None, ...],
                request: CompletionRequest) -> str | None:
        """The text of a result object (None: it has none); its error raised; a JSON answer checked."""
        if result.get("is_error") is not False or result.get("subtype") != "success":
            raise cli.result_error(self.name, result, returncode=returncode, stderr=err_text, secrets=secrets)
        text = result.get("result")
        if not isinstance(text, str):
            return None
        cli.check_json(self.name, text, request.response_format)
        return text

    async def _remember(self, request: CompletionRequest, result: dict[str, Any]) -> str | None:
        """Keep the CLI's session id for the host's session, with what it has now seen (the request's messages and
        the answer: resumed or sent whole, it has them all); the session the answer continues under."""
        claude_session = result.get("session_id")
        session_id = request.session_id
        if isinstance(claude_session, str) and claude_session and self.sessions is not None:
            session_id = session_id or claude_session  # a new conversation continues under the CLI's id
            seen = cli.seen_hash([*request.messages, {"role": "assistant", "content": result.get("result")}])
            await self.sessions.save(session_id, claude_session, self.name, seen)
        return session_id

    async def attempt_stream(self, request: CompletionRequest, timeout_s: float | None,
                             key: str | None) -> AsyncIterator[ChatDelta]:
        """One ``claude`` process in stream-json mode: each text delta as its line arrives, then a last piece
        with the finish reason and the result's usage. The process is stopped however the stream ends early
        (the kit's timeout between pieces, the consumer leaving, too much output)."""
        argv, prompt, model = await self._command(request, stream=True)
        secrets = (key,)
        proc, executable = await self._start(argv, self._env(key))
        reader = cli.StreamReader()
        feed = asyncio.ensure_future(_feed(proc, prompt.encode()))
        errors = asyncio.ensure_future(_read_all(proc.stderr, self.max_output_bytes, "stderr"))
        streamed: list[str] = []
        try:
            size = 0
            while chunk := await _read_while(proc.stdout, errors):
                size += len(chunk)
                if size > self.max_output_bytes:
                    raise OutputTooLarge("stdout")
                for text in reader.feed(chunk):
                    streamed.append(text)
                    yield ChatDelta(content=text, model=model)
            for text in reader.end():
                streamed.append(text)
                yield ChatDelta(content=text, model=model)
            returncode = await proc.wait()
            stderr = await errors
        except OutputTooLarge as e:
            raise self._too_large(e) from None
        finally:
            for task in (feed, errors):
                task.cancel()
            await asyncio.gather(feed, errors, return_exceptions=True)
            if proc.returncode is None:  # stopped early: no process outlives its call
                await _stop(proc)
        self._cannot_run(executable, returncode, stderr)
        err_text = stderr.decode("utf-8", "replace")
        result = reader.result
        if result is None:
            if returncode != 0:
                raise cli.exit_error(self.name, returncode, err_text, "", secrets=secrets)
            raise ProviderUnavailable(f"{self.name}: the claude process ended without its result line "
                                      f"(after {len(streamed)} piece(s)): the answer was cut off", provider=self.name)
        text = self._answer(result, returncode, err_text, secrets, request)
        if text is not None and not streamed:  # nothing came in pieces: the whole answer now
            yield ChatDelta(content=text, model=model)
        elif text is not None and request.response_format is not None:
            cli.check_json(self.name, "".join(streamed), request.response_format)
        await self._remember(request, result)
        yield ChatDelta(finish_reason="stop", usage=cli.usage_of(result), model=model)

    def _too_large(self, e: OutputTooLarge) -> BadRequest:
        return BadRequest(
            f"{self.name}: the claude process wrote more than {self.max_output_bytes} bytes on {e.stream}; it was "
            "stopped (raise [claude_cli] max_output_bytes if the answer really is that long)", provider=self.name,
        )

    def _resolve(self, env: dict[str, str]) -> str:
        """The executable's path, looked up on the process's PATH now."""
        found = shutil.which(self.executable, path=env.get("PATH"))
        if found is not None:
            return found
        if os.sep in self.executable and os.path.exists(self.executable):
            raise ProviderUnavailable(f"{self.name}: the claude executable {self.executable!r} is not executable",
                                      provider=self.name, executable_missing=True)
        raise ProviderUnavailable(
            f"{self.name}: the claude executable {self.executable!r} was not found on PATH "
            "(install Claude Code, or set [claude_cli] executable)", provider=self.name, executable_missing=True,
        )

    async def _start(self, argv: list[str], env: dict[str, str]) -> tuple[Any, str]:
        """The reaper running ``claude`` (see the module docstring), its stdio piped; and the executable's path."""
        executable = self._resolve(env)
        self.calls += 1
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", REAPER, str(os.getpid()), executable, *argv[1:],
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, start_new_session=True,
        )
        return proc, executable

    def _cannot_run(self, executable: str, returncode: int, stderr: bytes) -> None:
        """ProviderUnavailable when the reaper could not run the executable."""
        if returncode == reaper.CANNOT_RUN and stderr.startswith(reaper.CANNOT_RUN_PREFIX.encode()):
            why = stderr.decode("utf-8", "replace").strip().rsplit(": ", 1)[-1]
            raise ProviderUnavailable(f"{self.name}: the claude executable {executable!r} cannot be run: {why}",
                                      provider=self.name, executable_missing=True)

    async def _spawn(self, argv: list[str], stdin: bytes, env: dict[str, str],
                     timeout_s: float | None) -> tuple[bytes, bytes, int]:
        proc, executable = await self._start(argv, env)
        try:
            async with asyncio.timeout(timeout_s):
                stdout, stderr = await _communicate(proc, stdin, self.max_output_bytes)
                returncode = await proc.wait()
        except TimeoutError:
            raise timeout_error(self.name, timeout_s, "the claude process was killed") from None
        except OutputTooLarge as e:
            raise self._too_large(e) from None
        finally:
            if proc.returncode is None:  # the deadline, a cancel, too much output: no process outlives its call
                await _stop(proc)
        self._cannot_run(executable, returncode, stderr)
        return stdout, stderr, returncode


async def _feed(proc: Any, data: bytes) -> None:
    """Write ``data`` on the process's stdin and close it."""
    try:
        proc.stdin.write(data)
        await proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):  # it stopped reading: its exit tells why
        pass
    finally:
        proc.stdin.close()


async def _read_all(stream: Any, limit: int, name: str) -> bytes:
    """``stream`` to its end; OutputTooLarge when it passes ``limit`` bytes."""
    buf = bytearray()
    while chunk := await stream.read(READ_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise OutputTooLarge(name)
    return bytes(buf)


async def _read_while(stream: Any, other: asyncio.Future[Any]) -> bytes:
    """The next chunk of ``stream`` (b"" at its end); raises what ``other`` (the stderr reader) raises meanwhile."""
    if other.done():
        other.result()  # raises its OutputTooLarge, if that is how it ended
        return await stream.read(READ_CHUNK)
    read = asyncio.ensure_future(stream.read(READ_CHUNK))
    try:
        await asyncio.wait((read, other), return_when=asyncio.FIRST_COMPLETED)
        if not read.done():
            other.result()
        return await read
    finally:
        if not read.done():  # cancelled, or stderr failed: the read goes too
            read.cancel()


async def _communicate(proc: Any, data: bytes, limit: int) -> tuple[bytes, bytes]:
    """Feed ``data`` on stdin; read stdout and stderr to their ends; OutputTooLarge when one passes ``limit`` bytes."""
    tasks = [asyncio.ensure_future(_feed(proc, data)), asyncio.ensure_future(_read_all(proc.stdout, limit, "stdout")),
             asyncio.ensure_future(_read_all(proc.stderr, limit, "stderr"))]
    try:
        _, out, err = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return out, err


async def _stop(proc: Any) -> None:
    """SIGTERM the reaper (it kills claude's group and everything below it), wait; SIGKILL its group if it hangs.

    Then read what is left in the pipes (at most a pipe's buffer: every writer is dead), so
    that the transport sees their ends and closes now, not when it is collected."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_GRACE_S):
            await proc.wait()
    except TimeoutError:
        log.warning("the claude reaper (pid %d) did not finish within %gs of SIGTERM: SIGKILL", proc.pid, STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0):
            for stream in (proc.stdout, proc.stderr):
                while await stream.read(READ_CHUNK):
                    pass
