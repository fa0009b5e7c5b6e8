"""Deterministic synthetic dermoscopy data in the FLamby Fed-ISIC2019 layout.

:func:`generate_isic` writes ``<out_root>/ISIC_2019_Training_Input_preprocessed/<image>.jpg``
(RGB, shorter side ``size`` px) and the split CSV ``<out_root>/train_test_split`` with the
14 FLamby columns.  Each centre reproduces the label skew of the real Fed-ISIC2019 centre
(per-class counts scaled down from the packaged ``fed_isic2019_center_label_counts.csv``)
and has its own skin tone, illumination tint, aspect ratio and dermoscope vignette.

Images show a lesion on skin; the class sets its colour, size, border and texture:
MEL dark, large, irregular and multicoloured; NV round brown with a pigment network;
BCC pink with red branching vessels and blue-grey nests; AK red with a blurred border and
white scale; BKL tan, sharp-edged, cerebriform with milia dots; DF small with a white
centre and brown ring; VASC clustered red-purple lacunae; SCC keratin-white centre in a red rim.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .isic import ISIC_COLUMNS, ISIC_IMAGE_DIR
from .records import ISIC_CLASSES

__all__ = [
    "CENTER_NAMES",
    "CONCEPT_PAIRS",
    "SPLIT_CSV_NAME",
    "allocate_counts",
    "center_label_counts",
    "generate_isic",
    "plan_counts",
    "render_lesion",
    "shifted_counts",
    "shifted_style",
]

#: FLamby Fed-ISIC2019 centre names, by index.
CENTER_NAMES = ("BCN", "HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "MSK",
                "HAM_vienna_dias")
#: File name of the written split CSV (same as FLamby's, no extension).
SPLIT_CSV_NAME = "train_test_split"
_COUNTS_FILE = "fed_isic2019_center_label_counts.csv"


@dataclass(frozen=True)
class _CenterStyle:
    skin: tuple[float, float, float]   # RGB in [0, 1]
    tint: tuple[float, float, float]   # illumination / white balance multiplier
    aspect: float                      # width / height
    frame: bool                        # black circular dermoscope border
    blur: float                        # optical softness (pixels at 224 px)


_CENTER_STYLES = (
    _CenterStyle((0.88, 0.71, 0.63), (1.00, 0.97, 0.95), 1.00, True, 0.0),
    _CenterStyle((0.82, 0.63, 0.55), (1.06, 0.95, 0.88), 4 / 3, False, 1.2),
    _CenterStyle((0.90, 0.75, 0.67), (0.94, 1.00, 1.06), 4 / 3, False, 0.0),
    _CenterStyle((0.78, 0.59, 0.51), (1.00, 1.00, 1.00), 4 / 3, True, 0.6),
    _CenterStyle((0.92, 0.78, 0.72), (1.00, 0.94, 1.05), 1.50, False, 0.0),
    _CenterStyle((0.75, 0.59, 0.55), (1.10, 1.00, 0.88), 4 / 3, True, 1.5),
)

#: per centre, (rendered class, written class): under a concept shift that centre labels lesions that look like the
#: first class as the second (its own rule for a look-alike pair)
CONCEPT_PAIRS = (("NV", "MEL"), ("BKL", "NV"), ("MEL", "NV"), ("BCC", "AK"), ("NV", "BKL"), ("AK", "SCC"))


def shifted_style(center: int, amount: float) -> _CenterStyle:
    """Centre ``center``'s look (skin tone, illumination tint, aspect, optical blur, dermoscope frame) moved
    ``amount`` of the way from the mean look of all centres (the *feature shift*): 1 = the centre as it is (the
    same object), 0 = every centre looks alike (no frame), > 1 exaggerates the differences."""
    style = _CENTER_STYLES[center]
    if amount == 1.0:
        return style
    if amount < 0:
        raise ValueError(f"feature_shift must be >= 0, got {amount}")
    mean = lambda get: np.mean([get(s) for s in _CENTER_STYLES], axis=0)  # noqa: E731
    move = lambda get, lo, hi: np.clip(mean(get) + amount * (np.asarray(get(style)) - mean(get)), lo, hi)  # noqa
    return _CenterStyle(tuple(float(v) for v in move(lambda s: s.skin, 0.0, 1.0)),
                        tuple(float(v) for v in move(lambda s: s.tint, 0.5, 1.5)),
                        float(move(lambda s: s.aspect, 1.0, 2.0)), bool(style.frame and amount >= 0.5),
                        float(move(lambda s: s.blur, 0.0, 4.0)))


def shifted_counts(real: dict, amount: float) -> dict:
    """Per-centre class counts ``{(center, fold): [8]}`` whose class proportions are moved ``amount`` of the way
    from the pooled proportions of all centres (the *label-prior shift*), each centre keeping its size: 1 = the
    real per-centre label skew (the same object), 0 = the same class balance at every centre."""
    if amount == 1.0:
        return real
    if amount < 0:
        raise ValueError(f"label_prior_shift must be >= 0, got {amount}")
    out = {}
    for fold in {f for _, f in real}:
        keys = [k for k in real if k[1] == fold]
        pooled = np.sum([real[k] for k in keys], axis=0).astype(float)
        pooled /= max(pooled.sum(), 1.0)
        for k in keys:
            own = np.asarray(real[k], float)
            mix = np.clip(pooled + amount * (own / max(own.sum(), 1.0) - pooled), 0.0, None)
            out[k] = (mix / max(mix.sum(), 1e-12) * own.sum()).tolist()
    return out


# Per class: core RGB, edge RGB, radius range (fraction of half the short side),
# border irregularity, edge softness.
_CLASS_LOOK = {
    "MEL": ((0.22, 0.12, 0.08), (0.45, 0.28, 0.20), (0.55, 0.80), 0.22, 0.04),
    "NV": ((0.48, 0.30, 0.19), (0.60, 0.42, 0.30), (0.35, 0.55), 0.03, 0.03),
    "BCC": ((0.86, 0.62, 0.60), (0.90, 0.70, 0.66), (0.40, 0.60), 0.10, 0.05),
    "AK": ((0.80, 0.42, 0.40), (0.85, 0.55, 0.50), (0.45, 0.70), 0.14, 0.14),
    "BKL": ((0.62, 0.45, 0.30), (0.66, 0.50, 0.36), (0.40, 0.65), 0.07, 0.01),
    "DF": ((0.55, 0.38, 0.28), (0.70, 0.52, 0.42), (0.28, 0.42), 0.04, 0.06),
    "VASC": ((0.60, 0.10, 0.22), (0.45, 0.08, 0.30), (0.25, 0.40), 0.05, 0.03),
    "SCC": ((0.92, 0.86, 0.74), (0.78, 0.32, 0.30), (0.40, 0.60), 0.18, 0.04),
}


def center_label_counts() -> dict[tuple[int, str], list[int]]:
    """Real Fed-ISIC2019 per-class counts ``{(center, fold): [8 counts]}`` (packaged CSV)."""
    text = resources.files(__package__).joinpath(_COUNTS_FILE).read_text(encoding="utf-8")
    table = {}
    for row in csv.DictReader(text.splitlines()):
        table[(int(row["center"]), row["fold"])] = [int(row[c]) for c in ISIC_CLASSES]
    return table


def allocate_counts(real: Sequence[int], total: int) -> list[int]:
    """Scale class counts ``real`` to sum to ``total``, keeping every present class if possible.

    Each class with ``real > 0`` first gets one image (the most frequent classes first when
    ``total`` is too small for all), the rest is shared proportionally to ``real`` with the
    largest-remainder method.  Absent classes stay at 0.
    """
    real = np.asarray(real, float)
    counts = np.zeros(len(real), int)
    present = [i for i in np.argsort(-real, kind="stable") if real[i] > 0]
    if total <= 0 or not present:
        return counts.tolist()
    for i in present[:total]:
        counts[i] = 1
    left = total - counts.sum()
    if left > 0:
        exact = left * real / real.sum()
        extra = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - extra), kind="stable")[: left - extra.sum()]:
            extra[i] += 1
        counts += extra
    return counts.tolist()


def plan_counts(centers: Iterable[int], n_per_center: int | Mapping[int, int] | None = None,
                scale: float | None = None, label_prior_shift: float = 1.0) -> dict[tuple[int, str], list[int]]:
    """Per-class image counts ``{(center, fold): [8]}`` for the synthetic cohort.

    With ``scale`` the real train and test sizes are multiplied by it (quantity skew kept).
    Otherwise each centre gets ``n_per_center`` images (int or ``{center: n}``), split
    train/test in the centre's real ratio with at least one test image when ``n >= 2``.
    """
    table = shifted_counts(center_label_counts(), label_prior_shift)
    plan = {}
    for c in centers:
        if (c, "train") not in table:
            raise ValueError(f"unknown Fed-ISIC2019 centre {c}; expected 0..{len(CENTER_NAMES) - 1}")
        real = {fold: table[(c, fold)] for fold in ("train", "test")}
        if scale is not None:
            sizes = {f: max(1, round(sum(center_label_counts()[(c, f)]) * scale)) for f in real}
        else:
            n = int(n_per_center[c] if isinstance(n_per_center, Mapping) else n_per_center)
            test_frac = sum(real["test"]) / (sum(real["train"]) + sum(real["test"]))
            n_test = min(max(round(n * test_frac), 1), n - 1) if n >= 2 else 0
            sizes = {"train": n - n_test, "test": n_test}
        for fold in ("train", "test"):
            plan[(c, fold)] = allocate_counts(real[fold], sizes[fold])
    return plan


def _smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


def _dots(img, yy, xx, mask, n, radius, color, rng):
    """Paint ``n`` small discs of ``color`` at random points inside ``mask``."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return img
    for k in rng.integers(len(ys), size=n):
        disc = (yy - yy[ys[k], xs[k]]) ** 2 + (xx - xx[ys[k], xs[k]]) ** 2 < radius**2
        img[disc] = 0.3 * img[disc] + 0.7 * np.asarray(color)
    return img


def render_lesion(class_name: str, center: int, size: int, rng: np.random.Generator,
                  style: _CenterStyle | None = None) -> Image.Image:
    """Render one RGB dermoscopy-like image of ``class_name`` as seen at ``center`` (or with ``style``)."""
    style = style if style is not None else _CENTER_STYLES[center]
    core, edge, (r_lo, r_hi), irregular, soft = _CLASS_LOOK[class_name]
    h, w = size, max(size, round(size * style.aspect))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = (yy - h / 2) / (h / 2), (xx - w / 2) / (h / 2)  # unit = half the short side

    skin = np.asarray(style.skin, np.float32) * float(rng.uniform(0.93, 1.05))
    img = skin * (1 + 0.04 * _smooth_noise(h, w, 6, rng))[..., None]

    cy, cx = rng.uniform(-0.12, 0.12, 2)
    dy, dx = yy - cy, xx - cx
    rho, theta = np.hypot(dy, dx), np.arctan2(dy, dx)
    radius = rng.uniform(r_lo, r_hi) * np.ones_like(theta)
    for k in range(1, 7):
        radius *= 1 + irregular / k**0.7 * rng.uniform(0, 1) * np.cos(k * theta + rng.uniform(0, 6.3))
    inside = 1 / (1 + np.exp(-np.clip((radius - rho) / max(soft, 1e-3), -30, 30)))
    t = np.clip(rho / radius, 0, 1)[..., None]
    lesion = (1 - t) * np.asarray(core) + t * np.asarray(edge)
    lesion = lesion * (1 + 0.06 * _smooth_noise(h, w, 10, rng))[..., None]
    core_mask = rho < 0.85 * radius

    if class_name == "MEL":  # blue-white veil, black dots, asymmetric colour
        veil = (_smooth_noise(h, w, 4, rng) > 0.3) & core_mask
        lesion[veil] = 0.4 * lesion[veil] + 0.6 * np.array([0.45, 0.50, 0.65])
        lesion = _dots(lesion, yy, xx, core_mask, 8, 0.04, (0.05, 0.03, 0.03), rng)
    elif class_name == "NV":  # pigment network
        f = rng.uniform(18, 26)
        net = (np.abs(np.sin(f * xx)) < 0.25) | (np.abs(np.sin(f * yy)) < 0.25)
        lesion[net & core_mask] *= 0.7
    elif class_name == "BCC":  # blue-grey ovoid nests
        lesion = _dots(lesion, yy, xx, core_mask, 4, 0.07, (0.40, 0.45, 0.55), rng)
    elif class_name == "AK":  # white scale
        scale = (rng.random((h, w)) > 0.93) & core_mask
        lesion[scale] = np.array([0.95, 0.92, 0.90])
    elif class_name == "BKL":  # cerebriform ridges and milia
        a = rng.uniform(0, math.pi)
        ridges = np.sin(14 * (xx * math.cos(a) + yy * math.sin(a)) + 3 * _smooth_noise(h, w, 5, rng))
        lesion[(ridges > 0.6) & core_mask] *= 0.8
        lesion = _dots(lesion, yy, xx, core_mask, 5, 0.03, (0.96, 0.94, 0.88), rng)
    elif class_name == "DF":  # central white scar patch
        patch = 1 / (1 + np.exp(-np.clip((0.5 * radius - rho) / 0.05, -30, 30)))
        lesion = lesion * (1 - patch[..., None]) + patch[..., None] * np.array([0.93, 0.88, 0.85])
    elif class_name == "VASC":  # lacunae: a cluster of red-purple discs
        inside = np.zeros_like(rho)
        for _ in range(int(rng.integers(4, 8))):
            oy, ox = rng.normal(0, 0.25, 2)
            r = rng.uniform(0.10, 0.22)
            inside = np.maximum(inside, (np.hypot(dy - oy, dx - ox) < r).astype(np.float32))
    elif class_name == "SCC":  # keratin centre, crusted surface
        crust = (_smooth_noise(h, w, 16, rng) > 0.4) & (rho < 0.5 * radius)
        lesion[crust] *= 0.75

    img = img * (1 - inside[..., None]) + lesion * inside[..., None]
    img = img * np.asarray(style.tint)
    if style.frame:  # dermoscope field stop
        fov = np.hypot(yy, xx) < 1.05 + 0.2 * (style.aspect - 1)
        img[~fov] = 0.02
    img = img + rng.normal(0, 0.015, img.shape)
    out = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(out)
    if class_name == "BCC":  # arborizing vessels
        for _ in range(int(rng.integers(3, 6))):
            y0, x0 = cy + rng.uniform(-0.3, 0.3), cx + rng.uniform(-0.3, 0.3)
            pts = [(x0, y0)]
            for _ in range(3):
                pts.append((pts[-1][0] + rng.uniform(-0.2, 0.2), pts[-1][1] + rng.uniform(-0.2, 0.2)))
            draw.line([((px * h / 2) + w / 2, (py * h / 2) + h / 2) for px, py in pts],
                      fill=(170, 30, 40), width=max(1, size // 112))
    for _ in range(int(rng.integers(0, 4))):  # hairs: class-independent nuisance
        x0, y0, x1, y1 = rng.uniform(0, 1, 4) * (w, h, w, h)
        draw.line([(x0, y0), (x1, y1)], fill=(40, 28, 22), width=max(1, size // 150))
    if style.blur > 0:
        out = out.filter(ImageFilter.GaussianBlur(style.blur * size / 224))
    return out


def _concept_relabel(items: list, center: int, amount: float, rng: np.random.Generator) -> dict[int, int]:
    """``{item index: written class}`` for the items whose label the centre's own rule changes."""
    if not amount:
        return {}
    look, written = (ISIC_CLASSES.index(c) for c in CONCEPT_PAIRS[center % len(CONCEPT_PAIRS)])
    idx = [i for i, (_, k) in enumerate(items) if k == look]
    return {int(i): written for i in rng.permutation(idx)[:int(round(amount * len(idx)))]}


def generate_isic(
    out_root: str | Path,
    n_per_center: int | Mapping[int, int] | None = None,
    size: int = 224,
    seed: int = 0,
    centers: Iterable[int] = range(6),
    scale: float | None = None,
    id_offset: int = 0,
    quality: int = 90,
    feature_shift: float = 1.0,
    label_prior_shift: float = 1.0,
    concept_shift: float = 0.0,
) -> tuple[Path, Path]:
    """Write a synthetic Fed-ISIC2019 dataset in the FLamby layout.

    Three kinds of site difference can be set (the defaults write today's cohort, bit for bit):

    * ``feature_shift`` (centre appearance: skin tone, illumination, aspect, blur, frame): :func:`shifted_style`;
      1 = each centre's own look, 0 = every centre alike.  Labels are unchanged.
    * ``label_prior_shift`` (class balance per centre): :func:`shifted_counts`; 1 = Fed-ISIC2019's real label skew,
      0 = the pooled balance at every centre (sizes kept).  Appearance is unchanged.
    * ``concept_shift`` (a centre-specific part of the rule from lesion to label): a fraction (0..1) of the images
      that look like the first class of the centre's :data:`CONCEPT_PAIRS` pair are labelled as the second; 0 = one
      rule everywhere.  Images are unchanged.
    * per-centre size: ``n_per_center`` as ``{center: n}`` (or ``scale``).

    Args:
        out_root: output folder (images go to ``ISIC_2019_Training_Input_preprocessed/``).
        n_per_center: images per centre (int or ``{center: n}``); default 64 when neither
            this nor ``scale`` is given.
        size: shorter image side in pixels (224 like FLamby; e.g. 32 for tests).
        seed: random seed; the same arguments give identical CSV content and JPEG bytes.
        centers: FLamby centre indices to generate.
        scale: instead of ``n_per_center``, multiply the real per-centre train/test sizes by
            ``scale`` (keeps the quantity skew between centres).
        id_offset: first image number (``ISIC_{id_offset:07d}``), for disjoint cohorts.
        quality: JPEG quality.

    Returns:
        ``(images_root, split_csv_path)``: the folder to pass as ``root`` to
        :func:`~.isic.read_isic` and the written ``train_test_split`` CSV.
    """
    if n_per_center is not None and scale is not None:
        raise ValueError("give n_per_center or scale, not both")
    if n_per_center is None and scale is None:
        n_per_center = 64
    centers = list(centers)
    if not 0.0 <= concept_shift <= 1.0:
        raise ValueError(f"concept_shift must be in [0, 1], got {concept_shift}")
    plan = plan_counts(centers, n_per_center, scale, label_prior_shift)
    out_root = Path(out_root)
    image_dir = out_root / ISIC_IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    rows, index = [], id_offset
    for c in centers:
        items = [(fold, k) for fold in ("train", "test")
                 for k, n in enumerate(plan[(c, fold)]) for _ in range(n)]
        order = np.random.default_rng([seed, c, id_offset]).permutation(len(items))
        style = shifted_style(c, feature_shift)
        relabel = _concept_relabel(items, c, concept_shift, np.random.default_rng([seed, c, id_offset, 2]))
        for j in order:
            fold, look = items[j]
            target = relabel.get(int(j), look)
            name = f"ISIC_{index:07d}"
            rng = np.random.default_rng([seed, index])
            render_lesion(ISIC_CLASSES[look], c, size, rng, style).save(
                image_dir / f"{name}.jpg", format="JPEG", quality=quality)
            onehot = ["1.0" if k == target else "0.0" for k in range(len(ISIC_CLASSES))]
            rows.append([name, *onehot, "0.0", target, c, fold, f"{fold}_{c}"])
            index += 1
    split_csv = out_root / SPLIT_CSV_NAME
    with split_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(ISIC_COLUMNS)
        writer.writerows(rows)
    return out_root.resolve(), split_csv.resolve()
