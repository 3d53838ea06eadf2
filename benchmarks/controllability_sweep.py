"""Issue 10 levers, measured: base-model parametrisation × sampler, then LoRA reach per CPU-minute.

Phase "base": one base model per (prediction type, Min-SNR-γ) at the demo budget, then on held-out phantom crops
the mean |Laplacian| inside the regenerated region (speckle; real crops give the reference) and the mean intensity
inside the mask, for DDIM-25 (η = 0) and DDIM-50 (η = 1). A grid PNG per model and sampler.
Phase "lora": on the v-prediction base, single-attribute LoRAs per (targets, γ of the LoRA loss, lr, steps); the
image-only judge's accuracy on nodules generated from held-out masks that lack the value (evaluation.controllability
rules), with seconds of training.
Phase "curve": accuracy against CPU-minutes. One base trained on and on (exact resume) to each of --curve_base
steps; at each, the LoRA set-up --curve_config for --curve_lora steps.
Everything goes to <out_dir>/results.json (phases add to it); grids as PNG.

Examples:
    python benchmarks/controllability_sweep.py --out_dir runs/sweep                    # base + lora, ~30 min
    python benchmarks/controllability_sweep.py --out_dir runs/sweep --phase lora --lora_steps 100 200 --configs locon
    python benchmarks/controllability_sweep.py --out_dir runs/sweep --phase curve --curve_base 400 800 1600
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodule_diffusion import datasets, diffusion, lora, training  # noqa: E402
from nodule_diffusion.metrics import mean_abs_laplacian  # noqa: E402
from nodule_diffusion.data import DEFAULT_VOCAB, NoduleCrops  # noqa: E402
from nodule_diffusion.diffusion import DiffusionConfig, DiffusionModel, loop_state_dict  # noqa: E402
from nodule_diffusion.evaluation import JudgeSettings, lacking_nodules, train_attribute_judge  # noqa: E402
from nodule_diffusion.judge import attribute_accuracy  # noqa: E402
from nodule_diffusion.synthesis import SAMPLE_ETA, SAMPLE_STEPS, generate_for, triplet_grid  # noqa: E402
from nodule_diffusion.training import LoopConfig  # noqa: E402
from nodule_diffusion.unet import UNetConfig  # noqa: E402

BASES = {"eps": ("epsilon", 0.0), "v_minsnr5": ("v_prediction", 5.0), "x0_minsnr5": ("sample", 5.0)}
ATTENTION = ("to_q", "to_k", "to_v", "to_out")
LINEAR = ATTENTION + ("proj_in", "proj_out", "fc1", "fc2")  # every linear layer of the transformer blocks
LORAS = {  # name: (targets, γ of the LoRA loss, lr)
    "attn_g5_lr2e-3": (ATTENTION, 5.0, 2e-3),
    "wide_g5_lr2e-3": (LINEAR, 5.0, 2e-3),
    "wide_g0_lr5e-3": (LINEAR, 0.0, 5e-3),
    # + the ResBlocks' timestep projections: a per-channel shift at every resolution, 32×32 included
    "wide_tproj_g0_lr5e-3": (LINEAR + ("t_proj",), 0.0, 5e-3),
    # + the ResBlocks' 3×3 convolutions (LoCon), which draw at every resolution: the default since issue 10
    "locon_g0_lr5e-3": (LINEAR + ("conv1", "conv2"), 0.0, 5e-3),
    "locon_g0_lr2e-3": (LINEAR + ("conv1", "conv2"), 0.0, 2e-3),  # the default of train.py since issue 10
    "locon_g5_lr2e-3": (LINEAR + ("conv1", "conv2"), 5.0, 2e-3),
    "full_finetune_lr3e-4": ("*", 0.0, 3e-4),  # every UNet weight trains: the reach a LoRA can at most have
}
CPU = torch.device("cpu")


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
                "laplacian_generated": mean_abs_laplacian(gen, r), "laplacian_real": mean_abs_laplacian(batch["x0"], r),
                "mean_in_mask_generated": float((gen * m).sum() / m.sum()),
                "mean_in_mask_real": float((batch["x0"] * m).sum() / m.sum())}
            grid = out / f"base_{name}_{sampler}{steps}_eta{eta:g}.png"
            triplet_grid(batch, gen, grid, ["generated"] * len(idx))
        results[name] = entry
        print(name, json.dumps(entry), flush=True)
    return results


def lora_accuracy(base_state, crops, test, judge, name, config, steps, out: Path, tag: str) -> dict:
    """Train one single-attribute adapter (or, for "*", fine-tune everything) on the base; judge accuracy on nodules
    generated from the first 32 held-out masks lacking the value (the evaluation.controllability rule)."""
    targets, gamma, lr = LORAS[config]
    attribute, value = name.split("=")
    k, v = list(DEFAULT_VOCAB).index(attribute), DEFAULT_VOCAB[attribute].index(value)
    model = DiffusionModel(UNetConfig(), DEFAULT_VOCAB, DiffusionConfig())
    model.load_state_dict(base_state)
    loop = LoopConfig(steps=steps, batch_size=16, lr=lr, sample_every=0, checkpoint_every=10 ** 9)
    start = time.time()
    if targets == "*":
        full_finetune(model, crops, attribute, value, loop)
    else:
        training.train_lora(model, crops, attribute, value, 8, 8.0, loop, CPU, torch.Generator().manual_seed(1),
                            targets=targets, min_snr_gamma=gamma)
        lora.set_active(model.unet, [name])
    seconds = round(time.time() - start, 1)
    model.eval()
    attrs_all = test.get(torch.arange(len(test)))["attrs"]
    lacking = lacking_nodules(attrs_all, k, v, 32)
    attrs = diffusion.attr_tensor({attribute: value}, DEFAULT_VOCAB, len(lacking), "cpu")
    entry = {"train_s": seconds, "sampler": f"ddim{SAMPLE_STEPS}_eta{SAMPLE_ETA:g}"}
    for suffix, steps_, eta in (("", SAMPLE_STEPS, SAMPLE_ETA), ("_ddim25_eta0", 25, 0.0)):  # default, old default
        batch, x0 = generate_for(model, test, lacking, attrs, steps_, 0, "ddim", eta)
        generated = batch["context"] + batch["region"] * x0
        entry[f"accuracy{suffix}"] = float((judge.predict(generated)[:, k] == v).float().mean())
        entry[f"speckle{suffix}"] = mean_abs_laplacian(generated, batch["region"])
        if not suffix:
            triplet_grid(batch, x0, out / f"lora_{tag}_{name}.png", [value] * len(lacking))
    entry["speckle_real"] = mean_abs_laplacian(batch["x0"], batch["region"])
    print(tag, name, json.dumps(entry), flush=True)
    return entry


def full_finetune(model, crops, attribute: str, value: str, loop: LoopConfig) -> None:
    """The reference for reach: every weight and the value's token train on the nodules with the value."""
    generator, name = torch.Generator().manual_seed(1), f"{attribute}={value}"
    idx = diffusion.subset_of(crops, DEFAULT_VOCAB, attribute, value)
    scheduler = model.diffusion.scheduler()

    def loss_fn(step):
        batch = training.random_batch(crops, loop.batch_size, generator, CPU, subset=idx)
        attrs = diffusion.only(batch["attrs"], DEFAULT_VOCAB, [attribute])
        return diffusion.denoising_loss(model, scheduler, batch, model.diffusion.mask_weight, generator, attrs), {}

    params = [p for p in model.parameters()]
    training.fit(model, params, loss_fn, replace(loop, ema_decay=0.0), CPU, generator, desc=f"full {name}")


def lora_phase(args, crops, test, judge, out: Path) -> dict:
    base_state = torch.load(out / "base_v_minsnr5.pt", weights_only=True)
    return {f"{config}/{steps}/{name}": lora_accuracy(base_state, crops, test, judge, name, config, steps, out,
                                                     f"{config}_{steps}")
            for config in args.configs for steps in args.lora_steps for name in args.values}


def curve_phase(args, crops, test, judge, out: Path) -> dict:
    """Accuracy against CPU-minutes: the base continued to each budget, then the default LoRA at each."""
    torch.manual_seed(0)
    model = DiffusionModel(UNetConfig(), DEFAULT_VOCAB, DiffusionConfig())
    state, base_s, results = None, 0.0, {}
    for base_steps in args.curve_base:
        loop = LoopConfig(steps=base_steps, batch_size=16, sample_every=0, checkpoint_every=10 ** 9)
        start = time.time()
        run = training.train_base(model, crops, loop, CPU, torch.Generator().manual_seed(0), state)
        base_s += time.time() - start
        state = loop_state_dict(run)  # the next budget continues this run exactly
        sampler = DiffusionModel(UNetConfig(), DEFAULT_VOCAB, DiffusionConfig())
        sampler.load_state_dict(run["ema"].shadow)
        for lora_steps in args.curve_lora:
            for name in args.values:
                entry = lora_accuracy(sampler.state_dict(), crops, test, judge, name, args.curve_config,
                                      lora_steps, out, f"curve_base{base_steps}_lora{lora_steps}")
                results[f"base{base_steps}/lora{lora_steps}/{name}"] = {**entry, "base_s": round(base_s, 1)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Examples:")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out_dir", type=Path, required=True, help="where models, grids and results.json go")
    parser.add_argument("--phase", choices=["base", "lora", "both", "curve"], default="both", help="which sweep")
    parser.add_argument("--base_steps", type=int, default=400, help="base training steps (demo preset: 400)")
    parser.add_argument("--lora_steps", type=int, nargs="+", default=[100], help="LoRA steps to try")
    parser.add_argument("--configs", nargs="+", default=list(LORAS), choices=list(LORAS), help="LoRA set-ups")
    parser.add_argument("--curve_base", type=int, nargs="+", default=[400, 800, 1600], help="curve: base steps")
    parser.add_argument("--curve_lora", type=int, nargs="+", default=[100], help="curve: LoRA steps at each")
    parser.add_argument("--curve_config", default="locon_g0_lr2e-3", choices=list(LORAS), help="curve: LoRA set-up")
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
    if args.phase in ("lora", "both", "curve"):
        judge, _, _ = train_attribute_judge(real, DEFAULT_VOCAB, 1.4, JudgeSettings(), CPU)
        t = test.get(torch.arange(len(test)))
        results["judge_real_accuracy"] = attribute_accuracy(judge.predict(t["x0"]), t["attrs"], DEFAULT_VOCAB)
    if args.phase in ("lora", "both"):
        results["lora"] = {**results.get("lora", {}), **lora_phase(args, crops, test, judge, args.out_dir)}
    if args.phase == "curve":
        results["curve"] = {**results.get("curve", {}), **curve_phase(args, crops, test, judge, args.out_dir)}
    path.write_text(json.dumps(results, indent=1))
    (args.out_dir / "results.md").write_text(markdown(results))
    print(f"wrote {path} and results.md")


def markdown(results: dict) -> str:
    """The LoRA and curve tables of RESULTS.md, from results.json (entries without "sampler" are from before the
    sampler default changed: DDIM-25 η = 0)."""
    lines = [f"Judge accuracy on held-out real crops: {json.dumps(results.get('judge_real_accuracy'))}", "",
             "| set-up / steps | value | accuracy (sampler) | accuracy DDIM-25 η=0 | speckle gen / real | train s |",
             "|---|---|---|---|---|---|"]
    rows = [(k, e) for k, e in results.get("lora", {}).items() if isinstance(e, dict) and "accuracy" in e]
    rows += [(k, e) for k, e in results.get("curve", {}).items()]
    for key, e in rows:
        setup, _, name = key.rpartition("/")
        old = "sampler" not in e
        cells = [f"{e['accuracy']:.3f} ({'ddim25_eta0' if old else e['sampler']})",
                 f"{e['accuracy']:.3f}" if old else f"{e['accuracy_ddim25_eta0']:.3f}",
                 f"{e['speckle']:.3f} / {e['speckle_real']:.3f}" if "speckle" in e else "–",
                 f"{e['train_s']:.0f}" + (f" (+ base {e['base_s']:.0f})" if "base_s" in e else "")]
        lines.append(f"| {setup} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
