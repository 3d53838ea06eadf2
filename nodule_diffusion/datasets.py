"""Public CXR nodule datasets as they are distributed → `list[ImageRecord]` (behind the scripts' `--data` option).

Implements one loader per layout (notes/formats.md §1 describes each; docs/data.md shows the folder layouts):
    load_jsrt(root)     JSRT: `*.IMG` + CLNDAT_EN.txt (nodules) / CNNDAT_EN.TXT (non-nodules)  [JSRT]
    load_node21(root)   NODE21: metadata.csv (img_name, x, y, width, height, label) + images/*.mha  [NODE21]
    load_nih(root)      ChestX-ray14: BBox_List_2017.csv (+ Data_Entry_2017.csv for negatives, spacing)  [NIH]
    load_vindr(root)    VinDr-CXR: train.csv with one box per reader, DICOM images  [VinDr]
    load_csv, load_coco the project's own annotation CSV / COCO JSON (data.read_annotations / data.read_coco)
    DATA_FORMATS, parse_data_spec, load_data   "FORMAT:PATH" → (format, path) → loader

References:
    [JSRT]   Shiraishi et al., AJR 174:71 (2000); db.jsrt.or.jp (0.175 mm, 2048²; clinical data files).
    [NODE21] Sogancioglu et al., IEEE TMI 43(8):2839 (2024), arXiv:2401.02192; node21.grand-challenge.org.
    [NIH]    Wang et al., CVPR 2017, arXiv:1705.02315 (ChestX-ray8/14 CSV layouts).
    [VinDr]  Nguyen et al., Sci. Data 9:429 (2022), arXiv:2012.15029.

Conventions: boxes are xyxy in absolute pixels of the image as stored on disk; real datasets carry no
texture/margin/calcification labels, so `Nodule.attributes` stays empty (unknown) and dataset-specific labels
(JSRT subtlety, malignancy, …) go to `Nodule.extra` as strings. Malformed input raises DataError naming file and row.

Choices (documented where they are made):
    JSRT nodules whose size or position is "?" are skipped with a warning (no box can be drawn; calling the
      image negative would be wrong). Square box of side size_mm / 0.175 px centred on the given point.
    ChestX-ray14 negatives are "No Finding" images of Data_Entry_2017.csv that exist on disk (the dataset ships
      in 12 archives; users often hold a subset), in CSV order, at most `max_negatives`.
    VinDr: an image is negative when every reader's row says "No finding"; `merge="union"` fuses boxes of
      different readers with IoU > 0.4 by averaging their coordinates (a simple form of weighted box fusion).
"""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import torch
from PIL import Image

from nodule_diffusion import phantom
from nodule_diffusion.checks import check_image_size, check_spacing
from nodule_diffusion.common import DataError
from nodule_diffusion.data import ImageRecord, Nodule, image_size, read_annotations, read_coco
from nodule_diffusion.formats import JSRT_SIZE, JSRT_SPACING_MM, read_header

# ---------------------------------------- Shared helpers


def _read_csv_rows(path: Path) -> list[list[str]]:
    """All rows of a CSV file as lists of strings (BOM tolerated), or DataError."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [row for row in csv.reader(f)]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: unreadable CSV ({err})") from err


def _dict_rows(path: Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row dict) for a CSV read by column name; missing required columns → DataError."""
    rows = _read_csv_rows(path)
    if not rows:
        raise DataError(f"{path}: empty CSV")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; header is {','.join(header)}")
    return [(line, dict(zip(header, [v.strip() for v in row] + [""] * (len(header) - len(row)))))
            for line, row in enumerate(rows[1:], start=2) if any(v.strip() for v in row)]  # short rows padded


def _number(text: str, where: str, name: str) -> float:
    """float(text) or DataError naming the row and column (NaN/inf count as malformed)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {name} = {text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise DataError(f"{where}: {name} = {text!r} is not finite")
    return value


def _check_box(box, size_hw, where: str) -> tuple[float, float, float, float]:
    """Validate an xyxy box: positive extent and, when the image size is known, inside the image."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{where}: degenerate box ({x0}, {y0}, {x1}, {y1}); need x1 > x0 and y1 > y0")
    if size_hw is not None and (x0 < 0 or y0 < 0 or x1 > size_hw[1] or y1 > size_hw[0]):
        raise DataError(f"{where}: box ({x0}, {y0}, {x1}, {y1}) lies outside the "
                        f"{size_hw[1]}x{size_hw[0]} image")
    return float(x0), float(y0), float(x1), float(y1)


def _header(path: Path) -> tuple[tuple[int, int] | None, float | None]:
    """((H, W), spacing_mm) from the header (formats.read_header; PIL for the size of PNG/JPEG/TIFF), both checked:
    size within checks.check_image_size's limits, spacing (when present) within checks.SPACING_RANGE_MM."""
    size_hw, spacing = read_header(path)
    size_hw = image_size(path) if size_hw is None else check_image_size(*size_hw, path)
    if spacing is not None:
        spacing = check_spacing(spacing, f"{path} header", "fix the pixel spacing in the file's header")
    return size_hw, spacing


def _find_image(root: Path, name: str, folders: tuple[str, ...], suffixes: tuple[str, ...] = ("",)) -> Path | None:
    """First existing root/<folder>/<name><suffix>; None when absent."""
    for folder in folders:
        for suffix in suffixes:
            candidate = root / folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate.resolve()
    return None


# ---------------------------------------- JSRT

_JSRT_NAME = re.compile(r"JPC[LN]N\d{3}\.IMG", re.IGNORECASE)
# "l.upper lobe(S1+2)", "r.lower lobe (S6)": separates location from diagnosis when tabs were lost.
_JSRT_LOCATION = re.compile(r"^([lr]\.\s*\w+\s+lobe\s*(?:\([^)]*\))?)\s*(.*)$", re.IGNORECASE)


def _jsrt_records(path: Path) -> list[tuple[str, list[str], str]]:
    """Split a JSRT clinical text file into (filename, whitespace tokens, raw text after the name) per record.

    Decoded as latin-1, CR/CRLF normalised, records split at each `JPC[LN]N###.IMG` (some copies glue records
    together with CR-only line ends) [notes/formats.md §1].
    """
    try:
        text = path.read_bytes().decode("latin-1").replace("\r\n", "\n").replace("\r", "\n")
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err})") from err
    starts = list(_JSRT_NAME.finditer(text))
    if not starts:
        raise DataError(f"{path}: no JPC[LN]N###.IMG records found")
    records = []
    for match, nxt in zip(starts, starts[1:] + [None]):
        body = text[match.end(): nxt.start() if nxt else len(text)]
        records.append((match.group(0).upper(), body.split(), body))
    return records


def _jsrt_location_diagnosis(tokens: list[str], body: str) -> tuple[str, str]:
    """Split the free text after the 7 fixed fields into (location, diagnosis).

    Location has a recognisable form ("l.upper lobe(S1+2)"); else the tab-separated fields decide (location is
    the 8th field, the rest is diagnosis); else all of it is called location.
    """
    rest = " ".join(tokens[7:])
    if match := _JSRT_LOCATION.match(rest):
        return match.group(1).strip(), match.group(2)
    fields = [f.strip() for f in body.split("\t") if f.strip()]
    if len(fields) >= 9:
        return fields[7], " ".join(fields[8:])
    return rest, ""


def _jsrt_nodule(path: Path, name: str, tokens: list[str], body: str) -> Nodule | None:
    """One CLNDAT record → Nodule, or None when size/position is '?'.

    Fields after the filename: subtlety, size [mm], age, sex, x, y, malignancy, then location and diagnosis
    (free text, joined) [notes/formats.md §1].
    """
    where = f"{path} record {name}"
    if len(tokens) < 7:
        raise DataError(f"{where}: expected subtlety, size, age, sex, x, y, malignancy; got {tokens}")
    subtlety, size, _age, _sex, x, y, malignancy = tokens[:7]
    if "?" in (size, x, y):
        warnings.warn(f"{where}: size or position is '?'; nodule skipped", stacklevel=3)
        return None
    size_mm, cx, cy = (_number(v, where, k) for v, k in ((size, "size"), (x, "x"), (y, "y")))
    if size_mm <= 0 or not (0 <= cx < JSRT_SIZE and 0 <= cy < JSRT_SIZE):
        raise DataError(f"{where}: size {size_mm} mm at ({cx}, {cy}) is not a nodule inside the 2048² image")
    location, diagnosis = _jsrt_location_diagnosis(tokens, body)
    # Pixel (x, y) spans [x, x+1): its centre is x + 0.5. Square box of side size/0.175 px, clipped to the image.
    half = size_mm / JSRT_SPACING_MM / 2
    box = (max(cx + 0.5 - half, 0.0), max(cy + 0.5 - half, 0.0),
           min(cx + 0.5 + half, float(JSRT_SIZE)), min(cy + 0.5 + half, float(JSRT_SIZE)))
    extra = {"subtlety": subtlety, "malignancy": malignancy, "location": location, "diagnosis": diagnosis}
    return Nodule(box=box, diameter_mm=size_mm, extra={k: v for k, v in extra.items() if v and v != "?"})


def load_jsrt(root) -> list[ImageRecord]:
    """JSRT folder → ImageRecords: 154 nodule images (one nodule each) + 93 negatives, spacing 0.175 mm.

    Needs CLNDAT_EN.txt; negatives come from CNNDAT_EN.TXT, or from the JPCNN*.IMG files when it is absent.
    Images may sit anywhere under root (e.g. All247images/); every listed image must exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: JSRT folder not found")
    # Names compared upper-case: JSRT copies differ in case (CLNDAT_EN.txt / CNNDAT_EN.TXT, .IMG / .img).
    # Reverse-sorted so that, for a name found twice, the first path in sorted order wins.
    files = {p.name.upper(): p.resolve() for p in sorted(root.rglob("*"), reverse=True) if p.is_file()}
    images = {name: p for name, p in files.items() if name.endswith(".IMG")}
    nodule_file, negative_file = files.get("CLNDAT_EN.TXT"), files.get("CNNDAT_EN.TXT")
    if nodule_file is None:
        raise DataError(f"{root}: CLNDAT_EN.txt (JSRT nodule list) not found")
    records: dict[str, ImageRecord] = {}
    listed = [(nodule_file, r) for r in _jsrt_records(nodule_file)]
    if negative_file is not None:
        listed += [(negative_file, r) for r in _jsrt_records(negative_file)]
    else:
        listed += [(root, (n, [], "")) for n in sorted(images) if n.startswith("JPCNN")]
    for source, (name, tokens, body) in listed:
        if name not in images:
            raise DataError(f"{source} record {name}: image file {name} not found under {root}")
        record = records.setdefault(name, ImageRecord(image=images[name], spacing_mm=JSRT_SPACING_MM))
        if source == nodule_file:
            nodule = _jsrt_nodule(source, name, tokens, body)
            if nodule is None:
                del records[name]  # unknown position: neither a usable positive nor a negative
                continue
            record.nodules.append(nodule)
    return list(records.values())


# ---------------------------------------- NODE21


def load_node21(root) -> list[ImageRecord]:
    """NODE21 `metadata.csv` (path to it or its folder) → ImageRecords.

    Columns by name (order varies): img_name, x, y, width, height, label; (x, y) is the top-left corner, so
    box = (x, y, x + width, y + height); label 0 = image without nodule (coordinates ignored); several rows per
    image. Images in images/ or beside the CSV (".mha" appended when img_name has no suffix).
    """
    csv_path = Path(root)
    csv_path = csv_path if csv_path.is_file() else csv_path / "metadata.csv"
    records: dict[str, ImageRecord] = {}
    sizes: dict[str, tuple[int, int] | None] = {}
    for line, row in _dict_rows(csv_path, ["img_name", "x", "y", "width", "height", "label"]):
        where = f"{csv_path} row {line}"
        name = row["img_name"]
        if name not in records:
            image = _find_image(csv_path.parent, name, ("images", "."), ("",) if Path(name).suffix else (".mha",))
            if image is None:
                raise DataError(f"{where}: image {name!r} not found in {csv_path.parent}/images or beside the CSV")
            sizes[name], spacing = _header(image)
            records[name] = ImageRecord(image=image, spacing_mm=spacing)
        label = _number(row["label"], where, "label")
        if label not in (0, 1):
            raise DataError(f"{where}: label {row['label']!r} must be 0 (no nodule) or 1 (nodule)")
        if label == 1:
            x, y, w, h = (_number(row[k], where, k) for k in ("x", "y", "width", "height"))
            records[name].nodules.append(Nodule(box=_check_box((x, y, x + w, y + h), sizes[name], where)))
    return list(records.values())


# ---------------------------------------- ChestX-ray14 (NIH)

NIH_PNG_WIDTH = 1024  # every ChestX-ray14 PNG is 1024×1024 [NIH]


def _nih_data_entry(path: Path) -> list[tuple[int, list[str]]]:
    """Data_Entry_2017.csv rows by position: 0 Image Index, 1 Finding Labels, 7/8 original width/height,
    9/10 original pixel spacing x/y (the bracketed header names split into two columns each) [notes/formats.md §1]."""
    rows = _read_csv_rows(path)
    return [(line, [v.strip() for v in row]) for line, row in enumerate(rows[1:], start=2) if any(row)]


def load_nih(root, classes=("Nodule",), data_entry: bool = True,
             max_negatives: int | None = 1000) -> list[ImageRecord]:
    """ChestX-ray14 folder → ImageRecords: images with a box of `classes` + "No Finding" negatives.

    BBox_List_2017.csv is read by position (Image Index, Finding Label, x, y, w, h; its header is
    `Image Index,Finding Label,Bbox [x,y,w,h],,,`); (x, y) is the top-left corner in the 1024² PNG. With
    `data_entry`, Data_Entry_2017.csv adds negatives (see module docstring; None = all) and the PNG spacing
    OriginalImagePixelSpacing[x] × OriginalImage[Width] / 1024 (assumes an isotropic resize); else spacing None.
    Images under images/ or root.
    """
    classes = (classes,) if isinstance(classes, str) else tuple(classes)
    root = Path(root)
    bbox_path = root / "BBox_List_2017.csv"
    spacing: dict[str, float] = {}
    entries = _nih_data_entry(root / "Data_Entry_2017.csv") if data_entry else []
    for line, row in entries:
        where = f"{root / 'Data_Entry_2017.csv'} row {line}"
        if len(row) < 10:
            raise DataError(f"{where}: expected at least 10 columns, got {len(row)}")
        spacing[row[0]] = check_spacing(_number(row[9], where, "OriginalImagePixelSpacing[x") * _number(
            row[7], where, "OriginalImage[Width") / NIH_PNG_WIDTH, where, "fix OriginalImagePixelSpacing[x / "
            "OriginalImage[Width")
    records: dict[str, ImageRecord] = {}
    sizes: dict[str, tuple[int, int] | None] = {}
    for line, row in enumerate(_read_csv_rows(bbox_path)[1:], start=2):
        where = f"{bbox_path} row {line}"
        if not any(v.strip() for v in row):
            continue
        if len(row) < 6:
            raise DataError(f"{where}: expected Image Index, Finding Label, x, y, w, h; got {row}")
        name, label = row[0].strip(), row[1].strip()
        if label not in classes:
            continue
        x, y, w, h = (_number(v, where, k) for v, k in zip(row[2:6], ("x", "y", "w", "h")))
        if name not in records:
            image = _find_image(root, name, ("images", "."))
            if image is None:
                raise DataError(f"{where}: image {name!r} not found in {root}/images or {root}")
            records[name] = ImageRecord(image=image, spacing_mm=spacing.get(name))
            sizes[name] = _header(image)[0]
        records[name].nodules.append(Nodule(box=_check_box((x, y, x + w, y + h), sizes[name], where),
                                            extra={"finding": label}))
    negatives = []
    for name in (row[0] for _, row in entries if row[1] == "No Finding" and row[0] not in records):
        if max_negatives is not None and len(negatives) >= max_negatives:
            break
        image = _find_image(root, name, ("images", "."))
        if image is not None:  # only the negatives the user holds (module docstring)
            negatives.append(ImageRecord(image=image, spacing_mm=spacing.get(name)))
    return list(records.values()) + negatives


# ---------------------------------------- VinDr-CXR

VINDR_MERGE_IOU = 0.4  # boxes of different readers with IoU above this are one finding (module docstring)


def _iou(a, b) -> float:
    """Intersection over union of two xyxy boxes (0 for disjoint boxes)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _union_boxes(boxes: list[tuple[tuple[float, ...], str]]) -> list[tuple[tuple[float, ...], list[str]]]:
    """Greedy fusion of (box, reader) pairs in CSV order → (mean box, readers).

    A box joins the first cluster whose current mean box overlaps it with IoU > 0.4 and that has no box from
    the same reader yet (one reader's two boxes are two findings); otherwise it starts a new cluster.
    """
    clusters: list[tuple[list[tuple[float, ...]], list[str]]] = []
    for box, reader in boxes:
        for members, readers in clusters:
            mean = tuple(sum(c) / len(members) for c in zip(*members))
            if reader not in readers and _iou(mean, box) > VINDR_MERGE_IOU:
                members.append(box)
                readers.append(reader)
                break
        else:
            clusters.append(([box], [reader]))
    return [(tuple(sum(c) / len(members) for c in zip(*members)), readers) for members, readers in clusters]


def _vindr_csv(root: Path) -> Path:
    """The annotation CSV: root itself, root/train.csv (Kaggle) or root/annotations/annotations_train.csv."""
    for candidate in (root, root / "train.csv", root / "annotations" / "annotations_train.csv"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root}: no VinDr CSV (train.csv or annotations/annotations_train.csv) found")


def load_vindr(root, classes=("Nodule/Mass",), merge: str = "union") -> list[ImageRecord]:
    """VinDr-CXR → ImageRecords of images with a box of `classes` (positives) or only "No finding" rows.

    CSV columns by name: image_id, class_name, rad_id, x_min, y_min, x_max, y_max (class_id ignored), boxes in
    original DICOM pixels, one row per reader and finding. merge="keep" keeps every reader's box (extra rad_id);
    "union" fuses them (`_union_boxes`; extra readers = "R8;R10"). Images <image_id>.dicom or .dcm under train/
    or beside the CSV; size and spacing come from each DICOM header.
    """
    if merge not in ("union", "keep"):
        raise DataError(f"load_vindr: merge must be 'union' or 'keep', got {merge!r}")
    classes = (classes,) if isinstance(classes, str) else tuple(classes)
    csv_path = _vindr_csv(Path(root))
    folder = Path(root) if Path(root).is_dir() else csv_path.parent
    boxes: dict[str, list[tuple[tuple[float, ...], str, str, str]]] = {}
    no_finding: dict[str, bool] = {}  # image_id → every row so far says "No finding" (CSV order kept)
    first_row: dict[str, str] = {}
    for line, row in _dict_rows(csv_path, ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"]):
        where = f"{csv_path} row {line}"
        image_id, class_name = row["image_id"], row["class_name"]
        first_row.setdefault(image_id, where)
        no_finding[image_id] = no_finding.get(image_id, True) and class_name.lower() == "no finding"
        if class_name in classes:
            box = tuple(_number(row[k], where, k) for k in ("x_min", "y_min", "x_max", "y_max"))
            reader = row.get("rad_id") or f"row {line}"  # no reader id: any two boxes may be fused
            boxes.setdefault(image_id, []).append((box, reader, class_name, where))
    records = []
    for image_id in [i for i in no_finding if i in boxes or no_finding[i]]:
        image = _find_image(folder, image_id, ("train", "."), (".dicom", ".dcm"))
        if image is None:
            raise DataError(f"{first_row[image_id]}: image {image_id}.dicom/.dcm not found in {folder}/train "
                            f"or {folder}")
        size_hw, spacing = _header(image)
        record = ImageRecord(image=image, spacing_mm=spacing)
        found = boxes.get(image_id, [])
        for box, reader, class_name, where in found:
            _check_box(box, size_hw, where)
        if merge == "keep":
            record.nodules = [Nodule(box=b, extra={"rad_id": r, "finding": c}) for b, r, c, _ in found]
        else:  # fuse per class: a nodule and, say, a calcification are different findings
            for name in dict.fromkeys(c for _, _, c, _ in found):
                fused = _union_boxes([(b, r) for b, r, c, _ in found if c == name])
                record.nodules += [Nodule(box=b, extra={"readers": ";".join(r), "finding": name}) for b, r in fused]
        records.append(record)
    return records


# ---------------------------------------- Project formats and the --data option


def load_csv(path, vocab) -> list[ImageRecord]:
    """The project's annotation CSV (design §3) → `data.read_annotations`; every image needs a pixel spacing (CSV
    column spacing_mm, else its header), since sizes in mm and the resampling to --spacing_mm depend on it."""
    return read_annotations(path, vocab, require_spacing=True)


def load_coco(path, vocab) -> list[ImageRecord]:
    """COCO detection JSON → `data.read_coco`; every image needs a pixel spacing, as for load_csv."""
    return read_coco(path, vocab, require_spacing=True)


# --data FORMAT:PATH → loader. "phantom" is generated on the fly by phantom.make_dataset (wired by the scripts).
DATA_FORMATS = {
    "phantom": None,
    "csv": load_csv,
    "coco": load_coco,
    "jsrt": load_jsrt,
    "node21": load_node21,
    "nih": load_nih,
    "vindr": load_vindr,
}


def parse_data_spec(spec: str) -> tuple[str, Path | None]:
    """"phantom" → ("phantom", None); "FORMAT:PATH" → (format, Path). Unknown format or no path → DataError."""
    fmt, _, path = str(spec).partition(":")
    fmt = fmt.strip().lower()
    if fmt not in DATA_FORMATS:
        raise DataError(f"--data {spec!r}: unknown format {fmt!r}; use 'phantom' or FORMAT:PATH with FORMAT one "
                        f"of {', '.join(f for f in DATA_FORMATS if f != 'phantom')}")
    if fmt == "phantom":
        return "phantom", Path(path) if path.strip() else None
    if not path.strip():
        raise DataError(f"--data {spec!r}: missing path; write {fmt}:/path/to/data")
    return fmt, Path(path.strip()).expanduser()


def load_data(fmt: str, path, vocab) -> list[ImageRecord]:
    """Records for a parsed non-phantom spec (`parse_data_spec`); csv/coco get the vocabulary, the public
    datasets carry no attribute labels. "phantom" is generated by the caller (phantom.make_dataset)."""
    if DATA_FORMATS.get(fmt) is None:
        known = ", ".join(f for f, loader in DATA_FORMATS.items() if loader is not None)
        raise DataError(f"--data {fmt}: no loader here; use one of {known}")
    if not Path(path).exists():
        raise DataError(f"--data {fmt}:{path}: {path} does not exist")
    return DATA_FORMATS[fmt](path, vocab) if fmt in ("csv", "coco") else DATA_FORMATS[fmt](path)


def load_records(spec: str, cache_dir: Path, n_images: int, seed: int, vocab: dict) -> list:
    """Records for a `--data` spec: "phantom" (generated once into cache_dir, seeded) or "FORMAT:PATH".

    Under DDP only rank 0 generates the phantom; the other ranks wait at a barrier and then read it.
    """
    fmt, path = parse_data_spec(spec)
    if fmt == "phantom":
        folder = Path(cache_dir) / f"phantom_seed{seed}_n{n_images}"
        csv_path = folder / "annotations.csv"
        distributed = torch.distributed.is_initialized()
        if not csv_path.is_file() and (not distributed or torch.distributed.get_rank() == 0):
            phantom.make_dataset(folder, n_images, seed, vocab=vocab)
        if distributed:
            torch.distributed.barrier()
        return read_annotations(csv_path, vocab)
    return load_data(fmt, path, vocab)
