"""Backbone pretraining writes a models/model.pt that fits the task network exactly."""

from __future__ import annotations

import json

import torch

from conftest import CMR_BUNDLE, TINY_CMR, write_random_cmr_site
from flare_duallora.bundle import BundleRuntime
from flare_duallora.training.pretrain import pretrain_backbone
from flare_duallora.workflows import init_bundle


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
