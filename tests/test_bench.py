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
