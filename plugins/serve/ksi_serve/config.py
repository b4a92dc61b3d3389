"""The ``[serve]`` config table: where to listen, who may call, and the limits.

```toml
[serve]
listen = "127.0.0.1:8787"        # host:port ("[::1]:8787" for IPv6); --listen overrides it
max_body_bytes = 4194304         # a request body larger than this gets 413
max_pending = 1024               # requests accepted and not yet answered, at most; more get 429 + Retry-After
max_pending_bytes = 268435456    # their bodies together, at most (bytes); more get 429 + Retry-After
retry_after_s = 1                # the Retry-After of a 429 (full) or a 503 (stopping)
body_timeout_s = 30              # a chat completion's body must arrive within this: slower gets 408 (its slot freed)
idle_timeout_s = 120             # a connection with no request under way (or half a request line and headers) closes after this

[[serve.clients]]
name = "planner"                 # letters, digits, '.', '_', '-'; scopes the client's request ids
key_env = "KSI_SERVE_PLANNER_KEY"   # the variable holding its bearer token; never the token itself
agent_id = "planner"             # optional: every request of this client has this agent_id
max_pending = 64                 # optional: this client's chat completions being answered, at most; more get 429
```
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import attrs

from ksi_host.providers.validators import env_name, opt_str, positive_int, positive_number

_CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_LISTEN = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d{1,5})\Z")
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) as ``(host, port)``; ValueError naming what is wrong."""
    m = _LISTEN.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"listen must be host:port (like 127.0.0.1:8787 or [::1]:8787), got {value!r}")
    port = int(m["port"])
    if port > 65535:
        raise ValueError(f"listen: port {port} is out of range (0-65535)")
    return (m["v6"] or m["host"]), port


def is_loopback(host: str) -> bool:
    """Is ``host`` (a listen address) reachable only from this machine: 127.0.0.0/8, ::1, ``localhost``?"""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another name: it may resolve to anything


def _listen(inst: Any, a: attrs.Attribute, value: Any) -> None:
    parse_listen(value)


def _client_name(inst: Any, a: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not _CLIENT_NAME.match(value):
        raise ValueError(f"{a.name} must be 1 to 64 letters, digits, '.', '_' or '-' (it scopes the client's request ids), "
                         f"got {value!r}")


@attrs.define
class ClientConfig:
    """One ``[[serve.clients]]`` entry: who may call, with the token in the variable ``key_env``."""

    name: str = attrs.field(validator=_client_name)
    key_env: str = attrs.field(validator=env_name)
    agent_id: str | None = attrs.field(default=None, validator=opt_str)
    max_pending: int | None = attrs.field(default=None, validator=attrs.validators.optional(positive_int))


def _clients(inst: Any, a: attrs.Attribute, value: list[ClientConfig]) -> None:
    seen: set[str] = set()
    for c in value:
        if c.name in seen:
            raise ValueError(f"clients: the name {c.name!r} is given twice (names must be unique)")
        seen.add(c.name)


@attrs.define
class ServeConfig:
    """``[serve]``: see the module docstring."""

    listen: str = attrs.field(default="127.0.0.1:8787", validator=_listen)
    clients: list[ClientConfig] = attrs.field(factory=list, validator=_clients)
    max_body_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=positive_int)
    max_pending: int = attrs.field(default=1024, validator=positive_int)
    max_pending_bytes: int = attrs.field(default=256 * 1024 * 1024, validator=positive_int)
    retry_after_s: int = attrs.field(default=1, validator=positive_int)
    body_timeout_s: float = attrs.field(default=30.0, validator=positive_number)
    idle_timeout_s: float = attrs.field(default=120.0, validator=positive_number)
