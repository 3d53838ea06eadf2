"""Score one attribute request under several strategies on a pool of the benchmark's choosing.

The phantom benchmark scores each (request, strategy) on 12 pool images (phantom seed 11), which is ±0.14 on one
request. This scores a request again, on any pool, with the models already in a benchmark folder: one nodule per
pool image, the benchmark's judge, sampler and scoring (phantom_benchmark.score_set), e.g. the three-attribute
composition, whose `ortho` and `linear` rows rest on 12 nodules each:

    python benchmarks/score_sets.py --run runs/benchmark \\
        --attributes texture=part_solid,margin=ill_defined,calcification=calcified \\
        --strategies linear,svd,ties,ortho,cfg --pool_seed 12 --per_set 36

    # an ablation's composition (its own folder of adapters), as one named row:
    python benchmarks/score_sets.py --run runs/benchmark --attributes ... --strategies ortho \\
        --lora_dir runs/benchmark/ablations/ortho_no_orth/lora --name ortho_no_orth

Writes the inserted sets under <run>/score_sets/pool<P>x<N>/<row>_<request>/ and one JSON per call beside them
(<request>_<rows>.json: the scores per row); prints a markdown table of the judge's accuracy per attribute.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import phantom_benchmark as pb  # noqa: E402  (the benchmark's settings, judge, pool and set scoring)
from nodule_diffusion import common, synthesis  # noqa: E402
from nodule_diffusion.diffusion import load_model, parse_attributes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a phantom benchmark folder (base.pt, lora/, compose/, judge.pt)")
    parser.add_argument("--attributes", required=True, help="the request, e.g. texture=solid,margin=spiculated")
    parser.add_argument("--strategies", default="linear,ortho", help="comma-separated sample.py strategies")
    parser.add_argument("--pool_seed", type=int, default=12)
    parser.add_argument("--per_set", type=int, default=36)
    parser.add_argument("--lora_dir", default="", help="adapters (and ../compose/ for ortho, ziplora) to use "
                                                          "instead of <run>/lora, e.g. <run>/ablations/ortho_no_orth/lora")
    parser.add_argument("--name", default="", help="the row's name (one strategy only), e.g. ortho_no_orth")
    parser.add_argument("--adapter_guidance", type=float, default=synthesis.ADAPTER_GUIDANCE,
                        help="sample.py --adapter_guidance of every adapter strategy (1 = the paper's sampler)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run = Path(args.run)
    strategies = [x for x in args.strategies.split(",") if x]
    if args.name and len(strategies) != 1:
        raise common.DataError(f"--name {args.name!r} names one row: give one strategy, not {args.strategies!r}")
    lora_dir = Path(args.lora_dir) if args.lora_dir else run / "lora"
    vocab = load_model(run / "base.pt", "cpu")[0].vocab
    attributes = parse_attributes(args.attributes, vocab)  # DataError on an unknown attribute or value
    request = "+".join(f"{a}={v}" for a, v in attributes.items())
    s = {**pb.settings(False), "per_set": args.per_set, "adapter_guidance": args.adapter_guidance}
    judge, real, pool = pb.scoring_inputs(run, s, vocab, args.device, args.pool_seed)
    folder = run / "score_sets" / f"pool{args.pool_seed}x{args.per_set}{pb.guidance_suffix(args.adapter_guidance)}"
    scores = {}
    for strategy in strategies:
        row = args.name or strategy
        scores[row] = pb.score_set(run, judge, real, pool, args.attributes, strategy, lora_dir, s,
                                   folder / f"{row}_{request}", args.device)
        print(row, json.dumps(scores[row]["accuracy"]), flush=True)
    common.write_json(folder / f"{request}_{'+'.join(scores)}.json",
                      {"attributes": args.attributes, "pool_seed": args.pool_seed, "per_set": args.per_set,
                       "adapter_guidance": args.adapter_guidance,
                       "lora_dir": str(lora_dir), "scores": scores})
    names = list(attributes)
    lines = [f"| strategy | {' | '.join(names)} | all correct | mask Dice |", "|---|" + "---|" * (len(names) + 2)]
    for row, result in scores.items():
        acc = result["accuracy"]
        lines.append(f"| {row} | " + " | ".join(f"{acc[n]:.3f}" for n in names)
                     + f" | {acc['all_requested']:.3f} | {result['mask_dice_mean']:.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
