"""Run one ``claude`` process so that nothing it starts outlives it, nor the host.

The provider does not start ``claude`` itself: it starts this script (``python -I -S
reaper.py HOST_PID EXECUTABLE ARGS...``, in a session of its own, stdin, stdout and
stderr piped), which

1. on Linux asks the kernel for SIGTERM when its parent, the host, dies
   (``prctl(PR_SET_PDEATHSIG)``: a SIGKILLed host too), and becomes a *child
   subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): a process orphaned anywhere
   below it (a grandchild that called ``setsid``, a double-forked daemon) is
   re-parented to it instead of init. Elsewhere it polls for the host's death
   every 0.2 s and cannot catch what leaves its process group;
2. starts ``claude`` in a process group of its own, with stdin, stdout and stderr
   inherited (the prompt and the answer never pass through it);
3. when ``claude`` exits, or on SIGTERM (the host's deadline, a cancelled call,
   a too-long output, the host's death): SIGKILLs claude's process group, then
   every process left below it (its children, again until none is left), and
   exits with claude's exit code (or dies of claude's signal).

What it cannot cover: a process that leaves the tree before its parent dies
*and* is re-parented above this script (impossible while it is a subreaper, so
only off Linux), and this script itself being SIGKILLed (the host does that only
when it did not finish within a grace period after SIGTERM). A cgroup would also
cover those; it needs a delegated cgroup, which a plain user process rarely has.

Only the standard library, no import of the plugin: it runs with ``-I -S``
(about 20 ms of start-up).
"""

from __future__ import annotations

import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
CANNOT_RUN = 127
"""The exit code when the executable cannot be started; stderr then starts with :data:`CANNOT_RUN_PREFIX`."""
CANNOT_RUN_PREFIX = "ksi-reaper: cannot run "


def arm_linux() -> bool:
    """SIGTERM on the parent's death, and child subreaper; False when not available (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return (libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
                and libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def children() -> set[int]:
    """The pids of this process's children (reaped or not), from /proc (empty without /proc)."""
    me = os.getpid()
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{me}/task")
        for tid in tasks:
            with open(f"/proc/{me}/task/{tid}/children") as f:
                found.update(int(x) for x in f.read().split())
        return found
    except OSError:  # no CONFIG_PROC_CHILDREN: read every process's parent
        pass
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == me:
                found.add(int(entry))
    return found


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_the_rest() -> None:
    """SIGKILL every child, reap it, and again, until none is left (orphans keep arriving: we are their subreaper)."""
    while True:
        for pid in children():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.005)


def wait_for(child: int, *, linux: bool, host_pid: int, on_host_death: object) -> int:
    """Wait for ``child`` to exit, SIGKILL what is left of its process group, reap it; its wait status.

    It is waited for without being reaped first (``waitid`` with ``WNOWAIT``): while it
    is a zombie its pid, which is its group's id, cannot be reused, so killing the group
    after it exited cannot hit a stranger. Off Linux the host's death is polled for.
    """
    peek = hasattr(os, "waitid") and hasattr(os, "WNOWAIT")
    while True:
        if linux and peek:
            os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # a SIGTERM's handler runs, then it waits on
            break
        if peek and os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            break
        if not peek:  # pragma: no cover - a platform without waitid: reap, then kill the group
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid == child:
                kill_group(child)
                return status
        if os.getppid() != host_pid:  # pragma: no cover - not Linux: the host died
            on_host_death()  # type: ignore[operator]
        time.sleep(0.2)
    kill_group(child)
    return os.waitpid(child, 0)[1]


def run(host_pid: int, argv: list[str]) -> int:
    linux = arm_linux()
    if os.getppid() != host_pid:  # the host died before the death signal was armed
        return 1
    state: dict[str, int | bool] = {"child": 0, "stop": False}

    def stop(signum: int, frame: object) -> None:
        state["stop"] = True
        if state["child"]:
            kill_group(int(state["child"]))

    signal.signal(signal.SIGTERM, stop)
    defaults = tuple(getattr(signal, s) for s in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, s))
    try:  # its own process group (pgid = its pid); the signals Python ignores back to their defaults
        child = os.posix_spawn(argv[0], argv, os.environ, setpgroup=0, setsigdef=defaults)
    except OSError as e:
        os.write(2, f"{CANNOT_RUN_PREFIX}{argv[0]}: {e.strerror}\n".encode())
        return CANNOT_RUN
    state["child"] = child
    if state["stop"]:  # SIGTERM came while it was being started
        kill_group(child)
    status = wait_for(child, linux=linux, host_pid=host_pid, on_host_death=lambda: stop(signal.SIGTERM, None))
    kill_the_rest()
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # die of claude's signal, so the host reads "killed by signal N"
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL, SIGSTOP: no handler to reset
            pass
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(run(int(sys.argv[1]), sys.argv[2:]))
