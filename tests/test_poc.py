"""A real nvflare POC (server + 2 vendor sites as separate processes, real startup kits) running a template job.

Budget (2 CPU cores): job creation ~8 s; the end-to-end session ~40 s (prepare 1 s, start 10 s, a 1-round job ~20 s,
stop 7 s); the allow-list + driver-failure session ~30 s (the job fails on one site within ~5 s; stopping a POC
with a job still running leaves the server's job process behind, which ``stop`` terminates by pid).
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import CMR_BUNDLE, TINY_CMR, write_random_cmr_site
from flare_duallora.flare import poc as P
from flare_duallora.flare.site_config import PACKAGE_PREFIX, SCOPE_NAME
from flare_duallora.flare.templates import create_job_from_template

SITES = ["site-siemens", "site-philips"]  # two of the repo project's vendor sites
ENV = {"OMP_NUM_THREADS": "1"}  # three processes share 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pgrep(workspace: Path) -> list[str]:
    """Independent check (not the module's /proc scan): ``pgrep -af`` for FLARE processes of this workspace."""
    out = subprocess.run(["pgrep", "-af", "nvflare.private.fed.app"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(workspace) in line]


@pytest.fixture
def workspace(tmp_path):
    """A POC workspace whose processes are killed (by pid) whatever the test did: no test leaves any behind."""
    ws = tmp_path / "poc"
    yield ws
    P.kill_processes(ws)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"  # nvflare poc prepare registers kits in ~/.nvflare/config.conf


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory) -> Path:
    """The CMR template with tiny settings; ``datalist_dir`` keeps its default, ``{WORKSPACE}/local/datalists``."""
    root = tmp_path_factory.mktemp("poc_job")
    home = root / "home"
    home.mkdir()
    return create_job_from_template(
        "duallora_cmr3d", root / "jobs" / "cmr_tiny",
        {"bundle_root": str(CMR_BUNDLE), "bundle_overrides": TINY_CMR, "num_rounds": 1, "rank": 4, "device": "cpu",
         "min_clients": len(SITES)},
        env={"HOME": str(home)},
    )


def put_site_data(poc: P.Poc) -> None:
    for i, site in enumerate(poc.clients):
        folder = poc.kit(site) / "local" / "datalists"
        folder.mkdir(parents=True, exist_ok=True)
        write_random_cmr_site(folder, site, n=6, n_val=2, seed=i)


def no_private(keys) -> bool:
    return not any(".local." in k or ".base_layer." in k for k in keys)


def test_project_yml_has_one_site_per_vendor():
    project = P.load_project()
    clients = [p["name"] for p in project["participants"] if p["type"] == "client"]
    assert clients == list(P.VENDOR_SITES)
    assert project["api_version"] == 3
    server = next(p for p in project["participants"] if p["type"] == "server")
    assert server["fed_learn_port"] == P.DEFAULT_PORT
    assert [p["role"] for p in project["participants"] if p["type"] == "admin"][0] == "project_admin"
    derived = P.derive_project(sites=SITES, port=9123)
    assert [p["name"] for p in derived["participants"] if p["type"] == "client"] == SITES
    assert next(p for p in derived["participants"] if p["type"] == "server")["fed_learn_port"] == 9123
    with pytest.raises(ValueError, match="not in the project"):
        P.derive_project(sites=["site-nowhere"])


@pytest.mark.slow
def test_poc_runs_the_template_job_keeps_private_keys_home_and_stops(workspace, home, tiny_job):
    poc = P.prepare(workspace, sites=SITES, port=free_port(), home=home, env=ENV)
    assert poc.clients == SITES and poc.admin_kit.is_dir()
    for name in poc.participants:  # the site configuration this plugin needs
        local = poc.kit(name) / "local"
        assert PACKAGE_PREFIX in json.loads((local / "resources.json").read_text())["class_allow_list"]
    for site in SITES:
        privacy = json.loads((poc.kit(site) / "local" / "privacy.json").read_text())
        assert privacy["default_scope"] == SCOPE_NAME
    assert not (poc.kit(poc.server) / "local" / "privacy.json").exists()
    put_site_data(poc)

    with P.running(poc):
        assert len(poc.processes()) == 1 + len(SITES)
        result = P.submit(poc, tiny_job, timeout=240)
    assert not poc.processes() and not pgrep(workspace)

    assert result.ok, (result.status, result.site_log("site-siemens")[-3000:])
    assert not result.meta.get("byoc")  # a plain job: the classes come from the installed package
    assert set(result.site_results) == set(SITES)
    for site in SITES:
        assert {"personalised", "global_only"} <= set(result.site_results[site])
    global_model = result.global_model  # the server's stored global model (downloaded run folder)
    assert global_model and no_private(global_model)
    assert all(".lora_" in k or "classification_head" in k for k in global_model)
    weights = [e for e in result.received if e["kind"] == "WEIGHTS"]
    assert len(weights) == len(SITES) and all(no_private(e["keys"]) for e in weights)


@pytest.mark.slow
def test_site_without_allow_list_refuses_the_job_and_a_driver_failure_still_stops_everything(
        workspace, home, tiny_job):
    """site-philips lacks the ``flare_duallora.`` entry: its job process fails with ``not in allow_list``.  The
    driver then fails (simulated) while the job's other processes still run: ``run_job`` must stop them all."""
    seen = {}

    def configure(poc):
        put_site_data(poc)
        P.remove_allow_list(poc, "site-philips")

    def crash(session, job_id, meta):
        log = P.Poc.load(workspace, home).log("site-philips", job_id)
        if "not in allow_list" in log:
            seen.update(log=log, procs=P.find_processes(workspace))
            raise RuntimeError("simulated driver failure")
        return True

    with pytest.raises(RuntimeError, match="simulated driver failure"):
        P.run_job(tiny_job, workspace, sites=SITES, port=free_port(), home=home, env=ENV, timeout=120,
                  configure=configure, cb=crash)
    assert not P.find_processes(workspace) and not pgrep(workspace)
    assert "ComponentNotAuthorized" in seen["log"]
    assert "'flare_duallora.flare.executor.DualLoRAExecutor'" in seen["log"]
    assert any("runner_process" in c or "worker_process" in c for c in seen["procs"].values())  # a job was running


def test_run_job_stops_the_poc_before_reporting_a_failed_job(monkeypatch, tmp_path):
    """Without a POC: the order of the steps when the job ends as FINISHED:ABNORMAL."""
    calls = []
    poc = P.Poc(tmp_path, "p", "server", SITES, "admin@x")
    monkeypatch.setattr(P, "prepare", lambda *a, **k: calls.append("prepare") or poc)
    monkeypatch.setattr(P, "start", lambda *a, **k: calls.append("start"))
    monkeypatch.setattr(P, "stop", lambda *a, **k: calls.append("stop") or [])
    monkeypatch.setattr(P, "submit", lambda *a, **k: calls.append("submit") or P.JobResult("j1", "FINISHED:ABNORMAL"))
    with pytest.raises(P.JobFailed, match="j1 ended as FINISHED:ABNORMAL") as e:
        P.run_job(tmp_path / "job", tmp_path / "ws", configure=lambda p: calls.append("configure"))
    assert calls == ["prepare", "configure", "start", "submit", "stop"]
    assert e.value.result.job_id == "j1"
    calls.clear()
    monkeypatch.setattr(P, "submit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        P.run_job(tmp_path / "job", tmp_path / "ws")
    assert calls == ["prepare", "start", "stop"]


def test_prepare_refuses_to_wipe_a_folder_that_is_not_a_poc(tmp_path):
    keep = tmp_path / "important"
    keep.mkdir()
    (keep / "data.txt").write_text("x")
    with pytest.raises(P.PocError, match="refusing"):
        P.prepare(keep, home=tmp_path / "home")
    assert (keep / "data.txt").is_file()
