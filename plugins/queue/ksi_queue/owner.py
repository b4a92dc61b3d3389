"""Which process serves a queue database, and whether it is still alive.

The serving process writes its pid and its start time (from ``/proc``, so a
reused pid is not mistaken for it) into ``ksi_queue_owner``. A second serving
process refuses to start while the owner lives; other processes (``ksi-host
cancel``) send their commands to it instead of editing rows under its feet.
"""

from __future__ import annotations

import os


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot) as text, or None where ``/proc`` is absent."""
    fields = _stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def alive(pid: int, start: str | None) -> bool:
    """Is process ``pid`` (started at ``start``, if known) still running?"""
    if os.path.exists("/proc/self/stat"):
        fields = _stat(pid)
        if fields is None or fields[0] in ("Z", "X"):  # gone, or a zombie waiting to be reaped
            return False
        return start is None or len(fields) <= 19 or fields[19] == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
