"""derived.py: derived images are bit-identical to their sources outside the inserted regions (issue 11).

Every source is written here into tmp_path (pydicom builds the DICOMs, PIL the PNGs, MetaImage and JSRT are
hand-written bytes), read with `read_image`, given a bright disk, and written back with `write_derived`. Then:
    - the stored values outside the disk are bit-identical (np.array_equal on the raw stored arrays),
    - dtype and tags / header fields are the source's,
    - inside the disk `read_image(derived)` is `edited` within one quantisation step of the reader's mapping,
    - with `changed` everywhere and `edited == original`, every stored value comes back (the exact inverse).
Quantisation steps come from independent numpy models of the readers (PS3.4 linear window, s/255, min-max).
"""

from __future__ import annotations

import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from nodule_diffusion import derived, formats
from nodule_diffusion.data import DataError, read_image

pydicom = pytest.importorskip("pydicom", reason="pydicom is needed to build DICOM fixtures")
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

import conftest  # noqa: E402  (make_dicom, shared with test_formats.py)
PIXEL_TAGS = ("PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
              "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "VOILUTFunction", "PixelSpacing",
              "ImagerPixelSpacing", "Rows", "Columns", "NumberOfFrames", "PatientID", "StudyInstanceUID")


def radiograph(shape, lo, hi, seed=0) -> np.ndarray:
    """Stored values (H, W) in [lo, hi]: a smooth gradient plus noise, with lo and hi only in two corners."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]] / max(shape)
    smooth = 0.25 + 0.5 * (0.6 * xs + 0.4 * np.sin(3 * ys) ** 2)
    image = np.clip(lo + (hi - lo) * (smooth + 0.05 * rng.standard_normal(shape)), lo + 1, hi - 1)
    image = np.round(image)
    image[0, 0], image[-1, -1] = lo, hi  # the extremes, far from the disk
    return image


def insert_disk(image: np.ndarray, radius_frac=0.2, gain=0.3) -> tuple[np.ndarray, np.ndarray]:
    """(edited float64, changed bool): a bright disk with a smooth profile in the middle of the image."""
    h, w = image.shape
    ys, xs = np.mgrid[0:h, 0:w]
    r2 = ((ys - h / 2) ** 2 + (xs - w / 2) ** 2) / (radius_frac * min(h, w)) ** 2
    changed = r2 <= 1
    edited = image.astype(np.float64).copy()
    edited[changed] = np.clip(edited[changed] + gain * (1 - r2[changed]), 0, 1)
    return edited, changed


def check_read_back(path, original, edited, changed, step, frame=None):
    """Inside `changed` the derived image reads as `edited` within one step; outside exactly as before."""
    back = read_image(path, frame)
    assert np.abs(back[changed] - edited[changed]).max() <= step + 1e-6
    np.testing.assert_array_equal(back[~changed], original[~changed])  # the extremes survived, so no rescale


def no_temp_files(folder: Path) -> bool:
    return not list(folder.glob(".*tmp*"))


# --------------------------------------------------------------------------------------------- DICOM
def make_dicom(path, stored, photometric="MONOCHROME2", bits=12, **tags):
    """A small CR file with stored values `stored` (H, W) (uint16, or int16 for signed data)."""
    return conftest.make_dicom(path, stored, photometric, bits, **{"Modality": "CR",
                                                                    "ImageType": ["ORIGINAL", "PRIMARY"], **tags})


def dicom_voi_numpy(stored, bits, signed, slope=None, intercept=None, center=None, width=None):
    """Independent PS3.4 model: rescale, then LINEAR window [PS3.3 C.11.2.1.2.1] with pydicom's output range."""
    values = stored.astype(np.float64)
    y_min, y_max = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if slope is not None:
        values, y_min, y_max = values * slope + intercept, y_min * slope + intercept, y_max * slope + intercept
    if center is None:
        return values
    c, w = center - 0.5, width - 1
    inside = ((values - c) / w + 0.5) * (y_max - y_min) + y_min
    return np.where(values <= c - w / 2, y_min, np.where(values > c + w / 2, y_max, inside))


DICOM_CASES = {  # name: (photometric, bits, signed, rescale (slope, intercept) or None, window (c, w) or None)
    "CR MONOCHROME1 15-bit WC 15000 / WW 30000 (as RG1_UNCI.dcm)": ("MONOCHROME1", 15, False, None, (15000, 30000)),
    "CR MONOCHROME1 15-bit rescale+window": ("MONOCHROME1", 15, False, (2, -1000), (30000, 60000)),
    "MONOCHROME2 12-bit plain": ("MONOCHROME2", 12, False, None, None),
    "MONOCHROME2 window that clips": ("MONOCHROME2", 12, False, None, (2048, 1500)),
    "MONOCHROME1 rescale only": ("MONOCHROME1", 14, False, (0.5, 100), None),
    "signed CT-like rescale+window": ("MONOCHROME2", 12, True, (1, -1024), (40, 400)),
}


def build_dicom_case(path, name, shape=(48, 40)):
    photometric, bits, signed, rescale, window = DICOM_CASES[name]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    stored = radiograph(shape, lo, hi).astype(np.int16 if signed else np.uint16)
    tags = {"ImagerPixelSpacing": [0.143, 0.143], "PixelSpacing": [0.15, 0.15]}
    if rescale:
        tags.update(RescaleSlope=rescale[0], RescaleIntercept=rescale[1], RescaleType="US")
    if window:
        tags.update(WindowCenter=window[0], WindowWidth=window[1])
    if signed:
        tags.update(NumberOfFrames=1)  # as multi-frame IODs write a single frame
    make_dicom(path, stored, photometric, bits, **tags)
    all_values = np.arange(lo, hi + 1)
    kwargs = dict(bits=bits, signed=signed, **(dict(slope=rescale[0], intercept=rescale[1]) if rescale else {}),
                  **(dict(center=window[0], width=window[1]) if window else {}))
    voi, voi_all = dicom_voi_numpy(stored, **kwargs), dicom_voi_numpy(all_values, **kwargs)
    forward_all = (voi_all - voi.min()) / (voi.max() - voi.min())  # what each stored value reads as (± inversion)
    step = np.abs(np.diff(forward_all)).max()  # one stored unit, in read_image units
    return stored, step


@pytest.mark.parametrize("name", sorted(DICOM_CASES))
def test_dicom_derived_is_bit_identical_outside_and_keeps_tags(tmp_path, name):
    source = tmp_path / "src.dcm"
    stored, step = build_dicom_case(source, name)
    original = read_image(source)
    edited, changed = insert_disk(original)
    out = derived.write_derived(source, original, edited, changed, tmp_path / "syn.dcm", description="disk test")
    src, ds = pydicom.dcmread(source), pydicom.dcmread(out)
    assert ds.pixel_array.dtype == src.pixel_array.dtype
    np.testing.assert_array_equal(ds.pixel_array[~changed], src.pixel_array[~changed])
    assert (ds.pixel_array[changed] != src.pixel_array[changed]).mean() > 0.5  # the disk is really written
    for keyword in PIXEL_TAGS:
        assert str(ds.get(keyword)) == str(src.get(keyword)), keyword  # same values, same text
    assert ds.SOPInstanceUID != src.SOPInstanceUID and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.DerivationDescription == "disk test"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    check_read_back(out, original, edited, changed, step)
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("name", sorted(DICOM_CASES))
def test_dicom_every_stored_value_comes_back(tmp_path, name):
    """changed everywhere, edited == original: the inverse returns each pixel's own stored value, including
    pixels that a window clips (several stored values read the same; the source's is kept)."""
    source = tmp_path / "src.dcm"
    build_dicom_case(source, name)
    original = read_image(source)
    out = derived.write_derived(source, original, original, np.ones(original.shape, bool), tmp_path / "same.dcm")
    np.testing.assert_array_equal(pydicom.dcmread(out).pixel_array, pydicom.dcmread(source).pixel_array)


def test_dicom_voi_lut_sequence(tmp_path):
    """A VOI LUT (not a window): non-linear, 12 → 10 bits, flat beyond its first and last entries."""
    from pydicom.sequence import Sequence

    stored = radiograph((48, 40), 0, 4095).astype(np.uint16)
    lut = np.round(1023 * (np.arange(3000) / 2999) ** 0.5).astype(np.uint16)  # entries for stored 500..3499
    item = Dataset()
    # [PS3.3 C.11.2.1.1] entries, first stored value mapped, bits per entry (≥ 10 avoids 8-bit byte packing)
    item.LUTDescriptor = [len(lut), 500, 10]
    item.add_new(0x00283006, "US", lut.tolist())  # LUTData
    source = make_dicom(tmp_path / "lut.dcm", stored, "MONOCHROME1", 12, VOILUTSequence=Sequence([item]))
    voi = lut[np.clip(stored.astype(int) - 500, 0, len(lut) - 1)].astype(float)  # independent model of the LUT
    step = 1 / (voi.max() - voi.min())  # one LUT output unit
    original = read_image(source)
    np.testing.assert_allclose(original, (voi.max() - voi) / (voi.max() - voi.min()), atol=1e-6)
    edited, changed = insert_disk(original)
    out = derived.write_derived(source, original, edited, changed, tmp_path / "syn.dcm")
    src, ds = pydicom.dcmread(source), pydicom.dcmread(out)
    np.testing.assert_array_equal(ds.pixel_array[~changed], src.pixel_array[~changed])
    assert list(ds.VOILUTSequence[0].LUTDescriptor) == [3000, 500, 10]
    check_read_back(out, original, edited, changed, step / 2)
    same = derived.write_derived(source, original, original, np.ones(original.shape, bool), tmp_path / "same.dcm")
    np.testing.assert_array_equal(pydicom.dcmread(same).pixel_array, src.pixel_array)  # plateaus keep the source


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "image_dfl.dcm"])
def test_dicom_bundled_sources(tmp_path, name):
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file(name))
    original = read_image(source)
    edited, changed = insert_disk(original)
    changed &= (original > 0) & (original < 1)  # leave the image's extreme pixels alone (see derived.py)
    edited[~changed] = original[~changed]
    out = derived.write_derived(source, original, edited, changed, tmp_path / "syn.dcm")
    src, ds = pydicom.dcmread(source), pydicom.dcmread(out)  # big endian / RLE / deflated → native little endian
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.pixel_array.dtype == src.pixel_array.dtype.newbyteorder("<")  # '>i2' for the big-endian source
    np.testing.assert_array_equal(ds.pixel_array[~changed], src.pixel_array[~changed])
    for keyword in PIXEL_TAGS:
        assert ds.get(keyword) == src.get(keyword), keyword
    stored_min, forward = derived.dicom_forward_table(source, pydicom.dcmread(source), src.pixel_array)
    values = np.unique(forward[(forward >= 0) & (forward <= 1)])
    check_read_back(out, original, edited, changed, np.diff(values).max())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.integers(8, 16), signed=st.booleans(), mono1=st.booleans(),
       rescale=st.none() | st.tuples(st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.5]), st.integers(-3000, 3000)),
       window=st.none() | st.tuples(st.floats(0.05, 0.95), st.floats(0.05, 1.5)),
       function=st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID"]), seed=st.integers(0, 2 ** 16))
def test_dicom_inverse_property(bits, signed, mono1, rescale, window, function, seed):
    """Random bit depths, signedness, polarity, rescale and windows (as fractions of the rescaled range)."""
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    stored = radiograph((12, 12), lo, hi, seed).astype(np.int16 if signed else np.uint16)
    tags = {}
    slope, intercept = rescale or (1.0, 0)
    if rescale:
        tags.update(RescaleSlope=slope, RescaleIntercept=intercept)
    if window:
        y_lo, y_hi = lo * slope + intercept, hi * slope + intercept
        tags.update(WindowCenter=round(y_lo + window[0] * (y_hi - y_lo), 2),
                    WindowWidth=round(max(window[1] * (y_hi - y_lo), 2.0), 2), VOILUTFunction=function)
    with tempfile.TemporaryDirectory() as folder:
        source = make_dicom(Path(folder) / "src.dcm", stored, "MONOCHROME1" if mono1 else "MONOCHROME2", bits,
                            **tags)
        original = read_image(source)
        assume(original.max() > original.min())  # a window beyond every pixel makes a constant image
        stored_min, forward = derived.dicom_forward_table(source, pydicom.dcmread(source), stored)
        # 1. the table is the reader's own mapping, to the bit
        np.testing.assert_array_equal(forward[stored.astype(np.int64) - stored_min], original)
        # 2. round trip over every stored value: exact where no other value reads the same, else same reading
        every = np.arange(len(forward)) + stored_min
        back = derived.table_to_stored(forward, forward, stored_min, every)
        np.testing.assert_array_equal(back, every)  # source value given: ties resolve to it
        back = derived.table_to_stored(forward, forward, stored_min, np.full_like(every, stored_min))
        values, counts = np.unique(forward, return_counts=True)
        unique = np.isin(forward, values[counts == 1])
        np.testing.assert_array_equal(back[unique], every[unique])
        np.testing.assert_array_equal(forward[back - stored_min], forward)
        # 3. the derived file: bit-identical outside the disk, reads as `edited` inside
        edited, changed = insert_disk(original)
        out = derived.write_derived(source, original, edited, changed, Path(folder) / "syn.dcm")
        new = pydicom.dcmread(out).pixel_array
        np.testing.assert_array_equal(new[~changed], stored[~changed])
        readable = np.unique(forward[(forward >= 0) & (forward <= 1)])
        check_read_back(out, original, edited, changed, np.diff(readable).max())


# --------------------------------------------------------------------------------------------- PNG
@pytest.mark.parametrize("dtype, full", [(np.uint8, 255), (np.uint16, 65535)])
def test_png_derived(tmp_path, dtype, full):
    stored = radiograph((40, 36), 0, full).astype(dtype)
    source = tmp_path / "src.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("Source", "scanner 7")
    Image.fromarray(stored).save(source, dpi=(150, 150), pnginfo=info)
    original = read_image(source)
    edited, changed = insert_disk(original)
    out = derived.write_derived(source, original, edited, changed, tmp_path / "syn.png")
    with Image.open(source) as src, Image.open(out) as new:
        assert new.mode == src.mode and new.info.get("Source") == "scanner 7"
        assert new.info["dpi"] == pytest.approx(src.info["dpi"])
        src_arr, new_arr = np.asarray(src), np.asarray(new)
    assert new_arr.dtype == src_arr.dtype == dtype
    np.testing.assert_array_equal(new_arr[~changed], src_arr[~changed])
    check_read_back(out, original, edited, changed, 0.5 / full)  # rounding: at most half a step
    # every stored value comes back through the inverse of the reader's s / full
    every = np.arange(full + 1, dtype=dtype)
    Image.fromarray(np.resize(every, (len(every) // 64 + 1, 64))).save(tmp_path / "every.png")
    image = read_image(tmp_path / "every.png")
    np.testing.assert_array_equal(derived.linear_to_stored(image, 0, full, 0, full, dtype),
                                  np.resize(every, image.shape))


@pytest.mark.parametrize("name, make", [
    ("rgb.png", lambda p: Image.new("RGB", (8, 8), (10, 20, 30)).save(p)),
    ("photo.jpg", lambda p: Image.new("L", (8, 8), 40).save(p)),
])
def test_unsupported_sources_raise_dataerror_naming_the_file(tmp_path, name, make):
    source = tmp_path / name
    make(source)
    original = read_image(source)
    with pytest.raises(DataError, match=name):
        derived.write_derived(source, original, original, np.zeros((8, 8), bool), tmp_path / f"syn{source.suffix}")


# --------------------------------------------------------------------------------------------- MetaImage
MET = {"MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_FLOAT": "f4"}


def write_source_mha(path, array, element_type, big_endian=False, compressed=False, header_size=0):
    """Hand-written MetaImage with extra keys that must survive; `.mhd` puts the data in `<stem>.raw`."""
    data = array.astype(np.dtype(MET[element_type]).newbyteorder(">" if big_endian else "<")).tobytes()
    data = zlib.compress(data) if compressed else data
    local = path.suffix == ".mha"
    lines = ["ObjectType = Image", f"NDims = {array.ndim}", "BinaryData = True",
             f"BinaryDataByteOrderMSB = {big_endian}", f"CompressedData = {compressed}",
             *([f"CompressedDataSize = {len(data)}"] if compressed else []),
             "Offset = 0 0" + " 0" * (array.ndim - 2), "AnatomicalOrientation = RAI",
             "ElementSpacing = 0.7 0.7" + " 2.5" * (array.ndim - 2),
             "DimSize = " + " ".join(str(n) for n in reversed(array.shape)),
             *([f"HeaderSize = {header_size}"] if header_size else []),
             f"ElementType = {element_type}", f"ElementDataFile = {'LOCAL' if local else path.stem + '.raw'}"]
    header = ("\r\n".join(lines) + "\r\n").encode()  # CRLF, as some writers produce: must be kept
    padding = b"\x07" * header_size  # bytes before the pixel data (HeaderSize): must be kept
    if local:
        path.write_bytes(header + padding + data)
    else:
        path.write_bytes(header)
        path.with_suffix(".raw").write_bytes(padding + data)
    return path


@pytest.mark.parametrize("suffix, element_type, big_endian, compressed, header_size, frame", [
    (".mha", "MET_USHORT", False, False, 0, None),
    (".mha", "MET_SHORT", True, True, 0, None),
    (".mhd", "MET_USHORT", False, False, 16, None),
    (".mhd", "MET_FLOAT", True, False, 0, None),
    (".mha", "MET_UCHAR", False, True, 0, 1),  # a 3-slice stack: only slice 1 is edited
])
def test_metaimage_derived(tmp_path, suffix, element_type, big_endian, compressed, header_size, frame):
    dtype = np.dtype(MET[element_type])
    lo, hi = {"u1": (0, 255), "i2": (-1200, 3000), "u2": (0, 4095), "f4": (-1.0, 3.0)}[dtype.str[1:]]
    scale = 1000 if dtype.kind == "f" else 1  # radiograph() rounds: make float values non-integer
    plane = radiograph((30, 34), lo * scale, hi * scale) / scale
    array = plane if frame is None else np.stack([plane[::-1], plane, plane[:, ::-1]])  # (Z, H, W)
    source = write_source_mha(tmp_path / f"src{suffix}", array.astype(dtype), element_type, big_endian,
                              compressed, header_size)
    original = read_image(source, frame)
    edited, changed = insert_disk(original)
    out = derived.write_derived(source, original, edited, changed, tmp_path / f"syn{suffix}", frame=frame)
    src_arr, src_meta = formats.read_metaimage(source)
    new_arr, new_meta = formats.read_metaimage(out)
    assert new_arr.dtype == src_arr.dtype
    mask = changed if frame is None else np.stack([np.zeros_like(changed), changed, np.zeros_like(changed)])
    np.testing.assert_array_equal(new_arr[~mask], src_arr[~mask])  # incl. the untouched slices, bit for bit
    for key in ("spacing", "dim_size", "element_type", "big_endian", "compressed"):
        assert new_meta[key] == src_meta[key], key
    src_lines, new_lines = (p.read_bytes().split(b"ElementDataFile")[0].split(b"\r\n") for p in (source, out))
    differ = [a for a, b in zip(src_lines, new_lines) if a != b]
    assert len(src_lines) == len(new_lines) and all(a.startswith(b"CompressedDataSize") for a in differ)
    if suffix == ".mhd":  # a data file of its own, with the source's leading HeaderSize bytes
        assert b"ElementDataFile = syn.raw" in out.read_bytes()
        assert (tmp_path / "syn.raw").read_bytes()[:header_size] == b"\x07" * header_size
    step = 0.5 / (hi - lo) if dtype.kind in "iu" else 1e-6
    check_read_back(out, original, edited, changed, step, frame)
    assert no_temp_files(tmp_path)


def test_metaimage_every_stored_value_comes_back(tmp_path):
    every = np.arange(0, 65536, dtype=np.uint16).reshape(256, 256)
    source = write_source_mha(tmp_path / "every.mha", every, "MET_USHORT")
    image = read_image(source)
    np.testing.assert_array_equal(derived.linear_to_stored(image, 0, 65535, 0, 65535, np.uint16), every)
    out = derived.write_derived(source, image, image, np.ones(image.shape, bool), tmp_path / "same.mha")
    assert out.read_bytes() == source.read_bytes()


# --------------------------------------------------------------------------------------------- JSRT
def test_jsrt_derived(tmp_path):
    size = formats.JSRT_SIZE
    raw = radiograph((size, size), 150, 3900).astype(">u2")
    source = tmp_path / "JPCLN001.IMG"
    source.write_bytes(raw.tobytes())
    original = read_image(source)
    edited, changed = insert_disk(original, radius_frac=0.01)
    out = derived.write_derived(source, original, edited, changed, tmp_path / "JPCLN001_syn.IMG")
    assert out.stat().st_size == size * size * 2  # 2048×2048 16-bit words, no header
    new = np.frombuffer(out.read_bytes(), ">u2").reshape(size, size)
    np.testing.assert_array_equal(new[~changed], raw[~changed])
    assert new.max() <= 4095 and (new[changed] != raw[changed]).any()
    check_read_back(out, original, edited, changed, 0.5 / (3900 - 150))
    # every 12-bit value comes back: the inverse of f = (max − s)/(max − min)
    every = np.resize(np.arange(4096), (size, size)).astype(">u2")
    (tmp_path / "every.IMG").write_bytes(every.tobytes())
    image = read_image(tmp_path / "every.IMG")
    np.testing.assert_array_equal(derived.linear_to_stored(image, 4095, 0, 0, 4095, np.uint16), every)


# --------------------------------------------------------------------------------------------- caller errors
def test_caller_errors(tmp_path):
    source = tmp_path / "src.png"
    Image.fromarray(radiograph((20, 20), 0, 255).astype(np.uint8)).save(source)
    original = read_image(source)
    changed = np.zeros(original.shape, bool)
    with pytest.raises(ValueError, match="native"):  # e.g. handed the working-spacing image
        derived.write_derived(source, original[::2, ::2], original[::2, ::2], changed[::2, ::2], tmp_path / "a.png")
    with pytest.raises(ValueError, match="not read_image"):
        derived.write_derived(source, original * 0.9, original, changed, tmp_path / "a.png")
    with pytest.raises(ValueError, match="suffix"):
        derived.write_derived(source, original, original, changed, tmp_path / "a.tif")
    with pytest.raises(ValueError, match="overwrite"):
        derived.write_derived(source, original, original, changed, source)
    with pytest.raises(ValueError, match="NaN"):
        derived.write_derived(source, original, np.full(original.shape, np.nan), ~changed, tmp_path / "a.png")
    flat = tmp_path / "flat.mha"
    write_source_mha(flat, np.full((8, 8), 7, np.uint16), "MET_USHORT")
    with pytest.raises(DataError, match="flat.mha.*constant"):
        derived.write_derived(flat, read_image(flat), read_image(flat), np.ones((8, 8), bool), tmp_path / "f.mha")
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "f.mha").exists()
    assert derived.derived_suffix(source) == ".png" and derived.derived_suffix(flat) == ".mha"


@pytest.mark.parametrize("spacing", [1.4, 0.7, 0.35])
def test_insertion_into_a_monochrome1_cr_never_darkens(tmp_path, spacing):
    """Issue 10 on the DICOM path: a MONOCHROME1 CR (dense = low stored value) at the model's spacing and finer
    ones, a generator that returns crops darker than the lung, six nodules (some close enough for one's halo to
    reach another's ring), and the written derived DICOM: no inserted nodule is darker than the ring around it,
    no pixel of the displayed image is darker than the source, and the nodules are there."""
    import torch
    from PIL import Image as PILImage

    from nodule_diffusion import evaluation, phantom, synthesis
    from nodule_diffusion.data import ImageRecord

    image, _, _ = phantom.make_image(phantom.image_rng(3, 0), phantom.PhantomConfig(negative_fraction=1.0))
    side = round(256 * 1.4 / spacing)
    image = np.asarray(PILImage.fromarray(image).resize((side, side), PILImage.BILINEAR))  # 1.4 mm/px → spacing
    stored = np.round((1.0 - np.clip(image, 0, 1)) * 4095).astype(np.uint16)             # MONOCHROME1: inverted
    source = make_dicom(tmp_path / "cr.dcm", stored, "MONOCHROME1", 12, PixelSpacing=[spacing, spacing])

    def darker(masks, contexts, requests, originals=None):  # context is 0 inside the region: a dark hole there
        noise = torch.randn(masks.shape, generator=torch.Generator().manual_seed(0))
        return (contexts - 0.6 * masks + 0.2 * noise).clamp(-1, 1)
    out = synthesis.synthesize([ImageRecord(image=source, spacing_mm=spacing)], darker, tmp_path / "syn",
                               phantom.PhantomConfig().vocab, 1.4, 32, {"texture": "ground_glass"}, 6, (8.0, 16.0), 0)
    written = out[0].image
    assert written.suffix == ".dcm"
    check = evaluation.density_check(out)
    assert check["n_inserted"] == 6 and check["n_darker_than_ring"] == 0, check
    before, after = read_image(source), read_image(written)
    assert (after >= before - 1e-6).all() and (after > before + 1e-3).any()
