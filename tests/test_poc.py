"""A real nvflare POC through ``PocEnv`` (server and 2 vendor sites as separate processes, real startup kits) on
127.0.0.1, with the plugin's site configuration provisioned by the project's builder.

Budget (2 CPU cores): one session of about 70 s (provision + start ~15 s, two 1-round jobs and a failing one, stop).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from nvflare.recipe import ProdEnv

from conftest import tiny_recipe
from flare_duallora.deploy.poc import (
    ADMIN, SERVER, VENDOR_SITES, LoopbackPocEnv, find_processes, listening_addresses, loopback_project,
)
from flare_duallora.deploy.site_config import PACKAGE_PREFIX, SCOPE_NAME

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


@pytest.mark.slow
def test_recipe_jobs_run_in_a_loopback_poc_and_a_failing_job_names_its_site(tmp_path, cmr_datalists, monkeypatch):
    home = tmp_path / "user_home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    root = tmp_path / "poc"
    per_site = {"site-siemens": {"datalist": str(cmr_datalists / "site-a.json")},
                "site-philips": {"datalist": str(cmr_datalists / "site-b.json")}}
    recipe = tiny_recipe(None, SITES, name="poc_job", rounds=1, target="poc")
    recipe.set_per_site_config(per_site)
    env = LoopbackPocEnv(workspace=root, clients=SITES, sharing=recipe.sharing, log=None, timeout=240)
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
        # the same running POC takes a job the way production does: ProdEnv with the project admin's startup kit
        recipe2 = tiny_recipe(None, SITES, name="prod_style", rounds=1, target="poc")
        recipe2.set_per_site_config(per_site)
        run = recipe2.run(ProdEnv(startup_kit_location=str(env.admin_kit), username=ADMIN))
        second = env.follow(run.get_job_id())
        # and an exported job folder whose site-philips datalist does not exist fails, naming that site
        recipe2.export(str(tmp_path / "jobs"))
        config = tmp_path / "jobs" / "prod_style" / "app_site-philips" / "config" / "config_fed_client.json"
        client = json.loads(config.read_text())
        client["executors"][0]["executor"]["args"]["datalist"] = str(tmp_path / "missing.json")
        config.write_text(json.dumps(client))
        third = env.follow(env.submit_folder(tmp_path / "jobs" / "prod_style"))
    finally:
        stop.set()
        watcher.join(5)
        env.stop()
    assert not env.processes() and not pgrep(root)

    # loopback only: every listening socket of every POC process (server, sites, job processes) is on 127.0.0.1
    assert seen["n"] >= 1 + len(SITES) and seen["addresses"]
    assert {addr for addr, _ in seen["addresses"]} <= {"127.0.0.1", "::1"}, seen["addresses"]
    assert (env.port in {port for _, port in seen["addresses"]})
    # nothing in the user's home
    assert not any(home.iterdir())
    # the builder installed the site configuration in every kit
    for name in [SERVER, *SITES]:
        local = env.prod_dir / name / "local"
        assert PACKAGE_PREFIX in json.loads((local / "resources.json").read_text())["class_allow_list"]
    assert json.loads((env.prod_dir / SITES[0] / "local" / "privacy.json").read_text())["default_scope"] == SCOPE_NAME

    for result in (first, second):
        assert result.ok, result.describe_failure()
        assert set(result.site_results) == set(SITES)
        assert result.global_model and no_private(result.global_model)
        weights = [e for e in result.received if e["kind"] == "WEIGHTS"]  # the initial state and 1 round
        assert len([e for e in weights if e["task"] == "train"]) == len(SITES)
        assert all(no_private(e["keys"]) for e in weights)
        assert not result.outputs.status.get("failed_sites")
    assert not third.ok
    assert "site-philips" in third.failures and "missing.json" in third.failures["site-philips"]
    assert "site-siemens" not in third.failures
