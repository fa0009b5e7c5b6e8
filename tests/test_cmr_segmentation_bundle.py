"""The cmr3d_segmentation reference bundle: one foundation model (the classification bundle's pretrained ViT) as the
encoder of a UNETR-style segmenter, model-zoo ids, and a site that trains it on masks from `split cmr --task
segmentation`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flare_duallora.bundle import BundleRuntime
from flare_duallora.bundle.reference import init_bundle
from flare_duallora.data.cmr_segmentation import SEG_LABEL_NAMES, split_cmr_segmentation
from flare_duallora.data.synthetic_cmr import generate_cmr
from flare_duallora.nets.vit import vit_tokens
from flare_duallora.training.encoder_transfer import transfer_encoder, write_segmentation_base
from flare_duallora.training.from_bundle import build_site
from flare_duallora.training.tasks import SegmentationTask, detect_task

TINY = {"image_size": [16, 16, 4], "patch_size": [8, 8, 2], "hidden_size": 32, "mlp_dim": 64, "num_heads": 4,
        "batch_size": 4, "feature_size": 4, "train#random_transforms": []}
CLS_TINY = {k: v for k, v in TINY.items() if k != "feature_size"}
ZOO_IDS = ("network_def", "train#dataset", "validate#dataset", "loss", "validate#inferer", "validate#postprocessing",
           "validate#key_metric")


@pytest.fixture
def bundles(tmp_path):
    """The classification bundle with a 'pretrained' checkpoint (a seeded network, as pretraining writes it) and the
    segmentation bundle whose base is built from it."""
    cls = init_bundle("cmr3d", tmp_path / "cls")
    runtime = BundleRuntime(cls, overrides=CLS_TINY)
    torch.manual_seed(7)
    net = runtime.build_network()
    with torch.no_grad():  # not an initialisation any seed would give: the weights must come from the file
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    runtime.pretrained_path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), runtime.pretrained_path)
    seg = init_bundle("cmr3d_seg", tmp_path / "seg")
    write_segmentation_base(runtime.pretrained_path, seg, TINY, seed=3)
    return cls, seg, net


def test_the_segmentation_encoder_loads_the_classification_bundles_pretrained_vit(bundles):
    cls_root, seg_root, cls_net = bundles
    seg_rt = BundleRuntime(seg_root)  # the sizes were written into the bundle with its weights
    seg_net = seg_rt.build_network()
    assert seg_rt.load_pretrained(seg_net)  # strict
    cls_sd, seg_sd = cls_net.state_dict(), seg_net.state_dict()
    encoder = [k for k in seg_sd if k.startswith("vit.")]
    assert "vit.cls_token" in encoder and any(".blocks.1.attn.qkv." in k for k in encoder)
    assert not any("classification_head" in k for k in seg_sd)
    kernel = "vit.patch_embedding.patch_embeddings.weight"
    for key in encoder:
        expected = cls_sd[key].sum(1, keepdim=True) if key == kernel else cls_sd[key]
        assert torch.equal(seg_sd[key], expected), key
    # the same foundation model: the segmenter's tokens of a frame are the classifier's tokens of that frame given as
    # both of its (ED, ES) channels, through every block
    x = torch.rand(2, 1, 16, 16, 4)
    cls_net.eval(), seg_net.eval()
    with torch.no_grad():
        a, b = vit_tokens(cls_net.vit, torch.cat((x, x), 1)), vit_tokens(seg_net.vit, x)
        for blk_a, blk_b in zip(cls_net.vit.blocks, seg_net.vit.blocks):
            a, b = blk_a(a), blk_b(b)
        assert torch.allclose(a, b, atol=1e-5)
        out = seg_net(x)
    assert out.shape == (2, 4, 16, 16, 4) and torch.isfinite(out).all()


def test_an_encoder_of_another_size_is_refused_naming_the_key(bundles, tmp_path):
    _, seg_root, cls_net = bundles
    state = dict(cls_net.state_dict())
    state["vit.norm.weight"] = torch.ones(48)
    with pytest.raises(ValueError, match=r"vit\.norm\.weight has shape \(48,\).*same ViT size"):
        transfer_encoder(state, BundleRuntime(seg_root).build_network())
    state.pop("vit.norm.weight")
    with pytest.raises(ValueError, match=r"no vit\.norm\.weight"):
        transfer_encoder(state, BundleRuntime(seg_root).build_network())


def test_the_bundle_has_the_model_zoo_ids_and_reads_as_segmentation(bundles):
    _, seg_root, _ = bundles
    rt = BundleRuntime(seg_root)
    assert all(rt.has(i) for i in ZOO_IDS), [i for i in ZOO_IDS if not rt.has(i)]
    assert type(rt.loss).__name__ == "DiceCELoss"
    choice = detect_task(rt)
    assert choice.name == "segmentation" and "metadata" in choice.reason
    assert SegmentationTask.problems(rt) == []
    assert rt.num_classes == 4 and rt.label_names == list(SEG_LABEL_NAMES)
    task = SegmentationTask.from_bundle(rt)
    assert "val_mean_dice" in task.key_metrics


def test_a_site_trains_the_bundle_on_split_masks_and_reports_dice_per_structure(bundles, tmp_path):
    _, seg_root, _ = bundles
    acdc, mnms = generate_cmr(tmp_path / "raw", n_per_vendor=4, vendors=("Siemens", "Philips"), shape=(24, 24, 6),
                              n_frames=4, seed=2, write_4d=False)
    clients = split_cmr_segmentation(acdc, mnms, tmp_path / "dl", seed=0)
    site = build_site(seg_root, {"method": "duallora", "rank": 2, "blocks": "last:2", "head": "decoder"},
                      clients["site-philips"], device="cpu", amp=False)
    trainer = site.trainer
    assert isinstance(trainer.task, SegmentationTask) and site.dataset_size == 6  # 3 subjects x (ED, ES)
    stats = trainer.train_round(1)
    assert stats.steps == 2 and np.isfinite(stats.loss)
    metrics = trainer.evaluate()
    for kind in ("personalised", "global_only"):
        m = metrics[kind]
        assert m["n"] == 2 and {"dice/LV", "dice/MYO", "dice/RV"} <= set(m)
        assert 0.0 <= m["dice"] <= 1.0 and m["val_mean_dice"] == pytest.approx(m["dice"], abs=1e-5)


@pytest.mark.slow
def test_the_segmentation_demo_prints_dice_per_vendor_site_from_a_fresh_folder(tmp_path):
    """`flare-duallora demo --task segmentation` (the README's command, at the tiny preset and 2 short rounds) from
    an empty folder: exit 0 and, per vendor site, a personalised and a global-only Dice row (~50 s on 2 cores)."""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "flare_duallora.cli", "demo", "--task", "segmentation", "--preset", "tiny",
           "--rounds", "2", "--local-epochs", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| site | n val | model | dice | hd95 (voxels) | val_mean_dice |" in out
    for site in ("site-siemens", "site-philips", "site-ge", "site-canon"):
        for kind in ("personalised", "global-only"):
            row = re.search(rf"^\| {site} \| (\d+) \| {kind} \| ([0-9.]+) \|", out, re.M)
            assert row and int(row.group(1)) > 0 and 0.0 <= float(row.group(2)) <= 1.0, (site, kind)
    assert (tmp_path / "flare_duallora_demo" / "bundles" / "cmr3d_seg_tiny_mae" / "models" / "model.pt").is_file()


def test_the_accuracy_benchmark_runs_the_cmr_segmentation_task_with_dice_per_structure(tmp_path):
    """`bench accuracy --tasks cmrseg` at the tiny setting: rows scored by Dice (rate and round chosen on validation
    Dice), Dice per structure in the summary, the Wilcoxon test against Med-DualLoRA, pFedST left out (its side
    network ends in a classification head); numbers are measured, not asserted (tiny runs sit near zero)."""
    import csv

    from flare_duallora.cli import main

    assert main(["bench", "accuracy", "--setting", "tiny", "--tasks", "cmrseg", "--methods", "duallora", "pfedst",
                 "--seeds", "2", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "accuracy_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert {r["task"] for r in runs} == {"cmr3d_seg"} and len({r["site"] for r in runs}) == 4
    assert {r["method"] for r in runs} == {"duallora", "centralised"}  # pfedst does not apply
    for r in runs:
        assert r["score"] == r["dice"] and 0.0 <= float(r["dice"]) <= 1.0 and "balanced_accuracy" not in r
    with open(tmp_path / "accuracy_summary.csv") as f:
        summary = list(csv.DictReader(f))
    central = next(r for r in summary if r["method"] == "centralised" and r["pick"] == "last")
    assert 0.0 <= float(central["p_vs_duallora"]) <= 1.0 and central["dice_ci95"] != ""
    report = (tmp_path / "accuracy_report.md").read_text()
    assert "| method | model | lr | Dice | Dice LV | Dice MYO | Dice RV | HD95 (voxels) | p vs Med-DualLoRA |" in report
    # the reference bundle drops the affine (EnsureTyped track_meta false): distances on its image_size grid, voxels
    assert {r["hd95_unit"] for r in runs} == {"0"}
    assert "test Dice of each method's main model" in report and "Test frames (ED and ES" in report


def test_the_bundle_command_takes_the_encoder_from_a_pretrained_classification_bundle(tmp_path, capsys):
    """`flare-duallora bundle cmr3d_seg DEST --encoder-from CLS`: the sizes come from the classification bundle's
    config (as pretrain writes them there), the weights from its models/model.pt."""
    from flare_duallora.cli import main
    from flare_duallora.training.pretrain import write_config_values

    cls = init_bundle("cmr3d", tmp_path / "cls")
    write_config_values(cls, CLS_TINY)  # what pretrain does with the size it was given
    runtime = BundleRuntime(cls)
    torch.manual_seed(1)
    net = runtime.build_network()
    runtime.pretrained_path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), runtime.pretrained_path)
    assert main(["bundle", "cmr3d_seg", str(tmp_path / "seg"), "--encoder-from", str(cls)]) == 0
    seg = BundleRuntime(tmp_path / "seg")
    seg_net = seg.build_network()
    assert seg.load_pretrained(seg_net) and seg.get("hidden_size") == 32 and seg.get("image_size") == [16, 16, 4]
    assert torch.equal(seg_net.state_dict()["vit.blocks.0.attn.qkv.weight"], net.state_dict()["vit.blocks.0.attn.qkv.weight"])
    assert main(["bundle", "cmr3d_seg", str(tmp_path / "seg2"), "--encoder-from", str(tmp_path / "nothing")]) == 2
    assert "has no pretrained weights" in capsys.readouterr().err
