"""Tests for nodule_diffusion.common: dataclass -> argparse, config files, atomic files, checkpoints, RNG state, CLI.

Checkpoints are checked against `torch.load(weights_only=True)` itself (the design's contract), RNG round trips
by drawing the same numbers twice, and `run_cli` both in-process and through a real subprocess exit code.
"""

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from nodule_diffusion.common import (
    CHECKPOINT_FORMAT_VERSION, DataError, JsonlLogger, add_dataclass_args, atomic_path, config_from_args,
    load_checkpoint, read_config_file, resolve_device, rng_state, save_checkpoint, save_image_png, seed_everything,
    set_rng_state, to_plain, unwrap, write_json)
from nodule_diffusion import data

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class ToyConfig:
    steps: int = 10
    lr: float = 1e-3
    name: str = "toy"
    ema: bool = True
    amp: bool = False
    widths: tuple[int, ...] = (8, 16)
    scales: tuple[float, ...] = (0.5,)
    limit: Optional[int] = None
    spacing_mm: float | None = None
    tag: str | None = None
    vocab: dict = dataclasses.field(default_factory=lambda: {"texture": ["solid"]})

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def _parse(argv, file_config=None):
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ToyConfig)
    return config_from_args(ToyConfig, parser.parse_args(argv), file_config)


# ----------------------------------------------------------------------------------------------- dataclass -> argparse
def test_no_flags_gives_the_dataclass_defaults():
    assert _parse([]) == ToyConfig()


def test_typed_flags():
    cfg = _parse(["--steps", "5", "--lr", "0.25", "--name", "x", "--no-ema", "--amp", "--widths", "1", "2", "3",
                  "--scales", "1.5", "2", "--limit", "7", "--spacing_mm", "1.4", "--tag", "run"])
    assert cfg == ToyConfig(steps=5, lr=0.25, name="x", ema=False, amp=True, widths=(1, 2, 3), scales=(1.5, 2.0),
                            limit=7, spacing_mm=1.4, tag="run", vocab={"texture": ["solid"]})
    assert isinstance(cfg.widths, tuple) and isinstance(cfg.steps, int) and isinstance(cfg.lr, float)


def test_help_shows_defaults_and_skips_structures(capsys):
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ToyConfig, help_text={"lr": "learning rate"})
    text = parser.format_help()
    assert "learning rate (default: 0.001)" in text and "--spacing_mm" in text and "(default: None)" in text
    assert "--vocab" not in text  # dicts come only from --config JSON


def test_required_field_gets_a_flag():
    @dataclasses.dataclass
    class Required:
        data_root: str
        seed: int = 0

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Required)
    cfg = config_from_args(Required, parser.parse_args(["--data_root", "/d"]))
    assert cfg == Required(data_root="/d", seed=0)
    with pytest.raises(DataError, match="data_root"):  # missing required value: a clear error, not a traceback
        config_from_args(Required, parser.parse_args([]))


def test_config_file_then_flags_override(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": 3, "lr": 1, "widths": [4, 5], "limit": None, "ema": False,
                                "vocab": {"margin": ["smooth"]}, "other_config_field": 1}))
    file_config = read_config_file(str(path))
    cfg = _parse(["--lr", "0.5"], file_config)
    assert cfg.steps == 3 and cfg.lr == 0.5 and cfg.widths == (4, 5) and cfg.ema is False
    assert cfg.limit is None and cfg.vocab == {"margin": ["smooth"]}
    cfg = _parse([], file_config)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # JSON 1 is a valid float
    assert read_config_file(None) == {} and read_config_file("") == {}


@pytest.mark.parametrize("file_config, field", [
    ({"steps": "abc"}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"), ({"lr": "fast"}, "lr"),
    ({"ema": "yes"}, "ema"), ({"name": 3}, "name"), ({"widths": [1, "a"]}, "widths"), ({"widths": 4}, "widths"),
    ({"limit": "none"}, "limit"), ({"steps": None}, "steps"), ({"steps": -1}, "steps must be >= 0")])
def test_bad_config_values_raise_data_error(file_config, field):
    with pytest.raises(DataError, match="ToyConfig") as err:
        _parse([], file_config)
    assert field in str(err.value)


def test_bad_flags_and_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse types the flags and exits 2 with a usage line
        _parse(["--steps", "abc"])
    assert exit_info.value.code == 2 and "--steps" in capsys.readouterr().err
    with pytest.raises(DataError, match="ToyConfig"):
        _parse(["--steps", "-3"])
    bad = tmp_path / "bad.json"
    bad.write_text("{steps: 3")
    with pytest.raises(DataError, match="bad.json"):
        read_config_file(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match="bad.json: config JSON must be an object"):
        read_config_file(str(bad))
    with pytest.raises(DataError, match="missing.json"):
        read_config_file(str(tmp_path / "missing.json"))


def test_data_error_is_one_class():
    assert data.DataError is DataError and issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------------------------- atomic files
def test_atomic_path_leaves_nothing_when_the_body_raises(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(target.parent.iterdir()) == []
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and list(target.parent.iterdir()) == [target]
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
    assert target.read_text() == "new" and list(target.parent.iterdir()) == [target]


def test_write_json_and_png(tmp_path):
    cfg = ToyConfig()
    path = write_json(tmp_path / "config.json", {"cfg": cfg, "p": Path("a/b"), "x": np.float32(0.5)})
    assert json.loads(path.read_text()) == {"cfg": to_plain(cfg), "p": "a/b", "x": 0.5}
    assert to_plain(cfg)["widths"] == [8, 16]
    image = np.random.default_rng(0).random((12, 10)).astype(np.float32)
    png = save_image_png(tmp_path / "img.png", image)
    np.testing.assert_allclose(data.read_image(png), image, atol=0.5 / 65535 + 1e-7)  # 16-bit PNG


# ----------------------------------------------------------------------------------------------- checkpoints
def _payload():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, {"model_config": to_plain(ToyConfig()), "model": model.state_dict(),
                   "optimizer": opt.state_dict(), "step": 7, "rng_state": rng_state(),
                   "train_config": {"lr": 1e-3, "note": None, "flag": True, "sizes": [1, 2]}}


def test_checkpoint_round_trip_under_weights_only(tmp_path):
    model, payload = _payload()
    path = save_checkpoint(tmp_path / "ckpt.pt", payload)
    raw = torch.load(path, weights_only=True)  # the contract: no pickled classes inside
    assert raw["format_version"] == CHECKPOINT_FORMAT_VERSION
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["train_config"] == payload["train_config"]
    assert loaded["model_config"] == to_plain(ToyConfig())
    rebuilt = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
    rebuilt.load_state_dict(loaded["model"])
    x = torch.randn(6, 3)
    assert torch.equal(rebuilt(x), model(x))
    opt = torch.optim.AdamW(rebuilt.parameters(), lr=1e-3)
    opt.load_state_dict(loaded["optimizer"])
    assert opt.state_dict()["state"][0]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_bad_checkpoints_raise_data_error(tmp_path):
    _, payload = _payload()
    good = save_checkpoint(tmp_path / "good.pt", payload)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint\n")
    for path in (truncated, noise, text, tmp_path / "missing.pt"):
        with pytest.raises(DataError, match=path.name):
            load_checkpoint(path)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format_version": 1, "config": argparse.Namespace(a=1)}, pickled)  # refused by weights_only
    with pytest.raises(DataError, match="pickled.pt"):
        load_checkpoint(pickled)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(DataError, match="foreign.pt: not a nodule_diffusion checkpoint"):
        load_checkpoint(foreign)
    future = save_checkpoint(tmp_path / "future.pt", {"format_version": CHECKPOINT_FORMAT_VERSION + 1})
    with pytest.raises(DataError, match="newer than this code"):
        load_checkpoint(future)


def test_failed_checkpoint_save_leaves_no_file(tmp_path):
    with pytest.raises(Exception):
        save_checkpoint(tmp_path / "ckpt.pt", {"fn": lambda x: x})  # lambdas cannot be pickled
    assert list(tmp_path.iterdir()) == []


def test_unwrap_strips_wrappers():
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):  # stands in for DDP (.module) and torch.compile (._orig_mod)
        def __init__(self, module, attr):
            super().__init__()
            setattr(self, attr, module)

    assert unwrap(inner) is inner
    assert unwrap(Wrapper(inner, "module")) is inner
    assert unwrap(Wrapper(Wrapper(inner, "_orig_mod"), "module")) is inner
    assert list(unwrap(Wrapper(inner, "module")).state_dict()) == ["weight", "bias"]


# ----------------------------------------------------------------------------------------------- RNG, seeding
def _draw():
    return (random.random(), np.random.randn(3).tolist(), np.random.rand(2).tolist(), torch.randn(4).tolist())


def test_rng_state_round_trip(tmp_path):
    seed_everything(123)
    np.random.randn(1)  # an odd number of normals leaves numpy's second Gaussian cached
    state = rng_state()
    first = _draw()
    set_rng_state(state)
    assert _draw() == first
    # and through a weights_only checkpoint
    save_checkpoint(tmp_path / "ckpt.pt", {"rng_state": state})
    _draw()
    set_rng_state(load_checkpoint(tmp_path / "ckpt.pt")["rng_state"])
    assert _draw() == first


def test_seed_everything_is_reproducible():
    seed_everything(5)
    a = _draw()
    seed_everything(5)
    assert _draw() == a
    seed_everything(6)
    assert _draw() != a


# ----------------------------------------------------------------------------------------------- devices, logs, CLI
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="--device cuda"):
            resolve_device("cuda")


def test_jsonl_logger(tmp_path):
    log = JsonlLogger(tmp_path / "run" / "log.jsonl")
    log.log(step=1, loss=np.float32(0.5), path=Path("x"))
    log.log(step=2, loss=0.25)
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 0.5, "path": "x"}, {"step": 2, "loss": 0.25}]
    JsonlLogger(tmp_path / "off" / "log.jsonl", enabled=False).log(step=1)
    assert not (tmp_path / "off").exists()


def test_run_cli_in_process(capsys):
    from nodule_diffusion.common import run_cli

    def bad_main():
        raise DataError("data/annotations.csv row 3: unknown texture value 'x'")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(bad_main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: data/annotations.csv row 3: unknown texture value 'x'\n"
    run_cli(lambda: None)  # a clean main returns normally
    with pytest.raises(RuntimeError):  # bugs are not data errors: they keep their traceback
        run_cli(lambda: (_ for _ in ()).throw(RuntimeError("bug")))


def test_run_cli_exit_code_in_a_subprocess(tmp_path):
    script = ("from nodule_diffusion.common import run_cli\n"
              "from nodule_diffusion.data import read_annotations\n"
              f"run_cli(lambda: read_annotations({str(tmp_path / 'missing.csv')!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.csv" in lines[0]
    assert "Traceback" not in proc.stderr
