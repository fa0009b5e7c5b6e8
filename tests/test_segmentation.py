"""Segmentation and model-zoo bundle conventions, on bundles written as a zoo author would (tests/zoo_bundles).

The tiny spleen bundle keeps the zoo's spleen_ct_segmentation conventions (UNet, DiceCE, RandCropByPosNegLabeld with
4 crops per volume, sliding-window validation, MeanDice key metric, dataset_dir + glob lists, ``@images[:-2]``
split); the tiny classification template keeps classification_template's ids (train_dataset, val_dataset, lossfn).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from zoo_data import (
    SPLEEN_BUNDLE, TEMPLATE_BUNDLE, TEMPLATE_IDS, UNET_ADAPTER, write_class_images, write_spleen_dataset,
)
from flare_duallora.bundle import BundleConfigError, BundleRuntime
from flare_duallora.data.records import DatasetFormatError
from flare_duallora.deploy.preflight import JobCheckError, check_job
from flare_duallora.deploy.report import results_table
from flare_duallora.engine.targets import PRESETS, resolve_targets
from flare_duallora.metrics import is_metric_name
from flare_duallora.training.from_bundle import build_site, export_site_bundles
from flare_duallora.training.tasks import SegmentationTask, detect_task

SEG_SETTINGS = {"method": "duallora", **UNET_ADAPTER}


@pytest.fixture(scope="module")
def spleen_data(tmp_path_factory) -> Path:
    return write_spleen_dataset(tmp_path_factory.mktemp("spleen"))


@pytest.fixture(scope="module")
def spleen_site(spleen_data):
    return build_site(SPLEEN_BUNDLE, SEG_SETTINGS, overrides={"dataset_dir": str(spleen_data)}, device="cpu",
                      allow_random_base=True)


def _copy_bundle(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        meta = dst / "configs" / "metadata.json"
        content = json.loads(meta.read_text())
        edit(content)
        meta.write_text(json.dumps(content))
    return dst


# ---------------------------------------------------------------------------------------------- the task
def test_the_task_is_read_from_metadata_then_key_metric_then_output_shape_or_set(tmp_path):
    from conftest import CLS2D_BUNDLE

    spleen = BundleRuntime(SPLEEN_BUNDLE)
    choice = detect_task(spleen)
    assert choice.name == "segmentation" and "network_data_format.outputs.pred" in choice.reason
    assert detect_task(BundleRuntime(CLS2D_BUNDLE)).name == "classification"
    assert detect_task(spleen, "classification").name == "classification"  # the job's setting wins

    def drop_outputs(meta):
        meta["network_data_format"]["outputs"]["pred"] = {"num_channels": 2}

    bare = BundleRuntime(_copy_bundle(SPLEEN_BUNDLE, tmp_path / "bare", drop_outputs))
    assert detect_task(bare).reason == "validate#key_metric uses ['MeanDice']"
    no_metric = BundleRuntime(bare.bundle_root, overrides={"validate#key_metric": {}})
    net = no_metric.build_network()
    by_shape = detect_task(no_metric, net=net)
    assert by_shape.name == "segmentation" and by_shape.reason == "the network's output has shape [1, 2, 16, 16, 16]"
    unknown = detect_task(no_metric)  # no network to try: the reason says what to set
    assert unknown.name is None and "set task = 'classification' or 'segmentation'" in unknown.reason
    with pytest.raises(ValueError, match="setting 'task' = 'detection'"):
        detect_task(spleen, "detection")


def test_preflight_reports_the_task_and_refuses_a_bundle_it_cannot_evaluate(tmp_path, spleen_data):
    plan = check_job(target="sim", settings=SEG_SETTINGS, bundle_root=str(SPLEEN_BUNDLE), sites=["site-a"],
                     bundle_overrides={"dataset_dir": str(spleen_data)}, allow_random_base=True)
    assert plan.task == "segmentation" and any("task segmentation" in n for n in plan.notes)
    # a segmentation bundle without its loss cannot be trained: refused before the job runs, naming the id
    with pytest.raises(JobCheckError) as e:
        check_job(target="sim", settings=SEG_SETTINGS, bundle_root=str(SPLEEN_BUNDLE), sites=["site-a"],
                  bundle_overrides={"dataset_dir": str(spleen_data)}, allow_random_base=True,
                  bundle_ids={"loss": "no_such_loss"})
    assert "segmentation bundle needs its training loss as config id 'loss'" in str(e.value)


def test_target_modules_matching_a_conv_transpose_are_refused_before_the_job_runs_with_the_module_names():
    with pytest.raises(JobCheckError) as e:
        check_job(target="sim", settings={**SEG_SETTINGS, "target_modules": r".*\.conv"},
                  bundle_root=str(SPLEEN_BUNDLE), sites=["site-a"], allow_random_base=True)
    text = str(e.value)
    assert "matches layer(s) LoRA cannot adapt" in text
    assert "model.1.submodule.2.0.conv (ConvTranspose3d)" in text
    assert "model.2.0.conv" not in text  # inside the head (model.2), trained whole: not an adapter target


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_fits_its_network(name):
    from monai.networks import nets

    small = {
        "UNet": lambda: nets.UNet(3, 1, 2, channels=[4, 8, 16], strides=[2, 2], num_res_units=2),
        "SegResNet": lambda: nets.SegResNet(3, init_filters=8, in_channels=1, out_channels=2),
        "UNETR": lambda: nets.UNETR(1, 2, img_size=(16, 16, 16), feature_size=4, hidden_size=32, mlp_dim=64,
                                    num_heads=4),
        "SwinUNETR": lambda: nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1)),
        "DenseNet121": lambda: nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=2),
        "SEResNet50": lambda: nets.SEResNet50(spatial_dims=2, in_channels=3, num_classes=2),
        "ViT": lambda: nets.ViT(1, (16, 16, 16), (8, 8, 8), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4,
                                classification=True),
    }[name]()
    preset = PRESETS[name]
    targets = resolve_targets(small, preset["target_modules"], exclude=(preset["head"],))
    assert targets and all(isinstance(small.get_submodule(t), (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d))
                           for t in targets)
    assert any(True for _ in small.get_submodule(preset["head"]).parameters())


# ---------------------------------------------------------------------------------------------- a segmentation site
def test_a_segmentation_site_trains_on_4_crops_per_volume_and_validates_with_the_bundles_sliding_window(spleen_site):
    from monai.inferers import SlidingWindowInferer

    trainer = spleen_site.trainer
    assert spleen_site.task == "segmentation" and isinstance(trainer.task, SegmentationTask)
    assert isinstance(trainer.task.inferer, SlidingWindowInferer)  # validate#inferer, not a plain forward
    assert spleen_site.dataset_size == 4  # @images[:-2] of 6 volumes
    decision = trainer.configure_cache("auto", spleen_site.train_dataset)
    assert not decision.enabled and "RandCropByPosNegLabeld" in decision.reason
    stats = trainer.train_round(1)
    assert stats.steps == 2 and stats.examples == 16  # 2 batches of 2 volumes x 4 crops, collated flat
    assert np.isfinite(stats.loss)
    # the frozen base's BatchNorm statistics stay fixed while adapters train
    trainer._set_train_mode()
    assert not any(m.training for m in trainer.adapted.net.modules() if isinstance(m, torch.nn.BatchNorm3d))

    metrics = trainer.evaluate()
    for kind in ("personalised", "global_only"):
        m = metrics[kind]
        assert m["n"] == 2 and 0.0 <= m["dice"] <= 1.0 and m["dice"] == m["dice/spleen"]
        assert m["hd95"] is None or m["hd95"] >= 0.0
        # the bundle's key metric (MeanDice, include_background false) under its own name agrees with our Dice
        assert m["val_mean_dice"] == pytest.approx(m["dice"], abs=1e-5)
        assert all(is_metric_name(k) for k in m)  # all pass the result filter's allow-list
        json.dumps(m, allow_nan=False)  # strict JSON
    table = results_table({"site-a": metrics})
    assert "| dice | hd95 (mm) | val_mean_dice |" in table and "| site-a | 2 | personalised |" in table


def test_segmentation_metrics_are_right_on_known_masks():
    task = SegmentationTask(3, ["background", "lv", "myo"])
    label = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    label[0, 2:6, 2:6, 2:6] = 1
    label[0, 0, 0, 0] = 2
    perfect = torch.nn.functional.one_hot(label[0], 3).permute(3, 0, 1, 2).float()[None] * 10  # logits
    m = task.metrics(task._post(perfect, label[None]))
    assert m["dice/lv"] == 1.0 and m["dice/myo"] == 1.0 and m["dice"] == 1.0 and m["hd95/lv"] == 0.0
    half = torch.zeros(1, 3, 8, 8, 8)
    half[0, 0] = 1
    half[0, 1, 2:4, 2:6, 2:6] = 5  # half the lv, no myo at all
    m = task.metrics(task._post(half, label[None]))
    assert m["dice/lv"] == pytest.approx(2 * 32 / (32 + 64)) and m["dice/myo"] == 0.0
    assert m["dice"] == pytest.approx((2 * 32 / 96 + 0.0) / 2) and m["hd95/myo"] is None  # undefined: empty pred


def test_a_crop_larger_than_the_volumes_names_the_item_its_files_the_root_cause_and_the_dataset_dir(spleen_data):
    with pytest.raises(DatasetFormatError) as e:
        build_site(SPLEEN_BUNDLE, SEG_SETTINGS, overrides={"dataset_dir": str(spleen_data), "roi_size": [32, 32, 32]},
                   device="cpu", allow_random_base=True)
    text = str(e.value)
    assert "training item 0" in text and str(spleen_data / "imagesTr" / "spleen_00.nii.gz") in text
    assert "ValueError: The size of the proposed random crop ROI is larger than the image size" in text
    assert f"dataset_dir = {spleen_data}" in text and "datalist None" not in text and "applying transform" not in text
    with pytest.raises(DatasetFormatError, match=r"training data set \(train#dataset\) is empty: data read from "
                                                 r"dataset_dir = /nowhere"):
        build_site(SPLEEN_BUNDLE, SEG_SETTINGS, overrides={"dataset_dir": "/nowhere"}, device="cpu",
                   allow_random_base=True)


# ---------------------------------------------------------------------------------------------- other ids
def test_a_bundle_with_train_dataset_style_ids_runs_through_the_mapping_unchanged(tmp_path):
    data = write_class_images(tmp_path / "classes")
    settings = {"method": "duallora", "target_modules": r"features\.denseblock4\.denselayer\d+\.layers\.conv[12]",
                "head": "class_layers.out", "rank": 2}
    before = {p.name: p.read_bytes() for p in (TEMPLATE_BUNDLE / "configs").iterdir()}
    with pytest.raises(BundleConfigError, match=r"'train#dataset' is missing .* map it with the setting bundle_ids"):
        build_site(TEMPLATE_BUNDLE, settings, overrides={"dataset_dir": str(data)}, device="cpu",
                   allow_random_base=True)
    plan = check_job(target="sim", settings=settings, bundle_root=str(TEMPLATE_BUNDLE), sites=["site-a"],
                     bundle_overrides={"dataset_dir": str(data)}, allow_random_base=True, bundle_ids=TEMPLATE_IDS)
    assert plan.task == "classification" and plan.schema
    site = build_site(TEMPLATE_BUNDLE, settings, overrides={"dataset_dir": str(data)}, device="cpu",
                      allow_random_base=True, bundle_ids=TEMPLATE_IDS)
    assert site.dataset_size == 12 and site.runtime.batch_size == 4  # train_dataloader#batch_size, mapped
    assert isinstance(site.trainer.loss_fn, torch.nn.CrossEntropyLoss)  # lossfn
    stats = site.trainer.train_round(1)
    assert stats.steps == 3 and np.isfinite(stats.loss)
    m = site.trainer.evaluate()
    assert m["personalised"]["n"] == 4 and 0.0 <= m["personalised"]["balanced_accuracy"] <= 1.0
    assert {p.name: p.read_bytes() for p in (TEMPLATE_BUNDLE / "configs").iterdir()} == before  # unchanged
    with pytest.raises(BundleConfigError, match="'train_set' is not a standard id"):
        BundleRuntime(TEMPLATE_BUNDLE, ids={"train_set": "x"}, required=())


# ---------------------------------------------------------------------------------------------- export
def test_the_exported_segmentation_bundles_run_monai_bundle_inference_on_a_nifti_volume(spleen_site, spleen_data,
                                                                                          tmp_path):
    paths = export_site_bundles(spleen_site, tmp_path / "export", "site-a")
    for kind in ("personalised", "global"):
        bundle = paths[kind]
        out = tmp_path / f"masks-{kind}"
        # MONAI's own command line (``fire``, a dependency), in a fresh process as a hospital would run it
        args = dict(config_file=str(bundle / "configs" / "inference.json"),
                    meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
                    dataset_dir=str(spleen_data), output_dir=str(out))
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run",
                               *[a for k, v in args.items() for a in (f"--{k}", v)]],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        masks = sorted(out.glob("*_seg.nii.gz"))
        assert [m.name for m in masks] == ["spleen_06_seg.nii.gz"]
        mask = np.asarray(nib.load(str(masks[0])).dataobj)
        assert mask.shape[:3] == (24, 24, 24) and set(np.unique(mask).tolist()) <= {0.0, 1.0}


def test_the_readme_preset_table_is_the_code_s():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name, preset in PRESETS.items():
        row = f"`{preset['target_modules'].replace('|', chr(92) + '|')}`"
        assert row in readme and f"`{preset['head']}`" in readme, name


@pytest.mark.parametrize("name, reason", [
    ("UNETR", "a decoder with skip connections"),  # a ViT inside, but its decoder reads more than the tokens
    ("UNet", "UNet contains none"),
])
def test_conv_and_attention_lora_train_on_segmentation_nets_and_the_prefix_cache_says_why_it_is_off(name, reason):
    from monai.losses import DiceCELoss
    from monai.networks import nets

    from flare_duallora.engine import AdapterSettings, adapt
    from flare_duallora.training.site import SiteTrainer, make_loader

    torch.manual_seed(0)
    net = (nets.UNETR(1, 2, img_size=(16, 16, 16), feature_size=4, hidden_size=32, mlp_dim=64, num_heads=4)
           if name == "UNETR"
           else nets.UNet(3, 1, 2, channels=[4, 8, 16], strides=[2, 2], num_res_units=1))
    adapted = adapt(net, AdapterSettings(method="duallora", rank=2, **PRESETS[name]))
    kinds = {type(adapted.net.get_submodule(t).base_layer).__name__ for t in adapted.targets}
    assert kinds == ({"Linear"} if name == "UNETR" else {"Conv3d"})
    data = [{"image": torch.randn(1, 16, 16, 16), "label": (torch.rand(1, 16, 16, 16) > 0.5).float()}
            for _ in range(2)]
    task = SegmentationTask(2)
    trainer = SiteTrainer(adapted, DiceCELoss(to_onehot_y=True, softmax=True),
                          torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2),
                          make_loader(data, 2, True, collate_fn=task.collate_fn),
                          make_loader(data, 1, False, collate_fn=task.collate_fn), device="cpu", task=task)
    decision = trainer.configure_cache("auto", data)  # deterministic data: the network decides
    assert not decision.enabled and reason in decision.reason
    before = {n: p.detach().clone() for n, p in adapted.net.named_parameters() if "lora_B" in n}
    assert trainer.train_round(steps=1).steps == 1
    assert any(not torch.equal(before[n], p) for n, p in adapted.net.named_parameters() if n in before)
    assert trainer.evaluate(kinds=("personalised",))["personalised"]["n"] == 2


def test_the_job_command_prints_the_task_it_read_from_the_bundle(tmp_path, capsys):
    from flare_duallora.cli import main

    rc = main(["job", "--target", "sim", "--bundle", str(SPLEEN_BUNDLE), "--sites", "site-a,site-b",
               "--target-modules", UNET_ADAPTER["target_modules"], "--head", "model.2", "--blocks", "all",
               "--allow-random-base", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "task segmentation (metadata network_data_format.outputs.pred" in err
    assert (tmp_path / "duallora_job" / "app" / "config" / "config_fed_client.json").is_file()


def test_hd95_is_in_mm_from_each_volumes_affine_and_in_voxels_without_one():
    """A prediction one slice too long in z: 5 mm apart on a (1, 1, 5) mm grid, 1 voxel without the affine; the
    spacing is read from the MetaTensor the bundle's transforms produce (per volume of the batch)."""
    from monai.data import MetaTensor
    from monai.data.utils import list_data_collate

    from flare_duallora.training.tasks import voxel_sizes

    task = SegmentationTask(2, ["background", "lv"])
    label = torch.zeros(1, 12, 12, 8, dtype=torch.long)
    label[0, 3:9, 3:9, 2:5] = 1
    pred = label.clone()
    pred[0, 3:9, 3:9, 5] = 1  # one slice more
    logits = torch.nn.functional.one_hot(pred[0], 2).permute(3, 0, 1, 2).float()[None] * 10
    affine = torch.diag(torch.tensor([1.0, 1.0, 5.0, 1.0]))
    batch = list_data_collate([{"image": MetaTensor(torch.zeros(1, 12, 12, 8), affine=affine)}])
    spacings = voxel_sizes(batch["image"], 1)
    assert spacings == [(1.0, 1.0, 5.0)]
    in_mm = task.metrics(task._post(logits, label[None]), spacings)
    in_voxels = task.metrics(task._post(logits, label[None]))
    assert in_mm["hd95_unit"] == 1 and in_mm["hd95/lv"] == pytest.approx(5.0)
    assert in_voxels["hd95_unit"] == 0 and in_voxels["hd95/lv"] == pytest.approx(1.0)
    assert voxel_sizes(torch.zeros(2, 1, 4, 4, 4), 2) == [None, None]  # a plain tensor carries no spacing


def test_the_prefix_cache_holds_the_encoder_states_the_vit_segmenters_decoder_reads_and_trains_the_same():
    """The reference UNETR-style segmenter adapted in its last two blocks: the cache holds the input volume, the
    tokens entering the first adapted block and the mid-level tokens (block 1 of 4, frozen); a training step on the
    cache gives the same loss and the same LoRA gradients as the whole network."""
    from monai.losses import DiceCELoss

    from flare_duallora.engine import AdapterSettings, adapt
    from flare_duallora.nets.vit_segmenter import ViTSegmenter
    from flare_duallora.training.site import SiteTrainer, make_loader

    def trainer_with(cache: str):
        torch.manual_seed(0)
        net = ViTSegmenter(1, (16, 16, 8), (4, 4, 4), out_channels=3, hidden_size=32, mlp_dim=64, num_layers=4,
                           num_heads=4, feature_size=4)
        adapted = adapt(net, AdapterSettings(method="duallora", rank=2, blocks="last:2", head="decoder"))
        g = torch.Generator().manual_seed(1)
        data = [{"image": torch.randn(1, 16, 16, 8, generator=g),
                 "label": torch.randint(0, 3, (1, 16, 16, 8), generator=g)} for _ in range(4)]
        task = SegmentationTask(3)
        trainer = SiteTrainer(adapted, DiceCELoss(to_onehot_y=True, softmax=True),
                              torch.optim.SGD(adapted.trainable_parameters(), lr=0.1),
                              make_loader(data, 4, False, collate_fn=task.collate_fn),
                              make_loader(data, 2, False, collate_fn=task.collate_fn), device="cpu", task=task)
        return trainer, trainer.configure_cache(cache, data)

    cached, decision = trainer_with("auto")
    assert decision.enabled, decision.reason
    assert "tokens entering block 2 and the mid-level tokens" in decision.reason
    assert [tuple(s.shape) for s in cached.cache.states] == [(4, 1, 16, 16, 8), (4, 33, 32), (4, 33, 32)]
    plain, off = trainer_with("off")
    assert not off.enabled
    a, b = cached.train_round(steps=1), plain.train_round(steps=1)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    for (n, p), (m, q) in zip(cached.adapted.net.named_parameters(), plain.adapted.net.named_parameters()):
        assert n == m and torch.allclose(p, q, atol=1e-6), n  # the same step on the same weights
    assert cached.evaluate(kinds=("personalised",))["personalised"]["n"] == 4


def test_a_trainable_cls_token_keeps_the_segmenters_cache_off_naming_it():
    from flare_duallora.nets.vit_segmenter import ViTSegmenter
    from flare_duallora.training.prefix_cache import make_split

    net = ViTSegmenter(1, (16, 16, 8), (4, 4, 4), out_channels=2, hidden_size=32, mlp_dim=64, num_layers=4,
                       num_heads=4, feature_size=4)
    for p in net.parameters():
        p.requires_grad = False
    net.vit.cls_token.requires_grad = True
    assert make_split(net).frozen_parameters_trainable() == ["vit.cls_token"]
