"""Bad flags and files at the three scripts' edges give one clean line and change nothing (issue 11, script half).

Each row of CASES runs a script's `main(argv)` in-process through `common.run_cli` (the code path of
`python train.py …`, without an interpreter start-up per case) with tiny settings, and asserts: exit code 2,
ONE line on stderr that starts with "error:" and names the flag or file, no traceback (any other exception fails
the test), and the output folder exactly as before (files, sizes and contents). Hypothesis feeds random values
to every range-checked flag: each is refused naming its flag, or lies inside checks.FLAG_RANGES.
The behaviours that must succeed are tested below the table: the output-folder rule of sample.py (refuse,
--overwrite replaces as a whole, an interrupted run leaves the folder as it was), unique output names for
sources that share a file name, and a derived DICOM (MONOCHROME1, VOI window) bit-identical outside the nodules.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import eval_detect
import sample
import train
from conftest import TINY_UNET_FLAGS
from nodule_diffusion import checks, common, synthesis
from nodule_diffusion.data import DataError, nodule_region, read_annotations, read_image

SCRIPTS = {"train": train, "sample": sample, "eval": eval_detect}


def run_main(script: str, argv: list, capsys) -> tuple[int, list[str]]:
    """(exit code, non-empty stderr lines) of `python <script>.py argv`, run in-process."""
    capsys.readouterr()
    code = 0
    try:
        common.run_cli(lambda: SCRIPTS[script].main([str(a) for a in argv]))
    except SystemExit as exit_:
        code = exit_.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def snapshot(folder: Path):
    """Every file under `folder` with its size and SHA-256 (None when the folder does not exist)."""
    if not folder.exists():
        return None
    if folder.is_file():
        return folder.read_bytes()
    return sorted((str(p.relative_to(folder)), hashlib.sha256(p.read_bytes()).hexdigest())
                  for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def files(tmp_path_factory, disk_csv, tiny_base) -> dict:
    """The inputs the cases need: data, a checkpoint, a resumable run, request CSVs and masks, bad JSON files."""
    root = tmp_path_factory.mktemp("inputs")
    image = read_annotations(disk_csv)[0].image
    (root / "file").write_text("a file where a folder is expected")
    for name, text in {"train_key.json": {"batchsize": 4}, "sample_key.json": {"sampler_name": "ddpm"},
                       "eval_key.json": {"n_bootstrap": 5}, "vocab_shape.json": {"texture": "solid"}}.items():
        (root / name).write_text(json.dumps(text))
    (root / "vocab_bad.json").write_text("{not json")
    (root / "requests").mkdir()  # not the outputs' parent: an --out_dir inside the requests' folder is refused
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(root / "requests" / "small_mask.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "requests" / "empty_mask.png")
    requests = {"header": [], "nan": [f"{image},nan,30,6,"], "huge": [f"{image},1e308,30,6,"],
                "outside": [f"{image},80,30,6,"], "negative": [f"{image},30,30,-12,"],
                "big": [f"{image},30,30,5950,"], "clipped": [f"{image},3,3,19,"],
                "small_mask": [f"{image},30,30,,small_mask.png"], "empty_mask": [f"{image},30,30,,empty_mask.png"],
                "unknown image": ["nope.png,30,30,6,"]}
    for name, rows in requests.items():
        (root / "requests" / f"req_{name}.csv").write_text("image,cx,cy,diameter_mm,mask\n"
                                                           + "".join(r + "\n" for r in rows))
    resumable = root / "resumable"  # a 2-step base run made by train.py, for the --resume cases
    train.main([*TRAIN, "--out_dir", str(resumable), "--data", f"csv:{disk_csv}"])
    for folder in ("with_base", "with_lora/lora"):
        (root / folder).mkdir(parents=True)
    shutil.copy(tiny_base, root / "with_base" / "base.pt")
    (root / "with_lora" / "lora" / "texture=solid.pt").write_text("an earlier adapter")
    (root / "with_compose" / "compose").mkdir(parents=True)
    (root / "with_compose" / "compose" / "ortho_margin=spiculated+texture=solid.pt").write_text("an earlier one")
    payload = torch.load(tiny_base, weights_only=True)  # checkpoints with a field this code does not know
    for name, key in (("diffusion_key.pt", "diffusion_config"), ("unet_key.pt", "unet_config")):
        edited = {k: v for k, v in payload.items() if k != "content_sha256"}
        common.save_checkpoint(root / name, {**edited, key: {**payload[key], "warp_factor": 9}})
    (root / "nonempty").mkdir()
    (root / "nonempty" / "notes.txt").write_text("the user's file")
    (root / "lora_is_file").mkdir()
    (root / "lora_is_file" / "lora").write_text("x")
    return {"root": root, "csv": disk_csv, "data": disk_csv.parent, "base": tiny_base, "resumable": resumable}


TRAIN = ["--stage", "base", "--steps", "2", "--batch_size", "2", "--sample_every", "0", "--log_every", "1",
         *TINY_UNET_FLAGS, "--device", "cpu"]


def train_args(f, *extra, out="o"):
    return [*TRAIN, "--data", f"csv:{f['csv']}", "--out_dir", f["root"] / out, *extra]


def lora_args(f, *extra, out="o"):
    return ["--stage", "lora", "--ckpt", f["base"], "--attribute", "texture=solid", "--data", f"csv:{f['csv']}",
            "--steps", "2", "--batch_size", "2", "--device", "cpu", "--out_dir", f["root"] / out, *extra]


def sample_args(f, *extra, out="o"):
    return ["--ckpt", f["base"], "--images", f"csv:{f['csv']}", "--steps", "2", "--device", "cpu",
            "--min_diameter_mm", "6", "--max_diameter_mm", "10", "--out_dir", f["root"] / out, *extra]


def eval_args(f, *extra, out="o", command="detect"):
    return [command, "--real", f"csv:{f['csv']}", "--test", f"csv:{f['csv']}", "--synthetic", f["data"],
            "--det_steps", "1", "--image_size", "64", "--seeds", "1", "--n_boot", "2", "--device", "cpu",
            "--out_dir", f["root"] / out, *extra]


def resume_args(f, *extra):
    return [*TRAIN, "--data", f"csv:{f['csv']}", "--out_dir", f["resumable"], "--resume", *extra]


# name -> (script, argv(files), text the one stderr line must contain, the output folder(files))
CASES = {
    "train --steps 0": ("train", lambda f: train_args(f, "--steps", "0"), "--steps 0"),
    "train --batch_size 0": ("train", lambda f: train_args(f, "--batch_size", "0"), "--batch_size 0"),
    "train --batch_size -1": ("train", lambda f: train_args(f, "--batch_size", "-1"), "--batch_size -1"),
    "train --checkpoint_every 0": ("train", lambda f: train_args(f, "--checkpoint_every", "0"), "--checkpoint_every"),
    "train --log_every 0": ("train", lambda f: train_args(f, "--log_every", "0"), "--log_every 0"),
    "train --lr nan": ("train", lambda f: train_args(f, "--lr", "nan"), "--lr nan"),
    "train --lr 0": ("train", lambda f: train_args(f, "--lr", "0"), "--lr 0"),
    "train --lr -1": ("train", lambda f: train_args(f, "--lr", "-1"), "--lr -1"),
    "train --seed -1": ("train", lambda f: train_args(f, "--seed", "-1"), "--seed -1"),
    "train --num_train_timesteps 0": ("train", lambda f: train_args(f, "--num_train_timesteps", "0"),
                                      "--num_train_timesteps"),
    "train --beta_schedule foo": ("train", lambda f: train_args(f, "--beta_schedule", "foo"), "--beta_schedule"),
    "train --spacing_mm 100": ("train", lambda f: train_args(f, "--spacing_mm", "100"), "--spacing_mm 100"),
    "train --n_images 0": ("train", lambda f: train_args(f, "--data", "phantom", "--n_images", "0"), "--n_images"),
    "train --steps abc": ("train", lambda f: train_args(f, "--steps", "abc"), "--steps"),
    "train --unknown_flag": ("train", lambda f: train_args(f, "--unknown_flag", "1"), "--unknown_flag"),
    "train --stage bogus": ("train", lambda f: train_args(f, "--stage", "bogus"), "--stage 'bogus'"),
    "train --device tpu": ("train", lambda f: train_args(f, "--device", "tpu"), "--device tpu"),
    "train --config misspelt key": ("train", lambda f: train_args(f, "--config", f["root"] / "train_key.json"),
                                    "batchsize"),
    "train --vocab missing": ("train", lambda f: train_args(f, "--vocab", f["root"] / "nope.json"), "nope.json"),
    "train --vocab malformed": ("train", lambda f: train_args(f, "--vocab", f["root"] / "vocab_bad.json"),
                                "vocab_bad.json"),
    "train --vocab wrong shape": ("train", lambda f: train_args(f, "--vocab", f["root"] / "vocab_shape.json"),
                                  "vocab_shape.json"),
    "train --out_dir a file": ("train", lambda f: train_args(f, out="file"), "--out_dir"),
    "train --out_dir not writable": ("train", lambda f: train_args(f, out="/proc/nodule_out"), "--out_dir"),
    "train --out_dir = data folder": ("train", lambda f: train_args(f, out=f["data"]), "--data"),
    "train --out_dir inside data": ("train", lambda f: train_args(f, out=f["data"] / "images" / "run"), "--data"),
    "train base over base.pt": ("train", lambda f: train_args(f, out="with_base"), "--overwrite"),
    "train --resume other batch_size": ("train", lambda f: resume_args(f, "--steps", "3", "--batch_size", "3"),
                                        "differ from the checkpoint's: batch_size 2 → 3; use"),
    "train --resume other lr": ("train", lambda f: resume_args(f, "--steps", "3", "--lr", "0.01"),
                                "differ from the checkpoint's: lr 0.0003 → 0.01; use"),
    "train --resume other UNet": ("train", lambda f: resume_args(f, "--steps", "3", "--base_channels", "8"),
                                  "base_channels 16 → 8"),
    "train --resume at --steps": ("train", lambda f: resume_args(f), "already at step 2"),
    "train lora --out_dir a file": ("train", lambda f: lora_args(f, out="file"), "--out_dir"),
    "train lora, lora/ a file": ("train", lambda f: lora_args(f, out="lora_is_file"), "lora"),
    "train lora over an adapter": ("train", lambda f: lora_args(f, out="with_lora"), "texture=solid.pt"),
    "train lora --lora_rank 0": ("train", lambda f: lora_args(f, "--lora_rank", "0"), "--lora_rank 0"),
    "train lora two values": ("train", lambda f: lora_args(f, "--attribute", "texture=solid,margin=spiculated"),
                              "--attribute"),
    "train compose over its output": ("train", lambda f: [*lora_args(f, out="with_compose"), "--stage", "compose",
                                                          "--attributes", "texture=solid,margin=spiculated"],
                                      "ortho_margin=spiculated+texture=solid.pt"),
    "train --stage all, not empty": ("train", lambda f: train_args(f, "--stage", "all", out="nonempty"),
                                     "not empty"),
    "sample --steps 0": ("sample", lambda f: sample_args(f, "--steps", "0"), "--steps 0"),
    "sample --steps -3": ("sample", lambda f: sample_args(f, "--steps", "-3"), "--steps -3"),
    "sample --sampler ddmi": ("sample", lambda f: sample_args(f, "--sampler", "ddmi"), "--sampler 'ddmi'"),
    "sample --eta 50": ("sample", lambda f: sample_args(f, "--eta", "50"), "--eta 50"),
    "sample --eta -1": ("sample", lambda f: sample_args(f, "--eta", "-1"), "--eta -1"),
    "sample min > max diameter": ("sample", lambda f: sample_args(f, "--min_diameter_mm", "20"), "--min_diameter_mm"),
    "sample --min_diameter_mm -12": ("sample", lambda f: sample_args(f, "--min_diameter_mm", "-12"),
                                     "--min_diameter_mm"),
    "sample --max_diameter_mm 5950": ("sample", lambda f: sample_args(f, "--max_diameter_mm", "5950"),
                                      "--max_diameter_mm"),
    "sample --max_diameter_mm inf": ("sample", lambda f: sample_args(f, "--max_diameter_mm", "inf"),
                                     "--max_diameter_mm"),
    "sample --n_images 0": ("sample", lambda f: sample_args(f, "--images", "phantom", "--n_images", "0"),
                            "--n_images 0"),
    "sample --per_image 0": ("sample", lambda f: sample_args(f, "--per_image", "0"), "--per_image 0"),
    "sample --seed -1": ("sample", lambda f: sample_args(f, "--seed", "-1"), "--seed -1"),
    "sample --guidance nan": ("sample", lambda f: sample_args(f, "--guidance", "nan"), "--guidance nan"),
    "sample --spacing_mm 0": ("sample", lambda f: sample_args(f, "--spacing_mm", "0"), "--spacing_mm 0"),
    "sample --device tpu": ("sample", lambda f: sample_args(f, "--device", "tpu"), "--device tpu"),
    "sample --config misspelt key": ("sample", lambda f: sample_args(f, "--config", f["root"] / "sample_key.json"),
                                     "sampler_name"),
    "sample ckpt: unknown diffusion key": ("sample", lambda f: [*sample_args(f), "--ckpt",
                                                                f["root"] / "diffusion_key.pt"],
                                           "diffusion_key.pt: diffusion_config has unknown key(s) warp_factor"),
    "sample ckpt: unknown UNet field": ("sample", lambda f: [*sample_args(f), "--ckpt", f["root"] / "unet_key.pt"],
                                        "unet_key.pt: unet_config: unknown field(s) ['warp_factor']"),
    "sample --out_dir a file": ("sample", lambda f: sample_args(f, out="file"), "--out_dir"),
    "sample --out_dir not writable": ("sample", lambda f: sample_args(f, out="/proc/nodule_out"), "--out_dir"),
    "sample --out_dir = data folder": ("sample", lambda f: sample_args(f, out=f["data"]), "--images"),
    "sample --out_dir not empty": ("sample", lambda f: sample_args(f, out="nonempty"), "not empty"),
    "sample --overwrite a foreign folder": ("sample", lambda f: sample_args(f, "--overwrite", out="nonempty"),
                                            "written by sample.py"),
    **{f"sample request {name}": ("sample", lambda f, name=name: sample_args(
        f, "--requests", f["root"] / "requests" / f"req_{name}.csv"), text) for name, text in [
        ("header", "req_header.csv"), ("nan", "req_nan.csv"), ("huge", "req_huge.csv"),
        ("outside", "req_outside.csv"), ("negative", "req_negative.csv"), ("big", "req_big.csv"),
        ("clipped", "req_clipped.csv"), ("small_mask", "small_mask.png"), ("empty_mask", "empty_mask.png"),
        ("unknown image", "req_unknown image.csv")]},
    "eval --seeds 0": ("eval", lambda f: eval_args(f, "--seeds", "0"), "--seeds 0"),
    "eval --n_boot 0": ("eval", lambda f: eval_args(f, "--n_boot", "0"), "--n_boot 0"),
    "eval --det_steps 0": ("eval", lambda f: eval_args(f, "--det_steps", "0"), "--det_steps 0"),
    "eval --image_size 0": ("eval", lambda f: eval_args(f, "--image_size", "0"), "--image_size 0"),
    "eval --image_size 16": ("eval", lambda f: eval_args(f, "--image_size", "16"), "--image_size 16"),
    "eval --det_lr nan": ("eval", lambda f: eval_args(f, "--det_lr", "nan"), "--det_lr nan"),
    "eval --low_data -1": ("eval", lambda f: eval_args(f, "--low_data", "-1"), "--low_data -1"),
    "eval --judge_steps 0": ("eval", lambda f: eval_args(f, "--judge_steps", "0", command="attributes"),
                             "--judge_steps 0"),
    "eval --judge_width 12": ("eval", lambda f: eval_args(f, "--judge_width", "12", command="attributes"),
                              "--judge_width 12: choose one of 8, 16, 32, 64"),
    "eval --device tpu": ("eval", lambda f: eval_args(f, "--device", "tpu"), "--device tpu"),
    "eval --config misspelt key": ("eval", lambda f: eval_args(f, "--config", f["root"] / "eval_key.json"),
                                   "n_bootstrap"),
    "eval unknown command": ("eval", lambda f: ["judge", "--out_dir", f["root"] / "o"], "judge"),
    "eval --out_dir a file": ("eval", lambda f: eval_args(f, out="file"), "--out_dir"),
    "eval --out_dir not empty": ("eval", lambda f: eval_args(f, out="nonempty"), "not empty"),
    "eval --out_dir = --real folder": ("eval", lambda f: eval_args(f, out=f["data"]), "--real"),
}


def out_dir_of(argv: list) -> Path:
    return Path(argv[argv.index("--out_dir") + 1])


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_clean_line_and_changes_nothing(files, capsys, case):
    script, make_argv, text = CASES[case]
    argv = make_argv(files)
    out = out_dir_of(argv)
    before = snapshot(out)
    code, lines = run_main(script, argv, capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert text in lines[0], (text, lines[0])
    assert snapshot(out) in (before, [] if before is None else before)  # at most an empty folder was created
    assert not list(out.parent.glob(f".{out.name}.tmp*"))  # sample.py's temporary folder is gone


# ----------------------------------------------------------------------------------------------- every range
RANGED = sorted(set(checks.FLAG_RANGES) & {f for cls in (*train.CONFIGS, sample.SampleConfig, eval_detect.EvalConfig)
                                         for f in cls.__dataclass_fields__})
VALUES = st.one_of(st.integers(-10 ** 6, 10 ** 6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["0", "-1", "1", "0.5", "1e308", "nan", "ddmi", "x", ""]))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(flag=st.sampled_from(RANGED), value=VALUES)
def test_every_ranged_flag_is_refused_or_in_range(flag, value):
    """parse_args of the script owning `flag`: a DataError naming --flag on one line, or a value in its range."""
    for module in (train, sample, eval_detect):
        classes = train.CONFIGS if module is train else (
            (sample.SampleConfig,) if module is sample else (eval_detect.EvalConfig, *eval_detect_configs()))
        if any(flag in cls.__dataclass_fields__ for cls in classes):
            break
    argv = ["detect"] * (module is eval_detect) + [f"--{flag}", value]
    try:
        configs = module.parse_args(argv)
    except DataError as err:
        assert "\n" not in str(err) and flag in str(err), str(err)
        return
    configs = configs if isinstance(configs, (list, tuple)) else [configs]
    for cfg in configs:
        if hasattr(cfg, flag):
            rule = checks.FLAG_RANGES[flag]
            got = getattr(cfg, flag)
            if isinstance(rule, set):
                assert got in rule
            else:
                lo, hi, lo_open = (*rule, None)[:3]
                assert math.isfinite(got) and (lo is None or (got > lo if lo_open else got >= lo))
                assert hi is None or got <= hi


def eval_detect_configs():
    from nodule_diffusion import evaluation

    return evaluation.DetectConfig, evaluation.JudgeSettings


# ----------------------------------------------------------------------------------------------- what must work
def test_sample_output_folder_rule(files, capsys):
    """A new folder is written; the same folder again is refused; --overwrite replaces it as a whole (no image of
    the first run is left beside the second's annotations); a run that fails half-way leaves it as it was."""
    out = files["root"] / "rule"
    assert run_main("sample", sample_args(files, "--seed", "1", out="rule"), capsys)[0] == 0
    first = sorted(p.name for p in (out / "images").iterdir())
    code, lines = run_main("sample", sample_args(files, "--seed", "2", out="rule"), capsys)
    assert code == 2 and "not empty" in lines[0]
    assert run_main("sample", sample_args(files, "--seed", "2", "--overwrite", out="rule"), capsys)[0] == 0
    second = sorted(p.name for p in (out / "images").iterdir())
    assert len(second) == len(first) and not set(first) & set(second)  # names carry the seed: nothing mixed
    assert {r.image.name for r in read_annotations(out / "annotations.csv")} == set(second)
    before = snapshot(out)
    calls = []

    def failing_insert(*args, **kwargs):  # the third image fails, as a kill would stop the run
        calls.append(1)
        if len(calls) == 3:
            raise DataError("interrupted")
        return real_insert(*args, **kwargs)

    real_insert = synthesis.insert_nodules
    synthesis.insert_nodules = failing_insert
    try:
        code, _ = run_main("sample", sample_args(files, "--seed", "3", "--overwrite", out="rule"), capsys)
    finally:
        synthesis.insert_nodules = real_insert
    assert code == 2 and snapshot(out) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".rule.")]  # no temporary folder left


def test_train_overwrite_replaces_the_stage_only(files, capsys, tmp_path):
    """--overwrite of a base run: a new base.pt, and no sample grid or log line of the earlier run is left."""
    out = tmp_path / "run"
    shutil.copytree(files["resumable"], out)
    (out / "samples_base_000400.png").write_bytes(b"a grid of a longer earlier run")
    with (out / "log.jsonl").open("a") as log:
        log.write(json.dumps({"stage": "lora texture=solid", "step": 1, "loss": 0.1}) + "\n")
    argv = [*TRAIN, "--data", f"csv:{files['csv']}", "--out_dir", out, "--overwrite", "--steps", "3"]
    assert run_main("train", argv, capsys)[0] == 0
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["stage"] == "base"] == [1, 2, 3]
    assert [r["stage"] for r in lines if r["stage"] != "base"] == ["lora texture=solid"]  # other stages kept
    assert sorted(p.name for p in out.glob("samples_base_*.png")) == ["samples_base_000003.png"]
    assert torch.load(out / "base.pt", weights_only=True)["loop"]["step"] == 3


def test_sources_with_one_file_name_get_their_own_outputs(files, capsys, tmp_path):
    image = read_annotations(files["csv"])[0].image
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / "x.png")
    csv_path = tmp_path / "data" / "two.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(f"image,x0,y0,x1,y1,spacing_mm\n{tmp_path / 'a' / 'x.png'},,,,,1.4\n"
                        f"{tmp_path / 'b' / 'x.png'},,,,,1.4\n")
    out = tmp_path / "out"
    assert run_main("sample", [*sample_args(files, out=out), "--images", f"csv:{csv_path}"], capsys)[0] == 0
    records = read_annotations(out / "annotations.csv")
    assert len(records) == 2 and len({r.image for r in records}) == 2 == len(list((out / "images").iterdir()))
    for record in records:  # each image holds exactly the nodule its row describes
        (nodule,) = record.nodules
        assert Path(nodule.extra["source"]).parent.name in ("a", "b") and nodule.mask.is_file()
        assert record.image.name.startswith("x_") and record.image.name.endswith("_syn1.png")


def write_cr_dicom(path: Path, like: np.ndarray) -> Path:
    """A 64×64 CR-like DICOM: MONOCHROME1, BitsStored 15, window 15000/30000, PixelSpacing 1.4 mm."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientID = "CR", "P1"
    noise = np.random.default_rng(0).integers(0, 50, like.shape)
    stored = np.clip(20000 - like * 12000 + noise, 0, 32767).astype(np.uint16)  # MONOCHROME1: dense = low
    stored[0, 0], stored[-1, -1] = 0, 32767  # the extremes, far from any nodule
    ds.set_pixel_data(stored, "MONOCHROME1", 15, generate_instance_uid=False)
    ds.WindowCenter, ds.WindowWidth, ds.PixelSpacing = 15000, 30000, [1.4, 1.4]
    ds.save_as(path, enforce_file_format=True)
    return path


def test_sample_writes_a_derived_dicom_bit_identical_outside_the_nodules(files, capsys, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    (tmp_path / "data").mkdir()
    source = write_cr_dicom(tmp_path / "data" / "cr.dcm", read_image(read_annotations(files["csv"])[0].image))
    (tmp_path / "data" / "annotations.csv").write_text("image,x0,y0,x1,y1,spacing_mm\ncr.dcm,,,,,\n")
    out = tmp_path / "out"
    argv = [*sample_args(files, out=out), "--images", f"csv:{tmp_path / 'data' / 'annotations.csv'}"]
    assert run_main("sample", argv, capsys)[0] == 0
    (record,) = read_annotations(out / "annotations.csv")
    assert record.image.suffix == ".dcm" and record.spacing_mm == pytest.approx(1.4)
    (nodule,) = record.nodules
    mask = torch.from_numpy((read_image(nodule.mask) > 0).astype(np.float32))[None, None]
    region = nodule_region(mask)[0, 0].numpy() > 0.5  # where insertion may change pixels (1.4 mm: no resampling)
    src, derived = pydicom.dcmread(source), pydicom.dcmread(record.image)
    assert np.array_equal(derived.pixel_array[~region], src.pixel_array[~region])
    assert not np.array_equal(derived.pixel_array[region], src.pixel_array[region])
    for keyword in ("PhotometricInterpretation", "BitsStored", "BitsAllocated", "WindowCenter", "WindowWidth",
                    "PixelSpacing", "PatientID"):
        assert derived.get(keyword) == src.get(keyword), keyword
    assert derived.SOPInstanceUID != src.SOPInstanceUID and list(derived.ImageType)[:2] == ["DERIVED", "SECONDARY"]
