"""Compare two tiny `train.py --stage all` runs (benchmarks/tiny_all.sh): same seed → same numbers?

    bash benchmarks/tiny_all.sh OLD_CHECKOUT /tmp/before && bash benchmarks/tiny_all.sh . /tmp/after
    python benchmarks/compare_runs.py /tmp/before /tmp/after

Compares report.json (without wall_time_s), log.jsonl, the synthetic images and annotations (run folder
replaced), the pictures, and every tensor of base.pt, lora/*.pt and compose/**/*.pt (RNG state, train config
and commit left out). Prints one line per item and IDENTICAL or DIFFERENT.
"""
import hashlib
import json
import sys
from pathlib import Path

import torch

a, b = Path(sys.argv[1]), Path(sys.argv[2])
ok = True


def check(name, x, y):
    global ok
    ok &= x == y
    print(("same " if x == y else "DIFF ") + name)


def report(run):
    r = json.loads((run / "report.json").read_text())
    r.pop("wall_time_s", None)
    return r


def hashes(run, *patterns):
    return {f.relative_to(run).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for pattern in patterns for f in sorted(run.glob(pattern))}


def tensors(obj, prefix=""):
    if torch.is_tensor(obj):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() if k not in ("rng_state", "train_config", "git_commit")
                for k2, v2 in tensors(v, f"{prefix}/{k}").items()}
    return {}


check("report.json (without wall_time_s)", report(a), report(b))
check("log.jsonl", (a / "log.jsonl").read_text(), (b / "log.jsonl").read_text())
check("synthetic/**/*.png", hashes(a, "synthetic/**/*.png"), hashes(b, "synthetic/**/*.png"))
check("synthetic/annotations.csv (run folder replaced)",
      (a / "synthetic/annotations.csv").read_text().replace(str(a), "RUN"),
      (b / "synthetic/annotations.csv").read_text().replace(str(b), "RUN"))
for name, digest in hashes(a, "*.png", "lora/*.png").items():
    check(f"picture {name}", digest, hashes(b, name).get(name))
files = ["base.pt", *sorted(str(f.relative_to(a)) for f in [*a.glob("lora/*.pt"), *a.glob("compose/**/*.pt")])]
for rel in files:
    ta, tb = tensors(torch.load(a / rel, weights_only=True)), tensors(torch.load(b / rel, weights_only=True))
    check(f"tensors of {rel}", set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), True)
print("IDENTICAL" if ok else "DIFFERENT")
