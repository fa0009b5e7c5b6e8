"""Run this plugin's jobs in an nvflare POC (server and sites as separate local processes, real startup kits).

Steps, each a function and a sub-command of ``python -m flare_duallora.flare.poc`` (wrapped by
``poc_workspace/poc.sh``):

``prepare``  ``nvflare poc prepare -i project.yml --force`` (optionally fewer sites / another port), then the site
             configuration this plugin needs in every participant's ``local/``: ``resources.json`` with the
             ``flare_duallora.`` class allow-list entry and, on the sites, a ``privacy.json`` scope that installs
             :class:`~flare_duallora.flare.filters.PrivateKeyFilter` on every task result.
``start``    ``nvflare poc start`` (returns when every site is connected).
``submit``   FLARE API: ``new_secure_session`` -> ``submit_job`` -> ``monitor_job`` -> ``download_job_result``.
``stop``     ``nvflare poc stop``, then waits until no process of the workspace is left and terminates (then kills)
             any that is, by pid.
``run``      all of the above; the POC is stopped whatever happens (``try``/``finally``).

The workspace is ``$NVFLARE_POC_WORKSPACE`` (default ``poc_workspace/workspace`` of the source tree).  ``nvflare
poc prepare`` registers the admin startup kit in ``~/.nvflare/config.conf``; pass ``home`` to keep that out of the
real home folder (tests do).  POC listens on port 8002 (FL and admin traffic) unless ``port`` says otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import yaml

from flare_duallora.flare.simulate import nvflare_cli
from flare_duallora.flare.site_config import PACKAGE_PREFIX, install_site_config, privacy_config

COMPLETED = "FINISHED:COMPLETED"
DEFAULT_PORT = 8002
VENDOR_SITES = ("site-siemens", "site-philips", "site-ge", "site-canon")
PROCESS_MARK = "nvflare.private.fed.app."  # server_train, client_train, runner_process, worker_process
_REPO = Path(__file__).resolve().parents[2]

PathLike = Union[str, os.PathLike]


class PocError(RuntimeError):
    """A POC step failed (the message carries the command's output)."""


class JobFailed(PocError):
    """The job did not finish as ``FINISHED:COMPLETED``; ``result`` holds what it left."""

    def __init__(self, result: "JobResult"):
        super().__init__(f"job {result.job_id} ended as {result.status}")
        self.result = result


# ---------------------------------------------------------------------------------------------- project
def default_project_file() -> Optional[Path]:
    """``poc_workspace/project.yml`` of the source tree (one site per MRI vendor), if present."""
    path = _REPO / "poc_workspace" / "project.yml"
    return path if path.is_file() else None


def make_project(sites: Sequence[str] = VENDOR_SITES, port: int = DEFAULT_PORT,
                 name: str = "flare_duallora_cmr") -> dict:
    """The same project as ``poc_workspace/project.yml``, for an installed package without the source tree."""
    admin_org = "flare_duallora"
    participants = [{"name": "server", "type": "server", "org": admin_org, "fed_learn_port": port}]
    participants += [{"name": s, "type": "client", "org": s.removeprefix("site-")} for s in sites]
    participants += [
        {"name": "admin@flare-duallora.org", "type": "admin", "org": admin_org, "role": "project_admin"},
        {"name": "org-admin@flare-duallora.org", "type": "admin", "org": admin_org, "role": "org_admin"},
        {"name": "lead@flare-duallora.org", "type": "admin", "org": admin_org, "role": "lead"},
    ]
    builders = [
        {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
         "args": {"template_file": ["master_template.yml", "aws_template.yml", "azure_template.yml"]}},
        {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
        {"path": "nvflare.lighter.impl.cert.CertBuilder"},
        {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
    ]
    return {"api_version": 3, "name": name, "description": "flare_duallora POC", "participants": participants,
            "builders": builders}


def load_project(project: Union[None, PathLike, Mapping] = None) -> dict:
    if isinstance(project, Mapping):
        return copy.deepcopy(dict(project))
    path = Path(project) if project else default_project_file()
    if path is None:
        return make_project()
    with open(path) as f:
        return yaml.safe_load(f)


def derive_project(project: Union[None, PathLike, Mapping] = None, sites: Optional[Sequence[str]] = None,
                   port: Optional[int] = None) -> dict:
    """A copy of ``project`` with only ``sites`` as clients (in that order) and the server on ``port``."""
    config = load_project(project)
    participants = config["participants"]
    clients = [p["name"] for p in participants if p["type"] == "client"]
    if sites is not None:
        unknown = [s for s in sites if s not in clients]
        if unknown:
            raise ValueError(f"sites {unknown} are not in the project (its sites: {clients})")
        keep = set(sites)
        config["participants"] = [p for p in participants if p["type"] != "client" or p["name"] in keep]
    if port is not None:
        for p in config["participants"]:
            if p["type"] == "server":
                p["fed_learn_port"] = int(port)
                p.pop("admin_port", None)  # one port for FL and admin traffic (nvflare 2.9 default)
    return config


def default_workspace() -> Path:
    env = os.environ.get("NVFLARE_POC_WORKSPACE")
    if env:
        return Path(env)
    if (_REPO / "poc_workspace").is_dir():
        return _REPO / "poc_workspace" / "workspace"
    return Path(tempfile.gettempdir()) / "flare_duallora_poc"


# ---------------------------------------------------------------------------------------------- POC handle
@dataclass
class Poc:
    """A prepared POC workspace: its participants, startup kits and the environment its commands run in."""

    workspace: Path
    project_name: str
    server: str
    clients: list[str]
    admin: str
    env: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_project(cls, workspace: PathLike, project: Mapping, env: Optional[Mapping[str, str]] = None) -> "Poc":
        parts = project["participants"]
        admins = [p["name"] for p in parts if p["type"] == "admin" and p.get("role") == "project_admin"]
        return cls(
            workspace=Path(os.path.abspath(workspace)),
            project_name=project["name"],
            server=next(p["name"] for p in parts if p["type"] == "server"),
            clients=[p["name"] for p in parts if p["type"] == "client"],
            admin=admins[0],
            env=dict(env or poc_env(workspace)),
        )

    @classmethod
    def load(cls, workspace: Optional[PathLike] = None, home: Optional[PathLike] = None) -> "Poc":
        """The POC prepared earlier in ``workspace`` (its ``project.yml`` names the participants)."""
        workspace = Path(workspace) if workspace else default_workspace()
        project_file = workspace / "project.yml"
        if not project_file.is_file():
            raise PocError(f"no POC prepared in {workspace} (no project.yml); run 'prepare' first")
        with open(project_file) as f:
            return cls.from_project(workspace, yaml.safe_load(f), poc_env(workspace, home))

    @property
    def prod_dir(self) -> Path:
        return self.workspace / self.project_name / "prod_00"

    def kit(self, participant: str) -> Path:
        """A participant's startup kit / workspace folder (``startup/``, ``local/``, job run folders)."""
        return self.prod_dir / participant

    @property
    def admin_kit(self) -> Path:
        return self.kit(self.admin)

    @property
    def participants(self) -> list[str]:
        return [self.server] + list(self.clients)

    def processes(self) -> dict[int, str]:
        """Live FLARE processes of this workspace (server, sites and their job processes): ``{pid: cmdline}``."""
        return find_processes(self.workspace)

    def log(self, participant: str, job_id: Optional[str] = None) -> str:
        """A participant's log (``log.txt``; of a job's run folder when ``job_id`` is given), empty if none."""
        base = self.kit(participant) / job_id if job_id else self.kit(participant)
        texts = []
        for name in ("log.txt", "error_log.txt"):
            path = base / name
            if path.is_file():
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)


def poc_env(workspace: PathLike, home: Optional[PathLike] = None,
            extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Environment of the ``nvflare poc`` commands and, through them, of every POC process.

    The running interpreter's ``bin/`` goes first on ``PATH``: the startup scripts call ``python3``, which must be
    the environment where ``flare_duallora`` is installed.
    """
    env = dict(os.environ)
    env["NVFLARE_POC_WORKSPACE"] = os.path.abspath(workspace)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if home is not None:
        Path(home).mkdir(parents=True, exist_ok=True)
        env["HOME"] = os.path.abspath(home)
    env.update(extra or {})
    return env


def _run(cmd: list[str], env: Mapping[str, str], timeout: float, what: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env), timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise PocError(f"{what}: '{' '.join(cmd)}' did not finish in {timeout:.0f} s\n{out[-3000:]}") from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise PocError(f"{what}: '{' '.join(cmd)}' failed (rc={proc.returncode})\n{output[-3000:]}")
    return output


# ---------------------------------------------------------------------------------------------- processes
def find_processes(workspace: PathLike) -> dict[int, str]:
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


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(workspace: PathLike, timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    left = find_processes(workspace)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = find_processes(workspace)
    return left


def kill_processes(workspace: PathLike, grace: float = 5.0) -> list[int]:
    """SIGTERM every FLARE process of ``workspace``, SIGKILL what is left after ``grace`` s; the pids signalled."""
    left = find_processes(workspace)
    if not left:
        return []
    pids = sorted(left)
    _signal_all(pids, signal.SIGTERM)
    left = _wait_gone(workspace, grace)
    if left:
        _signal_all(sorted(left), signal.SIGKILL)
        _wait_gone(workspace, grace)
    return pids


# ---------------------------------------------------------------------------------------------- steps
def prepare(
    workspace: Optional[PathLike] = None,
    project: Union[None, PathLike, Mapping] = None,
    sites: Optional[Sequence[str]] = None,
    port: Optional[int] = None,
    home: Optional[PathLike] = None,
    site_config: bool = True,
    method: str = "duallora",
    head: Union[None, str, Sequence[str]] = "vit.classification_head",
    privacy: bool = True,
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 120.0,
) -> Poc:
    """``nvflare poc prepare -i <project> --force`` and (``site_config``) :func:`install_config`.

    ``sites`` keeps only those clients of the project; ``port`` moves the server off 8002.  A POC still running in
    ``workspace`` is stopped first; the workspace is deleted and recreated (a non-empty folder that holds no POC
    is refused).
    """
    workspace = Path(os.path.abspath(workspace or default_workspace()))
    config = derive_project(project, sites, port)
    run_env = poc_env(workspace, home, env)
    if workspace.exists() and any(workspace.iterdir()) and not (workspace / "project.yml").is_file():
        raise PocError(f"{workspace} is not empty and holds no POC (no project.yml): refusing to let "
                       f"'nvflare poc prepare --force' delete it; choose another workspace")
    if workspace.exists():
        stop(Poc.from_project(workspace, config, run_env), quiet=True)
    with tempfile.TemporaryDirectory() as tmp:  # nvflare refuses a project file inside the workspace it deletes
        project_file = Path(tmp) / "project.yml"
        project_file.write_text(yaml.safe_dump(config, sort_keys=False))
        _run(nvflare_cli() + ["poc", "prepare", "-i", str(project_file), "--force"], run_env, timeout,
             "poc prepare")
    poc = Poc.from_project(workspace, config, run_env)
    if not poc.admin_kit.is_dir():
        raise PocError(f"poc prepare wrote no admin startup kit at {poc.admin_kit}")
    if site_config:
        install_config(poc, method=method, head=head, privacy=privacy)
    return poc


def install_config(
    poc: Poc,
    method: str = "duallora",
    head: Union[None, str, Sequence[str]] = "vit.classification_head",
    privacy: bool = True,
    participants: Optional[Sequence[str]] = None,
    on_private: str = "strip",
) -> list[Path]:
    """The allow-list entry on the server and every site, and the privacy scope on every site.

    The scope's filter uses the sharing rule of ``method`` / ``head``: a site enforces it on every job, whatever
    the job configures (jobs of another method need a scope of their own).  The POC processes re-read
    ``resources.json`` for every job: no restart needed.
    """
    written = []
    scope = privacy_config(method, head, on_private=on_private) if privacy else None
    for name in participants or poc.participants:
        written += install_site_config(poc.kit(name) / "local", privacy=None if name == poc.server else scope)
    return written


def remove_allow_list(poc: Poc, participant: str) -> Path:
    """Take the ``flare_duallora.`` entry out of a participant's ``resources.json`` (to show the error it causes)."""
    path = poc.kit(participant) / "local" / "resources.json"
    config = json.loads(path.read_text())
    config["class_allow_list"] = [c for c in config.get("class_allow_list", []) if not c.startswith(PACKAGE_PREFIX)]
    path.write_text(json.dumps(config, indent=2))
    return path


def start(poc: Poc, timeout: float = 60.0) -> str:
    """``nvflare poc start``: server and sites, returning once every site is connected (``timeout`` s at most)."""
    return _run(nvflare_cli() + ["poc", "start", "--timeout", str(int(timeout))], poc.env, timeout + 60, "poc start")


def stop(poc: Poc, timeout: float = 60.0, grace: float = 5.0, quiet: bool = False) -> list[int]:
    """``nvflare poc stop``, then make sure no process of the workspace is left: wait ``grace`` s, then SIGTERM and
    SIGKILL the rest by pid.  Never raises for a failed ``poc stop`` (the kill is the fallback); returns the pids
    that had to be signalled.

    (A server job process whose job was aborted by ``poc stop`` can outlive the server by 20 s or more; it is
    terminated here.)"""
    if not poc.processes():
        return []
    try:
        _run(nvflare_cli() + ["poc", "stop"], poc.env, timeout, "poc stop")
    except PocError as e:
        if not quiet:
            print(f"warning: {e}; terminating the processes by pid", file=sys.stderr)
    if not _wait_gone(poc.workspace, grace):
        return []
    return kill_processes(poc.workspace)


@contextmanager
def running(poc: Poc, timeout: float = 60.0) -> Iterator[Poc]:
    """``with running(poc): ...``: started on entry, stopped (every process) on exit, also on errors."""
    try:
        start(poc, timeout)
        yield poc
    finally:
        stop(poc)


# ---------------------------------------------------------------------------------------------- jobs
@dataclass
class JobResult:
    """What a POC job left: its final status and meta, and the server's downloaded run folder."""

    job_id: str
    status: str
    meta: dict = field(default_factory=dict, repr=False)
    result_dir: Optional[Path] = None  # the server's run workspace (site_results.json, FL_global_model.pt, ...)
    poc: Optional[Poc] = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED

    def _file(self, name: str) -> Optional[Path]:
        if self.result_dir is None:
            return None
        path = self.result_dir / name
        return path if path.is_file() else None

    @property
    def site_results(self) -> dict:
        path = self._file("site_results.json")
        return json.loads(path.read_text()) if path else {}

    @property
    def communication(self) -> list:
        path = self._file("communication.json")
        return json.loads(path.read_text()) if path else []

    @property
    def received(self) -> list[dict]:
        path = self._file("received_keys.jsonl")
        if not path:
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def global_model(self) -> dict:
        path = self._file("FL_global_model.pt")
        if not path:
            return {}
        import torch

        return torch.load(path, map_location="cpu")

    def site_log(self, site: str) -> str:
        """The site's log of this job (its run folder stays in the site's workspace)."""
        return self.poc.log(site, self.job_id) if self.poc else ""


def submit(
    poc: Poc,
    job_dir: PathLike,
    timeout: float = 600.0,
    download_dir: Optional[PathLike] = None,
    poll_interval: float = 1.0,
    cb: Optional[Callable[..., bool]] = None,
) -> JobResult:
    """Submit ``job_dir`` with the project admin's kit (FLARE API), wait for it to finish, download its results.

    A job still running after ``timeout`` s is aborted.  ``cb(session, job_id, job_meta)`` is called at every poll
    (FLARE API ``monitor_job``; returning False stops monitoring).  Results go to
    ``<download_dir or workspace/results>/<job id>/workspace``.
    """
    from nvflare.fuel.flare_api.api_spec import MonitorReturnCode
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    session = new_secure_session(poc.admin, str(poc.admin_kit), timeout=30.0)
    try:
        job_id = session.submit_job(os.path.abspath(job_dir))
        rc = session.monitor_job(job_id, timeout=timeout, poll_interval=poll_interval,
                                 cb=(lambda s, j, m, *a: cb(s, j, m)) if cb else None)
        if rc == MonitorReturnCode.TIMEOUT:
            session.abort_job(job_id)
        meta = session.get_job_meta(job_id) or {}
        status = str(meta.get("status", "UNKNOWN"))
        if rc == MonitorReturnCode.TIMEOUT:
            status = f"TIMEOUT ({status})"
        result_dir = None
        if status.startswith("FINISHED"):
            dest = Path(download_dir or poc.workspace / "results")
            dest.mkdir(parents=True, exist_ok=True)
            downloaded = Path(session.download_job_result(job_id, str(dest)))
            result_dir = downloaded / "workspace" if (downloaded / "workspace").is_dir() else downloaded
        return JobResult(job_id, status, meta, result_dir, poc)
    finally:
        session.close()


def run_job(
    job_dir: PathLike,
    workspace: Optional[PathLike] = None,
    sites: Optional[Sequence[str]] = None,
    project: Union[None, PathLike, Mapping] = None,
    port: Optional[int] = None,
    home: Optional[PathLike] = None,
    method: str = "duallora",
    head: Union[None, str, Sequence[str]] = "vit.classification_head",
    privacy: bool = True,
    timeout: float = 600.0,
    download_dir: Optional[PathLike] = None,
    env: Optional[Mapping[str, str]] = None,
    check: bool = True,
    configure: Optional[Callable[[Poc], Any]] = None,
    cb: Optional[Callable[..., bool]] = None,
) -> JobResult:
    """Prepare a fresh POC, install the site configuration, start it, run one job, stop it (always).

    ``configure(poc)`` runs after the site configuration is installed, before the start (e.g. to put datalists in
    the sites' ``local/``); ``cb`` is :func:`submit`'s monitor callback.  Raises :class:`JobFailed` (after the POC
    is stopped) when ``check`` and the job did not complete.
    """
    poc = prepare(workspace, project, sites, port, home, method=method, head=head, privacy=privacy, env=env)
    if configure is not None:
        configure(poc)
    with running(poc):
        result = submit(poc, job_dir, timeout=timeout, download_dir=download_dir, cb=cb)
    if check and not result.ok:
        raise JobFailed(result)
    return result


# ---------------------------------------------------------------------------------------------- CLI
def _summary(result: JobResult) -> dict:
    """Status, where the results are, and the headline metrics of every site's final validation."""
    from flare_duallora.metrics import HEADLINE

    sites = {site: {kind: {k: m[k] for k in HEADLINE if k in m} for kind, m in kinds.items()}
             for site, kinds in result.site_results.items()}
    return {"job_id": result.job_id, "status": result.status,
            "result_dir": str(result.result_dir) if result.result_dir else None, "site_results": sites}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flare_duallora.flare.poc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", help="POC workspace (default: $NVFLARE_POC_WORKSPACE or poc_workspace/workspace)")
    p.add_argument("--home", help="HOME for the nvflare commands (keeps ~/.nvflare untouched)")
    sub = p.add_subparsers(dest="command", required=True)

    def setup_args(sp):
        sp.add_argument("--project", help="project.yml (default: poc_workspace/project.yml)")
        sp.add_argument("--sites", help="comma-separated subset of the project's sites")
        sp.add_argument("--port", type=int, help=f"server port (default: the project's, {DEFAULT_PORT})")
        sp.add_argument("--method", default="duallora", help="sharing rule of the sites' privacy scope")
        sp.add_argument("--head", default="vit.classification_head", help="head module of the privacy scope")
        sp.add_argument("--no-privacy", action="store_true", help="no privacy.json scope on the sites")

    setup_args(sub.add_parser("prepare", help="nvflare poc prepare + allow-list + privacy scope"))
    sub.add_parser("start", help="nvflare poc start")
    s = sub.add_parser("submit", help="submit a job, wait for it, download its results")
    s.add_argument("job")
    s.add_argument("--timeout", type=float, default=600.0)
    s.add_argument("--download", help="download folder (default: <workspace>/results)")
    sub.add_parser("stop", help="nvflare poc stop, then terminate any leftover process by pid")
    sub.add_parser("status", help="list the POC's processes")
    r = sub.add_parser("run", help="prepare + start + submit + stop (always stopped)")
    r.add_argument("job")
    r.add_argument("--timeout", type=float, default=600.0)
    r.add_argument("--download")
    setup_args(r)
    args = p.parse_args(argv)

    sites = args.sites.split(",") if getattr(args, "sites", None) else None
    try:
        if args.command == "prepare":
            poc = prepare(args.workspace, args.project, sites, args.port, args.home, method=args.method,
                          head=args.head, privacy=not args.no_privacy)
            print(json.dumps({"workspace": str(poc.workspace), "server": poc.server, "sites": poc.clients,
                              "admin_kit": str(poc.admin_kit)}, indent=1))
        elif args.command == "start":
            print(start(Poc.load(args.workspace, args.home)))
        elif args.command == "submit":
            result = submit(Poc.load(args.workspace, args.home), args.job, args.timeout, args.download)
            print(json.dumps(_summary(result), indent=1))
            return 0 if result.ok else 1
        elif args.command == "stop":
            killed = stop(Poc.load(args.workspace, args.home))
            print(f"POC stopped{'; terminated leftover pids ' + str(killed) if killed else ''}")
        elif args.command == "status":
            procs = Poc.load(args.workspace, args.home).processes()
            print("\n".join(f"{pid} {cmd}" for pid, cmd in sorted(procs.items())) or "no POC process running")
        elif args.command == "run":
            result = run_job(args.job, args.workspace, sites, args.project, args.port, args.home,
                             method=args.method, head=args.head, privacy=not args.no_privacy, timeout=args.timeout,
                             download_dir=args.download, check=False)
            print(json.dumps(_summary(result), indent=1))
            return 0 if result.ok else 1
    except PocError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
