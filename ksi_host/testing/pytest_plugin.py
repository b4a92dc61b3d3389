"""pytest fixtures of the KSI host testing kit (registered through ``pytest11``).

An ``async def`` test that takes ``make_host`` is marked ``asyncio`` (pytest-asyncio), so it runs
as written in a project on pytest-asyncio's default strict mode, no marker or ``asyncio_mode``
needed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from ..service import Host

pytest.register_assert_rewrite("ksi_host.testing.conformance")  # its failures show their values, as a test file's do


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: Any, name: str, obj: Any) -> None:
    """Mark ``async def`` tests that take ``make_host`` as asyncio tests, before pytest-asyncio looks at them."""
    if not (inspect.iscoroutinefunction(obj) and collector.funcnamefilter(name)):
        return
    if not collector.config.pluginmanager.hasplugin("asyncio"):
        return  # without pytest-asyncio, pytest reports the coroutine as not run, as for any async test
    try:
        takes_host = "make_host" in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    marks = getattr(obj, "pytestmark", [])
    if takes_host and not any(m.name == "asyncio" for m in marks):
        pytest.mark.asyncio(obj)  # adds the mark to the function; collection goes on as usual


@pytest.fixture
def ksi_db_path(tmp_path: Any) -> Any:
    """A fresh, empty database for one test (an empty file is an empty SQLite database: read-only hosts,
    ``serve=False``, open it too; only serving hosts create a missing one)."""
    path = tmp_path / "ksi-test.db"
    path.touch()
    return path


@pytest.fixture
def make_host(ksi_db_path: Any) -> Callable[..., Host]:
    """Build a Host from explicit plugin objects on a temporary database.

    ``async with make_host(MyPlugin(), DirectQueue(), config={"my": {...}}) as host: ...``
    Keyword arguments (``serve``, ``resume``, ``clock``, ``sleep``, ``db_path``) go to Host.
    """

    def factory(*plugins: Any, config: dict[str, Any] | None = None, db_path: Any = None, **kw: Any) -> Host:
        return Host(config or {}, db_path or ksi_db_path, plugins=list(plugins), **kw)

    return factory


@pytest.fixture
def openai_server() -> Any:
    """A local OpenAI-compatible server (:class:`ksi_host.testing.server.OpenAIServer`) for one test.

    It runs on its own event loop in a background thread, so sync tests, async
    tests and code that calls it from worker threads all work. ``server.url``
    is ``http://127.0.0.1:PORT/v1``; set faults with ``server.script(...)`` or
    ``server.set_faults(...)``; count ``server.hits`` and read ``server.arrivals``.
    """
    from .server import OpenAIServer

    server = OpenAIServer().start_in_thread()
    try:
        yield server
    finally:
        server.stop_thread()


@pytest.fixture(scope="session")
def postgres_cluster() -> Any:
    """A throw-away PostgreSQL cluster for the whole test session (:class:`ksi_host.testing.postgres.PostgresCluster`):
    ``initdb`` in a temporary folder, run as the ``postgres`` user when the tests run as root, on a Unix socket,
    stopped and removed at the end. It does not wait for the disk (``fsync`` off): it is thrown away."""
    from .postgres import PostgresCluster

    cluster = PostgresCluster(fast=True).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_dsn(postgres_cluster: Any) -> str:
    """The DSN of a fresh, empty database in the session's cluster, for one test."""
    return str(postgres_cluster.create_database())
