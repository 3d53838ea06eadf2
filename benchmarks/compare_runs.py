"""Compare two tiny `train.py --stage all` runs: report.json (minus wall time), log.jsonl, synthetic images, tensors."""
import hashlib, json, sys
from pathlib import Path
import torch

a, b = Path(sys.argv[1]), Path(sys.argv[2])
ok = True
def check(name, x, y):
    global ok
    same = x == y
    ok &= same
    print(("same " if same else "DIFF ") + name)
def rep(p):
    r = json.loads((p / "report.json").read_text()); r.pop("wall_time_s", None); return r
check("report.json (without wall_time_s)", rep(a), rep(b))
check("log.jsonl", (a / "log.jsonl").read_text(), (b / "log.jsonl").read_text())
def hashes(p, pattern):
    return {f.relative_to(p).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.glob(pattern))}
check("synthetic/**/*.png", hashes(a, "synthetic/**/*.png"), hashes(b, "synthetic/**/*.png"))
check("synthetic/annotations.csv (run folder replaced)", (a / "synthetic/annotations.csv").read_text().replace(str(a), "RUN"),
      (b / "synthetic/annotations.csv").read_text().replace(str(b), "RUN"))
check("pictures (*.png, lora/*.png)", hashes(a, "*.png") | hashes(a, "lora/*.png"), hashes(b, "*.png") | hashes(b, "lora/*.png"))
def tensors(obj, prefix=""):
    if torch.is_tensor(obj): return {prefix: obj}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in ("rng_state", "train_config", "git_commit"): continue
            out.update(tensors(v, f"{prefix}/{k}"))
        return out
    return {}
for rel in ["base.pt", *sorted(str(f.relative_to(a)) for f in a.glob("lora/*.pt")), *sorted(str(f.relative_to(a)) for f in a.glob("compose/**/*.pt"))]:
    ta, tb = tensors(torch.load(a / rel, weights_only=True)), tensors(torch.load(b / rel, weights_only=True))
    check(f"tensors of {rel}", set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), True)
print("IDENTICAL" if ok else "DIFFERENT")
