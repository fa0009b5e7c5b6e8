"""Synthetic CMR phantoms and ISIC images: anatomy, vendor/centre shift, layout, determinism."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from flare_duallora.data import ISIC_CLASSES, generate_cmr, generate_isic, read_acdc, read_mnms
from flare_duallora.data.cmr_phantom import (
    VENDOR_STYLES,
    render_frame,
    sample_anatomy,
)
from flare_duallora.data.synthetic_cmr import MNMS_CSV_NAME, allocate_labels
from flare_duallora.data.synthetic_isic import (
    allocate_counts,
    center_label_counts,
    plan_counts,
    render_lesion,
)

SHAPE = (64, 64, 10)
SIEMENS = VENDOR_STYLES["Siemens"]
RV, MYO, LV = 1, 2, 3


def _labels(pathology: str, seed: int, phase: float = 0.0):
    anatomy = sample_anatomy(pathology, np.random.default_rng(seed))
    return anatomy, render_frame(anatomy, SIEMENS, SHAPE, SIEMENS.spacing, phase)[1]


# ----------------------------------------------------------------------------- phantom anatomy
@pytest.mark.parametrize("seed", range(3))
def test_pathology_geometry(seed: int):
    nor = _labels("NOR", seed)[1]
    dcm = _labels("DCM", seed)[1]
    hcm = _labels("HCM", seed)[1]
    rv = _labels("RV", seed)[1]
    assert (dcm == LV).sum() > 1.3 * (nor == LV).sum()  # dilated LV
    assert (hcm == MYO).sum() / (hcm == LV).sum() > 2 * (nor == MYO).sum() / (nor == LV).sum()
    assert (hcm == LV).sum() < (nor == LV).sum()  # small cavity
    assert (rv == RV).sum() > 1.5 * (nor == RV).sum()  # dilated RV


@pytest.mark.parametrize("pathology", ["NOR", "DCM", "HCM", "MINF", "RV"])
def test_systole_is_contracted_diastole(pathology: str):
    _, ed = _labels(pathology, 7, phase=0.0)
    _, es = _labels(pathology, 7, phase=1.0)
    assert 0 < (es == LV).sum() < (ed == LV).sum() and (es == RV).sum() < (ed == RV).sum()
    assert abs(int((es == MYO).sum()) - int((ed == MYO).sum())) < 0.1 * (ed == MYO).sum()


def test_ejection_fraction_orders_pathologies():
    def ef(p):
        ed, es = (_labels(p, 11, ph)[1] for ph in (0.0, 1.0))
        return 1 - (es == LV).sum() / (ed == LV).sum()
    assert ef("HCM") > ef("NOR") > ef("MINF") > ef("DCM")


def test_infarct_sector_is_thin_and_akinetic():
    anatomy, ed = _labels("MINF", 3, phase=0.0)
    es = _labels("MINF", 3, phase=1.0)[1]
    g = min(SHAPE[:2]) * 1.25 / 130.0
    x = (np.arange(SHAPE[0]) - (SHAPE[0] - 1) / 2) * SIEMENS.spacing[0] / g - anatomy.centre[0]
    y = (np.arange(SHAPE[1]) - (SHAPE[1] - 1) / 2) * SIEMENS.spacing[0] / g - anatomy.centre[1]
    theta = np.arctan2(y[None, :], x[:, None])[..., None]
    scar = np.broadcast_to(np.cos(theta - anatomy.scar_angle) > np.cos(0.15), SHAPE)
    remote = np.broadcast_to(np.cos(theta - anatomy.scar_angle - np.pi) > np.cos(0.15), SHAPE)
    # No inward motion in the scar (cavity unchanged) while the remote wall contracts.
    assert ((es == LV) & scar).sum() == ((ed == LV) & scar).sum()
    assert ((es == LV) & remote).sum() < 0.8 * ((ed == LV) & remote).sum()
    assert ((ed == MYO) & scar).sum() < 0.8 * ((ed == MYO) & remote).sum()  # thinned


def test_allocate_labels_follows_vendor_mix():
    rng = np.random.default_rng(0)
    assert Counter(allocate_labels(10, VENDOR_STYLES["Siemens"].label_mix, rng)) == {
        "NOR": 2, "MINF": 2, "DCM": 2, "HCM": 2, "RV": 2}
    philips = Counter(allocate_labels(10, VENDOR_STYLES["Philips"].label_mix, rng))
    assert philips["MINF"] == 0 and philips["NOR"] == 3
    for vendor, style in VENDOR_STYLES.items():  # every site gets both binary classes
        groups = allocate_labels(2, style.label_mix, rng)
        assert "NOR" in groups and len(set(groups)) == 2, vendor
    assert len({tuple(sorted(s.label_mix.items())) for s in VENDOR_STYLES.values()}) == 4


# ----------------------------------------------------------------------------- written cohorts
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmr")
    acdc, mnms = generate_cmr(base / "a", n_per_vendor=5, shape=(32, 32, 8), n_frames=3, seed=0)
    records = read_acdc(acdc) + read_mnms(mnms, cache_dir=base / "cache")
    return {"base": base, "acdc": acdc, "mnms": mnms, "records": records}


def _arrays(root: Path) -> dict[str, bytes]:
    """Data arrays (not file bytes) of every NIfTI and the text of every cfg/CSV under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.name.endswith(".nii.gz"):
            img = nib.load(str(path))
            out[rel] = hashlib.sha1(np.asarray(img.dataobj).tobytes() + img.affine.tobytes()).digest()
        elif path.suffix in (".cfg", ".csv"):
            out[rel] = path.read_bytes()
    return out


def test_layouts_and_ground_truth(cohort):
    acdc, mnms = cohort["acdc"], cohort["mnms"]
    assert acdc.name == "ACDC" and (acdc / "training/patient001/patient001_4d.nii.gz").is_file()
    assert mnms.name == "OpenDataset" and mnms.parent.name == "MnMs" and (mnms / MNMS_CSV_NAME).is_file()
    cine = nib.load(str(acdc / "training/patient001/patient001_4d.nii.gz"))
    assert cine.shape == (32, 32, 8, 3)
    for r in cohort["records"]:
        ed, es = (np.asarray(nib.load(p).dataobj) for p in (r.ed_gt, r.es_gt))
        lv = LV if r.source == "ACDC" else 1  # M&Ms labels: 1 LV, 2 MYO, 3 RV
        assert (es == lv).sum() < (ed == lv).sum(), r.subject
        assert set(np.unique(ed)) == {0, 1, 2, 3}
        if r.source == "MnMs":  # 4D gt is labelled only on the ED and ES frames
            gt4d = np.asarray(nib.load(r.meta["cine_4d"].replace("_sa.", "_sa_gt.")).dataobj)
            labelled = [t for t in range(gt4d.shape[3]) if gt4d[..., t].any()]
            assert labelled == sorted({r.meta["ed_index"], r.meta["es_index"]})
            img4d = np.asarray(nib.load(r.meta["cine_4d"]).dataobj)
            assert np.array_equal(np.asarray(nib.load(r.ed).dataobj), img4d[..., r.meta["ed_index"]])
    with open(mnms / MNMS_CSV_NAME, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["", "External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Age",
                       "Pathology", "Sex", "Height", "Weight"]
    assert {row[3] for row in rows[1:]} == {"B", "C", "D"}
    assert {row[8] for row in rows[1:]} <= {"NOR", "DCM", "HCM", "IHD", "ARV"}


def test_vendor_appearance_and_resolution_differ(cohort):
    stats = {}
    for vendor in ("Siemens", "Philips", "GE", "Canon"):
        recs = [r for r in cohort["records"] if r.vendor == vendor]
        assert len(recs) == 5
        lv = LV if vendor == "Siemens" else 1
        means, contrast, zooms = [], [], set()
        for r in recs:
            img = nib.load(r.ed)
            data, gt = img.get_fdata(), np.asarray(nib.load(r.ed_gt).dataobj)
            means.append(data.mean())
            contrast.append(np.median(data[gt == lv]) / np.median(data[gt == MYO]))
            zooms.add(tuple(round(float(z), 1) for z in img.header.get_zooms()))
        stats[vendor] = (np.mean(means), np.mean(contrast))
        assert all(1.1 <= z[0] <= 1.95 and 8 <= z[2] <= 10 for z in zooms)
    vendors = list(stats)
    for i, a in enumerate(vendors):
        for b in vendors[i + 1:]:
            mean_a, con_a = stats[a]
            mean_b, con_b = stats[b]
            assert abs(mean_a - mean_b) > 0.1 * max(mean_a, mean_b), (a, b)
            assert abs(con_a - con_b) > 0.1, (a, b)
    slice_mm = {r.vendor: float(nib.load(r.ed).header.get_zooms()[2]) for r in cohort["records"]}
    assert slice_mm == {"Siemens": 10.0, "Philips": 10.0, "GE": 8.0, "Canon": 9.0}


def test_cmr_determinism_and_disjoint_cohorts(cohort):
    base = cohort["base"]
    kwargs = dict(n_per_vendor={"Siemens": 2, "GE": 2}, shape=(24, 24, 6), n_frames=2)
    generate_cmr(base / "s1", seed=4, **kwargs)
    generate_cmr(base / "s2", seed=4, **kwargs)
    generate_cmr(base / "s3", seed=5, **kwargs)
    same, other = _arrays(base / "s1"), _arrays(base / "s2")
    assert same and same == other
    different = _arrays(base / "s3")
    assert same.keys() == different.keys() and same != different
    acdc, mnms = generate_cmr(base / "pre", seed=9, id_offset=100, **kwargs)
    pre = {r.subject for r in read_acdc(acdc) + read_mnms(mnms, cache_dir=base / "pc")}
    fed = {r.subject for r in read_acdc(base / "s1/ACDC") + read_mnms(base / "s1/MnMs/OpenDataset",
                                                                       cache_dir=base / "fc")}
    assert len(pre) == len(fed) == 4 and not pre & fed and "patient101" in pre


# ----------------------------------------------------------------------------- ISIC
def test_allocate_counts_keeps_present_classes():
    real = [2279, 3363, 2245, 606, 923, 97, 87, 330]
    counts = allocate_counts(real, 20)
    assert sum(counts) == 20 and min(counts) >= 1 and counts[1] == max(counts)
    assert allocate_counts([166, 349, 0, 0, 140, 0, 0, 0], 7) == [2, 3, 0, 0, 2, 0, 0, 0]
    assert allocate_counts(real, 3) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert center_label_counts()[(4, "test")] == [49, 66, 0, 0, 49, 0, 0, 0]
    scaled = plan_counts(range(6), scale=0.01)
    assert sum(scaled[(0, "train")]) == 99 and sum(scaled[(5, "test")]) == 1


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    base = tmp_path_factory.mktemp("isic")
    root, split = generate_isic(base / "a", n_per_center=12, size=32, seed=0)
    return {"base": base, "root": root, "split": split}


def test_isic_layout_and_label_skew(isic):
    with open(isic["split"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", *ISIC_CLASSES, "UNK", "target", "center", "fold", "fold2"]
    assert Path(isic["split"]).name == "train_test_split"
    per_center = {c: Counter() for c in range(6)}
    for row in rows:
        target, c = int(row["target"]), int(row["center"])
        assert float(row[ISIC_CLASSES[target]]) == 1.0 and row["fold2"] == f"{row['fold']}_{c}"
        per_center[c][ISIC_CLASSES[target]] += 1
        image = Image.open(isic["root"] / "ISIC_2019_Training_Input_preprocessed" / f"{row['image']}.jpg")
        assert image.mode == "RGB" and min(image.size) == 32 and image.format == "JPEG"
    assert all(sum(c.values()) == 12 for c in per_center.values())
    assert set(per_center[4]) == {"MEL", "NV", "BKL"}  # MSK has only three classes
    assert set(per_center[0]) == set(ISIC_CLASSES)
    assert {r["fold"] for r in rows if r["center"] == "5"} == {"train", "test"}


def test_isic_determinism(isic):
    base = isic["base"]
    _, split_b = generate_isic(base / "b", n_per_center=12, size=32, seed=0)
    _, split_c = generate_isic(base / "c", n_per_center=12, size=32, seed=1)
    assert Path(isic["split"]).read_bytes() == split_b.read_bytes()
    jpgs = lambda d: {p.name: p.read_bytes() for p in sorted(d.rglob("*.jpg"))}  # noqa: E731
    a, b, c = jpgs(base / "a"), jpgs(base / "b"), jpgs(base / "c")
    assert a == b and a.keys() == c.keys() and a != c


def test_isic_classes_learnable_and_centres_shifted():
    from sklearn.linear_model import LogisticRegression

    def features(img: Image.Image) -> np.ndarray:
        a = np.asarray(img, float) / 255
        h, w, _ = a.shape
        crop = a[h // 4: 3 * h // 4, w // 2 - h // 4: w // 2 + h // 4].reshape(-1, 3)
        return np.concatenate([crop.mean(0), crop.std(0), np.percentile(crop, [10, 50, 90], axis=0).ravel()])

    X, y = [], []
    for k, name in enumerate(ISIC_CLASSES):
        for i in range(12):
            X.append(features(render_lesion(name, i % 6, 32, np.random.default_rng([k, i]))))
            y.append(k)
    X, y = np.array(X), np.array(y)
    train = np.arange(len(y)) % 2 == 0
    accuracy = LogisticRegression(max_iter=2000).fit(X[train], y[train]).score(X[~train], y[~train])
    assert accuracy > 0.4  # chance is 0.125

    def mean_rgb(center: int) -> np.ndarray:
        return np.mean([np.asarray(render_lesion("NV", center, 32, np.random.default_rng(i)), float)
                        .reshape(-1, 3).mean(0) for i in range(4)], axis=0)
    colours = [mean_rgb(c) for c in range(6)]
    assert min(np.abs(colours[a] - colours[b]).max() for a in range(6) for b in range(a + 1, 6)) > 2
