"""Run jobs in an nvflare POC (server and sites as separate local processes, real startup kits) through ``PocEnv``.

:class:`LoopbackPocEnv` is an nvflare ``PocEnv`` (``recipe.run(env)``) plus what ``PocEnv`` lacks:

* a ``project.yml`` whose server participant is named ``localhost``: nvflare then binds the FL/admin port to
  127.0.0.1 only (``allow_remote=True`` names the server ``server``, which listens on all interfaces);
* the plugin's site configuration in every kit, installed by the provisioning builder
  :class:`~flare_duallora.deploy.provision.SiteConfigBuilder` named in that ``project.yml``;
* everything inside one folder: the POC workspace (``NVFLARE_POC_WORKSPACE``), the project file, the downloaded
  results, and the ``HOME`` the POC processes see, so nothing is written into the user's home;
* a timeout, one progress line per round, a verdict (:class:`PocResult`) naming each failed site's cause, and a
  stop that leaves no process: ``PocEnv.stop`` (admin shutdown), then SIGTERM / SIGKILL **by PID** for any process
  whose command line names the workspace (never by name).

:meth:`LoopbackPocEnv.run_job_folder` submits an exported job folder the same way (``flare-duallora poc run``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import yaml
from nvflare.recipe import PocEnv

from flare_duallora.deploy.processes import find_processes, kill_processes, wait_gone
from flare_duallora.deploy.report import diagnose_sites, format_round
from flare_duallora.flare.run_files import RunOutputs, RunOutputsView, read_jsonl, read_run

COMPLETED = "FINISHED:COMPLETED"
SERVER = "localhost"  # the server participant's name: nvflare binds localhost:<port> -> 127.0.0.1 only
ADMIN = "admin@flare-duallora.org"
VENDOR_SITES = ("site-siemens", "site-philips", "site-ge", "site-canon")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_project(sites: Sequence[str] = VENDOR_SITES, port: int = 8002, sharing: Optional[dict] = None,
                     privacy: bool = True, name: str = "flare_duallora_poc", allow_remote: bool = False,
                     site_policy: Optional[dict] = None) -> dict:
    """A POC ``project.yml`` (as a dict): the server on 127.0.0.1:``port`` unless ``allow_remote``, one client per
    site, the plugin's site configuration installed by :class:`SiteConfigBuilder` at provisioning."""
    org = "flare_duallora"
    participants = [{"name": "server" if allow_remote else SERVER, "type": "server", "org": org,
                     "fed_learn_port": int(port)}]
    participants += [{"name": s, "type": "client", "org": s.removeprefix("site-")} for s in sites]
    participants += [{"name": ADMIN, "type": "admin", "org": org, "role": "project_admin"}]
    builder_args = {"sharing": sharing, "privacy": privacy}
    if site_policy:
        builder_args["site_policy"] = site_policy
    builders = [
        {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
         "args": {"template_file": ["master_template.yml", "aws_template.yml", "azure_template.yml"]}},
        {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
        {"path": "flare_duallora.deploy.provision.SiteConfigBuilder", "args": builder_args},
        {"path": "nvflare.lighter.impl.cert.CertBuilder"},
        {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
    ]
    return {"api_version": 3, "name": name, "description": "flare_duallora POC on loopback",
            "participants": participants, "builders": builders}


def listening_addresses(pids: Sequence[int]) -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket the processes listen on (from ``/proc/net/tcp*``)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            out.append((_address(addr_hex, width), int(port_hex, 16)))
    return out


def _address(hex_addr: str, width: int) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_addr)
    if width == 8:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # IPv6: four little-endian 32-bit words
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


# ---------------------------------------------------------------------------------------------- results
@dataclass
class PocResult(RunOutputsView):
    job_id: str
    status: str
    outputs: RunOutputs
    result_dir: Optional[Path] = None
    failures: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED and self.outputs.completed

    def describe_failure(self) -> str:
        lines = [f"job {self.job_id} ended as {self.status}"]
        if self.outputs.status.get("reason"):
            lines.append(f"the run {self.outputs.status.get('status')}: {self.outputs.status['reason']}")
        lines += [f"  {site}: {cause}" for site, cause in sorted(self.failures.items())]
        return "\n".join(lines)


class LoopbackPocEnv(PocEnv):
    """``PocEnv`` on 127.0.0.1 with the plugin's site configuration, kept in ``workspace`` (see the module docstring).

    Args:
        workspace: the folder holding everything (POC workspace ``poc/``, ``project.yml``, ``results/``, ``home/``).
        clients: the site names.  ``port``: the server port (default: a free one).
        sharing: the sharing rule the sites' privacy scope enforces (``SharingPolicy.to_args()``); ``privacy=False``
            installs no scope.  ``allow_remote``: listen on all interfaces (a documented opt-in).
        timeout: seconds a job may run before it is aborted; ``log``: where progress lines go (None: quiet).
        keep_running: leave the POC running after :meth:`deploy` returns (stop it with :meth:`stop`).
    """

    def __init__(self, *, workspace: str | os.PathLike, clients: Sequence[str], port: Optional[int] = None,
                 sharing: Optional[dict] = None, privacy: bool = True, allow_remote: bool = False,
                 timeout: float = 900.0, log: Optional[Callable[[str], None]] = print, env: Optional[dict] = None,
                 site_policy: Optional[dict] = None):
        self.root = Path(workspace).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = int(port or free_port())
        self.site_policy = dict(site_policy or {})
        self.project = loopback_project(clients, self.port, sharing, privacy, allow_remote=allow_remote,
                                        site_policy=site_policy)
        self.project_file = self.root / "project.yml"
        self.project_file.write_text(yaml.safe_dump(self.project, sort_keys=False))
        self.timeout = timeout
        self.log = log
        self.run_env = dict(env or {})
        self.result: Optional[PocResult] = None
        with self.environment():
            super().__init__(clients=list(clients), project_conf_path=str(self.project_file), username=ADMIN)
        self.poc_workspace = str(self.root / "poc")

    # ------------------------------------------------------------------ site policy
    def allow_job_paths(self, bundles: Sequence[str] = (), data: Sequence[str] = ()) -> dict:
        """Let the POC's sites use these bundles and data paths (whoever runs a POC on one machine runs every
        site): merged into the site policy the provisioning builder writes, and into the kits already provisioned
        (a site reads its policy when a job starts).  Returns the policy."""
        from flare_duallora.deploy.site_config import job_site_policy
        from flare_duallora.flare.run_files import SITE_CONFIG_FILE

        new = job_site_policy(bundles, data)
        merged = dict(self.site_policy)
        for key in ("bundle_roots", "bundle_packages", "data_roots"):
            have = list(merged.get(key) or [])
            merged[key] = have + [v for v in new[key] if v not in have]
        self.site_policy = merged
        builder = next(b for b in self.project["builders"] if b["path"].endswith("SiteConfigBuilder"))
        builder.setdefault("args", {})["site_policy"] = merged
        self.project_file.write_text(yaml.safe_dump(self.project, sort_keys=False))
        for site in self.clients or []:
            local = self.prod_dir / site / "local"
            if local.is_dir():
                (local / SITE_CONFIG_FILE).write_text(json.dumps(merged, indent=2))
        return merged

    # ------------------------------------------------------------------ environment
    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """``NVFLARE_POC_WORKSPACE``, ``HOME`` (inside the workspace), the running interpreter first on ``PATH``
        (the startup scripts call ``python3``) for the POC commands and every process they start."""
        home = self.root / "home"
        home.mkdir(exist_ok=True)
        values = {"NVFLARE_POC_WORKSPACE": str(self.root / "poc"), "HOME": str(home),
                  "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
                  "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **self.run_env}
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @property
    def prod_dir(self) -> Path:
        return self.root / "poc" / self.project["name"] / "prod_00"

    @property
    def server_name(self) -> str:
        return next(p["name"] for p in self.project["participants"] if p["type"] == "server")

    @property
    def admin_kit(self) -> Path:
        return self.prod_dir / ADMIN

    def processes(self) -> dict[int, str]:
        return find_processes(self.root / "poc")

    # ------------------------------------------------------------------ running
    def deploy(self, job) -> str:
        """Provision, start, submit ``job`` (a FedJob), wait for it and read its results (:attr:`result`)."""
        with self.environment():
            job_id = super().deploy(job)
            self.result = self.follow(job_id)
        return job_id

    def run_job_folder(self, job_dir: str | os.PathLike) -> PocResult:
        """Provision and start the POC (as :meth:`deploy`), then submit an exported job folder and follow it."""
        from nvflare.recipe.poc_env import SERVICE_START_TIMEOUT, _start_poc, prepare_poc_provision

        from flare_duallora.deploy.site_config import job_folder_paths

        self.allow_job_paths(*job_folder_paths(job_dir, exclude=(job_dir, self.root / "poc")))
        with self.environment():
            if self._check_poc_running():
                PocEnv.stop(self, clean_up=True)
            prepare_poc_provision(clients=self.clients or [], number_of_clients=self.num_clients,
                                  workspace=self.poc_workspace, docker_image=None,
                                  project_conf_path=self.project_file, examples_dir=None)
            _start_poc(poc_workspace=self.poc_workspace, gpu_ids=self.gpu_ids, excluded=[self.username],
                       services_list=[])
            time.sleep(SERVICE_START_TIMEOUT)
            job_id = self.submit_folder(job_dir)
            self.result = self.follow(job_id)
        return self.result

    def _session(self):
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        return new_secure_session(ADMIN, str(self.admin_kit), timeout=30.0)

    def submit_folder(self, job_dir: str | os.PathLike) -> str:
        """Submit an exported job folder with the project admin's kit, as a production admin would."""
        session = self._session()
        try:
            return session.submit_job(os.path.abspath(job_dir))
        finally:
            session.close()

    def follow(self, job_id: str) -> PocResult:
        """Wait for a submitted job (progress lines to ``log``), download and read its results."""
        from nvflare.fuel.flare_api.api_spec import MonitorReturnCode

        progress = self.prod_dir / self.server_name / job_id / "progress.jsonl"
        shown = [0]
        n_sites = len(self.clients or [])

        def on_poll(session, jid, meta, *args, **kwargs) -> bool:
            if self.log and progress.is_file():
                rounds = read_jsonl(progress)
                for p in rounds[shown[0]:]:
                    self.log(format_round(p, n_sites))
                shown[0] = len(rounds)
            return True

        if self.log:
            self.log(f"POC job {job_id} on 127.0.0.1:{self.port}; follow the server log: "
                     f"{self.prod_dir / self.server_name / job_id / 'log.txt'}")
        session = self._session()
        try:
            rc = session.monitor_job(job_id, timeout=self.timeout, poll_interval=1.0, cb=on_poll)
            if rc == MonitorReturnCode.TIMEOUT:
                session.abort_job(job_id)
            meta = session.get_job_meta(job_id) or {}
            status = str(meta.get("status", "UNKNOWN"))
            if rc == MonitorReturnCode.TIMEOUT:
                status = f"TIMEOUT ({status})"
            result_dir = None
            if status.startswith("FINISHED"):
                dest = self.root / "results"
                dest.mkdir(exist_ok=True)
                downloaded = Path(session.download_job_result(job_id, str(dest)))
                result_dir = downloaded / "workspace" if (downloaded / "workspace").is_dir() else downloaded
        finally:
            session.close()
        on_poll(None, job_id, None)
        sites = {s: self.prod_dir / s / job_id for s in self.clients or []}
        outputs = read_run(result_dir, sites)
        result = PocResult(job_id, status, outputs, result_dir)
        if not result.ok:
            result.failures = diagnose_sites({s: self.prod_dir / s for s in sites}, outputs, job_id)
        return result

    def stop(self, clean_up: bool = False) -> None:
        """``PocEnv.stop`` (admin shutdown), then terminate any process of the workspace left, by PID."""
        with self.environment():
            try:
                super().stop(clean_up=False)
            except Exception as e:  # noqa: BLE001 - the kill below is the fallback
                if self.log:
                    self.log(f"warning: POC shutdown failed ({e}); terminating its processes by PID")
        if wait_gone(self.root / "poc", 10.0):
            kill_processes(self.root / "poc")
        if clean_up:
            import shutil

            shutil.rmtree(self.root / "poc", ignore_errors=True)
