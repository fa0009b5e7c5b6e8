"""Real ``nvflare simulator`` runs: results, privacy as seen by the server, restarts, bad sites."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import ADAPTER, CMR_BUNDLE, TINY_CMR
from flare_duallora.flare.job import build_job, export_job
from flare_duallora.flare.simulate import run_simulator
from flare_duallora.training.from_bundle import build_site

pytestmark = pytest.mark.slow
SITES = ["site-a", "site-b"]


def simulate(tmp_path, datalists, method="duallora", rounds=2, sites=SITES, name=None, **kw):
    adapter = {"method": method, **ADAPTER, **kw.pop("adapter", {})}
    job = build_job(name or method, str(CMR_BUNDLE), str(datalists), adapter, num_clients=len(sites), num_rounds=rounds,
                    bundle_overrides=TINY_CMR, **kw)
    job_dir = export_job(job, tmp_path / "jobs")
    result = run_simulator(job_dir, tmp_path / "ws", sites, timeout=600, allow_list=kw.get("allow_list", True))
    return result


def expected_shared_keys(datalists, method):
    site = build_site(CMR_BUNDLE, {"method": method, **ADAPTER}, datalists / "site-a.json", TINY_CMR, device="cpu")
    return set(site.adapted.shared_keys), site.adapted


def test_duallora_job_finishes_global_model_changes_and_sites_report_both_models(tmp_path, cmr_datalists):
    r = simulate(tmp_path, cmr_datalists, rounds=2)
    assert r.ok, r.log[-3000:]
    assert set(r.site_results) == set(SITES)
    for site in SITES:
        for kind in ("personalised", "global_only"):
            m = r.site_results[site][kind]
            assert 0.0 <= m["balanced_accuracy"] <= 1.0 and m["n"] == 2
            assert {"sensitivity", "specificity", "mcc", "auc"} <= set(m)
        records = r.site_records[site]
        trains = [e for e in records if e["event"] == "train"]
        assert [e["round"] for e in trains] == [0, 1]
        assert trains[0]["received_keys"] == 0  # round 0: every site starts from the same seeded adapters
        final = next(e for e in records if e["event"] == "validate")
        assert trains[1]["received_checksum"] != final["received_checksum"]  # the global model moved
        assert trains[0]["bytes_sent"] == trains[1]["bytes_sent"] > 0
    # communication accounting on the server equals what the sites say they sent
    assert len(r.communication) == 2
    for rnd in r.communication:
        assert set(rnd["accepted"]) == set(SITES) and not rnd["rejected"]
        for site in SITES:
            assert rnd["bytes_received"][site] == r.site_records[site][0]["bytes_sent"]


@pytest.mark.parametrize("method", ["duallora", "fedopal", "fedsa", "fedit", "ffa", "local", "full"])
def test_keys_received_by_server_are_exactly_the_method_shared_set(tmp_path, cmr_datalists, method):
    r = simulate(tmp_path, cmr_datalists, method=method, rounds=1)
    assert r.ok, r.log[-3000:]
    shared, adapted = expected_shared_keys(cmr_datalists, method)
    weights = [e for e in r.received if e["kind"] == "WEIGHTS"]
    assert len(weights) == len(SITES)  # one training result per site, as received by the server
    for entry in weights:
        keys = set(entry["keys"])
        assert keys == shared, f"{method}: {sorted(keys ^ shared)[:5]}"
        if method in ("duallora", "fedopal", "fedsa", "local"):
            assert not keys & set(adapted.private_keys)
            assert not any(".local." in k for k in keys)
        if method != "full":
            assert not any(".base_layer." in k for k in keys)
    assert set(r.global_model) == shared
    if method == "fedsa":
        assert all(".lora_B." not in k for k in r.global_model)


def test_restarted_site_continues_with_its_saved_local_adapters(tmp_path, cmr_datalists):
    state_dir = str(tmp_path / "site_state" / "{site}")
    first = simulate(tmp_path / "run1", cmr_datalists, rounds=1, state_dir=state_dir)
    assert first.ok, first.log[-3000:]
    second = simulate(tmp_path / "run2", cmr_datalists, rounds=1, state_dir=state_dir)
    assert second.ok, second.log[-3000:]
    for site in SITES:
        saved = first.site_records[site][0]["private_checksum_after"]
        restored = next(e for e in second.site_records[site] if e["event"] == "restored")
        assert restored["private_checksum"] == saved
        assert restored["rounds_done"] == 1
        train = next(e for e in second.site_records[site] if e["event"] == "train")
        assert train["private_checksum_before"] == saved
        assert first.site_records[site][0]["private_checksum_before"] != saved  # training did change them
    state = torch.load(tmp_path / "site_state" / "site-a" / "site_state.pt", weights_only=False)
    assert state["private"] and all(".local." in k or "classification_head" in k for k in state["private"])


def test_site_without_datalist_fails_clearly_and_the_others_finish(tmp_path, cmr_datalists):
    r = simulate(tmp_path, cmr_datalists, rounds=1, sites=["site-a", "site-missing"])
    assert re.search(r"site-missing: datalist .*site-missing\.json does not exist \(setting 'datalist_dir'", r.log)
    assert "site-a" in r.site_results and "site-missing" not in r.site_results
    assert set(r.communication[0]["accepted"]) == {"site-a"}


def test_simulator_refuses_plugin_classes_without_the_allow_list_entry(tmp_path, cmr_datalists):
    job = build_job("noallow", str(CMR_BUNDLE), str(cmr_datalists), {"method": "duallora", **ADAPTER},
                    num_clients=2, num_rounds=1, bundle_overrides=TINY_CMR)
    r = run_simulator(export_job(job, tmp_path / "jobs"), tmp_path / "ws", SITES, allow_list=False, timeout=300)
    assert "not in allow_list" in r.log and "flare_duallora." in r.log
    assert not r.site_results


def test_site_privacy_scope_filter_runs_on_every_task_before_the_job(tmp_path, cmr_datalists):
    """A site scope with a stricter rule than the job's (FFA forbids lora_A) blocks the duallora results it sees:
    proof that FLARE applies the privacy.json scope to the train task, whatever the job's own filters are."""
    from flare_duallora.flare.site_config import privacy_config

    job = build_job("scoped", str(CMR_BUNDLE), str(cmr_datalists), {"method": "duallora", **ADAPTER},
                    num_clients=2, num_rounds=1, bundle_overrides=TINY_CMR)
    r = run_simulator(export_job(job, tmp_path / "jobs"), tmp_path / "ws", SITES,
                      privacy=privacy_config("ffa", "vit.classification_head"), timeout=300)
    assert "blocked a result carrying" in r.log and "lora_A.global" in r.log
    assert not [e for e in r.received if e["kind"] == "WEIGHTS"]  # nothing of the blocked results arrived
    assert not r.global_model
