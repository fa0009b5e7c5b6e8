"""Processes a run starts, found and stopped by PID (never by name).

FLARE's simulator and POC start processes in sessions of their own (``setsid``), so stopping the process group
of the command we started is not enough: :func:`stop_process_tree` collects every descendant first, then signals
each by PID; :func:`find_processes` finds FLARE processes by the workspace their command line names;
:func:`stop_kit` stops a participant started from its startup kit (``startup/start.sh``) by the PIDs its kit
recorded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

PROCESS_MARK = "nvflare.private.fed.app."  # server_train, client_train, simulator(_worker), runner/worker_process


def find_processes(workspace: str | os.PathLike) -> dict[int, str]:
    """``{pid: cmdline}`` of the FLARE processes whose command line names a folder of ``workspace`` (Linux /proc)."""
    roots = {os.path.abspath(workspace), os.path.realpath(workspace)}
    found = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if PROCESS_MARK in cmd and any(root + os.sep in cmd for root in roots):
            found[int(entry)] = cmd
    return found


def wait_gone(workspace, timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    left = find_processes(workspace)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = find_processes(workspace)
    return left


def kill_processes(workspace: str | os.PathLike, grace: float = 5.0) -> list[int]:
    """SIGTERM every FLARE process of ``workspace`` by PID, SIGKILL what is left after ``grace`` s."""
    left = find_processes(workspace)
    pids = sorted(left)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in sorted(left):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        left = wait_gone(workspace, grace)
        if not left:
            break
    return pids

def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first found through ``/proc/<pid>/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_process_tree(proc: subprocess.Popen, grace: float = 10.0) -> list[int]:
    """SIGTERM ``proc`` and every descendant by PID (collected before any dies), SIGKILL what is left after
    ``grace`` seconds; returns the PIDs signalled."""
    pids = [proc.pid] + descendants(proc.pid)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        if not any(alive(p) for p in pids):
            break
    return pids


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


KIT_PID_FILES = ("daemon_pid.fl", "pid.fl")  # startup/sub_start.sh: its own loop's PID, the FL process's PID


def kit_pids(kit: str | os.PathLike) -> dict[str, int]:
    """The live PIDs a startup kit started with ``startup/start.sh`` recorded, by file: the ``sub_start.sh`` loop
    that restarts the participant (``daemon_pid.fl``) and the server / client process (``pid.fl``)."""
    pids = {}
    for name in KIT_PID_FILES:
        try:
            pid = int((Path(kit) / name).read_text().strip())
        except (OSError, ValueError):
            continue
        if alive(pid):
            pids[name] = pid
    return pids


def stop_kit(kit: str | os.PathLike, grace: float = 10.0) -> list[int]:
    """Stop a participant started from its startup kit, by PID: the restart loop first (SIGKILL: it holds no state
    and must not start the process again), then SIGTERM to the FL process and every descendant (job processes),
    SIGKILL to what is left after ``grace`` s.  Returns the PIDs signalled (empty: nothing was running)."""
    recorded = kit_pids(kit)
    if not recorded:
        return []
    pids = list(recorded.values())
    everything = list(dict.fromkeys(pids + [d for pid in pids for d in descendants(pid)]))
    daemon = recorded.get(KIT_PID_FILES[0])
    if daemon is not None:
        try:
            os.kill(daemon, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in everything:
            if alive(pid):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(alive(p) for p in everything):
            time.sleep(0.2)
        if not any(alive(p) for p in everything):
            break
    return everything
