"""Tests of the three scripts as a user runs them (subprocess, cwd = repository root, `sys.executable`).

- `--help` of train.py, sample.py, eval_detect.py exits 0 and shows runnable examples.
- Bad inputs exit with code 2 and ONE line on stderr that names the file or the problem, without a traceback.
- A tiny end-to-end run: train.py --stage base → train.py --stage lora → sample.py --strategy lora.
- train.py --resume continues a run exactly (called in-process: same code path, no extra interpreter start-up).

Starting an interpreter costs a few seconds (importing torch), so the independent runs are started concurrently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_UNET_FLAGS, tiny_loop, train_tiny_base
from nodule_diffusion import diffusion, training
from nodule_diffusion.data import DEFAULT_VOCAB, nodule_region, read_annotations, read_image

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "sample.py", "eval_detect.py")


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: several interpreters run at once
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)


def run_chain(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run commands one after another, stopping at the first failure."""
    results = []
    for args in commands:
        results.append(run(args))
        if results[-1].returncode != 0:
            break
    return results


def cpu_flags(out_dir: Path) -> list[str]:
    return ["--device", "cpu", "--seed", "0", "--out_dir", str(out_dir)]


# ----------------------------------------------------------------------------------------------- help and bad inputs
@pytest.fixture(scope="module")
def bad_input_files(tmp_path_factory, tiny_base, disk_crops, disk_csv) -> dict[str, Path]:
    """The broken or mismatched files the error cases need."""
    root = tmp_path_factory.mktemp("bad_inputs")
    data = tiny_base.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])

    # A LoRA trained on base A (the seed-0 tiny base) and a second base B trained with another seed (1).
    model, payload = diffusion.load_model(tiny_base, torch.device("cpu"))
    training.train_lora(model, disk_crops, "texture", "solid", 2, 2.0, tiny_loop(1), torch.device("cpu"),
                      torch.Generator().manual_seed(0))
    diffusion.save_lora(root / "lora_of_base_a" / "texture=solid.pt", model, "texture=solid", payload["fingerprint"],
                        {})
    train_tiny_base(root / "base_b" / "base.pt", disk_crops, seed=1, steps=2)

    # An annotation CSV whose third row has x1 < x0 (image paths absolute, so the CSV may live anywhere).
    image = read_annotations(disk_csv)[0].image
    (root / "csv").mkdir()  # not the outputs' parent: an --out_dir inside the data folder is refused
    (root / "csv" / "bad.csv").write_text("image,x0,y0,x1,y1,texture\n"
                                  f"{image},10,10,20,20,solid\n"
                                  f"{image},30,10,25,20,solid\n")
    return {"root": root, "base_a": tiny_base, "base_b": root / "base_b" / "base.pt", "csv": disk_csv}


# name -> (command, substrings that the single stderr line must contain)
def bad_input_cases(f: dict[str, Path]) -> dict[str, tuple[list, list[str]]]:
    root = f["root"]
    tiny_base_flags = ["--stage", "base", "--steps", "2", "--batch_size", "2", *TINY_UNET_FLAGS]
    return {
        "missing checkpoint": (["sample.py", "--ckpt", root / "missing.pt", *cpu_flags(root / "o1")],
                               ["missing.pt", "not found"]),
        "truncated checkpoint": (["sample.py", "--ckpt", root / "truncated.pt", *cpu_flags(root / "o2")],
                                 ["truncated.pt", "not a readable checkpoint"]),
        "unknown attribute value": (["sample.py", "--ckpt", f["base_a"], "--strategy", "lora", "--attributes",
                                     "texture=plaid", *cpu_flags(root / "o3")], ["texture=plaid", "allowed"]),
        "unknown data format": (["train.py", "--data", "nonsense:path", *tiny_base_flags, *cpu_flags(root / "o4")],
                                ["nonsense", "unknown format"]),
        "lora of another base": (["sample.py", "--ckpt", f["base_b"], "--lora_dir", root / "lora_of_base_a",
                                  "--strategy", "lora", "--attributes", "texture=solid", "--images",
                                  f"csv:{f['csv']}", *cpu_flags(root / "o5")],
                                 ["texture=solid.pt", "another base"]),
        "malformed annotation csv": (["train.py", "--data", f"csv:{root / 'csv' / 'bad.csv'}", *tiny_base_flags,
                                      *cpu_flags(root / "o6")], ["bad.csv", "row 3", "degenerate box"]),
    }


def end_to_end_commands(out: Path, csv_path: Path) -> list[list]:
    """train.py base (5 steps) → train.py lora (3 steps) → sample.py --strategy lora (3 DDIM steps)."""
    data = ["--data", f"csv:{csv_path}"]
    loop = ["--batch_size", "4", "--log_every", "1", "--sample_every", "0"]
    return [["train.py", "--stage", "base", "--steps", "5", *loop, *data, *TINY_UNET_FLAGS, *cpu_flags(out)],
            ["train.py", "--stage", "lora", "--ckpt", out / "base.pt", "--attribute", "texture=solid",
             "--steps", "3", *loop, *data, *cpu_flags(out)],
            ["sample.py", "--ckpt", out / "base.pt", "--strategy", "lora", "--attributes", "texture=solid",
             "--images", f"csv:{csv_path}", "--steps", "3", "--min_diameter_mm", "6", "--max_diameter_mm", "10",
             "--seed", "4", "--device", "cpu", "--out_dir", out / "syn"]]


@pytest.fixture(scope="module")
def script_runs(bad_input_files, disk_csv, tmp_path_factory) -> dict:
    """Every subprocess of this module, run once and concurrently; the tests below inspect the results.

    The end-to-end chain is sequential, so it runs beside the independent --help and bad-input commands.
    """
    out = tmp_path_factory.mktemp("e2e")
    commands = {f"help {s}": [s, "--help"] for s in SCRIPTS}
    commands.update({name: args for name, (args, _) in bad_input_cases(bad_input_files).items()})
    with ThreadPoolExecutor(max_workers=3) as pool:
        chain = pool.submit(run_chain, end_to_end_commands(out, disk_csv))
        futures = {name: pool.submit(run, args) for name, args in commands.items()}
        results = {name: future.result() for name, future in futures.items()}
        results["end to end"] = (out, chain.result())
    return results


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_examples(script_runs, script):
    result = script_runs[f"help {script}"]
    assert result.returncode == 0, result.stderr
    assert "Examples:" in result.stdout and f"python {script}" in result.stdout
    assert "--out_dir" in result.stdout and "--seed" in result.stdout


@pytest.mark.parametrize("case", ["missing checkpoint", "truncated checkpoint", "unknown attribute value",
                                  "unknown data format", "lora of another base", "malformed annotation csv"])
def test_bad_input_exits_2_with_one_line(script_runs, bad_input_files, case):
    result = script_runs[case]
    expected = bad_input_cases(bad_input_files)[case][1]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0], (text, lines[0])


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def end_to_end(script_runs, disk_csv) -> dict:
    out, results = script_runs["end to end"]
    assert len(results) == 3 and all(r.returncode == 0 for r in results), results[-1].stderr[-3000:]
    return {"out": out, "csv": disk_csv}


def test_end_to_end_training_writes_checkpoints_and_logs(end_to_end):
    out = end_to_end["out"]
    payload = torch.load(out / "base.pt", weights_only=True)
    assert payload["kind"] == "base" and payload["loop"]["step"] == 5
    assert payload["unet_config"]["base_channels"] == 16 and tuple(payload["unet_config"]["channel_mult"]) == (1, 2)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "base"] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in log if r["stage"] == "lora texture=solid"] == [1, 2, 3]
    assert (out / "samples_base_000005.png").is_file() and (out / "config_base.json").is_file()
    adapter = torch.load(out / "lora" / "texture=solid.pt", weights_only=True)
    assert adapter["base_fingerprint"] == payload["fingerprint"]
    assert (out / "lora" / "texture=solid.png").is_file()


def test_end_to_end_sampling_writes_images_and_annotations(end_to_end):
    syn, sources = end_to_end["out"] / "syn", read_annotations(end_to_end["csv"])
    records = read_annotations(syn / "annotations.csv", DEFAULT_VOCAB)  # validates paths, boxes, values
    assert len(records) == len(sources) == len(list((syn / "images").glob("*.png")))
    indices = []
    for rec, source in zip(records, sources):
        inserted = [n for n in rec.nodules if n.extra.get("synthetic") == "1"]
        assert len(inserted) == 1 and len(rec.nodules) == len(source.nodules) + 1
        nodule = inserted[0]
        assert nodule.attributes == {"texture": "solid"} and nodule.extra["seed"] == "4"
        assert 6 <= nodule.diameter_mm <= 10 and nodule.mask.is_file()
        indices.append(int(nodule.extra["index"]))
        # Pixels outside the synthetic nodule's region are exactly the source pixels (both 16-bit PNG).
        before, after = read_image(source.image), read_image(rec.image)
        mask = read_image(nodule.mask) > 0
        region = nodule_region(torch.from_numpy(mask.astype(np.float32))[None, None])[0, 0].numpy() > 0.5
        assert after.shape == before.shape and np.array_equal(after[~region], before[~region])
        assert not np.array_equal(after[mask], before[mask])
    assert sorted(indices) == list(range(len(records)))  # one seeded index per inserted nodule
    coco = json.loads((syn / "annotations.json").read_text())
    assert len(coco["images"]) == len(records)
    assert len(coco["annotations"]) == sum(len(r.nodules) for r in records)
    assert (syn / "contact_sheet.png").is_file() and (syn / "config.json").is_file()


# ----------------------------------------------------------------------------------------------- resume via train.py
def test_train_script_resume_matches_an_uninterrupted_run(tmp_path, disk_csv):
    """train.py --steps 4 vs --steps 2 then --steps 4 --resume: the same logged losses and the same weights."""
    import train

    def train_args(out, steps, *extra):
        return ["--stage", "base", "--data", f"csv:{disk_csv}", "--steps", str(steps), "--batch_size", "4",
                "--log_every", "1", "--sample_every", "0", "--checkpoint_every", "2", *TINY_UNET_FLAGS,
                *cpu_flags(out), *extra]

    train.main(train_args(tmp_path / "straight", 4))
    train.main(train_args(tmp_path / "resumed", 2))
    train.main(train_args(tmp_path / "resumed", 4, "--resume"))

    def losses(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]

    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert [s for s, _ in losses(tmp_path / "resumed")] == [1, 2, 3, 4]
    a = torch.load(tmp_path / "straight" / "base.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "base.pt", weights_only=True)
    for key in ("model", "weights"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    assert a["fingerprint"] == b["fingerprint"]


def test_generate_with_adapters_takes_the_sampler_settings(end_to_end):
    """generate_with_adapters(**sampling) reaches generate_for: the default equals its explicit value, another
    sampler or step count changes the nodule, and the context outside the region is kept exactly."""
    from nodule_diffusion import evaluation, synthesis
    from nodule_diffusion.data import NoduleCrops
    out, records = end_to_end["out"], read_annotations(end_to_end["csv"])
    crops = NoduleCrops(records, DEFAULT_VOCAB, 16, 1.4, augment=False)

    def generated(**sampling):
        return evaluation.generate_with_adapters(str(out / "base.pt"), out / "lora", ["texture=solid"], crops,
                                                 [0, 1], "cpu", **sampling)

    batch, default = generated()
    _, explicit = generated(steps=synthesis.SAMPLE_STEPS, sampler="ddim", eta=synthesis.SAMPLE_ETA)
    _, ddpm = generated(steps=4, sampler="ddpm")
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, ddpm)
    outside = batch["region"] == 0
    assert torch.equal(ddpm[outside], batch["context"][outside])


def test_adapter_guidance_is_cfg_with_the_base_as_its_unconditional_model(end_to_end):
    """compose.eps_function(adapter_guidance=g) = ε_base(∅) + g·(ε_lora(y) − ε_base(∅)) against the two models run
    apart: g = 1 is the adapted model itself, g = 0 the base, g = 2 their extrapolation; no adapter reaches the base
    copy; a strategy without adapters ignores it."""
    from nodule_diffusion import compose
    from nodule_diffusion.diffusion import load_model
    out = end_to_end["out"]
    torch.manual_seed(0)
    xt, t = torch.randn(2, 1, 16, 16), torch.tensor([300, 700])
    masks = (torch.rand(2, 1, 16, 16) > 0.5).float()
    contexts = torch.randn(2, 1, 16, 16) * (1 - masks)

    def eps_of(strategy, g=1.0, attributes=None):
        model, payload = load_model(out / "base.pt", "cpu")
        model.eval()
        fn = compose.eps_function(model, payload["fingerprint"], strategy,
                                  {"texture": "solid"} if attributes is None else attributes, out / "lora",
                                  adapter_guidance=g)
        return fn(xt, t, 0, masks, contexts)

    adapted, base = eps_of("lora"), eps_of("base", attributes={})
    assert not torch.allclose(adapted, base)  # the 3-step LoRA moved the output
    assert torch.equal(eps_of("lora", 1.0), adapted)
    assert torch.equal(eps_of("lora", 0.0), base)  # the copy was taken before the adapter was loaded
    torch.testing.assert_close(eps_of("lora", 2.0), 2 * adapted - base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_of("linear", 2.0), 2 * adapted - base, atol=1e-5, rtol=1e-5)  # one adapter
    assert torch.equal(eps_of("base", 2.0, attributes={}), base)


def test_generate_with_adapters_takes_the_adapter_guidance(end_to_end):
    """evaluation.generate_with_adapters(adapter_guidance): the default is synthesis.ADAPTER_GUIDANCE, another
    scale changes the nodule reproducibly and keeps the context outside the region."""
    from nodule_diffusion import evaluation, synthesis
    from nodule_diffusion.data import NoduleCrops
    out, records = end_to_end["out"], read_annotations(end_to_end["csv"])
    crops = NoduleCrops(records, DEFAULT_VOCAB, 16, 1.4, augment=False)

    def generated(**kw):
        return evaluation.generate_with_adapters(str(out / "base.pt"), out / "lora", ["texture=solid"], crops,
                                                 [0, 1], "cpu", steps=3, **kw)

    batch, plain = generated()
    _, default = generated(adapter_guidance=synthesis.ADAPTER_GUIDANCE)
    _, guided = generated(adapter_guidance=3.0)
    _, again = generated(adapter_guidance=3.0)
    assert torch.equal(plain, default) and torch.equal(guided, again)
    assert not torch.allclose(plain, guided)
    outside = batch["region"] == 0
    assert torch.equal(guided[outside], batch["context"][outside])


def test_controllability_of_a_trained_lora(end_to_end):
    """evaluation.controllability (the demo report's section) on the end-to-end base and texture=solid LoRA:
    nodules generated from masks that LACK texture=solid, judged by an image-only judge; all figures in range."""
    from nodule_diffusion import evaluation
    out, records = end_to_end["out"], read_annotations(end_to_end["csv"])
    result = evaluation.controllability(str(out / "base.pt"), out / "lora", ["texture=solid"], records, records,
                                        1.4, evaluation.JudgeSettings(judge_steps=5, crop_size=16), "cpu", n=4)
    lacking = sum(n.attributes.get("texture") != "solid" for r in records for n in r.nodules)
    assert result["n_generated"]["texture=solid"] == min(4, lacking) > 0
    assert 0.0 <= result["accuracy"]["texture=solid"] <= 1.0
    assert 0.0 <= result["real_recall"]["texture=solid"] <= 1.0
    assert set(result["real_accuracy"]) == set(DEFAULT_VOCAB)
    assert result["speckle"]["texture=solid"] > 0 and result["speckle_real"]["texture=solid"] > 0  # finite, real
    table = evaluation.controllability_markdown(result)
    assert "`texture=solid`" in table and f"{result['accuracy']['texture=solid']:.3f}" in table
    assert f"{result['speckle']['texture=solid']:.3f} / {result['speckle_real']['texture=solid']:.3f}" in table
