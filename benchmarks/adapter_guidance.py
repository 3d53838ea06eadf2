"""Adapter guidance (compose.base_guided): single-attribute control and realism against the guidance scale g.

For every g of --scales, evaluation.controllability with a judge saved before (the benchmark's judge.pt): each
LoRA of the run generates from the masks and contexts of up to --n held-out phantom nodules (seed 2) that lack its
value; reported per value are the judge's accuracy, FD_judge against real crops carrying the value with its
real-vs-real floor, and the speckle figure (mean |∇²| in the region) of generated and real crops. g = 1 is the
adapted model alone (the paper's sampler); g > 1 moves each step further from the base, at twice the forwards.
Results are added to --out (JSON, keyed by g), so several processes can split the scales; --table prints the
Markdown table of what --out holds; --grids writes a sample grid per adapter and scale instead of measuring.

Examples:
    python benchmarks/adapter_guidance.py --run runs/benchmark --judge runs/benchmark/judge.pt --scales 1,2 \\
        --out runs/benchmark/adapter_guidance.json
    python benchmarks/adapter_guidance.py --run runs/benchmark --judge runs/benchmark/judge.pt --scales 1.5 \\
        --names texture=ground_glass,calcification=calcified --out runs/benchmark/adapter_guidance.json
    python benchmarks/adapter_guidance.py --out runs/benchmark/adapter_guidance.json --table
    python benchmarks/adapter_guidance.py --run runs/benchmark --judge runs/benchmark/judge.pt --scales 1,2 \\
        --names texture=ground_glass --out runs/benchmark/adapter_guidance.json --grids
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodule_diffusion import evaluation, lora, synthesis  # noqa: E402
from nodule_diffusion.data import NoduleCrops  # noqa: E402
from nodule_diffusion.diffusion import load_lora, load_model  # noqa: E402
from nodule_diffusion.common import write_json  # noqa: E402
from nodule_diffusion.datasets import load_records  # noqa: E402
from nodule_diffusion.judge import load_judge  # noqa: E402


def measure(run: Path, judge_path: str, g: float, names: list[str], n: int, n_test: int) -> dict:
    """evaluation.controllability of `names` at adapter guidance g, with the saved judge; adds the seconds."""
    judge = load_judge(judge_path)
    names = names or [f"{a}={v}" for a, values in judge.vocab.items() for v in values]
    test = load_records("phantom", run / "data", n_test, 2, judge.vocab)
    start = time.process_time()
    result = evaluation.controllability(str(run / "base.pt"), run / "lora", names, [], test, 1.4,
                                        evaluation.JudgeSettings(), "cpu", n=n, judge=judge, adapter_guidance=g)
    return {**result, "cpu_s": {",".join(names): time.process_time() - start}, "run": str(run), "judge": judge_path}


def grids(run: Path, judge_path: str, g: float, names: list[str], n_test: int, folder: Path) -> None:
    """synthesis.lora_grid of each adapter at scale g on the held-out crops: folder/g<g>_<name>.png (mask | real
    | generated, masks of nodules that lack the value)."""
    vocab = load_judge(judge_path).vocab
    crops = NoduleCrops(load_records("phantom", run / "data", n_test, 2, vocab), vocab, 32, 1.4, augment=False)
    base = load_model(str(run / "base.pt"), "cpu")[0]  # guidance's unconditional model: frozen, one for all
    for name in names or [f"{a}={v}" for a, values in vocab.items() for v in values]:
        model, payload = load_model(str(run / "base.pt"), "cpu")
        load_lora(run / "lora" / f"{name}.pt", model, payload["fingerprint"], name)
        lora.set_active(model.unet, [name])
        lora.merge(model.unet)
        synthesis.lora_grid(model, crops, name, folder / f"g{g:g}_{name}.png", g, base, n=16)


def add_result(out: Path, g: float, result: dict) -> None:
    """Merge result into out[g] under a file lock (two processes may write at once)."""
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = json.loads(out.read_text()) if out.is_file() else {}
        old = table.get(f"{g:g}", {})
        for key, value in result.items():
            old[key] = {**old.get(key, {}), **value} if isinstance(value, dict) else value
        table[f"{g:g}"] = old
        write_json(out, table)


def markdown(table: dict) -> str:
    lines = ["| value | g | judge on generated (n) | judge recall on real | FD_judge / floor | speckle gen / real |",
             "|---|---|---|---|---|---|"]
    rows = [(name, float(g), r) for g, r in table.items() for name in r["accuracy"]]
    for name, g, r in sorted(rows, key=lambda row: (row[0], row[1])):
        fd, floor = r["fd_judge"].get(name), r["fd_floor"].get(name)
        lines.append(f"| `{name}` | {g:g} | {r['accuracy'][name]:.3f} ({r['n_generated'][name]}) | "
                     f"{r['real_recall'][name]:.3f} | "
                     + (f"{fd:.2f} / {floor:.2f} | " if fd is not None else "– | ")
                     + f"{r['speckle'][name]:.3f} / {r['speckle_real'][name]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a train.py output folder: base.pt, lora/<adapter>.pt, data/")
    parser.add_argument("--judge", help="a judge file (judge.save_judge), same vocabulary")
    parser.add_argument("--scales", default="1,2", help="adapter guidance scales g, comma-separated")
    parser.add_argument("--names", default="", help="adapters (attribute=value, comma-separated); default: all")
    parser.add_argument("--n", type=int, default=64, help="held-out nodules lacking each value")
    parser.add_argument("--n_test", type=int, default=200, help="held-out phantom images (seed 2)")
    parser.add_argument("--out", required=True, help="JSON file the results are added to")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    parser.add_argument("--grids", action="store_true", help="only write a sample grid per adapter and scale, "
                        "beside --out (<out stem>_grids/g<g>_<name>.png)")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.table:
        if not (args.run and args.judge):
            parser.error("--run and --judge are needed to measure")
        names = [x for x in args.names.split(",") if x]
        for g in (float(x) for x in args.scales.split(",")):
            if args.grids:
                grids(Path(args.run), args.judge, g, names, args.n_test, out.with_name(f"{out.stem}_grids"))
            else:
                add_result(out, g, measure(Path(args.run), args.judge, g, names, args.n, args.n_test))
        if args.grids:
            return
    print(markdown(json.loads(out.read_text())))


if __name__ == "__main__":
    main()
