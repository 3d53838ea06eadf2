"""Derived images: write synthetic images back in their source's format, bit-identical outside the inserted regions.

`write_derived(source, original, edited, changed, out_path)` takes the float images of `data.read_image`
(float32 (H, W) in [0, 1], dense = bright) at the source's NATIVE resolution and writes a file of the source's
format in which
    - every pixel where `changed` is False holds the source's stored value, copied verbatim;
    - every pixel where `changed` is True holds `to_stored(edited)`: the exact inverse of the mapping the reader
      applied to this file, rounded and clipped to the stored range;
    - dtype, stored-value domain, photometric interpretation, bit depth, rescale/window and spacing tags (or
      header fields) are the source's.

The reader's forward mapping, stored value s → float f, and its inverse, per format:
    DICOM      f = dicom_scale01(dicom_voi_values(s)): modality LUT, first VOI LUT/window, MONOCHROME1 inversion,
               min-max with the image's VOI extremes [formats.read_dicom, DICOM PS3.4 N.2]. A window clips and a
               LUT is a table, so the inverse is tabulated: every stored value the header allows (BitsStored
               ≤ 16) goes through the reader's own code, and f becomes the stored value that reads nearest to f.
    PNG        f = s/255 (mode L) or s/65535 (mode I;16) [data._read_pil]  →  s = round(f·255) or round(f·65535)
    MetaImage  f = (s − min)/(max − min) of the slice [formats.read_metaimage_image]
               →  s = min + f·(max − min), rounded for integer element types
    JSRT       f = (max − s)/(max − min) [formats.read_jsrt]  →  s = max − f·(max − min), clipped to 0..4095

Min-max readers (DICOM, MetaImage, JSRT) scale each image by its own extremes, so `read_image(derived)` equals
`edited` within one quantisation step only while the source's darkest and brightest values survive outside
`changed` (in radiographs they sit in the background and collimation, far from any nodule). If an extreme pixel
is overwritten, the stored values outside `changed` are still identical, but the float image is rescaled.

What each writer keeps and changes:
    DICOM      all elements kept, except: new SOP Instance and Series UIDs, ImageType DERIVED\\SECONDARY,
               DerivationDescription, SourceImageSequence [DICOM PS3.3 C.7.6.1.1.2-4]; Smallest/Largest Image
               Pixel Value removed (they may no longer hold). Written Explicit VR Little Endian, so a compressed
               or big-endian source is stored natively (lossless: the same stored values).
    PNG        mode (L or I;16) and the pHYs / iCCP / tRNS / text chunks that Pillow reads and writes.
    MetaImage  the source's header text, except ElementDataFile (.mhd: names the new data file) and
               CompressedDataSize; bytes around the pixel data (HeaderSize) and the other slices of a stack.
    JSRT       2048×2048 big-endian 12-bit raw, no header.

Errors in the input file (unsupported format or mode, constant image, > 16-bit DICOM) raise DataError naming
the file; inconsistent arguments (shapes, `original` not read from this file, output suffix) raise ValueError.
Every file is written atomically (temp file + rename).

DEVIATION: DICOM bits above BitsStored are not preserved (pydicom's pixel_array masks them; they are written
as zeros, or the sign extension for signed data); no conforming reader looks at them.
"""

from __future__ import annotations

import datetime
import zlib
from pathlib import Path

import numpy as np

from nodule_diffusion import formats
from nodule_diffusion.common import DataError, atomic_path
from nodule_diffusion.data import read_image

__all__ = ["write_derived", "can_write_back", "derived_suffix", "linear_to_stored", "table_to_stored",
           "dicom_forward_table", "mark_derived_dicom"]

_PNG_FULL_SCALE = {"L": 255, "I;16": 65535}  # PIL mode → the stored value that reads as 1.0 [data._read_pil]


def _source_kind(path: Path) -> str:
    """The reader `data.read_image` uses for `path` (same tests, same order): dicom, metaimage, jsrt or png."""
    suffix = path.suffix.lower()
    if formats.is_dicom(path) or suffix in (".dcm", ".dicom"):
        return "dicom"
    if formats.is_metaimage(path) or suffix in (".mha", ".mhd"):
        return "metaimage"
    if suffix == ".img":
        return "jsrt"
    if suffix == ".png":
        return "png"
    raise DataError(f"{path}: no derived-image writer for {suffix or 'extension-less'} files; supported sources "
                    f"are DICOM, MetaImage (.mha/.mhd), JSRT (.IMG) and greyscale PNG (JPEG is lossy, so "
                    f"re-encoding it would change every pixel)")


def can_write_back(source_path) -> bool:
    """True when `write_derived` can keep this source's format losslessly: DICOM (1-16 bits stored), MetaImage,
    JSRT, or an 8/16-bit greyscale PNG. JPEG, TIFF and colour images (read as luminance) cannot be written back."""
    source_path = Path(source_path)
    try:
        kind = _source_kind(source_path)
    except DataError:
        return False
    if kind == "dicom":
        header = formats.read_dicom_dataset(source_path, stop_before_pixels=True)
        return 1 <= int(header.get("BitsStored") or 0) <= 16 and int(header.get("BitsAllocated") or 0) in (8, 16, 32)
    if kind == "png":
        from PIL import Image

        with Image.open(source_path) as pil:  # the header only; read_image has already read the file
            return pil.mode in _PNG_FULL_SCALE
    return True


def derived_suffix(source_path) -> str:
    """The suffix a derived image of `source_path` gets: the source's own, or ".dcm" for a DICOM without one."""
    source_path = Path(source_path)
    if _source_kind(source_path) == "dicom" and source_path.suffix.lower() not in (".dcm", ".dicom"):
        return ".dcm"
    return source_path.suffix


def write_derived(source_path, original: np.ndarray, edited: np.ndarray, changed: np.ndarray, out_path, *,
                  frame: int | None = None, description: str = "nodule_diffusion: synthetic nodules inserted") -> Path:
    """Write `edited` as a file of `source_path`'s format, bit-identical to the source where `changed` is False.

    :param source_path: the file `original` was read from: DICOM, MetaImage, JSRT .IMG or greyscale PNG.
    :param original: float (H, W) in [0, 1], exactly `data.read_image(source_path, frame)`: native resolution,
        NOT resampled to a working spacing (resample the edit back to the source grid first).
    :param edited: float (H, W): `original` with nodules inserted; clipped to [0, 1] (read_image's range).
    :param changed: bool (H, W): the inserted regions; only these pixels are written from `edited`.
    :param out_path: the derived file; its suffix must be `derived_suffix(source_path)` (DICOM: any suffix).
    :param frame: the slice of a 3-D MetaImage stack, as for read_image; the other slices are copied.
    :param description: DICOM DerivationDescription (ST, cut to 1024 characters); other formats ignore it.
    :return: out_path. For a `.mhd` source the data file is written beside it, named after `out_path`.
    """
    source_path, out_path = Path(source_path), Path(out_path)
    kind = _source_kind(source_path)
    if kind != "dicom" and out_path.suffix.lower() != source_path.suffix.lower():
        raise ValueError(f"{out_path}: a derived image of {source_path} must keep the suffix "
                         f"{source_path.suffix!r}, which is how read_image recognises its format")
    if out_path.resolve() == source_path.resolve():
        raise ValueError(f"{out_path}: refusing to overwrite the source image")

    source_image = read_image(source_path, frame)  # the reader whose mapping we invert, at native resolution
    original, edited = np.asarray(original, np.float64), np.asarray(edited, np.float64)
    changed = np.asarray(changed, dtype=bool)
    if not original.shape == edited.shape == changed.shape == source_image.shape:
        raise ValueError(f"{source_path}: original {original.shape}, edited {edited.shape} and changed "
                         f"{changed.shape} must all be the source's native (H, W) {source_image.shape}; "
                         f"resample images and masks back to the source grid before writing")
    if np.abs(original - source_image).max(initial=0.0) > 1e-6:
        raise ValueError(f"{source_path}: `original` is not read_image({source_path.name}, frame={frame}) "
                         f"(resampled, edited, or from another file or frame?)")
    if not np.isfinite(edited[changed]).all():
        raise ValueError(f"{source_path}: edited image has NaN or infinite values inside the changed region")
    target = np.clip(edited[changed], 0.0, 1.0)  # (K,) the floats to store, K = changed.sum()
    if kind == "dicom":
        _write_dicom(source_path, out_path, changed, target, description)
    elif kind == "png":
        _write_png(source_path, out_path, changed, target)
    elif kind == "metaimage":
        _write_metaimage(source_path, out_path, changed, target, frame)
    else:
        _write_jsrt(source_path, out_path, changed, target)
    return out_path


# ---------------------------------------- inverse mappings

def linear_to_stored(image01: np.ndarray, at0: float, at1: float, lo: float, hi: float, dtype) -> np.ndarray:
    """Invert f = (s − at0)/(at1 − at0): s = at0 + f·(at1 − at0), rounded for integer dtypes, clipped to
    [lo, hi]. at0, at1: the stored values that read as 0 and 1 (at0 > at1 for an inverting reader such as JSRT's).
    """
    stored = at0 + np.asarray(image01, np.float64) * (at1 - at0)
    if np.dtype(dtype).kind in "iu":
        stored = np.rint(stored)  # the reader's f is a float32 of an exact ratio: rounding recovers s exactly
    return np.clip(stored, lo, hi).astype(dtype)


def table_to_stored(image01: np.ndarray, forward: np.ndarray, stored_min: int,
                    source_stored: np.ndarray) -> np.ndarray:
    """Invert a tabulated reader mapping: `forward[i]` is what stored value `stored_min + i` reads as.

    Each f becomes the stored value that reads nearest to f. Several stored values can read the same (a window
    clips everything beyond its edges; a LUT has plateaus): then the one nearest the pixel's own source value
    `source_stored` is taken, so a pixel whose float did not change keeps its stored value.
    image01, source_stored: the same shape (K,); → int64 stored values (K,).
    """
    order = np.argsort(forward, kind="stable")  # table indices by read value; equal values keep stored order
    shown = forward[order].astype(np.float64)  # (n,) ascending
    f = np.asarray(image01, np.float64)
    i = np.clip(np.searchsorted(shown, f), 1, len(shown) - 1)
    nearest = np.where(f - shown[i - 1] <= shown[i] - f, shown[i - 1], shown[i])  # nearest value a pixel can read
    first = order[np.searchsorted(shown, nearest, side="left")]  # lowest table index that reads `nearest`
    last = order[np.searchsorted(shown, nearest, side="right") - 1]  # highest one
    own = np.clip(np.asarray(source_stored, np.int64) - stored_min, first, last)
    # For a monotone mapping every index in [first, last] reads `nearest`; a non-monotone LUT can have gaps.
    index = np.where(forward[own] == forward[first], own, first)
    return index + stored_min


# ---------------------------------------- DICOM

def dicom_forward_table(path, header, stored: np.ndarray) -> tuple[int, np.ndarray]:
    """The reader's mapping of every stored value the header allows → (stored_min, forward float32 (n,)).

    forward[i] is what `read_dicom` returns for a pixel with stored value stored_min + i in this image (whose
    VOI extremes fix the min-max scaling). `header`: a dataset that will not be saved (pydicom's windowing
    rewrites its rescale tags); `stored`: the image's stored values (H, W) as pydicom decodes them.
    """
    bits, signed = int(header.BitsStored), int(header.get("PixelRepresentation", 0)) == 1
    if not 1 <= bits <= 16:
        raise DataError(f"{path}: BitsStored {bits}: derived DICOMs are written for 1-16 bit images only")
    stored_min = -(2 ** (bits - 1)) if signed else 0
    every_value = np.arange(stored_min, stored_min + 2 ** bits).astype(stored.dtype)  # (n,) n = 2^BitsStored
    voi = formats.dicom_voi_values(path, header, every_value)  # steps 2-3, element-wise
    image_voi = voi[stored.astype(np.int64) - stored_min]  # (H, W): the same values the reader computed
    lo, hi = float(image_voi.min()), float(image_voi.max())
    if hi <= lo:
        raise DataError(f"{path}: the image reads as constant (all pixels outside the window?); "
                        f"its min-max scaling cannot be inverted")
    photometric = str(header.get("PhotometricInterpretation", ""))
    return stored_min, formats.dicom_scale01(path, voi, photometric, lo, hi)  # steps 4-5


def mark_derived_dicom(ds, description: str) -> None:
    """Turn `ds` (a copy of the source) into a derived instance, in place [DICOM PS3.3 C.7.6.1.1.2-5].

    New SOP Instance (mirrored in the file meta) and Series UIDs; ImageType values 1-2 become DERIVED\\SECONDARY;
    DerivationDescription (ST, at most 1024 characters); SourceImageSequence → the source's SOP Class/Instance.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    reference = Dataset()  # SourceImageSequence item: the source's SOP Class and Instance UIDs
    reference.ReferencedSOPClassUID = ds.get("SOPClassUID")
    reference.ReferencedSOPInstanceUID = ds.get("SOPInstanceUID")
    old_type = [str(v) for v in (ds.get("ImageType") or [])]
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(ds.get("SeriesNumber") or 0) + 1000
    ds.SeriesDescription = "SYNTHETIC NODULE"
    ds.ImageType = ["DERIVED", "SECONDARY"] + old_type[2:]  # values 1-2 replaced, further source values kept
    ds.DerivationDescription = str(description)[:1024]  # ST: at most 1024 characters
    ds.SourceImageSequence = Sequence([reference])
    ds.BurnedInAnnotation = "NO"
    # Once a source was lossy-compressed the flag stays "01" [DICOM C.7.6.1.1.5]; our write itself is lossless.
    ds.LossyImageCompression = "01" if str(ds.get("LossyImageCompression", "00")) == "01" else "00"
    now = datetime.datetime.now()
    ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")


def _write_dicom(source: Path, out_path: Path, changed: np.ndarray, target: np.ndarray, description: str) -> None:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = formats.read_dicom_dataset(source)  # becomes the derived dataset
    header = formats.read_dicom_dataset(source, stop_before_pixels=True)  # scratch copy for the LUT functions
    if "PixelData" not in ds or int(ds.get("BitsAllocated", 0)) not in (8, 16, 32):
        raise DataError(f"{source}: derived DICOMs need integer pixel data with BitsAllocated 8, 16 or 32")
    stored = formats._dicom_stored_values(source, ds)  # (H, W), exactly what the reader decoded
    stored_min, forward = dicom_forward_table(source, header, stored)
    new_stored = stored.copy()
    new_stored[changed] = table_to_stored(target, forward, stored_min, stored[changed])
    for _ in ds.iterall():
        pass  # decode every still-raw element now, while the source's byte order is known
    frames = ds.get("NumberOfFrames")  # set_pixel_data drops it for a 2-D array; multi-frame IODs require it
    # Native little endian: set_pixel_data refuses big-endian datasets, and we never re-compress.
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # Same dtype as pydicom decoded (so BitsAllocated and PixelRepresentation), same BitsStored and polarity;
    # little-endian bytes (a big-endian source decodes to '>u2', and set_pixel_data writes the array's bytes).
    ds.set_pixel_data(new_stored.astype(new_stored.dtype.newbyteorder("<")), str(ds.PhotometricInterpretation),
                      int(ds.BitsStored), generate_instance_uid=False)
    if frames is not None:
        ds.NumberOfFrames = frames
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            del ds[keyword]  # optional, and no longer known to hold
    mark_derived_dicom(ds, description)
    with atomic_path(out_path) as tmp:  # temp file + rename: readers never see a half-written file
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)  # save_as refuses big → little endian


# ---------------------------------------- PNG

def _write_png(source: Path, out_path: Path, changed: np.ndarray, target: np.ndarray) -> None:
    from PIL import Image, PngImagePlugin

    with Image.open(source) as pil:  # read_image has already opened it successfully
        pil.load()
        mode, info, stored = pil.mode, dict(pil.info), np.array(pil)  # stored: (H, W) uint8 or uint16
    if mode not in _PNG_FULL_SCALE:
        raise DataError(f"{source}: PNG mode {mode}; derived images need 8-bit (L) or 16-bit (I;16) greyscale "
                        f"(read_image turns colour into luminance, which cannot be inverted)")
    full = _PNG_FULL_SCALE[mode]
    stored[changed] = linear_to_stored(target, 0, full, 0, full, stored.dtype)
    text = PngImagePlugin.PngInfo()
    for key, value in info.items():
        if isinstance(value, str):
            text.add_text(key, value)  # tEXt/iTXt chunks
    keep = {key: info[key] for key in ("dpi", "icc_profile", "transparency") if key in info}
    with atomic_path(out_path) as tmp:
        Image.fromarray(stored).save(tmp, format="PNG", pnginfo=text, **keep)  # uint8 → L, uint16 → I;16


# ---------------------------------------- MetaImage

def _replace_header_values(header_text: str, values: dict[str, str]) -> str:
    """The header text with the values of `values`' keys (lower case) replaced; every other byte is kept."""
    lines = header_text.splitlines(keepends=True)
    for n, line in enumerate(lines):
        key = line.partition("=")[0]
        if key.strip().lower() in values:
            ending = line[len(line.rstrip("\r\n")):]
            lines[n] = f"{key.rstrip()} = {values[key.strip().lower()]}{ending}"
    return "".join(lines)


def _write_metaimage(source: Path, out_path: Path, changed: np.ndarray, target: np.ndarray,
                     frame: int | None) -> None:
    header, offset = formats._read_metaimage_header(source)
    shape, dtype, meta = formats._parse_metaimage_header(source, header)  # dtype in the file's byte order
    stored, _ = formats.read_metaimage(source)  # (Z, H, W) or (H, W), native byte order
    plane = stored if stored.ndim == 2 else stored[frame or 0]  # a view: edits land in `stored`
    lo, hi = float(plane.min()), float(plane.max())  # the reader's min-max of this slice
    if hi <= lo:
        raise DataError(f"{source}: the image is constant, so its min-max scaling cannot be inverted")
    bounds = (np.iinfo(dtype).min, np.iinfo(dtype).max) if dtype.kind in "iu" else (lo, hi)
    plane[changed] = linear_to_stored(target, lo, hi, *bounds, plane.dtype)
    pixels = np.ascontiguousarray(stored, dtype=dtype).tobytes()  # the source's element type and byte order
    nbytes = len(pixels)
    if meta["compressed"]:
        pixels = zlib.compress(pixels)  # zlib wrapper, as MetaIO writes [MetaIO metaUtils.cxx]
    data_path, start, stop = formats.metaimage_data_span(source, header, offset, nbytes, meta["compressed"])
    old = data_path.read_bytes()
    new_values = {"compresseddatasize": str(len(pixels))} if "compresseddatasize" in header else {}
    local = header["elementdatafile"].upper() == "LOCAL"
    if local:
        header_text = _replace_header_values(old[:offset].decode("latin-1"), new_values)
        with atomic_path(out_path) as tmp:
            tmp.write_bytes(header_text.encode("latin-1") + old[offset:start] + pixels + old[stop:])
        return
    data_out = out_path.with_name(out_path.stem + data_path.suffix)  # e.g. syn.mhd + syn.raw
    if data_out.resolve() == data_path.resolve():
        raise ValueError(f"{out_path}: its data file {data_out.name} would overwrite the source's")
    new_values["elementdatafile"] = data_out.name
    header_text = _replace_header_values(source.read_bytes()[:offset].decode("latin-1"), new_values)
    with atomic_path(data_out) as tmp:  # data file first, so the header never names a missing file
        tmp.write_bytes(old[:start] + pixels + old[stop:])
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(header_text.encode("latin-1"))


# ---------------------------------------- JSRT

def _write_jsrt(source: Path, out_path: Path, changed: np.ndarray, target: np.ndarray) -> None:
    raw = np.frombuffer(source.read_bytes(), dtype=">u2").reshape(formats.JSRT_SIZE, formats.JSRT_SIZE).copy()
    lo, hi = float(raw.min()), float(raw.max())
    if hi <= lo:
        raise DataError(f"{source}: the image is constant, so its min-max scaling cannot be inverted")
    raw[changed] = linear_to_stored(target, hi, lo, 0, 4095, raw.dtype)  # inverting reader: max reads as 0
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(raw.astype(">u2").tobytes())  # 2048×2048 big-endian, no header [JSRT]
