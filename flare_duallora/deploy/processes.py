"""Processes a run starts, found and stopped by PID (never by name).

FLARE's simulator and POC start processes in sessions of their own (``setsid``), so stopping the process group
of the command we started is not enough: :func:`stop_process_tree` collects every descendant first, then signals
each by PID; :func:`find_processes` finds FLARE processes by the workspace their command line names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

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
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        if not any(_alive(p) for p in pids):
            break
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
