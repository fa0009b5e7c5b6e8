"""The synthetic cohorts' heterogeneity knobs: feature shift, label-prior shift, concept shift (and per-site size).
Defaults reproduce the cohorts written before the knobs existed, bit for bit; each knob changes what it claims and
nothing else."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flare_duallora.data import generate_cmr, generate_isic, read_acdc, read_mnms
from flare_duallora.data.cmr_phantom import VENDOR_STYLES, shifted_mix, shifted_style
from flare_duallora.data.isic import ISIC_IMAGE_DIR
from flare_duallora.data.records import ISIC_CLASSES
from flare_duallora.data.synthetic_cmr import CONCEPT_GROUPS
from flare_duallora.data.synthetic_isic import CONCEPT_PAIRS, SPLIT_CSV_NAME
from flare_duallora.data.synthetic_isic import shifted_style as isic_style

#: hashes of generate_cmr(n_per_vendor=3, shape=(24, 24, 6), n_frames=4, seed=0) and
#: generate_isic(n_per_center=4, size=32, seed=0) written by the code before the knobs (commit af5ff8e)
GOLDEN = {"cmr": "2ebd550fbdd349401853f742754917d50064dab008a2817805322bf7662450b0",
          "isic": "3a56d9f9c4173da68f2346a8205cd3795ab9baa1ae6533d207f0daa1fc926784"}
SMALL = dict(shape=(24, 24, 6), n_frames=4, seed=0)


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if not p.is_file():
            continue
        h.update(str(p.relative_to(root)).encode())
        if p.name.endswith(".nii.gz"):  # the data, not the gzip header's time stamp
            img = nib.load(str(p))
            h.update(np.asarray(img.dataobj).tobytes())
            h.update(img.affine.tobytes())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()


def cmr(root: Path, n=3, **knobs) -> dict:
    """``{subject: (vendor, written group, ED image array)}``."""
    acdc, mnms = generate_cmr(root, n_per_vendor=n, **SMALL, **knobs)
    records = read_acdc(acdc) + read_mnms(mnms, cache_dir=root / "cache")
    return {r.subject: (r.vendor, r.group.replace("IHD", "MINF").replace("ARV", "RV"),
                        np.asarray(nib.load(r.ed).dataobj)) for r in records}


def isic(root: Path, **knobs) -> dict:
    """``{image: (centre, class index, JPEG bytes)}``."""
    images, split = generate_isic(root, size=32, seed=0, **knobs)
    out = {}
    with open(split) as f:
        for row in csv.DictReader(f):
            out[row["image"]] = (int(row["center"]), int(float(row["target"])),
                                 (images / ISIC_IMAGE_DIR / f"{row['image']}.jpg").read_bytes())
    return out


def test_the_defaults_write_the_cohorts_of_before_bit_for_bit(tmp_path):
    generate_cmr(tmp_path / "cmr", n_per_vendor=3, **SMALL)
    generate_isic(tmp_path / "isic", n_per_center=4, size=32, seed=0)
    assert tree_hash(tmp_path / "cmr") == GOLDEN["cmr"]
    assert tree_hash(tmp_path / "isic") == GOLDEN["isic"]
    # the explicit defaults are the same call
    generate_cmr(tmp_path / "cmr1", n_per_vendor=3, **SMALL, feature_shift=1.0, label_prior_shift=1.0,
                 concept_shift=0.0)
    assert tree_hash(tmp_path / "cmr1") == GOLDEN["cmr"]


def test_cmr_feature_shift_changes_appearance_only(tmp_path):
    styles = [shifted_style(s, 0.0) for s in VENDOR_STYLES.values()]
    looks = {(s.spacing, s.blood, s.myo, s.gamma, s.noise, s.bias, s.max_value) for s in styles}
    assert len(looks) == 1  # 0: every vendor looks alike
    assert shifted_style(VENDOR_STYLES["GE"], 1.0) is VENDOR_STYLES["GE"]
    strong = shifted_style(VENDOR_STYLES["GE"], 2.0)
    assert abs(strong.gamma - 1) > abs(VENDOR_STYLES["GE"].gamma - 1)  # 2: further from the mean vendor
    base, alike = cmr(tmp_path / "a"), cmr(tmp_path / "b", feature_shift=0.0)
    assert base.keys() == alike.keys()
    assert {k: v[:2] for k, v in base.items()} == {k: v[:2] for k, v in alike.items()}  # same labels, same sites
    assert any(not np.array_equal(base[k][2], alike[k][2]) for k in base)  # other images

    def spread(cohort):  # how different the vendors' mean intensities are (relative)
        means = {}
        for vendor, _, img in cohort.values():
            means.setdefault(vendor, []).append(img.mean())
        m = np.array([np.mean(v) for v in means.values()])
        return m.std() / m.mean()

    assert spread(alike) < 0.5 * spread(base)


def test_cmr_label_prior_shift_changes_class_balance_not_appearance(tmp_path):
    base, same = cmr(tmp_path / "a", n=10), cmr(tmp_path / "b", n=10, label_prior_shift=0.0)

    def normal_share(cohort):
        by = Counter(v for v, g, _ in cohort.values()), Counter(v for v, g, _ in cohort.values() if g == "NOR")
        return {v: by[1][v] / by[0][v] for v in by[0]}

    assert max(normal_share(same).values()) - min(normal_share(same).values()) <= 0.1 + 1e-9  # rounding only
    assert max(normal_share(base).values()) - min(normal_share(base).values()) >= 0.2
    kept = [k for k in base if base[k][1] == same[k][1]]
    assert kept and all(np.array_equal(base[k][2], same[k][2]) for k in kept)  # same group -> same images
    assert shifted_mix(VENDOR_STYLES["GE"].label_mix, 1.0) is VENDOR_STYLES["GE"].label_mix


def test_cmr_concept_shift_relabels_only_the_sites_own_group_and_keeps_images(tmp_path):
    base, shifted = cmr(tmp_path / "a", n=10), cmr(tmp_path / "b", n=10, concept_shift=1.0)
    assert base.keys() == shifted.keys()
    for k, (vendor, group, img) in base.items():
        assert np.array_equal(img, shifted[k][2])  # the anatomy and its images do not change
        assert shifted[k][1] == ("NOR" if group == CONCEPT_GROUPS[vendor] else group)
    assert sum(base[k][1] != shifted[k][1] for k in base) >= 4  # something was relabelled at several sites
    zero = cmr(tmp_path / "c", n=10, concept_shift=0.0)  # 0: the anatomy's own label everywhere
    assert {k: v[1] for k, v in zero.items()} == {k: v[1] for k, v in base.items()}
    half = cmr(tmp_path / "d", n=10, concept_shift=0.5)
    changed = sum(base[k][1] != half[k][1] for k in base)
    assert 0 < changed < sum(base[k][1] != shifted[k][1] for k in base)
    with pytest.raises(ValueError, match="concept_shift"):
        generate_cmr(tmp_path / "e", n_per_vendor=2, **SMALL, concept_shift=1.5)


def test_isic_knobs_change_what_they_claim_only(tmp_path):
    base = isic(tmp_path / "a", n_per_center=12)
    # feature shift: the same labels, other pixels; 0 = one look everywhere
    alike = isic(tmp_path / "b", n_per_center=12, feature_shift=0.0)
    assert {k: v[:2] for k, v in base.items()} == {k: v[:2] for k, v in alike.items()}
    assert any(base[k][2] != alike[k][2] for k in base)
    assert len({isic_style(c, 0.0) for c in range(6)}) == 1
    # label-prior shift: each centre keeps its size; the class mixes come together
    prior = isic(tmp_path / "c", n_per_center=12, label_prior_shift=0.0)
    sizes = lambda d: Counter(c for c, _, _ in d.values())  # noqa: E731

    def distance(d):  # mean total-variation distance of each centre's class mix from the pooled mix
        pooled = Counter(t for _, t, _ in d.values())
        out = []
        for c in range(6):
            own = Counter(t for cc, t, _ in d.values() if cc == c)
            n = sum(own.values())
            out.append(0.5 * sum(abs(own[k] / n - pooled[k] / len(d)) for k in range(len(ISIC_CLASSES))))
        return np.mean(out)

    assert sizes(prior) == sizes(base) and distance(prior) < 0.6 * distance(base)
    # concept shift: only the centre's look-alike class is relabelled; images are the same bytes
    concept = isic(tmp_path / "d", n_per_center=12, concept_shift=1.0)
    for k, (c, t, img) in base.items():
        look, written = (ISIC_CLASSES.index(x) for x in CONCEPT_PAIRS[c])
        assert concept[k][2] == img and concept[k][1] == (written if t == look else t)
    assert sum(base[k][1] != concept[k][1] for k in base) >= 3
    assert (Path(tmp_path / "d") / SPLIT_CSV_NAME).is_file()
