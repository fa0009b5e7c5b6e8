"""Job templates (``job_templates/``): ``nvflare job create`` makes jobs that run in ``nvflare simulator``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from pyhocon import ConfigFactory

from conftest import CLS2D_BUNDLE, CMR_BUNDLE, TINY_CMR
from flare_duallora.flare.simulate import run_simulator
from flare_duallora.flare.templates import (
    create_job_from_template,
    list_templates,
    resolve_bundle_path,
    template_path,
    template_variables,
    templates_dir,
)

SITES = ["site-a", "site-b"]
TEMPLATES = list_templates()
REQUIRED = ("config_fed_client.conf", "config_fed_server.conf", "meta.conf", "info.conf", "info.md")
TASKS = {"train", "validate", "submit_model"}
TINY_2D = {"image_size": [16, 16], "patch_size": [8, 8], "hidden_size": 32, "mlp_dim": 64, "num_heads": 4,
           "num_classes": 3, "batch_size": 4}


def write_random_2d_site(root: Path, site: str, n: int = 9, n_val: int = 3, num_classes: int = 3,
                         seed: int = 0) -> Path:
    """A 2D site datalist (contract format) with small RGB JPEGs whose brightness encodes the label."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        label = i % num_classes
        arr = np.clip(rng.normal(60 + 60 * label, 20, size=(20, 20, 3)), 0, 255).astype(np.uint8)
        path = root / f"{site}_{i:03d}.jpg"
        Image.fromarray(arr, "RGB").save(path)
        items.append({"image": str(path), "label": label, "subject": f"{site}-{i}"})
    datalist = {"name": site, "task": "cls2d", "num_classes": num_classes,
                "label_names": [f"class{k}" for k in range(num_classes)],
                "training": items[n_val:], "validation": items[:n_val]}
    path = root / f"{site}.json"
    path.write_text(json.dumps(datalist))
    return path


@pytest.fixture(scope="module")
def cls2d_datalists(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cls2d_sites")
    for i, site in enumerate(SITES):
        write_random_2d_site(root, site, seed=i)
    return root


@pytest.fixture
def nvflare_home(tmp_path, monkeypatch) -> dict:
    """``nvflare job create`` may read ~/.nvflare: keep it in a scratch HOME."""
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home)}


def _client(job: Path):
    return ConfigFactory.parse_file(str(job / "app" / "config" / "config_fed_client.conf"))


def _server(job: Path):
    return ConfigFactory.parse_file(str(job / "app" / "config" / "config_fed_server.conf"))


# ---------------------------------------------------------------------------------------------- static checks
def test_templates_are_found_and_complete():
    assert {"duallora_cmr3d", "fedopal_cmr3d", "duallora_cls2d"} <= set(TEMPLATES)
    for name in TEMPLATES:
        folder = template_path(name)
        assert folder.parent == templates_dir()
        for file in REQUIRED:
            assert (folder / file).is_file(), f"{name}: {file} missing"
        for file in REQUIRED[:4]:
            ConfigFactory.parse_file(str(folder / file))  # valid HOCON


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_settings_are_top_level_documented_and_used(name):
    folder = template_path(name)
    variables = template_variables(name)
    client, server, meta = (variables[f] for f in ("config_fed_client.conf", "config_fed_server.conf", "meta.conf"))
    placement = ("side_reduction", "side_layers") if client["method"] == "pfedst" else ("blocks",)
    for key in ("bundle_root", "datalist_dir", "method", "rank", "head", "local_epochs", "bundle_overrides",
                *placement):
        assert key in client, f"{name}: client setting {key!r} missing"
    for key in ("method", "head", "num_rounds", "min_clients"):
        assert key in server, f"{name}: server setting {key!r} missing"
    assert client["method"] == server["method"] and client["head"] == server["head"]
    assert meta["min_clients"] == server["min_clients"]
    assert client["bundle_root"].startswith("pkg://flare_duallora/bundles/")
    assert os.path.isdir(resolve_bundle_path(client["bundle_root"]))
    info = (folder / "info.md").read_text()
    for key in list(client) + list(server) + ["min_clients"]:
        assert f"`{key}`" in info, f"{name}: setting {key!r} is not documented in info.md"
    raw_client = (folder / "config_fed_client.conf").read_text()
    raw_server = (folder / "config_fed_server.conf").read_text()
    for key in client:  # every setting reaches the components
        assert f'"{{{key}}}"' in raw_client, f"{name}: client setting {key!r} is never referenced"
    for key in server:
        assert f'"{{{key}}}"' in raw_server, f"{name}: server setting {key!r} is never referenced"
    meta_conf = ConfigFactory.parse_file(str(folder / "meta.conf"))
    assert list(meta_conf["deploy_map"]["app"]) == ["@ALL"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_private_key_filter_is_registered_for_explicit_tasks(name):
    client = ConfigFactory.parse_file(str(template_path(name) / "config_fed_client.conf"))
    chains = client["task_result_filters"]
    paths = [(set(chain["tasks"]), f["path"]) for chain in chains for f in chain["filters"]]
    assert (TASKS, "flare_duallora.flare.filters.PrivateKeyFilter") in paths
    assert all("*" not in tasks for tasks, _ in paths)  # nvflare 2.9.0 never applies "*"
    executor = client["executors"][0]
    assert set(executor["tasks"]) == TASKS
    assert executor["executor"]["path"] == "flare_duallora.flare.executor.DualLoRAExecutor"
    server = ConfigFactory.parse_file(str(template_path(name) / "config_fed_server.conf"))
    assert server["workflows"][0]["path"] == "flare_duallora.flare.controller.PersonalisedFedAvg"


def test_resolve_bundle_path():
    assert resolve_bundle_path("pkg://flare_duallora/bundles/cmr3d_vit_classification") == str(CMR_BUNDLE)
    assert resolve_bundle_path("pkg://flare_duallora/bundles/cls2d_classification/") == str(CLS2D_BUNDLE)
    assert resolve_bundle_path("/some/bundle") == "/some/bundle"
    assert resolve_bundle_path("~/b") == os.path.expanduser("~/b")
    with pytest.raises(FileNotFoundError, match="no folder 'bundles/nope'"):
        resolve_bundle_path("pkg://flare_duallora/bundles/nope")
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_bundle_path("pkg://no_such_package_xyz/bundles/b")
    for bad in ("pkg://flare_duallora", "pkg://flare_duallora/", "pkg://flare_duallora/../etc"):
        with pytest.raises(ValueError, match="bundle_root"):
            resolve_bundle_path(bad)


def test_create_job_applies_settings_through_nvflare_job_create(tmp_path, nvflare_home):
    job = create_job_from_template(
        "fedopal_cmr3d", tmp_path / "jobs" / "fedopal",
        {"datalist_dir": "/data/cmr//datalists", "rank": 16, "blocks": [2, 3], "orth_mode": "AB", "orth_lambda": 0.5,
         "num_rounds": 7, "min_clients": 3, "local_epochs": 2, "bundle_root": "pkg://flare_duallora/bundles/x",
         "bundle_overrides": {"image_size": [32, 32, 8], "batch_size": 2}},
        env=nvflare_home,
    )
    meta = ConfigFactory.parse_file(str(job / "meta.conf"))
    assert meta["name"] == "fedopal" and meta["min_clients"] == 3
    assert not (job / "app" / "custom").exists()  # byoc=False: a plain job of the installed package
    client, server = _client(job), _server(job)
    assert client["datalist_dir"] == "/data/cmr//datalists" and client["rank"] == 16
    assert client["bundle_root"] == "pkg://flare_duallora/bundles/x"
    assert list(client["blocks"]) == [2, 3] and client["orth_mode"] == "AB" and client["orth_lambda"] == 0.5
    assert client["bundle_overrides"]["batch_size"] == 2 and list(client["bundle_overrides"]["image_size"]) == [32, 32, 8]
    assert server["num_rounds"] == 7 and server["min_clients"] == 3 and server["method"] == "fedopal"
    args = client["executors"][0]["executor"]["args"]
    assert args["bundle_overrides"] == "{bundle_overrides}"  # dict settings stay references
    with pytest.raises(ValueError, match="no setting 'rnak'"):
        create_job_from_template("duallora_cmr3d", tmp_path / "jobs" / "bad", {"rnak": 4}, env=nvflare_home)


# ---------------------------------------------------------------------------------------------- simulator runs
def _tiny_overrides(name: str, cmr_datalists: Path, cls2d_datalists: Path) -> dict:
    bundle = template_variables(name)["config_fed_client.conf"]["bundle_root"]
    if "cmr3d" in bundle:
        return {"bundle_root": str(CMR_BUNDLE), "datalist_dir": str(cmr_datalists), "bundle_overrides": TINY_CMR}
    if "cls2d" in bundle:
        return {"bundle_root": str(CLS2D_BUNDLE), "datalist_dir": str(cls2d_datalists), "bundle_overrides": TINY_2D}
    raise AssertionError(f"template {name}: no tiny data for bundle {bundle}")


@pytest.mark.slow
@pytest.mark.parametrize("name", TEMPLATES)
def test_template_job_runs_in_the_simulator(tmp_path, name, cmr_datalists, cls2d_datalists, nvflare_home):
    overrides = {**_tiny_overrides(name, cmr_datalists, cls2d_datalists), "num_rounds": 1, "rank": 4,
                 "device": "cpu", "min_clients": len(SITES)}
    job = create_job_from_template(name, tmp_path / "jobs" / name, overrides, env=nvflare_home)
    r = run_simulator(job, tmp_path / "ws", SITES, timeout=300, env=nvflare_home)
    assert r.ok, r.log[-3000:]
    assert set(r.site_results) == set(SITES), r.log[-3000:]
    for site in SITES:
        assert {"personalised", "global_only"} <= set(r.site_results[site])
        assert [e["round"] for e in r.site_records[site] if e["event"] == "train"] == [0]
    method = template_variables(name)["config_fed_client.conf"]["method"]
    weights = [e for e in r.received if e["kind"] == "WEIGHTS"]
    assert len(weights) == len(SITES)
    def only_shared(keys) -> bool:
        if method == "pfedst":  # only the side network's shared part: no backbone key, no side LoRA
            return all(k.startswith("side.") and ".lora_" not in k for k in keys)
        return not any(".local." in k or ".base_layer." in k for k in keys)

    for entry in weights:
        assert entry["keys"] and only_shared(entry["keys"]), method
    assert r.global_model and only_shared(r.global_model)
    assert "is not in allow_list" not in r.log


@pytest.mark.slow
def test_nvflare_job_create_output_as_is_is_byoc_and_needs_no_allow_list(tmp_path, cmr_datalists, nvflare_home):
    """The job exactly as ``nvflare job create`` writes it has an empty ``app/custom/``: nvflare treats it as BYOC
    and skips the class allow-list (the site still needs the package installed)."""
    overrides = {"bundle_root": str(CMR_BUNDLE), "datalist_dir": str(cmr_datalists), "bundle_overrides": TINY_CMR,
                 "num_rounds": 1, "rank": 4, "device": "cpu"}
    job = create_job_from_template("duallora_cmr3d", tmp_path / "jobs" / "byoc", overrides, byoc=True,
                                   env=nvflare_home)
    assert (job / "app" / "custom").is_dir() and not any((job / "app" / "custom").iterdir())
    r = run_simulator(job, tmp_path / "ws", SITES, allow_list=False, timeout=300, env=nvflare_home)
    assert r.ok and set(r.site_results) == set(SITES), r.log[-3000:]
    assert "not in allow_list" not in r.log


def _executor_resolves_pkg_paths() -> bool:
    import inspect

    import flare_duallora.flare.executor as executor

    return "resolve_bundle_path" in inspect.getsource(executor)


@pytest.mark.slow
@pytest.mark.skipif(not _executor_resolves_pkg_paths(),
                    reason="DualLoRAExecutor does not resolve pkg:// bundle paths yet (see templates.resolve_bundle_path)")
def test_template_default_bundle_root_is_resolved_on_the_site(tmp_path, cmr_datalists, nvflare_home):
    """The job keeps ``bundle_root = pkg://flare_duallora/bundles/...``: each site finds its installed copy."""
    overrides = {"datalist_dir": str(cmr_datalists), "bundle_overrides": TINY_CMR, "num_rounds": 1, "rank": 4,
                 "device": "cpu"}
    job = create_job_from_template("duallora_cmr3d", tmp_path / "jobs" / "pkg", overrides, env=nvflare_home)
    assert _client(job)["bundle_root"].startswith("pkg://")
    r = run_simulator(job, tmp_path / "ws", SITES, timeout=300, env=nvflare_home)
    assert r.ok and set(r.site_results) == set(SITES), r.log[-3000:]
