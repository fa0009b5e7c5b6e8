"""Short-axis cine CMR phantoms: heart geometry, pathology, motion and vendor appearance.

The phantom is a stack of short-axis slices (base -> apex) of

* an elliptical LV blood pool (label LV) ringed by myocardium (label MYO),
* a crescent RV blood pool (label RV) wrapped around the septum, with an unlabelled thin wall,
* surrounding anatomy (body, lungs, liver, pericardial fat) with a smooth texture.

Pathology changes the geometry (:data:`PATHOLOGIES`): DCM dilated LV, thin wall, little
contraction; HCM thick wall, small cavity, strong contraction; MINF an akinetic thinned
sector that does not thicken; RV a dilated, hypokinetic RV.  The end-systolic frame is the
end-diastolic geometry contracted (myocardial area per slice is conserved, so the wall
thickens).  A :class:`VendorStyle` then sets tissue contrast, gamma, bias field, Rician
noise, intensity range and voxel spacing.

Distances are in millimetres of a design heart scaled by ``g = min(nx, ny) * 1.25 / 130``
so the heart always fits the field of view of the finest vendor grid, whatever the shape.
Labels follow ACDC: 0 background, 1 RV, 2 MYO, 3 LV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = [
    "Anatomy",
    "PATHOLOGIES",
    "VENDOR_STYLES",
    "VendorStyle",
    "cardiac_phase",
    "render_frame",
    "sample_anatomy",
    "shifted_mix",
    "shifted_style",
    "simulate_cine",
]

LABEL_RV, LABEL_MYO, LABEL_LV = 1, 2, 3

#: Per-pathology geometry (design mm) and function.  ``contraction`` is the ES/ED ratio of
#: the LV cavity radius (higher = weaker contraction); ``rv_scale`` scales the RV size.
PATHOLOGIES: dict[str, dict[str, float]] = {
    "NOR": dict(cavity=20.0, wall=7.0, contraction=0.70, rv_scale=1.00, rv_contraction=0.72),
    "DCM": dict(cavity=27.0, wall=5.5, contraction=0.90, rv_scale=1.05, rv_contraction=0.85),
    "HCM": dict(cavity=14.5, wall=14.0, contraction=0.55, rv_scale=0.95, rv_contraction=0.72),
    "MINF": dict(cavity=22.5, wall=7.0, contraction=0.82, rv_scale=1.00, rv_contraction=0.78),
    "RV": dict(cavity=18.5, wall=7.0, contraction=0.72, rv_scale=1.45, rv_contraction=0.90),
}


@dataclass(frozen=True)
class VendorStyle:
    """Appearance and cohort of one scanner vendor.

    Attributes:
        letter, centre: M&Ms ``Vendor`` letter and ``Centre`` number.
        spacing: (in-plane, slice) voxel size in mm.
        blood, myo, tissue, fat, lung: tissue intensities before the gamma curve.
        gamma: exponent applied to the normalised image.
        noise: Rician noise sigma relative to the blood signal.
        bias: amplitude of the smooth multiplicative bias field (log scale).
        max_value: intensity of blood in the stored int16 image.
        label_mix: disease proportions of this vendor's cohort (ACDC group names).
    """

    letter: str
    centre: int
    spacing: tuple[float, float]
    blood: float
    myo: float
    tissue: float
    fat: float
    lung: float
    gamma: float
    noise: float
    bias: float
    max_value: float
    label_mix: dict[str, float] = field(default_factory=dict)


VENDOR_STYLES: dict[str, VendorStyle] = {
    "Siemens": VendorStyle("A", 1, (1.50, 10.0), 1.00, 0.25, 0.45, 0.85, 0.06, 1.00, 0.03, 0.10,
                           350.0, {"NOR": .2, "MINF": .2, "DCM": .2, "HCM": .2, "RV": .2}),
    "Philips": VendorStyle("B", 2, (1.25, 10.0), 1.00, 0.33, 0.55, 0.95, 0.10, 0.80, 0.05, 0.25,
                           1800.0, {"NOR": .3, "DCM": .3, "HCM": .3, "RV": .1}),
    "GE": VendorStyle("C", 4, (1.80, 8.0), 0.90, 0.36, 0.40, 0.70, 0.04, 1.30, 0.07, 0.35,
                      900.0, {"NOR": .45, "MINF": .25, "DCM": .15, "HCM": .15}),
    "Canon": VendorStyle("D", 5, (1.40, 9.0), 1.00, 0.20, 0.50, 0.80, 0.08, 1.10, 0.04, 0.20,
                         250.0, {"NOR": .2, "MINF": .2, "DCM": .4, "HCM": .1, "RV": .1}),
}


#: the numeric appearance fields a feature shift moves (spacing = resolution; the rest = intensity response, noise)
_APPEARANCE = ("blood", "myo", "tissue", "fat", "lung", "gamma", "noise", "bias", "max_value")


def _mean_style() -> dict:
    styles = list(VENDOR_STYLES.values())
    out = {k: float(np.mean([getattr(v, k) for v in styles])) for k in _APPEARANCE}
    out["spacing"] = tuple(float(np.mean([v.spacing[i] for v in styles])) for i in range(2))
    return out


def shifted_style(style: VendorStyle, amount: float) -> VendorStyle:
    """``style`` with its appearance moved ``amount`` of the way from the mean of all vendors' appearance:
    ``ref + amount * (style - ref)`` for contrast, gamma, noise, bias, intensity range and voxel spacing (the
    *feature shift*).  ``1`` is the vendor as it is (the same object), ``0`` makes every vendor look alike, ``> 1``
    exaggerates the differences (values kept positive).  Cohort (letter, centre, label mix) is untouched."""
    if amount == 1.0:
        return style
    if amount < 0:
        raise ValueError(f"feature_shift must be >= 0, got {amount}")
    ref = _mean_style()
    move = lambda r, v, floor: max(floor, r + amount * (v - r))  # noqa: E731
    values = {k: move(ref[k], getattr(style, k), 1e-3) for k in _APPEARANCE}
    values["max_value"] = max(values["max_value"], 10.0)
    spacing = tuple(move(r, v, 0.2) for r, v in zip(ref["spacing"], style.spacing))
    return VendorStyle(style.letter, style.centre, spacing, values["blood"], values["myo"], values["tissue"],
                       values["fat"], values["lung"], values["gamma"], values["noise"], values["bias"],
                       values["max_value"], dict(style.label_mix))


def shifted_mix(mix: dict, amount: float) -> dict:
    """A vendor's disease mix moved ``amount`` of the way from the mean mix of all vendors (the *label-prior
    shift*): ``1`` is the vendor's own mix (the same object), ``0`` gives every vendor the same class balance,
    ``> 1`` exaggerates the differences (proportions clipped at 0)."""
    if amount == 1.0:
        return mix
    if amount < 0:
        raise ValueError(f"label_prior_shift must be >= 0, got {amount}")
    groups = list(dict.fromkeys(g for v in VENDOR_STYLES.values() for g in v.label_mix))
    mean = {g: float(np.mean([v.label_mix.get(g, 0.0) / sum(v.label_mix.values())
                              for v in VENDOR_STYLES.values()])) for g in groups}
    total = sum(mix.values())
    out = {g: max(0.0, mean[g] + amount * (mix.get(g, 0.0) / total - mean[g])) for g in groups}
    return {g: w for g, w in out.items() if w > 0}


@dataclass(frozen=True)
class Anatomy:
    """One subject's heart, in design mm (see module docstring); sampled by :func:`sample_anatomy`."""

    pathology: str
    cavity: float
    wall: float
    contraction: float
    rv_scale: float
    rv_contraction: float
    rv_ref: float
    centre: tuple[float, float]
    rv_angle: float
    ellipticity: float
    ellipse_angle: float
    scar_angle: float
    scar_halfwidth: float
    texture_seed: int


def sample_anatomy(pathology: str, rng: np.random.Generator) -> Anatomy:
    """Draw a subject of ``pathology`` (a key of :data:`PATHOLOGIES`) with random jitter."""
    if pathology not in PATHOLOGIES:
        raise ValueError(f"unknown pathology {pathology!r}; expected one of {list(PATHOLOGIES)}")
    p = PATHOLOGIES[pathology]
    jit = lambda scale: float(1.0 + rng.uniform(-scale, scale))  # noqa: E731
    return Anatomy(
        pathology=pathology,
        cavity=p["cavity"] * jit(0.08),
        wall=p["wall"] * jit(0.10),
        contraction=float(np.clip(p["contraction"] + rng.uniform(-0.04, 0.04), 0.4, 0.97)),
        rv_scale=p["rv_scale"] * jit(0.06),
        rv_contraction=float(np.clip(p["rv_contraction"] + rng.uniform(-0.04, 0.04), 0.5, 0.97)),
        rv_ref=27.0 * jit(0.06),
        centre=(float(rng.uniform(5.0, 11.0)), float(rng.uniform(-4.0, 4.0))),
        rv_angle=float(np.pi + rng.uniform(-0.35, 0.15)),
        ellipticity=float(rng.uniform(1.0, 1.12)),
        ellipse_angle=float(rng.uniform(0.0, np.pi)),
        scar_angle=float(rng.uniform(-np.pi / 2, np.pi / 2)),  # lateral/inferior/anterior, not septal
        scar_halfwidth=float(rng.uniform(0.6, 0.9)),
        texture_seed=int(rng.integers(2**31)),
    )


def cardiac_phase(t: int, n_frames: int, ed: int, es: int) -> float:
    """Contraction state of frame ``t`` (0 at ED, 1 at ES, smooth cosine in between)."""
    if n_frames < 2:
        return 0.0
    p = ((t - ed) % n_frames) / n_frames
    p_es = ((es - ed) % n_frames) / n_frames
    if p_es <= 0.0:
        return 0.0
    if p <= p_es:
        return 0.5 * (1.0 - np.cos(np.pi * p / p_es))
    return 0.5 * (1.0 + np.cos(np.pi * (p - p_es) / (1.0 - p_es)))


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float]) -> tuple[np.ndarray, ...]:
    nx, ny, nz = shape
    g = min(nx, ny) * 1.25 / 130.0
    x = (np.arange(nx) - (nx - 1) / 2.0) * spacing[0] / g
    y = (np.arange(ny) - (ny - 1) / 2.0) * spacing[0] / g
    u = (np.arange(nz) + 0.5) / nz  # 0 = base, 1 = apex
    return x[:, None, None], y[None, :, None], u[None, None, :]


def _ellipse(x, y, cx, cy, a, b, angle):
    """Boolean inside of an ellipse with semi-axes ``a`` (along ``angle``) and ``b``."""
    dx, dy = x - cx, y - cy
    c, s = np.cos(angle), np.sin(angle)
    along, across = dx * c + dy * s, -dx * s + dy * c
    with np.errstate(divide="ignore", invalid="ignore"):
        return (along / a) ** 2 + (across / b) ** 2 <= 1.0


def _lv_radii(an: Anatomy, u: np.ndarray, theta: np.ndarray, phase: float):
    """Endo- and epicardial radius as a function of slice position ``u`` and angle ``theta``."""
    f = np.sqrt(np.clip(1.0 - (0.95 * u) ** 2, 0.0, 1.0))
    rc_ed = an.cavity * f**1.5
    wall = an.wall * (0.75 + 0.25 * f)
    ro_ed = rc_ed + wall
    rc = rc_ed * (1.0 - (1.0 - an.contraction) * phase)
    ro = np.sqrt(rc**2 + ro_ed**2 - rc_ed**2)  # myocardial area conserved -> wall thickens
    if an.pathology != "MINF":
        return rc, ro
    # Akinetic, thinned scar sector: endocardium stays at its ED radius, wall does not thicken.
    w = np.clip((np.cos(theta - an.scar_angle) - np.cos(an.scar_halfwidth)) / 0.15, 0.0, 1.0)
    endo = (1.0 - w) * rc + w * rc_ed
    epi = (1.0 - w) * ro + w * (rc_ed + 0.5 * wall)
    return endo, epi


def render_frame(an: Anatomy, style: VendorStyle, shape: tuple[int, int, int],
                 spacing: tuple[float, float], phase: float) -> tuple[np.ndarray, np.ndarray]:
    """Render one 3D frame: (noise-free tissue intensity float32, ACDC labels uint8)."""
    x, y, u = _grid(shape, spacing)
    cx, cy = an.centre
    dx, dy = x - cx, y - cy
    c, s = np.cos(an.ellipse_angle), np.sin(an.ellipse_angle)
    e = an.ellipticity
    rho = np.sqrt(((dx * c + dy * s) / e) ** 2 + ((-dx * s + dy * c) * e) ** 2)
    theta = np.arctan2(dy, dx)
    endo, epi = _lv_radii(an, u, theta, phase)
    lv = rho < endo
    lv_wall = (rho >= endo) & (rho < epi)

    # RV: an ellipse beside the septum minus the LV -> crescent; scales with the RV function.
    fr = np.sqrt(np.clip(1.0 - (u / 0.8) ** 2, 0.0, 1.0))
    shrink = 1.0 - (1.0 - an.rv_contraction) * phase
    a = 0.70 * an.rv_ref * an.rv_scale * fr * shrink
    b = 1.45 * an.rv_ref * an.rv_scale * fr * np.sqrt(shrink)
    _, epi_sept = _lv_radii(an, u, np.full_like(u, an.rv_angle), phase)
    d = epi_sept + 0.05 * a
    rcx, rcy = cx + d * np.cos(an.rv_angle), cy + d * np.sin(an.rv_angle)
    outside_lv = rho >= epi
    rv = _ellipse(x, y, rcx, rcy, a, b, an.rv_angle) & outside_lv & (fr > 0)
    rv_wall = _ellipse(x, y, rcx, rcy, a + 2.5, b + 2.5, an.rv_angle) & outside_lv & ~rv & (fr > 0)
    fat = (rho < epi + 2.5) & outside_lv & ~rv & ~rv_wall & (np.cos(theta - 1.2) > 0.2)

    labels = np.zeros(shape, np.uint8)
    labels[rv] = LABEL_RV
    labels[lv_wall] = LABEL_MYO
    labels[lv] = LABEL_LV

    # Surroundings (static): body, lungs, liver, with a smooth texture.
    def region(mask: np.ndarray) -> np.ndarray:
        return np.broadcast_to(mask, shape)

    img = np.where(region(_ellipse(x, y, 0.0, 8.0, 120.0, 95.0, 0.0)), style.tissue, 0.0)
    img = np.where(region(_ellipse(x, y, cx + 52.0, cy - 22.0, 24.0, 42.0, 0.3)), style.lung, img)
    img = np.where(region(_ellipse(x, y, cx - 62.0, cy - 38.0, 20.0, 34.0, -0.4)), style.lung, img)
    liver = region(_ellipse(x, y, cx + 10.0, cy + 78.0, 55.0, 30.0, 0.0)) & region(u > 0.3)
    img = np.where(liver, style.tissue * 1.15, img)
    rng = np.random.default_rng(an.texture_seed)
    texture = gaussian_filter(rng.standard_normal(shape), sigma=(2.0, 2.0, 0.0))
    img = img * (1.0 + 0.1 * texture / (texture.std() + 1e-8))
    img = np.where(fat, style.fat, img)
    img = np.where(rv_wall | lv_wall, style.myo, img)
    img = np.where(lv | rv, style.blood, img)
    img = gaussian_filter(img, sigma=(0.6, 0.6, 0.0))  # partial volume
    return img.astype(np.float32), labels


def _bias_field(shape: tuple[int, int, int], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field ``exp(amplitude * f)``, ``f`` a few low-frequency cosines in [-1, 1]."""
    nx, ny, nz = shape
    x = np.linspace(-1, 1, nx)[:, None, None]
    y = np.linspace(-1, 1, ny)[None, :, None]
    z = np.linspace(-1, 1, nz)[None, None, :]
    f = np.zeros(shape)
    for _ in range(3):
        kx, ky, kz = rng.uniform(0.2, 1.2, 3) * (1.0, 1.0, 0.3)
        f = f + np.cos(np.pi * (kx * x + ky * y + kz * z) + rng.uniform(0, 2 * np.pi))
    return np.exp(amplitude * f / 3.0)


def simulate_cine(an: Anatomy, style: VendorStyle, shape: tuple[int, int, int], n_frames: int,
                  ed: int, es: int, spacing: tuple[float, float], rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Simulate a cine stack: (int16 image (x,y,z,t), uint8 ACDC labels (x,y,z,t)).

    ``ed``/``es`` are 0-based frame indices.  Vendor appearance (gamma, bias field, Rician
    noise, intensity scale) is applied per frame; the bias field is shared by all frames.
    """
    bias = _bias_field(shape, style.bias, rng)
    images = np.zeros((*shape, n_frames), np.int16)
    labels = np.zeros((*shape, n_frames), np.uint8)
    for t in range(n_frames):
        clean, lab = render_frame(an, style, shape, spacing, cardiac_phase(t, n_frames, ed, es))
        signal = np.clip(clean, 0.0, None) ** style.gamma * bias
        noisy = np.hypot(signal + style.noise * rng.standard_normal(shape),
                         style.noise * rng.standard_normal(shape))
        images[..., t] = np.clip(np.rint(noisy * style.max_value), 0, np.iinfo(np.int16).max)
        labels[..., t] = lab
    return images, labels
