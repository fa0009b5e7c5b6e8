"""What a site checks before it trains: its data, its state folder, the job's overrides; and what the registry and
the simulator runner refuse (fast unit tests; the simulator tests show the same refusals end to end)."""

from __future__ import annotations

import json
import time

import pytest

from conftest import ADAPTER, CMR_BUNDLE, TINY_CMR, tiny_recipe, write_random_cmr_site
from flare_duallora.bundle.paths import code_in_overrides
from flare_duallora.data.datalists import read_site_datalist
from flare_duallora.data.records import DatasetFormatError
from flare_duallora.engine import METHODS, register_method
from flare_duallora.flare.site_policy import SitePolicy, SitePolicyError
from flare_duallora.training.from_bundle import build_site


def test_datalist_errors_name_the_file_and_the_item(tmp_path):
    path = write_random_cmr_site(tmp_path, "site-a", n=4, n_val=1)
    info = json.loads(path.read_text())
    info["training"][1]["label"] = 5
    path.write_text(json.dumps(info))
    with pytest.raises(DatasetFormatError, match=r"site-a\.json: training item 1 \(subject site-a-2\): label 5 is "
                                                 r"outside 0\.\.1 \(num_classes 2\)"):
        read_site_datalist(path)
    info["training"][1]["label"] = "disease"
    path.write_text(json.dumps(info))
    with pytest.raises(DatasetFormatError, match="training item 1 .*not an integer"):
        read_site_datalist(path)
    path.write_text('{"training": [}')
    with pytest.raises(DatasetFormatError, match=r"site-a\.json is not valid JSON: .* at line 1 column"):
        read_site_datalist(path)
    path.write_text(json.dumps({"training": [{"label": 0}]}))
    with pytest.raises(DatasetFormatError, match="has no 'validation' list"):
        read_site_datalist(path)


def test_labels_beyond_the_bundles_class_count_and_wrong_channels_are_refused_at_start(tmp_path):
    path = write_random_cmr_site(tmp_path, "site-a", n=4, n_val=1)
    info = json.loads(path.read_text())
    info["validation"][0]["label"] = 3  # the datalist says 2 classes; a validation label 3 would pass silently
    path.write_text(json.dumps(info))
    with pytest.raises(DatasetFormatError, match="validation item 0 .*label 3 is outside 0..1"):
        build_site(CMR_BUNDLE, {"method": "duallora", **ADAPTER}, path, TINY_CMR, device="cpu",
                   allow_random_base=True)
    good = write_random_cmr_site(tmp_path, "site-b", n=4, n_val=1)
    with pytest.raises(DatasetFormatError, match=r"training item 0 has 2 image channel\(s\) .* input layer takes 3"):
        build_site(CMR_BUNDLE, {"method": "duallora", **ADAPTER}, good, {**TINY_CMR, "network_def#in_channels": 3},
                   device="cpu", allow_random_base=True)


def test_a_site_keeps_private_state_only_where_it_allows(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    policy = SitePolicy()
    assert policy.check_state_dir(ws / "state" / "x", ws) == (ws / "state" / "x").resolve()
    with pytest.raises(SitePolicyError, match="lies outside the site workspace"):
        policy.check_state_dir(tmp_path / "elsewhere", ws)
    with pytest.raises(SitePolicyError, match="outside"):
        policy.check_state_dir(ws / ".." / "escape", ws)
    allowed = SitePolicy(allowed_state_dirs=[str(tmp_path / "fl_state")])
    assert allowed.check_state_dir(tmp_path / "fl_state" / "job", ws)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "flare_duallora.json").write_text('{"allow_job_code": "yes"}')
    with pytest.raises(SitePolicyError, match="'allow_job_code' must be true or false"):
        SitePolicy.load(tmp_path / "local")
    (tmp_path / "local" / "flare_duallora.json").write_text('{"state_roots": []}')
    with pytest.raises(SitePolicyError, match=r"unknown setting\(s\) \['state_roots'\]"):
        SitePolicy.load(tmp_path / "local")


def test_job_code_in_bundle_overrides_is_found_wherever_it_hides():
    assert code_in_overrides({"image_size": [32, 32, 8], "name": "plain", "lr": 0.1}) == []
    found = code_in_overrides({"a": "$__import__('os')", "b": {"_target_": "os.system"}, "c": ["@network", 1],
                               "d": "%train#x"})
    assert len(found) == 4 and any("_target_" in f for f in found)


def test_a_method_name_can_be_registered_once():
    with pytest.raises(ValueError, match="method 'duallora' is already registered"):
        register_method(METHODS["duallora"])


@pytest.mark.slow
def test_a_simulator_run_that_times_out_is_stopped_whole_and_reported(tmp_path, cmr_datalists):
    from flare_duallora.deploy.processes import find_processes
    from flare_duallora.deploy.simulate import run_simulator

    recipe = tiny_recipe(cmr_datalists, ["site-a", "site-b"], name="slow", rounds=50)
    recipe.export(str(tmp_path / "jobs"))
    start = time.monotonic()
    r = run_simulator(tmp_path / "jobs" / "slow", tmp_path / "ws", ["site-a", "site-b"], timeout=15)
    assert time.monotonic() - start < 60
    assert not r.ok and r.timed_out and r.returncode == 124
    assert "timed out" in r.describe_failure()
    assert not find_processes(tmp_path / "ws")  # the whole process group is gone
