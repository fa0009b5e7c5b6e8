"""End-to-end workflows shared by the CLI, the demo and the benchmarks.

Prepare a task (synthetic data in the real on-disk formats, per-site datalists, a copy of the reference bundle,
a pretrained backbone), run a method in the FLARE simulator, and format the per-site results.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import flare_duallora
from flare_duallora.flare.job import build_job, export_job
from flare_duallora.flare.simulate import SimulationResult, run_simulator
from flare_duallora.metrics import HEADLINE

REFERENCE_BUNDLES = {
    "cmr3d": "cmr3d_vit_classification",
    "cls2d": "cls2d_classification",
}
VENDORS = ("Siemens", "Philips", "GE", "Canon")


def reference_bundle(name: str) -> Path:
    """Path of a reference bundle shipped with the package (``cmr3d`` or ``cls2d``, or its folder name)."""
    folder = REFERENCE_BUNDLES.get(name, name)
    path = Path(flare_duallora.__file__).parent / "bundles" / folder
    if not (path / "configs").is_dir():
        raise ValueError(f"unknown reference bundle {name!r}; known: {sorted(REFERENCE_BUNDLES)}")
    return path


def init_bundle(name: str, dest: str | Path) -> Path:
    """Copy a reference bundle to ``dest`` (a hospital then edits it or replaces it by its own)."""
    dest = Path(dest)
    if not (dest / "configs").is_dir():
        shutil.copytree(reference_bundle(name), dest, dirs_exist_ok=True)
    return dest


@dataclass
class TaskSetup:
    """Everything a federated run needs: a bundle, one datalist per site, and the bundle overrides."""

    name: str
    bundle: Path
    datalist_dir: Path
    sites: list[str]
    overrides: dict = field(default_factory=dict)
    adapter: dict = field(default_factory=dict)


def client_names(datalist_dir: Path) -> list[str]:
    """Client names listed in a datalist folder's ``clients.json`` (written by the data splitter)."""
    return [c["name"] for c in json.loads((Path(datalist_dir) / "clients.json").read_text())["clients"]]


# Presets: ``tiny`` for tests / CI, ``small`` for a laptop CPU in minutes, ``full`` for a GPU.
CMR_PRESETS = {
    "tiny": dict(per_vendor=8, shape=(24, 24, 6), pretrain_per_vendor=8, pretrain_epochs=4,
                 overrides={"image_size": [16, 16, 4], "patch_size": [8, 8, 2], "hidden_size": 32, "mlp_dim": 64,
                            "num_heads": 4, "batch_size": 4}),
    # a ViT learns the phantoms from a few hundred steps only with small patches and deterministic transforms
    "small": dict(per_vendor=40, shape=(48, 48, 8), pretrain_per_vendor=40, pretrain_epochs=40,
                  overrides={"image_size": [32, 32, 8], "patch_size": [4, 4, 4], "hidden_size": 64, "mlp_dim": 128,
                             "num_heads": 4, "batch_size": 8, "train#random_transforms": []}),
    "full": dict(per_vendor=120, shape=(96, 96, 12), pretrain_per_vendor=120, pretrain_epochs=60,
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
                       task: str, log) -> None:
    """Pretrain the bundle's backbone on a disjoint cohort unless ``models/model.pt`` already exists."""
    from flare_duallora.training.pretrain import pooled_datalist, pretrain_backbone

    if (bundle / "models" / "model.pt").is_file():
        return
    names = _ensure_datalists(pre_datalists, make_cohort, "a disjoint pretraining cohort (other subjects, other seed)",
                              log)
    pooled = pooled_datalist([pre_datalists / f"{s}.json" for s in names], pre_datalists.parent / "pooled.json")
    log(f"pretraining the backbone on {task}")
    pretrain_backbone(bundle, pooled, overrides, epochs=epochs, seed=seed, log=log)


def prepare_cmr(workdir: str | Path, preset: str = "small", seed: int = 0, pretrain: bool = True,
                log=print) -> TaskSetup:
    """Synthetic vendor-shift CMR cohort (ACDC + M&Ms layouts), one datalist per vendor, a pretrained bundle."""
    from flare_duallora.data.datalists import split_cmr
    from flare_duallora.data.synthetic_cmr import generate_cmr

    p = CMR_PRESETS[preset]
    work = Path(workdir)
    data_root = work / "data" / f"cmr_{preset}_seed{seed}"
    datalists = data_root / "datalists"
    sites = _ensure_datalists(
        datalists,
        lambda: split_cmr(*generate_cmr(data_root / "raw", n_per_vendor=p["per_vendor"], shape=p["shape"], seed=seed),
                          datalists, label_mode="binary", seed=seed),
        f"the synthetic CMR cohort in {data_root}", log)
    bundle = init_bundle("cmr3d", work / "bundles" / f"cmr3d_{preset}")
    overrides = dict(p["overrides"])
    if pretrain:
        pre = work / "data" / f"cmr_{preset}_pretrain"
        _ensure_pretrained(
            bundle, pre / "datalists",
            lambda: split_cmr(*generate_cmr(pre / "raw", n_per_vendor=p["pretrain_per_vendor"], shape=p["shape"],
                                            seed=seed + 1000, id_offset=500),
                              pre / "datalists", label_mode="multiclass", seed=seed),
            overrides, p["pretrain_epochs"], seed, "the 5-class pathology task of the disjoint cohort", log)
    return TaskSetup("cmr3d", bundle, datalists, sites, overrides, dict(CMR_ADAPTER))


ISIC_PRESETS = {
    "tiny": dict(per_center=12, size=32, pretrain_per_center=12, pretrain_epochs=3,
                 overrides={"image_size": [16, 16], "patch_size": [8, 8], "hidden_size": 32, "mlp_dim": 64,
                            "num_heads": 4, "batch_size": 8, "train#random_transforms": []}),
    "small": dict(per_center=48, size=48, pretrain_per_center=48, pretrain_epochs=30,
                  overrides={"image_size": [32, 32], "patch_size": [4, 4], "hidden_size": 64, "mlp_dim": 128,
                             "num_heads": 4, "batch_size": 16, "train#random_transforms": []}),
    "full": dict(per_center=400, size=224, pretrain_per_center=400, pretrain_epochs=40,
                 overrides={"image_size": [128, 128], "patch_size": [16, 16], "batch_size": 32}),
}
CLS2D_ADAPTER = {"blocks": "last:2", "head": "vit.classification_head", "rank": 4}


def prepare_isic(workdir: str | Path, preset: str = "small", seed: int = 0, pretrain: bool = True,
                 log=print) -> TaskSetup:
    """Synthetic Fed-ISIC2019 (FLamby split CSV + JPEGs, per-centre colour shift and label skew), one site per
    centre, and the 2D bundle pretrained on a disjoint pooled cohort."""
    from flare_duallora.data.datalists import split_isic
    from flare_duallora.data.synthetic_isic import generate_isic

    p = ISIC_PRESETS[preset]
    work = Path(workdir)
    data_root = work / "data" / f"isic_{preset}_seed{seed}"
    datalists = data_root / "datalists"
    sites = _ensure_datalists(
        datalists,
        lambda: split_isic(*generate_isic(data_root / "raw", n_per_center=p["per_center"], size=p["size"], seed=seed),
                           datalists),
        f"the synthetic Fed-ISIC2019 cohort in {data_root}", log)
    bundle = init_bundle("cls2d", work / "bundles" / f"cls2d_{preset}")
    overrides = dict(p["overrides"])
    if pretrain:
        pre = work / "data" / f"isic_{preset}_pretrain"
        _ensure_pretrained(
            bundle, pre / "datalists",
            lambda: split_isic(*generate_isic(pre / "raw", n_per_center=p["pretrain_per_center"], size=p["size"],
                                              seed=seed + 1000, id_offset=100000), pre / "datalists"),
            overrides, p["pretrain_epochs"], seed, "the pooled disjoint cohort (8 lesion classes)", log)
    return TaskSetup("isic", bundle, datalists, sites, overrides, dict(CLS2D_ADAPTER))


def run_method(setup: TaskSetup, method: str, workdir: str | Path, rounds: int = 3, local_epochs: int = 1,
               seed: int = 0, adapter: Optional[dict] = None, timeout: float = 3600) -> SimulationResult:
    """Build, export and simulate one method on a prepared task."""
    work = Path(workdir)
    settings = {**setup.adapter, **(adapter or {}), "method": method, "seed": seed}
    job = build_job(f"{setup.name}_{method}", str(setup.bundle), str(setup.datalist_dir), settings,
                    num_clients=len(setup.sites), num_rounds=rounds, local_epochs=local_epochs,
                    bundle_overrides=setup.overrides, seed=seed,
                    state_dir=str(work / "site_state" / "{site}"))
    job_dir = export_job(job, work / "jobs")
    shutil.rmtree(work / "site_state", ignore_errors=True)  # a fresh federation: no earlier local adapters
    return run_simulator(job_dir, work / "workspace", setup.sites, timeout=timeout)


def results_table(result: SimulationResult, metrics: Sequence[str] = HEADLINE) -> str:
    """Per-site and mean personalised / global-only metrics as a markdown table."""
    rows = []
    header = "| site | model | " + " | ".join(metrics) + " |"
    rows.append(header)
    rows.append("|" + "---|" * (len(metrics) + 2))
    means: dict = {}
    for site in sorted(result.site_results):
        for kind in ("personalised", "global_only"):
            m = result.site_results[site].get(kind, {})
            vals = [m.get(k, float("nan")) for k in metrics]
            means.setdefault(kind, []).append(vals)
            rows.append(f"| {site} | {kind} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    for kind, vals in means.items():
        cols = list(zip(*vals))
        rows.append(f"| **mean** | {kind} | " + " | ".join(f"{sum(c) / len(c):.3f}" for c in cols) + " |")
    if result.communication:
        per_round = result.communication[-1]["bytes_received"]
        rows.append("")
        rows.append(f"shared state sent per site per round: {max(per_round.values()) / 1024:.1f} KiB")
    return "\n".join(rows)
