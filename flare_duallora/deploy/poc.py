"""Run jobs in an nvflare POC (server and sites as separate local processes, real startup kits) through ``PocEnv``.

:class:`LoopbackPocEnv` is an nvflare ``PocEnv`` (``recipe.run(env)``) plus what ``PocEnv`` lacks:

* a ``project.yml`` whose server participant is named ``localhost``: nvflare then binds the FL/admin port to
  127.0.0.1 only (``allow_remote=True`` names the server ``server``, which listens on all interfaces);
* the plugin's site configuration in every kit, installed by the provisioning builder
  :class:`~flare_duallora.deploy.provision.SiteConfigBuilder` named in that ``project.yml``;
* everything inside one folder: the POC workspace (``NVFLARE_POC_WORKSPACE``), the project file, the downloaded
  results, and the ``HOME`` the POC processes see, so nothing is written into the user's home;
* any number of sites (``clients``; ``PocEnv`` alone accepts only its ``num_clients`` default of 2 with a list);
* a timeout, one progress line per round, a line while a job waits for sites, a verdict (:class:`PocResult`) naming each failed site's cause, and a
  stop that leaves no process: ``PocEnv.stop`` (admin shutdown), then SIGTERM / SIGKILL **by PID** for any process
  whose command line names the workspace (never by name).

:meth:`LoopbackPocEnv.run_job_folder` submits an exported job folder the same way (``flare-duallora poc run``),
after :func:`check_job_fits` refused a job that cannot start on the POC's sites.  :func:`follow_job` is the one
follower of a submitted job (POC and production); :func:`follow_production` follows a job of a provisioned
federation from an admin startup kit, reading the server's progress through the admin API
(``flare-duallora poc follow``).
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
from flare_duallora.flare.run_files import (
    PROGRESS_SNAPSHOT_FILE, RunOutputs, RunOutputsView, read_jsonl, read_run,
)

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
    live_rounds: int = 0  # rounds reported while the job ran (the rest from the downloaded result)

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
        clients = check_sites(clients)
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
            # num_clients must agree with the list (PocEnv's default of 2 refuses any other number of sites)
            super().__init__(num_clients=len(clients), clients=list(clients),
                             project_conf_path=str(self.project_file), username=ADMIN)
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
        """Provision, start, submit ``job`` (a FedJob), wait for it and read its results (:attr:`result`); a job
        that cannot start on the POC's sites is refused first (:func:`check_job_fits`)."""
        config = getattr(job, "job", None)
        sites = [t for t in getattr(job, "_deploy_map", {}) if t not in ("server", "@ALL")]
        check_fit(getattr(config, "min_clients", None), sites + list(getattr(config, "mandatory_clients", None) or []),
                  self.clients or [], f"job {job.name}", "min_clients")
        with self.environment():
            job_id = super().deploy(job)
            self.result = self.follow(job_id)
        return job_id

    def run_job_folder(self, job_dir: str | os.PathLike) -> PocResult:
        """Provision and start the POC (as :meth:`deploy`), then submit an exported job folder and follow it.
        A job that cannot start on this POC's sites (:func:`check_job_fits`) is refused before anything starts."""
        from nvflare.recipe.poc_env import SERVICE_START_TIMEOUT, _start_poc, prepare_poc_provision

        from flare_duallora.deploy.site_config import job_folder_paths

        check_job_fits(job_dir, self.clients or [])
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
        """Wait for a submitted job (progress and waiting lines to ``log``), download and read its results."""
        progress = self.prod_dir / self.server_name / job_id / "progress.jsonl"
        if self.log:
            self.log(f"POC job {job_id} on 127.0.0.1:{self.port}; follow the server log: "
                     f"{self.prod_dir / self.server_name / job_id / 'log.txt'}")
        session = self._session()
        try:
            status, result_dir, live = follow_job(session, job_id, self.root / "results", timeout=self.timeout,
                                            log=self.log, n_sites=len(self.clients or []),
                                            progress=lambda _session: read_jsonl(progress))
        finally:
            session.close()
        sites = {s: self.prod_dir / s / job_id for s in self.clients or []}
        outputs = read_run(result_dir, sites)
        result = PocResult(job_id, status, outputs, result_dir, live_rounds=live)
        if not result.ok:
            result.failures = diagnose_sites({s: self.prod_dir / s for s in sites}, outputs, job_id, result_dir)
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


# ---------------------------------------------------------------------------------------------- sites and jobs
def check_sites(clients: Sequence[str]) -> list[str]:
    """The POC's site names, checked: at least one, no duplicates, no empty name."""
    sites = [str(c).strip() for c in clients]
    if not sites or any(not c for c in sites):
        raise ValueError(f"option --clients: expected comma-separated site names, got {','.join(sites)!r}")
    dup = sorted({c for c in sites if sites.count(c) > 1})
    if dup:
        raise ValueError(f"option --clients: site names appear twice: {', '.join(dup)}")
    return sites


@dataclass
class JobSites:
    """What a job needs to start: ``min_clients`` sites, the ``named`` ones (deploy map, mandatory clients)."""

    meta_file: Path
    min_clients: Optional[int]
    named: list


def job_sites(job_dir: str | os.PathLike) -> JobSites:
    """The sites a job folder asks for, from its ``meta.json`` / ``meta.conf``."""
    from flare_duallora.deploy.job_configs import load_config

    job_dir = Path(job_dir)
    metas = [job_dir / n for n in ("meta.json", "meta.conf") if (job_dir / n).is_file()]
    if not metas:
        raise FileNotFoundError(f"{job_dir}: not a job folder (no meta.json or meta.conf)")
    meta = load_config(metas[0])
    named = []
    for targets in (meta.get("deploy_map") or {}).values():
        for t in targets if isinstance(targets, list) else []:
            t = t.get("sites", t) if isinstance(t, dict) else t
            for name in t if isinstance(t, list) else [t]:
                if isinstance(name, str) and name not in ("@ALL", "server") and name not in named:
                    named.append(name)
    for name in meta.get("mandatory_clients") or []:
        if name not in named:
            named.append(name)
    min_clients = meta.get("min_clients")
    return JobSites(metas[0], int(min_clients) if isinstance(min_clients, int) else None, named)


def sites_for_job(job_dir: str | os.PathLike) -> list[str]:
    """The POC sites a job folder runs on when none are given: the sites its deploy map names, else the first
    ``min_clients`` vendor sites."""
    need = job_sites(job_dir)
    if need.named:
        return need.named
    n = need.min_clients or len(VENDOR_SITES)
    if n > len(VENDOR_SITES):
        raise ValueError(f"{need.meta_file}: min_clients = {n} and no site names: give the sites with --clients")
    return list(VENDOR_SITES[:n])


def check_job_fits(job_dir: str | os.PathLike, clients: Sequence[str]) -> None:
    """Refuse (``ValueError``, one line naming both) a job that cannot start on ``clients``: it needs more sites
    than there are, or names sites the POC does not have. Otherwise FLARE would keep it waiting until the timeout."""
    need = job_sites(job_dir)
    check_fit(need.min_clients, need.named, clients, f"job {job_dir}", f"min_clients in {need.meta_file.name}")


def check_fit(min_clients: Optional[int], named: Sequence[str], clients: Sequence[str], job: str, where: str) -> None:
    have = f"the POC has {len(clients)}: {', '.join(clients)}"
    missing = [s for s in dict.fromkeys(named) if s not in clients]
    if missing:
        raise ValueError(f"{job} runs on sites {', '.join(missing)} but {have}")
    if isinstance(min_clients, int) and min_clients > len(clients):
        raise ValueError(f"{job} needs {min_clients} sites ({where}) but {have}")


# ---------------------------------------------------------------------------------------------- following a job
WAITING = ("SUBMITTED", "DISPATCHED")  # nvflare RunStatus values of a job not yet started on its sites
FIRST_WAIT_NOTICE = 5.0  # seconds a job waits for sites before it is said
WAIT_NOTICE_EVERY = 30.0


def waiting_line(min_sites: Optional[int], connected: Sequence[str]) -> str:
    need = f"{min_sites} sites" if min_sites else "sites"
    names = f": {', '.join(sorted(connected))}" if connected else ""
    return f"waiting for {need}, {len(connected)} connected{names}"


def remote_progress(session, job_id: str) -> list[dict]:
    """The server's progress entries of a running job, read through the admin API (``cat`` of the controller's
    ``progress.json`` on the server: what a production admin may do, wherever the server is; the admin ``cat``
    serves ``.json`` but not ``.jsonl``). Not readable (yet, or any more: the server removes a finished job's
    folder): ``[]``."""
    try:
        text = str(session.cat_target("server", file=f"{job_id}/{PROGRESS_SNAPSHOT_FILE}"))
    except Exception:  # noqa: BLE001 - not there yet, or not allowed: no progress lines
        return []
    start, end = text.find("["), text.rfind("]")
    try:
        entries = json.loads(text[start:end + 1]) if 0 <= start < end else []
    except json.JSONDecodeError:  # being rewritten right now
        return []
    return [e for e in entries if isinstance(e, dict) and "round" in e] if isinstance(entries, list) else []


def follow_job(session, job_id: str, results: str | os.PathLike, *, timeout: float,
               log: Optional[Callable[[str], None]], n_sites: int,
               progress: Optional[Callable[[object], list]] = None,
               abort_on_timeout: bool = True) -> tuple[str, Optional[Path], int]:
    """Wait for a submitted job: one line per completed round (``progress(session)``: the server's progress
    entries; default :func:`remote_progress`), a line while it waits for sites (:func:`waiting_line`); after
    ``timeout`` s abort it (``abort_on_timeout``; else only stop following). Then download its result into
    ``results``. Returns ``(status, server result folder or None, rounds reported while it ran)``."""
    from nvflare.fuel.flare_api.api_spec import MonitorReturnCode

    progress = progress or (lambda s: remote_progress(s, job_id))
    state = {"shown": 0, "waiting_since": None, "said": None, "said_at": 0.0}

    def show_rounds(s) -> None:
        rounds = progress(s)
        for p in rounds[state["shown"]:]:
            log(format_round(p, n_sites))
        state["shown"] = max(state["shown"], len(rounds))

    def on_poll(s, jid, meta, *args, **kwargs) -> bool:
        if not log:
            return True
        status = str((meta or {}).get("status", ""))
        now = time.monotonic()
        if status in WAITING:
            state["waiting_since"] = state["waiting_since"] or now
            if now - state["waiting_since"] >= FIRST_WAIT_NOTICE:
                try:
                    connected = [c.name for c in s.get_system_info().client_info]
                except Exception:  # noqa: BLE001 - the status is only informative
                    connected = []
                line = waiting_line(meta.get("min_clients"), connected)
                if line != state["said"] or now - state["said_at"] >= WAIT_NOTICE_EVERY:
                    log(line)
                    state["said"], state["said_at"] = line, now
        else:
            show_rounds(s)
        return True

    rc = session.monitor_job(job_id, timeout=timeout, poll_interval=1.0, cb=on_poll)
    if rc == MonitorReturnCode.TIMEOUT and abort_on_timeout:
        session.abort_job(job_id)
    meta = session.get_job_meta(job_id) or {}
    status = str(meta.get("status", "UNKNOWN"))
    if rc == MonitorReturnCode.TIMEOUT:
        status = f"TIMEOUT ({status})"
    result_dir, live = None, state["shown"]
    if status.startswith("FINISHED"):
        dest = Path(results)
        dest.mkdir(parents=True, exist_ok=True)
        downloaded = Path(session.download_job_result(job_id, str(dest)))
        result_dir = downloaded / "workspace" if (downloaded / "workspace").is_dir() else downloaded
        if log:  # rounds completed since the last poll, from the downloaded copy
            for p in read_jsonl(result_dir / "progress.jsonl")[state["shown"]:]:
                log(format_round(p, n_sites))
    return status, result_dir, live


def follow_production(admin_kit: str | os.PathLike, job_id: str, results: str | os.PathLike, *,
                      timeout: float = 3600.0, log: Optional[Callable[[str], None]] = print,
                      n_sites: Optional[int] = None, username: Optional[str] = None) -> PocResult:
    """Follow a job submitted to a provisioned federation (``ProdEnv``, ``nvflare job submit``) from an admin
    startup kit: progress through the admin API, the result downloaded into ``results`` and read back, failed
    sites with the server's causes; after ``timeout`` s it stops following (the job keeps running). ``username``: the kit's admin (default: the kit folder's name)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    kit = Path(admin_kit).resolve()
    session = new_secure_session(username or kit.name, str(kit), timeout=30.0)
    try:
        if n_sites is None:
            meta = session.get_job_meta(job_id) or {}
            n_sites = int(meta.get("min_clients") or 0)
        if log:
            log(f"job {job_id}: following it with the admin kit {kit}")
        status, result_dir, live = follow_job(session, job_id, results, timeout=timeout, log=log, n_sites=n_sites,
                                        abort_on_timeout=False)  # a production job is not ours to abort
    finally:
        session.close()
    outputs = read_run(result_dir)
    result = PocResult(job_id, status, outputs, result_dir, live_rounds=live)
    if not result.ok:
        result.failures = diagnose_sites({}, outputs, job_id, result_dir)  # result_dir: the server's job log
    return result
