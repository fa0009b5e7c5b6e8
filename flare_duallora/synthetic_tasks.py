"""Synthetic task set-ups for the demo, the benchmarks and the tests.

A set-up is synthetic data in the real on-disk formats (ACDC + M&Ms for cine CMR, Fed-ISIC2019 for 2D), one datalist
per site, a copy of the reference bundle and a backbone pretrained on a disjoint cohort (nothing is downloaded).
The backbone is pretrained like a foundation model, by masked autoencoding without any downstream label
(``pretrain="mae"``; ``"supervised"`` trains on another label set of the disjoint cohort).

Benchmark presets (``medium``, ``full``) size each site like the real data sets: CMR vendors in the proportions of
ACDC + M&Ms-1 (:data:`CMR_VENDOR_SUBJECTS`), ISIC centres in Fed-ISIC2019's per-centre counts and label skew
(``flare_duallora/data/fed_isic2019_center_label_counts.csv``), and every site gets train / validation / test lists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from flare_duallora.bundle.reference import init_bundle

VENDORS = ("Siemens", "Philips", "GE", "Canon")

#: subjects per vendor in ACDC + M&Ms-1 (vendor = client; ACDC's 150 subjects are Siemens): Siemens = ACDC 150 +
#: M&Ms vendor A 125 (75 train, 10 val, 40 test); Philips = B 125 (75 / 10 / 40); GE = C 75 (25 / 10 / 40);
#: Canon = D 50 (0 / 10 / 40).  See ../shared/research/methods-and-datasets.md, sections 3.1 and 3.2.
CMR_VENDOR_SUBJECTS = {"Siemens": 275, "Philips": 125, "GE": 75, "Canon": 50}


@dataclass
class TaskSetup:
    """Everything a federated run needs: a bundle, one datalist per site, and the bundle overrides."""

    name: str
    bundle: Path
    datalist_dir: Path
    sites: list[str]
    overrides: dict = field(default_factory=dict)
    adapter: dict = field(default_factory=dict)
    # writes the same cohort's datalists split with another seed into a folder (benchmarks), or None
    resplit: Optional[Callable[[int, Path], Path]] = field(default=None, repr=False)


def client_names(datalist_dir: Path) -> list[str]:
    """Client names listed in a datalist folder's ``clients.json`` (written by the data splitter)."""
    return [c["name"] for c in json.loads((Path(datalist_dir) / "clients.json").read_text())["clients"]]


def proportional(counts: dict, scale: float, minimum: int) -> dict:
    """``counts`` scaled, each at least ``minimum``."""
    return {k: max(minimum, round(v * scale)) for k, v in counts.items()}


# ``tiny`` for tests, ``small`` for the demo on a laptop CPU in minutes, ``medium`` for the benchmark on a CPU,
# ``full`` for a GPU.  A ViT learns the phantoms from a few hundred steps only with small patches and deterministic
# transforms.
# a masked-autoencoder backbone needs a larger fine-tuning rate than the bundle's default 1e-3 on so little data
_CMR_SMALL_NET = {"image_size": [32, 32, 8], "patch_size": [4, 4, 4], "hidden_size": 64, "mlp_dim": 128,
                  "num_heads": 4, "batch_size": 8, "train#random_transforms": [], "learning_rate": 0.01}
CMR_PRESETS = {
    "tiny": dict(per_vendor=10, shape=(24, 24, 6), pretrain_per_vendor=8, pretrain_epochs=4, test_fraction=0.3,
                 overrides={"image_size": [16, 16, 4], "patch_size": [8, 8, 2], "hidden_size": 32, "mlp_dim": 64,
                            "num_heads": 4, "batch_size": 4, "train#random_transforms": []}),
    "small": dict(per_vendor=40, shape=(48, 48, 8), pretrain_per_vendor=40, pretrain_epochs=40,
                  overrides=_CMR_SMALL_NET),
    "medium": dict(per_vendor=proportional(CMR_VENDOR_SUBJECTS, 0.4, 16), shape=(48, 48, 8), pretrain_per_vendor=40,
                   pretrain_epochs=40, test_fraction=0.3, overrides=_CMR_SMALL_NET),
    "full": dict(per_vendor=CMR_VENDOR_SUBJECTS, shape=(96, 96, 12), pretrain_per_vendor=120, pretrain_epochs=60,
                 test_fraction=0.3,
                 overrides={"image_size": [64, 64, 8], "patch_size": [8, 8, 4], "batch_size": 16,
                            "train#random_transforms": []}),
}
CMR_ADAPTER = {"blocks": "last:2", "head": "vit.classification_head", "rank": 4}


def _ensure_datalists(datalists: Path, make, what: str, log) -> list[str]:
    """Client names of a datalist folder, generating the cohort first when it is not there yet."""
    if not (datalists / "clients.json").is_file():
        log(f"generating {what}")
        make()
    return client_names(datalists)


def _ensure_pretrained(bundle: Path, pre_datalists: Path, make_cohort, overrides: dict, epochs: int, seed: int,
                       mode: str, log) -> None:
    """Pretrain the bundle's backbone on a disjoint cohort unless ``models/model.pt`` already exists."""
    from flare_duallora.training.pretrain import pooled_datalist, pretrain_backbone

    if (bundle / "models" / "model.pt").is_file():
        return
    names = _ensure_datalists(pre_datalists, make_cohort, "a disjoint pretraining cohort (other subjects, other seed)",
                              log)
    pooled = pooled_datalist([pre_datalists / f"{s}.json" for s in names], pre_datalists.parent / "pooled.json")
    what = "masked autoencoding, no labels" if mode == "mae" else "supervised, another label set"
    log(f"pretraining the backbone on the disjoint cohort ({what})")
    pretrain_backbone(bundle, pooled, overrides, epochs=epochs, seed=seed, log=log, mode=mode)


#: the heterogeneity knobs of the synthetic generators and their defaults (today's cohorts)
SHIFT_DEFAULTS = {"feature_shift": 1.0, "label_prior_shift": 1.0, "concept_shift": 0.0}


def shift_label(shift: Optional[dict]) -> str:
    """A folder-name suffix for the non-default knobs of ``shift`` ('' for today's cohort)."""
    unknown = set(shift or {}) - set(SHIFT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown heterogeneity knob(s) {sorted(unknown)}; expected some of {sorted(SHIFT_DEFAULTS)}")
    parts = [f"{k.split('_')[0]}{float(v):g}" for k, v in sorted((shift or {}).items())
             if float(v) != SHIFT_DEFAULTS[k]]
    return ("_" + "_".join(parts)) if parts else ""


def prepare_cmr(workdir: str | Path, preset: str = "small", seed: int = 0, pretrain: Optional[str] = "mae",
                log=print, shift: Optional[dict] = None) -> TaskSetup:
    """Synthetic vendor-shift CMR cohort (ACDC + M&Ms layouts), one datalist per vendor, a pretrained bundle
    (``pretrain`` = ``mae`` | ``supervised`` | None).  ``shift`` sets the federated cohort's heterogeneity knobs
    (:data:`SHIFT_DEFAULTS`, see :func:`~flare_duallora.data.synthetic_cmr.generate_cmr`); the backbone is
    pretrained on a default disjoint cohort, shared by every ``shift``."""
    from flare_duallora.data.datalists import split_cmr
    from flare_duallora.data.synthetic_cmr import generate_cmr

    p = CMR_PRESETS[preset]
    work = Path(workdir)
    data_root = work / "data" / f"cmr_{preset}_seed{seed}{shift_label(shift)}"
    datalists = data_root / "datalists"
    test_fraction = p.get("test_fraction", 0.0)

    def split(split_seed: int, out: Path) -> Path:
        split_cmr(data_root / "raw" / "ACDC", data_root / "raw" / "MnMs" / "OpenDataset", out, label_mode="binary",
                  seed=split_seed, test_fraction=test_fraction)
        return out

    def make():
        generate_cmr(data_root / "raw", n_per_vendor=p["per_vendor"], shape=p["shape"], seed=seed, **(shift or {}))
        split(seed, datalists)

    sites = _ensure_datalists(datalists, make, f"the synthetic CMR cohort in {data_root}", log)
    bundle = init_bundle("cmr3d", work / "bundles" / f"cmr3d_{preset}_{pretrain or 'random'}")
    overrides = dict(p["overrides"])
    if pretrain:
        pre = work / "data" / f"cmr_{preset}_pretrain"
        _ensure_pretrained(
            bundle, pre / "datalists",
            lambda: split_cmr(*generate_cmr(pre / "raw", n_per_vendor=p["pretrain_per_vendor"], shape=p["shape"],
                                            seed=seed + 1000, id_offset=500),
                              pre / "datalists", label_mode="multiclass", seed=seed),
            overrides, p["pretrain_epochs"], seed, pretrain, log)
    return TaskSetup("cmr3d", bundle, datalists, sites, overrides, dict(CMR_ADAPTER), resplit=split)


#: the segmentation decoder's width per preset (the encoder is the classification preset's ViT)
CMR_SEG_FEATURES = {"tiny": 4, "small": 8, "medium": 8, "full": 16}
CMR_SEG_ADAPTER = {"blocks": "last:2", "head": "decoder", "rank": 4}


def prepare_cmr_segmentation(workdir: str | Path, preset: str = "small", seed: int = 0, pretrain: Optional[str] = "mae",
                             log=print) -> TaskSetup:
    """The same synthetic CMR cohort and MAE-pretrained ViT as :func:`prepare_cmr`, for segmentation: one item per
    annotated frame (ED, ES) per site (``split cmr --task segmentation``), and the ``cmr3d_segmentation`` bundle whose
    encoder is the classification bundle's pretrained ViT (one foundation model, two tasks) and whose decoder is
    seeded (:func:`~flare_duallora.training.encoder_transfer.write_segmentation_base`)."""
    from flare_duallora.data.cmr_segmentation import split_cmr_segmentation

    cls = prepare_cmr(workdir, preset=preset, seed=seed, pretrain=pretrain, log=log)
    data_root = cls.datalist_dir.parent
    datalists = data_root / "seg_datalists"
    test_fraction = CMR_PRESETS[preset].get("test_fraction", 0.0)

    def split(split_seed: int, out: Path) -> Path:
        split_cmr_segmentation(data_root / "raw" / "ACDC", data_root / "raw" / "MnMs" / "OpenDataset", out,
                               seed=split_seed, test_fraction=test_fraction, cache_dir=data_root / "mnms_3d")
        return out

    sites = _ensure_datalists(datalists, lambda: split(seed, datalists),
                              f"segmentation datalists (ED and ES masks) in {datalists}", log)
    overrides = {**cls.overrides, "feature_size": CMR_SEG_FEATURES[preset]}
    overrides.pop("learning_rate", None)  # the decoder starts from scratch: the bundle's own rate
    bundle = init_bundle("cmr3d_seg", Path(workdir) / "bundles" / f"cmr3d_seg_{preset}_{pretrain or 'random'}")
    if pretrain and not (bundle / "models" / "model.pt").is_file():
        from flare_duallora.training.encoder_transfer import write_segmentation_base

        log(f"segmentation base: the encoder of {cls.bundle / 'models' / 'model.pt'}, a decoder seeded {seed}")
        write_segmentation_base(cls.bundle / "models" / "model.pt", bundle, overrides, seed=seed)
    return TaskSetup("cmr3d_seg", bundle, datalists, sites, overrides, dict(CMR_SEG_ADAPTER), resplit=split)


#: what ``flare-duallora demo --task`` prepares
DEMO_TASKS = {"classification": prepare_cmr, "segmentation": prepare_cmr_segmentation}


ISIC_PRESETS = {
    "tiny": dict(per_center=12, size=32, pretrain_per_center=12, pretrain_epochs=3, val_fraction=0.25,
                 overrides={"image_size": [16, 16], "patch_size": [8, 8], "hidden_size": 32, "mlp_dim": 64,
                            "num_heads": 4, "batch_size": 8, "train#random_transforms": []}),
    "small": dict(per_center=48, size=48, pretrain_per_center=48, pretrain_epochs=30,
                  overrides={"image_size": [32, 32], "patch_size": [4, 4], "hidden_size": 64, "mlp_dim": 128,
                             "num_heads": 4, "batch_size": 16, "train#random_transforms": []}),
    # Fed-ISIC2019's per-centre train/test counts and label mix, scaled (the smallest centre keeps a few images)
    "medium": dict(scale=0.03, size=48, pretrain_per_center=40, pretrain_epochs=30, val_fraction=0.25,
                   overrides={"image_size": [32, 32], "patch_size": [4, 4], "hidden_size": 64, "mlp_dim": 128,
                              "num_heads": 4, "batch_size": 16, "train#random_transforms": []}),
    "full": dict(scale=0.1, size=224, pretrain_per_center=400, pretrain_epochs=40, val_fraction=0.25,
                 overrides={"image_size": [128, 128], "patch_size": [16, 16], "batch_size": 32}),
}
CLS2D_ADAPTER = {"blocks": "last:2", "head": "vit.classification_head", "rank": 4}


def prepare_isic(workdir: str | Path, preset: str = "small", seed: int = 0, pretrain: Optional[str] = "mae",
                 log=print) -> TaskSetup:
    """Synthetic Fed-ISIC2019 (FLamby split CSV + JPEGs, per-centre colour shift and label skew), one site per
    centre, and the 2D bundle pretrained on a disjoint pooled cohort."""
    from flare_duallora.data.datalists import split_isic
    from flare_duallora.data.synthetic_isic import generate_isic

    p = ISIC_PRESETS[preset]
    work = Path(workdir)
    data_root = work / "data" / f"isic_{preset}_seed{seed}"
    datalists = data_root / "datalists"

    def split(split_seed: int, out: Path) -> Path:
        split_isic(data_root / "raw" / "ISIC_2019_Training_Input_preprocessed", data_root / "raw" / "train_test_split",
                   out, val_fraction=p.get("val_fraction"), seed=split_seed)
        return out

    def make():
        sizes = {"scale": p["scale"]} if "scale" in p else {"n_per_center": p["per_center"]}
        images, csv = generate_isic(data_root / "raw", size=p["size"], seed=seed, **sizes)
        split_isic(images, csv, datalists, val_fraction=p.get("val_fraction"), seed=seed)

    sites = _ensure_datalists(datalists, make, f"the synthetic Fed-ISIC2019 cohort in {data_root}", log)
    bundle = init_bundle("cls2d", work / "bundles" / f"cls2d_{preset}_{pretrain or 'random'}")
    overrides = dict(p["overrides"])
    if pretrain:
        pre = work / "data" / f"isic_{preset}_pretrain"
        _ensure_pretrained(
            bundle, pre / "datalists",
            lambda: split_isic(*generate_isic(pre / "raw", n_per_center=p["pretrain_per_center"], size=p["size"],
                                              seed=seed + 1000, id_offset=100000), pre / "datalists"),
            overrides, p["pretrain_epochs"], seed, pretrain, log)
    return TaskSetup("isic", bundle, datalists, sites, overrides, dict(CLS2D_ADAPTER), resplit=split)
