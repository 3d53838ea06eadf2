"""Phantom CXRs: seeded, procedural chest-radiograph-like images with attribute-labelled lung nodules.

The embedded default dataset (design §5); its labels (mask, box, diameter, attributes) are exact ground truth.
    PhantomConfig   size, spacing, negatives, nodule count / size / contrast, vocabulary, attribute weights
    make_image      soft tissue, lungs, posterior + anterior ribs, clavicles, spine, heart, mediastinum,
                    aortic knob, trachea, diaphragm domes, low-frequency variation, quantum-like noise, and
                    1..max_nodules nodules fully inside the lungs (none on negatives)
    draw_nodule     adds one nodule to an image in place, returns its mask (an analytic "template" baseline)
    SIGNATURES      drawing parameters per (attribute, value): each value's visual signature
    make_dataset    images/*.png (16-bit), masks/*.png (0/255) and annotations.csv; make_preview: contact sheet
    CLI             python -m nodule_diffusion.phantom --out_dir DIR --n_images N --seed S [--preview]

Papers: none is implemented. The signatures follow the glossary of [FLEISCHNER] Hansell et al., Radiology
246(3):697-722, 2008 (solid / part-solid / ground-glass; well- / ill-defined / spiculated margins; round, oval
or lobulated shape; central and popcorn calcification); the numbers are ours, chosen so each value is
recognisable in a 32×32 crop at 1.4 mm/px.

Conventions (design §3): float32 (H, W) in [0, 1], dense = bright. x = column, y = row, pixel i covers
[i, i + 1), so a mask's box is (x_min, y_min, x_max + 1, y_max + 1). Image left = patient's right: the heart
bulges to image right, the higher dome is on the left. Anatomy lives in u = x / size, v = y / size.

DEVIATIONS (a cartoon, not a physical simulation): intensities add in display space (≈ log attenuation),
then one gamma; nodules are added after it, so their contrast does not depend on the background. Noise is
Gaussian with std noise·(0.5 + I), a stand-in for quantum noise. Anatomy is sharp shapes blurred once
(σ = 0.8 px at 256 px, a stand-in for the detector MTF); nodule edges are anti-aliased analytically instead.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from nodule_diffusion.common import add_dataclass_args, config_from_args, read_config_file, run_cli, save_image_png
from nodule_diffusion.data import DEFAULT_VOCAB, DataError, ImageRecord, Nodule, crop_at, write_annotations
from nodule_diffusion.metrics import gaussian_blur


@dataclass
class PhantomConfig:
    size: int = 256                                  # image side, pixels (square images)
    spacing_mm: float = 1.4                          # isotropic pixel spacing, mm / pixel
    negative_fraction: float = 0.25                  # probability that an image has no nodule
    max_nodules: int = 2                             # a positive image has 1..max_nodules nodules (uniform)
    diameter_mm: tuple[float, float] = (8.0, 18.0)   # nodule body diameter, mm, uniform in [lo, hi]
    lobulated_fraction: float = 0.35                 # shape: probability of a lobulated body outline (in the mask)
    contrast: tuple[float, float] = (0.16, 0.24)     # intensity a solid body adds, [0, 1] units, uniform
    noise: float = 0.012                             # noise std at intensity 0.5, [0, 1] units
    vocab: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_VOCAB.items()})
    attribute_weights: dict[str, list[float]] | None = None   # attribute -> one weight per vocab value; None = uniform

    def __post_init__(self):
        self.diameter_mm, self.contrast = tuple(map(float, self.diameter_mm)), tuple(map(float, self.contrast))
        (d_lo, d_hi), (c_lo, c_hi) = self.diameter_mm, self.contrast
        if not (self.size >= 64 and self.spacing_mm > 0 and self.max_nodules >= 1 and self.noise >= 0
                and 0 <= self.negative_fraction <= 1 and 0 <= self.lobulated_fraction <= 1
                and 0 < d_lo <= d_hi and 0 < c_lo <= c_hi):
            raise DataError(f"phantom config: need size >= 64, spacing_mm > 0, max_nodules >= 1, noise >= 0, "
                            f"negative_fraction and lobulated_fraction in [0, 1], 0 < lo <= hi for diameter_mm and "
                            f"contrast; got {self}")
        if d_lo / self.spacing_mm < 2.0:
            raise DataError(f"phantom config: diameter_mm {d_lo} is {d_lo / self.spacing_mm:.2f} px; need >= 2 px")
        for attribute, value in ((a, v) for a, values in self.vocab.items() for v in values):
            _signature_of(attribute, value)          # unknown value -> DataError listing the known ones
        for attribute, weights in (self.attribute_weights or {}).items():
            n = len(self.vocab.get(attribute, []))
            if len(weights) != n or min(weights, default=0) < 0 or sum(weights) <= 0:
                raise DataError(f"phantom config: attribute_weights[{attribute!r}] must be {n} non-negative weights "
                                f"(one per value of {self.vocab.get(attribute)}) with a positive sum, got {weights}")


# ---------------------------------------------------------------------------------------------------------
# Nodule signatures. A tuple (lo, hi) is drawn per nodule: uniform for floats, integers in [lo, hi] for ints.
# Levels are multiples of the nodule's contrast C. An attribute missing from a nodule's dict keeps the
# DEFAULT_SHAPE entries (a solid, well-defined, non-calcified nodule). To add a value, add an entry to SIGNATURES.
# Design §3: the mask is the nodule BODY (size and outline: aspect and lobulation are shape, drawn independently
# of the attributes); every attribute draws what the mask does not show: density inside (texture), the border
# and what reaches beyond it (margin), bright calcium inside (calcification).
DEFAULT_SHAPE = dict(
    aspect=(0.8, 1.0),       # shape: minor / major axis of the elliptic body (area kept = π·R²)
    lobes=(2, 4),            # shape: k in ρ(θ) = R·(1 + a·cos(k·θ + φ)), used on lobulated bodies only
    lobe_amp=(0.15, 0.25),   # shape: a on lobulated bodies (0 otherwise, see _nodule_shape)
    body_level=1.0,          # texture: density of the body (the whole mask)
    core_level=0.0,          # texture: density of a central solid core, 0 = no core
    core_radius=0.0,         # texture: core radius / R
    mottle=0.05,             # texture: relative amplitude of fine internal texture (wavelength 2.5-4 px)
    blur=0.0,                # margin: width of the border ramp / R, ¾ of it outside the body (0 = sharp, 0.8 px)
    spikes=(0, 0),           # margin: number of thin radial spikes, reaching beyond the body
    spike_length=0.0,        # margin: mean spike length beyond the body / R
    calc_level=0.0,          # calcification: density added by the calcium, on top of the body's peak
    calc_radius=0.0,         # calcification: radius of a central calcified core / R
    popcorn=0.0,             # calcification: probability of a popcorn pattern (3-5 small blobs) instead
)
SIGNATURES: dict[tuple[str, str], dict] = {     # [FLEISCHNER] terms → our numbers
    ("texture", "solid"): dict(),                                             # uniform dense body
    ("texture", "part_solid"): dict(body_level=0.3, core_level=1.0, core_radius=(0.45, 0.6)),   # core + faint rest
    ("texture", "ground_glass"): dict(body_level=0.3, mottle=0.3),            # faint, mottled
    ("margin", "well_defined"): dict(),                                       # sharp edge
    ("margin", "ill_defined"): dict(blur=(0.6, 0.8)),                         # blurred: fades out to 0.6·R beyond
    ("margin", "spiculated"): dict(spikes=(8, 14), spike_length=(0.5, 0.8)),  # thin spikes beyond the body
    ("calcification", "none"): dict(),
    ("calcification", "calcified"): dict(calc_level=(1.5, 1.8), calc_radius=(0.2, 0.3), popcorn=0.4),  # central/popcorn
}
SHAPE_KEYS = ("aspect", "lobes", "lobe_amp")    # drawn from the shape generator (see _nodule_shape)
# How far beyond the body mask a signature can draw, / R: spikes ≤ 0.8·1.2 = 0.96, the blurred border 0.6. The
# region a model regenerates (data.nodule_region) must reach at least this far.
REACH = 0.96


def _signature_of(attribute: str, value: str) -> dict:
    if (attribute, value) not in SIGNATURES:
        known = ", ".join(f"{a}={v}" for a, v in SIGNATURES)
        raise DataError(f"phantom config: no drawing signature for {attribute}={value!r}; known: {known} "
                        "(add an entry to phantom.SIGNATURES to draw a new value)")
    return SIGNATURES[(attribute, value)]


def _draw_param(spec, rng: np.random.Generator):
    if isinstance(spec, tuple) and all(isinstance(s, int) for s in spec):
        return int(rng.integers(spec[0], spec[1] + 1))
    return float(rng.uniform(*spec)) if isinstance(spec, tuple) else spec


def _smoothstep(t: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in ramp units: 0 → 0, 1 → 1, C¹ in between."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _nodule_shape(attributes: dict[str, str], diameter_px: float, rng, config: PhantomConfig) -> dict:
    """Draw every random parameter of one nodule (so rendering it again at another centre is deterministic)."""
    spec = dict(DEFAULT_SHAPE)
    for attribute, value in attributes.items():
        spec.update(_signature_of(attribute, value))
    # The body's shape comes from its own generator, drawn first: the same rng state gives the same mask whatever
    # the attributes (they must not be readable from the mask, design §3).
    shape_rng = np.random.default_rng(rng.integers(2 ** 63))
    s = {name: _draw_param(spec[name], shape_rng) for name in SHAPE_KEYS}
    if shape_rng.random() >= config.lobulated_fraction:
        s["lobe_amp"] = 0.0                                                 # a round / oval body
    s.update(orient=shape_rng.uniform(0, np.pi), lobe_phase=shape_rng.uniform(0, 2 * np.pi))
    s.update({name: _draw_param(value, rng) for name, value in spec.items() if name not in SHAPE_KEYS})
    R = s["radius"] = diameter_px / 2.0
    s["contrast"] = rng.uniform(*config.contrast)
    # fine texture: three plane waves, wavelength 2.5-4 px, random direction and phase
    angle, wavelength = rng.uniform(0, np.pi, 3), rng.uniform(2.5, 4.0, 3)
    s["waves"] = np.stack([np.cos(angle), np.sin(angle)], 1) * (2 * np.pi / wavelength)[:, None]   # (3, 2)
    s["wave_phase"] = rng.uniform(0, 2 * np.pi, 3)
    # spikes: roughly even angles; each starts at the body's border along its direction (see _rho)
    n = s["spikes"]
    s["spike_angle"] = 2 * np.pi * (np.arange(n) + rng.uniform(-0.35, 0.35, n)) / max(n, 1) + rng.uniform(0, 2 * np.pi)
    s["spike_len"] = s["spike_length"] * R * rng.uniform(0.8, 1.2, n)
    # calcium: one central core (slightly off-centre) or a popcorn cluster of 3-5 small blobs
    k = int(rng.integers(3, 6)) if rng.random() < s["popcorn"] else 1
    radius = max(0.9, 0.15 * R) if k > 1 else max(1.2, s["calc_radius"] * R)
    offset = rng.uniform(0.0, 0.3 * R if k > 1 else 0.1 * R, k)
    phi = rng.uniform(0, 2 * np.pi, k)
    s["calc_blobs"] = np.stack([offset * np.cos(phi), offset * np.sin(phi), np.full(k, radius)], 1)  # (k, 3)
    return s


def _rho(s: dict, theta: np.ndarray) -> np.ndarray:
    """Border radius in the body's frame: ρ(θ) = R·(1 + a·cos(k·θ + φ)) (a = 0 for round and oval bodies)."""
    return s["radius"] * (1.0 + s["lobe_amp"] * np.cos(s["lobes"] * theta + s["lobe_phase"]))


def _render_nodule(s: dict, centre_xy: tuple[float, float], image_shape: tuple[int, int]):
    """One nodule in a window around its centre: (rows, cols, density (h, w) float32 = added intensity in
    [0, ~2.6·C], mask (h, w) bool), rows/cols being the window's slices of the image. The body is elliptic in
    the frame (u, v) rotated by `orient`: r = √(a·u² + v²/a) keeps its area π·R²; mask = the body r ≤ ρ(θ) only
    (spikes and the blurred border reach beyond it; calcium lies inside it)."""
    R, a = s["radius"], s["aspect"]
    extent = R * (1 + s["lobe_amp"]) / np.sqrt(a) + s["spike_len"].max(initial=0.0) + s["blur"] * R + 2.0
    cx, cy = centre_xy
    H, W = image_shape
    y0, y1 = max(int(cy - extent), 0), min(int(cy + extent) + 2, H)
    x0, x1 = max(int(cx - extent), 0), min(int(cx + extent) + 2, W)
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]          # (h, 1) pixel centres
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]          # (1, w)
    co, si = np.cos(s["orient"]), np.sin(s["orient"])
    u, v = dx * co + dy * si, -dx * si + dy * co                           # (h, w) body frame
    r = np.sqrt(a * u * u + v * v / a)
    rho = _rho(s, np.arctan2(v, u))
    edge = max(0.8, s["blur"] * R)                                          # px, border ramp width
    # a blurred (ill-defined) border spills out: its ramp runs from ρ − edge/4 to ρ + 3·edge/4
    spill = 0.25 * edge if s["blur"] > 0 else 0.0
    body = _smoothstep((rho + spill - r) / edge + 0.5)                      # 0.5 on r = ρ + spill
    dome = 0.75 + 0.25 * np.sqrt(np.clip(1.0 - (r / rho) ** 2, 0.0, 1.0))   # projected sphere, mostly flat
    wave = np.cos(dx[..., None] * s["waves"][:, 0] + dy[..., None] * s["waves"][:, 1] + s["wave_phase"]).sum(-1)
    density = s["body_level"] * body * dome * (1.0 + s["mottle"] * wave / 1.22)   # 3 waves: std ≈ 1.22
    if s["core_level"] > 0:                                                 # part-solid: dense core, faint halo
        core = _smoothstep((s["core_radius"] * R - r) / 0.8 + 0.5)
        density += (s["core_level"] - s["body_level"]) * core * dome
    mask = r <= rho
    if len(s["spike_angle"]):
        spikes = _render_spikes(s, dx, dy)
        density = np.maximum(density, max(s["body_level"], 0.6) * spikes)   # faint bodies keep visible spikes
    if s["calc_level"] > 0:
        bx, by, br = (s["calc_blobs"][:, i, None, None] for i in range(3))  # (k, 1, 1)
        dist = np.sqrt((dx - bx) ** 2 + (dy - by) ** 2)                    # (k, h, w)
        calc = _smoothstep((br - dist) / 0.8 + 0.5).max(0)
        density += s["calc_level"] * calc
    return slice(y0, y1), slice(x0, x1), (s["contrast"] * density).astype(np.float32), mask


def _render_spikes(s: dict, dx: np.ndarray, dy: np.ndarray):
    """Thin radial spikes: a segment from the centre to ρ + L along each direction, half-width tapering from
    w0 = 0.5 + 0.04·R px at the border to w0/2 at the tip, density fading to half. Returns (density, mask)."""
    beta = s["spike_angle"][:, None, None]                                 # (S, 1, 1)
    along = dx * np.cos(beta) + dy * np.sin(beta)                           # (S, h, w)
    perp = np.abs(-dx * np.sin(beta) + dy * np.cos(beta))                   # (S, h, w)
    # border distance along each spike: the direction in the body frame, then r = t·√(a·du² + dv²/a) = ρ(θ)
    psi, a = s["spike_angle"] - s["orient"], s["aspect"]
    du, dv = np.cos(psi), np.sin(psi)
    border = (_rho(s, np.arctan2(dv, du)) / np.sqrt(a * du * du + dv * dv / a))[:, None, None]   # (S, 1, 1)
    f = np.clip((along - border) / s["spike_len"][:, None, None], 0.0, None)   # 0 at the border, 1 at the tip
    on = (along >= 0) & (f <= 1.0)
    half = (0.5 + 0.04 * s["radius"]) * (1.0 - 0.5 * f)
    return (np.clip(half - perp + 0.5, 0.0, 1.0) * (1.0 - 0.5 * f) * on).max(0)


def draw_nodule(image: np.ndarray, centre_xy: tuple[float, float], diameter_px: float,
                attributes: dict[str, str], rng: np.random.Generator, config: PhantomConfig | None = None):
    """Add one nodule to `image` in place (clipped to [0, 1]) and return its support mask.

    image: float32 (H, W) in [0, 1]; centre_xy: (x, y) in pixels (continuous, pixel i covers [i, i + 1));
    diameter_px: body diameter (2·R; spikes excluded); attributes: attribute -> value, a missing attribute
    keeps the DEFAULT_SHAPE look. Returns a bool (H, W) mask. The nodule is not checked against any anatomy.
    """
    config = config or PhantomConfig()
    shape = _nodule_shape(attributes, diameter_px, rng, config)
    rows, cols, density, local = _render_nodule(shape, centre_xy, image.shape)
    image[rows, cols] = np.clip(image[rows, cols] + density, 0.0, 1.0)
    mask = np.zeros(image.shape, dtype=bool)
    mask[rows, cols] = local
    return mask


# ---------------------------------------------------------------------------------------------------------
# Anatomy. Shapes are drawn in (u, v) = (x, y) / size, then blurred once; intensities are display-space levels.
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-std float32 (size, size) random field, features ~size/cells px: a Gaussian grid upsampled bicubically."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    field_ = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))
    return field_ / max(float(field_.std()), 1e-6)


def _bone_band(dist: np.ndarray, half: float) -> np.ndarray:
    """Cross-section of a bone of half-width `half`: 0.7 in the marrow rising to ~0.93 in the cortex, 0 outside."""
    q = np.abs(dist) / half
    return np.clip(4.0 * (1.0 - q), 0.0, 1.0) * (0.7 + 0.3 * np.minimum(q, 1.0))


def _rib_family(u, v, first, spacing, count, centre_line, slope, half, d_range):
    """Periodic family of curved bones, rib j along v = first + j·spacing + centre_line(d), d = |u − 0.5|, in one
    field evaluation: phase = (v − first − centre_line) / spacing, j = round(phase); the vertical offset becomes
    a perpendicular one through 1/√(1 + slope²)."""
    d = np.abs(u - 0.5)
    phase = (v - first - centre_line(d)) / spacing
    j = np.round(phase)
    dist = (phase - j) * spacing / np.sqrt(1.0 + slope(d) ** 2)
    keep = (j >= 0) & (j < count) & (d > d_range[0]) & (d < d_range[1])
    return _bone_band(dist, half) * keep


def _anatomy_params(rng: np.random.Generator) -> dict:
    """Per-image anatomical variation; pairs are (image-left = patient-right lung, image-right lung)."""
    U = rng.uniform
    return dict(
        shift=(U(-0.025, 0.025), U(-0.03, 0.03)), scale=U(0.93, 1.05), tilt=U(-0.05, 0.05),   # tilt in rad
        body_hw=U(0.41, 0.47), tissue=U(0.42, 0.52), lung_dark=U(0.26, 0.34), bone=U(0.06, 0.09),
        organ=U(0.12, 0.17), gamma=U(0.85, 1.15),
        lung_dx=(U(0.17, 0.21), U(0.17, 0.21)), lung_hw=(U(0.12, 0.15), U(0.115, 0.145)),
        lung_top=(U(0.09, 0.14), U(0.09, 0.14)), lung_base=(U(0.74, 0.81), U(0.76, 0.83)),
        dome=(U(0.08, 0.12), U(0.06, 0.10)), egg=U(0.1, 0.3),          # the patient's right dome is higher
        heart=(U(0.03, 0.07), U(0.60, 0.66), U(0.14, 0.18), U(0.11, 0.14)),   # x offset, y, rx, ry
        rib_first=U(0.10, 0.14), rib_spacing=U(0.058, 0.07), rib_curve=U(0.8, 1.3), rib_rise=U(0.0, 0.15),
        ant_first=U(0.22, 0.28), ant_slope=U(0.45, 0.7), clavicle=U(0.12, 0.16),
    )


def _soft_parts(u, v, p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hard region masks → (display-space level (S, S) before bones, lung mask bool (S, S), hilar weight (S, S))."""
    hx, hy, hrx, hry = p["heart"]
    heart = ((u - 0.5 - hx) / hrx) ** 2 + ((v - hy) / hry) ** 2 < 1.0
    mediastinum = np.abs(u - 0.5) < 0.05 + 0.05 * v                       # continues below as the spine's shadow
    knob = (u - 0.56) ** 2 + (v - 0.31) ** 2 < 0.035 ** 2                  # aortic knob, patient's left
    lung = np.zeros(u.shape, dtype=bool)
    diaphragm = np.zeros(u.shape, dtype=np.float32)                        # v of the dome over each column
    for side, sign in ((0, -1.0), (1, 1.0)):
        cx, hw = 0.5 + sign * p["lung_dx"][side], p["lung_hw"][side]
        top, base = p["lung_top"][side], p["lung_base"][side]
        cy, ry = (top + base + 0.06) / 2, (base + 0.06 - top) / 2
        s = np.clip((v - cy) / ry, -1.0, 1.0)
        s2 = s * s                                                         # superellipse: round apex, boxy base
        width = hw * (1 + p["egg"] * s) * np.where(s < 0, np.sqrt(1 - s2), np.sqrt(np.sqrt(1 - s2 * s2)))
        dome = base - p["dome"][side] + p["dome"][side] * ((u - cx) / hw) ** 2   # lowest at the sulci
        lung |= (np.abs(u - cx - sign * 0.02 * s) < width) & (v < dome) & (v > top)
        diaphragm = np.where((u < 0.5) == (side == 0), np.minimum(dome, base + 0.2), diaphragm)
    lung &= ~(heart | mediastinum | knob)
    body_hw = p["body_hw"] * (0.8 + 0.2 * np.clip(v / 0.15, 0.0, 1.0))      # narrower at the neck
    body = np.clip((body_hw - np.abs(u - 0.5)) * 60.0, 0.0, 1.0)           # soft lateral skin line
    tissue = p["tissue"] * body * (1 - 0.35 * (np.abs(u - 0.5) / p["body_hw"]) ** 4)   # thinner laterally
    dense = (heart | mediastinum | knob) | ((v > diaphragm) & (body > 0))  # organs and abdomen
    trachea = (np.abs(u - 0.5) < 0.013) & (v < 0.40)
    level = 0.04 + tissue + p["organ"] * dense - 0.10 * trachea
    hila = sum(np.exp(-((u - 0.5 - sign * 0.11) ** 2 + (v - 0.45) ** 2) / (2 * 0.07 ** 2)) for sign in (-1, 1))
    # lungs: dark, brighter at the hila and towards the bases (overlapping soft tissue)
    level -= lung * p["lung_dark"] * (1.0 - 0.4 * hila - 0.25 * np.clip((v - 0.5) / 0.3, 0.0, 1.0))
    return level.astype(np.float32), lung, hila


def _bones(u, v, p) -> np.ndarray:
    """Posterior ribs, anterior ribs (fainter), clavicles and spine, in bone units (S, S)."""
    c, rise, sp = p["rib_curve"], p["rib_rise"], p["rib_spacing"]
    inside = (0.035, p["body_hw"] - 0.02)
    posterior = _rib_family(u, v, p["rib_first"], sp, 10, lambda d: c * d * d - rise * d,
                            lambda d: 2 * c * d - rise, 0.30 * sp, inside)
    a = p["ant_slope"]
    anterior = _rib_family(u, v, p["ant_first"], 1.1 * sp, 6, lambda d: 0.4 * d * d - a * d,
                           lambda d: 0.8 * d - a, 0.22 * sp, (0.09, p["body_hw"] - 0.03))
    clavicle = _rib_family(u, v, p["clavicle"], 1.0, 1, lambda d: 0.4 * d * d - 0.3 * d,
                           lambda d: 0.8 * d - 0.3, 0.017, (0.03, 0.30))
    spine = _bone_band(u - 0.5, 0.04) * (0.75 + 0.25 * np.cos(2 * np.pi * (v - p["rib_first"]) / sp))
    return posterior + 0.45 * anterior + 0.9 * clavicle + 0.4 * spine


def _anatomy(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Background CXR (float32 (S, S) in [0, 1], no noise) and its lung mask (bool (S, S))."""
    p = _anatomy_params(rng)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5             # pixel centres, centred
    x, y = grid[None, :], grid[:, None]                                       # (1, S), (S, 1)
    co, si = float(np.cos(p["tilt"])), float(np.sin(p["tilt"]))           # Python floats keep float32
    u = 0.5 + (x * co - y * si) / p["scale"] - p["shift"][0]                  # (S, S) anatomy coordinates
    v = 0.5 + (x * si + y * co) / p["scale"] - p["shift"][1]
    level, lung, hila = _soft_parts(u, v, p)
    body = np.abs(u - 0.5) < p["body_hw"]
    level += p["bone"] * _bones(u, v, p) * body
    # lung markings: blotches of ~size/40 px (vessels seen end-on), stronger near the hila, plus fine grain
    markings = 0.015 * (1.0 + 1.5 * hila) * np.maximum(_smooth_noise(rng, size, max(size // 6, 4)), -1.0)
    level += lung * (markings + 0.015 * rng.standard_normal(lung.shape, dtype=np.float32))
    level = gaussian_blur(level, 0.8 * size / 256, "replicate")                                   # detector blur (MTF stand-in)
    level *= 1.0 + 0.05 * _smooth_noise(rng, size, 4)                         # smooth low-frequency variation
    image = np.clip(level, 0.0, 1.0) ** p["gamma"]
    lung[:2], lung[-2:], lung[:, :2], lung[:, -2:] = False, False, False, False   # nodules stay off the border
    return image.astype(np.float32), lung


# ---------------------------------------------------------------------------------------------------------
# Images
def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image `index` of a dataset: depends on (seed, index) only, so image i is the same
    whatever n_images is (numpy SeedSequence of the pair)."""
    return np.random.default_rng([seed, index])


def _draw_attributes(rng: np.random.Generator, config: PhantomConfig) -> dict[str, str]:
    """One value per vocabulary attribute, independently, with config.attribute_weights (default uniform)."""
    attributes = {}
    for name, values in config.vocab.items():
        weights = np.asarray((config.attribute_weights or {}).get(name, [1.0] * len(values)), dtype=np.float64)
        attributes[name] = values[int(rng.choice(len(values), p=weights / weights.sum()))]
    return attributes


def _place_nodules(image: np.ndarray, lung: np.ndarray, rng, config: PhantomConfig, tries: int = 200) -> list[dict]:
    """Add 1..max_nodules nodules to `image` in place, each mask inside the lung and clear of the others' boxes
    (+2 px). Centres are drawn uniformly over lung pixels and rejected until the whole mask fits."""
    lung_yx = np.argwhere(lung)                                             # (P, 2) candidate centres
    taken = np.zeros_like(lung)
    nodules = []
    for _ in range(int(rng.integers(1, config.max_nodules + 1))):
        attributes = _draw_attributes(rng, config)
        diameter_mm = float(rng.uniform(*config.diameter_mm))
        shape = _nodule_shape(attributes, diameter_mm / config.spacing_mm, rng, config)
        for _ in range(tries):
            y, x = lung_yx[rng.integers(len(lung_yx))]
            centre = (x + rng.random(), y + rng.random())
            rows, cols, density, local = _render_nodule(shape, centre, image.shape)
            if np.all(lung[rows, cols][local]) and not np.any(taken[rows, cols][local]):
                break
        else:
            raise DataError(f"phantom config: no room for a {diameter_mm:.1f} mm nodule in the lungs of a {config.size}"
                            f"-px image at {config.spacing_mm} mm/px; lower diameter_mm or max_nodules, or raise size")
        image[rows, cols] += density
        mask = np.zeros(image.shape, dtype=bool)
        mask[rows, cols] = local
        ys, xs = np.nonzero(mask)                                          # box: pixel i covers [i, i + 1)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        taken[max(int(box[1]) - 2, 0):int(box[3]) + 2, max(int(box[0]) - 2, 0):int(box[2]) + 2] = True
        nodules.append(dict(box=box, mask=mask, diameter_mm=diameter_mm, attributes=attributes,
                            centre_xy=(float(centre[0]), float(centre[1]))))
    return nodules


def make_image(rng: np.random.Generator, config: PhantomConfig | None = None):
    """One phantom CXR, deterministic given the rng state: (image, nodules, lung_mask).

    image float32 (S, S) in [0, 1], dense = bright; lung_mask bool (S, S); nodules (empty with probability
    negative_fraction) a list of dicts: box (x0, y0, x1, y1) floats in pixels (x1, y1 exclusive pixel edges),
    mask bool (S, S), diameter_mm (body diameter 2·R, spikes excluded), attributes {attribute: value}, centre_xy.
    """
    config = config or PhantomConfig()
    image, lung = _anatomy(rng, config.size)
    nodules = [] if rng.random() < config.negative_fraction else _place_nodules(image, lung, rng, config)
    # quantum-like noise: std grows with density (fewer photons reach the detector behind dense tissue)
    image += config.noise * (0.5 + image) * rng.standard_normal(image.shape, dtype=np.float32)
    np.clip(image, 0.0, 1.0, out=image)
    return image, nodules, lung


# ---------------------------------------------------------------------------------------------------------
# Disk: dataset, preview, CLI
def make_dataset(out_dir: str | Path, n_images: int, seed: int, progress: bool = True, **options) -> Path:
    """Write n_images phantom CXRs (negatives included) under out_dir and return the annotations.csv path.

    images/phantom_00000.png: uint16 PNG, value = round(I·65535); masks/phantom_00000_<k>.png: uint8 0/255,
    one per nodule; annotations.csv (data.write_annotations, paths relative to out_dir, spacing_mm set) is
    written last and atomically, so an interrupted run leaves no CSV. options: PhantomConfig fields.
    """
    names = [f.name for f in fields(PhantomConfig)]
    if set(options) - set(names):
        raise DataError(f"phantom options: unknown {sorted(set(options) - set(names))}; known: {names}")
    config = PhantomConfig(**options)
    out_dir = Path(out_dir)
    for sub in ("images", "masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "annotations.csv"
    csv_path.unlink(missing_ok=True)   # a stale CSV would describe images that this run overwrites
    records = []
    for index in tqdm(range(n_images), desc="phantom", unit="img", disable=not progress):
        image, nodules, _ = make_image(image_rng(seed, index), config)
        stem = f"phantom_{index:05d}"
        image_path = save_image_png(out_dir / "images" / f"{stem}.png", image).resolve()   # uint16, I·65535
        found = []
        for k, nodule in enumerate(nodules):
            mask_path = save_image_png(out_dir / "masks" / f"{stem}_{k}.png", nodule["mask"].astype(np.uint8) * 255)
            found.append(Nodule(box=nodule["box"], attributes=dict(nodule["attributes"]), mask=mask_path.resolve(),
                                diameter_mm=round(nodule["diameter_mm"], 2)))
        records.append(ImageRecord(image=image_path, nodules=found, spacing_mm=config.spacing_mm))
    return write_annotations(csv_path, records, config.vocab)


def make_preview(out_png: str | Path, seed: int = 0, config: PhantomConfig | None = None, per_row: int = 8,
                 crop: int = 48, zoom: int = 2, window: tuple[float, float] = (0.05, 0.75)) -> Path:
    """Contact sheet (8-bit PNG): per attribute value a labelled row of `per_row` nodule crops (crop×crop px,
    ×zoom), then a row of whole images. One fixed display window for all crops, so contrasts compare."""
    config = config or PhantomConfig()
    rows = {(a, v): [] for a, values in config.vocab.items() for v in values}
    wholes = []
    for index in range(400):                                                 # enough for every row to fill
        image, nodules, _ = make_image(image_rng(seed, index), config)
        wholes = (wholes + [image])[:4]
        for nodule, key in ((n, k) for n in nodules for k in n["attributes"].items()):
            if len(rows[key]) < per_row:
                rows[key].append(crop_at(image, *nodule["centre_xy"], crop)[0])
        if all(len(r) == per_row for r in rows.values()):
            break
    tile, gap, label = crop * zoom, 4, 190
    thumb = (per_row * (tile + gap)) // 4 - gap
    sheet = Image.new("L", (label + per_row * (tile + gap), len(rows) * (tile + gap) + thumb + gap), 0)
    draw = ImageDraw.Draw(sheet)
    lo, hi = window

    def to_pil(a, side, resample):
        return Image.fromarray(np.round(np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)).resize(
            (side, side), resample)

    for r, ((attribute, value), crops) in enumerate(rows.items()):
        draw.text((6, r * (tile + gap) + tile // 2 - 6), f"{attribute}={value}", fill=255)
        for c, patch in enumerate(crops):
            sheet.paste(to_pil(patch, tile, Image.Resampling.NEAREST), (label + c * (tile + gap), r * (tile + gap)))
    y = len(rows) * (tile + gap)
    draw.text((6, y + thumb // 2 - 6), "whole images", fill=255)
    for c, image in enumerate(wholes):
        sheet.paste(to_pil(image, thumb, Image.Resampling.BILINEAR), (label + c * (thumb + gap), y))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return Path(out_png)


EXAMPLES = """examples:
  python -m nodule_diffusion.phantom --out_dir data/phantom --n_images 500 --seed 0 --preview
  python -m nodule_diffusion.phantom --out_dir data/phantom_test --n_images 200 --seed 1   # held-out split
  python -m nodule_diffusion.phantom --out_dir /tmp/p --n_images 50 --size 512 --spacing_mm 0.7 \\
      --negative_fraction 0.5 --diameter_mm 6 30 --config phantom.json
  where phantom.json = {"vocab": {"texture": ["solid", "ground_glass"]}, "attribute_weights": {"texture": [3, 1]}}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nodule_diffusion.phantom", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Write a seeded phantom CXR dataset (16-bit PNGs, masks, CSV).")
    parser.add_argument("--out_dir", required=True, help="output folder (images/, masks/, annotations.csv)")
    parser.add_argument("--n_images", type=int, default=200, help="images in all, negatives included")
    parser.add_argument("--seed", type=int, default=0, help="image i uses the generator of (seed, i)")
    parser.add_argument("--preview", action="store_true", help="also write OUT_DIR/preview.png")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    parser.add_argument("--config", help="JSON file of PhantomConfig fields (the only way to set vocab and "
                                         "attribute_weights); flags override it")
    add_dataclass_args(parser, PhantomConfig, {"diameter_mm": "LO HI, mm", "contrast": "LO HI, added intensity"})
    args = parser.parse_args(argv)
    config = config_from_args(PhantomConfig, args, read_config_file(args.config))
    options = {f.name: getattr(config, f.name) for f in fields(PhantomConfig)}
    print(f"wrote {make_dataset(args.out_dir, args.n_images, args.seed, not args.no_progress, **options)}")
    if args.preview:
        print(f"wrote {make_preview(Path(args.out_dir) / 'preview.png', args.seed, config)}")


if __name__ == "__main__":
    run_cli(main)
