"""``bench speed``: the bare reference loops train the same function as the project's loop, and the benchmark reports
median ratios with their spread (the figures themselves are measured, never asserted)."""

from __future__ import annotations

import csv

import pytest
import torch
from monai.networks.nets import ViT

from flare_duallora.bench.machine import describe, describe_line
from flare_duallora.bench.speed import BareLoop, build_loops, loss_trajectories, measure, write_tables
from flare_duallora.nets import ViTClassifier


@pytest.mark.parametrize("mode", ["dual_last2", "dual_last2_cached", "seg_dual_last2"])
def test_bare_and_project_loops_follow_the_same_loss_trajectory(mode):
    project, bare, w_project, w_bare = loss_trajectories("tiny", mode, steps=3, device="cpu")
    assert len(project) == len(bare) == 3
    assert project == pytest.approx(bare, abs=1e-5)
    assert project[0] != project[2]  # the loops really train
    # the same trainable parameters (adapters global + local on the last two blocks, the head), the same values
    assert w_project.keys() == w_bare.keys() and any(".lora_A.local." in k for k in w_bare)
    for k, v in w_project.items():
        assert torch.allclose(v, w_bare[k], atol=1e-5), k


def test_the_bare_loop_is_plain_monai_and_peft():
    loops = build_loops("tiny", ["dual_last2_cached"], torch.device("cpu"))
    bare = loops["bare_dual_last2_cached"]
    assert isinstance(bare, BareLoop) and type(bare.vit) is ViT and not isinstance(bare.vit, ViTClassifier)
    assert bare.tokens.shape[0] == len(bare.y)  # the bare cached loop computed its own tokens
    assert loops["dual_last2_cached"].cache_reason.startswith("prefix_cache = on: on")


def test_bench_speed_reports_median_ratios_with_spread_and_names_the_machine(tmp_path):
    rows = measure("tiny", device="cpu", repetitions=5, steps=2)
    by_mode = {r["mode"]: r for r in rows}
    assert list(by_mode) == ["dual_last2", "dual_last2_cached", "pfedst", "pfedst_cached"]
    assert by_mode["dual_last2"]["reference"] == "bare_dual_last2"
    assert by_mode["dual_last2_cached"]["reference"] == "bare_dual_last2_cached"
    assert by_mode["pfedst_cached"]["reference"] == "pfedst" and by_mode["pfedst_cached"]["target"] == 1.6
    for r in rows:
        assert r["repetitions"] == 5 and r["samples_per_s_min"] <= r["samples_per_s"] <= r["samples_per_s_max"]
        if r["reference"]:
            assert r["ratio_min"] <= r["ratio_q1"] <= r["ratio"] <= r["ratio_q3"] <= r["ratio_max"]
            assert isinstance(r["meets_target"], bool)
    machine = describe_line(describe(torch.device("cpu")))
    write_tables(rows, tmp_path, machine, "tiny")
    with open(tmp_path / "speed.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["mode"] for r in table] == list(by_mode) and float(table[0]["ratio"]) > 0
    text = (tmp_path / "speed.md").read_text()
    assert f"Machine: {machine}" in text and "| dual_last2 |" in text and "min-max" in text


def test_the_segmentation_reference_is_the_same_network_with_peft_adapters_injected_by_hand():
    from flare_duallora.bench.speed import BareSegLoop
    from flare_duallora.nets.vit_segmenter import ViTSegmenter

    loops = build_loops("tiny", ["seg_dual_last2"], torch.device("cpu"))
    bare = loops["bare_seg_dual_last2"]
    assert isinstance(bare, BareSegLoop) and type(bare.vit) is ViTSegmenter
    trained = {n.split(".")[0] for n, p in bare.vit.named_parameters() if p.requires_grad}
    assert trained == {"vit", "decoder"}  # the adapters in the encoder and the whole decoder
    assert bare.y.shape[1:] == (1, 16, 16, 4)  # a label map per volume
