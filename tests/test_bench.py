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


def test_bench_accuracy_tiny_runs_the_simulator_and_writes_table_report_and_plot(tmp_path):
    assert main(["bench", "accuracy", "--setting", "tiny", "--tasks", "cmr", "--seeds", "1", "--methods", "duallora",
                 "--rounds", "1", "--local-epochs", "1", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "accuracy_per_site.csv")
    methods = {(r["method"], r["model"]) for r in rows}
    assert {("duallora", "personalised"), ("duallora", "global_only"), ("centralised", "personalised")} <= methods
    assert len({r["site"] for r in rows}) == 4  # one site per vendor
    for r in rows:
        assert 0.0 <= float(r["balanced_accuracy"]) <= 1.0
    summary = read_csv(tmp_path / "accuracy_summary.csv")
    assert {r["method"] for r in summary} == {"duallora", "centralised"}
    assert "| cmr3d | duallora | personalised | 1 |" in (tmp_path / "accuracy_report.md").read_text()
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
