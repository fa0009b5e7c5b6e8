"""``nvflare provision`` of the repo's project files: a startup kit for every participant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
