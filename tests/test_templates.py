"""Job templates (``job_templates/``, shipped in the package): complete, documented, checked like the recipe, and
configuring exactly the components the recipe configures with the same settings."""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from pyhocon import ConfigFactory

import flare_duallora
from conftest import CLS2D_BUNDLE, CMR_BUNDLE, CMR_SEG_BUNDLE, TINY_CMR, run_sim
from flare_duallora.deploy.job_configs import job_components
from flare_duallora.deploy.preflight import JobCheckError
from flare_duallora.deploy.recipe import DualLoRARecipe
from flare_duallora.deploy.simulate import run_simulator
from flare_duallora.deploy.templates import (
    create_job_from_template, list_templates, template_path, template_variables, templates_dir,
)
from flare_duallora.engine import AdapterSettings, SharingPolicy, method_names
from flare_duallora.bundle.paths import resolve_bundle_path
from flare_duallora.flare.aggregator import SharedKeyAggregator
from flare_duallora.flare.audit import ReceivedKeysAudit
from flare_duallora.flare.controller import PersonalisedFedAvg
from flare_duallora.flare.executor import DualLoRAExecutor
from flare_duallora.flare.filters import PrivateKeyFilter

SITES = ["site-a", "site-b"]
TEMPLATES = list_templates()
REQUIRED = ("config_fed_client.conf", "config_fed_server.conf", "meta.conf", "info.conf", "info.md")
TASKS = {"train", "validate", "submit_model"}
TINY_2D = {"image_size": [16, 16], "patch_size": [8, 8], "hidden_size": 32, "mlp_dim": 64, "num_heads": 4,
           "batch_size": 4}


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


# ---------------------------------------------------------------------------------------------- static checks
def test_templates_ship_in_the_package_and_are_complete():
    assert {"duallora_cmr3d", "fedopal_cmr3d", "duallora_cls2d", "pfedst_cls2d"} <= set(TEMPLATES)
    assert templates_dir() == Path(flare_duallora.__file__).parent / "job_templates"
    top = Path(flare_duallora.__file__).parents[1] / "job_templates"
    assert top.resolve() == templates_dir().resolve()  # the top-level folder of the source tree is the same one
    for name in TEMPLATES:
        folder = template_path(name)
        for file in REQUIRED:
            assert (folder / file).is_file(), f"{name}: {file} missing"
        for file in REQUIRED[:4]:
            ConfigFactory.parse_file(str(folder / file))  # valid HOCON


def test_the_templates_readme_lists_every_template_and_the_comments_every_method():
    readme = (templates_dir() / "README.md").read_text()
    for name in TEMPLATES:
        assert f"`{name}`" in readme, name
        client = (template_path(name) / "config_fed_client.conf").read_text()
        assert all(m in client for m in method_names()), name


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_settings_are_top_level_documented_and_used(name):
    folder = template_path(name)
    variables = template_variables(name)
    client, server, meta = (variables[f] for f in ("config_fed_client.conf", "config_fed_server.conf", "meta.conf"))
    for key in ("bundle_root", "datalist_dir", "method", "rank", "head", "local_epochs", "bundle_overrides",
                "allow_random_base", "state_name", "resume", "prefix_cache"):
        assert key in client, f"{name}: client setting {key!r} missing"
    for key in ("method", "head", "num_rounds", "min_clients", "max_failed_sites", "state_name", "resume"):
        assert key in server, f"{name}: server setting {key!r} missing"
    assert client["method"] == server["method"] and client["head"] == server["head"]
    assert meta["min_clients"] == server["min_clients"]
    assert client["bundle_root"].startswith("pkg://flare_duallora/bundles/")
    assert os.path.isdir(resolve_bundle_path(client["bundle_root"]))
    info = (folder / "info.md").read_text()
    for key in list(client) + list(server) + ["min_clients"]:
        assert f"`{key}`" in info, f"{name}: setting {key!r} is not documented in info.md"
    for file, settings in (("config_fed_client.conf", client), ("config_fed_server.conf", server)):
        raw = (folder / file).read_text()
        for key in settings:  # every setting reaches the components
            assert f'"{{{key}}}"' in raw, f"{name}: {file} setting {key!r} is never referenced"


@pytest.mark.parametrize("name", TEMPLATES)
def test_private_key_filter_is_registered_for_explicit_tasks(name):
    client = ConfigFactory.parse_file(str(template_path(name) / "config_fed_client.conf"))
    paths = [(set(chain["tasks"]), f["path"]) for chain in client["task_result_filters"] for f in chain["filters"]]
    assert (TASKS, "flare_duallora.flare.filters.PrivateKeyFilter") in paths
    assert all("*" not in tasks for tasks, _ in paths)  # nvflare 2.9.0 never applies "*"


# ---------------------------------------------------------------------------------------------- creating jobs
def test_create_job_resolves_paths_checks_and_fills_the_server_schema(tmp_path, cmr_datalists, monkeypatch):
    monkeypatch.chdir(cmr_datalists.parent)
    job = create_job_from_template(
        "fedopal_cmr3d", tmp_path / "jobs" / "fedopal",
        {"datalist_dir": cmr_datalists.name, "rank": 4, "blocks": [2, 3], "orth_mode": "AB", "orth_lambda": 0.5,
         "num_rounds": 7, "min_clients": 3, "local_epochs": 2, "bundle_root": str(CMR_BUNDLE),
         "allow_random_base": True, "bundle_overrides": {**TINY_CMR, "batch_size": 2}},
        sites=["site-a", "site-b", "site-c"])
    meta = ConfigFactory.parse_file(str(job / "meta.conf"))
    assert meta["name"] == "fedopal" and meta["min_clients"] == 3
    assert not (job / "app" / "custom").exists()  # a plain job of the installed package
    comps = job_components(job)["app/config_fed_client"]
    args = next(c for c in comps if c["section"] == "executors")["args"]
    assert args["datalist_dir"] == str(cmr_datalists)  # resolved where the job was created
    assert args["settings"]["blocks"] == [2, 3] and args["settings"]["orth_mode"] == "AB"
    assert args["bundle_overrides"]["batch_size"] == 2 and args["state_name"] == "fedopal"
    server = job_components(job)["app/config_fed_server"][0]["args"]
    assert server["num_rounds"] == 7 and server["num_clients"] == 3 and server["fingerprint"].startswith("sha256:")
    assert server["schema"] and all(".lora_" in k or "classification_head" in k for k, _ in server["schema"])
    with pytest.raises(ValueError, match="no setting 'rnak'"):
        create_job_from_template("duallora_cmr3d", tmp_path / "jobs" / "bad", {"rnak": 4})
    with pytest.raises(JobCheckError, match="relative path"):
        create_job_from_template("duallora_cmr3d", tmp_path / "jobs" / "prod", {"datalist_dir": "data/sites"},
                                 target="prod", sites=SITES)
    with pytest.raises(JobCheckError, match="no pretrained weights"):
        create_job_from_template("duallora_cmr3d", tmp_path / "jobs" / "noweights",
                                 {"datalist_dir": str(cmr_datalists), "bundle_overrides": TINY_CMR}, sites=SITES)


def _defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


COMPONENTS = {c.__module__ + "." + c.__qualname__: c for c in
              (DualLoRAExecutor, PrivateKeyFilter, PersonalisedFedAvg, ReceivedKeysAudit)}


def normalised(components: list[dict]) -> list[tuple]:
    """Component path, tasks and every argument with the class default filled in and the settings canonical."""
    out = []
    for c in components:
        cls = COMPONENTS[c["path"]]
        args = {**_defaults(cls), **c["args"]}
        if "settings" in args:
            args["settings"] = AdapterSettings.from_dict(args["settings"]).to_dict()
        if "sharing" in args:
            args["sharing"] = SharingPolicy.from_args(args["sharing"]).to_args()
        if "aggregation" in args:
            args["aggregation"] = {**{k: v for k, v in _defaults(SharedKeyAggregator).items()
                                      if k not in ("schema", "fingerprint", "reference_norm", "min_agree")},
                                   **(args["aggregation"] or {})}
        if isinstance(args.get("schema"), list):
            args["schema"] = {k: list(v) for k, v in args["schema"]}
        if args.get("state_name") == "":
            args["state_name"] = None
        out.append((c["section"], c["path"], tuple(c.get("tasks", ())), json.dumps(args, sort_keys=True)))
    return sorted(out)


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_template_job_and_the_recipe_job_configure_the_same_components(name, tmp_path, cmr_datalists,
                                                                         cls2d_datalists, cmr_seg_datalists):
    """The same settings through both builders: the same component classes, tasks and arguments."""
    client = template_variables(name)["config_fed_client.conf"]
    is_2d = "cls2d" in client["bundle_root"]
    bundle = CLS2D_BUNDLE if is_2d else CMR_BUNDLE
    datalists, overrides = (cls2d_datalists, {**TINY_2D, "num_classes": 3}) if is_2d else (cmr_datalists, TINY_CMR)
    if "cmr3d_segmentation" in client["bundle_root"]:
        bundle, datalists, overrides = CMR_SEG_BUNDLE, cmr_seg_datalists, {**TINY_CMR, "feature_size": 4}
    settings = {"method": client["method"], "rank": 4, "head": client["head"]}
    extra_template = {}
    if client["method"] == "pfedst":
        settings["extra"] = {"reduction": 4, "side_layers": None}
    else:
        settings["blocks"] = client["blocks"]
    if client["method"] == "fedopal":
        settings.update(orth_lambda=client["orth_lambda"], orth_mode=client["orth_mode"])
    common = dict(datalist_dir=str(datalists), bundle_root=str(bundle),
                  bundle_overrides=overrides, allow_random_base=True, local_epochs=2)
    job = create_job_from_template(name, tmp_path / "t" / name, {
        **common, "rank": 4, "num_rounds": 3, "min_clients": 2, "max_failed_sites": 1, "device": "cpu",
        **extra_template}, sites=SITES)
    recipe = DualLoRARecipe(name=name, target="sim", settings=settings, clients=SITES, num_rounds=3,
                            max_failed_sites=1, device="cpu", **common)
    recipe.export(str(tmp_path / "r"))
    template_comps, recipe_comps = job_components(job), job_components(tmp_path / "r" / name)
    assert set(template_comps) == set(recipe_comps) == {"app/config_fed_client", "app/config_fed_server"}
    for app in template_comps:
        assert normalised(template_comps[app]) == normalised(recipe_comps[app]), app


# ---------------------------------------------------------------------------------------------- a template job runs
@pytest.mark.slow
def test_the_pfedst_template_with_its_packaged_bundle_runs_in_the_simulator(tmp_path, cls2d_datalists):
    """The template's own default ``bundle_root = pkg://...`` is resolved on each site; only the side network's
    shared part reaches the server."""
    job = create_job_from_template("pfedst_cls2d", tmp_path / "jobs" / "pfedst", {
        "datalist_dir": str(cls2d_datalists), "bundle_overrides": {**TINY_2D, "num_classes": 3}, "num_rounds": 1,
        "rank": 4, "device": "cpu", "min_clients": 2, "allow_random_base": True}, sites=SITES)
    args = job_components(job)["app/config_fed_client"][0]["args"]
    assert args["bundle_root"].startswith("pkg://")
    r = run_simulator(job, tmp_path / "ws", SITES, timeout=300)
    assert r.ok, r.describe_failure()
    assert set(r.site_results) == set(SITES)
    weights = [e for e in r.received if e["kind"] == "WEIGHTS"]  # the initial state and 1 round
    assert len([e for e in weights if e["task"] == "train"]) == len(SITES)
    for keys in [e["keys"] for e in weights] + [list(r.global_model)]:
        assert keys and all(k.startswith("side.") and ".lora_" not in k for k in keys)
