"""The errors of KSI host.

Two families, and the difference matters:

* :class:`OperationalError` and its subclasses are *expected* failures: a
  provider is down or rate limited, the input is bad, a request was cancelled.
  They flow into failure handling (``ksi_handle_failure``) and end as an
  ``error`` result; they never crash the host.
* Any other exception raised by a hookimpl is a *programming error*. The host
  does not catch it: it propagates with its traceback, and the host adds a
  note naming the plugin and the hook it came from.

Start-up problems (bad config, a plugin that fails to import) are
:class:`StartupError`: ``ksi-host`` prints them as one line and exits 2.
A database that cannot do its job (cannot be opened, read-only, damaged, full)
is a :class:`DatabaseError`, an OperationalError (exit 1), or, found while the
host starts, a :class:`DatabaseStartupError`, also a StartupError (exit 2).
"""

from __future__ import annotations

from collections.abc import Iterable


class KsiError(Exception):
    """Base of every error KSI host defines."""


class StartupError(KsiError):
    """The host cannot start: bad config, a plugin that fails to load."""


class ConfigError(StartupError):
    """The config file is wrong. The message names the table and key."""


class PluginLoadError(StartupError):
    """A plugin's entry point failed to import or is not a plugin."""


class OperationalError(KsiError):
    """An expected failure. Carries a short, human-readable message.

    ``type`` is the name written into results and the usage ledger
    (``RateLimited``, ``ProviderTimeout``, ...). ``retryable`` is a hint for
    failure policies; the retry plugin owns the actual decision.
    """

    retryable: bool = False

    def __init__(self, message: str = "", **kwargs: object) -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__
        for key, value in kwargs.items():
            setattr(self, key, value)

    @property
    def type(self) -> str:
        return self.__class__.__name__

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}


def _writable(text: str) -> str:
    """``text`` with any lone surrogate (which JSON's ``\\ud800`` escapes can carry into a key a caller sent)
    written as its escape, so the error that names it can be encoded as UTF-8: written to a results file, a
    database, an HTTP answer."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``", did you mean 'prompt'?"`` for a misspelt ``name`` ("promt") close to one of ``known``; "" otherwise."""
    import difflib  # only on the error path

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f", did you mean {close[0]!r}?" if close else ""


class ValidationError(OperationalError):
    """Bad input. ``field`` names the offending field (``messages[0].role``),
    ``line`` the input line when the request came from a file."""

    def __init__(self, field: str, reason: str, *, line: int | None = None) -> None:
        self.field = _writable(field)  # (a field named by a key the caller sent may hold a lone surrogate)
        self.reason = _writable(reason)
        self.line = line
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{self.field}: {self.reason}")

    def at_line(self, line: int) -> ValidationError:
        """The same error, located at input line ``line``."""
        return ValidationError(self.field, self.reason, line=line)


class DatabaseError(OperationalError):
    """The database cannot do its job: it cannot be opened, is not a database, is read-only,
    damaged or full, or its schema is newer than the code. Raised by :mod:`ksi_host.db`;
    ``path`` names the file and ``problem`` says what is wrong, in SQLite's own words."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"database {path}: {problem}")

    def at_startup(self) -> DatabaseStartupError:
        """The same problem, found while the host starts (before any request ran)."""
        return DatabaseStartupError(self.path, self.problem)


class DatabaseStartupError(StartupError, DatabaseError):
    """A :class:`DatabaseError` found while the host starts: opening the file, migrating the
    tables. ``ksi-host`` prints it as one line and exits 2."""


class MissingPluginError(OperationalError):
    """No loaded plugin implements a hook that this request needs."""

    def __init__(self, hook: str, install: str | None = None) -> None:
        self.hook = hook
        self.install = install
        if install:
            from .plugins import install_hint  # (plugins imports this module)

            hint = f": {install_hint(install)}"
        else:
            hint = ""
        super().__init__(f"no plugin implements {hook}{hint}")


class NoProviderError(OperationalError):
    """No provider (deployment) serves the requested model."""


class DeadlineExceeded(OperationalError):
    """The request's ``timeout_s`` deadline would be passed by another attempt."""


class Cancelled(OperationalError):
    """The request was cancelled before it finished."""


class BudgetExceeded(OperationalError):
    """A spending budget is used up: the request is refused before anything is sent upstream."""


class ProviderError(OperationalError):
    """A failure reported by, or while talking to, an upstream provider.

    ``provider`` is the deployment's name; ``usage`` is the token usage the
    upstream reported for the failed call, if any (it is still recorded).
    """

    provider: str | None = None
    usage: object | None = None
    status_code: int | None = None


class RateLimited(ProviderError):
    """HTTP 429. ``retry_after`` (seconds) is set when the provider sent one."""

    retryable = True
    retry_after: float | None = None


class ProviderTimeout(ProviderError):
    """The upstream did not answer within the attempt's timeout."""

    retryable = True


class ProviderUnavailable(ProviderError):
    """5xx, connection refused or reset, malformed response."""

    retryable = True


class BadRequest(ProviderError):
    """HTTP 400: the request itself is wrong; retrying will not help."""


class ContextWindowExceeded(BadRequest):
    """The prompt does not fit the model's context window."""


class AuthFailed(ProviderError):
    """HTTP 401/403: this deployment's key is missing, wrong or not allowed."""


__all__ = [
    "AuthFailed",
    "BadRequest",
    "BudgetExceeded",
    "Cancelled",
    "ConfigError",
    "ContextWindowExceeded",
    "DatabaseError",
    "DatabaseStartupError",
    "DeadlineExceeded",
    "KsiError",
    "MissingPluginError",
    "NoProviderError",
    "OperationalError",
    "PluginLoadError",
    "ProviderError",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RateLimited",
    "StartupError",
    "ValidationError",
]
