"""Run a job in the FLARE simulator with what ``SimEnv`` lacks: a timeout, live progress and a verdict with causes.

:class:`DualLoRASimEnv` is an nvflare ``SimEnv`` (use it with :meth:`DualLoRARecipe.run`); :func:`run_simulator`
runs an exported job folder (a template job, ``flare-duallora simulate``).  Both start
``python -m nvflare.private.fed.app.simulator.simulator`` (what ``SimEnv`` and ``nvflare simulator`` run) in a
session of its own, write its output to a log file, print one line per completed round from the server's
``progress.jsonl``, stop it and every process it started (by PID) on timeout, and read the run back:
:attr:`SimulationResult.ok` is true only when the simulator exited 0 *and* the server wrote ``run_status.json``
= completed; otherwise :attr:`SimulationResult.failures` names each failed site and its root cause.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from nvflare.recipe import SimEnv

from flare_duallora.deploy.site_config import install_site_config, job_folder_paths, job_site_policy
from flare_duallora.deploy.processes import kill_processes, stop_process_tree
from flare_duallora.deploy.report import diagnose_sites, format_round
from flare_duallora.flare.run_files import RunOutputs, RunOutputsView, read_jsonl, read_run, simulator_state_root

JOB_ID = "simulate_job"  # nvflare.private.fed.simulator.simulator_const.SimulatorConstants.JOB_NAME
TIMEOUT_RC = 124


@dataclass
class SimulationResult(RunOutputsView):
    """What a simulator run left, and whether it worked."""

    workspace: Path
    returncode: int
    log_file: Optional[Path]
    outputs: RunOutputs
    clients: list = field(default_factory=list)
    timed_out: bool = False
    failures: dict = field(default_factory=dict)  # site (or "server") -> root cause

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.outputs.completed

    @property
    def server_log(self) -> Path:
        return self.workspace / "server" / "log.txt"

    @property
    def log(self) -> str:
        """The simulator's output and the participants' logs (for diagnosis)."""
        texts = [self.log_file.read_text(errors="replace")] if self.log_file and self.log_file.is_file() else []
        for who in ["server", *self.clients]:
            path = self.workspace / who / "log.txt"
            if path.is_file():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)

    def describe_failure(self) -> str:
        """One line per failed site with its cause (what the CLI prints when a run fails)."""
        lines = []
        if self.timed_out:
            lines.append(f"the simulator run timed out; its whole process group was stopped")
        elif self.returncode != 0:
            lines.append(f"the simulator exited with code {self.returncode}")
        status = self.outputs.status
        if status.get("status") and status.get("status") != "completed":
            lines.append(f"the run {status['status']}: {status.get('reason') or 'no reason given'}")
        elif not status:
            lines.append("the server wrote no run_status.json (it did not finish its workflow)")
        lines += [f"  {site}: {cause}" for site, cause in sorted(self.failures.items())]
        lines.append(f"server log: {self.server_log}")
        return "\n".join(lines)


def install_simulator_config(workspace: str | os.PathLike, privacy: Optional[dict] = None, bundles=(), data=()
                             ) -> None:
    """The site configuration every participant of a simulator workspace gets (``<ws>/local`` is copied into each):
    the allow-list, the optional privacy scope, and a site policy allowing the ``bundles`` and ``data`` paths the job
    names (whoever runs the simulator runs every site) with a ``state_root`` next to the workspace so resumable
    state survives a restart (:func:`~flare_duallora.flare.run_files.simulator_state_root`)."""
    ws = Path(workspace).resolve()
    policy = job_site_policy(bundles, data, state_root=str(simulator_state_root(ws)))
    install_site_config(ws / "local", privacy=privacy, site_policy=policy)


def run_simulator(
    job_dir: str | os.PathLike,
    workspace: str | os.PathLike,
    clients: Sequence[str],
    threads: Optional[int] = None,
    timeout: Optional[float] = None,
    log: Optional[Callable[[str], None]] = None,
    log_file: Optional[str | os.PathLike] = None,
    env: Optional[dict] = None,
    privacy: Optional[dict] = None,
    allow_list: bool = True,
    gpu: Optional[str] = None,
) -> SimulationResult:
    """Run an exported job folder in the simulator and read back what it left (see the module docstring).

    ``log`` receives progress lines (one per round; ``None``: quiet).  ``allow_list=False`` leaves the workspace's
    site configuration as it is (none: nvflare's default allow-list, which refuses the plugin's classes); otherwise
    the allow-list and a site policy for the bundles and data the job's executors name (paths inside the job folder
    or the workspace excluded) are written; ``privacy`` is a ``privacy.json`` to install for every site.
    """
    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    if allow_list:
        install_simulator_config(ws, privacy, *job_folder_paths(job_dir, exclude=(ws, job_dir)))
    log_path = Path(log_file) if log_file else ws.parent / f"{ws.name}.simulator.log"
    cmd = [sys.executable, "-m", "nvflare.private.fed.app.simulator.simulator", str(Path(job_dir).resolve()),
           "-w", str(ws), "-c", ",".join(clients), "-t", str(threads or len(clients)), "--end_run_for_all"]
    if gpu:
        cmd += ["-gpu", gpu]
    run_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    run_env.setdefault("OMP_NUM_THREADS", "1")  # sites share the CPU; avoid oversubscription
    progress_file = ws / "server" / JOB_ID / "progress.jsonl"
    shown = 0
    timed_out = False
    start = time.monotonic()
    if log:
        log(f"simulator: {len(clients)} sites; follow the server log: {ws / 'server' / 'log.txt'}")
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=run_env, start_new_session=True,
                                stdin=subprocess.DEVNULL)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if log and progress_file.is_file():
                    rounds = read_jsonl(progress_file)
                    for p in rounds[shown:]:
                        log(format_round(p, len(clients)))
                    shown = len(rounds)
                if timeout is not None and time.monotonic() - start > timeout:
                    timed_out = True
                    break
        finally:
            if proc.poll() is None:
                stop_process_tree(proc)
                kill_processes(ws)  # anything of this workspace that left the tree
    returncode = TIMEOUT_RC if timed_out else proc.returncode
    outputs = read_run(ws / "server" / JOB_ID, {s: ws / s / JOB_ID for s in clients})
    if log:
        for p in outputs.progress[shown:]:
            log(format_round(p, len(clients)))
    result = SimulationResult(ws, returncode, log_path, outputs, list(clients), timed_out)
    if not result.ok:
        result.failures = diagnose_sites({s: ws / s for s in clients}, outputs, JOB_ID, ws / "server")
    return result


class DualLoRASimEnv(SimEnv):
    """``SimEnv`` with a timeout, live per-round progress and a verdict (:attr:`result`).

    The job runs in ``<workspace_root>/<job name>``; ``deploy`` raises ``RuntimeError`` naming each failed site
    when the run did not complete (``raise_on_failure=False`` keeps the result instead).
    """

    def __init__(self, *, clients: Sequence[str], workspace_root: str | os.PathLike, num_threads: Optional[int] = None,
                 timeout: Optional[float] = None, log: Optional[Callable[[str], None]] = print,
                 env: Optional[dict] = None, gpu_config: Optional[str] = None, raise_on_failure: bool = True,
                 log_file: Optional[str | os.PathLike] = None):
        super().__init__(clients=list(clients), workspace_root=str(Path(workspace_root).resolve()),
                         num_threads=num_threads, gpu_config=gpu_config)
        self.timeout = timeout
        self.log = log
        self.run_env = dict(env or {})
        self.raise_on_failure = raise_on_failure
        self.log_file = log_file
        self.result: Optional[SimulationResult] = None

    def workspace(self, job_name: str) -> Path:
        return Path(self.workspace_root) / job_name

    def deploy(self, job) -> str:
        ws = self.workspace(job.name)
        self._ensure_default_component_policy(str(ws))  # keeps a configuration the recipe installed
        jobs = Path(self.workspace_root) / "jobs"
        job.export_job(str(jobs))
        self.result = run_simulator(jobs / job.name, ws, self.clients, self.num_threads, self.timeout, self.log,
                                    self.log_file, self.run_env, allow_list=False, gpu=self.gpu_config)
        self.last_run_failed = not self.result.ok
        if self.last_run_failed and self.raise_on_failure:
            raise RuntimeError(f"the simulator run of job {job.name!r} failed:\n{self.result.describe_failure()}")
        return job.name
