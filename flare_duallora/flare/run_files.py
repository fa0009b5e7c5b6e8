"""The files a run leaves, named once, and one reader of them.

Server run folder (``<server workspace>/<job id>/``):

``FL_global_model.pt``   the shared keys of the global model after the last completed round
``site_results.json``    per site: personalised and global-only metrics of the final validation (or its error)
``communication.json``   per round: bytes received from each site, accepted / rejected contributions and why
``progress.jsonl``       one line per completed round (sites that answered, mean loss, bytes), for live progress
``progress.json``        the same entries as one JSON list, rewritten each round: what a remote admin reads through
                         the admin API (its ``cat`` serves only some extensions, ``.json`` but not ``.jsonl``)
``run_status.json``      how the run ended: ``completed`` or ``failed``, failed sites and their causes
``received_keys.jsonl``  the server's audit of every result as it arrived (keys, bytes)

Site run folder (``<site workspace>/<job id>/``): ``site_records.jsonl``, the executor's record of every task.

Resumable state (``server_state.pt`` on the server, ``site_state.pt`` and ``site_state.prev.pt`` on each site) lives
in each participant's ``local/flare_duallora_state/<state name>/``, which survives job resubmission, or under the
``state_root`` a site's ``local/flare_duallora.json`` names (``<state_root>/<participant>/<state name>/``): the
plugin's simulator runs use ``<workspace>.state``, because the simulator recreates every participant's folder.

All JSON files are strict JSON: an undefined metric is ``null``, never ``NaN``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

GLOBAL_MODEL_FILE = "FL_global_model.pt"
SITE_RESULTS_FILE = "site_results.json"
COMM_FILE = "communication.json"
PROGRESS_FILE = "progress.jsonl"
PROGRESS_SNAPSHOT_FILE = "progress.json"
RUN_STATUS_FILE = "run_status.json"
AUDIT_FILE = "received_keys.jsonl"
SITE_RECORDS_FILE = "site_records.jsonl"
STATE_FOLDER = "flare_duallora_state"
SERVER_STATE_FILE = "server_state.pt"
SITE_STATE_FILE = "site_state.pt"
SITE_STATE_PREV_FILE = "site_state.prev.pt"
SITE_CONFIG_FILE = "flare_duallora.json"  # a site's own settings for this plugin, in its local/ folder

COMPLETED, FAILED = "completed", "failed"

# a site's error reply carries its root cause in this header (a short string, nothing else)
CAUSE_HEADER = "flare_duallora_cause"
# a site's training result carries the fingerprint of its frozen base in this meta key
FINGERPRINT_META = "base_fingerprint"
# a site training with differential privacy reports its spent budget in this meta key (train and validate results)
PRIVACY_META = "privacy"
PRIVACY_KEYS = {"epsilon": float, "delta": float, "target_epsilon": float, "noise_multiplier": float,
                "sample_rate": float, "max_grad_norm": float, "steps": int, "accountant": str, "unit": str}
# with lora_aggregation = fedex, the server's task carries the residuals every site folds into its base here
FEDEX_META = "fedex_residuals"


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (so ``JSON.parse`` and ``json.loads`` agree)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalar
        return strict_json(value.item())
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):  # never written as such: its size only
        return f"<{len(value)} bytes>"
    return f"<{type(value).__name__}>"  # arrays, objects: the type only (a results file is never a side channel)


def privacy_entry(value: Any) -> Optional[dict]:
    """A site's reported privacy budget, rebuilt from an allow-list (known keys, finite numbers, short names);
    ``None`` when there is none or it is malformed (a site's report is data, never trusted structure)."""
    if not isinstance(value, dict):
        return None
    out = {}
    for key, kind in PRIVACY_KEYS.items():
        v = value.get(key)
        if kind is str:
            if not isinstance(v, str) or len(v) > 32:
                return None
            out[key] = v
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        else:
            out[key] = kind(v)
    return out


def dump_json(value: Any, **kw) -> str:
    return json.dumps(strict_json(value), allow_nan=False, **kw)


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write strict JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(dump_json(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def append_jsonl(path: str | os.PathLike, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(dump_json(entry) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                break
    return out


def _read_json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return default


@dataclass
class RunOutputs:
    """Everything a run wrote, read back (missing files give empty values)."""

    server_dir: Optional[Path]
    status: dict = field(default_factory=dict)  # run_status.json
    site_results: dict = field(default_factory=dict)  # site_results.json
    communication: list = field(default_factory=list)  # communication.json
    progress: list = field(default_factory=list)  # progress.jsonl
    received: list = field(default_factory=list)  # received_keys.jsonl
    site_records: dict = field(default_factory=dict)  # per site: site_records.jsonl
    global_model: dict = field(default_factory=dict)  # FL_global_model.pt

    @property
    def completed(self) -> bool:
        return self.status.get("status") == COMPLETED

    @property
    def failed_sites(self) -> dict:
        return dict(self.status.get("failed_sites") or {})


class RunOutputsView:
    """Shortcuts to what a run wrote, for result objects that hold it as ``outputs`` (a :class:`RunOutputs`)."""

    outputs: RunOutputs

    @property
    def site_results(self) -> dict:
        return self.outputs.site_results

    @property
    def communication(self) -> list:
        comm = self.outputs.communication
        return comm.get("rounds", []) if isinstance(comm, dict) else comm

    @property
    def site_records(self) -> dict:
        return self.outputs.site_records

    @property
    def global_model(self) -> dict:
        return self.outputs.global_model

    @property
    def received(self) -> list:
        return self.outputs.received


def read_run(server_dir: Optional[str | os.PathLike], site_dirs: Optional[dict] = None) -> RunOutputs:
    """Read a run's outputs: ``server_dir`` is the server's run folder, ``site_dirs`` ``{site: its run folder}``."""
    out = RunOutputs(Path(server_dir) if server_dir else None)
    if out.server_dir is not None:
        d = out.server_dir
        out.status = _read_json(d / RUN_STATUS_FILE, {})
        out.site_results = _read_json(d / SITE_RESULTS_FILE, {})
        out.communication = _read_json(d / COMM_FILE, [])
        out.progress = read_jsonl(d / PROGRESS_FILE)
        out.received = read_jsonl(d / AUDIT_FILE)
        if (d / GLOBAL_MODEL_FILE).is_file():
            import torch

            out.global_model = torch.load(d / GLOBAL_MODEL_FILE, map_location="cpu", weights_only=True)
    for site, folder in (site_dirs or {}).items():
        out.site_records[site] = read_jsonl(Path(folder) / SITE_RECORDS_FILE)
    return out


def unflatten_metrics(metrics: dict) -> dict:
    """``{"personalised/balanced_accuracy": x, ...}`` (a METRICS result) -> ``{"personalised": {...}, ...}``."""
    out: dict = {}
    for key, value in metrics.items():
        kind, _, name = str(key).partition("/")
        out.setdefault(kind, {})[name] = value
    return out


def simulator_state_root(workspace: str | os.PathLike) -> Path:
    """``<simulator workspace>.state``: where the plugin's simulator runs keep resumable state (the simulator
    recreates every participant's folder, ``local/`` included, on each start; a sibling folder survives)."""
    return Path(f"{os.path.abspath(workspace)}.state")
