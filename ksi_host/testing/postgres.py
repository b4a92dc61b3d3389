"""A throw-away PostgreSQL cluster for tests: ``initdb`` in a temporary folder, ``pg_ctl start``, gone at stop.

PostgreSQL's own programs (``initdb``, ``pg_ctl``) must be installed (Debian: ``apt-get install
postgresql``); no server needs to be running. The binaries are looked for in ``$KSI_PG_BIN``, then
``pg_config --bindir``, then ``/usr/lib/postgresql/<highest version>/bin``, then ``$PATH``.

PostgreSQL refuses to run as root. Run as root (CI, containers), the cluster's folder is given to the
``postgres`` user (Debian's packages create it) and ``initdb`` / ``pg_ctl`` run as that user through
``runuser``; otherwise they run as the current user. The cluster listens on a Unix socket in its own
folder (no TCP port is opened unless ``tcp=True``: then on 127.0.0.1 at a free port), trusts local
connections, and is stopped with ``pg_ctl stop -m immediate`` (and its folder removed) by :meth:`stop`,
at exit of the Python process at the latest::

    with PostgresCluster() as cluster:
        dsn = cluster.create_database("t1")    # postgresql://postgres@/t1?host=/tmp/ksi-pg-.../sock&port=...
        ...

The pytest plugin of the testing kit gives one cluster per test session (fixture
``postgres_cluster``) and a fresh database in it per test (fixture ``postgres_dsn``).
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import StartupError

SERVER_USER = "postgres"
"""Who runs the cluster when this process is root (PostgreSQL refuses to run as root)."""

DEFAULT_SETTINGS: dict[str, str] = {
    "max_connections": "200",
    "shared_buffers": "128MB",
}
"""Server settings of every throw-away cluster (``settings`` adds to them or overrides them)."""

FAST_SETTINGS: dict[str, str] = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
"""For tests whose cluster is thrown away: nothing waits for the disk. A killed *client* still loses nothing
it saw committed (the server keeps running); only a crash of the machine would. Benchmarks of durable
throughput must not use these."""


class PostgresNotInstalled(StartupError):
    """initdb / pg_ctl cannot be found."""


def find_bin_dir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or PostgresNotInstalled saying how to install them."""
    candidates: list[Path] = []
    if os.environ.get("KSI_PG_BIN"):
        candidates.append(Path(os.environ["KSI_PG_BIN"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                      if Path(p).parent.name.isdigit() else 0, reverse=True)
    candidates += [Path(p) for p in versions]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise PostgresNotInstalled("PostgreSQL's initdb and pg_ctl were not found (looked in $KSI_PG_BIN, pg_config --bindir, "
                               "/usr/lib/postgresql/*/bin, $PATH): install them, e.g. apt-get install postgresql")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """One throw-away cluster. ``settings``: ``postgresql.conf`` values (added to :data:`DEFAULT_SETTINGS`);
    ``fast``: add :data:`FAST_SETTINGS` (no waiting for the disk); ``tcp``: listen on 127.0.0.1 too."""

    def __init__(self, *, settings: dict[str, str] | None = None, fast: bool = False, tcp: bool = False,
                 parent: str | None = None) -> None:
        self.bin = find_bin_dir()
        self.settings = {**DEFAULT_SETTINGS, **(FAST_SETTINGS if fast else {}), **(settings or {})}
        self.tcp = tcp
        self.parent = parent
        self.root: Path | None = None
        self.port = _free_port()
        self.user = SERVER_USER
        self._as_root = os.geteuid() == 0

    # -- paths ------------------------------------------------------------------

    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None
        return self.root / "sock"

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq URI for ``dbname`` over the cluster's Unix socket (no password: local connections are trusted)."""
        return f"postgresql://{self.user}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def tcp_dsn(self, dbname: str = "postgres") -> str:
        if not self.tcp:
            raise ValueError("this cluster listens on its Unix socket only (PostgresCluster(tcp=True) for 127.0.0.1)")
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    # -- life cycle ---------------------------------------------------------------

    def _cmd(self, *args: str) -> list[str]:
        if self._as_root:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            return [runuser, "-u", self.user, "--", *args]
        return list(args)

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> PostgresCluster:
        self.root = Path(tempfile.mkdtemp(prefix="ksi-pg-", dir=self.parent))
        if self._as_root:
            import pwd

            try:
                entry = pwd.getpwnam(self.user)
            except KeyError:
                raise PostgresNotInstalled(f"this process is root and there is no {self.user!r} user to run PostgreSQL "
                                           "as (PostgreSQL refuses to run as root; Debian's postgresql package creates it)"
                                           ) from None
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        else:
            import getpass

            self.user = getpass.getuser()
        atexit.register(self.stop)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        self._run("mkdir", "-m", "700", str(self.socket_dir))
        conf = {"unix_socket_directories": f"'{self.socket_dir}'", "port": str(self.port),
                "listen_addresses": "'127.0.0.1'" if self.tcp else "''", **{k: _quote(v) for k, v in self.settings.items()}}
        text = "".join(f"{k} = {v}\n" for k, v in conf.items())
        self._append_conf(text)
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "start")
        return self

    def _append_conf(self, text: str) -> None:
        conf = self.data / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as f:  # root may write the postgres user's file; the owner stays
            f.write("\n# ksi_host.testing.postgres\n" + text)

    def stop(self) -> None:
        """Stop the server at once and remove its folder (idempotent)."""
        root, self.root = self.root, None
        if root is None:
            return
        try:
            if (root / "data" / "postmaster.pid").exists():
                subprocess.run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w",
                                         "stop"), capture_output=True, timeout=60)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases ----------------------------------------------------------------

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with ``psql`` (as the cluster's user) and return its output."""
        done = subprocess.run(self._cmd(str(self.bin / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                                        "-h", str(self.socket_dir), "-p", str(self.port), "-U", self.user,
                                        "-d", dbname, "-c", sql), capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (named ``name``, else a fresh one); its DSN."""
        name = name or f"ksi_{uuid.uuid4().hex[:12]}"
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name must be letters, digits and underscores, got {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.psql("SELECT 1")
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _quote(value: Any) -> str:
    text = str(value)
    return text if text.replace(".", "").replace("-", "").isalnum() and not text[:1].isalpha() else f"'{text}'"


__all__ = ["DEFAULT_SETTINGS", "FAST_SETTINGS", "PostgresCluster", "PostgresNotInstalled", "find_bin_dir"]
