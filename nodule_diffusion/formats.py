"""Medical image file formats: DICOM, MetaImage (.mha/.mhd) and JSRT raw, read and written with numpy.

Implements, one file at a time (`data.read_image` dispatches here by content signature, else by extension):
    is_dicom, is_metaimage          cheap content sniffing (DICOM "DICM" at byte 128; MetaImage `Key = Value`)
    read_dicom_dataset, read_dicom  pydicom 3: stored → modality LUT → first VOI LUT/window → MONOCHROME1
                                    inversion → min-max [0, 1] [DICOM PS3.4 N.2]; steps 2-3 and 4-5 are
                                    dicom_voi_values / dicom_scale01, which derived.py inverts (derived
                                    images of every format are written by derived.py)
    read_metaimage(_image), read_volume, write_metaimage   numpy + zlib MetaImage: LOCAL (.mha) or raw file
                                    (.mhd), raw or zlib CompressedData, both byte orders [MetaIO]
    read_jsrt                       JSRT 2048×2048 big-endian 12-bit raw, 0.175 mm [JSRT]
    read_header, read_spacing       (H, W) and isotropic spacing in mm from a header, None where unknown

References (facts collected in notes/formats.md §1–2):
    [DICOM]  NEMA PS3.3 (C.7.6.1.1 General Image, C.8.11 DX) and PS3.4 (N.2 grayscale pipeline).
    [MetaIO] Kitware/MetaIO `metaTypes.h` (element types; MET_LONG is 4 bytes) and `metaUtils.cxx`
             (inflateInit2(…, 47): zlib or gzip wrapper).
    [JSRT]   Shiraishi et al., AJR 174:71 (2000); db.jsrt.or.jp: 2048×2048, 0.175 mm, 12 bit, no header.

Conventions: images are float32 (H, W) in [0, 1] with dense = bright (design §3); every problem caused by a
file raises `DataError` naming the file.

Deviations and choices:
    DEVIATION: PresentationLUTShape is ignored; polarity comes from PhotometricInterpretation alone, because
      DX requires INVERSE together with MONOCHROME1, so honouring both would invert twice.
    DEVIATION: anisotropic pixels (row ≠ column spacing) report the mean as `spacing_mm` (CXR pixels are square
      in practice); the pair is kept in `meta["pixel_spacing_rc_mm"]`.
    MetaImage `ElementDataFile = LIST` / printf patterns, ASCII data and multi-channel images are rejected.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np

from nodule_diffusion.common import DataError, atomic_path  # DataError is public as nodule_diffusion.data.DataError
from nodule_diffusion.checks import check_image_size  # size limits (checks.py), checked from headers before decoding

# Image sizes are checked from the header before any pixel is decoded (checks.check_image_size per slice; this for
# a whole MetaImage stack, 512×512×1024), so a corrupt header or a decompression bomb cannot exhaust memory.
MAX_VOLUME_ELEMENTS = 2 ** 28

# ---------------------------------------- Sniffing

# Keys that can open a MetaImage header [MetaIO metaObject.cxx writes ObjectType first; hand-written ones vary].
_METAIMAGE_FIRST_KEYS = {"objecttype", "objectsubtype", "ndims", "comment", "name", "id", "dimsize", "binarydata"}


def _head(path, n: int) -> bytes:
    """The first n bytes of a file; b"" when it cannot be opened (the reader then reports the problem)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def is_dicom(path) -> bool:
    """True when bytes 128..131 are b"DICM" (DICOM Part 10 preamble)."""
    return _head(path, 132)[128:132] == b"DICM"


def is_metaimage(path) -> bool:
    """True when the file opens with a MetaImage `Key = Value` line with a known first key (ObjectType, NDims…)."""
    match = re.match(rb"[ \t\r\n]*([A-Za-z][A-Za-z0-9_]*)[ \t]*=", _head(path, 256))
    return bool(match) and match.group(1).decode("ascii").lower() in _METAIMAGE_FIRST_KEYS


def _minmax01(path, values: np.ndarray) -> np.ndarray:
    """Min-max scale to float32 [0, 1]; a constant image gives zeros (not NaN); NaN/inf pixels → DataError."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise DataError(f"{path}: pixel data contains NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


# ---------------------------------------- DICOM (pydicom 3)


def read_dicom_dataset(path, stop_before_pixels: bool = False):
    """Read a DICOM file with pydicom → `pydicom.Dataset`; files without the 128-byte preamble are accepted.

    Any pydicom failure (InvalidDicomError, EOFError, struct.error, KeyError, …: pydicom raises many types for
    malformed files) becomes a DataError naming the file.
    """
    import pydicom

    try:
        try:
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        except pydicom.errors.InvalidDicomError:
            # Old ACR-NEMA-style files lack the preamble and "DICM"; force=True parses them from byte 0.
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
            if not any(tag.group in (0x0008, 0x0010, 0x0020, 0x0028) for tag in ds.keys()):
                raise DataError(f"{path}: not a DICOM file (no 'DICM' marker at byte 128, no DICOM elements)")
            return ds
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as err:  # noqa: BLE001 - see docstring
        raise DataError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})") from err


def _dicom_spacing(ds) -> tuple[float, float] | None:
    """(row, column) spacing in mm: PixelSpacing, else ImagerPixelSpacing, else NominalScannedPixelSpacing.

    PixelSpacing is in the patient plane; ImagerPixelSpacing at the detector (not magnification-corrected), so
    it is only the fallback [DICOM C.8.11.4, notes/formats.md §2]. Zero or malformed values count as missing.
    """
    from pydicom.multival import MultiValue

    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            pair = [float(v) for v in (value if isinstance(value, MultiValue) else [value])]
        except (TypeError, ValueError):
            continue
        if len(pair) == 1:
            pair = pair * 2
        if len(pair) == 2 and all(np.isfinite(pair)) and min(pair) > 0:
            return pair[0], pair[1]
    return None


def _dicom_meta(ds) -> dict:
    """The header fields the pipeline uses (spacing, polarity, identity)."""
    spacing = _dicom_spacing(ds)
    file_meta = getattr(ds, "file_meta", None) or {}
    keywords = {"photometric": "PhotometricInterpretation", "modality": "Modality", "sop_class_uid": "SOPClassUID",
                "sop_instance_uid": "SOPInstanceUID", "study_instance_uid": "StudyInstanceUID",
                "series_instance_uid": "SeriesInstanceUID"}
    return {"spacing_mm": None if spacing is None else (spacing[0] + spacing[1]) / 2, "pixel_spacing_rc_mm": spacing,
            "transfer_syntax": str(file_meta.get("TransferSyntaxUID") or ""),
            **{key: str(ds.get(keyword) or "") for key, keyword in keywords.items()}}


def _dicom_stored_values(path, ds) -> np.ndarray:
    """Decode the stored pixel values of a single-frame greyscale dataset, (H, W), or raise DataError."""
    if not any(keyword in ds for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{path}: no pixel data (not an image DICOM: SOP class {ds.get('SOPClassUID', '?')})")
    frames = ds.get("NumberOfFrames") or 1
    if int(frames) > 1:
        raise DataError(f"{path}: multi-frame DICOM ({int(frames)} frames); save the frame you want on its own")
    check_image_size(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0), path, min_side=1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if not photometric:
        raise DataError(f"{path}: PhotometricInterpretation is missing, so polarity is unknown")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{path}: colour/palette DICOM (PhotometricInterpretation {photometric or '?'}, "
                        f"SamplesPerPixel {samples}); only greyscale MONOCHROME1/2 radiographs are supported")
    try:
        stored = ds.pixel_array
    except RuntimeError as err:
        # pydicom 3 raises RuntimeError when no installed plugin can decode a compressed transfer syntax;
        # its message lists what each plugin needs (notes/formats.md §2).
        syntax = ds.file_meta.get("TransferSyntaxUID", "?")
        raise DataError(
            f"{path}: cannot decode pixel data in transfer syntax '{getattr(syntax, 'name', syntax)}' ({syntax}). "
            f"Install a decoder (e.g. `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` or "
            f"`pip install python-gdcm`, or pyjpegls for JPEG-LS). pydicom said: {err}") from err
    except Exception as err:  # noqa: BLE001 - truncated data, inconsistent tags, bad encapsulation, …
        raise DataError(f"{path}: cannot decode pixel data ({type(err).__name__}: {err})") from err
    if stored.ndim != 2:
        raise DataError(f"{path}: pixel data has shape {stored.shape}; expected a 2-D (rows, columns) image")
    return stored


def read_dicom(path) -> tuple[np.ndarray, dict]:
    """Read a greyscale DICOM radiograph → (float32 (H, W) in [0, 1], dense = bright; meta dict).

    Steps follow the PS3.4 grayscale pipeline [DICOM PS3.4 N.2]:
        1. stored values (pydicom masks unused high bits and sign-extends)
        2. modality LUT: RescaleSlope/Intercept or ModalityLUTSequence
        3. VOI: VOILUTSequence or WindowCenter/Width (first of several, index=0); none present → identity
        4. MONOCHROME1 (minimum shown white): invert AFTER VOI, out = max + min − out, since the window centre
           is given in pre-inversion values (cornerstone3D PR #2215 fixed the reverse order)
        5. min-max to [0, 1] per image (constant image → zeros)
    meta: spacing_mm (float or None), pixel_spacing_rc_mm, photometric, modality, SOP class/instance, study and
    series UIDs, transfer_syntax.
    """
    ds = read_dicom_dataset(path)
    try:
        stored = _dicom_stored_values(path, ds)  # step 1
        meta = _dicom_meta(ds)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom decodes header values lazily (see dicom_voi_values)
        raise DataError(f"{path}: malformed DICOM header ({type(err).__name__}: {err})") from err
    values = dicom_voi_values(path, ds, stored)  # steps 2-3
    return dicom_scale01(path, values, meta["photometric"], values.min(), values.max()), meta  # steps 4-5


def dicom_voi_values(path, ds, stored: np.ndarray) -> np.ndarray:
    """Steps 2-3 of `read_dicom`: modality LUT, then the first VOI LUT/window → float64, same shape as `stored`.

    Element-wise, so `derived.py` maps every possible stored value through it to invert the reader exactly.
    pydicom's windowing rewrites RescaleSlope/Intercept as floats in `ds`: pass a dataset you will not save.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        values = apply_modality_lut(stored, ds)  # step 2
        return np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)  # step 3
    except Exception as err:  # noqa: BLE001 - pydicom decodes header values lazily; bad VRs, WindowWidth < 1,
        # malformed LUT descriptors etc. surface here with assorted exception types
        raise DataError(f"{path}: malformed DICOM header or LUT ({type(err).__name__}: {err})") from err


def dicom_scale01(path, values: np.ndarray, photometric: str, lo: float, hi: float) -> np.ndarray:
    """Steps 4-5 of `read_dicom`: MONOCHROME1 inversion and min-max, given the image's VOI extremes (lo, hi).

    MONOCHROME2: (v − lo)/(hi − lo); MONOCHROME1: (hi − v)/(hi − lo), the same as inverting (max + min − v)
    and then min-max scaling. A constant image (hi = lo) gives zeros. → float32 of the shape of `values`.
    """
    if not np.isfinite(values).all():
        raise DataError(f"{path}: pixel data contains NaN or infinite values")
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    dense = hi - values if photometric.strip() == "MONOCHROME1" else values - lo  # step 4: dense = bright
    return (dense / (hi - lo)).astype(np.float32)  # step 5


# ---------------------------------------- MetaImage (.mha / .mhd + raw)

# [MetaIO metaTypes.h]: MET_LONG / MET_ULONG are 4 bytes (metaimageio's int64 mapping disagrees with MetaIO).
_MET_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
              "MET_UINT": "u4", "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8",
              "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def _read_metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """Parse `Key = Value` lines up to ElementDataFile → (header with lower-case keys, byte offset after it)."""
    header: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            for _ in range(200):  # a header never has more keys; stops us reading a binary file line by line
                line = f.readline(4096)
                if not line:
                    break
                text = line.decode("latin-1").strip()
                if not text:
                    continue
                key, sep, value = text.partition("=")
                if not sep or not key.strip():
                    raise DataError(f"{path}: bad MetaImage header line {text[:60]!r} (expected 'Key = Value')")
                header[key.strip().lower()] = value.strip()
                if key.strip().lower() == "elementdatafile":
                    return header, f.tell()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    raise DataError(f"{path}: MetaImage header has no ElementDataFile line")


def _header_ints(path, header, name, default=None) -> list[int]:
    """Whitespace-separated integers of the header key `name` (DataError if malformed, or missing without default)."""
    if name.lower() not in header:
        if default is None:
            raise DataError(f"{path}: MetaImage header lacks {name}")
        return default
    try:
        return [int(v) for v in header[name.lower()].split()]
    except ValueError:
        raise DataError(f"{path}: MetaImage {name} = {header[name.lower()]!r} is not a list of integers") from None


def _parse_metaimage_header(path: Path, header: dict[str, str]) -> tuple[tuple[int, ...], np.dtype, dict]:
    """Validate the header → (numpy shape (Z, H, W) or (H, W), dtype with byte order, meta)."""
    if header.get("objecttype", "Image").lower() != "image":
        raise DataError(f"{path}: MetaImage ObjectType {header['objecttype']!r} is not Image")
    dims = _header_ints(path, header, "DimSize")
    ndims = _header_ints(path, header, "NDims", [len(dims)])[0]
    if len(dims) != ndims or ndims not in (2, 3) or min(dims) < 1:
        raise DataError(f"{path}: MetaImage NDims {ndims} / DimSize {dims}: need 2 or 3 positive sizes")
    check_image_size(dims[1], dims[0], path, min_side=1)  # one slice: DimSize is x, y[, z]
    if int(np.prod(dims, dtype=np.int64)) > MAX_VOLUME_ELEMENTS:
        raise DataError(f"{path}: MetaImage DimSize {dims} holds more than {MAX_VOLUME_ELEMENTS} elements")
    if _header_ints(path, header, "ElementNumberOfChannels", [1])[0] != 1:
        raise DataError(f"{path}: MetaImage with ElementNumberOfChannels > 1 (colour/vector) is not supported")
    if header.get("binarydata", "True").lower() != "true":
        raise DataError(f"{path}: ASCII MetaImage data (BinaryData = False) is not supported")
    element_type = header.get("elementtype", "").upper()
    if element_type not in _MET_TYPES:
        raise DataError(f"{path}: unknown MetaImage ElementType {element_type!r}; known: {sorted(_MET_TYPES)}")
    big_endian = any(header.get(k, "False").lower() == "true"
                     for k in ("binarydatabyteordermsb", "elementbyteordermsb"))
    dtype = np.dtype(_MET_TYPES[element_type]).newbyteorder(">" if big_endian else "<")
    try:
        spacing = tuple(float(v) for v in header.get("elementspacing", "").split()) or None
    except ValueError:
        raise DataError(f"{path}: MetaImage ElementSpacing {header['elementspacing']!r} is not numeric") from None
    if spacing is not None and (len(spacing) != ndims or not all(np.isfinite(spacing)) or min(spacing) <= 0):
        raise DataError(f"{path}: MetaImage ElementSpacing {spacing} does not give {ndims} positive values")
    meta = {
        "spacing": spacing,  # (x, y[, z]) in mm, MetaIO order
        "spacing_mm": None if spacing is None else (spacing[0] + spacing[1]) / 2,  # in-plane, see DEVIATION
        "dim_size": tuple(dims), "element_type": element_type, "big_endian": big_endian,
        "compressed": header.get("compresseddata", "False").lower() == "true",
        "element_data_file": header["elementdatafile"],
    }
    return tuple(reversed(dims)), dtype, meta  # DimSize is x, y[, z] → numpy (z,) y, x


def metaimage_data_span(path: Path, header: dict[str, str], offset: int, nbytes: int,
                        compressed: bool) -> tuple[Path, int, int]:
    """Where the pixel bytes lie → (data file, start, stop): after the header (LOCAL) or in ElementDataFile.

    `offset` is the byte after the header's ElementDataFile line; `nbytes` the uncompressed pixel byte count.
    """
    data_file = header["elementdatafile"]
    if data_file.upper() == "LOCAL":
        data_path = path
    elif data_file.upper().startswith("LIST") or "%" in data_file:
        raise DataError(f"{path}: ElementDataFile {data_file!r} (slice lists/patterns) is not supported")
    else:
        data_path, offset = path.parent / data_file, 0
        if not data_path.is_file():
            raise DataError(f"{path}: data file {data_path} named by ElementDataFile is missing")
    skip = _header_ints(path, header, "HeaderSize", [0])[0]
    size = data_path.stat().st_size
    # HeaderSize = -1: the data are the last bytes of the file [MetaIO]; else skip that many bytes.
    start = max(size - nbytes if skip == -1 and not compressed else offset + max(skip, 0), 0)
    n_compressed = _header_ints(path, header, "CompressedDataSize", [-1])[0] if compressed else -1
    return data_path, start, size if n_compressed < 0 else min(start + n_compressed, size)


def _read_metaimage_bytes(path: Path, header: dict[str, str], offset: int, nbytes: int, compressed: bool) -> bytes:
    """The (inflated) pixel bytes, read from `metaimage_data_span`."""
    data_path, start, stop = metaimage_data_span(path, header, offset, nbytes, compressed)
    with open(data_path, "rb") as f:
        f.seek(start)
        buf = f.read(stop - start)
    if compressed:
        try:
            # 47 = 32 + 15: zlib or gzip wrapper [MetaIO metaUtils.cxx]; inflating stops one byte past the expected
            # size, so a zlib bomb cannot fill the memory (the length check below reports it).
            buf = zlib.decompressobj(47).decompress(buf, nbytes + 1)
        except zlib.error as err:
            raise DataError(f"{path}: corrupt zlib CompressedData in {data_path.name} ({err})") from None
    if len(buf) != nbytes:
        raise DataError(f"{path}: pixel data has {len(buf)} bytes, DimSize × ElementType needs {nbytes}")
    return buf


def read_metaimage(path) -> tuple[np.ndarray, dict]:
    """Read a MetaImage → (raw numeric array (Z, H, W) or (H, W) in its stored dtype, native byte order; meta).

    meta: spacing (x, y[, z]) mm or None, spacing_mm (in-plane mean), dim_size, element_type, big_endian,
    compressed, element_data_file.
    """
    path = Path(path)
    header, offset = _read_metaimage_header(path)
    shape, dtype, meta = _parse_metaimage_header(path, header)
    buf = _read_metaimage_bytes(path, header, offset, int(np.prod(shape)) * dtype.itemsize, meta["compressed"])
    array = np.frombuffer(buf, dtype=dtype).reshape(shape)  # (Z, H, W) or (H, W)
    return array.astype(dtype.newbyteorder("=")), meta


def read_metaimage_image(path, frame: int | None = None) -> tuple[np.ndarray, dict]:
    """One 2-D image → (float32 (H, W) in [0, 1], min-max per image; meta).

    2-D file: `frame` must be None or 0. 3-D file: `frame` picks the slice; frame None is allowed only when Z == 1.
    """
    array, meta = read_metaimage(path)
    if array.ndim == 2:
        if frame not in (None, 0):
            raise DataError(f"{path}: frame {frame} requested but the MetaImage is 2-D")
        return _minmax01(path, array), meta
    if frame is None:
        if array.shape[0] != 1:
            raise DataError(f"{path}: 3-D MetaImage with {array.shape[0]} slices; pass a frame index "
                            f"(CSV column 'frame') or use read_volume")
        frame = 0
    if not 0 <= frame < array.shape[0]:
        raise DataError(f"{path}: frame {frame} out of range (the stack has {array.shape[0]} slices)")
    return _minmax01(path, array[frame]), meta


def read_volume(path) -> np.ndarray:
    """A MetaImage stack → float32 (Z, H, W), each slice min-max scaled to [0, 1] (a 2-D file gives Z = 1)."""
    array, _ = read_metaimage(path)
    array = array.reshape((-1,) + array.shape[-2:])  # (Z, H, W)
    return np.stack([_minmax01(path, image) for image in array])


def write_metaimage(path, array: np.ndarray, spacing=None, compressed: bool = False) -> Path:
    """Write (H, W) or (Z, H, W) `array` as MetaImage: `.mha` inline (LOCAL) or `.mhd` + `.raw`/`.zraw`.

    spacing: mm, (x, y[, z]) in MetaIO order, or a single float for all axes; None → 1. Little endian; atomic.
    """
    path = Path(path)
    array = np.asarray(array)
    met_type = {np.dtype(v): k for k, v in _MET_TYPES.items() if k not in ("MET_LONG", "MET_ULONG")}
    if array.ndim not in (2, 3) or array.dtype.newbyteorder("=") not in met_type:
        raise ValueError(f"need a 2-D/3-D numeric array, got shape {array.shape} dtype {array.dtype}")
    spacing = [float(spacing or 1.0)] * array.ndim if spacing is None or np.isscalar(spacing) else spacing
    if len(spacing) != array.ndim:
        raise ValueError(f"spacing {spacing} needs {array.ndim} values (x, y[, z])")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    if compressed:
        data = zlib.compress(data)
    local = path.suffix.lower() != ".mhd"
    raw_path = path.with_suffix(".zraw" if compressed else ".raw")
    lines = [
        "ObjectType = Image", f"NDims = {array.ndim}", "BinaryData = True", "BinaryDataByteOrderMSB = False",
        f"CompressedData = {compressed}",
        *([f"CompressedDataSize = {len(data)}"] if compressed else []),
        "ElementSpacing = " + " ".join(repr(float(s)) for s in spacing),  # repr: shortest exact form
        "DimSize = " + " ".join(str(n) for n in reversed(array.shape)),  # numpy (z,) y, x → x y [z]
        f"ElementType = {met_type[array.dtype.newbyteorder('=')]}",
        f"ElementDataFile = {'LOCAL' if local else raw_path.name}",
    ]
    header = ("\n".join(lines) + "\n").encode("ascii")
    if not local:  # data file first, so the header never names a missing file
        with atomic_path(raw_path) as tmp:
            tmp.write_bytes(data)
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + data if local else header)
    return path


# ---------------------------------------- JSRT raw and spacing

JSRT_SIZE = 2048  # pixels per side [JSRT]
JSRT_SPACING_MM = 0.175  # [JSRT]


def read_jsrt(path) -> tuple[np.ndarray, dict]:
    """Read a JSRT `.IMG` → (float32 (2048, 2048) in [0, 1], dense = bright; meta {spacing_mm: 0.175}).

    The file is 2048×2048 big-endian uint16 holding 12-bit values, no header (8,388,608 bytes) [JSRT].
    Polarity: the raw values behave like film density (lungs high, bone low); most public converters invert
    them (notes/formats.md §1), so we invert, out = max − v, then min-max to [0, 1].
    """
    path, expected = Path(path), JSRT_SIZE * JSRT_SIZE * 2
    buf = path.read_bytes() if path.is_file() else b""
    if len(buf) != expected:
        raise DataError(f"{path}: {len(buf)} bytes (or missing); a JSRT image is 2048×2048 16-bit raw = "
                        f"{expected} bytes")
    raw = np.frombuffer(buf, dtype=">u2").reshape(JSRT_SIZE, JSRT_SIZE)  # (H, W), row = y, column = x
    if raw.max() > 4095:
        raise DataError(f"{path}: value {int(raw.max())} > 4095; not a 12-bit JSRT image (wrong byte order?)")
    density = raw.astype(np.float64)
    return _minmax01(path, density.max() - density), {"spacing_mm": JSRT_SPACING_MM}


def read_header(path) -> tuple[tuple[int, int] | None, float | None]:
    """((H, W), spacing_mm) from the file header without decoding pixels; None where unknown.

    DICOM (Rows, Columns), MetaImage (DimSize; the size of one slice for a stack), JSRT (2048², 0.175 mm);
    (None, None) for other formats (PNG, JPEG, TIFF: PIL reads their size). Unreadable files raise DataError.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if is_dicom(path) or suffix in (".dcm", ".dicom"):
        ds = read_dicom_dataset(path, stop_before_pixels=True)
        try:
            size = (int(ds.Rows), int(ds.Columns)) if "Rows" in ds and "Columns" in ds else None
            return size, _dicom_meta(ds)["spacing_mm"]
        except Exception as err:  # noqa: BLE001 - malformed header values are decoded lazily by pydicom
            raise DataError(f"{path}: malformed DICOM header ({type(err).__name__}: {err})") from err
    if is_metaimage(path) or suffix in (".mha", ".mhd"):
        header, _ = _read_metaimage_header(path)
        shape, _, meta = _parse_metaimage_header(path, header)
        return shape[-2:], meta["spacing_mm"]
    if suffix == ".img":
        return (JSRT_SIZE, JSRT_SIZE), JSRT_SPACING_MM
    return None, None


def read_spacing(path) -> float | None:
    """Isotropic pixel spacing in mm from the file's header: DICOM, MetaImage (in-plane mean), JSRT (0.175);
    None for formats without one (PNG, JPEG, TIFF) or when the header has none."""
    return read_header(path)[1]
