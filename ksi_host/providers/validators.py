"""Validators for provider config keys: attrs validators (``attrs.field(validator=...)``).

Every provider plugin's config goes through the same checks: the keys of
:class:`~ksi_host.providers.deployments.Deployment` and
:class:`~ksi_host.providers.config.ProviderConfig` use them, and a plugin's own
keys should too. Each raises ValueError naming the key (the host turns it into a
:class:`~ksi_host.errors.ConfigError` naming the table), and never repeats a
value that may hold a secret.

The rule they share: a value that validates must not crash or misbehave at run
time. Numbers are finite and in range (``inf`` and ``nan`` are TOML floats:
``cooldown_s = nan`` never blocked a circuit, ``input_cost_per_mtok = nan``
made results invalid JSON); header values are printable ASCII (a CR/LF crashed
the HTTP client); URLs are http(s), hold no credentials and point at no
link-local or cloud metadata address unless the deployment allows it
(:func:`api_base`).
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
from collections.abc import Collection
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs

MAX_SECONDS = 7 * 24 * 3600.0
"""The longest timeout or cool-down a config may give (one week): a longer one is a typo, and ``inf`` overflowed."""

MAX_PRICE_PER_MTOK = 10_000.0
"""The highest price per million tokens a config may give, in USD (every real price is far below)."""

METADATA_HOSTS = frozenset({
    "metadata.google.internal", "metadata.goog", "metadata",  # Google Cloud
    "instance-data", "instance-data.ec2.internal",  # AWS
})
"""Host names of cloud metadata services, refused in ``api_base`` unless ``allow_link_local = true``."""

METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6 (in fd00::/8, which stays allowed otherwise)
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud metadata (in 100.64.0.0/10, which stays allowed)
})
"""Metadata addresses outside the link-local ranges (169.254.0.0/16 and fe80::/10 are refused as a whole)."""

SECRET_QUERY_KEYS = frozenset({"key", "api_key", "apikey", "api-key", "token", "access_token", "auth", "secret",
                               "password", "pass", "pwd", "sig", "signature"})
"""Query parameters that hold credentials: refused in ``api_base`` (the key comes from ``api_key_env``)."""

RESERVED_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key", "content-type",
                              "content-length", "host", "transfer-encoding", "connection"})
"""Headers a config may not set: the credentials come from ``api_key_env``, the framing from the client."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # an HTTP header name (RFC 9110 token)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def non_empty(inst: Any, a: attrs.Attribute, value: Any) -> None:
    """A string with something in it, without control characters (it shows in logs and tables)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{a.name} must be a non-empty string")
    if not value.isprintable():
        raise ValueError(f"{a.name} must not hold control characters (line breaks, tabs, ...)")


def opt_str(inst: Any, a: attrs.Attribute, value: Any) -> None:
    """Absent, or a non-empty string without control characters."""
    if value is not None:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{a.name} must be a non-empty string or absent")
        non_empty(inst, a, value)


def priority(inst: Any, a: attrs.Attribute, value: Any) -> None:
    """A provider plugin's rank among those serving one model: an integer, lower first."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{a.name} must be an integer (lower is tried first), got {value!r}")


def positive_int(inst: Any, a: attrs.Attribute, value: Any) -> None:
    """An integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{a.name} must be an integer >= 1, got {value!r}")


def positive_number(inst: Any, a: attrs.Attribute, value: Any) -> None:
    """A finite number > 0 (an int or a float, not a bool)."""
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{a.name} must be a positive number, got {value!r}")


def opt_timeout(inst: Any, a: attrs.Attribute, value: Any) -> None:
    """Absent (no limit), or a finite number of seconds > 0, at most :data:`MAX_SECONDS`."""
    if value is None:
        return
    if not is_number(value) or not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise ValueError(f"{a.name} must be a number of seconds > 0 and at most {MAX_SECONDS:g} (or absent), "
                         f"got {value!r}")


def cooldown(inst: Any, a: attrs.Attribute, value: Any) -> None:
    """A finite number of seconds >= 0, at most :data:`MAX_SECONDS`."""
    if not is_number(value) or not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise ValueError(f"{a.name} must be a number of seconds >= 0 and at most {MAX_SECONDS:g}, got {value!r}")


def opt_price(inst: Any, a: attrs.Attribute, value: Any) -> None:
    """Absent, or USD per million tokens: finite, >= 0, at most :data:`MAX_PRICE_PER_MTOK`."""
    if value is None:
        return
    if not is_number(value) or not math.isfinite(value) or not 0 <= value <= MAX_PRICE_PER_MTOK:
        raise ValueError(f"{a.name} must be a number of USD per million tokens >= 0 and at most "
                         f"{MAX_PRICE_PER_MTOK:g}, or absent; got {value!r}")


_KEY_PART = re.compile(r"(?=[^_]*[0-9])(?=[^_]*[a-z])[A-Za-z0-9]{20,}")
"""A part of a name (between underscores) that is a key rather than a word: 20 or more letters and digits,
lower case among them. Keys that fit a variable's name (``gsk_…``, ``hf_…``, hex) have one; names such
as ``AZURE_OPENAI_API_KEY_2`` do not."""


def env_name(inst: Any, a: attrs.Attribute, value: Any) -> None:
    """Absent, or the name of an environment variable (``OPENAI_API_KEY``), not a key shaped like one."""
    # The message never repeats the value: if someone pasted a key here, it must not reach a log.
    if value is not None and (not isinstance(value, str) or not _ENV_NAME.match(value)
                              or any(_KEY_PART.fullmatch(part) for part in value.split("_"))):
        raise ValueError(
            f"{a.name} must be the name of the environment variable that holds the key "
            "(like OPENAI_API_KEY), never the key itself"
        )


def http_headers(inst: Any, a: attrs.Attribute, value: Any, *, reserved: Collection[str] = RESERVED_HEADERS) -> None:
    """A table of extra HTTP headers: token names, printable ASCII values, no credentials, none of ``reserved``."""
    from .errormap import redact

    for k, v in value.items():
        if not isinstance(k, str) or not _TOKEN.match(k):
            raise ValueError(f"{a.name}: {k!r} is not a valid header name")
        if not isinstance(v, str):
            raise ValueError(f"{a.name}.{k} must be a string")
        if k.lower() in reserved:
            raise ValueError(f"{a.name} may not set {k!r} (the key comes from api_key_env, never from the file)")
        if not all(" " <= c <= "~" for c in v):
            raise ValueError(f"{a.name}.{k} must be printable ASCII (no line breaks or control characters)")
        if redact(v) != v:
            raise ValueError(f"{a.name}.{k} looks like it holds a secret; secrets never go in the config file")


def url_host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a URL's host name stands for, read the way the C resolver reads numbers, or None for a name.

    Besides the usual forms this catches the ones ``inet_aton`` accepts (``2852039166``,
    ``0xa9fea9fe``, ``0251.0376.0251.0376``, ``169.254.43518``: all 169.254.169.254) and IPv6
    zone ids (``fe80::1%eth0``).
    """
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def link_local_reason(host: str) -> str | None:
    """Why ``host`` (a URL's host name, lower case) is a link-local or cloud metadata address, or None."""
    name = host.rstrip(".")
    if name in METADATA_HOSTS:
        return "a cloud metadata host name"
    ip = url_host_address(name)
    if ip is None:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_link_local:
        return "a link-local address (169.254.0.0/16, fe80::/10: where cloud metadata services answer)"
    return None


def check_url(key: str, value: str, *, allow_link_local: bool = False) -> None:
    """Raise ValueError (naming ``key``, never repeating the URL) unless ``value`` is a URL a provider may call.

    http or https with a host; no whitespace or control characters; an ASCII host
    name (IDN in its ``xn--`` form); a valid port; no credentials (``user:password@``,
    or a query parameter such as ``?key=``); not a link-local or cloud metadata
    address (:func:`link_local_reason`) unless ``allow_link_local``. Host names are
    not resolved: a name that resolves to a link-local address is not caught here.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a non-empty string")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{key} must not hold spaces, line breaks or control characters")
    parts = urlsplit(value)
    authority = parts.netloc or value.split("/", 1)[0]
    if "@" in authority:
        raise ValueError(f"{key} must not hold credentials (user:password@); the key comes from the environment "
                         "variable named by api_key_env (the URL is not repeated here)")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        scheme = f"scheme {parts.scheme!r}" if parts.scheme and "://" in value else "no scheme"
        raise ValueError(f"{key} must be an http:// or https:// URL (like https://api.openai.com/v1), got one with {scheme}")
    host = parts.hostname
    if not host:
        raise ValueError(f"{key} must name a host (https://HOST/...)")
    if not host.isascii():
        raise ValueError(f"{key}: write a non-ASCII host name in its ASCII (xn--) form")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError:
        raise ValueError(f"{key} has an invalid port (0-65535)") from None
    secret = next((k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in SECRET_QUERY_KEYS), None)
    if secret is not None:
        raise ValueError(f"{key} must not carry credentials in its query ({secret}=...); the key comes from the "
                         "environment variable named by api_key_env")
    why = link_local_reason(host)
    if why is not None and not allow_link_local:
        raise ValueError(f"{key} points at {why} ({host}); set allow_link_local = true on this deployment "
                         "if that really is the endpoint")


def api_base(inst: Any, a: attrs.Attribute, value: Any) -> None:
    """Absent, or a URL :func:`check_url` accepts (``inst.allow_link_local`` lifts the link-local rule)."""
    if value is not None:
        check_url(a.name, value, allow_link_local=bool(getattr(inst, "allow_link_local", False)))


def no_control_chars(inst: Any, a: attrs.Attribute, value: Any) -> None:
    """A list of strings without control characters (a NUL in a command line crashed the spawn)."""
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"{a.name}[{i}] must be a string")
        if not item.isprintable():
            raise ValueError(f"{a.name}[{i}] must not hold control characters")


__all__ = [
    "MAX_PRICE_PER_MTOK",
    "MAX_SECONDS",
    "METADATA_ADDRESSES",
    "METADATA_HOSTS",
    "RESERVED_HEADERS",
    "api_base",
    "check_url",
    "cooldown",
    "env_name",
    "http_headers",
    "is_number",
    "link_local_reason",
    "no_control_chars",
    "non_empty",
    "opt_price",
    "opt_str",
    "opt_timeout",
    "positive_int",
    "positive_number",
    "priority",
    "url_host_address",
]
