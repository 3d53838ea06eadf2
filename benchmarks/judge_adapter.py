"""Judge one attribute LoRA of a run with a judge saved before (e.g. the phantom benchmark's judge.pt).

Base + LoRA a=v (its token on, every other attribute null, merged) generates from the masks and contexts of up
to --n held-out phantom nodules that lack v (seed 2, as `evaluation.controllability`), with the default sampler
(DDIM-50, η = 1, adapter guidance 1.5) or --sampler/--steps/--eta/--adapter_guidance (figures measured before
adapter guidance existed are reproduced with --adapter_guidance 1). Prints the fraction the judge calls v, the
judge's recall of v on the real crops, and the speckle figure (mean |∇²| in the region) of generated and real
crops. One judge for several runs makes their figures comparable; --weights scales the adapters (LoRA strength)
for a sweep. With several adapters (--adapter a=v,b=w) their ΔW are summed (the `linear` strategy) and their
tokens are on together; the nodules are chosen by the first one, and the judge's verdict is reported for each.

Examples:
    python benchmarks/judge_adapter.py --run runs/demo --judge runs/benchmark/judge.pt --adapter texture=ground_glass
    python benchmarks/judge_adapter.py --run runs/demo --judge runs/benchmark/judge.pt \\
        --adapter texture=ground_glass --n 200 --weights 1,1.5,2
    python benchmarks/judge_adapter.py --run runs/demo --judge runs/benchmark/judge.pt \\
        --adapter texture=ground_glass,calcification=none --n 200
    python benchmarks/judge_adapter.py --run runs/demo --judge runs/benchmark/judge.pt \\
        --adapter texture=ground_glass --n 64 --sampler ddpm --steps 250
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodule_diffusion import metrics  # noqa: E402
from nodule_diffusion.data import NoduleCrops  # noqa: E402
from nodule_diffusion.datasets import load_records  # noqa: E402
from nodule_diffusion.diffusion import parse_attributes  # noqa: E402
from nodule_diffusion.evaluation import generate_with_adapters, lacking_nodules  # noqa: E402
from nodule_diffusion.judge import load_judge  # noqa: E402
from nodule_diffusion.synthesis import ADAPTER_GUIDANCE, SAMPLE_ETA, SAMPLE_STEPS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a train.py output folder: base.pt and lora/<adapter>.pt")
    parser.add_argument("--judge", required=True, help="a judge file (judge.save_judge), same vocabulary")
    parser.add_argument("--adapter", required=True, help="attribute=value[,attribute=value...], e.g. "
                        "texture=ground_glass or texture=ground_glass,calcification=none")
    parser.add_argument("--n", type=int, default=32, help="held-out nodules lacking the value to generate from")
    parser.add_argument("--n_test", type=int, default=120, help="held-out phantom images (seed 2)")
    parser.add_argument("--weights", default="1", help="adapter strengths, comma-separated")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    parser.add_argument("--steps", type=int, default=SAMPLE_STEPS, help="reverse steps")
    parser.add_argument("--eta", type=float, default=SAMPLE_ETA, help="DDIM η (1 = DDPM's variance)")
    parser.add_argument("--adapter_guidance", type=float, default=ADAPTER_GUIDANCE,
                        help="sample.py --adapter_guidance (1 = the adapted model alone, as before this flag)")
    args = parser.parse_args()
    run, judge = Path(args.run), load_judge(args.judge)
    vocab = judge.vocab
    requested = parse_attributes(args.adapter, vocab)                   # {attribute: value}, first one leads
    names = [f"{a}={v}" for a, v in requested.items()]
    test = NoduleCrops(load_records("phantom", run / "data", args.n_test, 2, vocab), vocab, 32, 1.4, augment=False)
    t = test.get(torch.arange(len(test)))
    columns = {name: (list(vocab).index(a), vocab[a].index(v)) for name, (a, v) in zip(names, requested.items())}
    k, v = columns[names[0]]
    lacking = lacking_nodules(t["attrs"], k, v, args.n)
    carrying = t["attrs"][:, k] == v
    result = {"run": str(run), "adapters": names, "n": len(lacking),
              "sampler": [args.sampler, args.steps, args.eta, args.adapter_guidance],
              "real_recall": float((judge.predict(t["x0"])[carrying, k] == v).float().mean()), "by_weight": {}}
    for weight in (float(w) for w in args.weights.split(",")):
        batch, generated = generate_with_adapters(str(run / "base.pt"), run / "lora", names, test, lacking, "cpu",
                                                  [weight] * len(names),  # Σ_i w·ΔW_i, merged
                                                  adapter_guidance=args.adapter_guidance,
                                                  steps=args.steps, sampler=args.sampler, eta=args.eta)
        pred = judge.predict(generated)
        values = vocab[names[0].split("=")[0]]
        result["by_weight"][weight] = {
            "accuracy": {name: float((pred[:, kk] == vv).float().mean()) for name, (kk, vv) in columns.items()},
            "predicted": dict(zip(values, torch.bincount(pred[:, k], minlength=len(values)).tolist())),
            "speckle": metrics.mean_abs_laplacian(generated, batch["region"]),
            "speckle_real": metrics.mean_abs_laplacian(batch["x0"], batch["region"])}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
