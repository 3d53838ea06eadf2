"""Composition accuracy against the composition-training budget: does `ortho` beat `linear` when it trains longer?

The phantom benchmark gives each composition a fixed budget (15 steps until its budget moved to 30; at 15 the
mergers moved by 7-8 % and `ortho`, its two ablations and `linear` gave the same verdicts, RESULTS.md). This
script re-trains the compositions of the benchmark's texture × margin pairs at other budgets, from the same base
and adapters, and measures them with the benchmark's judge and nodule pool (phantom_benchmark.score_set), so its
rows sit beside the benchmark's table.

    python benchmarks/compose_budget.py --run runs/benchmark --steps 100 --tags ortho
    # two processes on two cores (one thread each), then the table of every result so far:
    OMP_NUM_THREADS=1 python benchmarks/compose_budget.py --run runs/benchmark --steps 100 --tags ortho &
    OMP_NUM_THREADS=1 python benchmarks/compose_budget.py --run runs/benchmark --steps 100 --tags ortho_no_orth
    python benchmarks/compose_budget.py --run runs/benchmark --table
    # the same compositions (and linear) scored on 36 other nodules per pair; a second training seed:
    python benchmarks/compose_budget.py --run runs/benchmark --steps 100 --tags linear,ortho --pool_seed 12 --per_set 36
    python benchmarks/compose_budget.py --run runs/benchmark --steps 100 --tags ortho --seed 1
    # the same compositions sampled with adapter guidance g = 2 (sample.py --adapter_guidance 2):
    python benchmarks/compose_budget.py --run runs/benchmark --steps 30 --tags linear,ortho_denoise_no_preserve \\
        --adapter_guidance 2

Tags (each with its λs in full, see TAGS): linear (no training), ziplora; ortho = method.md §3's objective (λ_p = 1,
λ_d = 0) and its ablations ortho_no_orth (λ_o = 0) and ortho_no_attn (λ_a = 0); ortho_denoise (λ_d = 1 as well:
the denoising term on nodules carrying both values); ortho_denoise_no_preserve (λ_p = 0, λ_d = 1: train.py's
default), its ablations ortho_denoise_no_preserve_no_orth and ortho_denoise_no_preserve_no_attn, and
ortho_denoise_no_preserve_lr5x (5× the mergers' learning rate). Writes
<run>/compose_budget/<tag>_s<steps>[_seed<S>]/ (compositions and inserted sets) and <tag>_s<steps>.json (training
seconds and scores per pair; _seed<S> with --seed, _pool<P>x<N> with another --pool_seed / --per_set, which
re-scores existing compositions on more nodules without training them again, and _g<g> with --adapter_guidance,
which scores them with sample.py's adapter guidance); --table prints every JSON there
as one markdown table with `linear` (no training) from the benchmark's own controllability part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import phantom_benchmark as pb  # noqa: E402  (the benchmark's settings, judge, pairs and set scoring)
import train  # noqa: E402
from nodule_diffusion import common, synthesis  # noqa: E402
from nodule_diffusion.diffusion import composed_path, load_model  # noqa: E402

# Every tag names its λs in full, whatever train.py's defaults are, so a saved row keeps its meaning [OURS Eq. 1].
PRESERVE = {"lambda_preserve": 1.0, "lambda_denoise": 0.0}  # method.md §3's objective (train.py's old default)
DENOISE = {"lambda_preserve": 0.0, "lambda_denoise": 1.0}   # train.py's default since the composition budget
TAGS = {"linear": ("linear", {}), "ziplora": ("ziplora", {}),
        "ortho": ("ortho", PRESERVE),
        "ortho_no_orth": ("ortho", {**PRESERVE, "lambda_orth": 0.0}),
        "ortho_no_attn": ("ortho", {**PRESERVE, "lambda_attn": 0.0}),
        "ortho_denoise": ("ortho", {**PRESERVE, "lambda_denoise": 1.0}),
        "ortho_denoise_no_preserve": ("ortho", DENOISE),
        "ortho_denoise_no_preserve_no_orth": ("ortho", {**DENOISE, "lambda_orth": 0.0}),
        "ortho_denoise_no_preserve_no_attn": ("ortho", {**DENOISE, "lambda_attn": 0.0}),
        # the mergers at 5× train.py's --compose_lr (0.01): do they move too little in 100 steps?
        "ortho_denoise_no_preserve_lr5x": ("ortho", {**DENOISE, "compose_lr": 0.05})}


BENCHMARK_POOL = (11, 12)  # the benchmark's own scoring pool: phantom seed 11, 12 images (one nodule each)


def trained_name(tag: str, steps: int, seed: int) -> str:
    """The folder of a tag's compositions: <tag>_s<steps>, then _seed<S> for another training seed."""
    return f"{tag}_s{steps}" + (f"_seed{seed}" if seed else "")


def pool_suffix(pool_seed: int, per_set: int, adapter_guidance: float = 1.0) -> str:
    """'' for the benchmark's pool, else _pool<P>x<N>, then _g<g> for adapter guidance g ≠ 1: on the JSON of a
    result and on its sets/ folder."""
    pool = "" if (pool_seed, per_set) == BENCHMARK_POOL else f"_pool{pool_seed}x{per_set}"
    return pool + pb.guidance_suffix(adapter_guidance)


def run_budget(run: Path, tag: str, steps: int, s: dict, device, seed: int = 0, pool_seed: int = 11) -> dict:
    """Train every pair's composition of `tag` at `steps` steps (training seed `seed`, train.py's one seed: batches
    and noise, and the phantom training images too), unless it exists, then score each pair's inserted set on
    s["per_set"] pool images of seed `pool_seed`."""
    strategy, overrides = TAGS[tag]
    folder = pb.adapter_folder(run, run / "compose_budget" / trained_name(tag, steps, seed))
    vocab = load_model(run / "base.pt", "cpu")[0].vocab
    pairs = pb.pairs_of(vocab, s)
    base_cfg = train.TrainConfig(out_dir=str(run), n_images=s["n_images"], device=str(device), seed=seed)
    loop = train.LoopConfig(steps=steps, batch_size=s["batch_size"], sample_every=0, checkpoint_every=steps)
    names = [[f"texture={tex}", f"margin={mar}"] for tex, mar in pairs]
    to_train = strategy != "linear" and not all(composed_path(folder, strategy, n).is_file() for n in names)
    t = time.time()
    if strategy != "linear":  # linear merges at load time: nothing to train
        for tex, mar in pairs:
            pb.compose_into(folder, base_cfg, loop, strategy, f"texture={tex},margin={mar}", **overrides)
    seconds = time.time() - t if to_train else None  # None: linear, or every composition was trained before
    judge, real, pool = pb.scoring_inputs(run, s, vocab, device, pool_seed)
    sets = []
    sets_dir = folder / ("sets" + pool_suffix(pool_seed, s["per_set"], s["adapter_guidance"]))
    for tex, mar in pairs:
        attrs = f"texture={tex},margin={mar}"
        scores = pb.score_set(run, judge, real, pool, attrs, strategy, folder / "lora", s,
                              sets_dir / attrs.replace(",", "+"), device)
        sets.append({"attributes": attrs, "strategy": tag, **scores})
        print(tag, steps, attrs, json.dumps(scores["accuracy"]))
    return {"tag": tag, "steps": steps, "seed": seed, "pool_seed": pool_seed, "per_set": s["per_set"],
            "adapter_guidance": s["adapter_guidance"], "training_s": seconds, "sets": sets}


def table(run: Path) -> str:
    """Every <tag>_s<steps>.json of the run, and the benchmark's own rows (linear, and its ortho and ziplora at
    the steps its compositions ran, from config_compose.json: runs before the benchmark's budget moved to 30
    steps trained 15)."""
    rows = []
    bench = run / "parts" / "controllability.json"
    if bench.is_file():
        sets = json.loads(bench.read_text())["result"]["sets"]
        trained = json.loads((run / "config_compose.json").read_text())["loop"]["steps"]
        for strategy in ("linear", "ortho", "ziplora"):
            steps = 0 if strategy == "linear" else trained
            rows.append((strategy, steps, None, 0, BENCHMARK_POOL,
                         [x for x in sets if x["strategy"] == strategy and x["attributes"].count("=") == 2]))
    for path in sorted((run / "compose_budget").glob("*_s*.json")):
        r = json.loads(path.read_text())
        pool = (r.get("pool_seed", BENCHMARK_POOL[0]), r.get("per_set", BENCHMARK_POOL[1]))
        g = r.get("adapter_guidance", 1.0)
        rows.append((r["tag"] + (f" (g = {g:g})" if g != 1 else ""), 0 if r["tag"] == "linear" else r["steps"],
                     r["training_s"], r.get("seed", 0), pool, r["sets"]))
    lines = ["| strategy | composition steps | training wall min (9 pairs) | training seed / pool seed×images |"
             " texture acc | margin acc | both correct | mask Dice |", "|---|---|---|---|---|---|---|---|"]
    for tag, steps, seconds, seed, (pool_seed, per_set), sets in rows:
        m = pb.pair_means(sets)
        minutes = "" if seconds is None else f"{seconds / 60:.1f}"
        lines.append(f"| {tag} | {steps} | {minutes} | {seed} / {pool_seed}×{per_set} | {m['texture']:.3f} | "
                     f"{m['margin']:.3f} | "
                     f"{m['all_requested']:.3f} | {m['dice']:.3f} |")
    return "\n".join(lines + ["", pooled(rows)])


MARGINS = ("well_defined", "ill_defined", "spiculated")


def pooled(rows) -> str:
    """Rows of one (tag, steps, training seed) scored on several pools, as one: each pool's mean over the pairs,
    weighted by its nodules (12 or 36 per pair), so the estimate rests on 432 nodules instead of 108 or 324."""
    groups: dict[tuple, dict] = {}
    for tag, steps, _, seed, pool, sets in rows:  # a later row of the same pool (this script's) replaces an earlier
        means = pb.pair_means(sets)
        for margin in MARGINS:  # both correct over the three pairs with this margin
            means[margin] = pb.pair_means([x for x in sets if x["attributes"].endswith(f"margin={margin}")])[
                "all_requested"]
        groups.setdefault((tag, steps, seed), {})[pool] = (pool[1] * len(sets), means)  # (nodules, means)
    lines = ["| strategy | composition steps | training seed | pools | nodules | texture acc | margin acc | "
             "both correct | both correct, well / ill / spiculated margin |", "|---|---|---|---|---|---|---|---|---|"]
    for (tag, steps, seed), by_pool in groups.items():
        scores = list(by_pool.values())
        if len(scores) < 2:
            continue
        n = sum(nodules for nodules, _ in scores)
        mean = lambda k: sum(nodules * m[k] for nodules, m in scores) / n  # noqa: E731
        lines.append(f"| {tag} | {steps} | {seed} | {len(scores)} | {n} | {mean('texture'):.3f} | "
                     f"{mean('margin'):.3f} | {mean('all_requested'):.3f} | "
                     + " / ".join(f"{mean(m):.2f}" for m in MARGINS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/benchmark", help="a phantom_benchmark.py --out_dir with its models")
    parser.add_argument("--steps", default="100", help="composition budgets, comma-separated")
    parser.add_argument("--tags", default="ortho", help="comma-separated: " + ", ".join(TAGS))
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed of the compositions (train.py's --seed: batches, noise and the phantom "
                             "training images)")
    parser.add_argument("--pool_seed", type=int, default=BENCHMARK_POOL[0],
                        help="phantom seed of the images that receive nodules")
    parser.add_argument("--per_set", type=int, default=BENCHMARK_POOL[1], help="nodules per pair (one per pool image)")
    parser.add_argument("--adapter_guidance", type=float, default=synthesis.ADAPTER_GUIDANCE,
                        help="score with sample.py --adapter_guidance g (compositions are not trained again)")
    parser.add_argument("--table", action="store_true", help="only print the table of every result so far")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    run = Path(args.run)
    if not args.table:
        if not (run / "base.pt").is_file() or not (run / "lora").is_dir():
            raise common.DataError(f"{run}: no base.pt and lora/ (run benchmarks/phantom_benchmark.py first)")
        device = common.resolve_device(args.device)
        s = {**pb.settings(False), "per_set": args.per_set, "adapter_guidance": args.adapter_guidance}
        for tag in pb.chosen(args.tags, tuple(TAGS), "--tags"):
            for steps in (int(x) for x in args.steps.split(",")):
                result = run_budget(run, tag, steps, s, device, args.seed, args.pool_seed)
                name = trained_name(tag, steps, args.seed) + pool_suffix(args.pool_seed, args.per_set,
                                                                         args.adapter_guidance)
                common.write_json(run / "compose_budget" / f"{name}.json", result)
    print(table(run))


if __name__ == "__main__":
    main()
