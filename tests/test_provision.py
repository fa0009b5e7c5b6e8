"""``nvflare provision`` of the repo's project files: a startup kit for every participant; and the production
rehearsal of PRODUCTION.md on 127.0.0.1 (slow)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe, write_random_cmr_site
from flare_duallora.deploy.poc import ADMIN, follow_production, free_port, listening_addresses
from flare_duallora.deploy.report import format_round
from flare_duallora.deploy.processes import alive, descendants, find_processes, kit_pids, stop_kit
from flare_duallora.deploy.site_config import (
    PACKAGE_PREFIX, RUNTIME_CLASSES, SCOPE_NAME, install_site_config, privacy_config,
)

POC_DIR = Path(__file__).resolve().parents[1] / "poc_workspace"
PROJECTS = [POC_DIR / "project.yml", POC_DIR / "production" / "project.yml"]


def provision(project: Path, out: Path, home: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    nvflare = str(Path(sys.executable).with_name("nvflare"))
    proc = subprocess.run([nvflare, "provision", "-p", str(project), "-w", str(out)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HOME": str(home)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("project", PROJECTS, ids=["poc", "production"])
def test_provision_makes_a_startup_kit_for_every_participant(tmp_path, project):
    config = yaml.safe_load(project.read_text())
    out = provision(project, tmp_path / "prov", tmp_path / "home")
    prod = out / config["name"] / "prod_00"
    participants = config["participants"]
    server = next(p for p in participants if p["type"] == "server")
    clients = [p for p in participants if p["type"] == "client"]
    admins = [p for p in participants if p["type"] == "admin"]
    assert [c["name"] for c in clients] == ["site-siemens", "site-philips", "site-ge", "site-canon"]

    fed_server = json.loads((prod / server["name"] / "startup" / "fed_server.json").read_text())
    target = fed_server["servers"][0]["service"]["target"]
    assert target == f"{server['name']}:{server['fed_learn_port']}" and server["fed_learn_port"] == 8002
    assert fed_server["servers"][0]["admin_port"] == 8002  # one port for FL and admin traffic
    for client in clients:
        kit = prod / client["name"]
        fed_client = json.loads((kit / "startup" / "fed_client.json").read_text())
        assert fed_client["client"]["fqsn"] == client["name"]
        assert fed_client["servers"][0]["service"]["target"] == target
        for file in ("client.crt", "client.key", "rootCA.pem", "start.sh"):
            assert (kit / "startup" / file).is_file()
        assert (kit / "local" / "resources.json.default").is_file()
        # the project's SiteConfigBuilder installed the plugin's site configuration at provisioning time
        allow = json.loads((kit / "local" / "resources.json").read_text())["class_allow_list"]
        assert set(RUNTIME_CLASSES) <= set(allow) and PACKAGE_PREFIX not in allow
        assert json.loads((kit / "local" / "privacy.json").read_text())["default_scope"] == SCOPE_NAME
    server_local = prod / server["name"] / "local"
    assert set(RUNTIME_CLASSES) <= set(json.loads((server_local / "resources.json").read_text())["class_allow_list"])
    assert not (server_local / "privacy.json").exists()
    for admin in admins:
        assert (prod / admin["name"] / "startup" / "fed_admin.json").is_file()


def test_site_configuration_installs_into_a_provisioned_kit(tmp_path):
    """What PRODUCTION.md tells each site to do: allow-list + privacy scope in its kit's local/."""
    out = provision(PROJECTS[1], tmp_path / "prov", tmp_path / "home")
    local = out / "flare_duallora_cmr" / "prod_00" / "site-ge" / "local"
    for name in ("resources.json", "privacy.json"):  # as a site that provisioned without the builder
        (local / name).unlink()
    install_site_config(local, privacy=privacy_config({"method": "duallora", "head": ["vit.classification_head"]}))
    resources = json.loads((local / "resources.json").read_text())
    default = json.loads((local / "resources.json.default").read_text())
    assert resources["class_allow_list"] == default["class_allow_list"]  # the default list (the builder added ours)
    assert all(resources["class_allow_list"].count(c) == 1 for c in RUNTIME_CLASSES)
    assert PACKAGE_PREFIX not in resources["class_allow_list"]
    assert resources["class_list_enforcement_mode"] == "enforce"
    privacy = json.loads((local / "privacy.json").read_text())
    assert privacy["default_scope"] == SCOPE_NAME
    [scope] = privacy["scopes"]
    assert scope["task_result_filters"][0]["path"] == "flare_duallora.flare.filters.PrivateKeyFilter"


# ---------------------------------------------------------------------------------------------- rehearsal
def _wait_for_sites(admin_kit: Path, sites, timeout: float) -> list[str]:
    """Poll the server (admin API) until every site is connected; returns the connected names."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    deadline = time.monotonic() + timeout
    connected: list[str] = []
    while time.monotonic() < deadline:
        try:
            session = new_secure_session(ADMIN, str(admin_kit), timeout=10.0)
        except Exception:  # noqa: BLE001 - the server is still starting
            time.sleep(2)
            continue
        try:
            while time.monotonic() < deadline:
                connected = sorted(c.name for c in session.get_system_info().client_info)
                if set(sites) <= set(connected):
                    return connected
                time.sleep(1)
        finally:
            session.close()
    return connected


@pytest.mark.slow
def test_production_rehearsal_on_loopback_from_the_startup_kits(tmp_path, monkeypatch):
    """PRODUCTION.md, "Rehearsal on one machine", step by step: ``nvflare provision`` of poc_workspace/project.yml
    (the plugin's builder in it), every participant started with its kit's own ``startup/start.sh``, one job submitted
    with ProdEnv and one with ``nvflare job submit``, both followed with the admin kit (progress through the admin
    API, results downloaded), everything stopped by PID; 127.0.0.1 only and nothing written into HOME."""
    from nvflare.recipe import ProdEnv

    user_home = tmp_path / "user_home"
    user_home.mkdir()
    monkeypatch.setenv("HOME", str(user_home))
    work = tmp_path / "rehearsal"
    work.mkdir()
    project = yaml.safe_load(PROJECTS[0].read_text())
    port = free_port()  # the project's 8002 may be taken on a shared machine
    server = next(p for p in project["participants"] if p["type"] == "server")
    assert server["name"] == "localhost"  # -> 127.0.0.1 only
    server["fed_learn_port"] = port
    (work / "project.yml").write_text(yaml.safe_dump(project, sort_keys=False))
    sites = [p["name"] for p in project["participants"] if p["type"] == "client"]
    env = {**os.environ, "HOME": str(work / "home"), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    (work / "home").mkdir()
    nvflare = str(Path(sys.executable).with_name("nvflare"))

    # 1. provision (the project's SiteConfigBuilder installs the site configuration in every kit)
    subprocess.run([nvflare, "provision", "-p", str(work / "project.yml"), "-w", str(work / "provision")], env=env,
                   check=True, capture_output=True, timeout=120)
    prod = work / "provision" / project["name"] / "prod_00"
    admin = prod / ADMIN
    kits = [prod / server["name"]] + [prod / s for s in sites]
    # 3. each site's data where the job's datalist_dir points: <kit>/local/datalists/<site>.json
    #    and the site's own rules for it, as its operator writes them (PRODUCTION.md): the data folder jobs may read
    for i, site in enumerate(sites):
        (prod / site / "local" / "datalists").mkdir()
        write_random_cmr_site(prod / site / "local" / "datalists", site, n=4, n_val=2, seed=i)
        subprocess.run([str(Path(sys.executable).with_name("flare-duallora")), "site-config", str(prod / site / "local"),
                        "--privacy", "--data-root", str(prod / site / "local" / "datalists")], env=env, check=True,
                       capture_output=True, timeout=120)

    seen: dict = {"addresses": set(), "pids": set()}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            pids = [p for kit in kits for p in kit_pids(kit).values()]
            pids += [d for p in pids for d in descendants(p)]
            seen["pids"].update(pids)
            seen["addresses"].update(listening_addresses(pids))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    lines: list[str] = []
    try:
        # 4. start: the server, then each site, with the kit's own script (start.sh runs sub_start.sh in background)
        for kit in kits:
            with open(work / f"{kit.name}.out", "w") as out:
                subprocess.run([str(kit / "startup" / "start.sh")], cwd=kit, env=env, stdout=out,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=30, check=True)
        watcher.start()
        assert _wait_for_sites(admin, sites, 120) == sorted(sites)

        # 5a. a recipe submitted with ProdEnv (the admin kit), followed with the admin kit
        recipe = tiny_recipe("{WORKSPACE}/local/datalists", sites, name="prod_recipe", rounds=2, target="prod")
        run = recipe.run(ProdEnv(startup_kit_location=str(admin), username=ADMIN))
        first = follow_production(admin, run.get_job_id(), work / "results", timeout=300, log=lines.append)
        # 5b. the same job as a folder with `nvflare job submit`, followed with `flare-duallora poc follow`
        tiny_recipe("{WORKSPACE}/local/datalists", sites, name="prod_cli", rounds=1, target="prod").export(
            str(work / "jobs"))
        submit = subprocess.run([nvflare, "job", "submit", "-j", str(work / "jobs" / "prod_cli"), "--startup-kit",
                                 str(admin)], env=env, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        job_id = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", submit.stdout).group(0)
        follow = subprocess.run([sys.executable, "-m", "flare_duallora.cli", "poc", "follow", job_id, "--startup-kit",
                                 str(admin), "--results", str(work / "results_cli"), "--timeout", "300"],
                                env=env, capture_output=True, text=True, timeout=400)
    finally:
        # 6. stop every participant by the PIDs its kit recorded (sites first, then the server)
        stopped = [pid for kit in reversed(kits) for pid in stop_kit(kit)]
        stop.set()
        if watcher.is_alive():
            watcher.join(5)
    assert stopped and not any(alive(p) for p in seen["pids"])
    assert not find_processes(work)
    # loopback only, nothing in the user's home
    assert seen["addresses"] and {a for a, _ in seen["addresses"]} <= {"127.0.0.1", "::1"}, seen["addresses"]
    assert port in {p for _, p in seen["addresses"]}
    assert not any(user_home.iterdir()), list(user_home.rglob("*"))

    assert first.ok, first.describe_failure()
    assert set(first.site_results) == set(sites) and not first.outputs.failed_sites
    assert first.global_model and not any(".local." in k for k in first.global_model)
    # one line per round; at least the first read while the job ran, through the admin API (not from the download)
    assert [x for x in lines if x.startswith("round ")] == [format_round(p, len(sites)) for p in first.outputs.progress]
    assert len(first.outputs.progress) == 2 and first.live_rounds >= 1, lines
    assert follow.returncode == 0, follow.stdout + follow.stderr
    assert f"round 1/1: {len(sites)}/{len(sites)} sites answered" in follow.stdout
    table = [line for line in follow.stdout.splitlines() if line.startswith("| site-")]
    assert {line.split("|")[1].strip() for line in table} == set(sites)
    assert json.loads(next((work / "results_cli").rglob("run_status.json")).read_text())["status"] == "completed"


def test_a_recipe_job_keeps_its_schema_through_nvflare_job_submit(tmp_path):
    """``nvflare job submit`` rewrites every config through pyhocon, which nests the schema's dotted parameter names
    ({"vit": {"blocks": ...}}): the controller makes them whole again (else every contribution is rejected)."""
    import argparse

    from nvflare.tool.job.job_cli import prepare_job_config

    from flare_duallora.flare.controller import PersonalisedFedAvg

    tiny_recipe(None, ["site-siemens", "site-philips"], name="j", rounds=1, target="poc").export(str(tmp_path / "jobs"))
    job = tmp_path / "jobs" / "j"
    config = "app/config/config_fed_server.json"
    original = json.loads((job / config).read_text())["workflows"][0]["args"]
    shutil.copytree(job, tmp_path / "submitted")  # as `nvflare job submit` does, then it rewrites the configs
    prepare_job_config(argparse.Namespace(job_folder=str(job), config_file=None, debug=False), ["app"],
                       str(tmp_path / "submitted"))
    submitted = json.loads((tmp_path / "submitted" / config).read_text())["workflows"][0]["args"]
    assert set(submitted["schema"]) == {"vit"}  # what nvflare makes of it
    controller = PersonalisedFedAvg(**submitted)
    assert controller.schema == original["schema"] and len(original["schema"]) == 10
    pairs = [[k, v] for k, v in original["schema"].items()]  # the job templates' form: passed through as it is
    assert PersonalisedFedAvg(**{**submitted, "schema": pairs}).schema == pairs
