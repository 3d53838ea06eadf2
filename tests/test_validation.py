"""Malformed input of every kind the readers handle gives one clean line, never a traceback or a wrong result.

Issue 11, lower layer: annotation-CSV rows, images and their headers (PNG, DICOM, MetaImage), model checkpoints,
UNetConfig dicts and LoRA adapter files. Each table row is a malformed variant; the assertion is always the same
(`refused`): a DataError whose message names the file and has no line break. Hypothesis adds random variants of
the CSV's numeric fields: whatever the text, the reader either refuses it cleanly or returns values inside the
physical ranges of data.py.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from conftest import make_dicom
from nodule_diffusion import checks, data, datasets, formats, lora
from nodule_diffusion.common import (CHECKPOINT_FORMAT_VERSION, DataError, load_checkpoint, save_checkpoint,
                                     tensor_digest)
from nodule_diffusion.data import DEFAULT_VOCAB, read_annotations
from nodule_diffusion.unet import UNetConfig

HEADER = "image,x0,y0,x1,y1,texture,diameter_mm,spacing_mm,mask\n"
GOOD_ROW = {"image": "img.png", "x0": "10", "y0": "10", "x1": "20", "y1": "20", "texture": "solid",
            "diameter_mm": "10", "spacing_mm": "1.0", "mask": ""}


def refused(fn, name: str) -> str:
    """Run fn; it must raise a one-line DataError naming `name`. Returns the message."""
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert name in message, message
    assert "\n" not in message and "\r" not in message, message
    return message


def write_png(path, shape=(64, 64), value=0.5):
    Image.fromarray(np.full(shape, int(value * 255), np.uint8)).save(path)
    return path


def png_claiming(path, width: int, height: int):
    """A valid 64×64 PNG whose IHDR chunk then claims width × height (CRC fixed, pixels never decodable)."""
    write_png(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16: width, height
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))  # CRC over "IHDR" + its 13 data bytes
    path.write_bytes(bytes(raw))
    return path


def write_dicom(path, rows=64, cols=64, **tags):
    """A MONOCHROME2 12-bit DX file with a ramp of stored values (conftest.make_dicom) and extra `tags`."""
    return make_dicom(path, np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) % 4096, "MONOCHROME2", 12,
                      **tags)


def write_csv(folder, rows: list[dict], name="ann.csv", header=HEADER):
    columns = header.strip().split(",")
    lines = [header] + [",".join(str(row.get(c, "")) for c in columns) + "\n" for row in rows]
    path = folder / name
    path.write_text("".join(lines))
    return path


@pytest.fixture
def folder(tmp_path):
    write_png(tmp_path / "img.png")
    write_png(tmp_path / "tiny.png", (1, 1))
    write_png(tmp_path / "small_mask.png", (10, 10), 1.0)
    write_png(tmp_path / "empty_mask.png", (64, 64), 0.0)
    png_claiming(tmp_path / "bomb.png", 100000, 100000)
    png_claiming(tmp_path / "huge.png", 12000, 12000)
    return tmp_path


# ----------------------------------------------------------------------------------------------- CSV rows
CSV_CASES = {  # name -> changes to GOOD_ROW
    "spacing zero": {"spacing_mm": "0"}, "spacing negative": {"spacing_mm": "-1.4"},
    "spacing NaN": {"spacing_mm": "nan"}, "spacing inf": {"spacing_mm": "inf"},
    "spacing tiny": {"spacing_mm": "0.001"}, "spacing huge": {"spacing_mm": "100"},
    "spacing text": {"spacing_mm": "1,4mm"},
    "diameter negative": {"diameter_mm": "-12"}, "diameter zero": {"diameter_mm": "0"},
    "diameter huge": {"diameter_mm": "5950"}, "diameter inf": {"diameter_mm": "inf"},
    "diameter NaN": {"diameter_mm": "nan"},
    "diameter on a clipped box": {"x0": "60", "x1": "64", "y0": "60", "y1": "64", "diameter_mm": "19"},
    "box NaN": {"x0": "nan"}, "box 1e308": {"x1": "1e308"}, "box outside": {"x1": "65"},
    "box negative": {"x0": "-3"}, "box degenerate": {"x1": "10"}, "box partial": {"y1": ""},
    "unknown attribute": {"texture": "plaid"}, "missing image": {"image": "nope.png"},
    "image 1x1": {"image": "tiny.png", "x0": "", "y0": "", "x1": "", "y1": "", "diameter_mm": ""},
    "image header 100000^2": {"image": "bomb.png"}, "image header 12000^2": {"image": "huge.png"},
    "mask of another size": {"mask": "small_mask.png"}, "missing mask": {"mask": "nope_mask.png"},
}


@pytest.mark.parametrize("case", CSV_CASES)
def test_malformed_csv_rows_are_refused(folder, case):
    path = write_csv(folder, [GOOD_ROW, {**GOOD_ROW, **CSV_CASES[case]}])
    message = refused(lambda: read_annotations(path), "ann.csv")
    assert "row 3" in message  # the first row is fine: the message points at the bad one


def test_good_csv_row_is_accepted(folder):
    (record,) = read_annotations(write_csv(folder, [GOOD_ROW]))
    assert record.spacing_mm == 1.0 and record.nodules[0].diameter_mm == 10.0


@pytest.mark.parametrize("text, where", [("", "ann.csv"), (HEADER, "no rows after the header"),
                                         ("image,x0\n", "missing column")])
def test_empty_and_header_only_csv(folder, text, where):
    path = folder / "ann.csv"
    path.write_text(text)
    assert where in refused(lambda: read_annotations(path), "ann.csv")


def test_csv_data_needs_a_spacing_from_column_or_header(folder):
    path = write_csv(folder, [{**GOOD_ROW, "spacing_mm": ""}])
    assert read_annotations(path)[0].spacing_mm is None  # the plain reader keeps "unknown"
    message = refused(lambda: datasets.load_data("csv", path, DEFAULT_VOCAB), "ann.csv")
    assert "spacing_mm" in message and "img.png" in message


def test_coco_data_needs_a_spacing_too(folder):
    (record,) = read_annotations(write_csv(folder, [{**GOOD_ROW, "spacing_mm": ""}]))
    path = data.write_coco(folder / "coco.json", [record], [(64, 64)])
    assert data.read_coco(path)[0].spacing_mm is None
    assert "spacing_mm" in refused(lambda: datasets.load_data("coco", path, DEFAULT_VOCAB), "coco.json")
    record.spacing_mm = 0.01
    path = data.write_coco(folder / "coco.json", [record], [(64, 64)])
    refused(lambda: data.read_coco(path), "coco.json")


def test_empty_request_mask_is_refused_when_loaded(folder):
    path = write_csv(folder, [{**GOOD_ROW, "mask": "empty_mask.png"}])
    (record,) = read_annotations(path)
    refused(lambda: data.load_record(record, 1.0), "empty_mask.png")


@pytest.mark.parametrize("target", [0.0, -1.0, 100.0, math.nan, 1e-6])
def test_working_spacing_outside_the_physical_range_is_refused(folder, target):
    (record,) = read_annotations(write_csv(folder, [GOOD_ROW]))
    refused(lambda: data.load_record(record, target), "--spacing_mm")


def test_resampling_to_a_uselessly_small_image_is_refused(folder):
    (record,) = read_annotations(write_csv(folder, [{**GOOD_ROW, "spacing_mm": "0.05", "diameter_mm": ""}]))
    refused(lambda: data.load_record(record, 5.0), "img.png")  # 64 px × 0.05/5 → 1 px


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-10**6, 10**6).map(str),
                    st.text(alphabet="0123456789.-+eE naif", max_size=8))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spacing=NUMBERS, diameter=NUMBERS, x0=NUMBERS, x1=NUMBERS)
def test_random_numeric_fields_are_refused_or_physical(folder, spacing, diameter, x0, x1):
    path = write_csv(folder, [{**GOOD_ROW, "spacing_mm": spacing, "diameter_mm": diameter, "x0": x0, "x1": x1}])
    try:
        (record,) = read_annotations(path)
    except DataError as err:
        assert "ann.csv" in str(err) and "\n" not in str(err)
        return
    (nodule,) = record.nodules
    lo, hi = checks.SPACING_RANGE_MM
    assert record.spacing_mm is None or lo <= record.spacing_mm <= hi  # an empty field stays unknown
    assert nodule.diameter_mm is None or 0 < nodule.diameter_mm <= checks.MAX_DIAMETER_MM
    assert 0 <= nodule.box[0] < nodule.box[2] <= 64


# ----------------------------------------------------------------------------------------------- image headers
def test_image_headers_are_checked_before_decoding(folder):
    for name in ("bomb.png", "huge.png"):
        for read in (data.read_image, data.image_size):
            refused(lambda: read(folder / name), name)
    assert data.image_size(folder / "img.png") == (64, 64)
    refused(lambda: data.image_size(folder / "tiny.png"), "tiny.png")


def test_dicom_header_spacing_is_used_and_checked(folder):
    write_dicom(folder / "a.dcm", PixelSpacing=[0.66, 0.66])
    row = {**GOOD_ROW, "image": "a.dcm", "spacing_mm": "", "diameter_mm": "6"}
    assert datasets.load_data("csv", write_csv(folder, [row]), DEFAULT_VOCAB)[0].spacing_mm == pytest.approx(0.66)
    assert read_annotations(write_csv(folder, [{**row, "spacing_mm": "0.5"}]))[0].spacing_mm == 0.5  # column wins
    write_dicom(folder / "b.dcm", PixelSpacing=[40, 40])
    message = refused(lambda: read_annotations(write_csv(folder, [{**row, "image": "b.dcm"}])), "ann.csv")
    assert "b.dcm" in message and "spacing_mm" in message
    write_dicom(folder / "c.dcm", PixelSpacing=[0, 0])  # 0\0 counts as missing (formats.py) ...
    refused(lambda: datasets.load_data("csv", write_csv(folder, [{**row, "image": "c.dcm"}]), DEFAULT_VOCAB),
            "c.dcm")  # ... so csv: data has no spacing at all
    write_dicom(folder / "d.dcm", rows=8, cols=8, PixelSpacing=[1, 1])
    refused(lambda: read_annotations(write_csv(folder, [{**row, "image": "d.dcm", "x0": "", "y0": "", "x1": "",
                                                         "y1": "", "diameter_mm": ""}])), "d.dcm")


@pytest.mark.parametrize("changes, match", [
    ({"DimSize": "100000 100000"}, "pixels"), ({"NDims": "3", "DimSize": "64 64 100000", "ElementSpacing": "1 1 1"},
                                              "elements"),
    ({"ElementSpacing": "nan 1"}, "ElementSpacing"), ({"ElementSpacing": "0 0"}, "ElementSpacing"),
    ({"DimSize": "64"}, "NDims"), ({"ElementType": "MET_COMPLEX"}, "ElementType")])
def test_malformed_metaimage_headers(folder, changes, match):
    good = {"ObjectType": "Image", "NDims": "2", "DimSize": "64 64", "ElementSpacing": "0.5 0.5",
            "ElementType": "MET_UCHAR"}
    lines = {**good, **changes}
    path = folder / "m.mha"
    text = "".join(f"{k} = {v}\n" for k, v in lines.items()) + "ElementDataFile = LOCAL\n"
    path.write_bytes(text.encode() + bytes(64 * 64))
    assert match in refused(lambda: data.read_image(path), "m.mha")


def test_metaimage_spacing_is_used_and_zlib_bombs_stop(folder):
    formats.write_metaimage(folder / "ok.mha", np.zeros((64, 64), np.uint8), spacing=0.66)
    row = {**GOOD_ROW, "image": "ok.mha", "spacing_mm": "", "diameter_mm": "6"}
    assert datasets.load_data("csv", write_csv(folder, [row]), DEFAULT_VOCAB)[0].spacing_mm == pytest.approx(0.66)
    bomb = zlib.compress(bytes(64 * 64 * 1000))  # inflates to 1000× what the header says
    header = ("ObjectType = Image\nNDims = 2\nDimSize = 64 64\nElementType = MET_UCHAR\nCompressedData = True\n"
              f"CompressedDataSize = {len(bomb)}\nElementDataFile = LOCAL\n")
    (folder / "z.mha").write_bytes(header.encode() + bomb)
    refused(lambda: data.read_image(folder / "z.mha"), "z.mha")


# ----------------------------------------------------------------------------------------------- checkpoints
def model_payload() -> dict:
    """The keys of a diffusion-model checkpoint (common.MODEL_CHECKPOINT_SCHEMA), with tiny tensors."""
    weights = {"unet.w": torch.ones(2, 2), "tokens.t": torch.zeros(3)}
    return {"kind": "base", "unet_config": UNetConfig().to_dict(), "vocab": dict(DEFAULT_VOCAB),
            "diffusion_config": {"num_train_timesteps": 1000, "beta_schedule": "cosine", "prediction_type": "epsilon",
                                 "mask_weight": 5.0},
            "weights": weights, "model": dict(weights), "loop": None, "rng_state": {"torch": torch.get_rng_state()},
            "train_config": {}, "fingerprint": "0" * 64}


def _without(key):
    return lambda p: {k: v for k, v in p.items() if k != key}


CHECKPOINT_CASES = {  # name -> (change to the payload, substring of the message); saved with a fresh content hash
    "format_version a string": (lambda p: {**p, "format_version": "1"}, "format_version"),
    "format_version a bool": (lambda p: {**p, "format_version": True}, "format_version"),
    "no unet_config": (_without("unet_config"), "unet_config"),
    "no fingerprint": (_without("fingerprint"), "fingerprint"),
    "fingerprint an int": (lambda p: {**p, "fingerprint": 7}, "fingerprint"),
    "unet_config a list": (lambda p: {**p, "unet_config": [1, 2]}, "unet_config"),
    "unknown beta_schedule": (lambda p: {**p, "diffusion_config": {**p["diffusion_config"], "beta_schedule": "x"}},
                              "beta_schedule"),
    "no diffusion_config": (_without("diffusion_config"), "diffusion_config"),
    "weights not a dict": (lambda p: {**p, "weights": torch.zeros(2)}, "weights"),
    "vocab values a string": (lambda p: {**p, "vocab": {"texture": "solid"}}, "vocab"),
    "weights of lists": (lambda p: {**p, "model": {"unet.w": [1.0, 2.0]}}, "'unet.w' is not a named tensor"),
    "NaN weight": (lambda p: {**p, "weights": {"unet.w": torch.tensor([1.0, math.nan])}}, "NaN"),
    "inf in the optimizer": (lambda p: {**p, "loop": {"optimizer": {"state": {0: {"exp_avg": torch.tensor([
        math.inf])}}}}}, "NaN or infinite"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_malformed_checkpoints_are_refused(tmp_path, case):
    change, match = CHECKPOINT_CASES[case]
    payload = change({"format_version": CHECKPOINT_FORMAT_VERSION, **model_payload()})
    path = tmp_path / "base.pt"
    payload["content_sha256"] = tensor_digest(payload)
    torch.save(payload, path)
    assert match in refused(lambda: load_checkpoint(path), "base.pt")


def test_checkpoint_content_hash(tmp_path):
    path = save_checkpoint(tmp_path / "base.pt", model_payload())
    assert load_checkpoint(path)["fingerprint"] == "0" * 64  # the untouched file loads
    payload = torch.load(path, weights_only=True)
    payload["weights"]["unet.w"][0, 0] = 1.0000001  # one flipped bit's worth, hash kept
    torch.save(payload, tmp_path / "flipped.pt")
    assert "corrupted" in refused(lambda: load_checkpoint(tmp_path / "flipped.pt"), "flipped.pt")
    del payload["content_sha256"]
    torch.save(payload, tmp_path / "unhashed.pt")
    refused(lambda: load_checkpoint(tmp_path / "unhashed.pt"), "unhashed.pt")
    payload["format_version"] = 1  # format 1 had no hash: still read, with the other checks
    torch.save(payload, tmp_path / "v1.pt")
    assert load_checkpoint(tmp_path / "v1.pt")["format_version"] == 1


def test_flipped_bytes_on_disk_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "base.pt", {**model_payload(), "weights": {"unet.w": torch.full((64,), 0.25)}})
    raw = bytearray(path.read_bytes())
    at = raw.find(struct.pack("<f", 0.25) * 64)  # the tensor's bytes, stored uncompressed in the zip
    assert at > 0
    raw[at + 5] ^= 0x10
    path.write_bytes(bytes(raw))
    refused(lambda: load_checkpoint(path), "base.pt")  # either torch's own CRC check or our content hash


UNET_CASES = {"unknown field": {"base_channel": 8}, "int as string": {"crop_size": "32"},
              "bool as int": {"num_heads": True}, "zero heads": {"num_heads": 0}, "negative width": {
                  "base_channels": -8}, "channel_mult of strings": {"channel_mult": ["1", "2"]},
              "empty channel_mult": {"channel_mult": []}, "crop not divisible": {"crop_size": 30},
              "dropout 1": {"dropout": 1.0}, "dropout NaN": {"dropout": math.nan},
              "attention level out of range": {"attention_levels": [5]}}


@pytest.mark.parametrize("case", UNET_CASES)
def test_unet_config_from_dict_names_the_file(case):
    values = {**UNetConfig().to_dict(), **UNET_CASES[case]}
    refused(lambda: UNetConfig.from_dict(values, source="runs/base.pt"), "runs/base.pt")
    refused(lambda: UNetConfig.from_dict(values), "UNetConfig")


# ----------------------------------------------------------------------------------------------- adapters
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(4, 4)


def saved_adapter(path, name="texture=solid"):
    model = Net()
    fingerprint = lora.fingerprint_state_dict(model.state_dict())
    lora.inject_lora(model, ["to_q"], name, r=2, alpha=2.0)
    lora.save_adapter(path, model, name, fingerprint, {"attribute": "texture", "value": "solid"},
                      extra={f"token:{name}": torch.zeros(1, 4)})
    return fingerprint


ADAPTER_CASES = {  # name -> (change to the payload, substring of the message); saved with a fresh content hash
    "no layers": (_without("layers"), "layers"),
    "layers a list": (lambda p: {**p, "layers": ["to_q"]}, "layers"),
    "r a string": (lambda p: {**p, "layers": {"to_q": {"r": "2", "alpha": 2.0}}}, "r (int"),
    "r zero": (lambda p: {**p, "layers": {"to_q": {"r": 0, "alpha": 2.0}}}, "r (int"),
    "alpha NaN": (lambda p: {**p, "layers": {"to_q": {"r": 2, "alpha": math.nan}}}, "alpha"),
    "no tensors": (_without("tensors"), "tensors"),
    "tensor entry not a tensor": (lambda p: {**p, "tensors": {"to_q.lora_A": [1, 2]}}, "not a tensor"),
    "no base_fingerprint": (_without("base_fingerprint"), "base_fingerprint"),
    "format_version a string": (lambda p: {**p, "format_version": "2"}, "format_version"),
    "another kind": (lambda p: {**p, "kind": "something"}, "not a nodule_diffusion LoRA"),
    "NaN in B": (lambda p: {**p, "tensors": {**p["tensors"], "to_q.lora_B": torch.full((4, 2), math.nan)}}, "NaN"),
}


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_malformed_adapters_are_refused(tmp_path, case):
    change, match = ADAPTER_CASES[case]
    fingerprint = saved_adapter(tmp_path / "good.pt")
    payload = change(torch.load(tmp_path / "good.pt", weights_only=True))
    payload["content_sha256"] = tensor_digest({k: v for k, v in payload.items() if k != "content_sha256"})
    torch.save(payload, tmp_path / "bad.pt")
    model = Net()
    assert match in refused(lambda: lora.load_adapter(tmp_path / "bad.pt", model, "texture=solid", fingerprint),
                            "bad.pt")
    assert not lora.lora_layers(model)  # nothing injected


def test_adapter_content_hash_and_name(tmp_path):
    fingerprint = saved_adapter(tmp_path / "texture=solid.pt")
    lora.load_adapter(tmp_path / "texture=solid.pt", Net(), "texture=solid", fingerprint, expected_name="texture=solid")
    payload = torch.load(tmp_path / "texture=solid.pt", weights_only=True)
    assert payload["name"] == "texture=solid"
    renamed = tmp_path / "margin=well_defined.pt"
    renamed.write_bytes((tmp_path / "texture=solid.pt").read_bytes())
    message = refused(lambda: lora.load_adapter(renamed, Net(), "margin=well_defined", fingerprint), "margin=well_defined.pt")
    assert "texture=solid" in message  # the default expected name is the name it is loaded under
    lora.load_adapter(renamed, Net(), "texture=solid@ortho", fingerprint)  # a tagged copy of the same adapter
    # A format-1 file has no "name": the name comes from its config (attribute=value) or its one token.
    old = {k: v for k, v in payload.items() if k not in ("name", "content_sha256")}
    assert lora.recorded_name(old) == "texture=solid"
    assert lora.recorded_name({"extra": {"token:margin=well_defined": torch.zeros(1)}}) == "margin=well_defined"
    refused(lambda: lora.check_adapter_name(old, "margin=well_defined", renamed), "margin=well_defined.pt")
    lora.check_adapter_name({"config": {}, "extra": {}}, "composed", renamed)  # records no name: nothing to compare
    payload["tensors"]["to_q.lora_A"][0, 0] += 1e-3  # stale hash
    torch.save(payload, tmp_path / "edited.pt")
    assert "corrupted" in refused(lambda: lora.read_adapter(tmp_path / "edited.pt"), "edited.pt")


def test_fingerprint_is_unchanged_by_the_shared_digest():
    """lora.fingerprint_state_dict now delegates to common.tensor_digest; adapters made before must still match."""
    import hashlib

    state = Net().state_dict()
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    assert lora.fingerprint_state_dict(state) == digest.hexdigest()


def test_schema_constants_match_the_code():
    from nodule_diffusion.common import MODEL_CHECKPOINT_SCHEMA
    from nodule_diffusion.schedulers import BETA_SCHEDULES, PREDICTION_TYPES

    assert MODEL_CHECKPOINT_SCHEMA["diffusion_config"]["beta_schedule"] == set(BETA_SCHEDULES)
    assert MODEL_CHECKPOINT_SCHEMA["diffusion_config"]["prediction_type"] == set(PREDICTION_TYPES)


# ----------------------------------------------------------------------------------------------- request rows
@pytest.mark.parametrize("cx, cy, diameter, mask_shape, match", [
    (math.nan, 10, 6, None, "centre"), (1e308, 10, 6, None, "centre"), (-1, 10, 6, None, "centre"),
    (32, 32, -12, None, "diameter_mm"), (32, 32, 5950, None, "diameter_mm"), (32, 32, math.inf, None, "diameter_mm"),
    (4, 4, 19, None, "clipped"), (32, 32, 6, (10, 10), "mask"), (32, 32, None, "empty", "empty")])
def test_request_rows_are_checked(cx, cy, diameter, mask_shape, match):
    mask = None if mask_shape is None else (np.zeros((64, 64), bool) if mask_shape == "empty" else
                                            np.ones(mask_shape, bool))
    assert match in refused(lambda: checks.check_request("req.csv row 2", cx, cy, diameter, mask, (64, 64), 1.0),
                            "req.csv row 2")
    checks.check_request("req.csv row 2", 32, 32, 6, None, (64, 64), 1.0)  # a fine request passes


# ----------------------------------------------------------------------------------------------- flag ranges
def test_check_ranges_and_writable_dir(tmp_path):
    import dataclasses

    from nodule_diffusion.checks import check_ranges, check_writable_dir

    @dataclasses.dataclass
    class Flags:
        batch_size: int = dataclasses.field(default=8, metadata={"range": (1, None)})
        lr: float = 1e-3
        eta: float = 0.0
        sampler: str = "ddim"
        seeds: tuple[int, ...] = (0, 1)
        note: str | None = None

    rules = {"lr": (0, 1), "eta": (0, 1), "sampler": {"ddim", "ddpm"}, "seeds": (0, None), "note": {"x"}}
    check_ranges(Flags(), rules)
    for bad, flag in [({"batch_size": 0}, "--batch_size 0"), ({"lr": math.nan}, "--lr nan"),
                      ({"eta": 50.0}, "--eta 50.0"), ({"sampler": "ddmi"}, "--sampler 'ddmi'"),
                      ({"seeds": (0, -1)}, "--seeds -1"), ({"batch_size": True}, "--batch_size True")]:
        refused(lambda: check_ranges(Flags(**bad), rules), flag)
    assert check_writable_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    refused(lambda: check_writable_dir(tmp_path / "file"), "--out_dir")
    refused(lambda: check_writable_dir(tmp_path / "file" / "sub", "--out"), "--out")


def test_unknown_devices_and_config_keys():
    import dataclasses

    from nodule_diffusion.common import check_config_keys, resolve_device

    for name in ("tpu", "gpu", "cuda:99", "meta"):
        refused(lambda: resolve_device(name), f"--device {name}")
    assert resolve_device("cpu") == torch.device("cpu")

    @dataclasses.dataclass
    class A:
        lr: float = 1e-3

    @dataclasses.dataclass
    class B:
        steps: int = 1

    check_config_keys("run.json", {"lr": 0.1, "steps": 3}, A, B)
    assert "learning_rate" in refused(lambda: check_config_keys("run.json", {"learning_rate": 0.1}, A, B), "run.json")
