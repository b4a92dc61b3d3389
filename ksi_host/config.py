"""The config file: one TOML table per plugin, validated against attrs classes.

Each plugin declares its table with ``ksi_config_spec`` (a table name and an
attrs class). :func:`load_config` reads the file; :func:`build_table` turns one
table into an instance, raising :class:`~ksi_host.errors.ConfigError` that names
the key (``litellm.deployments[1].timeout_s``) for unknown keys and wrong types.
"""

from __future__ import annotations

import logging
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import attrs

from .errors import ConfigError, did_you_mean

HOST_TABLE = "host"
log = logging.getLogger("ksi_host.config")


@attrs.define
class HostConfig:
    """The ``[host]`` table: settings of the host itself.

    ``concurrency``: overrides the queue's concurrency limit when set
    (``ksi-host run --concurrency N`` sets it too).
    ``log_level``: the level of the ``ksi_host`` loggers (``WARNING`` by default);
    ``ksi-host`` also logs every library's records at that level to stderr
    (``-v``/``-vv`` override it with INFO/DEBUG).
    """

    concurrency: int | None = None
    log_level: str = attrs.field(default="WARNING", validator=lambda i, a, v: _check_level(v))


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _check_level(value: str) -> None:
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")


def load_config(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Read a TOML file into a dict (an empty dict for None)."""
    if path is None:
        return {}
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except OSError as e:  # a folder, a file this user may not read
        raise ConfigError(f"config file {p}: cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p}: not valid TOML: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"config file {p}: not valid TOML: nested too deeply to read") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p}: not valid TOML: {e}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"config key {where}: expected {' or '.join(_type_name(a) for a in args if a is not type(None))}, got {value!r}"
        )
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"config key {where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {where}: expected a table, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {k: _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if attrs.has(tp):
        return build_table(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key {where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _toml_native(tp: Any) -> bool:
    """Can a TOML value be checked against ``tp`` as it is (no converter needed)?"""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return all(a is type(None) or _toml_native(a) for a in typing.get_args(tp))
    return tp in (Any, bool, int, float, str) or origin in (list, tuple, dict) or attrs.has(tp)


def build_table(cls: type, data: Any, where: str) -> Any:
    """Build attrs class ``cls`` from the TOML table ``data`` found at ``where``.

    Unknown keys and wrong types raise ConfigError naming ``where.key``. A
    validator of ``cls`` that raises ValueError or TypeError becomes a
    ConfigError naming the table. A field with an attrs ``converter`` whose type
    TOML has not (``Path``, ``Decimal``, an Enum) gets the TOML value as it is:
    its converter makes the type (and its ValueError is a ConfigError too).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key {where}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {a.name: a for a in attrs.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"config key {where}.{unknown[0]}: unknown key{did_you_mean(str(unknown[0]), fields)} "
                          f"(known keys of {where}: {', '.join(fields) or 'none'})")
    missing = [n for n, a in fields.items() if a.default is attrs.NOTHING and a.init and n not in data]
    if missing:
        raise ConfigError(f"config key {where}.{missing[0]}: is required")
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name, Any)
        if fields[name].converter is not None and not _toml_native(hint):
            kwargs[name] = value  # the converter makes its type from the TOML value
        else:
            kwargs[name] = _convert(value, hint, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config table {where}: {e}") from None


def build_config(raw: dict[str, Any], specs: dict[str, type], owners: dict[str, str] | None = None) -> dict[str, Any]:
    """Validate every table of ``raw`` against ``specs`` (table name -> attrs class).

    A table absent from ``raw`` is built from its defaults; when those fail the class's own validators,
    the ConfigError names the plugin that declared it (``owners``: table name -> plugin name) as the culprit.

    A table that no loaded plugin declares is ignored, with a warning, when it belongs to an
    installed plugin that ``KSI_HOST_DISABLE`` or ``KSI_HOST_PLUGINS`` leaves out; otherwise it
    is an error naming it (and the installed plugin it belongs to, if any).
    """
    from .plugins import table_owner, why_not_loaded

    specs = {HOST_TABLE: HostConfig, **specs}
    for table in sorted(set(raw) - set(specs)):
        owner = table_owner(table)
        why = why_not_loaded(owner.name) if owner is not None else None
        if owner is not None and why is not None:
            log.warning("config table [%s] is ignored: plugin %r (%s) is left out by %s", table, owner.name,
                        owner.distribution, why)
            continue
        if owner is not None:
            raise ConfigError(f"config table [{table}] belongs to plugin {owner.name!r} ({owner.distribution}), "
                              "which is installed but not loaded (load it, or remove the table)")
        raise ConfigError(
            f"config table [{table}]: unknown table, no loaded plugin declares it (known tables: {', '.join(sorted(specs))})"
        )
    tables = {}
    for name, cls in specs.items():
        owner = (owners or {}).get(name)
        try:
            tables[name] = build_table(cls, raw[name], name) if name in raw else _defaults(cls, name, owner)
        except ConfigError:
            raise
        except Exception as e:  # the config class itself is wrong (an annotation that names nothing): a programming error
            e.add_note(f"raised by the config class {getattr(cls, '__qualname__', cls)} of table [{name}]"
                       + (f", declared by plugin {owner!r}" if owner else ""))
            raise
    return tables


def _defaults(cls: type, table: str, owner: str | None) -> Any:
    """The table ``cls`` built from its defaults (the file has no ``[table]``)."""
    try:
        return build_table(cls, None, table)
    except ConfigError as e:
        if owner is None or any(a.default is attrs.NOTHING and a.init for a in attrs.fields(cls)):
            raise  # a required key: the user's to write
        raise ConfigError(f"plugin {owner!r}: its defaults for config table [{table}] fail its own checks ({e}); "
                          f"a bug in the plugin (setting the key in [{table}] works around it)") from None
