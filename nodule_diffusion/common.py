"""Shared plumbing: seeding, devices, dataclass -> argparse, atomic files and checkpoints, jsonl logging, DDP.

Nothing here knows about diffusion or detection; every script and module may use it.
Checkpoints are plain dicts of tensors and primitives so that `torch.load(weights_only=True)` (the default since
torch 2.6) reads them, and they are written atomically (temp file in the same folder + `os.replace`) so an
interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import sys
import types
import typing
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT_VERSION = 1


class DataError(ValueError):
    """Any problem caused by input data (file, CSV, config, checkpoint). The message names the file and the problem.

    Re-exported as `nodule_diffusion.data.DataError` (its public name); defined here so that every module can
    raise it without import cycles.
    """


# ----------------------------------------------------------------------------------------------- seeding, devices
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch (CPU and CUDA). `deterministic` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu. An explicit 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA device is available on this machine (use --device cpu or auto)")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix units (AMX-BF16 or AVX-512 BF16, read from /proc/cpuinfo on Linux).

    Measured (benchmarks/bench_unet.py --bf16): on an AVX2-only AMD EPYC a UNet training step under CPU bf16
    autocast is ~15× SLOWER than fp32 (bf16 is emulated); issue 10 reports 1.25–1.68× faster on a CPU with AMX
    and AVX-512 BF16. So bf16 is used on the CPU only where these units exist.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast where it is fast: CUDA, or a CPU with bf16 matrix units (cpu_has_fast_bf16); else fp32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and device.type == "cpu" and cpu_has_fast_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------- distributed (DDP)
def init_distributed(device: torch.device) -> tuple[int, int]:
    """Start torch.distributed when launched by `torchrun` (env RANK/WORLD_SIZE), else do nothing.

    Returns (rank, world_size). gloo on CPU, nccl on GPU; each rank uses cuda:LOCAL_RANK.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


# ----------------------------------------------------------------------------------------------- dataclass -> argparse
def _field_type(tp):
    """Reduce `Optional[X]` / `X | None` to X; return (base type, tuple element type or None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _field_type(args[0])
    if origin is tuple:
        return tuple, typing.get_args(tp)[0]
    return tp, None


def add_dataclass_args(parser: argparse.ArgumentParser, cls, help_text: dict[str, str] | None = None) -> None:
    """Add one typed `--name` flag per field of the dataclass `cls` (default: None = keep the dataclass default).

    bool -> --name / --no-name; tuple[int, ...] -> nargs='+'; Optional[...] fields accept their base type.
    The help line shows the default and, when given, `help_text[name]` or the field's metadata["help"].
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        base, elem = _field_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:  # a required field: its flag has no default to show
            default = "required"
        doc = (help_text or {}).get(f.name) or f.metadata.get("help", "")
        kwargs: dict = {"default": None, "help": f"{doc} (default: {default})".strip()}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is tuple:
            kwargs.update(nargs="+", type=elem)
        elif base in (int, float, str):
            kwargs["type"] = base
        else:  # dicts and other structures come only from --config JSON
            continue
        parser.add_argument(f"--{f.name}", **kwargs)


def _checked_value(cls_name: str, name: str, hint, value):
    """A `--config` JSON value checked against the field's type hint (argparse already types the flags).

    JSON has no tuples and no int/float distinction, so lists become tuples and ints are accepted for floats.
    """
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if value is None and optional:
        return None
    base, elem = _field_type(hint)
    ok = {bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}
    if base is tuple and isinstance(value, (list, tuple)):
        if elem in ok and not all(ok[elem](v) for v in value):
            raise DataError(f"configuration {cls_name}: field '{name}' expects a list of {elem.__name__}, "
                            f"got {value!r}")
        return tuple(float(v) if elem is float else v for v in value)
    if base in ok:
        if not ok[base](value):
            raise DataError(f"configuration {cls_name}: field '{name}' expects {base.__name__}, got {value!r}")
        return float(value) if base is float else value
    if base is tuple:
        raise DataError(f"configuration {cls_name}: field '{name}' expects a list, got {value!r}")
    return value  # dicts and other structures are passed through as written


def config_from_args(cls, args: argparse.Namespace, file_config: dict | None = None):
    """Build `cls` from defaults <- `--config` JSON (file_config) <- explicit flags, with type checks.

    Keys of file_config that are not fields of `cls` are ignored (one file may configure several dataclasses).
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in (file_config or {}).items():
        if key in names:
            values[key] = _checked_value(cls.__name__, key, hints[key], value)
    for key in names:
        flag = getattr(args, key, None)
        if flag is not None:
            values[key] = tuple(flag) if isinstance(flag, list) else flag
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise DataError(f"configuration {cls.__name__}: {err}") from err


def read_config_file(path: str | None) -> dict:
    """Read a `--config run.json` file (a flat dict of field -> value); DataError when unreadable."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read config JSON ({err})") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: config JSON must be an object of field -> value")
    return data


def print_config(*configs) -> None:
    for cfg in configs:
        print(f"{type(cfg).__name__}: {json.dumps(to_plain(cfg), sort_keys=True)}")


def to_plain(obj):
    """Dataclasses, tuples, Paths and numpy scalars -> JSON-friendly primitives (for checkpoints and config.json)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ----------------------------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_plain(obj), indent=2, sort_keys=True) + "\n")
    return Path(path)


def save_image_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a float image in [0, 1] (H, W) as 16-bit PNG, or (H, W, 3) uint8 RGB as 8-bit PNG, atomically."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 2 and arr.dtype != np.uint8:
        pil = Image.fromarray(np.round(np.clip(arr, 0, 1) * 65535).astype(np.uint16))
    else:
        pil = Image.fromarray(arr)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return Path(path)


# ----------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Atomically save a plain dict (tensors and primitives only) with the format version added."""
    payload = {"format_version": CHECKPOINT_FORMAT_VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with `weights_only=True`; truncated, foreign or missing files raise DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError... for bad files
        raise DataError(f"{path}: not a readable checkpoint (truncated or not written by nodule_diffusion): "
                        f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}") from err
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise DataError(f"{path}: not a nodule_diffusion checkpoint (no format_version)")
    if payload["format_version"] > CHECKPOINT_FORMAT_VERSION:
        raise DataError(f"{path}: checkpoint format {payload['format_version']} is newer than this code "
                        f"({CHECKPOINT_FORMAT_VERSION}); update nodule_diffusion")
    return payload


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers, so saved names carry no `module.`/`_orig_mod.` prefix."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors/primitives (weights_only-safe) for exact resume.

    numpy's legacy state includes a cached second Gaussian (has_gauss, cached_gaussian): without it the next
    `np.random.randn` after a resume would differ whenever an odd number of normals had been drawn.
    """
    np_state = np.random.get_state()
    state = {
        "python": repr(random.getstate()),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gaussian": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # list of ByteTensors, one per visible GPU
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` saved (CUDA states only when present and a GPU is available)."""
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state.get("numpy_has_gauss", 0), state.get("numpy_cached_gaussian", 0.0)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])  # resuming on fewer GPUs


# ----------------------------------------------------------------------------------------------- logging, CLI errors
class JsonlLogger:
    """Append one JSON object per line to `out_dir/log.jsonl` (losses, metrics)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(to_plain(record)) + "\n")


def run_cli(main) -> None:
    """Run a script's main(); a DataError becomes one line on stderr and exit code 2 (no traceback)."""
    try:
        main()
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
