"""Who may call: the clients of ``[[serve.clients]]`` and their bearer tokens.

Each client's token is read from the environment variable its ``key_env`` names, once, when ``ksi-host
serve`` starts. Only a SHA-256 digest of it is kept; a presented token is hashed and compared with every
client's digest with :func:`hmac.compare_digest` (no early exit, equal lengths), so the time an answer
takes tells nothing about how much of a token was right. Tokens are never logged, stored or counted: the
client's name stands for it everywhere.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence

import attrs

from ksi_host import StartupError

from .config import ClientConfig

MIN_TOKEN_CHARS = 16
"""The shortest bearer token accepted at start-up (a short one can be guessed)."""


@attrs.frozen
class Client:
    """A caller: its configured ``name`` (None when no clients are configured: everyone is the same caller),
    the ``agent_id`` every request of it gets (None: the ``X-KSI-Agent-Id`` header decides) and how many of its
    chat completions may be answered at once (``max_pending``; None: only the server's limit)."""

    name: str | None
    agent_id: str | None = None
    max_pending: int | None = None


ANONYMOUS = Client(None)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class Gate:
    """Checks ``Authorization: Bearer <token>`` against the configured clients (none: everyone is let in)."""

    def __init__(self, clients: Sequence[tuple[Client, bytes]]) -> None:
        self._clients = list(clients)

    @classmethod
    def from_config(cls, clients: Sequence[ClientConfig], environ: Mapping[str, str]) -> Gate:
        """Read each client's token from ``environ[key_env]``. StartupError naming the client and the variable
        (never a value) when one is unset, empty or shorter than :data:`MIN_TOKEN_CHARS`, or when two
        clients have the same token."""
        found: list[tuple[Client, bytes]] = []
        for c in clients:
            token = environ.get(c.key_env, "")
            if not token.strip():
                raise StartupError(f"serve: client {c.name!r}: the variable {c.key_env} (its bearer token) is not set")
            if len(token) < MIN_TOKEN_CHARS:
                raise StartupError(f"serve: client {c.name!r}: the token in {c.key_env} is shorter than "
                                   f"{MIN_TOKEN_CHARS} characters (make one with: python -c "
                                   "'import secrets; print(secrets.token_urlsafe(32))')")
            digest = _digest(token)
            for other, seen in found:
                if hmac.compare_digest(seen, digest):
                    raise StartupError(f"serve: clients {other.name!r} and {c.name!r} have the same token "
                                       "(each client needs its own)")
            found.append((Client(c.name, c.agent_id, c.max_pending), digest))
        return cls(found)

    @property
    def open(self) -> bool:
        """No clients configured: every caller is let in (only on a loopback address)."""
        return not self._clients

    def __len__(self) -> int:
        return len(self._clients)

    def check(self, authorization: str | None) -> Client | None:
        """The client whose token ``authorization`` (the header's value) carries; ANONYMOUS when the gate is
        open; None when the token is missing or matches no client."""
        if not self._clients:
            return ANONYMOUS
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        digest = _digest(token.strip())
        match = None
        for client, known in self._clients:  # every digest is compared: the time does not depend on which matched
            if hmac.compare_digest(known, digest):
                match = client
        return match
