"""Site sovereignty (issue 17, the site side): each finding reproduced against the real executor, path resolver,
provisioning files and nvflare's own ComponentPathAuthorizer, and shown to fail now.

H1 flattened component ids in bundle_overrides; H2 the package-prefix allow-list; H3 a bundle shipped in the job's
own folder; L3 ``pkg://`` importing a package; M1 ``$VARS`` expanded in job paths and sent back; M3 state names
that escape the state root or take another job's state; M5 hostile fedex residuals and values that become inf in
the network's dtype; plus the site's max_global_shift.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeComponentError
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer

import flare_duallora
from conftest import ADAPTER, CMR_BUNDLE, TASKS, TINY_CMR, tiny_recipe, write_random_cmr_site
from flare_duallora.bench.federation import _Engine
from flare_duallora.bundle.paths import code_in_overrides, find_package_dirs, resolve_bundle_path, resolve_site_path
from flare_duallora.deploy.job_configs import job_components
from flare_duallora.deploy.site_config import (
    PACKAGE_PREFIX, RUNTIME_CLASSES, install_site_config, job_site_policy, resources_config,
)
from flare_duallora.flare.executor import DualLoRAExecutor
from flare_duallora.flare.run_files import CAUSE_HEADER, FEDEX_META, SITE_STATE_FILE
from flare_duallora.flare.site_policy import SitePolicy, SitePolicyError
from flare_duallora.training.from_bundle import build_site, export_site_bundles

JOB_ID = "job-1"


# ---------------------------------------------------------------------------------------------- a site, in process
def site_context(ws: Path, site: str = "site-a", job: str = "alpha", submitter=None) -> FLContext:
    (ws / "startup").mkdir(parents=True, exist_ok=True)
    (ws / "local").mkdir(parents=True, exist_ok=True)
    (ws / JOB_ID).mkdir(parents=True, exist_ok=True)
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=True)
    ctx.set_prop(ReservedKey.RUN_NUM, JOB_ID, private=False, sticky=True)
    ctx.set_prop(ReservedKey.ENGINE, _Engine(Workspace(str(ws), site)), private=True, sticky=True)
    ctx.set_prop(FLContextKey.JOB_META, {"name": job, "submitter_name": submitter}, private=True, sticky=True)
    return ctx


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    return write_random_cmr_site(tmp_path_factory.mktemp("site_data"), "site-a", n=4, n_val=1)


def start(ws: Path, policy=None, job="alpha", submitter=None, **kw) -> tuple[DualLoRAExecutor, FLContext]:
    """A real executor started on a site workspace ``ws`` whose local/flare_duallora.json is ``policy``."""
    ctx = site_context(ws, job=job, submitter=submitter)
    if policy is not None:
        install_site_config(ws / "local", site_policy=policy)
    args = dict(bundle_root=str(CMR_BUNDLE), settings={"method": "duallora", **ADAPTER}, bundle_overrides=TINY_CMR,
                allow_random_base=True, device="cpu", local_steps=1, prefix_cache="off")
    args.update(kw)
    ex = DualLoRAExecutor(**args)
    ex.handle_event(EventType.START_RUN, ctx)
    return ex, ctx


def allow(datalist: Path, **extra) -> dict:
    return job_site_policy([str(CMR_BUNDLE)], [str(datalist)], **extra)


def task(ex, ctx, weights: dict, meta=None, current_round=0):
    shareable = DXO(DataKind.WEIGHTS, data=weights, meta=meta or {}).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, current_round)
    return ex.execute("train", shareable, ctx, Signal())


def shared_wire(ex, scale=1.0, dtype=np.float32) -> dict:
    return {k: (v.numpy() * scale).astype(dtype) for k, v in ex.site.adapted.shared_state().items()}


# ---------------------------------------------------------------------------------------------- H1
H1_ATTACK = {"label_names#_target_": "subprocess.check_output", "label_names#args": ["sh", "-c", "touch {marker}"]}


@pytest.mark.parametrize("overrides", [
    {"label_names#_target_": "subprocess.check_output"},
    {"label_names::_target_": "os.system"},
    {"a#b#_requires_": "$print(1)"},
    {"network_def": {"inner": {"_target_": "os.system"}}},
    {"x#_mode_": "callable"}, {"x#_disabled_": False}, {"x#_desc_": "d"},
    {"x": [1, {"_target_": "os.system"}]}, {"x": " $__import__('os')"}, {"x": "@network_def"}, {"x": "%train#x"},
    {"$x": 1}, {1: 2},
])
def test_h1_component_ids_at_any_depth_are_not_plain_data(overrides):
    assert code_in_overrides(overrides), overrides


def test_h1_plain_overrides_pass():
    assert code_in_overrides({**TINY_CMR, "label_names": ["NOR", "disease"], "note": "cost is 5$", "x#y": 1}) == []


def test_h1_flattened_target_override_is_refused_by_the_site_and_runs_nothing(tmp_path, datalist):
    marker = tmp_path / "pwned"
    attack = {k: (v if isinstance(v, str) else [a.format(marker=marker) for a in v]) for k, v in H1_ATTACK.items()}
    ex, _ = start(tmp_path / "ws", allow(datalist), datalist=str(datalist), bundle_overrides={**TINY_CMR, **attack})
    assert ex.site is None and "SitePolicyError" in ex._failure and "label_names#_target_" in ex._failure
    assert not marker.exists()


def test_h1_exported_bundles_carry_only_the_plain_overrides_and_list_them(tmp_path, datalist):
    """Even where a site allows job code, an exported bundle never carries it: loading it runs nothing a job sent."""
    overrides = {**TINY_CMR, "job_note": "$'set by a job'"}
    site = build_site(CMR_BUNDLE, {"method": "duallora", **ADAPTER}, datalist, overrides, device="cpu",
                      allow_random_base=True)
    paths = export_site_bundles(site, tmp_path / "bundles", "site-a")
    for folder in paths.values():
        train = json.loads((folder / "configs" / "train.json").read_text())
        assert "job_note" not in train and train["hidden_size"] == TINY_CMR["hidden_size"]
        listed = json.loads((folder / "configs" / "metadata.json").read_text())["trained_weights"]["bundle_overrides"]
        assert listed == sorted([*TINY_CMR, "num_classes"])  # the datalist's class count is applied too


# ---------------------------------------------------------------------------------------------- H2
def package_callables() -> list[str]:
    """Every class and function defined at module level anywhere in the package."""
    out = set()
    for info in pkgutil.walk_packages(flare_duallora.__path__, "flare_duallora."):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - optional extras
            continue
        for name, obj in vars(module).items():
            if callable(obj) and getattr(obj, "__module__", None) == module.__name__ and \
                    (inspect.isclass(obj) or inspect.isfunction(obj)):
                out.add(f"{module.__name__}.{name}")
    return sorted(out)


class _Ws:
    def __init__(self, path):
        self.path = path

    def get_resources_file_path(self):
        return str(self.path)


def test_h2_nvflares_authorizer_with_the_plugins_resources_refuses_every_other_callable(tmp_path):
    install_site_config(tmp_path / "local")
    resources = tmp_path / "local" / "resources.json"
    allow_list = json.loads(resources.read_text())["class_allow_list"]
    assert PACKAGE_PREFIX not in allow_list and not any(e.startswith("flare_duallora") and e not in RUNTIME_CLASSES
                                                        for e in allow_list)
    authorizer, ws = ComponentPathAuthorizer(), _Ws(resources)
    with pytest.raises(UnsafeComponentError, match="not in allow_list"):
        authorizer.authorize_component_config({"path": "flare_duallora.bundle.export.load_bundle_network"},
                                              workspace=ws)
    callables = package_callables()
    assert "flare_duallora.bundle.export.load_bundle_network" in callables and len(callables) > 100
    accepted = []
    for path in callables:
        try:
            authorizer.authorize_component_config({"path": path}, workspace=ws)
            accepted.append(path)
        except UnsafeComponentError:
            pass
    assert sorted(accepted) == sorted(RUNTIME_CLASSES)
    # and the old recommendation, for the record: the package prefix accepts the exploit
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**resources_config(), "class_allow_list": [PACKAGE_PREFIX]}))
    ComponentPathAuthorizer().authorize_component_config(
        {"path": "flare_duallora.bundle.export.load_bundle_network"}, workspace=_Ws(old))


def test_h2_the_allow_list_names_exactly_the_classes_the_jobs_use(tmp_path, cmr_datalists):
    from flare_duallora.deploy.templates import create_job_from_template, list_templates

    recipe = tiny_recipe(cmr_datalists, ["site-a", "site-b"], name="classes", rounds=1)
    recipe.export(str(tmp_path / "jobs"))
    named = {c["path"] for comps in job_components(tmp_path / "jobs" / "classes").values() for c in comps}
    for name in list_templates():
        job = create_job_from_template(name, tmp_path / "t" / name, {}, check=False)
        named |= {c["path"] for comps in job_components(job).values() for c in comps}
    ours = {p for p in named if p.startswith("flare_duallora")}
    assert ours == set(RUNTIME_CLASSES)
    for path in RUNTIME_CLASSES:  # each entry is the class it names
        module, _, name = path.rpartition(".")
        assert inspect.isclass(getattr(importlib.import_module(module), name))


# ---------------------------------------------------------------------------------------------- H3 and item 1
def test_h3_a_bundle_inside_the_jobs_own_folder_is_refused(tmp_path, datalist):
    ws = tmp_path / "ws"
    shipped = ws / JOB_ID / "app_site-a" / "config" / "bundle"
    shutil.copytree(CMR_BUNDLE, shipped)
    # even a site whose bundle_roots cover its whole workspace refuses it
    ex, _ = start(ws, allow(datalist, bundle_roots=[str(ws)]), datalist=str(datalist), bundle_root=str(shipped))
    assert ex.site is None and "inside the job's own folder" in ex._failure and "allow_job_bundles" in ex._failure
    ex, _ = start(ws, allow(datalist, bundle_roots=[str(ws)], allow_job_bundles=True), datalist=str(datalist),
                  bundle_root=str(shipped))
    assert ex.site is not None, ex._failure  # only when the site says so


def test_the_site_decides_which_bundles_and_data_a_job_uses(tmp_path, datalist):
    other = tmp_path / "elsewhere"
    shutil.copytree(CMR_BUNDLE, other)
    ex, _ = start(tmp_path / "a", allow(datalist), datalist=str(datalist), bundle_root=str(other))
    assert "lies outside the bundle folders this site allows" in ex._failure
    ex, _ = start(tmp_path / "b", None, datalist=str(datalist))  # no site configuration: no data folder allowed
    assert "outside the data folders this site allows" in ex._failure
    ex, _ = start(tmp_path / "c", allow(datalist), datalist=str(datalist), bundle_root="pkg://torch/testing")
    assert "does not allow bundles from package 'torch'" in ex._failure
    # a catalogue: the job names the bundle, the site says where it is
    ex, _ = start(tmp_path / "d", {"bundles": {"cmr": str(other)}, "data_roots": [str(datalist.parent)]},
                  datalist=str(datalist), bundle_root="cmr")
    assert ex.site is not None and ex.site.bundle_root == other.resolve(), ex._failure
    # the plugin's packaged bundles are allowed by default
    ex, _ = start(tmp_path / "e", {"data_roots": [str(datalist.parent)]}, datalist=str(datalist),
                  bundle_root="pkg://flare_duallora/bundles/cmr3d_vit_classification")
    assert ex.site is not None, ex._failure
    with pytest.raises(SitePolicyError, match="'data_roots' must be a list"):
        SitePolicy.from_dict({"data_roots": "/data"})


# ---------------------------------------------------------------------------------------------- L3
def test_l3_pkg_paths_are_found_without_importing_the_package(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    pkg = tmp_path / "lib" / "evil_pkg_l3"
    (pkg / "sub" / "bundles" / "b").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (pkg / "sub" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    assert resolve_bundle_path("pkg://evil_pkg_l3/sub/bundles/b") == str(pkg / "sub" / "bundles" / "b")
    assert resolve_bundle_path("pkg://evil_pkg_l3.sub/bundles/b") == str(pkg / "sub" / "bundles" / "b")
    assert not marker.exists() and "evil_pkg_l3" not in sys.modules
    assert find_package_dirs("evil_pkg_l3;import os") == [] and find_package_dirs("../x") == []
    with pytest.raises(FileNotFoundError, match="is not installed here"):
        resolve_bundle_path("pkg://no_such_package_l3/x")


# ---------------------------------------------------------------------------------------------- M1
def test_m1_job_paths_are_not_expanded_and_causes_quote_the_job(tmp_path, monkeypatch, datalist):
    monkeypatch.setenv("HOSPITAL_DB_PASSWORD", "s3cret-value")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    job_path = "/$HOSPITAL_DB_PASSWORD/site-a.json"
    assert resolve_site_path("~/x", "datalist", tmp_path, must_exist=False) == str(tmp_path / "~" / "x")
    with pytest.raises(FileNotFoundError) as err:
        resolve_site_path(job_path, "datalist")
    assert "s3cret" not in str(err.value) and job_path in str(err.value)
    for policy in ({"data_roots": [str(datalist.parent)]}, {"data_roots": ["/"]}):  # refused, or not found
        ex, ctx = start(tmp_path / f"ws{len(policy['data_roots'][0])}", {**allow(datalist), **policy},
                        datalist=job_path)
        reply = task(ex, ctx, {})
        cause = reply.get_header(CAUSE_HEADER)
        assert ex.site is None and "s3cret" not in cause and job_path in cause, cause


# ---------------------------------------------------------------------------------------------- M3
@pytest.mark.parametrize("name", ["/tmp/abs_state", "../escape", "a/b", "..", ".", "", "x\\y", "~"])
def test_m3_state_names_are_simple_names(name):
    with pytest.raises((SitePolicyError, ValueError)):
        DualLoRAExecutor(bundle_root=str(CMR_BUNDLE), settings={"method": "duallora", **ADAPTER}, state_name=name)
    with pytest.raises(SitePolicyError):
        SitePolicy(state_root="/srv/state").state_dir("/ws/local", "site-a", name)


def test_m3_a_job_name_with_separators_cannot_place_state(tmp_path, datalist):
    ex, _ = start(tmp_path / "ws", allow(datalist), job="../../outside", datalist=str(datalist))
    assert ex.site is None and "job name" in ex._failure
    assert not (tmp_path / "outside").exists() and not list(tmp_path.rglob(SITE_STATE_FILE))


def test_m3_a_job_resumes_or_moves_only_state_it_created(tmp_path, datalist):
    ws = tmp_path / "ws"
    policy = allow(datalist)
    ex, ctx = start(ws, policy, job="alpha", datalist=str(datalist))
    assert ex.site is not None, ex._failure
    assert task(ex, ctx, {}).get_return_code() == ReturnCode.OK  # one round: alpha's private state is saved
    state = ex._state_path
    assert state.is_file() and torch.load(state, weights_only=True)["job"] == "alpha"
    before = state.read_bytes()
    for kw in ({"resume": True}, {"resume": False}):
        thief, _ = start(ws, policy, job="beta", datalist=str(datalist), state_name="alpha", **kw)
        assert thief.site is None and "created by another job" in thief._failure
        assert state.read_bytes() == before and len(list(state.parent.glob("site_state*"))) == 1  # nothing moved
    other, _ = start(ws, policy, job="alpha", submitter="mallory@org", datalist=str(datalist), resume=True)
    assert other.site is None and "created by another job" in other._failure
    again, _ = start(ws, policy, job="alpha", datalist=str(datalist), resume=True)
    assert again.site is not None and again.site.trainer.rounds_done == 1, again._failure


# ---------------------------------------------------------------------------------------------- M5 and item 7
def test_m5_fedex_residuals_are_refused_outside_a_fedex_job(tmp_path, datalist):
    ex, ctx = start(tmp_path / "ws", allow(datalist), datalist=str(datalist))
    key = f"{ex.site.adapted.targets[0]}.base_layer.weight"
    base = ex.site.adapted.net.state_dict()[key].clone()
    fp = ex.site.fingerprint
    reply = task(ex, ctx, shared_wire(ex), {FEDEX_META: {key: np.zeros(base.shape, np.float32)}})
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA
    assert "lora_aggregation is 'factors'" in reply.get_header(CAUSE_HEADER)
    assert torch.equal(ex.site.adapted.net.state_dict()[key], base) and ex.site.fingerprint == fp


def test_m5_huge_or_overflowing_residuals_are_refused_before_folding(tmp_path, datalist):
    ex, ctx = start(tmp_path / "ws", allow(datalist), datalist=str(datalist), lora_aggregation="fedex")
    key = f"{ex.site.adapted.targets[0]}.base_layer.weight"
    base = ex.site.adapted.net.state_dict()[key].clone()
    fp, private = ex.site.fingerprint, {k: v.clone() for k, v in ex.site.adapted.private_state().items()}
    for residual, why in ((np.full(base.shape, 3e38, np.float32), "exceeds"),
                          (np.full(base.shape, 1e300, np.float64), "non-finite"),
                          (np.zeros(3, np.float32), "does not fit")):
        reply = task(ex, ctx, shared_wire(ex), {FEDEX_META: {key: residual}})
        assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA and why in reply.get_header(CAUSE_HEADER)
    reply = task(ex, ctx, shared_wire(ex), {FEDEX_META: {"vit.patch_embedding.weight": np.zeros(3, np.float32)}})
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA
    assert torch.equal(ex.site.adapted.net.state_dict()[key], base) and ex.site.fingerprint == fp
    assert all(torch.equal(v, private[k]) for k, v in ex.site.adapted.private_state().items())
    small = np.full(base.shape, 1e-4, np.float32)  # an honest residual is folded
    assert task(ex, ctx, shared_wire(ex), {FEDEX_META: {key: small}}).get_return_code() == ReturnCode.OK
    assert torch.allclose(ex.site.adapted.net.state_dict()[key], base + 1e-4) and ex.site.fingerprint != fp


def test_m5_values_that_overflow_the_networks_dtype_are_refused(tmp_path, datalist):
    ex, ctx = start(tmp_path / "ws", allow(datalist), datalist=str(datalist))
    before = {k: v.clone() for k, v in ex.site.adapted.shared_state().items()}
    wire = shared_wire(ex, dtype=np.float64)
    first = next(iter(wire))
    wire[first] = np.full_like(wire[first], 1e300)  # finite in float64, inf in the network's float32
    reply = task(ex, ctx, wire)
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA and "non-finite" in reply.get_header(CAUSE_HEADER)
    assert all(torch.equal(v, before[k]) for k, v in ex.site.adapted.shared_state().items())


def test_a_site_bounds_how_far_a_global_model_moves(tmp_path, datalist):
    ex, ctx = start(tmp_path / "ws", allow(datalist, max_global_shift=0.5), datalist=str(datalist))
    assert task(ex, ctx, shared_wire(ex)).get_return_code() == ReturnCode.OK
    private = {k: v.clone() for k, v in ex.site.adapted.private_state().items()}
    reply = task(ex, ctx, shared_wire(ex, scale=10.0), current_round=1)
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA and "max_global_shift" in reply.get_header(CAUSE_HEADER)
    assert all(torch.equal(v, private[k]) for k, v in ex.site.adapted.private_state().items())
    assert task(ex, ctx, shared_wire(ex, scale=1.01), current_round=1).get_return_code() == ReturnCode.OK
    # the bound holds across a restart: the state remembers the last global received
    again, ctx2 = start(tmp_path / "ws", allow(datalist, max_global_shift=0.5), datalist=str(datalist), resume=True)
    last = {k: v.numpy() for k, v in again._last_global.items()}
    reply = task(again, ctx2, {k: v * 10 for k, v in last.items()}, current_round=2)
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA and "max_global_shift" in reply.get_header(CAUSE_HEADER)
    assert task(again, ctx2, last, current_round=2).get_return_code() == ReturnCode.OK
    with pytest.raises(SitePolicyError, match="max_global_shift"):
        SitePolicy.from_dict({"max_global_shift": -1})


# ---------------------------------------------------------------------------------------------- H3 end to end
@pytest.mark.slow
def test_h3_a_job_that_ships_a_bundle_and_points_bundle_root_at_it_is_refused_in_the_simulator(tmp_path,
                                                                                               cmr_datalists):
    """The job carries a bundle in site-a's app folder (its train.json would create a file when parsed) and points
    site-a's bundle_root at where the simulator deploys it; site-b runs the ordinary job.  site-a refuses before
    parsing anything; site-b completes under the site configuration the simulator helper wrote."""
    from flare_duallora.deploy.simulate import JOB_ID as SIM_JOB, run_simulator

    sites = ["site-a", "site-b"]
    recipe = tiny_recipe(cmr_datalists, sites, name="shipped", rounds=1, max_failed_sites=1)
    recipe.set_per_site_config({s: {} for s in sites})
    recipe.export(str(tmp_path / "jobs"))
    job, ws, marker = tmp_path / "jobs" / "shipped", tmp_path / "ws", tmp_path / "pwned"
    evil = job / "app_site-a" / "config" / "bundle"
    shutil.copytree(CMR_BUNDLE, evil)
    train = json.loads((evil / "configs" / "train.json").read_text())
    train["hidden_size"] = f"$__import__('pathlib').Path({str(marker)!r}).touch() or 32"
    (evil / "configs" / "train.json").write_text(json.dumps(train))
    config = job / "app_site-a" / "config" / "config_fed_client.json"
    client = json.loads(config.read_text())
    client["executors"][0]["executor"]["args"]["bundle_root"] = str(ws / "site-a" / SIM_JOB / "app_site-a" / "config"
                                                                    / "bundle")
    config.write_text(json.dumps(client))
    r = run_simulator(job, ws, sites, timeout=300)
    failed = r.outputs.failed_sites  # the job tolerates one failed site: it completes and names site-a's cause
    assert r.ok and set(failed) == {"site-a"}, r.describe_failure()
    assert "SitePolicyError" in failed["site-a"] and "inside the job's own folder" in failed["site-a"]
    assert "personalised" in r.site_results["site-b"] and "error" in r.site_results["site-a"]
    assert not marker.exists()
    policy = json.loads((ws / "local" / "flare_duallora.json").read_text())
    assert policy["bundle_roots"] == [str(CMR_BUNDLE)] and policy["data_roots"] == [str(cmr_datalists)]


def test_sim_and_poc_helpers_write_the_site_policy_for_the_paths_the_job_names(tmp_path, cmr_datalists):
    """Where whoever builds the recipe also runs the sites, the recipe allows exactly its own bundle and data."""
    import yaml

    from flare_duallora.deploy.poc import LoopbackPocEnv
    from flare_duallora.deploy.simulate import DualLoRASimEnv

    recipe = tiny_recipe(cmr_datalists, ["site-a", "site-b"], name="paths", rounds=1)
    recipe.process_env(DualLoRASimEnv(clients=recipe.clients, workspace_root=tmp_path / "sim", log=None))
    policy = json.loads((tmp_path / "sim" / "paths" / "local" / "flare_duallora.json").read_text())
    assert policy["bundle_roots"] == [str(CMR_BUNDLE)] and policy["data_roots"] == [str(cmr_datalists)]
    assert policy["state_root"].endswith("paths.state") and not policy.get("allow_job_bundles")
    env = LoopbackPocEnv(workspace=tmp_path / "poc", clients=recipe.clients, log=None)
    recipe.process_env(env)
    project = yaml.safe_load((tmp_path / "poc" / "project.yml").read_text())
    [builder] = [b for b in project["builders"] if b["path"].endswith("SiteConfigBuilder")]
    assert builder["args"]["site_policy"]["bundle_roots"] == [str(CMR_BUNDLE)]
    assert builder["args"]["site_policy"]["data_roots"] == [str(cmr_datalists)]


def test_an_override_may_set_a_components_argument_but_not_replace_the_component(tmp_path, datalist):
    from flare_duallora.bundle.runtime import replaced_components

    assert replaced_components(CMR_BUNDLE, {"network_def": {"x": 1}, "loss": 1}) == ["network_def", "loss"]
    assert replaced_components(CMR_BUNDLE, {**TINY_CMR, "network_def#in_channels": 2, "nope#x": 1}) == []
    ex, _ = start(tmp_path / "ws", allow(datalist), datalist=str(datalist),
                  bundle_overrides={**TINY_CMR, "loss": {"note": "plain, but it replaces the bundle's loss"}})
    assert ex.site is None and "replace whole components" in ex._failure and "'loss'" in ex._failure


@pytest.mark.parametrize("kw", [{"name": "../escape"}, {"name": "my job"}, {"state_name": "/abs/state"}])
def test_the_recipe_refuses_names_the_sites_would_refuse(kw):
    from flare_duallora.deploy.preflight import JobCheckError

    with pytest.raises(JobCheckError, match="expected a simple name"):
        tiny_recipe(None, ["site-a"], **kw)


def test_a_site_can_name_the_ids_a_job_may_override(tmp_path, datalist):
    policy = allow(datalist, override_ids=["image_size", "patch_size", "network_def", "hidden_size", "mlp_dim",
                                           "num_heads"])
    overrides = {**TINY_CMR, "network_def#dropout_rate": 0.0}  # a component's argument, under an allowed id
    ex, _ = start(tmp_path / "a", policy, datalist=str(datalist), bundle_overrides=overrides)
    assert ex.site is not None, ex._failure
    ex, _ = start(tmp_path / "b", policy, datalist=str(datalist), bundle_overrides={**TINY_CMR, "optimizer#lr": 1.0})
    assert ex.site is None and "['optimizer#lr']" in ex._failure and "override_ids" in ex._failure
