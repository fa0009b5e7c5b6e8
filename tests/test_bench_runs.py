"""Benchmark runs do not depend on each other, and the benchmark CLI offers only what each benchmark has."""

from __future__ import annotations

import argparse
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

from flare_duallora.bench import SETTINGS
from flare_duallora.bench import accuracy as acc
from flare_duallora.cli import build_parser, main


@pytest.fixture(scope="module")
def tiny_cmr(tmp_path_factory):
    from flare_duallora.synthetic_tasks import prepare_cmr

    work = tmp_path_factory.mktemp("bench_runs").resolve()
    setup = prepare_cmr(work, preset="tiny", seed=0, log=lambda *_: None)
    setup.resplit(0, work / "splits" / "cmr_seed0")
    return work


def _job(work, method):
    return ("cmr", "tiny", work, 0, method, 1e-2, acc.PRESETS["tiny"], None)  # no DP


def _numbers(rows):
    return sorted((r["site"], r["model"], r["split"], r["pick"], r["round"], r["balanced_accuracy"], r["auc"],
                   r["mcc"]) for r in rows)


def test_a_run_gives_the_same_numbers_alone_in_a_fresh_worker_and_after_another_method_in_a_used_process(tiny_cmr):
    """Med-DualLoRA alone in a fresh worker process, and in this process after FedOPAL ran and after the global RNGs
    and the thread count were disturbed (what another run or a caller may leave behind): identical numbers."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=acc._worker_init) as pool:
        alone = pool.submit(acc._run_one, _job(tiny_cmr, "duallora")).result()
    threads = torch.get_num_threads()
    try:
        acc._run_one(_job(tiny_cmr, "fedopal"))
        torch.set_num_threads(2)
        torch.rand(7), np.random.rand(3), random.random()
        after = acc._run_one(_job(tiny_cmr, "duallora"))
    finally:
        torch.set_num_threads(threads)
    assert len(alone) == 4 * 2 * 2 * 2  # 4 sites x (personalised, global-only) x (val, test) x (last, selected)
    assert _numbers(after) == _numbers(alone)
    # whether a site trained on the frozen-prefix cache changes the last bits: every row says which it did
    assert {r["prefix_cache"] for r in alone} == {r["prefix_cache"] for r in after} == {True}


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_bench_offers_per_benchmark_only_the_settings_it_has():
    from flare_duallora.bench.comm import TINY_CMR  # noqa: F401 - comm knows tiny and the ViT-B size
    from flare_duallora.bench.speed import SETTINGS as SPEED

    has = {"accuracy": set(acc.PRESETS), "speed": set(SPEED), "comm": {"tiny", "full"}}
    bench = _subparsers(_subparsers(build_parser())["bench"])
    assert set(bench) == set(SETTINGS) == set(has)
    for kind, parser in bench.items():
        setting = next(a for a in parser._actions if a.dest == "setting")
        assert set(setting.choices) <= has[kind], kind
        assert setting.default in setting.choices, kind
    with pytest.raises(SystemExit):  # the accuracy protocol has no 'small': refused by the parser, not a KeyError
        main(["bench", "accuracy", "--setting", "small"])
    assert build_parser().parse_args(["bench", "accuracy"]).setting in acc.PRESETS


def test_help_says_each_default_once():
    parsers = [build_parser()]
    seen = []
    while parsers:
        p = parsers.pop()
        seen.append(p)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                parsers += list(a.choices.values())
    assert len(seen) > 10
    for p in seen:
        text = " ".join(p.format_help().split())
        assert "(default: None)" not in text, p.prog
        for a in p._actions:
            if a.help and a.option_strings:
                shown = p._get_formatter()._get_help_string(a)
                assert shown.count("(default:") <= 1, (p.prog, a.option_strings, shown)


def test_the_selected_round_is_chosen_on_validation_and_the_test_split_is_read_only_after_the_run(tiny_cmr,
                                                                                               monkeypatch):
    """Every site's personalised and global-only model is picked at the round of its best validation balanced
    accuracy (validated after every round by the recipe's own validate task), no test datalist is opened before
    the federation is over, and validating between rounds leaves the training unchanged (same global models)."""
    from flare_duallora.bench import federation
    from flare_duallora.synthetic_tasks import prepare_cmr

    setup = prepare_cmr(tiny_cmr, preset="tiny", seed=0, log=lambda *_: None)  # made by the fixture: read back
    protocol = acc.Protocol(data="tiny", seeds=1, lrs=(1e-2,), rounds=3, local_epochs=1)
    events, runs = [], {}
    real_run, real_loader = federation.run_in_process, acc.SplitLoaders.loader

    def run(recipe, workdir, log=None, on_round=None):
        events.append("run starts")
        out = real_run(recipe, workdir, log, on_round)
        events.append("run over")
        runs["out"] = out
        return out

    def loader(self, site, split):
        events.append(f"read {split}")
        return real_loader(self, site, split)

    monkeypatch.setattr(federation, "run_in_process", run)
    monkeypatch.setattr(acc.SplitLoaders, "loader", loader)
    acc.isolate_run(0)
    datalists = tiny_cmr / "splits" / "cmr_seed0"
    rows = acc.run_federated(setup, datalists, acc.SplitLoaders(setup, datalists, tiny_cmr / "sel"), "duallora",
                             1e-2, 0, protocol, tiny_cmr / "runs" / "selection")
    assert events[0] == "run starts" and events[1] == "run over"  # nothing read before the run ends
    assert set(events[2:]) == {"read test"}  # and then only the test split (validation came from the sites)
    out = runs["out"]
    for site in setup.sites:
        validations = [e["metrics"] for e in out.records[site] if e["event"] == "validate"]
        assert len(validations) == protocol.rounds  # after each round (the last one is the final validation)
        for kind in ("personalised", "global_only"):
            scores = [m[kind]["balanced_accuracy"] for m in validations]
            best = scores.index(max(scores))
            sel = [r for r in rows if r["site"] == site and r["model"] == kind and r["pick"] == "val_selected"]
            last = [r for r in rows if r["site"] == site and r["model"] == kind and r["pick"] == "last"]
            assert {r["round"] for r in sel} == {best + 1} and {r["round"] for r in last} == {protocol.rounds}
            assert next(r for r in sel if r["split"] == "val")["balanced_accuracy"] == max(scores)
            assert next(r for r in last if r["split"] == "val")["balanced_accuracy"] == scores[-1]
    # validating between rounds changed nothing the rounds trained
    acc.isolate_run(0)
    plain = real_run(_recipe(setup, datalists, protocol), tiny_cmr / "runs" / "plain")
    assert len(plain.globals) == len(out.globals) == protocol.rounds
    for a, b in zip(plain.globals, out.globals):
        assert set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _recipe(setup, datalists, protocol):
    from flare_duallora.deploy.recipe import DualLoRARecipe

    return DualLoRARecipe(
        name=f"{setup.name}_duallora", target="sim", bundle_root=str(setup.bundle),
        settings={**setup.adapter, "method": "duallora", "seed": 0}, clients=setup.sites,
        datalist_dir=str(datalists), num_rounds=protocol.rounds, local_epochs=protocol.local_epochs,
        bundle_overrides={**setup.overrides, "learning_rate": 1e-2}, seed=0, device="auto", export_bundles=False,
        prefix_cache="auto")


def test_the_map_runs_a_tiny_grid_and_names_a_winner_per_cell_with_its_margin(tmp_path):
    """`bench accuracy --map` on a 2-cell grid (no / strong concept shift), two methods and the centralised
    reference, 2 seeds: one winner per cell with a margin and its 95 % CI, a table and a heat map."""
    import csv

    assert main(["bench", "accuracy", "--map", "--setting", "tiny", "--methods", "duallora", "linear",
                 "--workers", "2", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "map_cells.csv") as f:
        cells = list(csv.DictReader(f))
    assert [(float(c["concept_shift"]), float(c["feature_shift"])) for c in cells] == [(0.0, 1.0), (1.0, 1.0)]
    for c in cells:
        assert c["winner"] in {"duallora", "linear", "centralised"} and c["runner_up"] in {"duallora", "linear",
                                                                                         "centralised"}
        assert float(c["margin"]) >= 0 and c["margin_ci95"] != ""
        assert float(c["winner_mean"]) == max(float(c[f"mean_{m}"]) for m in ("duallora", "linear", "centralised"))
    with open(tmp_path / "map_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert {r["seed"] for r in runs} == {"0", "1"} and {r["method"] for r in runs} == {"duallora", "linear",
                                                                                       "centralised"}
    # the strong-concept cohort really labels differently from the default one (same subjects, same images)
    data = tmp_path / "work" / "data"
    labels = [sorted((i["subject"], i["label"]) for split in ("training", "validation", "test")
                     for s in ("site-siemens", "site-philips", "site-ge", "site-canon")
                     for i in __import__("json").loads((d / "datalists" / f"{s}.json").read_text()).get(split, []))
              for d in (data / "cmr_tiny_seed0", data / "cmr_tiny_seed0_concept1")]
    assert [s for s, _ in labels[0]] == [s for s, _ in labels[1]] and labels[0] != labels[1]
    report = (tmp_path / "map_report.md").read_text()
    assert "| cell | winner | margin over runner-up |" in report and "Commit: " in report
    assert (tmp_path / "map.png").stat().st_size > 1000


def test_a_selected_round_that_is_the_final_model_reuses_its_test_metrics_and_any_other_is_evaluated():
    """The round picker evaluates the test split again only for weights that differ from the final network."""
    from types import SimpleNamespace

    net = torch.nn.Linear(2, 1)
    calls = []

    def evaluate(loader=None, kinds=("personalised", "global_only")):
        calls.append(kinds)
        return {k: {"w": float(net.weight.sum())} for k in kinds}

    trainer = SimpleNamespace(adapted=SimpleNamespace(net=net), evaluate=evaluate)
    build = SimpleNamespace(trainer=trainer)
    picker = acc.RoundPicker("score")
    picker(0, "s", {"personalised": {"score": 0.9}, "global_only": {"score": 0.1}}, build)
    with torch.no_grad():
        net.weight.add_(1.0)  # the next round trains
    picker(1, "s", {"personalised": {"score": 0.5}, "global_only": {"score": 0.2}}, build)
    final = evaluate()
    calls.clear()
    val, test, rounds = picker.evaluate("s", trainer, None, final_test=final)
    assert rounds == {"personalised": 1, "global_only": 2}
    assert test["global_only"] is final["global_only"]  # the final network: reused
    assert calls == [("personalised",)]  # round 1's personalised weights: evaluated again
    assert test["personalised"]["w"] == pytest.approx(final["personalised"]["w"] - 2.0)


def test_the_demos_cohort_is_a_cell_of_the_map():
    """The demo generates the CMR cohort with the generators' default site differences; the medium map has that
    cell, and the demo's closing line names it."""
    from flare_duallora.bench.heatmap import MAP_PRESETS, cell_name
    from flare_duallora.deploy.report import MAP_POINTER
    from flare_duallora.synthetic_tasks import SHIFT_DEFAULTS

    grid = MAP_PRESETS["medium"]
    concept, feature = SHIFT_DEFAULTS["concept_shift"], SHIFT_DEFAULTS["feature_shift"]
    assert concept in grid.concept and feature in grid.feature
    assert cell_name(concept, feature) == "concept none (0), feature low (1)"
    assert "'concept none, feature low'" in MAP_POINTER
    assert SHIFT_DEFAULTS["label_prior_shift"] == 1.0  # the map leaves label-prior shift at the demo's value
