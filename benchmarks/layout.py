"""How the code is laid out: source files, lines, the import graph, and the files one paper step runs through.

    python benchmarks/layout.py            # static: files, lines, import arrows, levels, cycles, upward arrows
    python benchmarks/layout.py --paths    # + the package files that run when training one attribute LoRA
                                           #   (train.py --stage lora) and inserting a nodule (sample.py), traced

Static part (ast, no imports executed): every `import` / `from … import` of a package module in the package and
the three scripts, function-local ones included, is one arrow (file → module, counted once per pair). A file's
level is 1 + the highest level of what it imports (level 1 imports nothing of ours), so the number of levels is
the longest import chain; a cycle has no level and is reported. `__init__.py` is a source file like any other.

Traced part (--paths): a tiny base model is trained first (phantom data, tiny UNet, a few steps); then each
command runs in-process under `sys.setprofile`, which records every Python function call. A package file is
"opened" when one of its functions is called during the command (module-level code at import time is not a
call into it). The count is given twice: every package file, and without the data/infrastructure layer that every
path reads through (common, checks, data, formats, derived, datasets, phantom). A call whose caller is a package file and whose
callee is a script is a call back up into the script and is listed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nodule_diffusion"
SCRIPTS = ("train.py", "sample.py", "eval_detect.py")
# The data/infrastructure layer every path reads and writes through: plumbing, readers, input checks (checks,
# added with issue 11's validation) and the format writers (derived, issue 11's derived files, formats' twin).
FOUNDATION = ("common", "checks", "data", "formats", "derived", "datasets", "phantom")


def source_files() -> dict[str, Path]:
    """name → path: package modules by module name ("__init__" included), scripts by file name."""
    files = {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}
    files.update({s: ROOT / s for s in SCRIPTS})
    return files


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Package modules imported anywhere in `path` (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "nodule_diffusion" and len(parts) > 1 and parts[1] in modules:
                    out.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            relative = node.level > 0 and path.parent == PACKAGE
            if node.module in (None, "nodule_diffusion") and (relative or node.module == "nodule_diffusion"):
                out |= {a.name for a in node.names if a.name in modules}  # from nodule_diffusion import x
            elif node.module and (relative or node.module.startswith("nodule_diffusion.")):
                name = node.module.split(".")[-1] if not relative else node.module.split(".")[0]
                if name in modules:
                    out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    modules = {n for n, p in files.items() if p.parent == PACKAGE}
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


def levels(graph: dict[str, set[str]]) -> tuple[dict[str, int], list[str]]:
    """Level of every file (1 + max level of its imports); files on or above a cycle are returned separately."""
    level: dict[str, int] = {}
    remaining = dict(graph)
    while remaining:
        ready = [n for n, deps in remaining.items() if deps <= set(level)]
        if not ready:
            return level, sorted(remaining)
        for n in ready:
            level[n] = 1 + max((level[d] for d in remaining[n]), default=0)
            del remaining[n]
    return level, []


def static_report() -> None:
    files = source_files()
    graph = import_graph()
    level, cyclic = levels(graph)
    lines = sum(len(p.read_text().splitlines()) for p in files.values())
    arrows = sum(len(v) for v in graph.values())
    print(f"source files: {len(files)} ({len(files) - len(SCRIPTS)} package + {len(SCRIPTS)} scripts), "
          f"lines: {lines}")
    print(f"import arrows: {arrows}, levels: {max(level.values(), default=0)}, "
          f"cycles: {'none' if not cyclic else ', '.join(cyclic)}")
    for lv in range(max(level.values(), default=0), 0, -1):
        print(f"  level {lv:2d}: " + ", ".join(sorted(n for n, v in level.items() if v == lv)))
    upward = [(a, b) for a, deps in graph.items() for b in deps if a in level and b in level and level[b] >= level[a]]
    script_imports = [(a, b) for a, deps in graph.items() for b in deps if b in SCRIPTS]
    print(f"arrows to a file on the same or a higher level: {upward or 'none'}; package → script: "
          f"{script_imports or 'none'}")


# ----------------------------------------------------------------------------------------------- traced paths
class CallTracer:
    """Records the package files whose functions are called, and calls from the package into a script."""

    def __init__(self):
        self.files: set[str] = set()
        self.back_calls: set[tuple[str, str]] = set()
        self.scripts = {str(ROOT / s) for s in SCRIPTS}

    def __call__(self, frame, event, arg):
        if event != "call":
            return
        callee = frame.f_code.co_filename
        if frame.f_code.co_name == "<module>":
            return  # module-level code at import time
        if callee.startswith(str(PACKAGE)):
            self.files.add(Path(callee).stem)
        elif callee in self.scripts and frame.f_back is not None:
            caller = frame.f_back.f_code.co_filename
            if caller.startswith(str(PACKAGE)):
                self.back_calls.add((Path(caller).stem, frame.f_code.co_name))


def traced(main, argv) -> CallTracer:
    tracer = CallTracer()
    sys.setprofile(tracer)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(argv)
    finally:
        sys.setprofile(None)
    return tracer


def paths_report() -> None:
    sys.path.insert(0, str(ROOT))
    import sample
    import train

    tiny = ["--crop_size", "16", "--base_channels", "16", "--channel_mult", "1", "2", "--attention_levels", "1",
            "--context_dim", "32", "--num_heads", "4", "--norm_groups", "8", "--no-mid_attention"]
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--device", "cpu", "--seed", "0", "--out_dir", tmp, "--n_images", "30"]
        loop = ["--steps", "2", "--batch_size", "2", "--sample_every", "0", "--log_every", "1"]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train.main(["--stage", "base", *loop, *tiny, *common])
        runs = {
            "train one attribute LoRA (train.py --stage lora)":
                (train.main, ["--stage", "lora", "--ckpt", f"{tmp}/base.pt", "--attribute", "texture=solid",
                              *loop, *common]),
            "insert a nodule (sample.py --strategy lora)":
                (sample.main, ["--ckpt", f"{tmp}/base.pt", "--strategy", "lora", "--attributes", "texture=solid",
                               "--n_images", "2", "--steps", "2", "--device", "cpu", "--out_dir", f"{tmp}/syn"]),
        }
        for name, (main, argv) in runs.items():
            tracer = traced(main, argv)
            core = sorted(tracer.files - set(FOUNDATION))
            print(f"{name}: {len(core)} package files without the data/infrastructure layer ({', '.join(core)}); "
                  f"{len(tracer.files)} with it; calls back into a script: {sorted(tracer.back_calls) or 'none'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", action="store_true", help="also trace the two paths (about a minute on a CPU)")
    args = parser.parse_args()
    static_report()
    if args.paths:
        paths_report()
