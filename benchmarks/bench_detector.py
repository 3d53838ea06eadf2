"""Speed (and optionally quality) of our Faster R-CNN against torchvision's, built from the same parts.

Both detectors use the same backbone module (`detector.Backbone`, wrapped by torchvision through its
`out_channels`), the same anchors (torchvision's AnchorGenerator with our sizes and ratios), the same RoI pooler
size and sampling (MultiScaleRoIAlign on the single level), the same two-layer MLP box head, the same
sampling/NMS/top-n settings, and no resizing (torchvision's transform gets min_size = max_size = image size and
the 1-channel mean/std). What differs is what we wrote: anchors/matching/sampling, NMS, RoIAlign, box coding
and losses in plain PyTorch versus torchvision's detection code and C++ operators.

Measured in one run, interleaved step by step so that machine load affects both alike:
  * training step time (losses + backward + AdamW step) on batches of --batch synthetic images,
  * inference throughput (images/s) of `predict` vs torchvision's eval-mode forward;
the ratio ours/torchvision is a speed ratio (higher is better; target >= 0.8).
With --quality_steps N both are also trained N steps with the same loop and scored by AP@0.5 on held-out images.

Examples:
    python benchmarks/bench_detector.py
    python benchmarks/bench_detector.py --batch 4 --steps 20 --quality_steps 300 --out bench_detector.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodule_diffusion import metrics  # noqa: E402
from nodule_diffusion.detector import Backbone, DetectorConfig, FasterRCNN, train_detector  # noqa: E402

TARGET_RATIO = 0.8


def blob_images(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """n noisy images with 0–3 bright Gaussian nodules of radius 3–12 px (a quarter have none)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images, targets = [], []
    for i in range(n):
        image = 0.3 + 0.1 * yy / size + 0.05 * torch.randn(size, size, generator=g)
        boxes = []
        for _ in range(i % 4):
            r = 3 + 9 * torch.rand(1, generator=g).item()
            cx, cy = (r + 4 + (size - 2 * r - 8) * torch.rand(2, generator=g)).tolist()
            image += 0.4 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 2) ** 2))
            boxes.append([cx - r, cy - r, cx + r, cy + r])
        images.append(image.clamp(0, 1))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)})
    return torch.stack(images)[:, None], targets  # (n, 1, size, size)


def torchvision_model(cfg: DetectorConfig, image_size: int):
    """torchvision's FasterRCNN assembled from the same parts and settings as ours."""
    from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    backbone = Backbone(cfg)  # has .out_channels, returns one (B, C, Hf, Wf) map
    C, S, R = backbone.out_channels, cfg.roi_output_size, cfg.representation_size
    num_anchors = len(cfg.anchor_sizes) * len(cfg.aspect_ratios)
    return TorchvisionFasterRCNN(
        backbone, num_classes=None, min_size=image_size, max_size=image_size,
        image_mean=[cfg.image_mean], image_std=[cfg.image_std],
        rpn_anchor_generator=AnchorGenerator((tuple(cfg.anchor_sizes),), (tuple(cfg.aspect_ratios),)),
        rpn_head=RPNHead(C, num_anchors),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_iou, rpn_fg_iou_thresh=cfg.rpn_fg_iou, rpn_bg_iou_thresh=cfg.rpn_bg_iou,
        rpn_batch_size_per_image=cfg.rpn_batch_per_image, rpn_positive_fraction=cfg.rpn_positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(["0"], S, cfg.roi_sampling_ratio),
        box_head=TwoMLPHead(C * S * S, R), box_predictor=FastRCNNPredictor(R, 2),
        box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms_iou,
        box_detections_per_img=cfg.detections_per_img, box_fg_iou_thresh=cfg.roi_fg_iou,
        box_bg_iou_thresh=cfg.roi_bg_iou, box_batch_size_per_image=cfg.roi_batch_per_image,
        box_positive_fraction=cfg.roi_positive_fraction, bbox_reg_weights=cfg.roi_box_weights)


def tv_targets(targets: list[dict]) -> list[dict]:
    return [{"boxes": t["boxes"], "labels": torch.ones(len(t["boxes"]), dtype=torch.int64)} for t in targets]


def train_step(model, optimizer, images, targets, ours: bool) -> None:
    losses = model.losses(images, targets) if ours else model(list(images), tv_targets(targets))
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()


@torch.no_grad()
def infer(model, images, ours: bool) -> list[dict]:
    return model.predict(images) if ours else model(list(images))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(cfg: DetectorConfig, args) -> dict:
    torch.manual_seed(0)
    ours, theirs = FasterRCNN(cfg), torchvision_model(cfg, args.image_size)
    ours.train(), theirs.train()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, theirs)]
    images, targets = blob_images(args.batch * 4, args.image_size, seed=1)
    batches = [(images[i:i + args.batch], targets[i:i + args.batch]) for i in range(0, len(images), args.batch)]
    step_times = {"ours": [], "torchvision": []}
    for step in range(args.warmup + args.steps):  # interleaved: both see the same load
        x, t = batches[step % len(batches)]
        for name, model, opt in (("ours", ours, optimizers[0]), ("torchvision", theirs, optimizers[1])):
            seconds = timed(lambda: train_step(model, opt, x, t, name == "ours"))
            if step >= args.warmup:
                step_times[name].append(seconds)
    theirs.eval()
    infer_times = {"ours": [], "torchvision": []}
    for step in range(args.warmup + args.steps):
        x = batches[step % len(batches)][0]
        for name, model in (("ours", ours), ("torchvision", theirs)):
            seconds = timed(lambda: infer(model, x, name == "ours"))
            if step >= args.warmup:
                infer_times[name].append(seconds)
    row = {}
    for name in ("ours", "torchvision"):
        row[name] = {"train_step_s": statistics.median(step_times[name]),
                     "infer_images_per_s": args.batch / statistics.median(infer_times[name])}
    row["train_speed_ratio"] = row["torchvision"]["train_step_s"] / row["ours"]["train_step_s"]
    row["infer_speed_ratio"] = row["ours"]["infer_images_per_s"] / row["torchvision"]["infer_images_per_s"]
    return row


def quality(cfg: DetectorConfig, args) -> dict:
    """Train both with the same AdamW/warm-up/cosine loop (ours: `train_detector`) and compare AP@0.5."""
    train_images, train_targets = blob_images(args.quality_images, args.image_size, seed=2)
    test_images, test_targets = blob_images(args.quality_images, args.image_size, seed=3)
    torch.manual_seed(0)
    ours = FasterRCNN(cfg)
    train_detector(ours, train_images, train_targets, steps=args.quality_steps, batch_size=args.batch,
                   lr=1e-3, seed=0, progress=False)
    torch.manual_seed(0)
    theirs = torchvision_model(cfg, args.image_size).train()
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-3, weight_decay=1e-4)
    warmup = max(1, min(100, args.quality_steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * s / args.quality_steps)))
    g = torch.Generator().manual_seed(0)
    for _ in range(args.quality_steps):
        index = torch.randperm(len(train_images), generator=g)[:args.batch]
        losses = theirs(list(train_images[index]), tv_targets([train_targets[i] for i in index]))
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 10.0)
        optimizer.step()
        scheduler.step()
    theirs.eval()
    result = {}
    for name, model in (("ours", ours), ("torchvision", theirs)):
        predictions = [p for i in range(0, len(test_images), args.batch)
                       for p in infer(model, test_images[i:i + args.batch], name == "ours")]
        result[name] = metrics.average_precision([t["boxes"] for t in test_targets],
                                                 [p["boxes"] for p in predictions],
                                                 [p["scores"] for p in predictions], iou_threshold=0.5)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (shared CPUs: 1)")
    parser.add_argument("--no_fpn", action="store_true", help="the plain variant: last stage at stride 8")
    parser.add_argument("--quality_steps", type=int, default=0, help="also train both this many steps")
    parser.add_argument("--quality_images", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DetectorConfig(fpn=False, strides=(2, 2, 1)) if args.no_fpn else DetectorConfig()
    result = {"config": cfg.to_dict(), "args": {k: str(v) for k, v in vars(args).items()}, "speed": speed(cfg, args)}
    s = result["speed"]
    print(f"{'':12s} {'train step (s)':>15s} {'infer (img/s)':>14s}")
    for name in ("ours", "torchvision"):
        print(f"{name:12s} {s[name]['train_step_s']:15.4f} {s[name]['infer_images_per_s']:14.1f}")
    print(f"{'ratio':12s} {s['train_speed_ratio']:15.2f} {s['infer_speed_ratio']:14.2f}   (ours/torchvision speed, "
          f"target >= {TARGET_RATIO})")
    if args.quality_steps:
        result["ap50"] = quality(cfg, args)
        print(f"AP@0.5 after {args.quality_steps} steps: ours {result['ap50']['ours']:.3f}, "
              f"torchvision {result['ap50']['torchvision']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
