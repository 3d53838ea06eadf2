"""Tests for nodule_diffusion.data: image reading, annotation CSV / COCO I/O, masks, resampling, crops.

Every fixture is a tiny file written into tmp_path from a numpy array we know, so expected values are the arrays
themselves (8-bit /255, 16-bit /65535), closed-form geometry (ellipse area π·rx·ry, 2×2 block means) or plain
numpy slicing / padding. DICOM, MetaImage and JSRT readers live in formats.py and are tested there.
"""

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import oracle
from nodule_diffusion.data import (
    DEFAULT_VOCAB, DataError, ImageRecord, Nodule, NoduleCrops, attribute_indices, crop_at, dilate, load_record,
    nodule_mask, read_annotations, read_coco, read_image, write_annotations, write_coco)

H, W = 48, 64  # fixture image size (rows, columns)


def _save(path, arr, **kwargs):
    Image.fromarray(arr).save(path, **kwargs)
    return path


def _image16(rng, h=H, w=W):
    return rng.integers(0, 65536, size=(h, w), dtype=np.uint16)


# ----------------------------------------------------------------------------------------------- read_image
@pytest.mark.parametrize("suffix, dtype, scale", [
    (".png", np.uint8, 255.0), (".png", np.uint16, 65535.0),
    (".tif", np.uint8, 255.0), (".tif", np.uint16, 65535.0), (".tif", np.float32, 1.0)])
def test_read_image_scales_by_dtype_range(tmp_path, suffix, dtype, scale):
    rng = np.random.default_rng(0)
    if dtype == np.float32:
        arr = rng.random((H, W), dtype=np.float32)  # already in [0, 1]: kept as is
    else:
        arr = rng.integers(0, np.iinfo(dtype).max + 1, size=(H, W), dtype=dtype)
        arr[0, 0], arr[0, 1] = 0, np.iinfo(dtype).max  # both ends of the range
    out = read_image(_save(tmp_path / f"img{suffix}", arr))
    assert out.dtype == np.float32 and out.shape == (H, W)
    np.testing.assert_allclose(out, arr.astype(np.float64) / scale, rtol=0, atol=1e-6)
    if dtype != np.float32:
        assert out[0, 0] == 0.0 and out[0, 1] == 1.0


def test_read_image_float_tiff_outside_unit_range_is_min_max_scaled(tmp_path):
    arr = np.linspace(-3.0, 5.0, H * W, dtype=np.float32).reshape(H, W)
    out = read_image(_save(tmp_path / "f.tif", arr))
    np.testing.assert_allclose(out, (arr + 3.0) / 8.0, atol=1e-6)


def test_read_image_rgb_png_is_luminance(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = read_image(_save(tmp_path / "rgb.png", rgb))
    # ITU-R BT.601 luma L = 0.299·R + 0.587·G + 0.114·B, then /255; PIL rounds to an 8-bit integer.
    expected = (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 255.0
    assert out.shape == (H, W) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1.0 / 255 + 1e-6)
    assert out[0, 1] > out[0, 0] > out[0, 2]  # green is the brightest primary, blue the darkest


def test_read_image_palette_png_is_luminance(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (H, 1))[:, :W]
    pil = Image.fromarray(gray).convert("P")
    pil.save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    np.testing.assert_allclose(read_image(tmp_path / "pal.png"), gray / 255.0, atol=1.0 / 255 + 1e-6)


def test_read_image_jpeg(tmp_path):
    yy, xx = np.mgrid[0:H, 0:W]
    smooth = (255 * (0.5 + 0.4 * np.sin(xx / 9.0) * np.cos(yy / 7.0))).round().astype(np.uint8)
    out = read_image(_save(tmp_path / "img.jpg", smooth, quality=95))
    assert out.shape == (H, W) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    err = np.abs(out - smooth / 255.0)
    assert err.mean() < 1.5 / 255 and err.max() < 8.0 / 255  # JPEG is lossy, but not by much at quality 95


@pytest.mark.parametrize("content", [b"", b"\x00not an image at all" * 20, "truncated"])
def test_read_image_unreadable_raises_data_error(tmp_path, content):
    path = tmp_path / "broken.png"
    if content == "truncated":
        _save(path, _image16(np.random.default_rng(2)))
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(DataError, match="broken.png"):
        read_image(path)


def test_read_image_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")


# ----------------------------------------------------------------------------------------------- annotation CSV
@pytest.fixture
def scene(tmp_path):
    """Two images on disk: a.png with a mask file for one nodule, b.png negative. Returns (root, records)."""
    rng = np.random.default_rng(3)
    (tmp_path / "img").mkdir()
    _save(tmp_path / "img" / "a.png", _image16(rng))
    _save(tmp_path / "img" / "b.png", _image16(rng))
    mask = np.zeros((H, W), np.uint8)
    mask[10:20, 12:26] = 255
    _save(tmp_path / "img" / "a_mask.png", mask)
    records = [
        ImageRecord(image=tmp_path / "img" / "a.png", spacing_mm=0.7, nodules=[
            Nodule(box=(12.0, 10.0, 26.0, 20.0), attributes={"texture": "solid", "margin": "spiculated",
                                                             "calcification": "none"},
                   mask=tmp_path / "img" / "a_mask.png", diameter_mm=9.8, extra={"subtlety": "3"}),
            Nodule(box=(30.5, 25.25, 41.75, 40.0), attributes={"texture": "ground_glass"}, diameter_mm=None),
        ]),
        ImageRecord(image=tmp_path / "img" / "b.png", spacing_mm=None, nodules=[]),
    ]
    return tmp_path, records


def _assert_same_records(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.image == e.image.resolve() and g.spacing_mm == e.spacing_mm and g.frame == e.frame
        assert len(g.nodules) == len(e.nodules)
        for gn, en in zip(g.nodules, e.nodules):
            np.testing.assert_allclose(gn.box, en.box, atol=0.005)  # the CSV keeps 2 decimals of a pixel
            assert gn.attributes == en.attributes
            assert gn.mask == (None if en.mask is None else en.mask.resolve())
            assert gn.diameter_mm == en.diameter_mm
            assert gn.extra == en.extra


def test_annotation_csv_round_trip(scene):
    root, records = scene
    csv_path = write_annotations(root / "annotations.csv", records)
    rows = list(csv.reader(csv_path.open()))
    assert rows[0][:5] == ["image", "x0", "y0", "x1", "y1"]
    assert rows[1][0] == "img/a.png"  # relative to the CSV's folder
    negative = [r for r in rows[1:] if r[0] == "img/b.png"]
    assert len(negative) == 1 and negative[0][1:5] == ["", "", "", ""]
    _assert_same_records(read_annotations(csv_path), records)
    # a second round trip is exact (what was written is what is read)
    again = write_annotations(root / "again.csv", read_annotations(csv_path))
    assert again.read_text() == csv_path.read_text()


GOOD_ROW = {"image": "img/a.png", "x0": "12", "y0": "10", "x1": "26", "y1": "20", "texture": "solid"}


@pytest.mark.parametrize("change, message", [
    ({"x0": "abc"}, "'x0' is not a number"),
    ({"y1": "nan"}, "'y1' is not finite"),
    ({"x1": "12"}, "need x1 > x0"),
    ({"y1": "5"}, "need x1 > x0 and y1 > y0"),
    ({"x1": str(W + 1)}, f"outside the {W}x{H} image"),
    ({"x0": "-0.5"}, "outside"),
    ({"texture": "glassy"}, "unknown texture value 'glassy'; allowed: solid, part_solid, ground_glass"),
    ({"image": "img/missing.png"}, "image 'img/missing.png' not found"),
    ({"mask": "img/missing_mask.png"}, "mask 'img/missing_mask.png' not found"),
    ({"x1": "", "y1": ""}, "all filled or all empty"),
    ({"image": ""}, "empty 'image'"),
])
def test_annotation_csv_bad_row_names_file_and_row(scene, change, message):
    root, _ = scene
    header = ["image", "x0", "y0", "x1", "y1", "texture", "mask"]
    path = root / "bad.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, header)
        writer.writeheader()
        writer.writerow(GOOD_ROW)  # row 2 is fine
        writer.writerow({**GOOD_ROW, **change})  # row 3 is not
    with pytest.raises(DataError) as err:
        read_annotations(path)
    assert f"{path} row 3" in str(err.value)
    assert message in str(err.value)


def test_annotation_csv_missing_columns(scene):
    root, _ = scene
    path = root / "bad.csv"
    path.write_text("image,x0,y0,x1,texture\nimg/a.png,1,2,3,solid\n")
    with pytest.raises(DataError, match=r"bad\.csv: missing column\(s\) y1"):
        read_annotations(path)
    with pytest.raises(DataError, match="nope.csv"):
        read_annotations(root / "nope.csv")


def test_annotation_csv_vocab_is_data_not_code(scene):
    root, _ = scene
    path = root / "ext.csv"
    path.write_text("image,x0,y0,x1,y1,texture,lobe\nimg/a.png,12,10,26,20,cavitary,upper\n")
    with pytest.raises(DataError, match="unknown texture value 'cavitary'"):
        read_annotations(path)
    vocab = copy.deepcopy(DEFAULT_VOCAB)
    vocab["texture"].append("cavitary")  # a new value ...
    vocab["lobe"] = ["upper", "lower"]  # ... and a new attribute, with no code change
    (rec,) = read_annotations(path, vocab)
    assert rec.nodules[0].attributes == {"texture": "cavitary", "lobe": "upper"}
    assert attribute_indices(rec.nodules[0].attributes, vocab) == [3, -1, -1, 0]
    # with the default vocabulary 'lobe' is not an attribute, so it is kept verbatim as an extra column
    path.write_text("image,x0,y0,x1,y1,texture,lobe\nimg/a.png,12,10,26,20,solid,upper\n")
    assert read_annotations(path)[0].nodules[0].extra == {"lobe": "upper"}
    assert DEFAULT_VOCAB["texture"] == ["solid", "part_solid", "ground_glass"]


# ----------------------------------------------------------------------------------------------- COCO
def test_coco_round_trip(scene):
    root, records = scene
    path = write_coco(root / "coco.json", records, sizes=[(H, W), (H, W)])
    _assert_same_records(read_coco(path), records)
    coco = json.loads(path.read_text())
    ann = coco["annotations"][1]
    assert ann["bbox"] == [30.5, 25.25, 41.75 - 30.5, 40.0 - 25.25]  # [x, y, w, h]
    assert ann["area"] == pytest.approx((41.75 - 30.5) * (40.0 - 25.25))
    assert [img["file_name"] for img in coco["images"]] == ["img/a.png", "img/b.png"]
    pycoco = oracle("pycocotools.coco", reason="pycocotools is the COCO-format oracle")
    api = pycoco.COCO(str(path))
    assert len(api.getAnnIds(imgIds=[1])) == 2 and len(api.getAnnIds(imgIds=[2])) == 0


def test_coco_extra_column_named_id_does_not_clobber_fields(scene):
    root, records = scene
    records[0].nodules[0].extra = {"id": "N-17", "bbox": "free text"}
    path = write_coco(root / "coco.json", records, sizes=[(H, W), (H, W)])
    anns = json.loads(path.read_text())["annotations"]
    assert [a["id"] for a in anns] == [1, 2] and anns[0]["bbox"] == [12.0, 10.0, 14.0, 10.0]
    assert read_coco(path)[0].nodules[0].extra == {"id": "N-17", "bbox": "free text"}


@pytest.mark.parametrize("bbox, message", [
    ([10, 10, 0, 5], "degenerate"), ([10, 10, -3, 5], "degenerate"), ([10, 10, float("nan"), 5], "non-finite"),
    ([60, 10, 10, 5], "outside"), ([10, 10, 5], "bad bbox"), (["a", 1, 2, 3], "bad bbox"), (None, "bad bbox")])
def test_coco_bad_bbox(scene, bbox, message):
    root, records = scene
    path = write_coco(root / "coco.json", records, sizes=[(H, W), (H, W)])
    coco = json.loads(path.read_text())
    coco["annotations"][1]["bbox"] = bbox
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=message) as err:
        read_coco(path)
    assert str(path) in str(err.value) and "annotation id 2" in str(err.value)


def test_coco_bad_structure(scene):
    root, records = scene
    path = root / "coco.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="coco.json"):
        read_coco(path)
    path.write_text(json.dumps({"images": [{"id": 1, "width": W, "height": H}], "annotations": []}))
    with pytest.raises(DataError, match="has no 'file_name'"):
        read_coco(path)


# ----------------------------------------------------------------------------------------------- masks, resampling
def test_nodule_mask_from_file(scene):
    _, records = scene
    nod = records[0].nodules[0]
    mask = nodule_mask(nod, (H, W))
    expected = np.zeros((H, W), bool)
    expected[10:20, 12:26] = True
    assert mask.dtype == bool and np.array_equal(mask, expected)
    with pytest.raises(DataError, match="a_mask.png"):
        nodule_mask(nod, (H, W + 1))


@pytest.mark.parametrize("box", [(10.0, 8.0, 50.0, 32.0), (3.5, 20.25, 17.5, 41.0)])
def test_nodule_mask_inscribed_ellipse(box):
    mask = nodule_mask(Nodule(box=box), (H, W))
    rx, ry = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    assert mask.sum() == pytest.approx(math.pi * rx * ry, rel=0.04)
    ys, xs = np.nonzero(mask)
    # pixel (x, y) covers [x, x+1) × [y, y+1): every set pixel's centre lies inside the box
    assert xs.min() + 0.5 >= box[0] and xs.max() + 0.5 <= box[2]
    assert ys.min() + 0.5 >= box[1] and ys.max() + 0.5 <= box[3]
    assert mask[int((box[1] + box[3]) / 2), int((box[0] + box[2]) / 2)]


def test_load_record_halves_size_at_double_spacing(scene):
    _, records = scene
    rec = records[0]  # spacing 0.7 mm/pixel
    image0 = read_image(rec.image)
    image, boxes, masks = load_record(rec, spacing_mm=1.4)
    assert image.shape == (H // 2, W // 2) and image.dtype == np.float32
    # an exact factor of 2 with the box filter is the mean of each 2×2 block
    np.testing.assert_allclose(image, image0.reshape(H // 2, 2, W // 2, 2).mean(axis=(1, 3)), atol=1e-5)
    np.testing.assert_allclose(boxes, rec.boxes() / 2, atol=1e-5)
    assert boxes.dtype == np.float32 and boxes.shape == (2, 4)
    for mask, box, nod in zip(masks, boxes, rec.nodules):
        assert mask.shape == image.shape and mask.dtype == bool
        assert mask.sum() == pytest.approx(nodule_mask(nod, (H, W)).sum() / 4, rel=0.15)
        ys, xs = np.nonzero(mask)  # the resampled mask still sits in the resampled box
        assert box[0] - 1 <= xs.min() and xs.max() + 1 <= box[2] + 1
        assert box[1] - 1 <= ys.min() and ys.max() + 1 <= box[3] + 1


def test_load_record_upsamples_and_keeps_unknown_spacing(scene):
    _, records = scene
    image, boxes, masks = load_record(records[0], spacing_mm=0.35)
    assert image.shape == (2 * H, 2 * W) and 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_allclose(boxes, records[0].boxes() * 2, atol=1e-5)
    assert masks[0].sum() == pytest.approx(4 * 10 * 14, rel=0.1)
    for rec, spacing in ((records[0], None), (records[1], 1.4)):  # None target, or unknown source spacing
        image, boxes, masks = load_record(rec, spacing_mm=spacing)
        np.testing.assert_array_equal(image, read_image(rec.image))
        np.testing.assert_array_equal(boxes, rec.boxes())
        assert len(masks) == len(rec.nodules)
    assert load_record(records[1], None)[1].shape == (0, 4)


# ----------------------------------------------------------------------------------------------- crop_at, dilate
def test_crop_at_interior_is_slicing():
    image = np.random.default_rng(4).random((H, W), dtype=np.float32)
    patch, (top, left) = crop_at(image, cx=30.0, cy=20.0, size=16)
    assert (top, left) == (12, 22)
    np.testing.assert_array_equal(patch, image[12:28, 22:38])
    patch, (top, left) = crop_at(image, cx=30.4, cy=19.6, size=15)  # odd size: corner = round(c − size/2)
    assert (top, left) == (round(19.6 - 7.5), round(30.4 - 7.5))
    np.testing.assert_array_equal(patch, image[top:top + 15, left:left + 15])


@pytest.mark.parametrize("cx, cy, size", [
    (2.0, 3.0, 16), (62.0, 46.0, 16), (-5.0, 50.0, 12),
    (32.0, 24.0, 100), (-50.0, 24.0, 16)])  # wider than the image; pad (58) > image height (48)
def test_crop_at_reflects_off_the_border(cx, cy, size):
    image = np.random.default_rng(5).random((H, W), dtype=np.float32)
    patch, (top, left) = crop_at(image, cx, cy, size)
    assert patch.shape == (size, size)
    assert (top, left) == (round(cy - size / 2), round(cx - size / 2))
    big = 3 * max(H, W)
    padded = np.pad(image, big, mode="reflect")  # reflection about the edge pixel: row −1 = row 1
    np.testing.assert_array_equal(patch, padded[top + big:top + big + size, left + big:left + big + size])


def test_crop_at_reflection_is_about_the_edge_pixel():
    image = np.arange(H * W, dtype=np.float32).reshape(H, W)
    patch, (top, left) = crop_at(image, cx=0.0, cy=0.0, size=4)  # window rows/cols −2..1
    assert (top, left) == (-2, -2)
    np.testing.assert_array_equal(patch[2:, 2:], image[:2, :2])
    np.testing.assert_array_equal(patch[0, 2:], image[2, :2])  # row −2 mirrors row 2
    np.testing.assert_array_equal(patch[2:, 1], image[:2, 1])  # column −1 mirrors column 1


def test_dilate_square():
    mask = torch.zeros(1, 1, 9, 9)
    mask[0, 0, 4, 4] = 1
    out = dilate(mask, 2)
    assert out.shape == mask.shape and out.sum() == 25 and out[0, 0, 2:7, 2:7].all()
    assert torch.equal(dilate(mask, 0), mask)


# ----------------------------------------------------------------------------------------------- NoduleCrops
@pytest.fixture
def crops_records(scene):
    root, records = scene
    rng = np.random.default_rng(6)
    _save(root / "img" / "c.png", _image16(rng))
    records.append(ImageRecord(image=root / "img" / "c.png", nodules=[
        Nodule(box=(0.0, 40.0, 6.0, 48.0), attributes={"margin": "ill_defined", "calcification": "calcified"})]))
    return records


def test_nodule_crops_item_contract(crops_records):
    ds = NoduleCrops(crops_records, DEFAULT_VOCAB, crop_size=16, spacing_mm=None, augment=True, max_shift=2,
                     reach=0.5)
    assert len(ds) == 3
    batch = ds.get(torch.arange(3), generator=torch.Generator().manual_seed(0))
    assert set(batch) == {"x0", "mask", "region", "context", "attrs"}
    for key in ("x0", "mask", "region", "context"):
        assert batch[key].shape == (3, 1, 16, 16) and batch[key].dtype == torch.float32
    assert batch["attrs"].shape == (3, 3) and batch["attrs"].dtype == torch.int64
    x0, mask, region, context = batch["x0"], batch["mask"], batch["region"], batch["context"]
    assert x0.min() >= -1 and x0.max() <= 1
    for m in (mask, region):
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert (region >= mask).all() and mask.sum() > 0
    assert torch.equal(context[region == 1], torch.zeros_like(context[region == 1]))
    assert torch.equal(context[region == 0], x0[region == 0])
    assert batch["attrs"].tolist() == [[0, 2, 0], [2, -1, -1], [-1, 1, 1]]  # -1 = unknown
    item = ds[1]
    assert item["x0"].shape == (1, 16, 16) and item["attrs"].tolist() == [2, -1, -1]


def test_nodule_crops_unaugmented_is_the_centred_crop(crops_records):
    ds = NoduleCrops(crops_records, DEFAULT_VOCAB, crop_size=16, spacing_mm=None, augment=False)
    a, b = ds.get(torch.arange(3)), ds.get(torch.arange(3), generator=torch.Generator().manual_seed(9))
    for key in a:
        assert torch.equal(a[key], b[key])
    for i, (rec, nod) in enumerate([(crops_records[0], n) for n in crops_records[0].nodules]
                                   + [(crops_records[2], crops_records[2].nodules[0])]):
        cx, cy = (nod.box[0] + nod.box[2]) / 2, (nod.box[1] + nod.box[3]) / 2
        expected = crop_at(read_image(rec.image), cx, cy, 16)[0] * 2 - 1
        np.testing.assert_allclose(a["x0"][i, 0].numpy(), expected, atol=1e-6)
        expected_mask = crop_at(nodule_mask(nod, (H, W)).astype(np.float32), cx, cy, 16)[0]
        np.testing.assert_array_equal(a["mask"][i, 0].numpy(), expected_mask)


def test_nodule_crops_augmentation_is_seeded_and_aligned(crops_records):
    ds = NoduleCrops(crops_records, DEFAULT_VOCAB, crop_size=16, spacing_mm=None, augment=True, max_shift=2)
    idx = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def draw(seed):
        return ds.get(idx, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(1), draw(1), draw(2)
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["x0"], c["x0"])
    # with no shift, an augmented crop is the centred crop flipped; x0 and mask flip together
    ds0 = NoduleCrops(crops_records, DEFAULT_VOCAB, crop_size=16, spacing_mm=None, augment=True, max_shift=0)
    plain = NoduleCrops(crops_records, DEFAULT_VOCAB, crop_size=16, spacing_mm=None, augment=False).get(idx)
    aug = ds0.get(idx, generator=torch.Generator().manual_seed(3))
    seen = set()
    for i in range(len(idx)):
        flips = [dims for dims in ([], [-1], [-2], [-1, -2])
                 if torch.equal(aug["x0"][i], plain["x0"][i].flip(dims) if dims else plain["x0"][i])]
        assert flips, "augmented crop is not a flip of the centred crop"
        dims = flips[0]
        assert torch.equal(aug["mask"][i], plain["mask"][i].flip(dims) if dims else plain["mask"][i])
        seen.add(tuple(dims))
    assert len(seen) > 1  # 8 draws of 4 equally likely flips


def test_nodule_crops_resamples_to_spacing(scene):
    _, records = scene
    ds = NoduleCrops(records[:1], DEFAULT_VOCAB, crop_size=16, spacing_mm=1.4, augment=False)
    mask_area = ds.get(torch.tensor([0]))["mask"].sum().item()
    assert mask_area == pytest.approx(10 * 14 / 4, rel=0.15)  # 0.7 → 1.4 mm/pixel quarters the area


def test_nodule_crops_all_negative_is_an_error(scene):
    _, records = scene
    with pytest.raises(DataError, match="no nodules"):
        NoduleCrops(records[1:], DEFAULT_VOCAB)
    with pytest.raises(DataError, match="no nodules"):
        NoduleCrops([], DEFAULT_VOCAB)
