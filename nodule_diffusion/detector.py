"""Compact Faster R-CNN for nodule detection on chest radiographs, written top-down.

Implements [FRCNN] arXiv:1506.01497 (two-stage detector: RPN + RoI head), with RoIAlign from [MaskRCNN]
arXiv:1703.06870 §3, a small residual backbone [ResNet] arXiv:1512.03385 normalised with GroupNorm [GN]
arXiv:1803.08494, and an optional top-down pathway [FPN] arXiv:1612.03144. Conventions and defaults follow
torchvision 0.29's detection code (shared/notes/formats.md §4), so results are comparable with it.

Reading order: config → box ops (IoU, NMS, encode/decode [FRCNN Eq. 2], RoIAlign) → backbone → anchors →
matching/sampling → FasterRCNN (RPN → proposals/NMS → RoIAlign → box head → post-processing) → training.

Shape letters: B images, C channels, H×W feature map, A anchors per location, N boxes, K RoIs, G ground truths.
Boxes are (N, 4) float xyxy in absolute image pixels, everywhere; width = x1 − x0 (no +1), as in torchvision.
Images enter as (B, 1, H, W) float in [0, 1] (dense = bright); `FasterRCNN` normalises them itself with
(x − image_mean)/image_std. One foreground class ("nodule"); class 0 is background.

Deviations (each also marked `# DEVIATION:` where it happens):
- GroupNorm instead of frozen BatchNorm: no running statistics, so `losses()` and `predict()` behave the same
  in train() and eval() mode and batch size 1 works (we train from scratch, no ImageNet weights).
- Anchors centred on feature cells, (i + 0.5)·stride, as py-faster-rcnn (torchvision: i·stride, rounded).
- The FPN (on by default) returns only its finest level, stride 4: RPN and RoI head stay single-level.
- Single foreground class: one box regressor, no per-class (batched) NMS.
- Cross-boundary anchors are kept in RPN training (as torchvision does); [FRCNN §3.1.3] ignores them.
- Low-quality RPN matches ([FRCNN §3.1.2] "the anchor with the highest IoU") require IoU > 0.
- Proposals and detections under `min_box_size` (1 px) after clipping are dropped (torchvision: 1e-3 and
  1e-2 px), so zero-height slivers at the image border cannot become detections.
- AdamW (not SGD) in `train_detector`: it trains the from-scratch backbone reliably in few steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nodule_diffusion.common import progress_options
from nodule_diffusion.data import DataError


@dataclass
class DetectorConfig:
    """Detector hyper-parameters; defaults are for 1-channel 256×256 CXRs with 4–25 px nodules on a CPU."""

    image_mean: float = 0.5  # normalisation of the [0, 1] input: (x − mean)/std
    image_std: float = 0.25
    widths: tuple[int, ...] = (16, 32, 64)  # channels of the residual stages (after a stride-2 stem)
    strides: tuple[int, ...] = (2, 2, 2)  # per stage, after the stem: stage outputs at 4, 8, 16 px per cell
    blocks_per_stage: int = 1
    # fpn=True: all stages merged top-down, output at the first stage's stride (4 px): small nodules get
    # several well-aligned anchors; measured better and faster than fpn=False with strides (2, 2, 1), which
    # outputs the last stage at stride 8 (see benchmarks/bench_detector.py).
    fpn: bool = True
    anchor_sizes: tuple[float, ...] = (8.0, 16.0, 32.0)  # √(w·h) of anchors, pixels
    aspect_ratios: tuple[float, ...] = (1.0,)  # h/w; nodules are round, so (0.5, 1, 2) adds little
    rpn_fg_iou: float = 0.7  # [FRCNN §3.1.2]
    rpn_bg_iou: float = 0.3
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_top_n_train: int = 1000  # torchvision: 2000/1000; fewer suffice for ≤ 3 nodules/image
    rpn_pre_nms_top_n_test: int = 500
    rpn_post_nms_top_n_train: int = 500
    rpn_post_nms_top_n_test: int = 300
    rpn_nms_iou: float = 0.7
    roi_fg_iou: float = 0.5  # [FRCNN §3.1.3, Fast R-CNN §2.3]
    roi_bg_iou: float = 0.5
    roi_batch_per_image: int = 128
    roi_positive_fraction: float = 0.25
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2
    roi_aligned: bool = False  # torchvision's MultiScaleRoIAlign uses aligned=False
    representation_size: int = 256  # width of the two-layer MLP box head (torchvision: 1024)
    rpn_box_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    roi_box_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
    box_delta_clamp: float = math.log(1000.0 / 16)  # max dw, dh before exp(), as in torchvision
    smooth_l1_beta: float = 1.0 / 9
    min_box_size: float = 1.0  # px; proposals/detections narrower than this (slivers clipped at the border) drop
    score_thresh: float = 0.05  # evaluation sets it low (e.g. 0.001) to get full FROC curves
    nms_iou: float = 0.5
    detections_per_img: int = 100

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataError(f"detector config: unknown field(s) {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------------------- box ops


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every pair: a (N, 4), b (M, 4) xyxy → (N, M). Pairs whose union has zero area give 0 (not NaN)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    top_left = torch.max(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    bottom_right = torch.min(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    # inter ≤ union, so where union = 0 the quotient is 0/1 = 0.
    return inter / torch.where(union > 0, union, torch.ones_like(union))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression [FRCNN §3.3]. boxes (N, 4), scores (N,) → kept indices (int64), by
    descending score; equal scores keep index order (stable sort); a box is dropped if its IoU with a kept,
    higher-ranked box is strictly greater than `iou_threshold` (torchvision's CPU semantics)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    # suppress[i, j]: box j (ranked after i) overlaps box i too much. The greedy pass is sequential by
    # nature; the O(N²) IoU is vectorised and the loop touches only a row of booleans per kept box.
    suppress = (box_iou(boxes[order], boxes[order]) > iou_threshold).triu(diagonal=1).cpu().numpy()
    keep = np.ones(len(order), dtype=bool)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= ~suppress[i, i + 1:]
    return order[torch.from_numpy(keep).to(order.device)]


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Regression targets of `boxes` (N, 4) relative to `anchors` (N, 4) → (N, 4) = (tx, ty, tw, th)·weights."""
    wa, ha = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    xa, ya = anchors[:, 0] + 0.5 * wa, anchors[:, 1] + 0.5 * ha
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    x, y = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    # [FRCNN Eq. 2] tx = (x − xa)/wa, ty = (y − ya)/ha, tw = log(w/wa), th = log(h/ha)
    t = torch.stack([(x - xa) / wa, (y - ya) / ha, torch.log(w / wa), torch.log(h / ha)], dim=1)  # (N, 4)
    return t * t.new_tensor(weights)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor, weights: tuple[float, ...],
                 clamp: float = math.log(1000.0 / 16)) -> torch.Tensor:
    """Inverse of `encode_boxes`: deltas (N, 4), anchors (N, 4) → boxes (N, 4). tw, th are clamped at `clamp`
    so that exp() cannot overflow early in training."""
    t = deltas / deltas.new_tensor(weights)
    wa, ha = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    xa, ya = anchors[:, 0] + 0.5 * wa, anchors[:, 1] + 0.5 * ha
    # [FRCNN Eq. 2] inverted: x = tx·wa + xa, w = wa·exp(tw)
    x, y = t[:, 0] * wa + xa, t[:, 1] * ha + ya
    w, h = wa * torch.exp(t[:, 2].clamp(max=clamp)), ha * torch.exp(t[:, 3].clamp(max=clamp))
    return torch.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], dim=1)  # (N, 4)


def _sample_points(start, bin_size, grid, n_bins: int):
    """Sample coordinates along one axis of RoIAlign: y = y0 + p·bin + (i + 0.5)·bin/g for bin p and sample
    i < g. start, bin_size, grid (K,) → coords (K, n_bins, G), valid (K, 1, G) with G = max g; samples i ≥ g
    (adaptive grids smaller than the largest) are marked invalid."""
    p = torch.arange(n_bins, device=start.device, dtype=start.dtype)[None, :, None]
    i = torch.arange(max(int(grid.max()), 1), device=start.device)[None, None, :]
    start, bin_size, grid = start[:, None, None], bin_size[:, None, None], grid[:, None, None]  # (K, 1, 1)
    return start + p * bin_size + (i + 0.5) * bin_size / grid, i < grid


def _bilinear_1d(coord: torch.Tensor, size: int, valid: torch.Tensor):
    """One axis of torchvision's RoIAlign bilinear read → (index (..., 2) int64 of the low/high neighbours,
    weight (..., 2)). Samples outside [−1, size] read 0; coordinates ≤ 0 clamp to 0; at the last row both
    neighbours are size − 1. Bilinear weights are separable, w(y, x) = w(y)·w(x), so each axis is done alone."""
    valid = valid & (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0)
    low = coord.floor().long().clamp(max=size - 1)
    coord = torch.where(low >= size - 1, low.to(coord.dtype), coord)
    frac = coord - low.to(coord.dtype)
    index = torch.stack([low, (low + 1).clamp(max=size - 1)], dim=-1)  # (..., 2)
    weight = torch.stack([1 - frac, frac], dim=-1) * valid[..., None]  # (..., 2)
    return index, weight


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """RoIAlign [MaskRCNN §3] with torchvision.ops.roi_align's exact semantics, differentiable in `features`.

    features (B, C, H, W); rois (K, 5) = (batch index, x0, y0, x1, y1) in image pixels, multiplied by
    `spatial_scale` to reach feature cells; output_size int or (h, w). Each of the h×w bins averages a g_h×g_w
    grid of bilinear samples, g = sampling_ratio, or ceil(roi size / output size) per RoI when ≤ 0. aligned=True
    shifts by −0.5 cell (pixel centres); aligned=False clamps RoI sides to ≥ 1 cell. Returns (K, C, h, w).
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    B, C, H, W = features.shape
    K = rois.shape[0]
    if K == 0:
        return features.new_zeros((0, C, out_h, out_w))
    rois = rois.to(torch.promote_types(features.dtype, torch.float32))  # coordinates in ≥ float32, even in AMP
    offset = 0.5 if aligned else 0.0
    x0, y0 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x0
    roi_h = rois[:, 4] * spatial_scale - offset - y0
    if not aligned:  # legacy behaviour: force malformed RoIs to be at least 1×1 cell
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((K,), sampling_ratio, device=rois.device)
    else:  # adaptive: ceil(roi/out) samples per bin; none (an all-zero output) for empty aligned RoIs
        grid_h = torch.ceil(roi_h / out_h).clamp(min=0).long()
        grid_w = torch.ceil(roi_w / out_w).clamp(min=0).long()
    y, y_valid = _sample_points(y0, roi_h / out_h, grid_h, out_h)  # (K, h, gh)
    x, x_valid = _sample_points(x0, roi_w / out_w, grid_w, out_w)  # (K, w, gw)
    y_index, y_weight = _bilinear_1d(y, H, y_valid)  # (K, h, gh, 2)
    x_index, x_weight = _bilinear_1d(x, W, x_valid)  # (K, w, gw, 2)
    y_weight = y_weight / (grid_h * grid_w).clamp(min=1).to(y_weight.dtype)[:, None, None, None]  # bin mean
    # Each output cell (k, ph, pw) is a weighted sum of 4·gh·gw rows of the (B·H·W, C) feature table: the
    # bilinear corners of its samples, weight w(y)·w(x)/count. embedding_bag computes exactly this sum in one
    # fused gather (its backward scatters the gradient back), so no (K, ..., C) intermediate is materialised.
    index = (rois[:, 0].long()[:, None, None, None, None, None, None] * (H * W)
             + y_index[:, :, None, :, :, None, None] * W
             + x_index[:, None, :, None, None, :, :])  # (K, h, w, gh, 2, gw, 2)
    weight = y_weight[:, :, None, :, :, None, None] * x_weight[:, None, :, None, None, :, :]  # like index
    table = features.permute(0, 2, 3, 1).reshape(B * H * W, C)  # (B·H·W, C)
    out = F.embedding_bag(index.reshape(K * out_h * out_w, -1), table, mode="sum",
                          per_sample_weights=weight.reshape(K * out_h * out_w, -1).to(table.dtype))  # (K·h·w, C)
    return out.view(K, out_h, out_w, C).permute(0, 3, 1, 2).contiguous()  # (K, C, h, w)


# ---------------------------------------------------------------------------------------------------- backbone


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, min(8, channels // 4)), channels)  # up to 8 groups of ≥ 4 channels


class ResBlock(nn.Module):
    """Basic residual block [ResNet Fig. 2 left]: two 3×3 convs, identity (or 1×1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = _group_norm(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          _group_norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


class Backbone(nn.Module):
    """Stride-2 stem + residual stages: (B, 1, H, W) normalised image → (B, C, H/s, W/s), s = `self.stride`.
    With config.fpn, each stage output is projected to widths[−1] channels by a 1×1 conv and summed coarse-to-fine
    with nearest-neighbour upsampling, then smoothed by a 3×3 conv [FPN §3]; only the finest map is returned."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        # DEVIATION: GroupNorm everywhere instead of (frozen) BatchNorm, see the module docstring.
        self.stem = nn.Sequential(nn.Conv2d(1, config.widths[0], 3, 2, 1, bias=False),
                                  _group_norm(config.widths[0]), nn.ReLU())
        self.stages = nn.ModuleList()
        for in_ch, width, stride in zip(config.widths[:1] + config.widths[:-1], config.widths, config.strides):
            self.stages.append(nn.Sequential(ResBlock(in_ch, width, stride),
                                             *[ResBlock(width, width, 1) for _ in range(config.blocks_per_stage - 1)]))
        self.out_channels = config.widths[-1]
        self.fpn = config.fpn
        if self.fpn:
            self.lateral = nn.ModuleList(nn.Conv2d(w, self.out_channels, 1) for w in config.widths)
            self.smooth = nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)
        strides = config.strides[:1] if self.fpn else config.strides
        self.stride = 2 * math.prod(strides)  # image pixels per feature cell
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        if not self.fpn:
            return x
        top_down = self.lateral[-1](outputs[-1])
        for lateral, c in zip(reversed(self.lateral[:-1]), reversed(outputs[:-1])):
            top_down = lateral(c) + F.interpolate(top_down, size=c.shape[-2:], mode="nearest")
        return self.smooth(top_down)  # DEVIATION: only the finest FPN level is used (nodules are small)


# ------------------------------------------------------------------------------------------ anchors, matching


def make_anchors(feature_size: tuple[int, int], stride: int, sizes, ratios, device) -> torch.Tensor:
    """All anchors of a (Hf, Wf) feature map → (Hf·Wf·A, 4) xyxy pixels, cell-major, A = len(ratios)·len(sizes).
    An anchor of size s and ratio r = h/w has w = s/√r, h = s·√r (area s²) [FRCNN §3.1.1]."""
    ratios = torch.tensor(ratios, dtype=torch.float32, device=device)
    sizes = torch.tensor(sizes, dtype=torch.float32, device=device)
    ws = (sizes[None, :] / ratios.sqrt()[:, None]).reshape(-1)  # (A,)
    hs = (sizes[None, :] * ratios.sqrt()[:, None]).reshape(-1)  # (A,)
    base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # (A, 4), centred on 0
    # DEVIATION: centres at cell centres (i + 0.5)·stride, as py-faster-rcnn; torchvision uses i·stride.
    cy = (torch.arange(feature_size[0], device=device, dtype=torch.float32) + 0.5) * stride
    cx = (torch.arange(feature_size[1], device=device, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (Hf·Wf, 1, 4)
    return (centres + base[None]).reshape(-1, 4)  # (Hf·Wf·A, 4)


def match_boxes(gt: torch.Tensor, boxes: torch.Tensor, fg_iou: float, bg_iou: float, low_quality: bool):
    """Assign each of `boxes` (M, 4) to a ground truth of `gt` (G, 4). Returns (labels (M,) float: 1 foreground
    (IoU ≥ fg_iou), 0 background (IoU < bg_iou), −1 ignored; matched (M,) int64 index into gt, 0 where
    unmatched). low_quality: also mark, for each gt, the boxes with its highest IoU [FRCNN §3.1.2 (i)]."""
    labels = boxes.new_zeros(len(boxes))
    if len(gt) == 0:  # an image without nodules: every box is background
        return labels, torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
    iou = box_iou(gt, boxes)  # (G, M)
    best_iou, matched = iou.max(dim=0)
    labels[best_iou >= bg_iou] = -1.0
    labels[best_iou >= fg_iou] = 1.0
    if low_quality:
        best_per_gt = iou.max(dim=1, keepdim=True).values  # (G, 1)
        # DEVIATION: only if that IoU > 0; torchvision would also take every IoU-0 anchor of an isolated gt.
        labels[((iou == best_per_gt) & (best_per_gt > 0)).any(dim=0)] = 1.0
    return labels, matched


def sample_labels(labels: torch.Tensor, batch_size: int, positive_fraction: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random subset of labelled boxes for the loss: at most batch_size·positive_fraction foregrounds, the rest
    background [FRCNN §3.1.3]. labels (M,) in {1, 0, −1} → bool mask (M,)."""
    def random_subset(candidates: torch.Tensor, n: int) -> torch.Tensor:  # n random indices where candidates
        index = torch.nonzero(candidates).flatten()
        return index[torch.randperm(len(index), generator=generator)[:n].to(index.device)]

    positives = random_subset(labels == 1, int(batch_size * positive_fraction))
    negatives = random_subset(labels == 0, batch_size - len(positives))
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[positives] = True
    mask[negatives] = True
    return mask


def check_targets(targets: list[dict], num_images: int, device) -> list[torch.Tensor]:
    """Validate targets (list of {"boxes": (N, 4) xyxy pixels}) → list of float32 (N, 4) on `device`.
    Non-finite or degenerate (x1 ≤ x0 or y1 ≤ y0) boxes raise DataError naming the image and box."""
    if len(targets) != num_images:
        raise DataError(f"detector targets: {len(targets)} targets for {num_images} images")
    checked = []
    for i, target in enumerate(targets):
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)  # an image without nodules: (0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise DataError(f"detector targets: image {i}: boxes must be (N, 4), got {tuple(boxes.shape)}")
        bad = ~torch.isfinite(boxes).all(dim=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bad.any():
            j = int(torch.nonzero(bad)[0])
            raise DataError(f"detector targets: image {i}, box {j} = {boxes[j].tolist()} is non-finite or "
                            f"degenerate (need x1 > x0 and y1 > y0, xyxy pixels)")
        checked.append(boxes)
    return checked


# ------------------------------------------------------------------------------------------------ the detector


def _clip_and_filter(boxes: torch.Tensor, scores: torch.Tensor, image_size, min_size: float):
    """Clip boxes (N, 4) to the image (H, W) and drop those narrower or shorter than min_size pixels."""
    H, W = image_size
    boxes = torch.stack([boxes[:, 0].clamp(0, W), boxes[:, 1].clamp(0, H),
                         boxes[:, 2].clamp(0, W), boxes[:, 3].clamp(0, H)], dim=1)  # (N, 4)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    return boxes[keep], scores[keep]


class FasterRCNN(nn.Module):
    """Faster R-CNN [FRCNN] for one foreground class. `losses(images, targets)` for training, `predict(images)`
    for inference; both take images (B, 1, H, W) float in [0, 1] and behave the same in train()/eval() mode."""

    def __init__(self, config: DetectorConfig | None = None):
        super().__init__()
        self.config = config = config or DetectorConfig()
        self.backbone = Backbone(config)
        C, S, R = self.backbone.out_channels, config.roi_output_size, config.representation_size
        self.num_anchors = A = len(config.anchor_sizes) * len(config.aspect_ratios)
        # RPN head [FRCNN §3.1]: a 3×3 conv "sliding window", then per-anchor objectness logit and 4 deltas.
        self.rpn_conv = nn.Conv2d(C, C, 3, padding=1)
        self.rpn_objectness = nn.Conv2d(C, A, 1)
        self.rpn_deltas = nn.Conv2d(C, 4 * A, 1)
        # Box head: two fully connected layers on the pooled RoI (torchvision's TwoMLPHead), then predictors.
        self.box_head = nn.Sequential(nn.Flatten(), nn.Linear(C * S * S, R), nn.ReLU(), nn.Linear(R, R), nn.ReLU())
        # DEVIATION: one foreground class, so one box regressor (torchvision regresses one per class).
        self.cls_logits = nn.Linear(R, 2)  # (background, nodule)
        self.box_deltas = nn.Linear(R, 4)
        # Gaussian init, std 0.01 for the RPN and classifier and 0.001 for box regression [FRCNN §3.1.3].
        for layer, std in ((self.rpn_conv, 0.01), (self.rpn_objectness, 0.01), (self.rpn_deltas, 0.01),
                           (self.cls_logits, 0.01), (self.box_deltas, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def _rpn(self, images: torch.Tensor):
        """images (B, 1, H, W) in [0, 1] → features (B, C, Hf, Wf), anchors (M, 4), objectness logits (B, M),
        anchor deltas (B, M, 4), with M = Hf·Wf·A."""
        assert images.ndim == 4 and images.shape[1] == 1, f"need (B, 1, H, W) images, got {tuple(images.shape)}"
        features = self.backbone((images - self.config.image_mean) / self.config.image_std)
        B, _, Hf, Wf = features.shape
        h = F.relu(self.rpn_conv(features))
        objectness = self.rpn_objectness(h).permute(0, 2, 3, 1).reshape(B, -1)  # (B, Hf·Wf·A)
        deltas = self.rpn_deltas(h).view(B, self.num_anchors, 4, Hf, Wf)  # (B, A, 4, Hf, Wf)
        deltas = deltas.permute(0, 3, 4, 1, 2).reshape(B, -1, 4)  # (B, Hf·Wf·A, 4)
        anchors = make_anchors((Hf, Wf), self.backbone.stride, self.config.anchor_sizes,
                               self.config.aspect_ratios, images.device)
        return features, anchors, objectness, deltas

    def _proposals(self, anchors, objectness, deltas, image_size, training: bool) -> list[torch.Tensor]:
        """Per image: top-n by objectness → decode → clip → NMS → top-n (N, 4) proposals [FRCNN §3.3]."""
        cfg = self.config
        pre_n = cfg.rpn_pre_nms_top_n_train if training else cfg.rpn_pre_nms_top_n_test
        post_n = cfg.rpn_post_nms_top_n_train if training else cfg.rpn_post_nms_top_n_test
        proposals = []
        for scores, image_deltas in zip(objectness, deltas):
            top = scores.topk(min(pre_n, len(scores))).indices
            boxes = decode_boxes(image_deltas[top], anchors[top], cfg.rpn_box_weights, cfg.box_delta_clamp)
            # DEVIATION: drop boxes < min_box_size (1 px; torchvision 1e-3 px): slivers clipped at the border.
            boxes, scores = _clip_and_filter(boxes, scores[top], image_size, cfg.min_box_size)
            proposals.append(boxes[nms(boxes, scores, cfg.rpn_nms_iou)[:post_n]])
        return proposals

    def _box_head(self, features: torch.Tensor, proposals: list[torch.Tensor]):
        """RoIAlign every proposal and run the head → class logits (K, 2), box deltas (K, 4), K = Σ N_b."""
        cfg = self.config
        batch_index = torch.cat([torch.full((len(p), 1), float(b), device=features.device)
                                 for b, p in enumerate(proposals)])  # (K, 1)
        rois = torch.cat([batch_index, torch.cat(proposals)], dim=1)  # (K, 5)
        pooled = roi_align(features, rois, cfg.roi_output_size, 1.0 / self.backbone.stride,
                           cfg.roi_sampling_ratio, cfg.roi_aligned)  # (K, C, S, S)
        h = self.box_head(pooled)  # (K, R)
        return self.cls_logits(h), self.box_deltas(h)

    def losses(self, images: torch.Tensor, targets: list[dict],
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training losses [FRCNN Eq. 1] of the RPN and the RoI head, each a finite scalar.

        images (B, 1, H, W) float in [0, 1]; targets: B dicts with "boxes" (N, 4) float xyxy pixels, (0, 4) for
        an image without nodules (all its anchors and RoIs then train as background). `generator` (CPU) drives
        the random anchor/RoI sampling. Returns rpn_objectness, rpn_box, roi_cls, roi_box.
        """
        cfg = self.config
        gt = check_targets(targets, len(images), images.device)
        features, anchors, objectness, deltas = self._rpn(images)

        # 1. RPN targets: match anchors to ground truth, sample 256 per image, encode [FRCNN §3.1.2].
        # DEVIATION: cross-boundary anchors take part (as in torchvision); [FRCNN §3.1.3] ignores them.
        labels, box_targets = [], []
        for boxes in gt:
            lab, matched = match_boxes(boxes, anchors, cfg.rpn_fg_iou, cfg.rpn_bg_iou, low_quality=True)
            sampled = sample_labels(lab, cfg.rpn_batch_per_image, cfg.rpn_positive_fraction, generator)
            labels.append(torch.where(sampled, lab, torch.full_like(lab, -1.0)))  # not sampled → ignored
            matched_boxes = boxes[matched] if len(boxes) else anchors  # no gt: targets unused (no positives)
            box_targets.append(encode_boxes(matched_boxes, anchors, cfg.rpn_box_weights))
        labels, box_targets = torch.stack(labels), torch.stack(box_targets)  # (B, M), (B, M, 4)
        sampled, positive = labels >= 0, labels == 1

        # 2. RPN losses [FRCNN Eq. 1]: BCE over sampled anchors; smooth-L1 over positives ÷ number sampled.
        rpn_objectness = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])
        rpn_box = F.smooth_l1_loss(deltas[positive], box_targets[positive], beta=cfg.smooth_l1_beta,
                                   reduction="sum") / sampled.sum().clamp(min=1)

        # 3. Proposals, without gradient through their coordinates ("approximate joint training" [FRCNN §3.2]),
        # plus the ground-truth boxes so the head always sees positives early in training.
        proposals = self._proposals(anchors, objectness.detach(), deltas.detach(), images.shape[-2:], True)
        rois, roi_labels, roi_targets = [], [], []
        for props, boxes in zip(proposals, gt):
            props = torch.cat([props, boxes])
            lab, matched = match_boxes(boxes, props, cfg.roi_fg_iou, cfg.roi_bg_iou, low_quality=False)
            keep = sample_labels(lab, cfg.roi_batch_per_image, cfg.roi_positive_fraction, generator)
            matched_boxes = boxes[matched[keep]] if len(boxes) else props[keep]
            rois.append(props[keep])
            roi_labels.append(lab[keep])
            roi_targets.append(encode_boxes(matched_boxes, props[keep], cfg.roi_box_weights))
        roi_labels, roi_targets = torch.cat(roi_labels), torch.cat(roi_targets)  # (K,), (K, 4)

        # 4. Head losses: cross-entropy over sampled RoIs; smooth-L1 over foregrounds ÷ number of RoIs.
        logits, roi_deltas = self._box_head(features, rois)
        positive = roi_labels == 1
        roi_cls = F.cross_entropy(logits, roi_labels.long())
        roi_box = F.smooth_l1_loss(roi_deltas[positive], roi_targets[positive], beta=cfg.smooth_l1_beta,
                                   reduction="sum") / max(len(roi_labels), 1)
        return {"rpn_objectness": rpn_objectness, "rpn_box": rpn_box, "roi_cls": roi_cls, "roi_box": roi_box}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections for images (B, 1, H, W) float in [0, 1] → B dicts: "boxes" (N, 4) xyxy pixels clipped to the
        image, "scores" (N,) nodule probability in (score_thresh, 1], descending; N ≤ detections_per_img."""
        cfg = self.config
        features, anchors, objectness, deltas = self._rpn(images)
        proposals = self._proposals(anchors, objectness, deltas, images.shape[-2:], training=False)
        logits, roi_deltas = self._box_head(features, proposals)
        scores = F.softmax(logits, dim=1)[:, 1]  # (K,) foreground probability
        boxes = decode_boxes(roi_deltas, torch.cat(proposals), cfg.roi_box_weights, cfg.box_delta_clamp)
        results = []
        for image_boxes, image_scores in zip(boxes.split([len(p) for p in proposals]),
                                             scores.split([len(p) for p in proposals])):
            image_boxes, image_scores = _clip_and_filter(image_boxes, image_scores, images.shape[-2:],
                                                         cfg.min_box_size)
            above = image_scores > cfg.score_thresh
            image_boxes, image_scores = image_boxes[above], image_scores[above]
            keep = nms(image_boxes, image_scores, cfg.nms_iou)[:cfg.detections_per_img]
            results.append({"boxes": image_boxes[keep], "scores": image_scores[keep]})
        return results


# ---------------------------------------------------------------------------------------------------- training


def _as_images(images) -> torch.Tensor:
    """Accept a tensor or array (N, 1, H, W) or (N, H, W) → float32 tensor (N, 1, H, W)."""
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim == 3:
        images = images[:, None]  # (N, 1, H, W)
    if images.ndim != 4 or images.shape[1] != 1:
        raise DataError(f"detector images: expected (N, 1, H, W) or (N, H, W), got {tuple(images.shape)}")
    return images


def train_detector(model: FasterRCNN, images, targets: list[dict], steps: int = 600, batch_size: int = 4,
                   lr: float = 1e-3, seed: int = 0, device="cpu", augment: bool = True,
                   progress: bool = True) -> list[dict[str, float]]:
    """Train `model` in place on images (N, 1, H, W) float32 in [0, 1] with targets (N dicts with "boxes").

    Each step draws `batch_size` images without replacement (reshuffled every epoch), flips each horizontally
    with p = 0.5 if `augment` (CXRs are roughly left-right symmetric, not up-down), sums the four losses and
    takes one AdamW step (weight decay 1e-4, gradient norm clipped at 10; linear warm-up over min(100, steps/10)
    steps, then cosine decay to 0). Batch order, flips and RPN/RoI sampling come from one CPU generator seeded
    with `seed`; weight init is the caller's (seed before building the model). Returns per-step loss floats.
    """
    images = _as_images(images)
    boxes = check_targets(targets, len(images), "cpu")
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    # DEVIATION: AdamW instead of [FRCNN]'s SGD: from-scratch training (no ImageNet backbone), few steps.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, min(100, steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    order, history = torch.empty(0, dtype=torch.int64), []
    width = float(images.shape[-1])
    flip_sign, flip_shift = torch.tensor([-1.0, 1, -1, 1]), torch.tensor([width, 0, width, 0])
    bar = tqdm(range(steps), desc="detector", disable=not progress, **progress_options())
    for _ in bar:
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        index, order = order[:batch_size], order[batch_size:]
        batch, batch_boxes = images[index], [boxes[i] for i in index]  # indexing copies
        flips = torch.rand(len(index), generator=generator) < 0.5
        for j in range(len(index)):
            if augment and flips[j]:  # x → W − x, so xyxy becomes (W − x1, y0, W − x0, y1)
                batch[j] = batch[j].flip(-1)
                batch_boxes[j] = batch_boxes[j][:, [2, 1, 0, 3]] * flip_sign + flip_shift
        losses = model.losses(batch.to(device), [{"boxes": b.to(device)} for b in batch_boxes], generator)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        scheduler.step()
        history.append({k: v.item() for k, v in losses.items()})
        bar.set_postfix(loss=f"{total.item():.3f}", refresh=False)
    return history


def predict_all(model: FasterRCNN, images, batch_size: int = 8, device="cpu",
                progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """`model.predict` over many images (N, 1, H, W) in [0, 1], in batches → N dicts of CPU tensors."""
    images = _as_images(images)
    model.to(device)
    results = []
    for start in tqdm(range(0, len(images), batch_size), desc="detect", disable=not progress,
                      **progress_options()):
        for r in model.predict(images[start:start + batch_size].to(device)):
            results.append({k: v.cpu() for k, v in r.items()})
    return results
