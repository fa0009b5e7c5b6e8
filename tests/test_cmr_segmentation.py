"""Cardiac segmentation datalists: ACDC and M&Ms masks in one convention, one item per annotated frame, splits that
keep a subject's ED and ES items together.

Hand-written fixtures use each dataset's own label values and frame numbering (ACDC 1-based frames in Info.cfg, masks
1 RV 2 MYO 3 LV; M&Ms 0-based ED/ES into 4D files, masks 1 LV 2 MYO 3 RV annotated only at ED and ES).  Every frame's
mask has a different LV size, so an off-by-one frame or a swapped label shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flare_duallora.cli import main
from flare_duallora.data import read_acdc, read_mnms
from flare_duallora.data.cmr_segmentation import (
    SEG_LABEL_NAMES, canonical_mask, segmentation_items, split_by_subject, split_cmr_segmentation,
)
from flare_duallora.data.datalists import read_site_datalist
from flare_duallora.data.records import DatasetFormatError
from flare_duallora.data.synthetic_cmr import generate_cmr

AFFINE = np.diag([1.5, 1.5, 10.0, 1.0])
SHAPE = (12, 12, 3)
ACDC = {"RV": 1, "MYO": 2, "LV": 3}
MNMS = {"LV": 1, "MYO": 2, "RV": 3}
CANON = {"LV": 1, "MYO": 2, "RV": 3}


def anatomy(t: int) -> np.ndarray:
    """Structure names per voxel for frame ``t``: LV a square whose side grows with t, MYO a ring, RV beside."""
    out = np.full(SHAPE, "", dtype=object)
    side = 2 + t % 5
    out[6 - side // 2 - 1: 6 + side - side // 2 + 1, 2:9, :] = "MYO"
    out[6 - side // 2: 6 + side - side // 2, 3:8, :] = "LV"
    out[0:2, :, :] = "RV"
    return out


def encode(structures: np.ndarray, labels: dict) -> np.ndarray:
    out = np.zeros(structures.shape, np.uint8)
    for name, value in labels.items():
        out[structures == name] = value
    return out


def _save(data: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))


def _acdc_subject(root: Path, name: str, group: str, ed: int, es: int) -> None:
    folder = root / "training" / name
    folder.mkdir(parents=True)
    (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: {group}\nNbFrame: 10\n")
    for frame in (ed, es):  # 1-based frame numbers in the file names
        _save(np.full(SHAPE, frame, np.int16), folder / f"{name}_frame{frame:02d}.nii.gz")
        _save(encode(anatomy(frame), ACDC), folder / f"{name}_frame{frame:02d}_gt.nii.gz")


def _mnms_subject(root: Path, code: str, ed: int, es: int, n_t: int = 6) -> None:
    folder = root / "Training/Labeled" / code
    cine = np.stack([np.full(SHAPE, 100 + t, np.int16) for t in range(n_t)], -1)
    gt = np.zeros((*SHAPE, n_t), np.uint8)
    for t in (ed, es):  # annotated only at ED and ES (0-based)
        gt[..., t] = encode(anatomy(t), MNMS)
    _save(cine, folder / f"{code}_sa.nii.gz")
    _save(gt, folder / f"{code}_sa_gt.nii.gz")


MNMS_ROWS = [("A0S9V9", "Siemens", "A", 0, 2, "HCM"), ("E9H1U4", "Philips", "B", 3, 1, "NOR"),
             ("F1A2B3", "Philips", "B", 4, 0, "DCM")]


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    acdc = tmp_path / "database"
    _acdc_subject(acdc, "patient001", "DCM", ed=1, es=7)
    _acdc_subject(acdc, "patient002", "NOR", ed=3, es=9)
    mnms = tmp_path / "OpenDataset"
    mnms.mkdir()
    lines = [",External code,VendorName,Vendor,Centre,ED,ES,Age,Pathology,Sex,Height,Weight"]
    for i, (code, name, letter, ed, es, path) in enumerate(MNMS_ROWS):
        lines.append(f"{i},{code},{name},{letter},1,{ed},{es},50,{path},M,,")
        _mnms_subject(mnms, code, ed, es)
    (mnms / "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv").write_text("\n".join(lines) + "\n")
    return acdc, mnms


def _frame_of(item: dict) -> int:
    """The frame an item's image comes from (the fixtures write the 1-based ACDC frame / 100 + the M&Ms index)."""
    value = int(np.asarray(nib.load(item["image"]).dataobj).flat[0])
    return value - 100 if item["source"] == "MnMs" else value


def test_readers_give_masks_in_one_convention_for_ed_and_es(roots, tmp_path: Path):
    acdc, mnms = roots
    records = read_acdc(acdc) + read_mnms(mnms, cache_dir=tmp_path / "cache")
    items, skipped = segmentation_items(records, tmp_path / "masks")
    assert skipped == [] and len(items) == 2 * len(records)  # one item per annotated frame
    assert {(it["subject"], it["frame"]) for it in items} == {(r.subject, f) for r in records for f in ("ED", "ES")}
    expected_frames = {"patient001": {"ED": 1, "ES": 7}, "patient002": {"ED": 3, "ES": 9},
                       **{code: {"ED": ed, "ES": es} for code, _, _, ed, es, _ in MNMS_ROWS}}
    for it in items:
        t = expected_frames[it["subject"]][it["frame"]]
        assert _frame_of(it) == t, it  # ACDC frames 1-based, M&Ms 0-based
        mask = np.asarray(nib.load(it["label"]).dataobj)
        assert mask.dtype == np.uint8 and Path(it["label"]).is_file()
        assert np.array_equal(mask, encode(anatomy(t), CANON)), it  # LV 1, MYO 2, RV 3 whatever the source
    assert {it["vendor"] for it in items} == {"Siemens", "Philips"}
    assert {it["source"] for it in items if it["vendor"] == "Siemens"} == {"ACDC", "MnMs"}


def test_split_writes_per_vendor_datalists_via_cli(roots, tmp_path: Path, capsys):
    acdc, mnms = roots
    out = tmp_path / "dl"
    assert main(["split", "cmr", "--task", "segmentation", "--acdc", str(acdc), "--mnms", str(mnms),
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["site-siemens", "site-philips"]
    summary = json.loads((out / "clients.json").read_text())
    assert summary["label_names"] == list(SEG_LABEL_NAMES) == ["background", "LV", "MYO", "RV"]
    for site, vendor, n_subjects in (("site-siemens", "Siemens", 3), ("site-philips", "Philips", 2)):
        dl = read_site_datalist(printed[site])  # the check every site runs accepts mask paths
        assert dl["label_mode"] == "segmentation" and dl["num_classes"] == 4 and dl["label_names"] == list(SEG_LABEL_NAMES)
        items = dl["training"] + dl["validation"]
        assert len(items) == 2 * n_subjects and {it["vendor"] for it in items} == {vendor}  # vendor = site
        for it in items:
            assert {"image", "label", "subject"} <= set(it) and Path(it["label"]).resolve().is_relative_to(out.resolve())
    # the classification split is untouched
    assert main(["split", "cmr", "--acdc", str(acdc), "--out", str(tmp_path / "cls")]) == 0
    assert isinstance(json.loads((tmp_path / "cls/site-siemens.json").read_text())["training"][0]["label"], int)


def test_splits_keep_a_subjects_ed_and_es_together(tmp_path: Path):
    items = [{"subject": f"s{i:02d}", "frame": f, "group": ["NOR", "DCM", "HCM"][i % 3]}
             for i in range(23) for f in ("ED", "ES")]
    import random

    for seed in range(20):
        parts = split_by_subject(items, [0.2, 0.25], random.Random(seed))
        sides = [{it["subject"] for it in part} for part in parts]
        assert sum(len(p) for p in parts) == len(items)
        assert all(not (a & b) for i, a in enumerate(sides) for b in sides[i + 1:])  # no subject on two sides
        assert all(len(part) % 2 == 0 and part for part in parts)
        for part in parts:
            for s in {it["subject"] for it in part}:
                assert sorted(it["frame"] for it in part if it["subject"] == s) == ["ED", "ES"]


def test_synthetic_cohort_splits_with_test_set(tmp_path: Path):
    acdc, mnms = generate_cmr(tmp_path / "raw", n_per_vendor=5, shape=(24, 24, 6), n_frames=4, seed=3,
                              write_4d=False)
    clients = split_cmr_segmentation(acdc, mnms, tmp_path / "dl", test_fraction=0.2, seed=1)
    assert list(clients) == ["site-siemens", "site-philips", "site-ge", "site-canon"]
    for path in clients.values():
        dl = json.loads(Path(path).read_text())
        sides = [{it["subject"] for it in dl[k]} for k in ("training", "validation", "test")]
        assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
        for it in dl["training"]:
            mask = np.asarray(nib.load(it["label"]).dataobj)
            assert set(np.unique(mask)) == {0, 1, 2, 3}
        # the generator's anatomy in one convention: LV (1) larger at ED than at ES for every subject
        lv = {(it["subject"], it["frame"]): int((np.asarray(nib.load(it["label"]).dataobj) == 1).sum())
              for k in ("training", "validation", "test") for it in dl[k]}
        assert all(lv[(s, "ED")] > lv[(s, "ES")] for s, _ in lv)


def test_bad_mask_values_name_the_file(tmp_path: Path):
    with pytest.raises(DatasetFormatError, match="somefile.nii.gz: label value"):
        canonical_mask(np.array([0, 1, 7]), "ACDC", "somefile.nii.gz")
    assert canonical_mask(np.array([0, 1, 2, 3]), "ACDC").tolist() == [0, 3, 2, 1]
    assert canonical_mask(np.array([0, 1, 2, 3]), "MnMs").tolist() == [0, 1, 2, 3]
