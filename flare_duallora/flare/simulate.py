"""Run an exported job in ``nvflare simulator`` and read back what the server and the sites wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from flare_duallora.flare.audit import AUDIT_FILE
from flare_duallora.flare.controller import COMM_FILE, GLOBAL_MODEL_FILE, SITE_RESULTS_FILE
from flare_duallora.flare.executor import RESULTS_FILE
from flare_duallora.flare.site_config import install_site_config

JOB_ID = "simulate_job"  # nvflare.private.fed.simulator.simulator_const.SimulatorConstants.JOB_NAME


def nvflare_cli() -> list[str]:
    """The ``nvflare`` command of the running interpreter's environment."""
    exe = Path(sys.executable).with_name("nvflare")
    return [str(exe)] if exe.exists() else ["nvflare"]


@dataclass
class SimulationResult:
    workspace: Path
    returncode: int
    log: str
    site_results: dict = field(default_factory=dict)  # final validation, per site
    communication: list = field(default_factory=list)  # per round: accepted / rejected / bytes received
    site_records: dict = field(default_factory=dict)  # per site: the executor's round records
    global_model: dict = field(default_factory=dict)  # the server's stored shared state
    received: list = field(default_factory=list)  # the server's audit of every result it received

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect_results(workspace: str | Path, clients: Sequence[str], returncode: int = 0, log: str = "") -> SimulationResult:
    ws = Path(workspace)
    server_run = ws / "server" / JOB_ID
    result = SimulationResult(ws, returncode, log)
    if (server_run / SITE_RESULTS_FILE).is_file():
        result.site_results = json.loads((server_run / SITE_RESULTS_FILE).read_text())
    if (server_run / COMM_FILE).is_file():
        result.communication = json.loads((server_run / COMM_FILE).read_text())
    result.received = _read_jsonl(server_run / AUDIT_FILE)
    if (server_run / GLOBAL_MODEL_FILE).is_file():
        result.global_model = torch.load(server_run / GLOBAL_MODEL_FILE)
    for site in clients:
        result.site_records[site] = _read_jsonl(ws / site / JOB_ID / RESULTS_FILE)
    return result


def run_simulator(
    job_dir: str | Path,
    workspace: str | Path,
    clients: Sequence[str],
    threads: Optional[int] = None,
    privacy: Optional[dict] = None,
    allow_list: bool = True,
    timeout: Optional[float] = None,
    env: Optional[dict] = None,
) -> SimulationResult:
    """``nvflare simulator JOB -w WS -c site-a,site-b -t N`` after installing the site configuration.

    ``allow_list=False`` leaves the workspace without the ``flare_duallora.`` allow-list entry (to show the
    error a site without it reports).
    """
    ws = Path(workspace)
    ws.mkdir(parents=True, exist_ok=True)
    if allow_list:
        install_site_config(ws / "local", privacy=privacy)
    cmd = nvflare_cli() + ["simulator", str(job_dir), "-w", str(ws), "-c", ",".join(clients),
                           "-t", str(threads or len(clients)), "--end_run_for_all"]
    run_env = {**os.environ, **(env or {})}
    run_env.setdefault("OMP_NUM_THREADS", "1")  # sites share the CPU; avoid oversubscription
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env)
    return collect_results(ws, clients, proc.returncode, proc.stdout + proc.stderr)
