"""Finding plugins: entry points in the group ``ksi_host``.

``KSI_HOST_PLUGINS=a,b`` loads only the named plugins; ``KSI_HOST_DISABLE=a,b``
skips the named ones. Names are the entry point names, as ``ksi-host plugins``
prints them; a name that no installed plugin has is an error in either
variable. A plugin that fails to import stops start-up with one line.
"""

from __future__ import annotations

import functools
import os
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import attrs

from .errors import PluginLoadError
from .hookspecs import PROJECT


@attrs.frozen
class PluginInfo:
    """A plugin as found: its name, where it came from, and the loaded object."""

    name: str
    distribution: str | None
    version: str | None
    obj: Any = attrs.field(eq=False, repr=False)


def _names(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None or not value.strip():
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _installed() -> list[EntryPoint]:
    return sorted(entry_points(group=PROJECT), key=lambda ep: ep.name)


def _check_names(var: str, names: set[str] | None, found: list[EntryPoint]) -> None:
    missing = sorted((names or set()) - {ep.name for ep in found})
    if missing:
        known = ", ".join(ep.name for ep in found) or "none installed"
        raise PluginLoadError(f"{var} names {missing[0]!r}, which is not installed (installed: {known})")


def selected_entry_points() -> list[EntryPoint]:
    """Entry points of group ``ksi_host``, filtered by the two environment variables."""
    only, disabled = _names("KSI_HOST_PLUGINS"), _names("KSI_HOST_DISABLE") or set()
    found = _installed()
    _check_names("KSI_HOST_PLUGINS", only, found)
    _check_names("KSI_HOST_DISABLE", disabled, found)
    return [ep for ep in found if (only is None or ep.name in only) and ep.name not in disabled]


def misspelled_groups() -> list[tuple[str, EntryPoint]]:
    """Entry points in a group spelled like ``ksi_host`` but not it (``ksi-host``, ``ksi.host``, ``KSI_HOST``):
    ``(group, entry point)``. The host never reads them; ``ksi-host plugins`` says so."""
    found = []
    for group in sorted(entry_points().groups):
        if group != PROJECT and "".join(c for c in group.lower() if c.isalnum()) == "ksihost":
            found.extend((group, ep) for ep in entry_points(group=group))
    return found


def why_not_loaded(name: str) -> str | None:
    """Which variable leaves the installed plugin ``name`` out (``KSI_HOST_DISABLE`` or ``KSI_HOST_PLUGINS``), or None."""
    only, disabled = _names("KSI_HOST_PLUGINS"), _names("KSI_HOST_DISABLE") or set()
    if name in disabled:
        return "KSI_HOST_DISABLE"
    if only is not None and name not in only:
        return "KSI_HOST_PLUGINS"
    return None


def instantiate(obj: Any) -> Any:
    """A class becomes a fresh instance (one per Host); a module stays itself."""
    return obj() if isinstance(obj, type) else obj


def load_plugins() -> list[PluginInfo]:
    """Import the selected plugins. Raises PluginLoadError naming the one that failed."""
    plugins = []
    for ep in selected_entry_points():
        try:
            obj = ep.load()
        except Exception as e:  # an import failure stops start-up with one line
            raise PluginLoadError(f"plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}") from e
        dist = ep.dist
        plugins.append(PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None, obj))
    return plugins


def table_owner(table: str, loaded: set[str] | frozenset[str] = frozenset()) -> PluginInfo | None:
    """The installed plugin (not among ``loaded``, by name) whose ``ksi_config_spec`` declares ``table``, or None.

    For a config table no loaded plugin declares: each other installed plugin is imported and
    asked (one that fails to import or to answer is passed over: this only names an owner).
    """
    for ep in _installed():
        if ep.name in loaded:
            continue
        try:
            obj = instantiate(ep.load())
            spec = obj.ksi_config_spec() if hasattr(obj, "ksi_config_spec") else None
        except Exception:  # it is not loaded: only the name of its table is looked for
            continue
        if isinstance(spec, tuple) and spec and spec[0] == table:
            dist = ep.dist
            return PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None, obj)
    return None


@cache
@functools.cache
def _checkout_plugins() -> dict[str, Path]:
    """Distribution name -> its folder, for the plugins of the KSI host checkout this package runs from (if it does)."""
    import tomllib

    folders: dict[str, Path] = {}
    root = Path(__file__).resolve().parent.parent / "plugins"
    for pyproject in sorted(root.glob("*/pyproject.toml")):
        try:
            with pyproject.open("rb") as f:
                name = tomllib.load(f).get("project", {}).get("name")
        except (OSError, ValueError):
            continue
        if isinstance(name, str):
            folders[name] = pyproject.parent
    return folders


def install_hint(distribution: str) -> str:
    """How to install ``distribution``: the plugins are not on a package index, so from a checkout of KSI host.

    ``pip install -e plugins/retry`` when this package runs from a checkout that has it (the
    path relative to the working directory when it is below it), else the general form.
    """
    folder = _checkout_plugins().get(distribution)
    if folder is None:
        return f"install {distribution} from a KSI host checkout (pip install -e plugins/<its folder>)"
    try:
        shown = folder.relative_to(Path.cwd())
    except ValueError:
        shown = folder
    return f"install {distribution}: pip install -e {shown}"


def register(pm: Any, explicit: list[Any] | None) -> list[PluginInfo]:
    """Register the plugins with ``pm``: the selected entry points, or ``explicit`` objects (classes are
    instantiated; a name already taken gets ``-2``, ``-3``, ...). Returns them as registered."""
    if explicit is None:
        found = load_plugins()
    else:
        found = [PluginInfo(getattr(p, "__name__", type(p).__name__), None, None, p) for p in explicit]
    registered = []
    for info in found:
        name, n = info.name, 1
        while pm.has_plugin(name):
            n += 1
            name = f"{info.name}-{n}"
        obj = register_one(pm, info.obj, name)
        registered.append(PluginInfo(name, info.distribution, info.version, obj))
    return registered


def register_one(pm: Any, obj: Any, name: str) -> Any:
    """Register one plugin (a class is instantiated) under ``name``; returns the registered object.

    The class's ``__init__`` raising is a programming error: it propagates with a note naming the plugin.
    A hookimpl that pluggy refuses (an argument the hook does not have) or that is a hookwrapper (not
    supported) raises PluginLoadError naming the plugin, the hook and what is wrong."""
    import pluggy

    try:
        obj = instantiate(obj)
    except Exception as e:
        e.add_note(f"raised by plugin {name!r} when the host created it ({getattr(obj, '__qualname__', obj)}())")
        raise
    try:
        pm.register(obj, name=name)
    except pluggy.PluginValidationError as e:
        raise PluginLoadError(_refused(pm, obj, name) or f"plugin {name!r}: {' '.join(str(e).split())}") from None
    unmarked = _unmarked_hooks(pm, obj)
    if unmarked:
        pm.unregister(obj)
        raise PluginLoadError(f"plugin {name!r} has a method {unmarked[0]} that is not marked @hookimpl, so it would "
                              "never be called (mark it @ksi_host.hookimpl; a method overriding a hookimpl needs the mark too)")
    for caller in pm.get_hookcallers(obj) or ():
        for impl in caller.get_hookimpls():
            if impl.plugin is obj and (impl.hookwrapper or getattr(impl, "wrapper", False)):
                pm.unregister(obj)
                raise PluginLoadError(f"plugin {name!r} implements {caller.name} as a hookwrapper, which KSI host does "
                                      "not support (write a plain hookimpl; tryfirst/trylast order it)")
    return obj


def _unmarked_hooks(pm: Any, obj: Any) -> list[str]:
    """The functions of ``obj`` named as a hook but not marked ``@hookimpl`` (pluggy passes them over in silence)."""
    import inspect

    import pluggy

    found = []
    for attr in dir(obj):
        if not attr.startswith("ksi_") or pm.parse_hookimpl_opts(obj, attr) is not None:
            continue
        caller = getattr(pm.hook, attr, None)
        if isinstance(caller, pluggy.HookCaller) and caller.has_spec() and callable(inspect.getattr_static(obj, attr)):
            found.append(attr)
    return found


def _refused(pm: Any, obj: Any, name: str) -> str | None:
    """Why pluggy refused one of ``obj``'s hookimpls, in the host's words: an argument the hook does not give."""
    import difflib
    import inspect

    for attr in dir(obj):
        if pm.parse_hookimpl_opts(obj, attr) is None:
            continue
        caller = getattr(pm.hook, attr, None)
        spec = getattr(caller, "spec", None)
        if spec is None:
            continue
        try:
            params = [p for p in inspect.signature(getattr(obj, attr)).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.name not in spec.argnames:
                close = difflib.get_close_matches(p.name, spec.argnames, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                return (f"plugin {name!r} implements {attr}({', '.join(q.name for q in params)}), but the hook has no "
                        f"argument {p.name!r} ({hint}its arguments: {', '.join(spec.argnames)})")
    return None
