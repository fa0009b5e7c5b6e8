"""Backbone pretraining writes a models/model.pt that fits the task network exactly: supervised on another label
set, or self-supervised masked autoencoding (MAE) without labels."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import CMR_BUNDLE, TINY_CMR, write_random_cmr_site
from flare_duallora.bundle import BundleRuntime
from flare_duallora.bundle.reference import init_bundle
from flare_duallora.nets import ViTClassifier
from flare_duallora.training.mae import MaskedAutoencoder, patchify
from flare_duallora.training.pretrain import pretrain_backbone

TINY_2D = {"image_size": [16, 16], "patch_size": [4, 4], "hidden_size": 32, "mlp_dim": 64, "num_heads": 4,
           "batch_size": 4}


def test_pretrain_on_another_label_set_writes_a_strictly_loadable_checkpoint(tmp_path):
    datalist = write_random_cmr_site(tmp_path, "pool", n=9, n_val=3)
    info = json.loads(datalist.read_text())
    for split in ("training", "validation"):  # a 3-class label set for pretraining
        for i, item in enumerate(info[split]):
            item["label"] = i % 3
    info.update(num_classes=3, label_names=["a", "b", "c"])
    datalist.write_text(json.dumps(info))
    bundle = init_bundle("cmr3d", tmp_path / "bundle")
    assert not (bundle / "models" / "model.pt").exists()
    out = pretrain_backbone(bundle, datalist, TINY_CMR, epochs=2, device="cpu", log=lambda *_: None)
    assert out == bundle / "models" / "model.pt"
    task = BundleRuntime(bundle, overrides=TINY_CMR)
    net = task.build_network()
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    assert task.load_pretrained(net)  # strict load into the 2-class task network
    sd = torch.load(out)
    assert sd["vit.classification_head.weight"].shape == (2, TINY_CMR["hidden_size"])
    moved = [k for k in sd if not torch.equal(sd[k], fresh[k])]
    assert any(k.startswith("vit.blocks.") for k in moved)  # the backbone was trained
    assert not (CMR_BUNDLE / "models" / "model.pt").exists()  # the packaged reference bundle is untouched


def smooth_volume(rng, shape=(20, 20, 5)) -> np.ndarray:
    """A few Gaussian blobs: structure a masked autoencoder can infer from the visible patches."""
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij"), -1)
    vol = np.zeros(shape, np.float32)
    for _ in range(3):
        c, w = rng.uniform(0.2, 0.8, 3), rng.uniform(0.15, 0.35)
        vol += np.exp(-((grid - c) ** 2).sum(-1) / (2 * w * w)).astype(np.float32)
    return vol


def write_unlabelled_cmr_cohort(root, n=12) -> str:
    """A pretraining cohort with images only: no 'label', no 'num_classes' (nothing of the downstream task)."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        paths = {}
        for phase in ("ed", "es"):
            path = root / f"u{i:03d}_{phase}.nii.gz"
            nib.save(nib.Nifti1Image(smooth_volume(rng), np.diag([1.5, 1.5, 8.0, 1.0])), str(path))
            paths[phase] = str(path)
        items.append({**paths, "subject": f"u-{i}"})
    path = root / "unlabelled.json"
    path.write_text(json.dumps({"name": "pool", "task": "cmr", "training": items, "validation": []}))
    return path


def test_mae_pretraining_lowers_reconstruction_loss_without_labels_and_loads_strictly(tmp_path):
    datalist = write_unlabelled_cmr_cohort(tmp_path)
    bundle = init_bundle("cmr3d", tmp_path / "bundle")
    overrides = {**TINY_CMR, "batch_size": 4}
    history = []
    out = pretrain_backbone(bundle, datalist, overrides, epochs=6, lr=2e-3, device="cpu", mode="mae",
                            progress=False, history=history, log=lambda *_: None)
    assert len(history) == 6 and history[-1] < 0.9 * history[0]
    task = BundleRuntime(bundle, overrides=TINY_CMR)
    net = task.build_network()
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    assert task.load_pretrained(net)  # strict
    sd = torch.load(out)
    moved = {k for k in sd if not torch.equal(sd[k], fresh[k])}
    assert {"vit.patch_embedding.position_embeddings", "vit.cls_token", "vit.norm.weight"} <= moved
    assert any(k.startswith("vit.blocks.0.attn.") for k in moved)  # the encoder was trained
    assert sd["vit.classification_head.weight"].shape == (2, TINY_CMR["hidden_size"])


def test_mae_pretraining_of_the_2d_bundle(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    items = []
    for i in range(8):
        arr = (255 * np.clip(np.stack([smooth_volume(rng, (20, 20, 1))[..., 0]] * 3, -1) / 2, 0, 1)).astype(np.uint8)
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(arr, "RGB").save(path)
        items.append({"image": str(path), "subject": f"s{i}"})
    datalist = tmp_path / "pool.json"
    datalist.write_text(json.dumps({"training": items, "validation": []}))
    bundle = init_bundle("cls2d", tmp_path / "bundle")
    history = []
    pretrain_backbone(bundle, datalist, TINY_2D, epochs=3, device="cpu", mode="mae", progress=False,
                      history=history, log=lambda *_: None)
    assert history[-1] < history[0]
    task = BundleRuntime(bundle, overrides=TINY_2D)
    assert task.load_pretrained(task.build_network())


def test_patchify_follows_the_vit_token_order():
    """Target i is what token i embeds: the conv patch embedding of image x equals a linear map of patchify(x)."""
    net = ViTClassifier(in_channels=2, img_size=(8, 8, 4), patch_size=(4, 4, 2), hidden_size=16, mlp_dim=32,
                        num_layers=1, num_heads=2)
    conv = net.vit.patch_embedding.patch_embeddings
    x = torch.randn(2, 2, 8, 8, 4)
    with torch.no_grad():
        tokens = conv(x).flatten(2).transpose(1, 2)
        linear = patchify(x, (4, 4, 2)) @ conv.weight.reshape(16, -1).T + conv.bias
    assert torch.allclose(tokens, linear, atol=1e-5)
    mae = MaskedAutoencoder(net, mask_ratio=0.75)
    loss, pred, mask = mae(x, generator=torch.Generator().manual_seed(0))
    assert pred.shape == (2, 8, 2 * 4 * 4 * 2) and mask.sum(1).tolist() == [6.0, 6.0] and loss > 0
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedAutoencoder(net, mask_ratio=1.0)


def test_unknown_pretraining_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="setting 'mode'"):
        pretrain_backbone(CMR_BUNDLE, tmp_path / "none.json", mode="contrastive")


def test_a_pretrained_bundle_describes_its_network_without_overrides_and_logs_lines_off_a_terminal(tmp_path, capsys):
    """The size preset pretraining was given ends up in the bundle's configs: the bundle alone builds the network
    its models/model.pt belongs to (what `flare-duallora job --bundle` loads).  Off a terminal the progress is a
    few plain lines, not carriage-return frames."""
    from flare_duallora.bundle.export import load_bundle_network

    datalist = write_unlabelled_cmr_cohort(tmp_path, n=6)
    bundle = init_bundle("cmr3d", tmp_path / "bundle")
    lines = []
    pretrain_backbone(bundle, datalist, {**TINY_CMR, "batch_size": 4}, epochs=40, device="cpu", mode="mae",
                      log=lines.append)  # progress=True, but pytest's stderr is not a terminal
    assert "\r" not in capsys.readouterr().err
    epochs = [line for line in lines if line.startswith("pretrain (mae) epoch")]
    assert len(epochs) == 20 and epochs[-1].startswith("pretrain (mae) epoch 40/40 (100 %)")
    assert BundleRuntime(CMR_BUNDLE).get("hidden_size") != TINY_CMR["hidden_size"]  # the reference's own size differs
    runtime = BundleRuntime(bundle)  # no overrides
    assert runtime.get("hidden_size") == TINY_CMR["hidden_size"] and runtime.get("image_size") == TINY_CMR["image_size"]
    net = load_bundle_network(bundle)  # builds network_def from the configs and loads model.pt strictly
    assert net.vit.classification_head.weight.shape == (2, TINY_CMR["hidden_size"])
