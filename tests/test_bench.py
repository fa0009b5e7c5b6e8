"""Benchmark commands in their tiny setting write well-formed tables (numbers are measured, not asserted)."""

from __future__ import annotations

import csv

from flare_duallora.cli import main


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_bench_comm_tiny_writes_a_table_per_method(tmp_path):
    assert main(["bench", "comm", "--setting", "tiny", "--out", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in read_csv(tmp_path / "comm.csv")}
    assert {"full", "fedit", "ffa", "fedsa", "duallora", "fedopal", "local"} <= set(rows)
    assert float(rows["full"]["vs_full"]) == 1.0 and int(rows["local"]["bytes_per_round"]) == 0
    # structural facts of the methods (not tuned numbers): FedSA sends A only, FFA B only, FedIT both
    assert int(rows["fedsa"]["bytes_per_round"]) + int(rows["ffa"]["bytes_per_round"]) > int(rows["fedit"]["bytes_per_round"])
    assert "Machine:" in (tmp_path / "comm.md").read_text()


def test_bench_speed_tiny_writes_samples_per_second_and_memory(tmp_path):
    assert main(["bench", "speed", "--setting", "tiny", "--methods", "dual_last2", "dual_last2_cached",
                 "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "speed.csv")
    assert [r["mode"] for r in rows] == ["dual_last2", "dual_last2_cached"]
    for r in rows:
        assert float(r["samples_per_s"]) > 0 and float(r["peak_memory_mib"]) > 0 and r["device"] == "cpu"


def test_the_tiny_accuracy_protocol_writes_tables_with_confidence_intervals_and_p_values(tmp_path):
    """Both tasks, three methods and the references, 2 seeds: well-formed tables (numbers are measured, not
    asserted: at this size every method sits near chance)."""
    assert main(["bench", "accuracy", "--setting", "tiny", "--methods", "duallora", "fedit", "linear",
                 "--out", str(tmp_path)]) == 0
    runs = read_csv(tmp_path / "accuracy_runs.csv")
    assert {r["task"] for r in runs} == {"cmr3d", "isic"}
    assert {r["split"] for r in runs} == {"val", "test"}
    assert {r["method"] for r in runs} == {"duallora", "fedit", "linear", "centralised"}
    assert len({r["site"] for r in runs if r["task"] == "cmr3d"}) == 4  # one site per vendor
    assert len({r["site"] for r in runs if r["task"] == "isic"}) == 6  # one site per Fed-ISIC2019 centre
    for r in runs:
        assert 0.0 <= float(r["balanced_accuracy"]) <= 1.0
    summary = read_csv(tmp_path / "accuracy_summary.csv")
    models = {(r["task"], r["method"], r["model"]) for r in summary}
    assert ("cmr3d", "duallora", "personalised") in models and ("cmr3d", "duallora", "global_only") in models
    assert ("isic", "fedit", "single") in models and ("isic", "centralised", "single") in models
    for r in summary:
        assert r["seeds"] == "2" and r["balanced_accuracy_ci95"] != ""  # a 95 % CI over the 2 seeds
        if r["method"] != "duallora" and r["model"] in ("single", "personalised"):
            assert 0.0 <= float(r["p_vs_duallora"]) <= 1.0  # paired Wilcoxon against Med-DualLoRA
    report = (tmp_path / "accuracy_report.md").read_text()
    assert "| Med-DualLoRA | personalised |" in report and "p vs Med-DualLoRA" in report and "Machine:" in report
    assert "Per site" in report and "Measured time:" in report
    assert "Commit: " in report and "Command: `" in report and "Commit: unknown" not in report
    assert {r["prefix_cache"] for r in runs if r["method"] == "duallora"} == {"True"}
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_each_method_reports_the_models_it_has():
    """Single-model methods report one model; a method whose adapters share nothing (local-only) has no global-only
    model worth reporting; methods with a shared and a private part report both."""
    from flare_duallora.bench.accuracy import _models

    m = {"personalised": {"balanced_accuracy": 0.7}, "global_only": {"balanced_accuracy": 0.6}}
    assert set(_models("fedit", m)) == {"single"}
    assert set(_models("full", m)) == {"single"}
    assert set(_models("local", m)) == {"personalised"}
    assert set(_models("linear", m)) == {"personalised"}
    for method in ("duallora", "fedopal", "fedsa", "pfedst"):
        assert set(_models(method, m)) == {"personalised", "global_only"}, method
