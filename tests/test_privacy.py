"""Differential privacy (job setting ``differential_privacy``): DP-SGD through the training-step seam, a whole-job
budget kept in the site's state, and the reported epsilon recomputed independently."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from flare_duallora.training.batch import logits_of
from flare_duallora.training.privacy import (
    DPSettings, DPSGDStep, Forward, PrivacyBudgetExceeded, PrivacyError, StandardStep, make_training_step,
    trainable_batchnorms,
)
from conftest import CMR_BUNDLE, TINY_CMR
from test_prefix_cache import dataset, trainer

DP = {"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0, "rounds": 3}


def dp_trainer(method="duallora", dp=DP, data=None, cache="off", **kw):
    t, data = trainer(method, data=data)
    t.configure_cache(cache, data)
    step = make_training_step(dp, data, batch_size=4, local_epochs=1, **kw)
    t.set_training_step(step)
    return t, step, data


def independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """RDP of the subsampled Gaussian (opacus' analysis functions, our own orders) converted to (epsilon, delta)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 256]
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


def test_reported_epsilon_matches_an_independent_recomputation_and_stays_within_the_target():
    t, step, _ = dp_trainer()
    for _ in range(3):
        t.train_round(1)
    r = step.report()
    assert set(r) >= {"epsilon", "delta", "target_epsilon", "noise_multiplier", "sample_rate", "steps", "accountant",
                      "unit"}
    assert r["steps"] == 3 * step.steps_per_round == step.planned_steps and r["accountant"] == "rdp"
    assert r["unit"] == "item" and r["sample_rate"] == pytest.approx(4 / 10)
    again = independent_epsilon(r["noise_multiplier"], r["sample_rate"], r["steps"], r["delta"])
    assert r["epsilon"] == pytest.approx(again, rel=0.02)
    assert r["epsilon"] <= r["target_epsilon"] and r["epsilon"] > 0.9 * r["target_epsilon"]  # calibrated to it
    # a lower noise multiplier would have spent more than the target over the planned steps
    assert independent_epsilon(0.9 * r["noise_multiplier"], r["sample_rate"], r["steps"], r["delta"]) > 3.0


def test_a_round_beyond_the_target_is_refused_and_the_spent_budget_survives_a_restart():
    t, step, data = dp_trainer()
    t.train_round(1)
    saved = t.site_state()
    assert saved["privacy"]["steps"] == step.steps_per_round
    # a restarted site continues the count
    t2, step2, _ = dp_trainer(data=data)
    t2.load_site_state(saved)
    assert step2.steps_spent == step.steps_per_round and step2.epsilon() == pytest.approx(step.epsilon())
    t2.train_round(1)
    t2.train_round(1)
    before = {k: v.clone() for k, v in t2.adapted.private_state().items()}
    with pytest.raises(PrivacyBudgetExceeded, match=r"round 3: refused .*past the target epsilon 3"):
        t2.train_round(1)
    assert all(torch.equal(v, t2.adapted.private_state()[k]) for k, v in before.items())  # nothing trained
    # the ledger never goes back: a roll-back to an earlier state file keeps what was spent
    t2.load_site_state(saved)
    assert step2.steps_spent == 3 * step2.steps_per_round


def test_states_of_other_privacy_settings_or_without_privacy_are_refused():
    t, step, data = dp_trainer()
    t.train_round(1)
    dp_state = t.site_state()
    plain, _ = trainer()
    with pytest.raises(PrivacyError, match="trains without 'differential_privacy'"):
        plain.load_site_state(dp_state)
    other, _, _ = dp_trainer(dp={**DP, "epsilon": 8.0}, data=data)
    with pytest.raises(PrivacyError, match="target_epsilon: saved 3.0, job 8.0"):
        other.load_site_state(dp_state)
    plain.train_round(1)
    fresh, _, _ = dp_trainer(data=data)
    with pytest.raises(PrivacyError, match="1 round\\(s\\) trained without differential privacy"):
        fresh.load_site_state(plain.site_state())


def test_per_example_gradients_are_clipped_with_an_outlier_and_noise_reaches_every_trained_parameter():
    data = [{"image": d["image"], "label": torch.tensor(1 if i == 0 else 0)} for i, d in enumerate(dataset(10))]
    t, step, _ = dp_trainer(data=data)
    # the outlier: the batch's only example of a class weighted 50 x (its loss, and gradient, are 50 x a normal one's)
    t.loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 50.0]))
    t._set_train_mode()
    batch = torch.utils.data.default_collate(data[:4])
    net = t.adapted.net
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    individual = []
    one = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 50.0]), reduction="sum")
    for i in range(4):  # each example's own gradient, the plain way
        net.zero_grad()
        one(logits_of(net(batch["image"][i:i + 1])), batch["label"][i:i + 1]).backward()
        individual.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()})
    norms = torch.stack([torch.cat([g.flatten() for g in d.values()]).norm() for d in individual])
    top = norms.sort(descending=True).values
    assert int(norms.argmax()) == 0 and top[0] > 5 * top[1]  # the outlier's gradient stands out
    step.settings.max_grad_norm = clip = float(top[0] + top[1]) / 2  # only the outlier is clipped
    x = batch["image"]
    step.step(t, Forward(lambda x: logits_of(net(x)), (x,)), batch["label"])
    last = step.last
    assert torch.allclose(last["norms"], norms, rtol=1e-3)
    assert float(last["clipped_norms"].max()) <= clip * (1 + 1e-4)
    assert last["clipped_norms"][0] == pytest.approx(clip, rel=1e-3)
    assert torch.allclose(last["clipped_norms"][1:], norms[1:], rtol=1e-3)  # the others are left as they are
    for name in params:  # the clipped sum is what the outlier's bounded share gives
        expected = sum(min(1.0, clip / float(norms[i])) * individual[i][name] for i in range(4))
        assert torch.allclose(last["summed"][name], expected, atol=1e-5), name
    # noise on every trained parameter: shared and private LoRA and the head
    assert any(".local." in n for n in params) and any(".global." in n for n in params)
    assert any("classification_head" in n for n in params)
    for name, p in params.items():
        noise = p.grad.float() * step.expected_units - last["summed"][name]
        assert torch.allclose(noise, last["noise"][name], atol=1e-4), name
        assert float(noise.abs().max()) > 0, name
        if noise.numel() > 50:
            assert float(noise.std()) == pytest.approx(step.noise_multiplier * clip, rel=0.3), name


def test_subjects_are_the_unit_where_items_share_one():
    class Items(list):
        @property
        def data(self):
            return [{"subject": f"s{i // 2}"} for i in range(len(self))]

    data = Items(dataset(12))
    step = make_training_step(DP, data, batch_size=4)
    assert step.unit == "subject" and len(step.members) == 6 and step.members[1] == [2, 3]
    assert step.sample_rate == pytest.approx(2 / 6) and "6 subjects" in step.guarantee()
    # one subject's two items are clipped together: their summed gradient's norm is bounded
    t, _ = trainer(data=data)
    t.set_training_step(step)
    t._set_train_mode()
    draws = [([0, 1, 2, 3], [0, 0, 1, 1])]
    forward, y = next(t._index_batches(draws))
    step.step(t, forward, y)
    assert step.last["norms"].shape == (2,) and float(step.last["clipped_norms"].max()) <= 1.0 + 1e-4
    with pytest.raises(PrivacyError, match="'subject' key"):
        make_training_step({**DP, "unit": "subject"}, dataset(4), batch_size=2)


def test_dp_training_works_with_the_prefix_cache_and_pfedst():
    for method in ("duallora", "pfedst"):
        t, step, data = dp_trainer(method, cache="auto")
        assert t.cache is not None, method
        before = {k: v.clone() for k, v in t.adapted.private_state().items()}
        stats = t.train_round(1)
        assert stats.steps == step.steps_per_round and math.isfinite(stats.loss)
        assert any(not torch.equal(v, t.adapted.private_state()[k]) for k, v in before.items()), method


def test_settings_and_modules_that_cannot_be_private_are_refused():
    assert DPSettings.from_dict(None) is None and DPSettings.from_dict({}) is None
    assert isinstance(make_training_step(None, dataset(4), 2), StandardStep)
    for bad, match in (({"delta": 1e-5}, "'epsilon'"), ({"epsilon": -1}, "differential_privacy.epsilon"),
                       ({"epsilon": 1, "delta": 2}, "differential_privacy.delta"),
                       ({"epsilon": 1, "accountant": "gdp"}, "accountant"), ({"epsilon": 1, "eps": 2}, "unknown")):
        with pytest.raises(PrivacyError, match=match):
            DPSettings.from_dict(bad)
    with pytest.raises(PrivacyError, match="rounds"):
        make_training_step({"epsilon": 1.0}, dataset(4), 2)
    with pytest.raises(PrivacyError, match="no noise multiplier"):
        make_training_step({"epsilon": 1e-9, "rounds": 1}, dataset(4), 2)
    from flare_duallora.engine import AdapterSettings

    with pytest.raises(PrivacyError, match="repr"):
        make_training_step(DP, dataset(4), 2, adapter_settings=AdapterSettings(method="fedopal", orth_mode="repr"))
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(2, 2))
    assert trainable_batchnorms(net) == ["1"]
    net[1].eval()
    net[1].requires_grad_(False)
    assert trainable_batchnorms(net, set_train_mode=lambda: (net.train(), net[1].eval())) == []


# ---------------------------------------------------------------------------------------------- job settings
def test_the_recipe_cli_and_templates_carry_the_budget_and_refuse_what_cannot_be_private(tmp_path, cmr_datalists):
    from conftest import tiny_recipe
    from flare_duallora.cli import main
    from flare_duallora.deploy.job_configs import executor_args, job_components
    from flare_duallora.deploy.preflight import JobCheckError
    from flare_duallora.deploy.templates import create_job_from_template

    recipe = tiny_recipe(cmr_datalists, ["site-a", "site-b"], rounds=4,
                         differential_privacy={"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0})
    assert recipe.local["differential_privacy"] == {"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0, "rounds": 4}
    for bad, match in (({"epsilon": -1.0}, "differential_privacy.epsilon"), ({"delta": 1e-5}, "'epsilon'"),
                       ({"epsilon": 1e-9}, "site site-a: .*no noise multiplier")):
        with pytest.raises(JobCheckError, match=match):
            tiny_recipe(cmr_datalists, ["site-a", "site-b"], differential_privacy=bad)
    with pytest.raises(JobCheckError, match="repr"):
        tiny_recipe(cmr_datalists, ["site-a", "site-b"], method="fedopal", settings={"orth_mode": "repr"},
                    differential_privacy={"epsilon": 3.0})
    # the CLI
    code = main(["job", "--target", "sim", "--bundle", str(CMR_BUNDLE), "--datalists", str(cmr_datalists),
                 "--sites", "site-a,site-b", "--rounds", "3", "--overrides", json.dumps(TINY_CMR), "--allow-random-base",
                 "--dp-epsilon", "8", "--dp-max-grad-norm", "0.5", "--name", "dpjob", "--out", str(tmp_path / "jobs")])
    assert code == 0
    comps = job_components(tmp_path / "jobs" / "dpjob")
    executor = next(c for c in comps["app/config_fed_client"] if c["section"] == "executors")
    assert executor["args"]["differential_privacy"] == {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 0.5,
                                                        "rounds": 3}
    # a template: rounds from the server's num_rounds
    job = create_job_from_template("duallora_cmr3d", tmp_path / "t", {
        "datalist_dir": str(cmr_datalists), "bundle_root": str(CMR_BUNDLE), "bundle_overrides": TINY_CMR,
        "allow_random_base": True, "num_rounds": 5, "min_clients": 2,
        "differential_privacy": {"epsilon": 3.0, "delta": 1e-5}}, sites=["site-a", "site-b"])
    args = executor_args(job / "app" / "config" / "config_fed_client.conf")
    assert args["differential_privacy"] == {"epsilon": 3.0, "delta": 1e-5, "rounds": 5}


def test_a_batchnorm_that_trains_is_refused_before_the_job_runs_naming_it():
    from flare_duallora.deploy.preflight import _check_privacy
    from flare_duallora.engine import AdapterSettings, adapt
    from test_prefix_cache import tiny_net

    net = tiny_net()
    net.vit.classification_head = nn.Sequential(nn.BatchNorm1d(32), nn.Linear(32, 2))
    adapted = adapt(net, AdapterSettings(blocks="last:2", head="vit.classification_head", rank=4))
    problems: list = []
    _check_privacy(adapted, type("R", (), {"batch_size": 2})(), DPSettings.from_dict(DP), [], 1, None, problems)
    assert len(problems) == 1 and "vit.classification_head.0" in problems[0] and "BatchNorm" in problems[0]


# ---------------------------------------------------------------------------------------------- the real simulator
@pytest.mark.slow
def test_a_dp_job_in_the_simulator_reports_the_budget_of_both_sites_in_results_progress_state_and_exports(
        tmp_path, cmr_datalists):
    from conftest import run_sim, tiny_recipe
    from flare_duallora.flare.run_files import simulator_state_root
    from flare_duallora.training.site_state import load_state_file

    sites = ["site-a", "site-b"]
    recipe = tiny_recipe(cmr_datalists, sites, name="dp", rounds=2, local_epochs=2,
                         differential_privacy={"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0})
    r = run_sim(recipe, tmp_path / "ws")
    assert r.ok, r.describe_failure()
    raw = (r.outputs.server_dir / "site_results.json").read_text()
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    for site in sites:
        p = r.site_results[site]["privacy"]
        assert set(p) >= {"epsilon", "delta", "target_epsilon", "noise_multiplier", "sample_rate", "steps",
                          "accountant", "unit"}
        assert p["target_epsilon"] == 3.0 and p["delta"] == 1e-5 and p["accountant"] == "rdp"
        assert p["unit"] == "item"  # one subject per item in these datalists: the unit is the item
        assert p["sample_rate"] == pytest.approx(4 / 6)  # the bundle's batch size 4 of 6 training items
        assert p["steps"] == 2 * 2 * 2  # rounds x local epochs x round(1 / q)
        assert p["epsilon"] <= 3.0 and p["epsilon"] == pytest.approx(
            independent_epsilon(p["noise_multiplier"], p["sample_rate"], p["steps"], p["delta"]), rel=0.02)
        trains = [e for e in r.site_records[site] if e["event"] == "train"]
        assert [e["privacy"]["steps"] for e in trains] == [4, 8]
        assert trains[0]["privacy"]["epsilon"] < trains[1]["privacy"]["epsilon"] == pytest.approx(p["epsilon"])
        final = next(e for e in r.site_records[site] if e["event"] == "validate")
        for kind in ("personalised", "global"):
            bundle = Path(final["bundles"][kind])
            meta = json.loads((bundle / "configs" / "metadata.json").read_text())
            assert meta["trained_weights"]["differential_privacy"]["epsilon"] == pytest.approx(p["epsilon"])
            assert "-differential privacy for each item" in (bundle / "docs" / "README.md").read_text()
        state = load_state_file(next(simulator_state_root(tmp_path / "ws" / "dp").glob(f"{site}/**/site_state.pt")))
        assert state["privacy"]["steps"] == 8 and state["privacy"]["noise_multiplier"] == p["noise_multiplier"]
    assert [sorted(line["epsilon"]) for line in r.outputs.progress] == [sites, sites]
    assert r.outputs.progress[1]["epsilon"]["site-a"] == pytest.approx(r.site_results["site-a"]["privacy"]["epsilon"])
    # a restart (resume = true): the sites restore the spent budget from their state, nothing is trained again
    again = run_sim(tiny_recipe(cmr_datalists, sites, name="dp", rounds=2, local_epochs=2, resume=True,
                                differential_privacy={"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0}),
                    tmp_path / "ws")
    assert again.ok, again.describe_failure()
    for site in sites:
        assert again.site_results[site]["privacy"] == r.site_results[site]["privacy"]
        assert any(e["event"] == "restored" for e in again.site_records[site])
    # re-submitted as a new federation (resume = false) under the same state name: the private adapters start
    # fresh, the privacy ledger does not; its budget is spent, so each site refuses the first round, naming it
    fresh = run_sim(tiny_recipe(cmr_datalists, sites, name="dp", rounds=2, local_epochs=2, resume=False,
                                differential_privacy={"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0}),
                    tmp_path / "ws")
    assert not fresh.ok
    cause = fresh.describe_failure()
    assert "refused by differential privacy" in cause and "past the target epsilon 3" in cause
    for site in sites:
        records = fresh.site_records[site]
        continued = next(e for e in records if e["event"] == "privacy_ledger_continued")
        assert continued["steps"] == 8 and continued["epsilon"] == pytest.approx(
            r.site_results[site]["privacy"]["epsilon"])
        assert any(e["event"] == "archived" for e in records)  # the adapters were moved aside, the count was not
        state = load_state_file(next(simulator_state_root(tmp_path / "ws" / "dp").glob(f"{site}/**/site_state.pt")))
        assert state["rounds_done"] == 0 and state["privacy"]["steps"] == 8  # on disk before any round


# ---------------------------------------------------------------------------------------------- benchmarks
def test_bench_accuracy_privacy_runs_each_method_with_and_without_dp_and_reports_the_spent_epsilon(tmp_path):
    """The code path of ``bench accuracy --privacy`` on the tiny protocol (one task, one method, one budget):
    numbers are measured, not asserted; the rows carry the target and the spent epsilon."""
    from flare_duallora.bench.accuracy import run_protocol

    paths = run_protocol("tiny", tmp_path, methods=["duallora"], tasks=["cmr"], privacy=True, epsilons=(3.0,),
                         workers=2, log=lambda *_: None)
    import csv

    with open(tmp_path / "accuracy_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert {r["method"] for r in runs} == {"duallora", "duallora+dp3", "centralised"}
    private = [r for r in runs if r["method"] == "duallora+dp3"]
    assert private and all(float(r["target_epsilon"]) == 3.0 and 0 < float(r["epsilon"]) <= 3.0 for r in private)
    assert all(r["epsilon"] == "" for r in runs if r["method"] == "duallora")
    report = paths["report"].read_text()
    assert "Med-DualLoRA, DP epsilon = 3" in report
    # the privacy table (epsilon 3 and without DP per method, the largest epsilon spent) and its plot
    assert "## Accuracy under differential privacy" in report
    assert "| method | epsilon = 3 | no DP | spent (largest) |" in report
    row = next(line for line in report.splitlines() if line.startswith("| Med-DualLoRA | ") and "/ 3" in line)
    spent = float(row.rsplit("|", 2)[1].split("/")[0])
    assert 0 < spent <= 3.0
    assert paths["privacy_plot"].is_file() and paths["privacy_plot"].stat().st_size > 1000


def test_a_2d_bundle_site_and_a_3d_bundle_site_train_with_dp_through_the_executor_path(tmp_path, cmr_datalists):
    """build_site + install_training_step (what the executor does) on both reference bundles, datalists on disk:
    one DP round each, subjects read from the items, the budget's steps counted."""
    from conftest import CLS2D_BUNDLE
    from flare_duallora.training.from_bundle import build_site
    from flare_duallora.training.privacy import install_training_step
    from test_templates import TINY_2D, write_random_2d_site

    cases = [(CMR_BUNDLE, cmr_datalists / "site-a.json", TINY_CMR),
             (CLS2D_BUNDLE, write_random_2d_site(tmp_path, "site-2d"), {**TINY_2D, "num_classes": 3})]
    for bundle, datalist, overrides in cases:
        site = build_site(bundle, {"method": "duallora", "blocks": "last:2", "head": "vit.classification_head",
                                   "rank": 4}, datalist, overrides, device="cpu", allow_random_base=True)
        step = install_training_step(site.trainer, DP, site.train_dataset, site.runtime.batch_size, local_epochs=1)
        assert step.unit == "item" and step.sample_rate == pytest.approx(
            min(1.0, site.runtime.batch_size / site.dataset_size))
        stats = site.trainer.train_round(1)
        assert stats.steps == step.steps_per_round and step.steps_spent == step.steps_per_round, bundle
        assert math.isfinite(stats.loss)


def test_the_two_per_example_gradient_engines_agree():
    """Hooks on the trained nn.Linear modules (LoRA factors and a linear head: one batched pass) and torch.func
    vmap(grad) give the same per-example gradients; pFedST (gates, LayerNorms) takes the vmap path."""
    for method, engine in (("duallora", "hooks"), ("pfedst", "vmap")):
        t, data = trainer(method)
        t.configure_cache("auto", data)
        step = make_training_step(DP, data, 4)
        t.set_training_step(step)
        t._set_train_mode()
        params = {n: p for n, p in t.adapted.net.named_parameters() if p.requires_grad}
        y = torch.stack([d["label"] for d in data[:4]])
        forward = next(t._index_batches([([0, 1, 2, 3], [0, 1, 2, 3])]))[0]
        fast, loss = step._per_example_grads(t, forward, y, params)
        assert (step._layout is not None) == (engine == "hooks"), method
        slow, loss2 = step._vmap_grads(t, forward, y, params)
        assert float(loss) == pytest.approx(float(loss2), rel=1e-5)
        for name in params:
            assert fast[name].shape == (4, *params[name].shape)
            assert torch.allclose(fast[name], slow[name], atol=1e-5), (method, name)
