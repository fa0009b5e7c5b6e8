"""Deterministic synthetic cine-CMR cohorts written in the real ACDC and M&Ms-1 layouts.

:func:`generate_cmr` writes

* the ACDC vendor (Siemens by default) as ``<out_root>/ACDC/training/patientNNN/`` with
  ``Info.cfg``, ``patientNNN_frameXX[_gt].nii.gz`` for ED and ES and ``patientNNN_4d.nii.gz``;
* every other vendor as ``<out_root>/MnMs/OpenDataset/`` with the information CSV and
  ``<folder>/<CODE>/<CODE>_sa.nii.gz`` (4D) + ``<CODE>_sa_gt.nii.gz`` (4D, labels on ED/ES only,
  M&Ms label values 1 LV, 2 MYO, 3 RV).

Phantoms and vendor appearance come from :mod:`.cmr_phantom`.  The same arguments give
byte-identical data arrays and CSV/cfg text.  Use a different ``id_offset`` (and seed) for a
pre-training cohort so that its subject ids never collide with the federated cohort.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np

from .cmr_phantom import VENDOR_STYLES, VendorStyle, sample_anatomy, shifted_mix, shifted_style, simulate_cine
from .records import VENDORS

__all__ = ["CONCEPT_GROUPS", "MNMS_CSV_NAME", "MNMS_GROUP_NAMES", "allocate_labels", "concept_labels",
           "generate_cmr", "mnms_code"]

#: per vendor, the disease group whose anatomy that site's own labelling rule calls normal under a concept shift
CONCEPT_GROUPS = {"Siemens": "HCM", "Philips": "RV", "GE": "MINF", "Canon": "DCM"}

#: File name of the information CSV written for the M&Ms layout.
MNMS_CSV_NAME = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"
#: ACDC group -> M&Ms ``Pathology`` code.
MNMS_GROUP_NAMES = {"NOR": "NOR", "DCM": "DCM", "HCM": "HCM", "MINF": "IHD", "RV": "ARV"}
#: Folder of each vendor inside ``OpenDataset`` (mirrors the public release).
MNMS_VENDOR_FOLDERS = {"Siemens": "Training/Labeled", "Philips": "Training/Labeled",
                       "GE": "Training/Unlabeled", "Canon": "Testing"}
_ACDC_TO_MNMS_LABELS = np.array([0, 3, 2, 1], np.uint8)  # ACDC 1 RV, 3 LV -> M&Ms 3 RV, 1 LV
_MNMS_HEADER = ["", "External code", "VendorName", "Vendor", "Centre", "ED", "ES",
                "Age", "Pathology", "Sex", "Height", "Weight"]


def mnms_code(index: int) -> str:
    """A 6-character M&Ms-style code (letter digit x3, e.g. ``A0S9V9``), unique per ``index``.

    ``index`` is mapped through a bijection of ``0 .. 260**3 - 1`` so codes look random.
    """
    x = (index * 7_368_787 + 1_234_567) % 260**3
    chars = []
    for _ in range(3):
        x, r = divmod(x, 260)
        chars += [chr(ord("A") + r // 10), str(r % 10)]
    return "".join(chars)


def allocate_labels(n: int, mix: Mapping[str, float], rng: np.random.Generator) -> list[str]:
    """Return ``n`` shuffled groups following the proportions ``mix`` (largest remainder).

    With ``n >= 2`` the cohort has at least one ``NOR`` and one diseased subject when ``mix``
    contains both, so every site has both binary classes.
    """
    groups = list(mix)
    weights = np.array([mix[g] for g in groups], float)
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= 2 and "NOR" in groups and len(groups) > 1:
        nor = groups.index("NOR")
        if counts[nor] == 0:
            counts[int(np.argmax(counts))] -= 1
            counts[nor] = 1
        elif counts[nor] == n:
            counts[nor] -= 1
            counts[int(np.argmax(np.where(np.arange(len(groups)) == nor, -1, weights)))] += 1
    out = [g for g, c in zip(groups, counts) for _ in range(c)]
    rng.shuffle(out)
    return out


def concept_labels(groups: Sequence[str], vendor: str, amount: float, rng: np.random.Generator) -> list[str]:
    """The groups a site *writes* for subjects whose anatomy is ``groups`` (the *concept shift*): a fraction
    ``amount`` (rounded) of the subjects of the vendor's :data:`CONCEPT_GROUPS` group are labelled ``NOR``: at
    this site that anatomy maps to "normal".  ``0`` writes the anatomy's own group at every site (one rule
    everywhere); ``1`` relabels all of them.  Images are not touched (they follow the anatomy)."""
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"concept_shift must be in [0, 1], got {amount}")
    out = list(groups)
    target = CONCEPT_GROUPS.get(vendor)
    idx = [i for i, g in enumerate(groups) if g == target]
    k = int(round(amount * len(idx)))
    if k:
        for i in rng.permutation(idx)[:k]:
            out[int(i)] = "NOR"
    return out


def _affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-(n - 1) * s / 2.0 for n, s in zip(shape, spacing)]
    return aff


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dt_ms: float | None = None) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "msec")
    if dt_ms is not None and data.ndim == 4:
        img.header.set_zooms((*img.header.get_zooms()[:3], dt_ms))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _subject(vendor: str, style: VendorStyle, group: str, shape, n_frames: int, rng):
    """Simulate one subject; returns (images, labels, spacing, ed, es, demographics)."""
    anatomy = sample_anatomy(group, rng)
    inplane = style.spacing[0] * float(rng.uniform(0.95, 1.05))
    spacing = (inplane, inplane, style.spacing[1])
    es_rel = int(np.clip(round(0.35 * n_frames), 1, n_frames - 1))
    ed = 0 if vendor == "Siemens" else int(rng.integers(n_frames))  # M&Ms ED is not always 0
    es = (ed + es_rel) % n_frames
    images, labels = simulate_cine(anatomy, style, shape, n_frames, ed, es,
                                   (inplane, style.spacing[1]), rng)
    sex = "M" if rng.random() < 0.6 else "F"
    height = float(np.round(rng.normal(176 if sex == "M" else 163, 7), 1))
    weight = float(np.round(rng.normal(82 if sex == "M" else 68, 12), 1))
    demo = {"age": int(rng.integers(18, 85)), "sex": sex, "height": height, "weight": weight}
    return images, labels, spacing, ed, es, demo


def _write_acdc(root: Path, subject: str, images, labels, spacing, ed: int, es: int, group: str,
                demo: dict, write_4d: bool) -> None:
    folder = root / "training" / subject
    folder.mkdir(parents=True, exist_ok=True)
    n_frames = images.shape[3]
    (folder / "Info.cfg").write_text(
        f"ED: {ed + 1}\nES: {es + 1}\nGroup: {group}\nHeight: {demo['height']:.1f}\n"
        f"NbFrame: {n_frames}\nWeight: {demo['weight']:.1f}\n", encoding="utf-8")
    affine = _affine(spacing, images.shape[:3])
    for t in sorted({ed, es}):
        _save(images[..., t], affine, folder / f"{subject}_frame{t + 1:02d}.nii.gz")
        _save(labels[..., t], affine, folder / f"{subject}_frame{t + 1:02d}_gt.nii.gz")
    if write_4d:
        _save(images, affine, folder / f"{subject}_4d.nii.gz", dt_ms=900.0 / n_frames)


def _write_mnms(root: Path, folder: str, code: str, images, labels, spacing, ed: int, es: int) -> None:
    out = root / folder / code
    affine = _affine(spacing, images.shape[:3])
    gt = np.zeros_like(labels)
    for t in (ed, es):
        gt[..., t] = _ACDC_TO_MNMS_LABELS[labels[..., t]]
    dt = 900.0 / images.shape[3]
    _save(images, affine, out / f"{code}_sa.nii.gz", dt_ms=dt)
    _save(gt, affine, out / f"{code}_sa_gt.nii.gz", dt_ms=dt)


def generate_cmr(
    out_root: str | Path,
    n_per_vendor: int | Mapping[str, int] = 8,
    vendors: Sequence[str] = VENDORS,
    shape: Sequence[int] = (64, 64, 10),
    n_frames: int = 8,
    seed: int = 0,
    id_offset: int = 0,
    acdc_vendor: str | None = "Siemens",
    write_4d: bool = True,
    feature_shift: float = 1.0,
    label_prior_shift: float = 1.0,
    concept_shift: float = 0.0,
) -> tuple[Path | None, Path | None]:
    """Write a synthetic multi-vendor cine-CMR cohort in the ACDC and M&Ms layouts.

    Three kinds of site difference can be set (the defaults write today's cohort, bit for bit):

    * ``feature_shift`` (vendor appearance: intensity response, noise, bias field, resolution):
      :func:`~.cmr_phantom.shifted_style`; 1 = each vendor's own look, 0 = every vendor looks alike, 2 = twice as
      different.  Labels and anatomy are unchanged.
    * ``label_prior_shift`` (class balance per site): :func:`~.cmr_phantom.shifted_mix`; 1 = each vendor's own
      disease mix, 0 = the same mix at every site.  Appearance is unchanged (a subject whose group stays the same
      gets the same images).
    * ``concept_shift`` (a site-specific part of the rule from anatomy to label): :func:`concept_labels`; 0 = one
      rule everywhere, 1 = each vendor labels all subjects of its :data:`CONCEPT_GROUPS` group "normal".  Images
      are unchanged; the class balance moves by the relabelled subjects.
    * per-site size: ``n_per_vendor`` as ``{vendor: n}``.

    Args:
        out_root: output folder; ``ACDC/`` and ``MnMs/OpenDataset/`` are created in it.
        n_per_vendor: subjects per vendor (an int for all, or ``{vendor: n}``).
        vendors: vendors to simulate (keys of :data:`~.cmr_phantom.VENDOR_STYLES`).
        shape: (x, y, z) voxels per frame; down to about (24, 24, 6) for tests.
        n_frames: cine frames (>= 2).
        seed: random seed; the same arguments give identical data.
        id_offset: first subject index (ACDC ``patient{id_offset+1:03d}``; M&Ms codes are
            derived from it), so cohorts with different offsets never share subject ids.
        acdc_vendor: vendor written in the ACDC layout (``None``: all vendors go to M&Ms).
        write_4d: also write the ACDC ``patientNNN_4d.nii.gz`` cine file.

    Returns:
        ``(acdc_root, mnms_root)``: the folder holding ``training/`` and the ``OpenDataset``
        folder; ``None`` for a layout that received no subject.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be 3 positive sizes >= 2, got {shape}")
    if n_frames < 2:
        raise ValueError(f"n_frames must be >= 2, got {n_frames}")
    unknown = [v for v in vendors if v not in VENDOR_STYLES]
    if unknown:
        raise ValueError(f"unknown vendor(s) {unknown}; expected some of {list(VENDOR_STYLES)}")
    if isinstance(n_per_vendor, Mapping) and set(n_per_vendor) - set(vendors):
        raise ValueError(f"n_per_vendor names vendors not in {list(vendors)}: "
                         f"{sorted(set(n_per_vendor) - set(vendors))}")
    counts = {v: int(n_per_vendor[v] if isinstance(n_per_vendor, Mapping) else n_per_vendor)
              for v in vendors if not isinstance(n_per_vendor, Mapping) or v in n_per_vendor}
    out_root = Path(out_root)
    acdc_root, mnms_root = out_root / "ACDC", out_root / "MnMs" / "OpenDataset"
    csv_rows: list[list] = []
    wrote_acdc = False
    for vendor, n in counts.items():
        style = shifted_style(VENDOR_STYLES[vendor], feature_shift)
        v_idx = list(VENDOR_STYLES).index(vendor)
        groups = allocate_labels(n, shifted_mix(style.label_mix, label_prior_shift),
                                 np.random.default_rng([seed, v_idx, id_offset]))
        written = concept_labels(groups, vendor, concept_shift, np.random.default_rng([seed, v_idx, id_offset, 2])) \
            if concept_shift else groups
        for i, (group, label_group) in enumerate(zip(groups, written)):
            index = id_offset + i
            rng = np.random.default_rng([seed, v_idx, index, 1])
            images, labels, spacing, ed, es, demo = _subject(vendor, style, group, shape, n_frames, rng)
            if vendor == acdc_vendor:
                _write_acdc(acdc_root, f"patient{index + 1:03d}", images, labels, spacing, ed, es,
                            label_group, demo, write_4d)
                wrote_acdc = True
                continue
            code = mnms_code(v_idx * 1_000_000 + index)
            _write_mnms(mnms_root, MNMS_VENDOR_FOLDERS[vendor], code, images, labels, spacing, ed, es)
            height = "" if rng.random() < 0.1 else f"{demo['height']:.1f}"  # some rows lack it
            csv_rows.append([code, vendor, style.letter, style.centre, ed, es, demo["age"],
                             MNMS_GROUP_NAMES[label_group], demo["sex"], height, f"{demo['weight']:.1f}"])
    if csv_rows:
        mnms_root.mkdir(parents=True, exist_ok=True)
        with (mnms_root / MNMS_CSV_NAME).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(_MNMS_HEADER)
            writer.writerows([i, *row] for i, row in enumerate(csv_rows))
    return (acdc_root.resolve() if wrote_acdc else None,
            mnms_root.resolve() if csv_rows else None)
