"""Issue 10 levers, measured: base-model parametrisation × sampler, then LoRA reach per CPU-minute.

Phase "base": one base model per (prediction type, Min-SNR-γ) at the demo budget, then on held-out phantom crops
the mean |Laplacian| inside the regenerated region (speckle; real crops give the reference) and the mean intensity
inside the mask, for DDIM-25 (η = 0) and DDIM-50 (η = 1). A grid PNG per model and sampler.
Phase "lora": on the v-prediction base, single-attribute LoRAs per (targets, γ of the LoRA loss, lr, steps); the
image-only judge's accuracy on nodules generated from held-out masks that lack the value (evaluation.controllability
rules), with seconds of training. JSON and a markdown table under --out_dir.

Examples:
    python benchmarks/controllability_sweep.py --out_dir runs/sweep                    # both phases, ~30 min
    python benchmarks/controllability_sweep.py --out_dir runs/sweep --phase lora --lora_steps 300 --configs X
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodule_diffusion import datasets, diffusion, lora, training  # noqa: E402
from nodule_diffusion.data import DEFAULT_VOCAB, NoduleCrops  # noqa: E402
from nodule_diffusion.diffusion import DiffusionConfig, DiffusionModel  # noqa: E402
from nodule_diffusion.evaluation import JudgeSettings, train_attribute_judge  # noqa: E402
from nodule_diffusion.judge import attribute_accuracy  # noqa: E402
from nodule_diffusion.synthesis import generate_for, triplet_grid  # noqa: E402
from nodule_diffusion.training import LoopConfig  # noqa: E402
from nodule_diffusion.unet import UNetConfig  # noqa: E402

BASES = {"eps": ("epsilon", 0.0), "v_minsnr5": ("v_prediction", 5.0), "x0_minsnr5": ("sample", 5.0)}
ATTENTION = ("to_q", "to_k", "to_v", "to_out")
LORAS = {  # name: (targets, γ of the LoRA loss, lr)
    "attn_g5_lr2e-3": (ATTENTION, 5.0, 2e-3),
    "wide_g5_lr2e-3": (diffusion.LORA_TARGETS, 5.0, 2e-3),
    "wide_g0_lr5e-3": (diffusion.LORA_TARGETS, 0.0, 5e-3),
    # + the ResBlocks' timestep projections: a per-channel shift at every resolution, 32×32 included
    "wide_tproj_g0_lr5e-3": (diffusion.LORA_TARGETS + ("t_proj",), 0.0, 5e-3),
}
CPU = torch.device("cpu")


def laplacian_in(x: torch.Tensor, region: torch.Tensor) -> float:
    """Mean |∇²x| over the region: high-frequency error (speckle) shows here."""
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])[None, None]
    return float((torch.nn.functional.conv2d(x, kernel, padding=1).abs() * region).sum() / region.sum())


def sample_crops(model, crops, idx, attrs, sampler: str, steps: int, eta: float):
    """Generated crops as insertion keeps them (model pixels in the region, real context outside)."""
    batch, x0 = generate_for(model, crops, idx, attrs, steps, 0, sampler, eta)
    return batch, batch["context"] + batch["region"] * x0


def base_phase(args, crops, test, out: Path) -> dict:
    results = {}
    idx = list(range(min(24, len(test))))
    for name, (kind, gamma) in BASES.items():
        torch.manual_seed(0)
        model = DiffusionModel(UNetConfig(), DEFAULT_VOCAB, DiffusionConfig(prediction_type=kind, min_snr_gamma=gamma))
        loop = LoopConfig(steps=args.base_steps, batch_size=16, sample_every=0, checkpoint_every=10 ** 9)
        start = time.time()
        state = training.train_base(model, crops, loop, CPU, torch.Generator().manual_seed(0))
        model.load_state_dict(state["ema"].shadow)
        model.eval()
        torch.save(model.state_dict(), out / f"base_{name}.pt")
        entry = {"train_s": round(time.time() - start, 1)}
        attrs = torch.full((len(idx), len(DEFAULT_VOCAB)), -1)
        for sampler, steps, eta in (("ddim", 25, 0.0), ("ddim", 50, 1.0)):
            batch, gen = sample_crops(model, test, idx, attrs, sampler, steps, eta)
            m, r = batch["mask"], batch["region"]
            entry[f"{sampler}{steps}_eta{eta:g}"] = {
                "laplacian_generated": laplacian_in(gen, r), "laplacian_real": laplacian_in(batch["x0"], r),
                "mean_in_mask_generated": float((gen * m).sum() / m.sum()),
                "mean_in_mask_real": float((batch["x0"] * m).sum() / m.sum())}
            grid = out / f"base_{name}_{sampler}{steps}_eta{eta:g}.png"
            triplet_grid(batch, gen, grid, ["generated"] * len(idx))
        results[name] = entry
        print(name, json.dumps(entry), flush=True)
    return results


def lora_phase(args, crops, test, real, out: Path) -> dict:
    judge, _, _ = train_attribute_judge(real, DEFAULT_VOCAB, 1.4, JudgeSettings(), CPU)
    t = test.get(torch.arange(len(test)))
    results = {"judge_real_accuracy": attribute_accuracy(judge.predict(t["x0"]), t["attrs"], DEFAULT_VOCAB)}
    base_state = torch.load(out / "base_v_minsnr5.pt", weights_only=True)
    for config, (targets, gamma, lr) in ((c, LORAS[c]) for c in args.configs):
        for steps in args.lora_steps:
            for name in args.values:
                attribute, value = name.split("=")
                k, v = list(DEFAULT_VOCAB).index(attribute), DEFAULT_VOCAB[attribute].index(value)
                model = DiffusionModel(UNetConfig(), DEFAULT_VOCAB, DiffusionConfig(prediction_type="v_prediction",
                                                                                    min_snr_gamma=5.0))
                model.load_state_dict(base_state)
                loop = LoopConfig(steps=steps, batch_size=16, lr=lr, sample_every=0, checkpoint_every=10 ** 9)
                start = time.time()
                training.train_lora(model, crops, attribute, value, 8, 8.0, loop, CPU, torch.Generator().manual_seed(1),
                                    targets=targets, min_snr_gamma=gamma)
                seconds = round(time.time() - start, 1)
                lora.set_active(model.unet, [name])
                model.eval()
                lacking = torch.nonzero(t["attrs"][:, k] != v).flatten()[:32].tolist()
                attrs = diffusion.attr_tensor({attribute: value}, DEFAULT_VOCAB, len(lacking), "cpu")
                batch, x0 = generate_for(model, test, lacking, attrs)
                generated = batch["context"] + batch["region"] * x0
                accuracy = float((judge.predict(generated)[:, k] == v).float().mean())
                results[f"{config}/{steps}/{name}"] = {"accuracy": accuracy, "train_s": seconds}
                triplet_grid(batch, x0, out / f"lora_{config}_{steps}_{name}.png", [value] * len(lacking))
                print(config, steps, name, accuracy, seconds, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Examples:")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out_dir", type=Path, required=True, help="where models, grids and results.json go")
    parser.add_argument("--phase", choices=["base", "lora", "both"], default="both", help="which sweep to run")
    parser.add_argument("--base_steps", type=int, default=400, help="base training steps (demo preset: 400)")
    parser.add_argument("--lora_steps", type=int, nargs="+", default=[100], help="LoRA steps to try")
    parser.add_argument("--configs", nargs="+", default=list(LORAS), choices=list(LORAS), help="LoRA set-ups")
    parser.add_argument("--values", nargs="+", default=["texture=ground_glass", "calcification=calcified",
                                                         "margin=spiculated"], help="attribute values")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    real = datasets.load_records("phantom", args.out_dir / "data", 300, 0, DEFAULT_VOCAB)
    held_out = datasets.load_records("phantom", args.out_dir / "data", 120, 2, DEFAULT_VOCAB)
    crops = NoduleCrops(real, DEFAULT_VOCAB, 32, 1.4)
    test = NoduleCrops(held_out, DEFAULT_VOCAB, 32, 1.4, augment=False)
    path = args.out_dir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if args.phase in ("base", "both"):
        results["base"] = base_phase(args, crops, test, args.out_dir)
    if args.phase in ("lora", "both"):
        results["lora"] = {**results.get("lora", {}), **lora_phase(args, crops, test, real, args.out_dir)}
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
