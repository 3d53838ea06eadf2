"""datasets.py: JSRT / NODE21 / ChestX-ray14 / VinDr layouts written in tmp_path with two or three images each.

Expected boxes are computed here from each dataset's documented convention (JSRT centre + size in mm at
0.175 mm/px; NODE21 and NIH top-left + size; VinDr xyxy, readers fused by averaging).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import make_dicom, oracle
from nodule_diffusion import data, datasets, formats
from nodule_diffusion.data import DataError

VOCAB = data.DEFAULT_VOCAB


# --------------------------------------------------------------------------------------------- JSRT
CLNDAT = (
    "JPCLN001.IMG\t5\t15\t53\tmale\t1634\t692\tmalignant\tl.upper lobe(S1+2)\tlung cancer\r"
    "JPCLN002.IMG\t2\t?\t?\tfemale\t100\t200\tbenign\t\tr.lower lobe\t\tgranuloma\r"  # size '?': skipped
    "JPCLN003.IMG 3 30 60 male 2000 40 benign r.middle lobe granuloma"  # glued record, box clipped at border
)
CNNDAT = "JPCNN001.IMG    45   male   non-nodule\r\nJPCNN002.IMG 60 female non-nodule\r\n"


def write_jsrt(root, clndat=CLNDAT, cnndat=CNNDAT, names=None):
    folder = root / "All247images"
    folder.mkdir(parents=True)
    raw = np.zeros((2048, 2048), ">u2")
    raw[:, 1024:] = 4000  # film-density-like: high = dark
    for name in names or ["JPCLN001.IMG", "JPCLN002.IMG", "JPCLN003.IMG", "JPCNN001.IMG", "JPCNN002.IMG"]:
        (folder / name).write_bytes(raw.tobytes())
    (root / "CLNDAT_EN.txt").write_bytes(clndat.encode("latin-1"))
    if cnndat is not None:
        (root / "CNNDAT_EN.TXT").write_bytes(cnndat.encode("latin-1"))
    return root


def test_jsrt_records_boxes_and_extras(tmp_path):
    root = write_jsrt(tmp_path)
    with pytest.warns(UserWarning, match="JPCLN002"):
        records = datasets.load_jsrt(root)
    by_name = {r.image.name: r for r in records}
    assert sorted(by_name) == ["JPCLN001.IMG", "JPCLN003.IMG", "JPCNN001.IMG", "JPCNN002.IMG"]
    assert all(r.spacing_mm == 0.175 for r in records)
    assert by_name["JPCNN001.IMG"].nodules == [] and by_name["JPCNN002.IMG"].nodules == []
    half = 15 / 0.175 / 2  # square box of side size / 0.175 px around the pixel centre (x + 0.5, y + 0.5)
    (nodule,) = by_name["JPCLN001.IMG"].nodules
    np.testing.assert_allclose(nodule.box, (1634.5 - half, 692.5 - half, 1634.5 + half, 692.5 + half))
    assert nodule.diameter_mm == 15 and nodule.attributes == {}
    assert nodule.extra == {"subtlety": "5", "malignancy": "malignant", "location": "l.upper lobe(S1+2)",
                            "diagnosis": "lung cancer"}
    (nodule,) = by_name["JPCLN003.IMG"].nodules
    half = 30 / 0.175 / 2
    np.testing.assert_allclose(nodule.box, (2000.5 - half, 0.0, 2048.0, 40.5 + half))
    assert nodule.extra["location"] == "r.middle lobe" and nodule.extra["diagnosis"] == "granuloma"
    image = data.read_image(by_name["JPCLN001.IMG"].image)  # dense = bright: low raw values become 1
    assert image[0, 0] == 1.0 and image[0, 2000] == 0.0


def test_jsrt_without_cnndat_uses_jpcnn_files(tmp_path):
    clndat = CLNDAT.split("\r")[0]
    records = datasets.load_jsrt(write_jsrt(tmp_path, clndat=clndat, cnndat=None))
    assert sorted(r.image.name for r in records if not r.nodules) == ["JPCNN001.IMG", "JPCNN002.IMG"]


@pytest.mark.parametrize("clndat, match", [
    ("JPCLN001.IMG 5 abc 53 male 1634 692 malignant l.upper lobe cancer", "size"),
    ("JPCLN001.IMG 5 15", "expected"),
    ("JPCLN001.IMG 5 15 53 male 3000 692 malignant x", "inside"),
    (CLNDAT, "JPCLN002.IMG not found"),
    ("no records here", "no JPC"),
])
def test_jsrt_malformed(tmp_path, clndat, match):
    root = write_jsrt(tmp_path, clndat=clndat, cnndat=None, names=["JPCLN001.IMG"])
    with pytest.raises(DataError, match=match) as info:
        datasets.load_jsrt(root)
    assert "CLNDAT_EN.txt" in str(info.value)


# --------------------------------------------------------------------------------------------- NODE21
def write_node21(root, rows=None):
    (root / "images").mkdir(parents=True)
    for name in ("n0001", "c0001"):
        formats.write_metaimage(root / "images" / f"{name}.mha", np.zeros((48, 64), np.uint16), spacing=0.5)
    formats.write_metaimage(root / "n0002.mha", np.ones((48, 64), np.float32), spacing=(0.7, 0.7))
    rows = rows or ["0,10,n0001.mha,1,12,5,6", "1,8,n0001.mha,1,8,40,30", "2,0,c0001.mha,0,0,0,0",
                    "3,20,n0002,1,20,44,28"]
    (root / "metadata.csv").write_text("\n".join([",height,img_name,label,width,x,y", *rows]) + "\n")
    return root


def test_node21_layout(tmp_path):
    records = datasets.load_node21(write_node21(tmp_path))
    by_name = {r.image.name: r for r in records}
    assert sorted(by_name) == ["c0001.mha", "n0001.mha", "n0002.mha"]
    np.testing.assert_allclose(by_name["n0001.mha"].boxes(), [[5, 6, 17, 16], [40, 30, 48, 38]])  # x, y top-left
    assert by_name["c0001.mha"].nodules == [] and by_name["n0002.mha"].boxes().tolist() == [[44, 28, 64, 48]]
    assert by_name["n0001.mha"].spacing_mm == 0.5 and by_name["n0002.mha"].spacing_mm == pytest.approx(0.7)
    # the records survive the project's CSV (the lead's data.write_annotations / read_annotations)
    back = datasets.load_data("csv", data.write_annotations(tmp_path / "ann.csv", records, VOCAB), VOCAB)
    assert sorted((r.image.name, r.boxes().tolist()) for r in back) == \
        sorted((r.image.name, r.boxes().tolist()) for r in records)
    assert datasets.load_data(*datasets.parse_data_spec(f"node21:{tmp_path}"), VOCAB) == records


@pytest.mark.parametrize("rows, match", [
    (["0,10,n0001.mha,1,12,abc,6"], "x = 'abc'"),
    (["0,10,n0001.mha,1,12,60,6"], "outside"),
    (["0,10,n0001.mha,2,12,5,6"], "label"),
    (["0,10,n0001.mha,1,0,5,6"], "degenerate"),
    (["0,10,missing.mha,1,12,5,6"], "not found"),
])
def test_node21_malformed(tmp_path, rows, match):
    root = write_node21(tmp_path, rows)
    with pytest.raises(DataError, match=match) as info:
        datasets.load_node21(root)
    assert "metadata.csv row 2" in str(info.value)


def test_node21_missing_column(tmp_path):
    root = write_node21(tmp_path)
    (root / "metadata.csv").write_text("img_name,x,y,width,height\nn0001.mha,1,1,2,2\n")
    with pytest.raises(DataError, match="missing column.*label"):
        datasets.load_node21(root / "metadata.csv")


# --------------------------------------------------------------------------------------------- ChestX-ray14
def write_nih(root, bbox_rows=None):
    (root / "images").mkdir(parents=True)
    for name in ("00000001_000.png", "00000002_000.png", "00000003_000.png", "00000005_000.png"):
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "images" / name)
    bbox_rows = bbox_rows or ["00000001_000.png,Nodule,10,12,8.5,9", "00000001_000.png,Mass,30,30,20,20",
                              "00000002_000.png,Nodule,40,40,10,10", "00000002_000.png,Atelectasis,1,1,5,5"]
    (root / "BBox_List_2017.csv").write_text("\n".join(["Image Index,Finding Label,Bbox [x,y,w,h],,,",
                                                        *[r + ",,," for r in bbox_rows]]) + "\n")
    entries = [("00000001_000.png", "Nodule|Mass", 2500), ("00000002_000.png", "Nodule", 3000),
               ("00000003_000.png", "No Finding", 2048), ("00000004_000.png", "No Finding", 2048),
               ("00000005_000.png", "No Finding", 2048)]
    (root / "Data_Entry_2017.csv").write_text("\n".join(
        ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
         "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"]
        + [f"{n},{lab},0,1,58,M,PA,{w},{w},0.143,0.143," for n, lab, w in entries]) + "\n")
    return root


def test_nih_layout(tmp_path):
    root = write_nih(tmp_path)
    records = datasets.load_nih(root)  # 00000004 is listed but not on disk: not a negative we hold
    by_name = {r.image.name: r for r in records}
    assert sorted(by_name) == ["00000001_000.png", "00000002_000.png", "00000003_000.png", "00000005_000.png"]
    assert by_name["00000001_000.png"].boxes().tolist() == [[10, 12, 18.5, 21]]
    assert by_name["00000003_000.png"].nodules == []
    assert by_name["00000001_000.png"].spacing_mm == pytest.approx(0.143 * 2500 / 1024)
    both = datasets.load_nih(root, classes=("Nodule", "Mass"), max_negatives=1)
    assert [len(r.nodules) for r in both] == [2, 1, 0]  # one negative only, the first in CSV order
    bare = datasets.load_nih(root, data_entry=False)
    assert len(bare) == 2 and all(r.spacing_mm is None for r in bare)


@pytest.mark.parametrize("row, match", [
    ("00000001_000.png,Nodule,10,x,8,9", "y = 'x'"), ("00000001_000.png,Nodule,60,10,8,9", "outside"),
    ("00000009_000.png,Nodule,10,10,8,9", "not found"),
])
def test_nih_malformed(tmp_path, row, match):
    with pytest.raises(DataError, match=match) as info:
        datasets.load_nih(write_nih(tmp_path, [row]))
    assert "BBox_List_2017.csv row 2" in str(info.value)


# --------------------------------------------------------------------------------------------- VinDr-CXR
def write_dicom(path, rows=64, cols=80):
    pydicom = oracle("pydicom", reason="pydicom is needed to build DICOM fixtures")
    path.parent.mkdir(parents=True, exist_ok=True)
    make_dicom(path, np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) % 4096, "MONOCHROME1", 12,
               PixelSpacing=[0.168, 0.168])
    assert pydicom.dcmread(path).Rows == rows


VINDR_ROWS = [
    "a,Nodule/Mass,8,R1,10,10,30,30", "a,Nodule/Mass,8,R2,12,11,31,29", "a,No finding,14,R3,,,,",
    "b,No finding,14,R1,,,,", "b,No finding,14,R2,,,,",
    "c,Cardiomegaly,3,R1,5,5,50,50", "c,No finding,14,R2,,,,",
    "d,Nodule/Mass,8,R1,5,5,15,15", "d,Nodule/Mass,8,R1,50,40,70,60", "d,Nodule/Mass,8,R2,6,4,16,14",
]


def write_vindr(root, rows=VINDR_ROWS):
    for name in ("train/a.dicom", "train/b.dicom", "c.dcm", "d.dcm"):
        write_dicom(root / name)
    header = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"
    (root / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def test_vindr_union_and_keep(tmp_path):
    root = write_vindr(tmp_path)
    union = {r.image.stem: r for r in datasets.load_vindr(root)}
    assert sorted(union) == ["a", "b", "d"]  # c has a finding other than "No finding": neither class
    assert union["b"].nodules == [] and union["a"].spacing_mm == pytest.approx(0.168)
    np.testing.assert_allclose(union["a"].boxes(), [[11, 10.5, 30.5, 29.5]])  # mean of R1 and R2
    assert union["a"].nodules[0].extra["readers"] == "R1;R2"
    # d: R1's two boxes stay two findings; R2's box overlaps R1's first one (IoU = 64/136 > 0.4)
    np.testing.assert_allclose(union["d"].boxes(), [[5.5, 4.5, 15.5, 14.5], [50, 40, 70, 60]])
    keep = {r.image.stem: r for r in datasets.load_vindr(root / "train.csv", merge="keep")}
    assert len(keep["a"].nodules) == 2 and len(keep["d"].nodules) == 3
    assert [n.extra["rad_id"] for n in keep["d"].nodules] == ["R1", "R1", "R2"]


@pytest.mark.parametrize("row, match", [
    ("a,Nodule/Mass,8,R1,10,ten,30,30", "y_min"), ("a,Nodule/Mass,8,R1,10,10,90,30", "outside"),
    ("e,Nodule/Mass,8,R1,10,10,30,30", "not found"), ("a,Nodule/Mass,8,R1,30,10,10,30", "degenerate"),
])
def test_vindr_malformed(tmp_path, row, match):
    with pytest.raises(DataError, match=match) as info:
        datasets.load_vindr(write_vindr(tmp_path, [row]))
    assert "train.csv" in str(info.value)


def test_vindr_dicom_images_read_as_dense_bright(tmp_path):
    (record, *_) = datasets.load_vindr(write_vindr(tmp_path, VINDR_ROWS[:2]))
    image = data.read_image(record.image)
    assert image.shape == (64, 80) and image[0, 0] == 1.0  # MONOCHROME1: stored 0 is white


# --------------------------------------------------------------------------------------------- --data option
def test_parse_data_spec():
    assert datasets.parse_data_spec("phantom") == ("phantom", None)
    fmt, path = datasets.parse_data_spec("jsrt:/data/JSRT")
    assert fmt == "jsrt" and str(path) == "/data/JSRT"
    assert datasets.parse_data_spec("NODE21:C:/x")[0] == "node21"
    for bad, match in [("dicomdir:/x", "jsrt, node21"), ("jsrt", "missing path"), ("csv:", "missing path")]:
        with pytest.raises(DataError, match=match):
            datasets.parse_data_spec(bad)
    assert set(datasets.DATA_FORMATS) >= {"phantom", "csv", "coco", "jsrt", "node21", "nih", "vindr"}


def test_load_coco_delegates(tmp_path):
    records = datasets.load_node21(write_node21(tmp_path))
    path = data.write_coco(tmp_path / "ann.json", records, [(48, 64)] * len(records))
    back = datasets.load_coco(path, VOCAB)
    assert [r.boxes().tolist() for r in back] == [r.boxes().tolist() for r in records]
    with pytest.raises(DataError, match="does not exist"):
        datasets.load_data("coco", tmp_path / "nope.json", VOCAB)
    with pytest.raises(DataError, match="no loader"):
        datasets.load_data("phantom", tmp_path, VOCAB)
