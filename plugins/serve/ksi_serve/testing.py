"""``ksi-host serve`` as a subprocess, for tests and benchmarks: :class:`ServeProcess`.

::

    with ServeProcess(config_path, db_path, env={...}) as served:
        client = openai.OpenAI(base_url=served.url, api_key="...")
        ...
    served.returncode   # after the with block (SIGTERM: a drain, then 0)

The process writes its stderr to ``<db>.serve-<n>.log`` (read it with :meth:`ServeProcess.log`); its address
is read from the ``listening on`` line it prints there.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_LISTENING = re.compile(r"listening on (http://\S+)")


class ServeProcess:
    """``ksi-host serve --config CONFIG --db DB --listen LISTEN`` in a subprocess (``python -m ksi_host.cli``).

    ``env``: the environment (default: this process's); ``listen``: default ``127.0.0.1:0`` (any free port).
    """

    _count = 0

    def __init__(self, config: str | os.PathLike[str] | None, db: str | os.PathLike[str], *,
                 env: Mapping[str, str] | None = None, listen: str = "127.0.0.1:0", extra_args: tuple[str, ...] = (),
                 start_timeout_s: float = 60.0) -> None:
        self.config = config
        self.db = Path(db)
        self.env = dict(os.environ if env is None else env)
        self.listen = listen
        self.extra_args = extra_args
        self.start_timeout_s = start_timeout_s
        ServeProcess._count += 1
        self.log_path = self.db.with_name(f"{self.db.name}.serve-{ServeProcess._count}.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.base: str | None = None  # http://host:port

    @property
    def url(self) -> str:
        """The OpenAI base URL: ``http://host:port/v1``."""
        if self.base is None:
            raise RuntimeError("the server is not listening yet")
        return f"{self.base}/v1"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> ServeProcess:
        args = [sys.executable, "-m", "ksi_host.cli", "serve", "--db", str(self.db), "--listen", self.listen,
                *self.extra_args]
        if self.config is not None:
            args += ["--config", str(self.config)]
        with open(self.log_path, "wb") as err:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=self.env)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            m = _LISTENING.search(self.log())
            if m:
                self.base = m.group(1)
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"ksi-host serve exited {self.process.returncode} before listening:\n{self.log()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"ksi-host serve did not listen within {self.start_timeout_s} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"ksi-host serve did not stop within {timeout_s} s of signal {sig}:\n{self.log()}") from None

    def wait(self, timeout_s: float = 60.0) -> int:
        """Wait for the process to exit (a signal was sent already); its exit code."""
        assert self.process is not None
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"ksi-host serve did not exit within {timeout_s} s:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL: nothing is drained or flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()


def toml(tables: Mapping[str, Any]) -> str:
    """A small TOML writer for test configs: tables of scalars, nested tables, arrays of tables."""
    import json

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines: list[str] = []

    def table(name: str, body: Mapping[str, Any], header: str) -> None:
        lines.append(header)
        for k, v in body.items():
            if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict)):
                lines.append(f"{k} = {value(v)}")
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v, f"[{name}.{k}]")
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    table(f"{name}.{k}", item, f"[[{name}.{k}]]")

    for name, body in tables.items():
        table(name, body, f"[{name}]")
    return "\n".join(lines) + "\n"
