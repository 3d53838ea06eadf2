"""Between `linear` and a trained composition: mergers m = 1 + α·(m_trained − 1), scored like compose_budget's rows.

α = 0 is `linear` (every merger 1), α = 1 the trained composition. Over the benchmark's pairs the λ_p = 0, λ_d = 1
objective wins ill-defined pairs and loses spiculated ones against `linear` (RESULTS.md, "Composition budget").
If the two ends are good at different things, a point between them may keep both; this measures that, without
training again: it reads each pair's trained mergers (<tag folder>/compose/ortho_<pair>.parts), scales their
distance to 1, folds them as training.save_composed does and scores the result with the benchmark's judge and
pool (phantom_benchmark.score_set).

    python benchmarks/compose_shrink.py --run runs/benchmark --trained ortho_denoise_no_preserve_s100 --alpha 0.5
    python benchmarks/compose_shrink.py --run runs/benchmark --trained ortho_denoise_no_preserve_s100 --alpha 0.5 \\
        --pool_seed 12 --per_set 36
    python benchmarks/compose_budget.py --run runs/benchmark --table   # lists these rows too

Writes <run>/compose_budget/<trained tag>_shrink<100α>_s<steps>/ (compositions, sets) and its JSON beside
compose_budget's, in the same format.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compose_budget as cb  # noqa: E402  (folder names, the pooled table)
import phantom_benchmark as pb  # noqa: E402  (the benchmark's settings, judge, pairs and set scoring)
from nodule_diffusion import common, lora  # noqa: E402
from nodule_diffusion.diffusion import composed_path, load_lora, load_model  # noqa: E402
from nodule_diffusion.training import save_composed  # noqa: E402


def shrunk_composition(run: Path, trained: Path, target: Path, names: list[str], alpha: float) -> None:
    """Write target/compose/ortho_<names>.pt: the trained composition's adapters with m ← 1 + α·(m − 1)."""
    source = composed_path(trained, "ortho", names).with_suffix(".parts")
    if not source.is_dir():
        raise common.DataError(f"{source}: no trained mergers (train the composition with compose_budget.py first)")
    model, payload = load_model(run / "base.pt", "cpu")
    for n in names:
        load_lora(source / f"{n}.pt", model, payload["fingerprint"], n)
    with torch.no_grad():
        for layer in lora.lora_layers(model.unet).values():
            for n in names:
                if n in layer.lora_m:
                    layer.lora_m[n].copy_(1.0 + alpha * (layer.lora_m[n] - 1.0))
    config = lora.read_adapter(composed_path(trained, "ortho", names))["config"]
    save_composed(composed_path(target, "ortho", names), model, names, payload["fingerprint"],
                  {**config, "shrink_alpha": alpha, "shrunk_from": str(source)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a phantom benchmark folder (base.pt, lora/, compose_budget/)")
    parser.add_argument("--trained", required=True, help="a folder of <run>/compose_budget/, e.g. <tag>_s100")
    parser.add_argument("--alpha", type=float, required=True, help="0: linear, 1: the trained mergers")
    parser.add_argument("--pool_seed", type=int, default=cb.BENCHMARK_POOL[0])
    parser.add_argument("--per_set", type=int, default=cb.BENCHMARK_POOL[1])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run = Path(args.run)
    tag, _, steps = args.trained.rpartition("_s")
    if not tag or not steps.isdigit():
        raise common.DataError(f"--trained {args.trained!r}: expected a compose_budget folder <tag>_s<steps>")
    name = f"{tag}_shrink{round(100 * args.alpha)}"
    s = {**pb.settings(False), "per_set": args.per_set, "adapter_guidance": 1.0}  # its RESULTS rows: g = 1
    target = pb.adapter_folder(run, run / "compose_budget" / f"{name}_s{steps}")
    vocab = load_model(run / "base.pt", "cpu")[0].vocab
    judge, real, pool = pb.scoring_inputs(run, s, vocab, args.device, args.pool_seed)
    sets, suffix = [], cb.pool_suffix(args.pool_seed, args.per_set)
    for tex, mar in pb.pairs_of(vocab, s):
        names = [f"texture={tex}", f"margin={mar}"]
        if not composed_path(target, "ortho", names).is_file():
            shrunk_composition(run, run / "compose_budget" / args.trained, target, names, args.alpha)
        attrs = ",".join(names)
        scores = pb.score_set(run, judge, real, pool, attrs, "ortho", target / "lora", s,
                              target / ("sets" + suffix) / attrs.replace(",", "+"), args.device)
        sets.append({"attributes": attrs, "strategy": name, **scores})
        print(name, attrs, json.dumps(scores["accuracy"]), flush=True)
    result = {"tag": name, "steps": int(steps), "seed": 0, "pool_seed": args.pool_seed, "per_set": args.per_set,
              "training_s": None, "alpha": args.alpha, "sets": sets}
    common.write_json(run / "compose_budget" / f"{name}_s{steps}{suffix}.json", result)


if __name__ == "__main__":
    main()
