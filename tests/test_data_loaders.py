"""Readers (ACDC, M&Ms-1, Fed-ISIC2019), datalist splitting and MONAI loading.

Hand-written fixtures follow the published layouts and are built here with nibabel / Pillow /
plain text, independently of the synthetic generators; generator output is read as well.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from flare_duallora.data import (
    DatasetFormatError,
    generate_cmr,
    generate_isic,
    read_acdc,
    read_isic,
    read_mnms,
    split_cmr,
    split_isic,
)
from flare_duallora.data.mnms import find_mnms_csv

CMR_KEYS = {"ed", "es", "label", "subject", "group", "vendor", "source"}
ISIC_KEYS = {"image", "label", "subject", "center"}
HEADER_KEYS = {"name", "task", "label_mode", "label_names", "num_classes", "training", "validation"}
AFFINE = np.diag([1.5, 1.5, 10.0, 1.0])


# ----------------------------------------------------------------------------- fixtures
def _nifti(path: Path, shape, seed: int = 0, dtype=np.int16) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 200, shape).astype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return data


def _acdc_subject(split_dir: Path, name: str, group: str, ed: int = 1, es: int = 12,
                  cfg: str | None = None) -> Path:
    folder = split_dir / name
    folder.mkdir(parents=True)
    (folder / "Info.cfg").write_text(
        cfg if cfg is not None else
        f"ED: {ed}\nES: {es}\nGroup: {group}\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n")
    for frame in (ed, es):
        _nifti(folder / f"{name}_frame{frame:02d}.nii.gz", (8, 8, 3), seed=frame)
    return folder


@pytest.fixture
def acdc_root(tmp_path: Path) -> Path:
    root = tmp_path / "database"
    _acdc_subject(root / "training", "patient001", "DCM")
    _acdc_subject(root / "training", "patient002", "NOR", ed=1, es=9)
    (root / "training" / "MANDATORY_CITATION.md").write_text("cite")
    _acdc_subject(root / "testing", "patient101", "HCM")
    return root


MNMS_CSV = (
    ",External code,VendorName,Vendor,Centre,ED,ES,Age,Pathology,Sex,Height,Weight\n"
    "0,A0S9V9,Siemens,A,1,0,2,67,HCM,M,,\n"
    "1,E9H1U4,Philips,B,2,3,1,45,NOR,F,170.0,60.0\n"
)


def _mnms_root(tmp_path: Path, csv_text: str = MNMS_CSV,
               csv_name: str = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv") -> Path:
    root = tmp_path / "OpenDataset"
    root.mkdir(parents=True)
    (root / csv_name).write_text(csv_text)
    _nifti(root / "Training/Labeled/A0S9V9/A0S9V9_sa.nii.gz", (8, 8, 3, 4), seed=1)
    _nifti(root / "Training/Labeled/A0S9V9/A0S9V9_sa_gt.nii.gz", (8, 8, 3, 4), seed=2, dtype=np.uint8)
    _nifti(root / "Validation/E9H1U4/E9H1U4_sa.nii.gz", (8, 8, 3, 5), seed=3)
    return root


ISIC_HEADER = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK,target,center,fold,fold2\n"


def _isic_root(tmp_path: Path, rows=(("ISIC_0000001", 0, 0, "train"), ("ISIC_0000002", 1, 0, "test"),
                                     ("ISIC_0000003", 4, 1, "train"))) -> tuple[Path, Path]:
    root = tmp_path / "isic"
    images = root / "ISIC_2019_Training_Input_preprocessed"
    images.mkdir(parents=True)
    lines = [ISIC_HEADER]
    for name, target, center, fold in rows:
        Image.new("RGB", (30, 24), (200, 150, 120)).save(images / f"{name}.jpg")
        onehot = ",".join("1.0" if k == target else "0.0" for k in range(8))
        lines.append(f"{name},{onehot},0.0,{target},{center},{fold},{fold}_{center}\n")
    (root / "train_test_split").write_text("".join(lines))
    return root, root / "train_test_split"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Small generator output shared by the tests of this module."""
    base = tmp_path_factory.mktemp("synthetic")
    acdc, mnms = generate_cmr(base / "cmr", n_per_vendor=4, shape=(24, 24, 6), n_frames=3, seed=3)
    isic_root, isic_csv = generate_isic(base / "isic", n_per_center=6, size=32, seed=3)
    return {"base": base, "acdc": acdc, "mnms": mnms, "isic_root": isic_root, "isic_csv": isic_csv}


# ----------------------------------------------------------------------------- ACDC
def test_acdc_reads_published_layout(acdc_root: Path):
    records = read_acdc(acdc_root)
    assert [r.subject for r in records] == ["patient001", "patient002"]
    first = records[0]
    assert first.group == "DCM" and first.vendor == "Siemens" and first.source == "ACDC"
    assert first.ed.endswith("patient001_frame01.nii.gz") and first.es.endswith("patient001_frame12.nii.gz")
    assert records[1].es.endswith("patient002_frame09.nii.gz")
    assert first.meta["height"] == 184.0 and first.meta["nb_frames"] == 30 and first.ed_gt is None
    both = read_acdc(acdc_root, splits=("training", "testing"))
    assert [r.subject for r in both][-1] == "patient101" and both[-1].meta["split"] == "testing"


def test_acdc_missing_root_and_split(tmp_path: Path, acdc_root: Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_acdc(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'training' folder not found: .*empty[/\\]training"):
        read_acdc(tmp_path / "empty")


def test_acdc_missing_info_cfg(acdc_root: Path):
    cfg = acdc_root / "training/patient002/Info.cfg"
    cfg.unlink()
    with pytest.raises(FileNotFoundError, match=r"Info.cfg not found: .*patient002[/\\]Info.cfg"):
        read_acdc(acdc_root)


def test_acdc_bad_info_line_names_file_and_line(acdc_root: Path):
    cfg = acdc_root / "training/patient001/Info.cfg"
    cfg.write_text("ED: 1\nES: 12\nGroup DCM\n")
    with pytest.raises(DatasetFormatError) as err:
        read_acdc(acdc_root)
    assert str(cfg) in str(err.value) and "line 3" in str(err.value) and "Group DCM" in str(err.value)


@pytest.mark.parametrize("text, needle", [
    ("ED: 1\nGroup: DCM\n", "missing key(s) ES"),
    ("ED: 1\nES: 12\nGroup: XYZ\n", "unknown Group 'XYZ'"),
    ("ED: one\nES: 12\nGroup: DCM\n", "ED must be a 1-based frame number"),
    ("ED: 1\nES: 40\nGroup: DCM\nNbFrame: 30\n", "ES = 40 exceeds NbFrame = 30"),
])
def test_acdc_bad_info_content(acdc_root: Path, text: str, needle: str):
    cfg = acdc_root / "training/patient001/Info.cfg"
    cfg.write_text(text)
    with pytest.raises(DatasetFormatError) as err:
        read_acdc(acdc_root)
    assert needle in str(err.value) and str(cfg) in str(err.value)


def test_acdc_missing_frame_file(acdc_root: Path):
    (acdc_root / "training/patient001/patient001_frame12.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"ES frame file missing: .*patient001_frame12\.nii\.gz"):
        read_acdc(acdc_root)


def test_acdc_reads_generator_output(synthetic):
    records = read_acdc(synthetic["acdc"])
    assert len(records) == 4 and all(r.vendor == "Siemens" for r in records)
    assert all(Path(r.ed).is_file() and Path(r.es_gt).is_file() for r in records)
    assert all(r.meta["cine_4d"] for r in records)


# ----------------------------------------------------------------------------- M&Ms
def test_mnms_reads_published_layout_and_extracts_frames(tmp_path: Path):
    root = _mnms_root(tmp_path)
    cache = tmp_path / "cache"
    records = read_mnms(root, cache_dir=cache)
    assert [r.subject for r in records] == ["A0S9V9", "E9H1U4"]
    a, b = records
    assert (a.vendor, a.group, a.source, a.centre) == ("Siemens", "HCM", "MnMs", "1")
    assert (b.vendor, b.meta["folder"]) == ("Philips", "Validation")
    cine = nib.load(str(root / "Validation/E9H1U4/E9H1U4_sa.nii.gz"))
    ed, es = nib.load(b.ed), nib.load(b.es)
    assert ed.shape == (8, 8, 3) and np.array_equal(ed.get_fdata(), cine.get_fdata()[..., 3])
    assert np.array_equal(es.get_fdata(), cine.get_fdata()[..., 1])  # ED/ES are 0-based
    assert np.allclose(ed.affine, cine.affine) and ed.header.get_zooms() == (1.5, 1.5, 10.0)
    assert ed.get_data_dtype() == np.int16 and Path(b.ed).parent.parent == cache.resolve()
    assert a.ed_gt and nib.load(a.ed_gt).shape == (8, 8, 3) and b.ed_gt is None
    # Extraction is cached: a second read does not rewrite the files.
    mtime = os.stat(b.ed).st_mtime_ns
    again = read_mnms(root, cache_dir=cache)
    assert again == records and os.stat(b.ed).st_mtime_ns == mtime


def test_mnms_csv_found_case_insensitively(tmp_path: Path):
    root = _mnms_root(tmp_path, csv_name="201207_m&ms dataset information - diagnosis - opendataset.CSV")
    assert find_mnms_csv(root).name.startswith("201207_m&ms")
    assert find_mnms_csv(tmp_path) == find_mnms_csv(root)  # parent of OpenDataset works too
    assert len(read_mnms(root, cache_dir=tmp_path / "c")) == 2


def test_mnms_missing_csv(tmp_path: Path):
    (tmp_path / "OpenDataset").mkdir()
    with pytest.raises(FileNotFoundError, match=r"M&Ms information CSV not found in .*OpenDataset"):
        read_mnms(tmp_path / "OpenDataset")


@pytest.mark.parametrize("old, new, needle", [
    ("Siemens,A,", "Siemens,E,", "unknown Vendor 'E'"),
    ("Siemens,A,", "Hitachi,A,", "unknown VendorName 'Hitachi'"),
    ("Siemens,A,", "Philips,A,", "contradicts VendorName"),
])
def test_mnms_unknown_vendor_names_csv_and_code(tmp_path: Path, old: str, new: str, needle: str):
    root = _mnms_root(tmp_path, MNMS_CSV.replace(old, new))
    with pytest.raises(DatasetFormatError) as err:
        read_mnms(root, cache_dir=tmp_path / "c")
    msg = str(err.value)
    assert needle in msg and "External code A0S9V9" in msg and "M&Ms_Dataset_information" in msg


def test_mnms_missing_columns(tmp_path: Path):
    text = MNMS_CSV.replace(",Vendor,Centre,", ",Centre,").replace(",A,1,", ",1,").replace(",B,2,", ",2,")
    text = text.replace(",Pathology,", ",Diagnosis,")
    root = _mnms_root(tmp_path, text)
    with pytest.raises(DatasetFormatError) as err:
        read_mnms(root, cache_dir=tmp_path / "c")
    assert "missing column(s) Vendor, Pathology" in str(err.value)
    assert "M&Ms_Dataset_information" in str(err.value)


def test_mnms_missing_image_and_bad_frame(tmp_path: Path):
    text = MNMS_CSV + "2,Z9Z9Z9,GE,C,4,0,1,50,DCM,M,,\n"
    root = _mnms_root(tmp_path, text)
    with pytest.raises(FileNotFoundError, match="External code Z9Z9Z9"):
        read_mnms(root, cache_dir=tmp_path / "c")
    assert len(read_mnms(root, cache_dir=tmp_path / "c", missing="skip")) == 2
    bad = _mnms_root(tmp_path / "bad", MNMS_CSV.replace("3,1,45", "7,1,45"))
    with pytest.raises(DatasetFormatError, match=r"E9H1U4_sa\.nii\.gz: frame index 7 out of range"):
        read_mnms(bad, cache_dir=tmp_path / "c2")


def test_mnms_reads_generator_output(synthetic, tmp_path: Path):
    records = read_mnms(synthetic["mnms"], cache_dir=tmp_path / "cache")
    assert {r.vendor for r in records} == {"Philips", "GE", "Canon"} and len(records) == 12
    for r in records:
        assert nib.load(r.ed).shape == (24, 24, 6) and nib.load(r.es_gt).shape == (24, 24, 6)
    assert {r.meta["folder"] for r in records} == {"Training/Labeled", "Training/Unlabeled", "Testing"}


# ----------------------------------------------------------------------------- ISIC
def test_isic_reads_published_layout(tmp_path: Path):
    root, split = _isic_root(tmp_path)
    records = read_isic(root, split)
    assert [(r.subject, r.target, r.center, r.fold) for r in records] == [
        ("ISIC_0000001", 0, 0, "train"), ("ISIC_0000002", 1, 0, "test"), ("ISIC_0000003", 4, 1, "train")]
    assert records[2].class_name == "BKL" and Path(records[0].image).is_absolute()
    assert [r.subject for r in read_isic(root, split, centers=[1])] == ["ISIC_0000003"]
    assert len(read_isic(root / "ISIC_2019_Training_Input_preprocessed", split)) == 3


def test_isic_errors(tmp_path: Path):
    root, split = _isic_root(tmp_path)
    with pytest.raises(FileNotFoundError, match="split CSV not found: .*nope.csv"):
        read_isic(root, root / "nope.csv")
    text = split.read_text()
    split.write_text(text.replace(",target,", ",label,"))
    with pytest.raises(DatasetFormatError, match=r"train_test_split: missing column\(s\) target"):
        read_isic(root, split)
    split.write_text(text.replace("0.0,4,1,train", "0.0,8,1,train"))
    with pytest.raises(DatasetFormatError, match=r"line 4 \(image ISIC_0000003\): target 8 out of range"):
        read_isic(root, split)
    split.write_text(text)
    (root / "ISIC_2019_Training_Input_preprocessed/ISIC_0000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image missing: .*ISIC_0000002\.jpg"):
        read_isic(root, split)


def test_isic_reads_generator_output(synthetic):
    records = read_isic(synthetic["isic_root"], synthetic["isic_csv"])
    assert len(records) == 36 and {r.center for r in records} == set(range(6))
    assert {r.fold for r in records} == {"train", "test"}


# ----------------------------------------------------------------------------- datalists
def _load(path) -> dict:
    return json.loads(Path(path).read_text())


def test_split_cmr_binary_contract(synthetic):
    out = synthetic["base"] / "dl_binary"
    clients = split_cmr(synthetic["acdc"], synthetic["mnms"], out, seed=1)
    assert list(clients) == ["site-siemens", "site-philips", "site-ge", "site-canon"]
    for name, path in clients.items():
        assert Path(path) == out.resolve() / f"{name}.json"
        dl = _load(path)
        assert set(dl) == HEADER_KEYS and dl["name"] == name and dl["task"] == "cmr"
        assert dl["label_mode"] == "binary" and dl["label_names"] == ["NOR", "disease"]
        assert dl["num_classes"] == 2 and dl["training"] and dl["validation"]
        for item in dl["training"] + dl["validation"]:
            assert set(item) == CMR_KEYS and item["label"] in (0, 1)
            assert item["label"] == int(item["group"] != "NOR")
            assert Path(item["ed"]).is_absolute() and Path(item["es"]).is_absolute()
            assert Path(item["ed"]).is_file() and Path(item["es"]).is_file()
            assert item["vendor"].lower() == name.removeprefix("site-")
    siemens = _load(clients["site-siemens"])
    assert {i["source"] for i in siemens["training"] + siemens["validation"]} == {"ACDC"}
    summary = _load(out / "clients.json")
    assert [c["name"] for c in summary["clients"]] == list(clients)
    first = summary["clients"][0]
    assert first["n_train"] + first["n_val"] == 4 and sum(first["train_label_counts"]) == first["n_train"]


def test_split_cmr_multiclass_and_determinism(synthetic):
    base = synthetic["base"]
    a = split_cmr(synthetic["acdc"], synthetic["mnms"], base / "mc_a", label_mode="multiclass", seed=5,
                  prefix="client-", cache_dir=base / "mnms_cache")
    b = split_cmr(synthetic["acdc"], synthetic["mnms"], base / "mc_b", label_mode="multiclass", seed=5,
                  prefix="client-", cache_dir=base / "mnms_cache")
    assert list(a) == ["client-siemens", "client-philips", "client-ge", "client-canon"]
    for name in a:
        assert _load(a[name]) == _load(b[name])
    dl = _load(a["client-canon"])
    names = dl["label_names"]
    assert names[0] == "NOR" and dl["num_classes"] == len(names)
    assert set(names) <= {"NOR", "MINF", "DCM", "HCM", "RV"}
    for item in dl["training"] + dl["validation"]:  # M&Ms ARV/IHD pooled with ACDC RV/MINF
        expected = {"ARV": "RV", "IHD": "MINF"}.get(item["group"], item["group"])
        assert names[item["label"]] == expected
    only_mnms = split_cmr(None, synthetic["mnms"], base / "mc_c", cache_dir=base / "mnms_cache")
    assert "site-siemens" not in only_mnms
    with pytest.raises(ValueError, match="at least one"):
        split_cmr(None, None, base / "none")


def test_split_isic_contract(synthetic):
    out = synthetic["base"] / "dl_isic"
    clients = split_isic(synthetic["isic_root"], synthetic["isic_csv"], out)
    assert list(clients) == [f"site-{c}" for c in range(6)]
    for c, (name, path) in enumerate(clients.items()):
        dl = _load(path)
        assert set(dl) == HEADER_KEYS and dl["task"] == "isic" and dl["num_classes"] == 8
        assert dl["label_names"] == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
        assert dl["training"] and dl["validation"]
        for item in dl["training"] + dl["validation"]:
            assert set(item) == ISIC_KEYS and item["center"] == c and 0 <= item["label"] < 8
            assert Path(item["image"]).is_file()
    assert list(split_isic(synthetic["isic_root"], synthetic["isic_csv"], out / "sub", centers=[4, 1])) == [
        "site-1", "site-4"]
    assert len(_load(out / "clients.json")["clients"]) == 6


# ----------------------------------------------------------------------------- MONAI
def test_monai_loads_cmr_and_isic_items(synthetic, tmp_path: Path):
    from monai.transforms import LoadImaged

    clients = split_cmr(synthetic["acdc"], synthetic["mnms"], tmp_path / "dl")
    loader = LoadImaged(keys=["ed", "es"], ensure_channel_first=True)
    for name in ("site-siemens", "site-ge"):
        item = _load(clients[name])["training"][0]
        data = loader(item)
        assert tuple(data["ed"].shape) == (1, 24, 24, 6) and tuple(data["es"].shape) == (1, 24, 24, 6)
        assert data["label"] == item["label"] and float(data["ed"].max()) > 0

    isic = split_isic(synthetic["isic_root"], synthetic["isic_csv"], tmp_path / "isic")
    item = _load(isic["site-0"])["training"][0]
    image = LoadImaged(keys="image", ensure_channel_first=True)(item)["image"]
    assert image.shape[0] == 3 and min(image.shape[1:]) == 32
