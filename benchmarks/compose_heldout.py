"""Does composition training generalise? The composed model's denoising loss on nodules it trained on and on
held-out ones, against `linear` (mergers m = 1), for the benchmark's texture × margin pairs.

`ortho` with λ_p = 0, λ_d = 1 (train.py's default) trains only merger vectors, on the 37–55 training nodules
that carry both values of a pair. Its judge verdicts tie `linear` (RESULTS.md, "Composition budget"). This asks
whether the mergers learn the combination (lower loss than `linear` on held-out nodules carrying both values,
phantom seed 1) or fit the training nodules (lower loss on them only). Every model sees the same crops, the same
t and the same noise (one seeded generator per pass), so the differences are paired.

    python benchmarks/compose_heldout.py --run runs/benchmark \\
        --tags ortho_denoise_no_preserve_s100,ortho_denoise_no_preserve_s30 --out runs/benchmark/compose_heldout.json

A tag is a folder of compositions under <run>/compose_budget/ (benchmarks/compose_budget.py writes them);
`linear` is always measured from <run>/lora. Prints one markdown table; --out writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import phantom_benchmark as pb  # noqa: E402  (the benchmark's settings and pairs)
from nodule_diffusion import common, compose  # noqa: E402
from nodule_diffusion.data import NoduleCrops  # noqa: E402
from nodule_diffusion.datasets import load_records  # noqa: E402
from nodule_diffusion.diffusion import attr_tensor, denoising_loss, joint_subset, load_model  # noqa: E402


def joint_crops(run: Path, vocab: dict, seed: int, names: list[str]) -> dict:
    """Every nodule of the benchmark's 400 phantom images of `seed` that carries all of `names`, unaugmented."""
    crops = NoduleCrops(load_records("phantom", run / "data", pb.settings(False)["n_images"], seed, vocab), vocab,
                        32, 1.4, augment=False)
    return crops.get(joint_subset(crops, vocab, names))


BANDS = ((0, 100), (100, 300), (300, 600), (600, 1000))  # t ranges: fine detail … overall shape and intensity


@torch.no_grad()
def band_losses(run: Path, strategy: str, lora_dir: Path, attributes: dict, batch: dict, passes: int,
                mask_weight: float | None = None) -> dict:
    """The composed model's denoising loss (diffusion.denoising_loss, as composition training computes it) in
    each t band, averaged over `passes` draws of t (uniform in the band) and ε on the whole batch; pass p of
    every band and model draws with seed p, so models are compared on the same x_t. "all": the band mean,
    weighted by band width (= uniform t, as in training). mask_weight: the weight λ of the regenerated region
    (default: the model's, as in training; 0 = outside the region only, 1e6 ≈ inside it only)."""
    model, payload = load_model(run / "base.pt", "cpu")
    model.eval()
    compose.eps_function(model, payload["fingerprint"], strategy, attributes, lora_dir)  # loads and merges
    n = len(batch["x0"])
    attrs = attr_tensor(attributes, model.vocab, n, "cpu")
    scheduler = model.diffusion.scheduler()
    out = {}
    for lo, hi in BANDS:
        losses = []
        for p in range(passes):
            t = torch.randint(lo, hi, (n,), generator=torch.Generator().manual_seed(1000 + p))
            weight = model.diffusion.mask_weight if mask_weight is None else mask_weight
            losses.append(denoising_loss(model, scheduler, batch, weight,
                                         torch.Generator().manual_seed(p), attrs, t=t))
        out[f"{lo}-{hi}"] = float(torch.stack(losses).mean())
    out["all"] = sum(out[f"{lo}-{hi}"] * (hi - lo) for lo, hi in BANDS) / scheduler.num_train_timesteps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a phantom benchmark folder (base.pt, lora/, compose_budget/)")
    parser.add_argument("--tags", required=True, help="comma-separated folders of <run>/compose_budget/")
    parser.add_argument("--passes", type=int, default=8, help="draws of (t, ε) per nodule, t band and model")
    parser.add_argument("--splits", default="train,held_out",
                        help="train: the nodules of phantom seed 0 (the training images); held_out: seed 1")
    parser.add_argument("--mask_weight", type=float, default=None,
                        help="weight of the regenerated region in the loss (default: the model's, as in training; "
                             "0: outside the region only; 1e6: inside it only)")
    parser.add_argument("--out", default="", help="write the rows as JSON here")
    args = parser.parse_args()
    run, tags = Path(args.run), [t for t in args.tags.split(",") if t]
    for tag in tags:
        if not (run / "compose_budget" / tag / "compose").is_dir():
            raise common.DataError(f"{run / 'compose_budget' / tag}: no compositions (run compose_budget.py first)")
    vocab = load_model(run / "base.pt", "cpu")[0].vocab
    rows = []
    for tex, mar in pb.pairs_of(vocab, pb.settings(False)):
        attributes = {"texture": tex, "margin": mar}
        names = [f"texture={tex}", f"margin={mar}"]
        for split, seed in (("train", 0), ("held_out", 1)):
            if split not in args.splits.split(","):
                continue
            batch = joint_crops(run, vocab, seed, names)
            row = {"pair": f"{tex}+{mar}", "split": split, "nodules": len(batch["x0"]),
                   "linear": band_losses(run, "linear", run / "lora", attributes, batch, args.passes,
                                         args.mask_weight)}
            for tag in tags:
                row[tag] = band_losses(run, "ortho", run / "compose_budget" / tag / "lora", attributes, batch,
                                       args.passes, args.mask_weight)
            rows.append(row)
            print(row, flush=True)
    if args.out:
        common.write_json(Path(args.out), {"passes": args.passes, "mask_weight": args.mask_weight, "rows": rows})
    print(table(rows, tags))


def table(rows: list[dict], tags: list[str]) -> str:
    """Markdown: per pair (all t) and per t band (all pairs), linear's loss and each tag's relative to it (%)."""
    def line(label: str, split: str, part: list[dict], band: str) -> str:
        ref = sum(r["linear"][band] for r in part)
        rel = " | ".join(f"{100 * (sum(r[t][band] for r in part) / ref - 1):+.1f} %" for t in tags)
        return f"| {label} | {split} | {sum(r['nodules'] for r in part)} | {ref / len(part):.4f} | {rel} |"

    lines = ["| pair / t band | split | nodules | linear loss | " + " | ".join(f"{t} vs linear" for t in tags)
             + " |", "|---|---|---|---|" + "---|" * len(tags)]
    lines += [line(r["pair"], r["split"], [r], "all") for r in rows]
    for split in ("train", "held_out"):
        part = [r for r in rows if r["split"] == split]
        if not part:
            continue
        lines += [line(f"all pairs, t {band}", split, part, band) for band in (*(f"{a}-{b}" for a, b in BANDS), "all")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
