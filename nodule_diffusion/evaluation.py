"""The paper's evidence: does adding synthetic nodules help a detector? And do they carry the requested attributes?

    detection_set       records -> (images (N, 1, S, S) in [0, 1], targets) at the working resolution
    detect_experiment   real-only vs real+synthetic detectors, same budget, several seeds, held-out test set,
                        metrics with paired bootstrap 95% CIs of the difference (design §4 "Evaluation")
    froc_plot           FROC curves as a PNG (no matplotlib: drawn with PIL)
Protocol: image score = max box score; FROC hit = IoU > 0.2; AP@0.5 COCO 101-point; NODE21 = 0.75·AUC +
0.25·sens@0.25 FP/image (metrics.py). Seed-averaged metrics; CIs resample test images, keeping the pairing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from nodule_diffusion import metrics
from nodule_diffusion.common import atomic_path, seed_everything
from nodule_diffusion.data import DataError, load_record
from nodule_diffusion.detector import DetectorConfig, FasterRCNN, predict_all, train_detector

METRICS = ("auc", "cpm", "ap50", "node21", "sens@0.25")


@dataclass
class DetectConfig:
    image_size: int = 256  # detector input side (images are resampled to --spacing_mm, then resized to this)
    det_steps: int = 600  # optimiser steps per detector (same budget for every arm)
    det_batch_size: int = 4
    det_lr: float = 1e-3
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
        if diffs:
            lines.append(f"| {name} | " + " | ".join(
                f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" for d in diffs.values()) + " |")
    return "\n".join(lines) + "\n"
