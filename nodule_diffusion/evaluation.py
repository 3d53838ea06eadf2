"""The paper's evidence, the three commands of eval_detect.py: detect, attributes, diagnose.

detect: does adding synthetic nodules help a detector?
    detection_set       records -> (images (N, 1, S, S) in [0, 1], targets) at the working resolution
    detect_experiment   real-only vs real+synthetic detectors, same budget, several seeds, held-out test set,
                        metrics with paired bootstrap 95% CIs of the difference (design §4 "Evaluation")
    evaluate_detection  both arms end to end, with report_detect.md/json, froc.png and detection pictures
    froc_plot           FROC curves as a PNG (no matplotlib: drawn with PIL)
attributes: do the nodules carry the requested attributes, and do they look real?
    attribute_report    an attribute judge trained on real labelled crops scores the generated nodules
                        (per-attribute accuracy = controllability), per-attribute Fréchet distance on the judge's
                        penultimate features (FD_judge: not FID, no downloaded weights), and mask Dice of the
                        generated body (segmented from the added density, metrics.added_density_body) against
                        the requested mask, beside what that segmentation reaches (segmentation_ceiling)
diagnose: the paper's two failure causes, before/after composition
    diagnose            per-layer cos(ΔW_a, ΔW_b) and principal angles, and the cross-attention maps of the
                        attribute tokens with their overlap inside the nodule mask (compose.py's L_attn)
The paper names the two causes ("overlapping attention regions", "non-orthogonal parameter spaces"); the
measurements are ours (notes/method.md §3).
Protocol: image score = max box score; FROC hit = IoU > 0.2; AP@0.5 COCO 101-point; NODE21 = 0.75·AUC +
0.25·sens@0.25 FP/image (metrics.py). Seed-averaged metrics; CIs resample test images, keeping the pairing.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from nodule_diffusion import compose, datasets, lora, metrics, phantom
from nodule_diffusion.common import atomic_path, seed_everything, write_json
from nodule_diffusion.data import (DataError, NoduleCrops, crop_at, load_record, nodule_region, read_image,
                                   surround_ring)
from nodule_diffusion.detector import DetectorConfig, FasterRCNN, predict_all, train_detector
from nodule_diffusion.diffusion import (adapter_names, attr_tensor, composed_path, load_lora, load_model,
                                        parse_attributes)
from nodule_diffusion.judge import AttributeJudge, JudgeConfig, attribute_accuracy, train_judge
from nodule_diffusion.synthesis import ADAPTER_GUIDANCE, contact_sheet, generate_for

METRICS = ("auc", "cpm", "ap50", "node21", "sens@0.25")


@dataclass
class DetectConfig:
    image_size: int = 256  # detector input side (images are resampled to --spacing_mm, then resized to this)
    det_steps: int = 600  # optimiser steps per detector (same budget for every arm)
    det_batch_size: int = 4  # detector images per optimiser step
    det_lr: float = 1e-3  # detector learning rate
    seeds: int = 3  # detectors per arm
    n_boot: int = 500  # bootstrap resamples for the CIs
    low_data: int = 0  # keep only this many real training images with nodules (0 = all); negatives kept


def detection_set(records, spacing_mm: float | None, size: int) -> tuple[torch.Tensor, list[dict]]:
    """Images resampled to spacing_mm, then resized to size × size (boxes follow); (N, 1, size, size), targets."""
    images, targets = [], []
    for rec in records:
        image, boxes, _ = load_record(rec, spacing_mm)
        h, w = image.shape
        if (h, w) != (size, size):
            image = np.asarray(Image.fromarray(image, mode="F").resize((size, size), Image.BILINEAR))
            boxes = boxes * np.array([size / w, size / h, size / w, size / h], dtype=np.float32)
        images.append(np.clip(image, 0, 1))
        targets.append({"boxes": torch.from_numpy(boxes.astype(np.float32)).reshape(-1, 4)})
    if not images:
        raise DataError("empty image set for detection")
    return torch.from_numpy(np.stack(images)).unsqueeze(1), targets  # (N, 1, size, size)


def low_data_subset(records, n_positive: int, seed: int):
    """Keep `n_positive` random images with nodules (and every negative): the low-data regime."""
    if n_positive <= 0:
        return list(records)
    rng = np.random.default_rng(seed)
    positives = [r for r in records if r.nodules]
    keep = {id(positives[i]) for i in rng.permutation(len(positives))[:n_positive]}
    return [r for r in records if not r.nodules or id(r) in keep]


def train_and_predict(train_images, train_targets, test_images, cfg: DetectConfig, seed: int, device,
                      det_config: DetectorConfig | None = None) -> list[dict]:
    seed_everything(seed)
    model = FasterRCNN(det_config or DetectorConfig(score_thresh=0.001))  # low threshold: full FROC curves
    train_detector(model, train_images, train_targets, steps=cfg.det_steps, batch_size=cfg.det_batch_size,
                   lr=cfg.det_lr, seed=seed, device=device)
    model.eval()
    with torch.no_grad():
        return predict_all(model, test_images, device=device)


def detect_experiment(arms: dict[str, tuple[torch.Tensor, list[dict]]], test: tuple[torch.Tensor, list[dict]],
                      cfg: DetectConfig, device, reference: str = "real_only",
                      det_config: DetectorConfig | None = None) -> dict:
    """Train every arm with the same budget and seeds; evaluate on `test`; CIs of each arm minus `reference`.

    arms: name -> (train images, targets). Returns a JSON-ready dict with per-seed and seed-averaged metrics,
    bootstrap CIs per arm, paired-bootstrap CIs of the differences, and the raw predictions for plots.
    """
    test_images, test_targets = test
    gt = [t["boxes"].numpy() for t in test_targets]
    preds = {name: [train_and_predict(images, targets, test_images, cfg, 1000 + s, device, det_config)
                    for s in range(cfg.seeds)] for name, (images, targets) in arms.items()}

    cache: dict = {}  # every metric and arm sees the same resamples (same seed): compute each report once

    def reports(name, idx):
        key = (name, idx.tobytes())
        if key not in cache:
            cache[key] = [metrics.detection_report([gt[i] for i in idx], [run[i]["boxes"].numpy() for i in idx],
                                                   [run[i]["scores"].numpy() for i in idx]) for run in preds[name]]
        return cache[key]

    def metric_fn(name, key):
        return lambda idx: float(np.mean([rep[key] for rep in reports(name, np.asarray(idx))]))

    report = {"config": cfg.__dict__, "n_test_images": len(gt), "arms": {}}
    for name in arms:
        per_seed = [metrics.detection_report(gt, [p["boxes"].numpy() for p in run], [p["scores"].numpy() for p in run])
                    for run in preds[name]]
        entry = {"n_train_images": len(arms[name][1]), "per_seed": per_seed,
                 "mean": {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]},
                 "std": {k: float(np.std([r[k] for r in per_seed])) for k in per_seed[0]}}
        entry["ci"] = {k: metrics.bootstrap_ci(metric_fn(name, k), len(gt), cfg.n_boot) for k in METRICS}
        if name != reference and reference in arms:
            entry["diff_vs_" + reference] = {k: metrics.paired_bootstrap_diff(
                metric_fn(name, k), metric_fn(reference, k), len(gt), cfg.n_boot) for k in METRICS}
        report["arms"][name] = entry
    return report, preds


def evaluate_detection(real, synthetic, test, detect, spacing_mm, device, out: Path) -> dict:
    """Detectors on real vs real+synthetic; writes report.json, report_detect.md and froc.png under `out`."""
    size = detect.image_size
    real_set = detection_set(real, spacing_mm, size)
    syn_set = detection_set(synthetic, spacing_mm, size)
    both = (torch.cat([real_set[0], syn_set[0]]), real_set[1] + syn_set[1])
    test_set = detection_set(test, spacing_mm, size)
    report, preds = detect_experiment({"real_only": real_set, "real+synthetic": both}, test_set,
                                                 detect, device)
    gt = [t["boxes"].numpy() for t in test_set[1]]
    froc_plot(out / "froc.png", gt, preds)
    for name, runs in preds.items():  # first seed of each arm
        detections_png(out / f"detections_{name.replace('+', '_')}.png", test_set[0], gt, runs[0])
    (out / "report_detect.md").write_text(report_markdown(report, "Detection: real only vs real + synthetic"))
    write_json(out / "report_detect.json", report)
    return report


def froc_plot(path, gt: list[np.ndarray], preds: dict[str, list[list[dict]]], size=(480, 360)) -> None:
    """FROC curves (sensitivity vs FP/image, log x from 1/8 to 8), one colour per arm, seed-pooled predictions."""
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 50, w - 10, 10, h - 40
    x_of = lambda fp: left + (np.log2(np.clip(fp, 0.125, 8)) + 3) / 6 * (right - left)  # noqa: E731
    y_of = lambda s: bottom - s * (bottom - top)  # noqa: E731
    draw.rectangle([left, top, right, bottom], outline="black")
    for fp in (0.125, 0.25, 0.5, 1, 2, 4, 8):
        draw.text((x_of(fp) - 10, bottom + 4), f"{fp:g}", fill="black")
    for s in (0, 0.25, 0.5, 0.75, 1.0):
        draw.text((5, y_of(s) - 6), f"{s:.2f}", fill="black")
    draw.text((left + 80, h - 18), "false positives per image (FROC, IoU > 0.2)", fill="black")
    for k, (name, runs) in enumerate(preds.items()):
        det_b = [p["boxes"].numpy() for run in runs for p in run]
        det_s = [p["scores"].numpy() for run in runs for p in run]
        curve = metrics.froc(gt * len(runs), det_b, det_s)
        fps, sens = curve["curve_fp_per_image"], curve["curve_sensitivity"]
        points = [(x_of(f), y_of(s)) for f, s in zip(fps, sens) if 0.125 <= f <= 8]
        colour = colours[k % len(colours)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((left + 8, top + 6 + 14 * k), name, fill=colour)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def detections_png(path, images: torch.Tensor, gt: list[np.ndarray], preds: list[dict], n: int = 6,
                   top: int = 3) -> None:
    """Example test images with ground truth (green) and the top-scoring detections (red, with scores)."""
    tiles = []
    for i in range(min(n, len(images))):
        tile = Image.fromarray((images[i, 0].numpy() * 255).astype(np.uint8)).convert("RGB")
        draw = ImageDraw.Draw(tile)
        for box in gt[i]:
            draw.rectangle([float(v) for v in box], outline=(0, 220, 0))
        for box, score in list(zip(preds[i]["boxes"].tolist(), preds[i]["scores"].tolist()))[:top]:
            draw.rectangle(box, outline=(230, 30, 30))
            draw.text((box[0], max(box[1] - 10, 0)), f"{score:.2f}", fill=(230, 30, 30))
        tiles.append(tile)
    w, h = tiles[0].size
    sheet = Image.new("RGB", (w * len(tiles), h))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, (k * w, 0))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def report_markdown(report: dict, title: str) -> str:
    """A table per metric: mean ± std over seeds, bootstrap 95% CI, and the paired difference vs real-only."""
    lines = [f"# {title}", "", f"Test images: {report['n_test_images']}; detectors per arm: "
             f"{report['config']['seeds']}; budget: {report['config']['det_steps']} steps.", "",
             "| arm | train images | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for name, entry in report["arms"].items():
        cells = [f"{entry['mean'][k]:.3f} ± {entry['std'][k]:.3f} [{entry['ci'][k]['low']:.3f}, "
                 f"{entry['ci'][k]['high']:.3f}]" for k in METRICS]
        lines.append(f"| {name} | {entry['n_train_images']} | " + " | ".join(cells) + " |")
    lines += ["", "Paired bootstrap 95% CI of the difference to real-only (test images resampled):", "",
              "| arm | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, entry in report["arms"].items():
        diffs = entry.get("diff_vs_real_only")
        if diffs:  # by metric name: a report read back from sorted-key JSON has another key order
            lines.append(f"| {name} | " + " | ".join(
                f"{diffs[k]['estimate']:+.3f} [{diffs[k]['low']:+.3f}, {diffs[k]['high']:+.3f}]" for k in METRICS)
                + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- attributes
@dataclass
class JudgeSettings:
    judge_steps: int = 1200  # optimiser steps of the attribute judge (held-out real: texture 0.85, margin 0.76)
    judge_width: int = 16  # channels of the judge's first conv stage (8, 16, 32 or 64; features = 4·width)
    crop_size: int = 32  # judge and crop size (pixels at --spacing_mm)


def _only_synthetic(records):
    return [replace(r, nodules=[n for n in r.nodules if n.extra.get("synthetic") == "1"]) for r in records]


def _dice_of(nodule, record, spacing_mm: float, size: int = 32) -> float:
    """Dice of the requested body mask vs the body segmented from the density the insertion added
    (metrics.added_density_body of synthetic − source inside the regenerated region), in the model's crop window
    (size px at spacing_mm, in the image's own pixels). NaN for a nodule without source image or mask."""
    source = nodule.extra.get("source")
    if not source or nodule.mask is None:
        return float("nan")
    native = spacing_mm / (record.spacing_mm or spacing_mm)       # image pixels per model pixel
    window = max(size, int(round(size * native)))
    cx, cy = (nodule.box[0] + nodule.box[2]) / 2, (nodule.box[1] + nodule.box[3]) / 2
    added = crop_at(read_image(record.image), cx, cy, window)[0] - crop_at(read_image(source), cx, cy, window)[0]
    mask = crop_at((read_image(nodule.mask) > 0).astype(np.float32), cx, cy, window)[0] > 0.5
    region = _region_of(mask)
    return metrics.dice(metrics.added_density_body(np.maximum(added, 0), region, 1.3 * native), mask)


def _region_of(mask: np.ndarray) -> np.ndarray:
    """Bool (H, W) regenerated region (data.nodule_region) of a bool (H, W) body mask."""
    return nodule_region(torch.from_numpy(mask)[None, None])[0, 0].numpy() > 0


def segmentation_ceiling(vocab: dict, n: int = 24, seed: int = 0, size: int = 32,
                         segment=metrics.added_density_body) -> dict:
    """What the mask Dice can reach: per attribute value, the mean Dice of segment(added, region) (by default
    metrics.added_density_body) against the body mask for phantom nodules (every value combination, n each, the
    phantom's sizes) drawn on a flat field with the phantom's pixel noise, segmented from (with nodule − without).
    Only for phantom vocabularies."""
    config, rng = phantom.PhantomConfig(vocab=vocab), np.random.default_rng(seed)
    per_value: dict[str, list[float]] = {}
    for combo in itertools.product(*vocab.values()):
        attributes = dict(zip(vocab, combo))
        for _ in range(n):
            flat = np.full((size, size), 0.5, np.float32)
            with_nodule = flat.copy()
            diameter = rng.uniform(*config.diameter_mm) / config.spacing_mm
            mask = phantom.draw_nodule(with_nodule, (size / 2 + rng.random(), size / 2 + rng.random()), diameter,
                                       attributes, rng, config)
            noise = config.noise * rng.standard_normal((2, size, size))        # independent noise in each image
            added = np.maximum(with_nodule + noise[0] - flat - noise[1], 0)
            region = _region_of(mask)
            d = metrics.dice(segment(added, region), mask)
            for name, value in attributes.items():
                per_value.setdefault(f"{name}={value}", []).append(d)
    return {k: float(np.mean(v)) for k, v in per_value.items()}


def judged_crops(judge, records, vocab, spacing_mm, crop_size: int) -> dict:
    """The nodule crops of `records` as one batch (data.NoduleCrops.get), with the judge's features (N, D)."""
    crops = NoduleCrops(records, vocab, crop_size, spacing_mm, augment=False)
    r = crops.get(torch.arange(len(crops)))
    r["features"] = judge.cpu().features(r["x0"]).numpy()
    return r


def train_attribute_judge(real, vocab, spacing_mm, settings: JudgeSettings, device):
    """The judge: a small CNN trained on real labelled nodule crops; returns (judge, real crops batch, train acc)."""
    real_crops = NoduleCrops(real, vocab, settings.crop_size, spacing_mm, augment=False)
    r = real_crops.get(torch.arange(len(real_crops)))
    judge = AttributeJudge(vocab, JudgeConfig(crop_size=settings.crop_size, steps=settings.judge_steps,
                                              width=settings.judge_width))
    train_acc = train_judge(judge, r["x0"], r["attrs"], device=device)
    r["features"] = judge.cpu().features(r["x0"]).numpy()
    return judge, r, train_acc


def density_check(synthetic) -> dict:
    """A nodule adds attenuation (design §4): per inserted nodule, mean intensity inside its mask against the
    mean of the ring 1–3 px outside it, on the written image. Returns counts and the smallest difference."""
    differences = []
    for record in _only_synthetic(synthetic):
        image = read_image(record.image)
        for nodule in record.nodules:
            mask = read_image(nodule.mask) > 0
            differences.append(float(image[mask].mean() - image[surround_ring(mask)].mean()))
    return {"n_inserted": len(differences), "n_darker_than_ring": int(sum(d < 0 for d in differences)),
            "min_inside_minus_ring": min(differences, default=float("nan"))}


def score_synthetic(judge, real: dict, synthetic, vocab, spacing_mm, crop_size: int) -> tuple[dict, dict, list]:
    """Controllability (judge accuracy vs the requested attributes), FD_judge per value, mask Dice per nodule."""
    syn = _only_synthetic(synthetic)
    syn_crops = NoduleCrops(syn, vocab, crop_size, spacing_mm, augment=False)
    s = syn_crops.get(torch.arange(len(syn_crops)))
    pred = judge.predict(s["x0"])
    accuracy = attribute_accuracy(pred, s["attrs"], judge.vocab)
    known = s["attrs"] >= 0
    accuracy["all_requested"] = float(((pred == s["attrs"]) | ~known).all(1).float().mean())
    syn_feats = judge.features(s["x0"]).numpy()
    fd = {}
    for k, (name, values) in enumerate(vocab.items()):
        for v, value in enumerate(values):
            a, b = real["features"][(real["attrs"][:, k] == v).numpy()], syn_feats[(s["attrs"][:, k] == v).numpy()]
            if len(a) >= 2 and len(b) >= 2:
                fd[f"{name}={value}"] = metrics.frechet_distance(a, b)
    dice = [_dice_of(n, rec, spacing_mm, crop_size) for rec in syn for n in rec.nodules]
    return {"accuracy": accuracy, "frechet_distance_judge": fd,
            "mask_dice_mean": float(np.nanmean(dice)) if dice else float("nan")}, s, dice


def controllability(ckpt: str, lora_dir: Path, names: list[str], real_train, real_test, spacing_mm: float,
                    settings: JudgeSettings, device, n: int = 32, judge: AttributeJudge | None = None,
                    adapter_guidance: float = ADAPTER_GUIDANCE) -> dict:
    """Single-attribute control of every LoRA in `names` (issue 10), measured on held-out nodules.

    1. The judge trains on real labelled crops (`real_train`) and reads images only; or a `judge` trained
       before is used as given (the benchmark trains one on a larger phantom set, for every part).
    2. real_recall[a=v]: on held-out real crops (`real_test`) carrying v, the fraction the judge calls v; this bounds
       what its verdict on generated crops can show.
    3. accuracy[a=v]: base + LoRA a=v (its token on, every other attribute null) generates from the masks and
       contexts of up to n held-out nodules that LACK v, with adapter_guidance (compose.base_guided) as sample.py
       samples; the fraction the judge calls v.
    4. fd_judge[a=v] = FD(judge features of those generated crops, of real held-out crops carrying v), next to its
       floor fd_floor[a=v] = FD(two disjoint halves of the real crops carrying v) (metrics.frechet_distance).
    5. speckle[a=v] = mean |∇²| in the regenerated regions of the generated crops, speckle_real[a=v] the same on
       the real crops of those masks (metrics.mean_abs_laplacian): what the judge's verdict cannot show.
    """
    vocab = load_model(ckpt, "cpu")[0].vocab
    if judge is None:
        judge, _, _ = train_attribute_judge(real_train, vocab, spacing_mm, settings, device)
    test = NoduleCrops(real_test, vocab, settings.crop_size, spacing_mm, augment=False)
    t = test.get(torch.arange(len(test)))
    pred_real, feats_real = judge.predict(t["x0"]), judge.features(t["x0"]).numpy()
    result = {"real_accuracy": attribute_accuracy(pred_real, t["attrs"], vocab), "n_real_test": len(test),
              "real_recall": {}, "accuracy": {}, "fd_judge": {}, "fd_floor": {}, "n_generated": {}, "speckle": {},
              "speckle_real": {}}
    for name in names:
        attribute, value = name.split("=", 1)
        k, v = list(vocab).index(attribute), vocab[attribute].index(value)
        carrying = (t["attrs"][:, k] == v).numpy()
        lacking = lacking_nodules(t["attrs"], k, v, n)
        batch, generated = generate_with_adapters(ckpt, lora_dir, [name], test, lacking, device,
                                                  adapter_guidance=adapter_guidance)
        real_v = feats_real[carrying]
        result["real_recall"][name] = float((pred_real[carrying, k] == v).float().mean()) if carrying.any() else None
        result["accuracy"][name] = float((judge.predict(generated)[:, k] == v).float().mean())
        result["n_generated"][name] = len(lacking)
        result["speckle"][name] = metrics.mean_abs_laplacian(generated, batch["region"])
        result["speckle_real"][name] = metrics.mean_abs_laplacian(batch["x0"], batch["region"])
        if len(real_v) >= 4:
            result["fd_judge"][name] = metrics.frechet_distance(judge.features(generated).numpy(), real_v)
            result["fd_floor"][name] = metrics.frechet_distance(real_v[0::2], real_v[1::2])
    return result


def lacking_nodules(attrs: torch.Tensor, k: int, v: int, n: int) -> list[int]:
    """The rule of every controllability measure: the first n nodules whose attribute column k is not value v
    (attrs (N, A) value indices), so a LoRA for v must change what the nodule is to be judged v."""
    return torch.nonzero(attrs[:, k] != v).flatten()[:n].tolist()


def generate_with_adapters(ckpt: str, lora_dir: Path, names: list[str], crops, indices: list[int], device,
                           weights: list[float] | None = None, adapter_guidance: float = ADAPTER_GUIDANCE,
                           **sampling) -> tuple[dict, torch.Tensor]:
    """Base + the adapters `names` ("attribute=value"; ΔW summed with `weights`, default 1 each, and merged: exact
    up to rounding, and faster to sample with), their tokens on and every other attribute null, generate from the
    masks and contexts of the dataset items `indices` (synthesis.generate_for; `sampling`: its steps, sampler and
    eta, by default the default sampler), guided away from the base with adapter_guidance ≠ 1
    (compose.base_guided, as sample.py --adapter_guidance).
    Returns (the items' batch, generated (B, 1, S, S)) where generated is what insertion keeps: the context outside
    the region, the model's pixels inside it."""
    model, payload = load_model(ckpt, device)
    model.eval()
    base = copy.deepcopy(model) if adapter_guidance != 1 else None  # before the adapters: guidance's ε(∅)
    for name in names:
        load_lora(Path(lora_dir) / f"{name}.pt", model, payload["fingerprint"], name)
    lora.set_active(model.unet, names, weights)
    lora.merge(model.unet)
    attributes = dict(name.split("=", 1) for name in names)
    eps = compose.guided_eps(model, attributes, None, False)
    if base is not None:
        eps = compose.base_guided(eps, base, adapter_guidance)
    batch, x0 = generate_for(model, crops, indices, attr_tensor(attributes, model.vocab, len(indices), "cpu"),
                             eps=eps, **sampling)
    return batch, batch["context"] + batch["region"] * x0


def controllability_markdown(c: dict) -> str:
    """The controllability table of the demo report."""
    lines = ["## Controllability of single-attribute LoRAs (judge on images only, held-out nodules)", "",
             "Judge accuracy on held-out real crops: "
             + ", ".join(f"{a} {x:.3f}" for a, x in c["real_accuracy"].items()) + f" (n = {c['n_real_test']}).", "",
             "| LoRA | judge accuracy on generated | judge recall on real | FD_judge (gen vs real) | FD floor | "
             "speckle mean abs Laplacian gen / real |", "|---|---|---|---|---|---|"]
    for name, acc in c["accuracy"].items():
        recall, fd, floor = c["real_recall"].get(name), c["fd_judge"].get(name), c["fd_floor"].get(name)
        speckle, speckle_real = c.get("speckle", {}).get(name), c.get("speckle_real", {}).get(name)
        cells = [f"{recall:.3f}" if recall is not None else "–", f"{fd:.2f}" if fd is not None else "–",
                 f"{floor:.2f}" if floor is not None else "–",
                 f"{speckle:.3f} / {speckle_real:.3f}" if speckle is not None else "–"]
        lines.append(f"| `{name}` | {acc:.3f} (n = {c['n_generated'][name]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def attribute_report(real, synthetic, vocab, spacing_mm, settings: JudgeSettings, device, out: Path) -> dict:
    """Judge accuracy, FD_judge per attribute value, mask Dice; writes attributes.json/.md and best_worst.png."""
    judge, r, train_acc = train_attribute_judge(real, vocab, spacing_mm, settings, device)
    scores, s, dice = score_synthetic(judge, r, synthetic, vocab, spacing_mm, settings.crop_size)
    result = {"n_synthetic": len(s["x0"]), "n_real": len(r["x0"]), "judge_train_accuracy": train_acc, **scores,
              "density": density_check(synthetic)}
    write_json(out / "attributes.json", result)
    order = np.argsort(np.nan_to_num(np.array(dice), nan=-1.0))
    picks = [*order[::-1][:8], *order[:8]]
    contact_sheet([(s["x0"][i, 0].numpy() + 1) / 2 for i in picks], [f"d{dice[i]:.2f}" for i in picks],
                  out / "best_worst.png")
    lines = ["# Attribute controllability and realism", "", "| attribute | judge accuracy on synthetic | "
             "judge accuracy on real (train) |", "|---|---|---|"]
    lines += [f"| {a} | {scores['accuracy'][a]:.3f} | {train_acc[a]:.3f} |" for a in vocab]
    lines += ["", "| value | FD_judge (synthetic vs real) |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in scores["frechet_distance_judge"].items()]
    lines += ["", f"Mask Dice (requested vs generated): {result['mask_dice_mean']:.3f}", "",
              f"Inserted nodules darker than the ring 1–3 px around them: {result['density']['n_darker_than_ring']}"
              f" of {result['density']['n_inserted']}",
              "", "Best (left 8) and worst (right 8) by Dice: ![](best_worst.png)", ""]
    (out / "attributes.md").write_text("\n".join(lines))
    return result


# ----------------------------------------------------------------------------------------------- diagnose
def _attention_maps(model, attributes: dict[str, str], crops, device):
    """Token maps (per composed attribute) averaged over heads/layers, and their soft-IoU overlap inside R."""
    batch = crops.get(torch.arange(min(16, len(crops))))
    mask, context = batch["mask"].to(device), batch["context"].to(device)
    attrs = attr_tensor(attributes, model.vocab, len(mask), device)
    scheduler = model.diffusion.scheduler()
    t = torch.full((len(mask),), scheduler.num_train_timesteps // 2, dtype=torch.long, device=device)
    noise = torch.randn(batch["x0"].shape, generator=torch.Generator().manual_seed(0)).to(device)
    model.unet.set_attention_capture(True)
    with torch.no_grad():
        model(scheduler.add_noise(batch["x0"].to(device), noise, t), t, mask, context, attrs)
    per_token = compose.token_attention(model, list(attributes))  # (B, 16²) each, as in composition training
    model.unet.set_attention_capture(False)
    overlap = float(compose.mean_pair_overlap(per_token, mask))
    return overlap, [m[0].reshape(16, 16).cpu().numpy() for m in per_token], batch


def diagnose(ckpt: str, attributes_text: str, out: Path, device, seed: int) -> dict:
    """Both failure causes before (the single adapters, summed) and after `ortho` composition training."""
    model, payload = load_model(ckpt, device)
    model.eval()
    attributes = parse_attributes(attributes_text, model.vocab)
    names = adapter_names(attributes)
    if len(names) != 2:
        raise DataError("diagnose compares exactly two attribute adapters (--attributes a=x,b=y)")
    root = Path(ckpt).parent
    parts = composed_path(root, "ortho", names).with_suffix(".parts")
    for n in names:
        load_lora(root / "lora" / f"{n}.pt", model, payload["fingerprint"], n)
        if not (parts / f"{n}.pt").is_file():
            raise DataError(f"{parts / (n + '.pt')}: missing; run train.py --stage compose --strategy ortho first")
        load_lora(parts / f"{n}.pt", model, payload["fingerprint"], n + "@ortho")
    records = datasets.load_records("phantom", root / "data", 60, seed + 3, model.vocab)
    crops = NoduleCrops(records, model.vocab, model.unet_config.crop_size, 1.4, augment=False)
    result, pictures = {}, []
    for stage, active in (("before", names), ("after", [n + "@ortho" for n in names])):
        fa, fb = (lora.adapter_factors(model.unet, n) for n in active)
        cos = compose.delta_cosines(fa, fb)
        angles = {k: v.tolist() for k, v in compose.principal_angles(fa, fb).items()}
        lora.set_active(model.unet, active)
        overlap, maps, batch = _attention_maps(model, attributes, crops, device)
        result[stage] = {"delta_cosine": cos, "mean_abs_cosine": float(np.mean(np.abs(list(cos.values())))),
                         "principal_angles_deg": angles, "attention_overlap": overlap}
        pictures += [(m - m.min()) / (np.ptp(m) + 1e-8) for m in maps]
    write_json(out / "diagnose.json", result)
    crop = (batch["x0"][0, 0].numpy() + 1) / 2
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
