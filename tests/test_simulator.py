"""Real ``nvflare simulator`` runs: results as users get them, failures that fail, hostile sites, lost processes.

Each run is expensive (about 20-40 s on 2 cores), so one run serves several assertions.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType

from conftest import ADAPTER, CMR_BUNDLE, TASKS, TINY_CMR, run_sim, tiny_recipe, write_random_cmr_site
from flare_duallora.deploy.processes import find_processes
from flare_duallora.deploy.simulate import run_simulator
from flare_duallora.flare.run_files import read_jsonl, simulator_state_root
from flare_duallora.training.site import state_checksum
from flare_duallora.training.site_state import file_sha256
from hostile import HostileResultFilter, PoisonGlobal, RecordTraffic, load_traffic

pytestmark = pytest.mark.slow
SITES = ["site-a", "site-b"]


OUR_FILES = ("site_results.json", "communication.json", "run_status.json", "progress.jsonl", "received_keys.jsonl",
             "site_records.jsonl", "metadata.json")


def strict_json_files(folder: Path) -> list[Path]:
    """Every result file the plugin writes under ``folder`` parses as strict JSON (no NaN / Infinity tokens)."""
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    files = [p for name in OUR_FILES for p in folder.rglob(name)]
    for path in files:
        text = path.read_text()
        lines = text.splitlines() if path.suffix == ".jsonl" else [text]
        for line in lines:
            if line.strip():
                json.loads(line, parse_constant=refuse)
    return files


def site_state_file(ws: Path, job: str, site: str, key: str) -> Path:
    return simulator_state_root(ws / job) / site / key / "site_state.pt"


# ---------------------------------------------------------------------------------------------- the main run
@pytest.fixture(scope="module")
def main_run(tmp_path_factory, cmr_datalists):
    """A duallora job built with relative paths from another folder, run to completion."""
    root = tmp_path_factory.mktemp("main_run")
    build = root / "build"
    build.mkdir()
    cwd = os.getcwd()
    os.chdir(build)
    try:
        rel = os.path.relpath(cmr_datalists, build)
        recipe = tiny_recipe(Path(rel), SITES, name="main", rounds=2)
        assert not os.path.isabs(rel) and recipe.plan.datalist_dir == str(cmr_datalists)
    finally:
        os.chdir(cwd)
    result = run_sim(recipe, root / "ws")
    return recipe, result, root / "ws"


def test_a_job_built_with_relative_paths_elsewhere_runs_to_completion(main_run):
    recipe, r, ws = main_run
    assert r.ok, r.describe_failure()
    assert r.outputs.status["status"] == "completed" and r.outputs.status["rounds_completed"] == 2
    assert set(r.site_results) == set(SITES)
    for site in SITES:
        for kind in ("personalised", "global_only"):
            m = r.site_results[site][kind]
            assert 0.0 <= m["balanced_accuracy"] <= 1.0 and m["n"] == 2
            # per-class metrics pass the closed filter for the classes the site's bundle declares (issue 17)
            assert [name for name in m if name.startswith("specificity/")]
        records = r.site_records[site]
        trains = [e for e in records if e["event"] == "train"]
        assert [e["round"] for e in trains] == [0, 1] and [e["rounds_done"] for e in trains] == [1, 2]
        assert trains[0]["received_keys"] == 0  # round 0: every site starts from the same seeded adapters
        final = next(e for e in records if e["event"] == "validate")
        assert trains[1]["received_checksum"] != final["received_checksum"]  # the global model moved
        assert set(trains[0]["metrics"]) == {"global_only_received", "personalised_after_training"}
        bundles = final["bundles"]
        meta = json.loads((Path(bundles["personalised"]) / "configs" / "metadata.json").read_text())
        assert meta["trained_weights"]["site"] == site
        assert site_state_file(ws, "main", site, "main").is_file()  # private state under local/, by state key


def test_the_server_knew_the_schema_and_every_site_reports_the_same_base(main_run):
    recipe, r, _ = main_run
    prints = {next(e for e in r.site_records[s] if e["event"] == "started")["fingerprint"] for s in SITES}
    assert prints == {recipe.plan.fingerprint}  # allow_random_base: the same seeded base on every site
    assert set(r.global_model) == set(recipe.plan.schema)
    assert {k: list(v.shape) for k, v in r.global_model.items()} == recipe.plan.schema
    weights = [e for e in r.received if e["kind"] == "WEIGHTS"]  # 2 rounds, and the initial state before round 0
    assert sorted(e["task"] for e in weights) == ["submit_model"] * len(SITES) + ["train"] * 2 * len(SITES)
    assert all(set(e["keys"]) == set(recipe.plan.schema) for e in weights)
    assert not any(".local." in k or ".base_layer." in k for e in weights for k in e["keys"])


def test_communication_and_progress_are_labelled_and_strict_json(main_run):
    _, r, ws = main_run
    comm = json.loads((r.outputs.server_dir / "communication.json").read_text())
    assert "bytes_received" in comm["fields"] and [x["round"] for x in comm["rounds"]] == [0, 1]
    for rnd in comm["rounds"]:
        assert set(rnd["accepted"]) == set(SITES) and not rnd["rejected"] and rnd["aggregated"]
        for site in SITES:
            assert rnd["bytes_received"][site] == r.site_records[site][-2]["bytes_sent"]
    assert [p["round"] for p in r.outputs.progress] == [0, 1]
    assert all(p["answered"] == SITES and p["mean_loss"] > 0 for p in r.outputs.progress)
    assert len(strict_json_files(ws / "main")) >= 6


def test_a_restart_with_changed_settings_refuses_from_the_cli_and_keeps_the_state_file(main_run, tmp_path,
                                                                                       cmr_datalists):
    """The same state key, resume = true and local_rank 4 -> 8: every site refuses to start, names the file and
    the mismatch; the run fails (exit 1 from the CLI), and the state files are bit-identical."""
    recipe0, r0, ws = main_run
    files = {s: site_state_file(ws, "main", s, "main") for s in SITES}
    before = {s: file_sha256(f) for s, f in files.items()}
    recipe = tiny_recipe(cmr_datalists, SITES, name="main", rounds=3, resume=True, settings={"local_rank": 8})
    recipe.export(str(tmp_path / "jobs"))
    proc = subprocess.run([sys.executable, "-m", "flare_duallora.cli", "simulate", str(tmp_path / "jobs" / "main"),
                           "--clients", ",".join(SITES), "--workspace", str(ws / "main"), "--timeout", "300"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for site in SITES:
        assert f"{site}: round 2: return code EXECUTION_EXCEPTION: {site}: StateFileError:" in proc.stderr
        assert str(files[site]) in proc.stderr and "local_rank: saved None, job 8" in proc.stderr
        assert file_sha256(files[site]) == before[site]


# ---------------------------------------------------------------------------------------------- a hostile site
def test_one_hostile_site_can_not_poison_the_global_model(tmp_path, cmr_datalists):
    """Three sites, site-c lies: NaN in round 0, 1e30-scaled weights in round 1, a key subset in round 2.  With
    max_failed_sites = 1 the run completes, every global model is finite and equals the honest sites' aggregate,
    and every rejection is in communication.json with its reason."""
    sites = ["site-a", "site-b", "site-c"]
    recipe = tiny_recipe(cmr_datalists, sites, name="hostile", rounds=3, max_failed_sites=1)
    recipe.set_per_site_config({s: {} for s in sites})
    recipe.add_client_output_filter(HostileResultFilter(), tasks=list(TASKS), clients=["site-c"])
    recipe.add_server_input_filter(RecordTraffic("in"), tasks=list(TASKS))
    recipe.add_server_output_filter(RecordTraffic("out"), tasks=list(TASKS))
    r = run_sim(recipe, tmp_path / "ws", timeout=400)
    assert r.ok, r.describe_failure()
    assert set(r.outputs.failed_sites) == {"site-c"} and set(r.site_results) == set(sites)
    rounds = r.communication
    reasons = [rnd["rejected"]["site-c"] for rnd in rounds]
    assert "non-finite" in reasons[0] and "exceeds 100 x the norm" in reasons[1] and "key set differs" in reasons[2]
    assert all(set(rnd["accepted"]) == {"site-a", "site-b"} for rnd in rounds)
    traffic = r.outputs.server_dir / "traffic"
    for rnd in range(3):
        honest = [load_traffic(traffic / f"in_train_r{rnd}_{s}.npz") for s in ("site-a", "site-b")]
        sizes = [float(extra["__dataset_size"]) for _, extra in honest]
        nxt = traffic / (f"out_train_r{rnd + 1}.npz" if rnd < 2 else "out_validate_rNone.npz")
        sent, _ = load_traffic(nxt)
        for key, value in sent.items():
            assert np.isfinite(value).all()
            expected = sum(w * h[key].astype(np.float64) for w, (h, _) in zip(sizes, honest)) / sum(sizes)
            assert np.allclose(value, expected, atol=1e-6), (rnd, key)


# ---------------------------------------------------------------------------------------------- a poisoned server
def test_a_nan_global_model_is_refused_and_leaves_the_state_file_bit_identical(tmp_path, cmr_datalists):
    recipe = tiny_recipe(cmr_datalists, SITES, name="poisoned", rounds=2)
    recipe.add_server_output_filter(PoisonGlobal(poison_round=1), tasks=["train"])
    r = run_sim(recipe, tmp_path / "ws")
    assert not r.ok and r.outputs.status["status"] == "failed"
    for site in SITES:
        records = r.site_records[site]
        saved = next(e for e in records if e["event"] == "train")["state_sha256"]
        error = next(e for e in records if e["event"] == "error")
        assert error["return_code"] == "BAD_TASK_DATA" and "non-finite" in error["cause"]
        assert file_sha256(site_state_file(tmp_path / "ws", "poisoned", site, "poisoned")) == saved
        assert "BAD_TASK_DATA" in r.failures[site] and "private state is unchanged" in r.failures[site]
    assert "site-a:" in r.describe_failure() and "site-b:" in r.describe_failure()


# ---------------------------------------------------------------------------------------------- unsafe input
class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_exploit_state_and_job_code_are_refused_without_running(tmp_path, cmr_datalists):
    """site-a finds a pickle with __reduce__ where its state file should be (resume = true): refused, not run,
    left as it is.  site-b gets bundle_overrides with a `$` expression: refused before the bundle is parsed."""
    from flare_duallora.flare.audit import ReceivedKeysAudit
    from flare_duallora.flare.controller import PersonalisedFedAvg
    from flare_duallora.flare.executor import DualLoRAExecutor
    from flare_duallora.flare.filters import PrivateKeyFilter

    ws = tmp_path / "ws"
    marker = tmp_path / "pwned"
    planted = site_state_file(ws, "unsafe", "site-a", "unsafe")
    planted.parent.mkdir(parents=True)
    planted.write_bytes(pickle.dumps({"private": Exploit(marker)}))
    # planted by someone who can write the site's state folder, with the owner record of the job that resumes it
    (planted.parent / "state_owner.json").write_text(json.dumps({"job": "unsafe", "submitter": None}))
    sha = file_sha256(planted)
    sharing = {"method": "duallora", "head": ["vit.classification_head"]}
    job = FedJob(name="unsafe", min_clients=2)
    job.set_app_packages(["flare_duallora"])
    job.to_server(PersonalisedFedAvg(sharing, num_clients=2, num_rounds=1))
    job.to_server(ReceivedKeysAudit(), tasks=list(TASKS), filter_type=FilterType.TASK_RESULT)
    common = dict(bundle_root=str(CMR_BUNDLE), settings={"method": "duallora", **ADAPTER}, datalist_dir=str(cmr_datalists),
                  allow_random_base=True, device="cpu", state_name="unsafe", resume=True)
    job.to(DualLoRAExecutor(bundle_overrides=TINY_CMR, **common), "site-a", tasks=list(TASKS))
    job.to(DualLoRAExecutor(bundle_overrides={**TINY_CMR, "hidden_size": "$__import__('os').getpid() % 1 + 32"},
                            **common), "site-b", tasks=list(TASKS))
    for site in ("site-a", "site-b"):
        job.to(PrivateKeyFilter(sharing), site, tasks=list(TASKS), filter_type=FilterType.TASK_RESULT)
    job.export_job(str(tmp_path / "jobs"))
    r = run_simulator(tmp_path / "jobs" / "unsafe", ws / "unsafe", ["site-a", "site-b"], timeout=300)
    assert not r.ok
    assert "StateFileError" in r.failures["site-a"] and "cannot be loaded safely" in r.failures["site-a"]
    assert str(planted) in r.failures["site-a"]
    assert "SitePolicyError" in r.failures["site-b"] and "bundle_overrides hold config expressions" in \
        r.failures["site-b"]
    assert not marker.exists() and file_sha256(planted) == sha


# ---------------------------------------------------------------------------------------------- kill -9 and resume
def test_kill_9_in_round_2_and_a_restart_with_resume_continue_where_the_run_stopped(tmp_path, cmr_datalists):
    ws = tmp_path / "ws"
    recipe = tiny_recipe(cmr_datalists, SITES, name="resumable", rounds=4, local_steps=12)
    job_ws = ws / "resumable"
    box = {}
    runner = threading.Thread(target=lambda: box.update(result=run_sim(recipe, ws, timeout=300)))
    runner.start()
    progress = job_ws / "server" / "simulate_job" / "progress.jsonl"
    deadline = time.monotonic() + 240
    while len(read_jsonl(progress)) < 2 and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.1)
    assert len(read_jsonl(progress)) == 2, "the run did not reach round 2"
    procs = find_processes(job_ws)
    assert procs
    for pid in procs:  # a machine going down: kill -9, no END_RUN anywhere
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    runner.join(60)
    first = box["result"]
    assert not first.ok
    server_state = torch.load(simulator_state_root(job_ws) / "server" / "resumable" / "server_state.pt",
                              weights_only=True)
    assert server_state["round_completed"] == 1
    round1_global = state_checksum(server_state["global"])
    after_round1 = {s: next(e for e in first.site_records[s] if e["event"] == "train" and e["round"] == 1)
                    ["private_checksum_after"] for s in SITES}

    resumed = tiny_recipe(cmr_datalists, SITES, name="resumable", rounds=4, local_steps=12, resume=True)
    second = run_sim(resumed, ws)
    assert second.ok, second.describe_failure()
    assert [p["round"] for p in second.outputs.progress] == [2, 3]
    for site in SITES:
        trains = [e for e in second.site_records[site] if e["event"] == "train"]
        assert [e["round"] for e in trains] == [2, 3]
        assert trains[0]["received_checksum"] == round1_global  # the round-1 global model
        assert trains[0]["private_checksum_before"] == after_round1[site]  # the private state after round 1
        assert any(e["event"] in ("restored", "rolled_back") for e in second.site_records[site])


# ---------------------------------------------------------------------------------------------- site configuration
def test_the_simulator_refuses_plugin_classes_without_the_allow_list_entry(tmp_path, cmr_datalists):
    recipe = tiny_recipe(cmr_datalists, SITES, name="noallow", rounds=1)
    recipe.export(str(tmp_path / "jobs"))
    r = run_simulator(tmp_path / "jobs" / "noallow", tmp_path / "ws", SITES, allow_list=False, timeout=120)
    assert not r.ok
    assert "not in allow_list" in r.log and "flare_duallora." in r.log
    assert not r.site_results


def test_a_site_privacy_scope_runs_on_every_task_before_the_job(tmp_path, cmr_datalists):
    """A site scope stricter than the job's (FFA forbids lora_A) blocks the duallora results it sees: FLARE applies
    the privacy.json scope to the train task, whatever the job's own filters are; the run fails and says so."""
    from flare_duallora.deploy.site_config import privacy_config

    recipe = tiny_recipe(cmr_datalists, SITES, name="scoped", rounds=1)
    recipe.export(str(tmp_path / "jobs"))
    scope = privacy_config({"method": "ffa", "head": ["vit.classification_head"]})
    r = run_simulator(tmp_path / "jobs" / "scoped", tmp_path / "ws", SITES, privacy=scope, timeout=300)
    assert "blocked a WEIGHTS result carrying" in r.log and "lora_A.global" in r.log
    assert not [e for e in r.received if e["kind"] == "WEIGHTS"]
    assert not r.ok and set(r.failures) == set(SITES)


def test_the_simulate_command_prints_the_per_site_table_like_the_demo(tmp_path, cmr_datalists):
    """`flare-duallora simulate` on an exported job ends with the demo's per-site table (both models, each site's
    validation size, the means) and where the results are, not only 'completed'."""
    recipe = tiny_recipe(cmr_datalists, SITES, name="table", rounds=1)
    recipe.export(str(tmp_path / "jobs"))
    proc = subprocess.run([sys.executable, "-m", "flare_duallora.cli", "simulate", str(tmp_path / "jobs" / "table"),
                           "--clients", ",".join(SITES), "--workspace", str(tmp_path / "ws"), "--timeout", "300"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Per-site results of table (each site's own validation data):" in out
    assert "| site | n val | model | balanced_accuracy |" in out
    for site in SITES:
        assert f"| {site} | 2 | personalised |" in out and f"| {site} | 2 | global-only |" in out
    assert "| **mean** | | personalised |" in out and "results: " in out and "site_results.json" in out
