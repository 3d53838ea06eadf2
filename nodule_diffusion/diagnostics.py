"""Controllability, realism and the paper's two failure causes, as JSON + PNG + Markdown.

    attribute_report  an attribute judge trained on real labelled crops scores the generated nodules
                      (per-attribute accuracy = controllability), per-attribute Fréchet distance on the judge's
                      penultimate features (FD_judge: not FID, no downloaded weights), and mask Dice of the
                      generated nodule (|synthetic − source| thresholded) against the requested mask
    diagnose          before/after composition: per-layer cos(ΔW_a, ΔW_b) and principal angles, and the
                      cross-attention maps of the attribute tokens with their overlap inside the nodule mask
The paper names the two causes ("overlapping attention regions", "non-orthogonal parameter spaces"); the
measurements are ours (notes/method.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from nodule_diffusion import common, compose, control, lora, metrics, stages
from nodule_diffusion.data import DataError, NoduleCrops, crop_at, read_image
from nodule_diffusion.judge import AttributeJudge, JudgeConfig, attribute_accuracy, train_judge
from nodule_diffusion.synthesis import contact_sheet


@dataclass
class JudgeSettings:
    judge_steps: int = 600  # optimiser steps of the attribute judge
    crop_size: int = 32  # judge and crop size (pixels at --spacing_mm)


def _only_synthetic(records):
    return [replace(r, nodules=[n for n in r.nodules if n.extra.get("synthetic") == "1"]) for r in records]


def _dice_of(nodule, image_path: Path, size: int = 32) -> float:
    """Dice of the requested mask vs the segmentation |synthetic − source| > 30 % of its max, in a crop."""
    source = nodule.extra.get("source")
    if not source or nodule.mask is None:
        return float("nan")
    cx, cy = (nodule.box[0] + nodule.box[2]) / 2, (nodule.box[1] + nodule.box[3]) / 2
    diff = np.abs(crop_at(read_image(image_path), cx, cy, size)[0] - crop_at(read_image(source), cx, cy, size)[0])
    seg = diff > max(0.3 * diff.max(), 1e-3)
    return metrics.dice(seg, crop_at((read_image(nodule.mask) > 0).astype(np.float32), cx, cy, size)[0] > 0.5)


def train_attribute_judge(real, vocab, spacing_mm, settings: JudgeSettings, device):
    """The judge: a small CNN trained on real labelled nodule crops; returns (judge, real crops batch, train acc)."""
    real_crops = NoduleCrops(real, vocab, settings.crop_size, spacing_mm, augment=False)
    r = real_crops.get(torch.arange(len(real_crops)))
    judge = AttributeJudge(vocab, JudgeConfig(crop_size=settings.crop_size, steps=settings.judge_steps))
    train_acc = train_judge(judge, r["x0"], r["mask"], r["attrs"], device=device)
    r["features"] = judge.cpu().features(r["x0"], r["mask"]).numpy()
    return judge, r, train_acc


def score_synthetic(judge, real: dict, synthetic, vocab, spacing_mm, crop_size: int) -> tuple[dict, dict, list]:
    """Controllability (judge accuracy vs the requested attributes), FD_judge per value, mask Dice per nodule."""
    syn = _only_synthetic(synthetic)
    syn_crops = NoduleCrops(syn, vocab, crop_size, spacing_mm, augment=False)
    s = syn_crops.get(torch.arange(len(syn_crops)))
    pred = judge.predict(s["x0"], s["mask"])
    accuracy = attribute_accuracy(pred, s["attrs"], judge.vocab)
    known = s["attrs"] >= 0
    accuracy["all_requested"] = float(((pred == s["attrs"]) | ~known).all(1).float().mean())
    syn_feats = judge.features(s["x0"], s["mask"]).numpy()
    fd = {}
    for k, (name, values) in enumerate(vocab.items()):
        for v, value in enumerate(values):
            a, b = real["features"][(real["attrs"][:, k] == v).numpy()], syn_feats[(s["attrs"][:, k] == v).numpy()]
            if len(a) >= 2 and len(b) >= 2:
                fd[f"{name}={value}"] = metrics.frechet_distance(a, b)
    dice = [_dice_of(n, rec.image, crop_size) for rec in syn for n in rec.nodules]
    return {"accuracy": accuracy, "frechet_distance_judge": fd,
            "mask_dice_mean": float(np.nanmean(dice)) if dice else float("nan")}, s, dice


def attribute_report(real, synthetic, vocab, spacing_mm, settings: JudgeSettings, device, out: Path) -> dict:
    """Judge accuracy, FD_judge per attribute value, mask Dice; writes attributes.json/.md and best_worst.png."""
    judge, r, train_acc = train_attribute_judge(real, vocab, spacing_mm, settings, device)
    scores, s, dice = score_synthetic(judge, r, synthetic, vocab, spacing_mm, settings.crop_size)
    result = {"n_synthetic": len(s["x0"]), "n_real": len(r["x0"]), "judge_train_accuracy": train_acc, **scores}
    common.write_json(out / "attributes.json", result)
    order = np.argsort(np.nan_to_num(np.array(dice), nan=-1.0))
    picks = [*order[::-1][:8], *order[:8]]
    contact_sheet([(s["x0"][i, 0].numpy() + 1) / 2 for i in picks], [f"d{dice[i]:.2f}" for i in picks],
                  out / "best_worst.png")
    lines = ["# Attribute controllability and realism", "", "| attribute | judge accuracy on synthetic | "
             "judge accuracy on real (train) |", "|---|---|---|"]
    lines += [f"| {a} | {scores['accuracy'][a]:.3f} | {train_acc[a]:.3f} |" for a in vocab]
    lines += ["", "| value | FD_judge (synthetic vs real) |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in scores["frechet_distance_judge"].items()]
    lines += ["", f"Mask Dice (requested vs generated): {result['mask_dice_mean']:.3f}",
              "", "Best (left 8) and worst (right 8) by Dice: ![](best_worst.png)", ""]
    (out / "attributes.md").write_text("\n".join(lines))
    return result


# ----------------------------------------------------------------------------------------------- diagnose
def _attention_maps(model, names, attributes, crops, device):
    """Token maps (per composed attribute) averaged over heads/layers, and their soft-IoU overlap inside R."""
    batch = crops.get(torch.arange(min(16, len(crops))))
    mask, context = batch["mask"].to(device), batch["context"].to(device)
    attrs = control.attr_tensor(attributes, model.vocab, len(mask), device)
    scheduler = model.diffusion.scheduler()
    t = torch.full((len(mask),), scheduler.num_train_timesteps // 2, dtype=torch.long, device=device)
    noise = torch.randn(batch["x0"].shape, generator=torch.Generator().manual_seed(0)).to(device)
    model.unet.set_attention_capture(True)
    with torch.no_grad():
        model(scheduler.add_noise(batch["x0"].to(device), noise, t), t, mask, context, attrs)
    maps = [probs for probs, _ in model.unet.cross_attention_maps()]
    model.unet.set_attention_capture(False)
    positions = [model.tokens.token_position(n.split("=")[0]) for n in names]
    per_token = [compose.mean_token_map(compose.token_maps(maps, p), 16) for p in positions]  # (B, 256) each
    region = compose.attention_region(mask, 16)
    overlap = float(compose.attention_overlap(per_token[0], per_token[1], region))
    return overlap, [m[0].reshape(16, 16).cpu().numpy() for m in per_token], batch


def diagnose(ckpt: str, attributes_text: str, out: Path, device, seed: int) -> dict:
    """Both failure causes before (the single adapters, summed) and after `ortho` composition training."""
    model, payload = stages.load_model(ckpt, device)
    model.eval()
    attributes = control.parse_attributes(attributes_text, model.vocab)
    names = [f"{a}={v}" for a, v in attributes.items()]
    if len(names) != 2:
        raise DataError("diagnose compares exactly two attribute adapters (--attributes a=x,b=y)")
    root = Path(ckpt).parent
    parts = control.composed_path(root, "ortho", names).with_suffix(".parts")
    for n in names:
        stages.load_lora(root / "lora" / f"{n}.pt", model, payload["fingerprint"], n)
        if not (parts / f"{n}.pt").is_file():
            raise DataError(f"{parts / (n + '.pt')}: missing; run train.py --stage compose --strategy ortho first")
        stages.load_lora(parts / f"{n}.pt", model, payload["fingerprint"], n + "@ortho")
    records = stages.load_records("phantom", root / "data", 60, seed + 3, model.vocab)
    crops = NoduleCrops(records, model.vocab, model.unet_config.crop_size, 1.4, augment=False)
    result, pictures = {}, []
    for stage, active in (("before", names), ("after", [n + "@ortho" for n in names])):
        fa, fb = (lora.adapter_factors(model.unet, n) for n in active)
        cos = compose.delta_cosines(fa, fb)
        angles = {k: v.tolist() for k, v in compose.principal_angles(fa, fb).items()}
        lora.set_active(model.unet, active)
        overlap, maps, batch = _attention_maps(model, names, attributes, crops, device)
        result[stage] = {"delta_cosine": cos, "mean_abs_cosine": float(np.mean(np.abs(list(cos.values())))),
                         "principal_angles_deg": angles, "attention_overlap": overlap}
        pictures += [(m - m.min()) / (np.ptp(m) + 1e-8) for m in maps]
    common.write_json(out / "diagnose.json", result)
    crop = (batch["x0"][0, 0].numpy() + 1) / 2
    from PIL import Image
    up = [np.asarray(Image.fromarray(p.astype(np.float32), mode="F").resize(crop.shape[::-1])) for p in pictures]
    contact_sheet([crop, batch["mask"][0, 0].numpy(), *up], ["crop", "mask"] + [f"{s} {n.split('=')[1][:6]}"
                  for s in ("before", "after") for n in names], out / "diagnose.png", columns=6)
    lines = ["# Composition diagnostics", "", "| | mean abs cos(ΔW_a, ΔW_b) | attention overlap in mask |",
             "|---|---|---|"]
    lines += [f"| {s} | {result[s]['mean_abs_cosine']:.4f} | {result[s]['attention_overlap']:.4f} |"
              for s in ("before", "after")]
    lines += ["", "Token attention maps (crop, mask, then before/after per token): ![](diagnose.png)", ""]
    (out / "diagnose.md").write_text("\n".join(lines))
    return result
