"""Finding plugins: entry points in the group ``ksi_host``.

``KSI_HOST_PLUGINS=a,b`` loads only the named plugins; ``KSI_HOST_DISABLE=a,b``
skips the named ones. Names are the entry point names, as ``ksi-host plugins``
prints them. A plugin that fails to import stops start-up with one line.
"""

from __future__ import annotations

import os
from importlib.metadata import EntryPoint, entry_points
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


def selected_entry_points() -> list[EntryPoint]:
    """Entry points of group ``ksi_host``, filtered by the two environment variables."""
    only, disabled = _names("KSI_HOST_PLUGINS"), _names("KSI_HOST_DISABLE") or set()
    found = sorted(entry_points(group=PROJECT), key=lambda ep: ep.name)
    if only is not None:
        missing = sorted(only - {ep.name for ep in found})
        if missing:
            known = ", ".join(ep.name for ep in found) or "none installed"
            raise PluginLoadError(f"KSI_HOST_PLUGINS names {missing[0]!r}, which is not installed (installed: {known})")
    return [ep for ep in found if (only is None or ep.name in only) and ep.name not in disabled]


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
