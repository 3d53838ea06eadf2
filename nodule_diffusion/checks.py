"""Validation at the edges (issue 11): the physical ranges and size limits of the input, and the checks that
enforce them, each raising a one-line DataError that names the file (or CSV row, or flag) and how to fix it.

Used by the readers (data.py, formats.py, datasets.py) and, for request rows and flags, by the scripts.
Checkpoint and adapter schemas and content hashes live with the file I/O (common.py, lora.py).

Ranges: what a chest radiograph allows.
    SPACING_RANGE_MM  [0.05, 5] mm/pixel. The finest clinical X-ray detectors (mammography) have 0.05 mm pixels;
                      CXR detectors 0.1–0.2 mm (JSRT 0.175), and a 43 cm chest still spans 86 pixels at 5 mm.
    MAX_DIAMETER_MM   100 mm. A nodule is ≤ 30 mm and a mass above that [Fleischner glossary, Hansell 2008];
                      100 mm leaves room for large masses, not for a typo like 5,950.
    MIN_IMAGE_SIDE    16 pixels (also after resampling to the working spacing): the smallest model crop in use;
                      a smaller image is mostly padding in every crop (a 1×1 image is a constant crop).
    MAX_IMAGE_SIDE, MAX_IMAGE_PIXELS  16384 and 2^26 (8192²). The largest flat-panel CXR detectors are
                      43 cm at 0.1 mm ≈ 4300² = 18.5 M pixels; a bigger header is a decompression bomb or an
                      error, and is refused from its header, before any full-size array is allocated.
    FLAG_RANGES       the allowed range of every script flag that has one (counts ≥ 1, rates > 0, η in [0, 1], …),
                      checked by `check_ranges` right after the configs are built.

Output folders (`check_output_dir`): a script never writes into the folder its input data come from (nor into a
folder inside it), and finds out that its output folder is a file or not writable before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from nodule_diffusion.common import DataError
from nodule_diffusion.schedulers import BETA_SCHEDULES, PREDICTION_TYPES

SPACING_RANGE_MM = (0.05, 5.0)  # mm per pixel (module docstring)
MAX_DIAMETER_MM = 100.0
MIN_IMAGE_SIDE = 16
MAX_IMAGE_SIDE = 16384
MAX_IMAGE_PIXELS = 2 ** 26
SPACING_HOW = "give it in the annotation CSV column spacing_mm (mm per pixel)"

# The range of every script flag that has one, by field name (the same name means the same rule in every script):
# (lo, hi) inclusive with None = unbounded, (lo, hi, "lo open") for a bound that is itself refused (> lo), or a
# set of allowed values. Read by check_ranges; README "What the scripts refuse" lists them.
AT_LEAST_1 = (1, None)
POSITIVE = (0, None, "lo open")
FLAG_RANGES = {
    # counts and step numbers: a 0 would train or sample nothing and still print "wrote …"
    **{name: AT_LEAST_1 for name in (
        "steps", "batch_size", "log_every", "checkpoint_every", "n_images", "test_images", "per_image",
        "lora_steps", "compose_steps", "synthetic_images", "det_steps", "det_batch_size", "seeds", "n_boot",
        "judge_steps", "num_train_timesteps", "lora_rank")},
    **{name: (0, None) for name in ("warmup", "weight_decay", "grad_clip", "sample_every", "low_data",
                                    "lambda_orth", "lambda_attn", "lambda_zip", "lambda_denoise", "lambda_preserve",
                                    "min_snr_gamma", "guidance", "adapter_guidance")},
    **{name: POSITIVE for name in ("lr", "lora_lr", "compose_lr", "det_lr", "lora_alpha", "mask_weight")},
    "seed": (0, 2 ** 32 - 1),  # numpy's default_rng refuses negative seeds; torch's generators take 64 bits
    "judge_width": {8, 16, 32, 64},  # GroupNorm(min(8, C), C) needs C = width, 2·width, 4·width divisible
    "ema_decay": (0, 1), "eta": (0, 1), "cfg_dropout": (0, 1),
    "image_size": (32, MAX_IMAGE_SIDE),  # detector input side: the smallest FPN level must keep a few pixels
    "crop_size": (MIN_IMAGE_SIDE, None),
    "spacing_mm": SPACING_RANGE_MM,
    "min_diameter_mm": POSITIVE, "max_diameter_mm": (0, MAX_DIAMETER_MM, "lo open"),
    "sampler": {"ddim", "ddpm"},
    "beta_schedule": set(BETA_SCHEDULES), "prediction_type": set(PREDICTION_TYPES),
    "lora_init": {"kaiming", "orthogonal_bases"},
}


def _number(value, where: str, name: str) -> float:
    """`value` as a float when it is an int or float (bools are not numbers here), else DataError."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise DataError(f"{where}: {name} {value!r} is not a number")
    return float(value)


def check_spacing(value, where: str, how: str = SPACING_HOW) -> float:
    """`value` as a float in SPACING_RANGE_MM (mm/pixel), else DataError "{where}: …; {how}"."""
    lo, hi = SPACING_RANGE_MM
    number = _number(value, where, "pixel spacing")
    if not (lo <= number <= hi):  # NaN fails every comparison
        raise DataError(f"{where}: pixel spacing {value!r} mm is outside the physical range [{lo}, {hi}] mm/pixel; "
                        f"{how}")
    return float(number)


def check_diameter(value, where: str) -> float:
    """A nodule diameter in mm: finite, > 0 and ≤ MAX_DIAMETER_MM, else DataError."""
    number = _number(value, where, "diameter_mm")
    if not (0 < number <= MAX_DIAMETER_MM):
        raise DataError(f"{where}: diameter_mm {value!r} must be > 0 and ≤ {MAX_DIAMETER_MM:g} mm")
    return float(number)


def check_image_size(height: int, width: int, where, min_side: int = MIN_IMAGE_SIDE) -> tuple[int, int]:
    """(H, W) inside [min_side, MAX_IMAGE_SIDE] per side and ≤ MAX_IMAGE_PIXELS in all, else DataError."""
    if min(height, width) < min_side:
        raise DataError(f"{where}: image is {width}x{height} pixels; need at least {min_side} per side")
    if max(height, width) > MAX_IMAGE_SIDE or height * width > MAX_IMAGE_PIXELS:
        raise DataError(f"{where}: image is {width}x{height} pixels; the limit is {MAX_IMAGE_SIDE} per side and "
                        f"{MAX_IMAGE_PIXELS} pixels in all (a bigger header is corrupt or a decompression bomb)")
    return height, width


def check_request(where: str, cx, cy, diameter_mm, mask: np.ndarray | None, image_hw: tuple[int, int],
                  spacing_mm: float) -> None:
    """Validate one nodule request of sample.py (a row of the requests CSV) against its image (size `image_hw`,
    pixel spacing `spacing_mm`); DataError naming `where` for: a centre that is not finite or lies outside the
    image, a diameter outside (0, MAX_DIAMETER_MM], a nodule that the image edge would clip (its label would
    describe a nodule that is not all there), or a mask of another size than the image or with no pixel set."""
    h, w = image_hw
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (cx, cy)) or not (
            0 <= cx < w and 0 <= cy < h):
        raise DataError(f"{where}: centre ({cx}, {cy}) must be finite and inside the {w}x{h} image")
    if mask is not None:
        if tuple(mask.shape) != (h, w):
            raise DataError(f"{where}: request mask is {mask.shape[-1]}x{mask.shape[0]} pixels but the image is "
                            f"{w}x{h}")
        if not mask.any():
            raise DataError(f"{where}: request mask is empty (no pixel > 0)")
    if diameter_mm is None:
        return
    check_diameter(diameter_mm, where)
    radius_px = diameter_mm / check_spacing(spacing_mm, where) / 2
    if cx - radius_px < 0 or cy - radius_px < 0 or cx + radius_px > w or cy + radius_px > h:
        raise DataError(f"{where}: a {diameter_mm:g} mm nodule ({2 * radius_px:.0f} px) at ({cx:g}, {cy:g}) would be "
                        f"clipped by the {w}x{h} image edge; move it inward or make it smaller")


# ---------------------------------------- flags and output folders
def check_ranges(config, ranges: dict | None = None) -> None:
    """Refuse a config value outside its allowed range, as one line naming the flag ("--batch_size 0: …").

    The rule of field `name` is `ranges[name]`, else the field's metadata["range"], e.g.
    `batch_size: int = field(default=8, metadata={"range": (1, None)})`. A rule is (lo, hi) with None for
    unbounded (numbers must also be finite), (lo, hi, "lo open") when lo itself is refused, or a set of
    allowed values. Tuple fields are checked element by element; None values (an unset optional field) are
    skipped. The scripts pass `FLAG_RANGES`.
    """
    for f in dataclasses.fields(config):
        rule = (ranges or {}).get(f.name, f.metadata.get("range"))
        value = getattr(config, f.name)
        if rule is None or value is None:
            continue
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(rule, (set, frozenset)):
                if item not in rule:
                    raise DataError(f"--{f.name} {item!r}: choose one of {', '.join(map(str, sorted(rule)))}")
                continue
            lo, hi, lo_open = (*rule, None)[:3]
            number = item if isinstance(item, (int, float)) and not isinstance(item, bool) else math.nan
            below = lo is not None and (number <= lo if lo_open else number < lo)
            if not math.isfinite(number) or below or (hi is not None and number > hi):
                low = lo is not None and (f"> {lo}" if lo_open else f"≥ {lo}")
                bounds = " and ".join(b for b in (low, hi is not None and f"≤ {hi}") if b)
                raise DataError(f"--{f.name} {item!r}: must be a finite number{' ' + bounds if bounds else ''}")


def check_writable_dir(path: str | Path, flag: str = "--out_dir") -> Path:
    """Create `path` if needed and prove it writable before any work starts; DataError naming the flag otherwise
    (a file in the way, no permission, read-only disk): a run must not find out after hours of training."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{flag} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DataError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None
    return path


def check_output_dir(out_dir: str | Path, inputs: dict, flag: str = "--out_dir") -> Path:
    """Refuse an output folder that is, or lies inside, a folder the input data come from: a script must never
    write beside (or over) the user's images and annotations. `inputs`: {flag: input file or folder}, where a
    file stands for its folder (a CSV's images are relative to it). Returns the resolved output folder."""
    out = Path(out_dir).resolve()
    for name, value in inputs.items():
        if value is None:
            continue
        folder = Path(value).resolve()
        folder = folder.parent if folder.is_file() or folder.suffix.lower() in (".csv", ".json") else folder
        if out == folder or folder in out.parents:
            raise DataError(f"{flag} {out_dir}: is {'the folder' if out == folder else 'inside the folder'} of "
                            f"{name} ({folder}); write the outputs somewhere else")
    return out
