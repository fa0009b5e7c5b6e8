"""A real nvflare POC through ``PocEnv`` (server and the 4 vendor sites as separate processes, real startup kits) on
127.0.0.1, with the plugin's site configuration provisioned by the project's builder; ``poc run`` refusing a job
that cannot start, and stopping on Ctrl-C.  (The same jobs submitted with ProdEnv / ``nvflare job submit`` to
provisioned kits: tests/test_provision.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe, write_random_cmr_site
from flare_duallora.deploy.poc import (
    SERVER, VENDOR_SITES, LoopbackPocEnv, check_job_fits, find_processes, listening_addresses, loopback_project,
    sites_for_job,
)
from flare_duallora.deploy.processes import stop_process_tree
from flare_duallora.deploy.report import results_table
from flare_duallora.deploy.site_config import RUNTIME_CLASSES, SCOPE_NAME

SITES = ["site-siemens", "site-philips"]
POC_DIR = Path(__file__).resolve().parents[1] / "poc_workspace"


def pgrep(workspace: Path) -> list[str]:
    """Independent check (not the module's /proc scan): ``pgrep -af`` for FLARE processes of this workspace."""
    out = subprocess.run(["pgrep", "-af", "nvflare.private.fed.app"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(workspace) in line]


def no_private(keys) -> bool:
    return not any(".local." in k or ".base_layer." in k for k in keys)


def test_the_poc_project_is_on_loopback_with_one_site_per_vendor_and_the_plugin_builder():
    project = yaml.safe_load((POC_DIR / "project.yml").read_text())
    assert project == loopback_project(VENDOR_SITES, 8002, {"method": "duallora", "head": ["vit.classification_head"]},
                                       name="flare_duallora_cmr")
    server = next(p for p in project["participants"] if p["type"] == "server")
    assert server["name"] == SERVER == "localhost"
    builders = [b["path"] for b in project["builders"]]
    assert builders.index("flare_duallora.deploy.provision.SiteConfigBuilder") == \
        builders.index("nvflare.lighter.impl.static_file.StaticFileBuilder") + 1
    remote = loopback_project(SITES, 9000, allow_remote=True)
    assert next(p for p in remote["participants"] if p["type"] == "server")["name"] == "server"


def four_vendor_sites(root: Path) -> Path:
    """A datalist per vendor site (<site>.json), 4 subjects each: the tiniest job that trains and validates."""
    root.mkdir(parents=True, exist_ok=True)
    for i, site in enumerate(VENDOR_SITES):
        write_random_cmr_site(root, site, n=4, n_val=2, seed=i)
    return root


@pytest.mark.slow
def test_a_4_site_poc_runs_a_tiny_job_says_when_a_job_waits_for_sites_and_names_a_failing_site(tmp_path, monkeypatch):
    """One POC of the 4 vendor sites serves: a completed job (progress lines, per-site results of every site, no
    private key at the server), a job that waits for a 5th site (the waiting line, then aborted at its timeout), and a
    job whose site-philips datalist is missing (failed, naming that site); loopback only, nothing in HOME, no
    process left."""
    home = tmp_path / "user_home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    root = tmp_path / "poc"
    data = four_vendor_sites(tmp_path / "data")
    sites = list(VENDOR_SITES)
    recipe = tiny_recipe(data, sites, name="poc_job", rounds=1, target="poc")
    lines: list[str] = []
    env = LoopbackPocEnv(workspace=root, clients=sites, sharing=recipe.sharing, log=lines.append, timeout=300)
    seen: dict = {"addresses": set()}
    stop = threading.Event()

    def watch_sockets():
        while not stop.is_set():
            pids = list(env.processes())
            seen["addresses"].update(listening_addresses(pids))
            seen["n"] = max(seen.get("n", 0), len(pids))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch_sockets, daemon=True)
    try:
        watcher.start()
        recipe.run(env)  # PocEnv: provision (with the builder), start, submit, then follow the job
        first = env.result
        # the same job asking for a 5th site waits: the follower says so, and aborts it at its timeout
        recipe.export(str(tmp_path / "jobs"))
        job = tmp_path / "jobs" / "poc_job"
        meta = json.loads((job / "meta.json").read_text())
        (job / "meta.json").write_text(json.dumps({**meta, "min_clients": 5}))
        env.timeout = 9
        waiting_start = len(lines)
        waiting = env.follow(env.submit_folder(job))
        waiting_lines = lines[waiting_start:]
        # and with site-philips' datalist gone, the job fails naming that site
        (job / "meta.json").write_text(json.dumps(meta))
        (data / "site-philips.json").rename(data / "moved.json")
        env.timeout = 300
        third = env.follow(env.submit_folder(job))
    finally:
        stop.set()
        watcher.join(5)
        env.stop()
    assert not env.processes() and not pgrep(root)

    # loopback only: every listening socket of every POC process (server, sites, job processes) is on 127.0.0.1
    assert seen["n"] >= 1 + len(sites) and seen["addresses"]
    assert {addr for addr, _ in seen["addresses"]} <= {"127.0.0.1", "::1"}, seen["addresses"]
    assert (env.port in {port for _, port in seen["addresses"]})
    # nothing in the user's home
    assert not any(home.iterdir())
    # the builder installed the site configuration in every kit
    for name in [SERVER, *sites]:
        local = env.prod_dir / name / "local"
        assert set(RUNTIME_CLASSES) <= set(json.loads((local / "resources.json").read_text())["class_allow_list"])
    assert json.loads((env.prod_dir / sites[0] / "local" / "privacy.json").read_text())["default_scope"] == SCOPE_NAME

    assert first.ok, first.describe_failure()
    assert set(first.site_results) == set(sites)
    assert first.global_model and no_private(first.global_model)
    weights = [e for e in first.received if e["kind"] == "WEIGHTS"]  # the initial state and 1 round
    assert len([e for e in weights if e["task"] == "train"]) == len(sites)
    assert all(no_private(e["keys"]) for e in weights)
    assert "round 1/1: 4/4 sites answered (4 accepted)" in "\n".join(lines), lines
    table = results_table(first.site_results)
    assert {row.split("|")[1].strip() for row in table.splitlines() if row.startswith("| site-")} == set(sites)

    assert not waiting.ok and waiting.status.startswith("TIMEOUT")
    assert "waiting for 5 sites, 4 connected: site-canon, site-ge, site-philips, site-siemens" in waiting_lines, lines

    assert not third.ok
    assert "site-philips" in third.failures and "site-philips.json" in third.failures["site-philips"], third.failures
    assert "site-siemens" not in third.failures


def test_a_job_that_cannot_start_on_the_poc_sites_is_refused_before_anything_starts(tmp_path, capsys):
    """``poc run`` compares the job's min_clients and site names with the POC's sites: one line naming both, exit 2,
    no POC started. Without --clients the sites come from the job."""
    from flare_duallora.cli import main

    recipe = tiny_recipe(None, VENDOR_SITES, name="four", rounds=1, target="poc")
    recipe.export(str(tmp_path / "jobs"))
    job = tmp_path / "jobs" / "four"
    ws = tmp_path / "ws"
    assert main(["poc", "run", str(job), "--clients", "site-siemens,site-philips", "--workspace", str(ws)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "needs 4 sites (min_clients in meta.json)" in line and "the POC has 2: site-siemens, site-philips" in line
    assert not ws.exists()
    assert sites_for_job(job) == list(VENDOR_SITES)
    check_job_fits(job, VENDOR_SITES)  # fits: no error
    meta = json.loads((job / "meta.json").read_text())
    (job / "meta.json").write_text(json.dumps({**meta, "min_clients": 1, "mandatory_clients": ["site-x"]}))
    with pytest.raises(ValueError, match="runs on sites site-x but the POC has 4: site-siemens"):
        check_job_fits(job, VENDOR_SITES)
    assert main(["poc", "run", str(job), "--clients", "a,a", "--workspace", str(ws)]) == 2
    assert "site names appear twice: a" in capsys.readouterr().err
    # a recipe run in a LoopbackPocEnv too (PocEnv itself would provision, start and wait for the missing sites)
    env = LoopbackPocEnv(workspace=tmp_path / "env", clients=["site-siemens", "site-philips"], log=None)
    with pytest.raises(ValueError, match=r"job four needs 4 sites \(min_clients\) but the POC has 2"):
        recipe.run(env)
    assert not (tmp_path / "env" / "poc").exists() and not env.processes()


@pytest.mark.slow
def test_ctrl_c_stops_the_poc_with_one_line(tmp_path):
    """``flare-duallora poc run`` (sites from the job: 2 with min_clients 2) interrupted once the job is submitted:
    exit 1, one line on stderr, no traceback, no process of the POC left, nothing in HOME."""
    data = four_vendor_sites(tmp_path / "data")
    tiny_recipe(data, VENDOR_SITES[:2], name="two", rounds=5, target="poc").export(str(tmp_path / "jobs"))
    home = tmp_path / "user_home"
    home.mkdir()
    ws = tmp_path / "ws"
    proc = subprocess.Popen([sys.executable, "-m", "flare_duallora.cli", "poc", "run", str(tmp_path / "jobs" / "two"),
                             "--workspace", str(ws), "--timeout", "300"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # the CLI's own imports (torch/monai pull in matplotlib) would cache fonts in HOME: not
                            # the POC's doing, kept out so that the check below is about what the POC writes
                            env={**os.environ, "HOME": str(home), "MPLCONFIGDIR": str(tmp_path / "mpl")},
                            start_new_session=True)
    out_lines = []
    try:
        for line in proc.stdout:  # wait until the job is submitted and followed
            out_lines.append(line)
            if line.startswith("POC job "):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            stop_process_tree(proc)
    assert out_lines[0].startswith("POC of 2 sites on 127.0.0.1: site-siemens, site-philips"), out_lines
    assert proc.returncode == 1, err
    assert err.strip().splitlines() == [f"interrupted: the POC was stopped (every process of {ws / 'poc'}, by PID)"]
    assert not find_processes(ws / "poc") and not pgrep(ws)
    assert not any(home.iterdir())
