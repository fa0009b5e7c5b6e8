"""A site's private state on disk: written so that it is never lost, read so that it never runs code.

* Written only from finite tensors, to a temporary file that is fsynced and renamed over the old one; the previous
  file is kept as ``<name>.prev.pt`` (a hard link taken before the rename, so there is always a complete file).
* Read with ``torch.load(weights_only=True)``: a file holding anything but tensors and plain containers (a pickle
  with ``__reduce__``, say) is refused without running it.
* Restoring checks the file against the running job (same settings, same frozen base) and names every mismatch.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

__all__ = ["StateFileError", "archive", "file_sha256", "load_state_file", "save_state_file", "settings_mismatch"]

FORMAT = 1


class StateFileError(ValueError):
    """A state file that cannot be used: unreadable, unsafe, or saved by a different job set-up."""


def _non_finite(value: Any, path: str = "") -> Optional[str]:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return path or "<tensor>"
        return None
    if isinstance(value, Mapping):
        for k, v in value.items():
            bad = _non_finite(v, f"{path}.{k}" if path else str(k))
            if bad:
                return bad
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = _non_finite(v, f"{path}[{i}]")
            if bad:
                return bad
    elif isinstance(value, float) and value != value:
        return path
    return None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state_file(path: str | os.PathLike, state: Mapping[str, Any], prev_name: Optional[str] = None) -> str:
    """Write ``state`` atomically to ``path`` and return the new file's sha256.

    Refuses (``StateFileError``, nothing written) when any tensor in ``state`` is not finite.  The file it replaces
    is kept as ``prev_name`` (default ``<stem>.prev<suffix>``) in the same folder.
    """
    path = Path(path)
    bad = _non_finite(state)
    if bad:
        raise StateFileError(f"refusing to write {path}: {bad} holds non-finite values (the last good file is kept)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    if path.is_file():
        prev = path.with_name(prev_name or f"{path.stem}.prev{path.suffix}")
        link = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
        if link.exists():
            link.unlink()
        os.link(path, link)  # the current file stays complete under both names until the rename below
        os.replace(link, prev)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return file_sha256(path)


def load_state_file(path: str | os.PathLike, required: str = "private") -> dict:
    """Load a state file safely (``weights_only=True``); ``StateFileError`` names the file and what is wrong.

    ``required`` is the entry the file must hold (``private`` for a site's state)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors, truncated files, unsafe globals
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise StateFileError(
            f"{path} cannot be loaded safely (weights_only=True refused it or it is damaged): "
            f"{type(e).__name__}: {first[:300]}; the file was left as it is"
        ) from None
    if not isinstance(state, dict) or required not in state:
        raise StateFileError(f"{path} is not a flare_duallora state file (no {required!r} entry); left as it is")
    return state


def settings_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: saved X, job Y`` for every setting that differs between a state file and the running job."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if _plain(a) != _plain(b):
            out.append(f"{key}: saved {a!r}, job {b!r}")
    return out


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def archive(path: str | os.PathLike, why: str) -> Path:
    """Move a state file aside (``<name>.<why>-<time>.pt``) so a fresh start loses nothing; returns the new path."""
    path = Path(path)
    dest = path.with_name(f"{path.stem}.{why}-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
    os.replace(path, dest)
    return dest
