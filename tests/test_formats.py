"""formats.py: DICOM, MetaImage and JSRT readers/writers against independent numpy computations.

Every fixture is written by the test itself into tmp_path; pydicom builds the DICOMs. Expected images are computed
here from the formulas (PS3.4 linear window, MONOCHROME1 inversion, min-max), not by calling the code under test.
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib

import numpy as np
import pytest

from conftest import oracle
from nodule_diffusion import formats
from nodule_diffusion.data import DataError

pydicom = oracle("pydicom", reason="pydicom is needed to build DICOM fixtures")
from pydicom.uid import JPEGLSLossless  # noqa: E402

from conftest import make_dicom  # noqa: E402


def minmax(x):
    x = np.asarray(x, np.float64)
    return (x - x.min()) / (x.max() - x.min())


@pytest.fixture
def stored():
    rng = np.random.default_rng(0)
    return rng.integers(0, 4096, size=(24, 20), dtype=np.uint16)  # (H, W) 12-bit stored values


# --------------------------------------------------------------------------------------------- DICOM reading
def test_dicom_monochrome1_rescale_window_matches_numpy(tmp_path, stored):
    path = make_dicom(tmp_path / "a.dcm", stored, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-100,
                      WindowCenter=[3000, 500], WindowWidth=[2001, 300], ImagerPixelSpacing=[0.15, 0.15])
    image, meta = formats.read_dicom(path)
    # [PS3.4 C.11.2.1.2.1] LINEAR: y = ((x − (c − 0.5))/(w − 1) + 0.5), clipped to [0, 1]; first window only.
    values = stored * 2.0 - 100
    c, w = 3000, 2001
    windowed = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    expected = 1 - minmax(windowed)  # MONOCHROME1: minimum is white → invert after VOI
    assert image.dtype == np.float32 and image.shape == stored.shape
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert meta["spacing_mm"] == pytest.approx(0.15)
    assert meta["photometric"] == "MONOCHROME1" and meta["modality"] == "DX"
    # dense = bright: the lowest stored value (film-like MONOCHROME1) becomes the brightest pixel
    assert image.flat[np.argmin(stored)] == pytest.approx(1.0)


def test_dicom_monochrome2_no_window_and_spacing_preference(tmp_path, stored):
    path = make_dicom(tmp_path / "b.dcm", stored, PixelSpacing=[0.2, 0.2], ImagerPixelSpacing=[0.15, 0.15])
    image, meta = formats.read_dicom(path)
    np.testing.assert_allclose(image, minmax(stored), atol=1e-6)
    assert meta["spacing_mm"] == pytest.approx(0.2)  # PixelSpacing (patient plane) wins over ImagerPixelSpacing
    path = make_dicom(tmp_path / "c.dcm", stored, PixelSpacing=[0, 0], ImagerPixelSpacing=[0.143, 0.143])
    assert formats.read_spacing(path) == pytest.approx(0.143)  # 0\0 (as in RG1_UNCI.dcm) counts as missing
    path = make_dicom(tmp_path / "d.dcm", stored)
    assert formats.read_spacing(path) is None


def test_dicom_constant_image_gives_zeros(tmp_path):
    path = make_dicom(tmp_path / "flat.dcm", np.full((8, 8), 700, np.uint16), "MONOCHROME1")
    image, _ = formats.read_dicom(path)
    assert np.isfinite(image).all() and (image == 0).all()


@pytest.mark.parametrize("case, match", [
    ("multiframe", "multi-frame"), ("rgb", "colour"), ("nopixels", "no pixel data"),
    ("truncated", "pixel data"), ("notdicom", "DICOM"), ("badwindow", "window"), ("missing", "not found"),
])
def test_dicom_errors(tmp_path, stored, case, match):
    path = tmp_path / f"{case}.dcm"
    if case == "multiframe":
        make_dicom(path, np.stack([stored, stored]))
    elif case == "rgb":
        make_dicom(path, np.zeros((8, 8, 3), np.uint8), "RGB", 8)
    elif case == "nopixels":
        make_dicom(path, None)
    elif case == "truncated":
        make_dicom(path, stored)
        path.write_bytes(path.read_bytes()[:-300])
    elif case == "notdicom":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    elif case == "badwindow":
        make_dicom(path, stored, WindowCenter=100, WindowWidth=0)
    with pytest.raises(DataError, match=match) as info:
        formats.read_dicom(path)
    assert str(path) in str(info.value)


def test_dicom_compressed_without_plugin_names_transfer_syntax(tmp_path, stored):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder

    path = make_dicom(tmp_path / "jls.dcm", stored)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(60)])  # JPEG-LS SOI + SOF55, then junk
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError) as info:
        formats.read_dicom(path)
    if not get_decoder(JPEGLSLossless).is_available:  # the usual case: no pyjpegls / gdcm / pylibjpeg-libjpeg
        assert "JPEG-LS Lossless" in str(info.value) and "pip install" in str(info.value)


def test_every_pydicom_testdata_file_reads_or_raises_dataerror():
    from pydicom.data import get_testdata_files

    files = [f for f in get_testdata_files() if os.path.isfile(f)]
    n_read = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the deliberately broken files
        for name in files:
            try:
                image, _ = formats.read_dicom(name)
            except DataError as err:
                assert str(name) in str(err)
                continue
            assert image.ndim == 2 and image.dtype == np.float32 and np.isfinite(image).all()
            assert image.min() >= 0 and image.max() <= 1
            n_read += 1
    assert n_read >= 10  # CT_small, MR_small and its RLE/big-endian/implicit variants, image_dfl, …


# --------------------------------------------------------------------------------------------- MetaImage
MET = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2", "MET_UINT": "u4",
       "MET_INT": "i4", "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8", "MET_FLOAT": "f4",
       "MET_DOUBLE": "f8"}


def write_mha(path, array, element_type, big_endian=False, compress=None, extra="", data_file="LOCAL",
              header_size=None):
    """Hand-written MetaImage (independent of formats.write_metaimage); returns the path."""
    data = array.astype(np.dtype(MET[element_type]).newbyteorder(">" if big_endian else "<")).tobytes()
    if compress == "zlib":
        data = zlib.compress(data)
    elif compress == "gzip":
        data = gzip.compress(data)
    dims = " ".join(str(n) for n in reversed(array.shape))
    header = (f"ObjectType = Image\nNDims = {array.ndim}\nBinaryData = True\n"
              f"BinaryDataByteOrderMSB = {big_endian}\nCompressedData = {compress is not None}\n"
              f"ElementSpacing = {' '.join(['0.5'] * array.ndim)}\nDimSize = {dims}\n{extra}"
              f"ElementType = {element_type}\nElementDataFile = {data_file}\n").encode()
    if data_file == "LOCAL":
        path.write_bytes(header + data)
    else:
        path.write_bytes(header)
        (path.parent / data_file).write_bytes(b"\0" * (header_size or 0) + data)
    return path


@pytest.mark.parametrize("element_type", sorted(MET))
@pytest.mark.parametrize("variant", ["raw", "big", "zlib", "gzip"])
def test_metaimage_types_and_encodings(tmp_path, element_type, variant):
    rng = np.random.default_rng(1)
    dtype = np.dtype(MET[element_type])
    low, high = (-100, 100) if dtype.kind in "if" else (0, 200)
    array = rng.integers(low, high, size=(6, 5)).astype(dtype)  # (H, W)
    path = write_mha(tmp_path / "x.mha", array, element_type, big_endian=variant == "big",
                     compress=variant if variant in ("zlib", "gzip") else None)
    read, meta = formats.read_metaimage(path)
    assert read.shape == (6, 5) and read.dtype.kind == dtype.kind and read.dtype.itemsize == dtype.itemsize
    np.testing.assert_array_equal(read, array)
    assert meta["spacing"] == (0.5, 0.5) and meta["spacing_mm"] == 0.5
    image, _ = formats.read_metaimage_image(path)
    np.testing.assert_allclose(image, minmax(array), atol=1e-6)


def test_metaimage_mhd_raw_header_size_and_stack(tmp_path):
    stack = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5) ** 2  # (Z, H, W)
    path = write_mha(tmp_path / "v.mhd", stack, "MET_USHORT", data_file="v.raw", extra="HeaderSize = 16\n",
                     header_size=16)
    read, meta = formats.read_metaimage(path)
    np.testing.assert_array_equal(read, stack)
    assert meta["dim_size"] == (5, 4, 3)
    volume = formats.read_volume(path)
    np.testing.assert_allclose(volume, np.stack([minmax(s) for s in stack]), atol=1e-6)
    np.testing.assert_allclose(formats.read_metaimage_image(path, frame=2)[0], minmax(stack[2]), atol=1e-6)
    with pytest.raises(DataError, match="pass a frame"):
        formats.read_metaimage_image(path)
    with pytest.raises(DataError, match="out of range"):
        formats.read_metaimage_image(path, frame=3)
    single = write_mha(tmp_path / "one.mha", stack[:1], "MET_USHORT")  # Z == 1 → that slice
    np.testing.assert_allclose(formats.read_metaimage_image(single)[0], minmax(stack[0]), atol=1e-6)
    tail = write_mha(tmp_path / "t.mhd", stack, "MET_USHORT", data_file="t.raw", extra="HeaderSize = -1\n",
                     header_size=7)  # -1: data are the last bytes of the file
    np.testing.assert_array_equal(formats.read_metaimage(tail)[0], stack)


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_write_metaimage_round_trip(tmp_path, compressed, suffix):
    array = np.random.default_rng(2).normal(size=(2, 7, 9)).astype(np.float32)
    path = formats.write_metaimage(tmp_path / f"w{suffix}", array, spacing=(0.7, 0.7, 2.0), compressed=compressed)
    read, meta = formats.read_metaimage(path)
    np.testing.assert_array_equal(read, array)
    assert meta["spacing"] == (0.7, 0.7, 2.0) and formats.read_spacing(path) == pytest.approx(0.7)
    assert formats.is_metaimage(path) and not formats.is_dicom(path)


@pytest.mark.parametrize("case, match", [
    ("truncated", "bytes"), ("too_long", "bytes"), ("type", "ElementType"), ("bad_line", "header line"),
    ("no_data_file", "ElementDataFile"), ("channels", "Channels"), ("dims", "DimSize"), ("zlib", "zlib"),
    ("missing_raw", "missing"), ("ndims", "NDims"), ("ascii", "ASCII"), ("not_found", "not found"),
])
def test_metaimage_errors(tmp_path, case, match):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = tmp_path / "bad.mha"
    ok = write_mha(tmp_path / "ok.mha", array, "MET_UCHAR").read_bytes()
    edits = {
        "truncated": lambda: ok[:-3], "too_long": lambda: ok + b"\0\0",
        "type": lambda: ok.replace(b"MET_UCHAR", b"MET_BYTE"),
        "bad_line": lambda: ok.replace(b"NDims = 2", b"NDims: 2"),
        "no_data_file": lambda: ok.split(b"ElementDataFile")[0],
        "channels": lambda: ok.replace(b"ElementType", b"ElementNumberOfChannels = 3\nElementType"),
        "dims": lambda: ok.replace(b"DimSize = 4 3", b"DimSize = 4 x"),
        "zlib": lambda: ok.replace(b"CompressedData = False", b"CompressedData = True"),
        "ndims": lambda: ok.replace(b"NDims = 2", b"NDims = 3"),
        "ascii": lambda: ok.replace(b"BinaryData = True", b"BinaryData = False"),
    }
    if case in edits:
        path.write_bytes(edits[case]())
    elif case == "missing_raw":
        path = write_mha(tmp_path / "m.mhd", array, "MET_UCHAR", data_file="m.raw")
        (tmp_path / "m.raw").unlink()
    with pytest.raises(DataError, match=match) as info:
        formats.read_metaimage(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------- JSRT
def test_jsrt_read_polarity_and_errors(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 4096, size=(2048, 2048), dtype=np.uint16)
    raw[0, 0], raw[0, 1] = 0, 4095
    path = tmp_path / "JPCLN001.IMG"
    path.write_bytes(raw.astype(">u2").tobytes())
    image, meta = formats.read_jsrt(path)
    np.testing.assert_allclose(image, (4095.0 - raw) / 4095.0, atol=1e-6)  # density-like raw → inverted
    assert image[0, 0] == 1.0 and image[0, 1] == 0.0 and meta["spacing_mm"] == 0.175
    assert formats.read_spacing(path) == 0.175
    (tmp_path / "short.IMG").write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="bytes"):
        formats.read_jsrt(tmp_path / "short.IMG")
    (tmp_path / "le.IMG").write_bytes(raw.astype("<u2").tobytes())  # wrong byte order → values > 4095
    with pytest.raises(DataError, match="4095"):
        formats.read_jsrt(tmp_path / "le.IMG")


def test_sniffing(tmp_path, stored):
    dcm = make_dicom(tmp_path / "noext", stored)
    assert formats.is_dicom(dcm) and not formats.is_metaimage(dcm)
    (tmp_path / "t.txt").write_text("hello = world\n")
    assert not formats.is_metaimage(tmp_path / "t.txt") and not formats.is_dicom(tmp_path / "nothing")
