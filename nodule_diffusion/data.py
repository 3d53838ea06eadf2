"""Data: DataError, image reading, annotation records (CSV / COCO), nodule masks, resampling and the crop dataset.

Conventions (design §3): images are float32 (H, W) in [0, 1] with dense = bright; boxes are (N, 4) float xyxy in
absolute pixels, (0, 4) when empty; masks are bool (H, W). A nodule's attributes are a dict attribute -> value;
a missing key means "unknown" (index -1 in tensors).
Medical formats (DICOM, MetaImage, JSRT raw) are read by `formats.py`; `read_image` dispatches to it by content.
Physical ranges and size limits (spacing, diameter, image size) are those of `checks.py`.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from nodule_diffusion import formats
from nodule_diffusion.checks import (MAX_IMAGE_PIXELS, SPACING_HOW, check_diameter, check_image_size,
                                     check_spacing)
from nodule_diffusion.common import DataError, atomic_path

__all__ = ["DataError", "DEFAULT_VOCAB", "Nodule", "ImageRecord", "read_image", "read_spacing", "image_size",
           "read_annotations", "write_annotations", "read_coco", "write_coco", "read_mask", "nodule_mask",
           "load_record", "crop_at", "NoduleCrops", "attribute_indices"]

# The attribute vocabulary (design §3). Held here as the default; every consumer takes a vocab argument,
# so adding a value means editing this dict (or passing a vocab JSON) and nothing else.
DEFAULT_VOCAB: dict[str, list[str]] = {
    "texture": ["solid", "part_solid", "ground_glass"],
    "margin": ["well_defined", "ill_defined", "spiculated"],
    "calcification": ["none", "calcified"],
}


@dataclass
class Nodule:
    box: tuple[float, float, float, float]  # xyxy, absolute pixels of the image as stored on disk
    attributes: dict[str, str] = field(default_factory=dict)  # attribute -> value; missing = unknown
    mask: Path | None = None  # nodule mask PNG (same size as the image), absolute path
    diameter_mm: float | None = None
    extra: dict[str, str] = field(default_factory=dict)  # extra CSV columns kept verbatim (e.g. subtlety, seed)


@dataclass
class ImageRecord:
    image: Path  # absolute path (the CSV stores it relative to its own folder)
    nodules: list[Nodule] = field(default_factory=list)  # empty = negative image
    spacing_mm: float | None = None  # isotropic pixel spacing if known
    frame: int | None = None  # slice index inside a 3-D MetaImage stack, else None

    def boxes(self) -> np.ndarray:
        return np.array([n.box for n in self.nodules], dtype=np.float32).reshape(-1, 4)  # (N, 4)


# ----------------------------------------------------------------------------------------------- images
def read_image(path: str | Path, frame: int | None = None) -> np.ndarray:
    """Read any supported image as float32 (H, W) in [0, 1], dense = bright.

    PNG/JPEG/TIFF integers are scaled by their dtype range (8-bit /255, 16-bit /65535) so intensities keep their
    meaning; colour is converted to luminance. DICOM, MetaImage (.mha/.mhd) and JSRT (.IMG) are recognised by
    content (DICOM preamble, MetaImage header) or extension and read by `formats.py`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    suffix = path.suffix.lower()
    if formats.is_dicom(path) or suffix in (".dcm", ".dicom"):
        return formats.read_dicom(path)[0]
    if formats.is_metaimage(path) or suffix in (".mha", ".mhd"):
        return formats.read_metaimage_image(path, frame=frame)[0]
    if suffix == ".img":
        return formats.read_jsrt(path)[0]
    return _read_pil(path)


def _open_pil(path: Path):
    """PIL.Image.open with its size checked from the header (nothing decoded yet); DataError when unreadable.

    PIL's own decompression-bomb check raises DecompressionBombError (not an OSError) above 2·MAX_IMAGE_PIXELS of
    its own and warns above; ours (MAX_IMAGE_PIXELS) is stricter, so the warning is silenced and the error caught.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pil = Image.open(path)
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: image header claims more than {MAX_IMAGE_PIXELS} pixels, the limit (corrupt, or a "
                        f"decompression bomb; PIL: {err})") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable image ({err})") from err
    try:
        check_image_size(pil.size[1], pil.size[0], path, min_side=1)
    except DataError:
        pil.close()
        raise
    return pil


def _read_pil(path: Path) -> np.ndarray:
    try:
        with _open_pil(path) as pil:
            pil.load()
            mode = pil.mode
            if mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr", "1"):
                pil = pil.convert("L")
                mode = "L"
            arr = np.asarray(pil)
    except DataError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: unreadable image ({err})") from err
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D grayscale or colour image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype in (np.uint16, np.int32, np.uint32) or mode.startswith("I"):
        if arr.min() < 0 or arr.max() > 65535:
            raise DataError(f"{path}: integer image outside the 16-bit range [{arr.min()}, {arr.max()}]")
        out = arr.astype(np.float32) / 65535.0
    else:  # float TIFF: keep values already in [0, 1], else min-max scale
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise DataError(f"{path}: image contains NaN or infinite values")
        if out.min() < 0 or out.max() > 1:
            span = float(out.max() - out.min())
            out = (out - out.min()) / span if span > 0 else np.zeros_like(out)
    return np.ascontiguousarray(out, dtype=np.float32)


def read_spacing(path: str | Path) -> float | None:
    """Pixel spacing in mm for formats that store it (DICOM, MetaImage, JSRT), else None."""
    return formats.read_spacing(Path(path))


def image_size(path: Path, frame: int | None = None) -> tuple[int, int]:
    """(H, W) of an image from its header where the format has one (PNG/JPEG/TIFF, DICOM, MetaImage, JSRT), else
    by reading it; DataError when it is outside check_image_size's limits."""
    path = Path(path)
    size_hw = formats.read_header(path)[0]
    if size_hw is None and path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        with _open_pil(path) as pil:
            size_hw = pil.size[1], pil.size[0]
    if size_hw is None:
        size_hw = read_image(path, frame).shape
    return check_image_size(*size_hw, path)


# ----------------------------------------------------------------------------------------------- annotation CSV
_BOX_COLUMNS = ["x0", "y0", "x1", "y1"]
_KNOWN_COLUMNS = ["image", *_BOX_COLUMNS, "mask", "diameter_mm", "spacing_mm", "frame"]


def _float_or_none(text: str, where: str, name: str) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: column '{name}' is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: column '{name}' is not finite: {text!r}")
    return value


def _parse_attributes(row: dict, vocab: dict[str, list[str]], where: str) -> dict[str, str]:
    attrs = {}
    for name, values in vocab.items():
        value = (row.get(name) or "").strip()
        if value in ("", "unknown"):
            continue
        if value not in values:
            raise DataError(f"{where}: unknown {name} value {value!r}; allowed: {', '.join(values)} (or empty)")
        attrs[name] = value
    return attrs


def read_annotations(csv_path: str | Path, vocab: dict[str, list[str]] = DEFAULT_VOCAB,
                     check_images: bool = True, require_spacing: bool = False) -> list[ImageRecord]:
    """Read the project's annotation CSV (design §3) into ImageRecords, validating every row.

    One row per nodule; a negative image has one row with empty box fields. Paths are relative to the CSV's folder.
    An empty spacing_mm column takes the spacing from the image header (DICOM PixelSpacing / ImagerPixelSpacing,
    MetaImage ElementSpacing, JSRT); `require_spacing` refuses an image that has none in either place.
    Raises a one-line DataError naming the file and row for: no rows, missing columns, non-numeric or NaN
    numbers, x1 <= x0 or y1 <= y0, boxes outside the image, spacing or diameter outside the physical ranges
    (checks.py), a diameter too big for its (clipped?) box, unknown attribute values, images outside the
    size limits, masks of another size, and images (or masks) that do not exist.
    """
    csv_path = Path(csv_path)
    root = csv_path.parent
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{csv_path}: unreadable annotation CSV ({err})") from err
    missing = [c for c in ["image", *_BOX_COLUMNS] if c not in header]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; header is {','.join(header)}")
    if not rows:
        raise DataError(f"{csv_path}: no rows after the header; write one row per nodule (a negative image: one "
                        f"row with empty box fields)")
    extra_columns = [c for c in header if c not in _KNOWN_COLUMNS and c not in vocab]
    records: dict[tuple[str, int | None], ImageRecord] = {}
    sizes: dict[tuple[str, int | None], tuple[int, int]] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path} row {line}"
        name = (row.get("image") or "").strip()
        if not name:
            raise DataError(f"{where}: empty 'image' column")
        frame_value = _float_or_none(row.get("frame", ""), where, "frame")
        if frame_value is not None and (frame_value < 0 or frame_value != int(frame_value)):
            raise DataError(f"{where}: frame {frame_value:g} must be a slice index 0, 1, 2, …")
        frame = None if frame_value is None else int(frame_value)
        key = (name, frame)
        spacing = _float_or_none(row.get("spacing_mm", ""), where, "spacing_mm")
        spacing = None if spacing is None else check_spacing(spacing, where, "fix the CSV column spacing_mm")
        if key not in records:
            image = (root / name).resolve()
            if check_images:
                if not image.is_file():
                    raise DataError(f"{where}: image {name!r} not found (looked for {image})")
                sizes[key] = _in_row(where, image_size, image, frame)
                if spacing is None and (header_spacing := _in_row(where, read_spacing, image)) is not None:
                    spacing = check_spacing(header_spacing, f"{where}: image {name!r} header")
            records[key] = ImageRecord(image=image, spacing_mm=spacing, frame=frame)
        elif spacing is not None and records[key].spacing_mm is None:
            records[key].spacing_mm = spacing
        elif spacing is not None and records[key].spacing_mm != spacing:
            raise DataError(f"{where}: spacing_mm {spacing:g} differs from {records[key].spacing_mm} given for the "
                            f"same image {name!r} before")
        coords = [_float_or_none(row.get(c, ""), where, c) for c in _BOX_COLUMNS]
        if all(c is None for c in coords):
            continue  # a negative image (or a row that only names the image)
        if any(c is None for c in coords):
            raise DataError(f"{where}: box columns x0,y0,x1,y1 must be all filled or all empty")
        x0, y0, x1, y1 = coords
        if x1 <= x0 or y1 <= y0:
            raise DataError(f"{where}: degenerate box ({x0}, {y0}, {x1}, {y1}): need x1 > x0 and y1 > y0")
        if check_images:
            h, w = sizes[key]
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                raise DataError(f"{where}: box ({x0}, {y0}, {x1}, {y1}) lies outside the {w}x{h} image {name!r}")
        diameter = _float_or_none(row.get("diameter_mm", ""), where, "diameter_mm")
        if diameter is not None:
            check_diameter(diameter, where)
            _check_box_fits_diameter((x0, y0, x1, y1), diameter, records[key].spacing_mm, where)
        mask = (row.get("mask") or "").strip()
        mask_path = (root / mask).resolve() if mask else None
        if check_images and mask_path is not None:
            if not mask_path.is_file():
                raise DataError(f"{where}: mask {mask!r} not found")
            if (mask_hw := _in_row(where, image_size, mask_path)) != sizes[key]:
                raise DataError(f"{where}: mask {mask!r} is {mask_hw[1]}x{mask_hw[0]} pixels but its image "
                                f"{name!r} is {sizes[key][1]}x{sizes[key][0]}")
        records[key].nodules.append(Nodule(
            box=(x0, y0, x1, y1), attributes=_parse_attributes(row, vocab, where), mask=mask_path,
            diameter_mm=diameter, extra={c: row[c] for c in extra_columns if row.get(c) not in (None, "")}))
    if require_spacing:
        for (name, _), record in records.items():
            if record.spacing_mm is None:
                raise DataError(f"{csv_path}: image {name!r} has no pixel spacing (empty spacing_mm column, none "
                                f"usable in its header); {SPACING_HOW}")
    return list(records.values())


def _in_row(where: str, read, *args):
    """read(*args), with a DataError about the file (unreadable, too small, …) prefixed by the CSV row naming it."""
    try:
        return read(*args)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


def _check_box_fits_diameter(box, diameter_mm: float, spacing_mm: float | None, where: str) -> None:
    """Refuse a diameter much larger than its box: the box was clipped (nodule at the image edge) or mislabelled.

    The tolerance (1.5 × the longer box side + 2 px) leaves room for oval and lobulated bodies and rounding.
    """
    if spacing_mm is None:
        return
    side = max(box[2] - box[0], box[3] - box[1])
    diameter_px = diameter_mm / spacing_mm
    if diameter_px > 1.5 * side + 2:
        raise DataError(f"{where}: diameter_mm {diameter_mm:g} is {diameter_px:.0f} px at {spacing_mm:g} mm/px but "
                        f"its box is only {side:.0f} px across (clipped at the image edge, or wrong spacing?)")


def _relative(path: Path | None, root: Path) -> str:
    if path is None:
        return ""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def write_annotations(csv_path: str | Path, records: list[ImageRecord],
                      vocab: dict[str, list[str]] = DEFAULT_VOCAB) -> Path:
    """Write records as the project's annotation CSV, atomically; paths become relative to the CSV's folder."""
    csv_path = Path(csv_path)
    root = csv_path.parent
    extra = sorted({k for r in records for n in r.nodules for k in n.extra})
    header = ["image", *_BOX_COLUMNS, *vocab, "mask", "diameter_mm", "spacing_mm", "frame", *extra]

    def fmt(value) -> str:
        return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))

    with atomic_path(csv_path) as tmp:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            for rec in records:
                common = {"image": _relative(rec.image, root), "spacing_mm": fmt(rec.spacing_mm),
                          "frame": fmt(rec.frame)}
                for nod in rec.nodules or [None]:
                    row = dict(common)
                    if nod is not None:
                        row.update({c: f"{v:.2f}" for c, v in zip(_BOX_COLUMNS, nod.box)})
                        row.update(nod.attributes)
                        row.update(mask=_relative(nod.mask, root), diameter_mm=fmt(nod.diameter_mm), **nod.extra)
                    writer.writerow([row.get(c, "") for c in header])
    return csv_path


# ----------------------------------------------------------------------------------------------- COCO JSON
def write_coco(json_path: str | Path, records: list[ImageRecord], sizes: list[tuple[int, int]]) -> Path:
    """COCO detection JSON (one category 'nodule'); bbox = [x, y, w, h]; attributes and extras per annotation.

    Extra CSV columns go under the annotation's "extra" key, so that a column named e.g. "id" cannot overwrite
    the COCO fields.
    """
    json_path = Path(json_path)
    images, annotations = [], []
    for image_id, (rec, (h, w)) in enumerate(zip(records, sizes), start=1):
        images.append({"id": image_id, "file_name": _relative(rec.image, json_path.parent), "width": int(w),
                       "height": int(h), "spacing_mm": rec.spacing_mm})
        for nod in rec.nodules:
            x0, y0, x1, y1 = (float(v) for v in nod.box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                                "attributes": nod.attributes, "diameter_mm": nod.diameter_mm,
                                "mask": _relative(nod.mask, json_path.parent) or None, "extra": nod.extra})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "nodule"}]}
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(coco, indent=1))
    return json_path


def read_coco(json_path: str | Path, vocab: dict[str, list[str]] = DEFAULT_VOCAB,
              require_spacing: bool = False) -> list[ImageRecord]:
    """Read COCO detection JSON (every category counts as nodule); validates boxes against width/height.

    An image without a "spacing_mm" field takes the spacing from its header (as read_annotations does);
    `require_spacing` refuses an image that has none in either place.
    """
    json_path = Path(json_path)
    try:
        coco = json.loads(json_path.read_text())
        images = {img["id"]: img for img in coco["images"]}
        annotations = coco.get("annotations", [])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{json_path}: not a COCO detection JSON ({err})") from err
    records = {}
    for image_id, img in images.items():
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DataError(f"{json_path}: image id {image_id} has no 'file_name'")
        path = (json_path.parent / img["file_name"]).resolve()
        if not path.is_file():
            raise DataError(f"{json_path}: image {img['file_name']!r} (id {image_id}) not found")
        where = f"{json_path} image id {image_id}"
        spacing = img.get("spacing_mm")
        if spacing is not None:
            spacing = check_spacing(spacing, where, "fix the image's spacing_mm field")
        elif (spacing := _in_row(where, read_spacing, path)) is not None:
            spacing = check_spacing(spacing, f"{where}: {img['file_name']!r} header")
        elif require_spacing:
            raise DataError(f"{where}: {img['file_name']!r} has no pixel spacing (no spacing_mm field, none usable "
                            f"in its header); give it as the image's spacing_mm field (mm per pixel)")
        records[image_id] = ImageRecord(image=path, spacing_mm=spacing)
    for ann in annotations:
        where = f"{json_path} annotation id {ann.get('id')}"
        img = images.get(ann.get("image_id"))
        if img is None:
            raise DataError(f"{where}: refers to unknown image_id {ann.get('image_id')}")
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{where}: bad bbox ({err})") from err
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise DataError(f"{where}: degenerate or non-finite bbox {ann['bbox']}")
        if x < 0 or y < 0 or x + w > img.get("width", math.inf) or y + h > img.get("height", math.inf):
            raise DataError(f"{where}: bbox {ann['bbox']} lies outside the "
                            f"{img.get('width')}x{img.get('height')} image")
        attrs = _parse_attributes(ann.get("attributes") or {}, vocab, where)
        diameter = ann.get("diameter_mm")
        if diameter is not None:
            check_diameter(diameter, where)
            _check_box_fits_diameter((x, y, x + w, y + h), diameter, records[ann["image_id"]].spacing_mm, where)
        extra = ann.get("extra") or {}
        if not isinstance(extra, dict):
            raise DataError(f"{where}: 'extra' must be an object of column -> value, got {extra!r}")
        mask = ann.get("mask")
        records[ann["image_id"]].nodules.append(Nodule(
            box=(x, y, x + w, y + h), attributes=attrs, diameter_mm=diameter,
            mask=(json_path.parent / mask).resolve() if mask else None,
            extra={str(k): str(v) for k, v in extra.items()}))
    return list(records.values())


# ----------------------------------------------------------------------------------------------- masks, resampling
def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A nodule or request mask file as bool (H, W) (> 0 = nodule); DataError when it has another size than its
    image (`shape`) or marks no pixel."""
    mask = read_image(path) > 0
    if mask.shape != tuple(shape):
        raise DataError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} pixels but its image is "
                        f"{shape[1]}x{shape[0]}")
    if not mask.any():
        raise DataError(f"{path}: mask is empty (no pixel > 0); draw the nodule, or give a box/diameter instead")
    return mask


def nodule_mask(nodule: Nodule, shape: tuple[int, int]) -> np.ndarray:
    """Bool (H, W) mask: the mask file when there is one (> 0 = nodule), else the ellipse inscribed in the box."""
    if nodule.mask is not None:
        return read_mask(nodule.mask, shape)
    x0, y0, x1, y1 = nodule.box
    mask = np.zeros(shape, dtype=bool)
    # Only the box's window is evaluated: a full-image grid per nodule costs gigabytes on a large radiograph.
    top, left = max(int(math.floor(y0)), 0), max(int(math.floor(x0)), 0)
    bottom, right = min(int(math.ceil(y1)), shape[0]), min(int(math.ceil(x1)), shape[1])
    ys, xs = np.mgrid[top:bottom, left:right] + 0.5  # pixel centres
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    mask[top:bottom, left:right] = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    return mask


def _resize(arr: np.ndarray, size_hw: tuple[int, int], resample) -> np.ndarray:
    pil = Image.fromarray(arr.astype(np.float32), mode="F")
    return np.asarray(pil.resize((size_hw[1], size_hw[0]), resample=resample), dtype=np.float32)


def load_record(record: ImageRecord, spacing_mm: float | None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Read an image and its nodules resampled to `spacing_mm` mm/pixel (None or unknown spacing: unchanged).

    Returns (image float32 (H', W') in [0, 1], boxes (N, 4) float32 xyxy in the new pixels, masks list of bool
    (H', W')), so that a nodule's size in mm means the same across datasets.
    """
    if spacing_mm is not None:
        check_spacing(spacing_mm, "working resolution", "choose --spacing_mm inside it")
    image = read_image(record.image, record.frame)
    check_image_size(*image.shape, record.image)
    masks = [nodule_mask(n, image.shape) for n in record.nodules]
    boxes = record.boxes()
    if spacing_mm is None or record.spacing_mm is None or abs(record.spacing_mm - spacing_mm) < 1e-6:
        return image, boxes, masks
    scale = check_spacing(record.spacing_mm, record.image) / spacing_mm  # new pixels per old pixel
    old_h, old_w = image.shape
    new_h, new_w = max(1, round(old_h * scale)), max(1, round(old_w * scale))
    check_image_size(new_h, new_w, f"{record.image} resampled from {record.spacing_mm:g} to {spacing_mm:g} mm/px")
    image = np.clip(_resize(image, (new_h, new_w), Image.BOX if scale < 1 else Image.BILINEAR), 0.0, 1.0)
    masks = [_resize(m.astype(np.float32), (new_h, new_w), Image.BILINEAR) >= 0.5 for m in masks]
    sx, sy = new_w / old_w, new_h / old_h
    boxes = boxes * np.array([sx, sy, sx, sy], dtype=np.float32)  # (N, 4)
    return image, boxes, masks


# ----------------------------------------------------------------------------------------------- crops
def attribute_indices(attributes: dict[str, str], vocab: dict[str, list[str]]) -> list[int]:
    """Attribute dict -> one index per vocabulary attribute (vocab order), -1 = unknown/null."""
    return [vocab[name].index(attributes[name]) if name in attributes else -1 for name in vocab]


def crop_at(image: np.ndarray, cx: float, cy: float, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The (size, size) window centred on (cx, cy), reflection-padded where it leaves the image.

    Returns (patch, (top, left)) where (top, left) is the window's corner in image pixels (may be negative), so
    that `image[top:top+size, left:left+size]` is the patch wherever the window lies inside the image.
    """
    top, left = int(round(cy - size / 2)), int(round(cx - size / 2))
    h, w = image.shape
    pad = max(0, -top, -left, top + size - h, left + size - w)
    if pad:
        # numpy's 'reflect' repeats the reflection when the pad is wider than the image, so one mode fits all.
        padded = np.pad(image, pad, mode="reflect")
        return padded[top + pad:top + pad + size, left + pad:left + pad + size].copy(), (top, left)
    return image[top:top + size, left:left + size].copy(), (top, left)


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Binary dilation of (B, 1, H, W) masks by a (2p+1)² square, via max-pooling."""
    if pixels <= 0:
        return mask
    return torch.nn.functional.max_pool2d(mask.float(), 2 * pixels + 1, stride=1, padding=pixels)


def surround_ring(mask: np.ndarray, inner: int = 1, outer: int = 3) -> np.ndarray:
    """Bool (H, W) ring of the pixels `inner` < d ≤ `outer` px (square distance) outside a (H, W) mask: the
    surround a nodule's density is compared with (synthesis.no_darker_than_surround, evaluation.density_check)."""
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]  # (1, 1, H, W)
    return ((dilate(m, outer) - dilate(m, inner))[0, 0] > 0.5).numpy()


# How far beyond the body the regenerated region reaches, in units of the nodule's equivalent radius R = √(area/π):
# margins draw there (spicules, a blurred border; the phantom's signatures reach ≤ phantom.REACH = 0.96·R).
REGION_REACH = 1.0
REGION_MIN_PX = 2


def _disk(radius: int) -> torch.Tensor:
    """(1, 1, 2r+1, 2r+1) float kernel of the pixels within Euclidean distance r of the centre."""
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius ** 2 + 0.25).float()[None, None]


def region_px(mask: torch.Tensor, reach: float = REGION_REACH, min_px: int = REGION_MIN_PX) -> torch.Tensor:
    """(B, 1, H, W) masks → (B,) int64 dilation radius ⌈reach·R⌉ px (≥ min_px), R = √(area/π) per mask."""
    radius = torch.sqrt(mask.float().flatten(1).sum(1) / math.pi)  # (B,) equivalent radius, px
    return torch.ceil(reach * radius).long().clamp(min=min_px)


def nodule_region(mask: torch.Tensor, reach: float = REGION_REACH, min_px: int = REGION_MIN_PX) -> torch.Tensor:
    """Where a model regenerates pixels: each (B, 1, H, W) mask dilated by a disk of radius region_px (design §3:
    the region holds what the attributes draw beyond the body, scaled with the nodule). Returns float {0, 1}."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    px = region_px(mask, reach, min_px)
    for p in px.unique().tolist():
        idx = torch.nonzero(px == p).flatten()
        out[idx] = (F.conv2d(mask[idx].float(), _disk(p).to(mask.device), padding=p) > 0).float()
    return out


class NoduleCrops(torch.utils.data.Dataset):
    """Nodule-centred crops for diffusion training, cached in memory.

    Each item is a dict:
        x0      (1, S, S) float32 in [-1, 1]   the real crop
        mask    (1, S, S) float32 {0, 1}       the nodule mask M (size and shape control)
        region  (1, S, S) float32 {0, 1}       nodule_region(M): where the model regenerates pixels
        context (1, S, S) float32 in [-1, 1]   x0·(1 − region): the surrounding anatomy the model must blend with
        attrs   (K,) int64                     value index per vocabulary attribute, -1 = unknown
    The context hides the whole region, not only M (design §3), so that what the margin draws beyond the body
    (spicules, a blurred border) is regenerated too; insertion replaces exactly the same region.
    Augmentation: horizontal/vertical flips and shifts of up to `max_shift` pixels (the cache keeps a margin).
    """

    def __init__(self, records: list[ImageRecord], vocab: dict[str, list[str]], crop_size: int = 32,
                 spacing_mm: float | None = 1.4, augment: bool = True, max_shift: int = 2, reach: float = REGION_REACH,
                 progress: bool = False):
        self.crop_size, self.augment, self.reach = crop_size, augment, reach
        self.max_shift = max_shift if augment else 0
        big = crop_size + 2 * self.max_shift
        patches, masks, attrs = [], [], []
        for rec in tqdm(records, desc="crops", disable=not progress, leave=False):
            if not rec.nodules:
                continue
            image, boxes, nodule_masks = load_record(rec, spacing_mm)
            for nod, box, mask in zip(rec.nodules, boxes, nodule_masks):
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                patches.append(crop_at(image, cx, cy, big)[0])
                masks.append(crop_at(mask.astype(np.float32), cx, cy, big)[0])
                attrs.append(attribute_indices(nod.attributes, vocab))
        if not patches:
            raise DataError("the dataset has no nodules to crop (every image is negative)")
        self.patches = torch.from_numpy(np.stack(patches)).unsqueeze(1) * 2 - 1  # (N, 1, S+2m, S+2m) in [-1, 1]
        self.masks = (torch.from_numpy(np.stack(masks)).unsqueeze(1) > 0.5).float()  # (N, 1, S+2m, S+2m)
        self.regions = nodule_region(self.masks, reach)  # (N, 1, S+2m, S+2m)
        self.attrs = torch.tensor(attrs, dtype=torch.int64).reshape(len(attrs), len(vocab))  # (N, K)

    def __len__(self) -> int:
        return len(self.patches)

    def get(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A batch for the given indices (augmented with `generator` when augment=True)."""
        n, s, m = len(indices), self.crop_size, self.max_shift
        if self.augment:
            shifts = torch.randint(0, 2 * m + 1, (n, 2), generator=generator)
            flips = torch.rand(n, 2, generator=generator) < 0.5
        else:
            shifts, flips = torch.full((n, 2), m), torch.zeros(n, 2, dtype=torch.bool)
        x0, mask, region = [], [], []
        for i, (dy, dx), (fh, fv) in zip(indices.tolist(), shifts.tolist(), flips.tolist()):
            dims = [d for d, f in ((-1, fh), (-2, fv)) if f]
            for src, out in ((self.patches, x0), (self.masks, mask), (self.regions, region)):
                crop = src[i, :, dy:dy + s, dx:dx + s]  # (1, S, S)
                out.append(crop.flip(dims) if dims else crop)
        x0, mask, region = torch.stack(x0), torch.stack(mask), torch.stack(region)  # (B, 1, S, S)
        return {"x0": x0, "mask": mask, "region": region, "context": x0 * (1 - region),
                "attrs": self.attrs[indices]}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get(torch.tensor([i])).items()}
