"""Shared plumbing: seeding, devices, dataclass -> argparse, atomic files and checkpoints, jsonl logging, DDP.

Nothing here knows about diffusion or detection; every script and module may use it.
Checkpoints are plain dicts of tensors and primitives so that `torch.load(weights_only=True)` (the default since
torch 2.6) reads them, and they are written atomically (temp file in the same folder + `os.replace`) so an
interrupted run never leaves a half-written file behind. Format 2 adds `content_sha256` (`tensor_digest` of every
tensor in the file); `load_checkpoint` recomputes it, checks the key schema of the file's kind and refuses NaN/inf
weights before anything uses the file. Format-1 files (no digest) are still read, with the other checks.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import random
import re
import sys
import types
import typing
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CHECKPOINT_FORMAT_VERSION = 2  # 2: content_sha256 added (format 1 files are still read)


class DataError(ValueError):
    """Any problem caused by input data (file, CSV, config, checkpoint). The message names the file and the problem.

    Re-exported as `nodule_diffusion.data.DataError` (its public name); defined here so that every module can
    raise it without import cycles. The message is kept on one line (scripts print it as `error: …`): line
    breaks inside it, e.g. from a quoted library error, become spaces.
    """

    def __init__(self, message: str = ""):
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


# ----------------------------------------------------------------------------------------------- seeding, devices
def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch (CPU and CUDA). `deterministic` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu. An unknown name, or a GPU this machine lacks, is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows: too long for one line
        raise DataError(f"--device {name}: unknown device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA device is available on this machine (use --device cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DataError(f"--device {name}: device type {device.type!r} is not supported; use auto, cpu or cuda")
    return device


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix units (AMX-BF16 or AVX-512 BF16, read from /proc/cpuinfo on Linux).

    Measured (benchmarks/bench_bf16.py): on an AVX2-only AMD EPYC a UNet training step under CPU bf16 autocast
    ran at 0.12× the speed of fp32; issue 10 reports 1.25–1.68× faster on a CPU with AMX and AVX-512 BF16. So
    bf16 is used on the CPU only where these units exist.
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


def field_comments(cls) -> dict[str, str]:
    """{field: its trailing `# comment`} from the dataclass source: the one-line help text of each flag."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (e.g. built in an interactive session)
        return {}
    out = {}
    for line in lines:
        match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if match:
            out[match.group(1)] = match.group(2).strip()
    return out


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' error contract: a bad flag (`--steps abc`, an unknown flag) raises DataError,
    which run_cli prints as one line with exit code 2, instead of argparse's usage block and error line."""

    def error(self, message: str):
        raise DataError(f"{message} (see --help)")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, help_text: dict[str, str] | None = None) -> None:
    """Add one typed `--name` flag per field of the dataclass `cls` (default: None = keep the dataclass default).

    bool -> --name / --no-name; tuple[int, ...] -> nargs='+'; Optional[...] fields accept their base type.
    The help line shows the default and `help_text[name]`, the field's metadata["help"] or its `# comment`.
    """
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        base, elem = _field_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:  # a required field: its flag has no default to show
            default = "required"
        doc = (help_text or {}).get(f.name) or f.metadata.get("help", "") or comments.get(f.name, "")
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


def check_config_keys(path: str, file_config: dict, *classes) -> None:
    """Refuse a `--config` key that no dataclass of this script has (a misspelt key would silently do nothing)."""
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_config) - known)
    if unknown:
        raise DataError(f"{path}: unknown config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


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
    arr = np.asarray(image)
    if arr.ndim == 2 and arr.dtype != np.uint8:
        pil = Image.fromarray(np.round(np.clip(arr, 0, 1) * 65535).astype(np.uint16))
    else:
        pil = Image.fromarray(arr)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return Path(path)


# ----------------------------------------------------------------------------------------------- checkpoints
def _type_name(value) -> str:
    return "None" if value is None else type(value).__name__


def tensor_dict(value) -> str | None:
    """Schema rule: a state dict (name -> tensor); returns what is wrong, or None."""
    if not isinstance(value, dict):
        return f"must be a dict of name -> tensor, got {_type_name(value)}"
    bad = next((k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    return None if bad is None else f"entry {bad!r} is not a named tensor"


def vocabulary(value) -> str | None:
    """Schema rule: an attribute vocabulary, attribute -> non-empty list of distinct value names."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return f"must be a dict of attribute -> list of values, got {_type_name(value)}"
    for name, values in value.items():
        if not (isinstance(values, list) and values and all(isinstance(v, str) for v in values)
                and len(set(values)) == len(values)):
            return f"attribute {name!r} needs a list of distinct value names, got {values!r}"
    return None


# Keys every diffusion-model checkpoint holds (written by stages.save_model, design §3), checked by load_checkpoint
# before any use. A schema maps key -> type, tuple of types (None = may be None), set of allowed values, a rule
# function (value -> problem or None), or a nested schema dict (keys not listed are allowed: writers may add some).
MODEL_CHECKPOINT_SCHEMA = {
    "kind": str, "unet_config": dict, "vocab": vocabulary, "weights": tensor_dict, "model": tensor_dict,
    "loop": (dict, None), "rng_state": dict, "train_config": dict, "fingerprint": str,
    "diffusion_config": {"num_train_timesteps": int, "prediction_type": {"epsilon", "v_prediction", "sample"},
                         "beta_schedule": {"linear", "scaled_linear", "cosine"}, "mask_weight": (int, float)},
}
CHECKPOINT_SCHEMAS = {"base": MODEL_CHECKPOINT_SCHEMA, "cfg": MODEL_CHECKPOINT_SCHEMA}  # by the file's "kind"


def check_schema(where: str, payload: dict, schema: dict) -> None:
    """Raise DataError "{where}: key 'k' …" for the first key of `schema` that is missing or of the wrong type."""
    for key, want in schema.items():
        if key not in payload:
            raise DataError(f"{where}: key '{key}' is missing")
        value = payload[key]
        if isinstance(want, dict):
            if not isinstance(value, dict):
                raise DataError(f"{where}: key '{key}' must be a dict, got {_type_name(value)}")
            check_schema(f"{where}: {key}", value, want)
        elif isinstance(want, set):
            if not isinstance(value, str) or value not in want:
                raise DataError(f"{where}: key '{key}' is {value!r}; expected one of {', '.join(sorted(want))}")
        elif callable(want) and not isinstance(want, type):
            if (problem := want(value)) is not None:
                raise DataError(f"{where}: key '{key}' {problem}")
        else:
            types_ = tuple(type(None) if t is None else t for t in (want if isinstance(want, tuple) else (want,)))
            if not isinstance(value, types_) or (isinstance(value, bool) and bool not in types_):
                expected = " or ".join(_type_name(None) if t is type(None) else t.__name__ for t in types_)
                raise DataError(f"{where}: key '{key}' must be {expected}, got {_type_name(value)}")


def _tensors(tree, prefix: str = ""):
    """(path, tensor) for every tensor inside nested dicts/lists/tuples; paths join keys with '/'."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _tensors(value, f"{prefix}/{i}" if prefix else str(i))


def tensor_digest(tree) -> str:
    """SHA-256 hex digest over the sorted paths, dtypes, shapes and raw bytes of every tensor in `tree`.

    For a flat state dict this is exactly lora.fingerprint_state_dict (the base-model fingerprint).
    """
    digest = hashlib.sha256()
    for key, tensor in sorted(_tensors(tree), key=lambda kv: kv[0]):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # uint8 view: works for bf16 too
    return digest.hexdigest()


def check_tensors(where: str, payload: dict) -> None:
    """Refuse a payload whose stored `content_sha256` differs from the recomputed digest, or with NaN/inf tensors."""
    stored = payload.get("content_sha256")
    content = {k: v for k, v in payload.items() if k != "content_sha256"}
    if stored is not None:
        computed = tensor_digest(content)
        if stored != computed:
            raise DataError(f"{where}: file is corrupted: stored content hash {str(stored)[:16]}… ≠ computed "
                            f"{computed[:16]}… (re-copy or re-train it)")
    for key, tensor in _tensors(content):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DataError(f"{where}: tensor '{key}' contains NaN or infinite values (diverged or corrupted)")


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Atomically save a plain dict (tensors and primitives only) with the format version and content hash added."""
    payload = {"format_version": CHECKPOINT_FORMAT_VERSION, **payload}
    payload["content_sha256"] = tensor_digest({k: v for k, v in payload.items() if k != "content_sha256"})
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location="cpu", schema: dict | None = None) -> dict:
    """Load and check a checkpoint with `weights_only=True`; every problem is a one-line DataError naming the file.

    Checked before any use: readable (not truncated, foreign or pickled objects); `format_version` an int this code
    reads; the keys of `schema` (default: CHECKPOINT_SCHEMAS[kind] when the file's kind has one); the stored
    content hash (format ≥ 2 must have one); every floating tensor finite.
    """
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
    version = payload["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DataError(f"{path}: format_version must be a positive int, got {version!r}")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise DataError(f"{path}: checkpoint format {version} is newer than this code "
                        f"({CHECKPOINT_FORMAT_VERSION}); update nodule_diffusion")
    schema = schema if schema is not None else CHECKPOINT_SCHEMAS.get(payload.get("kind"), {})
    check_schema(str(path), payload, schema)
    if version >= 2 and not isinstance(payload.get("content_sha256"), str):
        raise DataError(f"{path}: format {version} checkpoint without a content_sha256 string (edited or corrupted)")
    check_tensors(str(path), payload)
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


def progress_options(stream=None) -> dict:
    """tqdm keyword arguments for the package's progress bars: live on a terminal; written to a file or a pipe
    (a redirected log), at most one update a minute, so that the log does not fill with carriage-return updates."""
    stream = sys.stderr if stream is None else stream
    return {} if getattr(stream, "isatty", lambda: False)() else {"mininterval": 60.0}
