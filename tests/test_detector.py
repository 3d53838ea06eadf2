"""Tests of the compact Faster R-CNN (nodule_diffusion/detector.py).

Ops are checked against torchvision.ops (an oracle, skipped when absent) and by hand-computed cases; the model is
checked for finite losses on negative and mixed batches, input validation, and by overfitting a handful of
synthetic images with bright blobs (AP@0.5 ≥ 0.9).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import oracle
from nodule_diffusion.data import DataError
from nodule_diffusion.detector import (DetectorConfig, FasterRCNN, box_iou, decode_boxes, encode_boxes,
                                       make_anchors, nms, predict_all, roi_align, train_detector)


def random_boxes(n: int, extent: float, max_size: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) xyxy boxes with top-left in [−0.2, 1.2]·extent (so some lie partly or fully outside)."""
    top_left = torch.rand(n, 2, generator=generator) * extent * 1.4 - 0.2 * extent
    return torch.cat([top_left, top_left + torch.rand(n, 2, generator=generator) * max_size], dim=1)


# ------------------------------------------------------------------------------------------------ box_iou, nms


def test_box_iou_hand_cases_and_zero_area():
    a = torch.tensor([[0.0, 0, 2, 2], [5, 5, 5, 5]])  # the second box has zero area
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [5, 5, 5, 5]])
    expected = torch.tensor([[1 / 7, 1.0, 0.0], [0.0, 0.0, 0.0]])  # overlap 1, union 4 + 4 − 1 = 7
    assert torch.allclose(box_iou(a, b), expected)
    assert box_iou(a, b[:0]).shape == (2, 0)


def test_box_iou_matches_torchvision():
    ops = oracle("torchvision.ops", reason="torchvision is the oracle")
    g = torch.Generator().manual_seed(0)
    a, b = random_boxes(40, 100, 30, g), random_boxes(30, 100, 30, g)
    b[:5, 2:] = b[:5, :2]  # zero-area boxes: torchvision gives NaN only where the union is 0 as well
    assert torch.allclose(box_iou(a, b), ops.box_iou(a, b).nan_to_num(0.0), atol=1e-6)


def test_nms_hand_case_strict_threshold_and_ties():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 20], [50, 50, 60, 60]])
    scores = torch.tensor([0.5, 0.5, 0.9, 0.5])
    # box 2 (0.9) first; boxes 0, 1 have IoU 0.5 with it: kept at threshold 0.5 (strict >), dropped at 0.4.
    assert nms(boxes, scores, 0.5).tolist() == [2, 0, 3]  # box 1 duplicates box 0 (IoU 1); ties in index order
    assert nms(boxes, scores, 0.4).tolist() == [2, 3]
    assert nms(boxes, scores, 1.0).tolist() == [2, 0, 1, 3]
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.dtype == torch.int64 and empty.shape == (0,)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_torchvision(threshold):
    ops = oracle("torchvision.ops", reason="torchvision is the oracle")
    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 17, 200):
        boxes = random_boxes(n, 100, 40, g)
        scores = torch.randint(0, 5, (n,), generator=g).float()  # many ties
        if n > 1:
            boxes[n // 2:] = boxes[: n - n // 2].clone()  # exact duplicates
        keep = nms(boxes, scores, threshold)
        assert keep.dtype == torch.int64
        assert torch.equal(keep, ops.nms(boxes, scores, threshold))


# ---------------------------------------------------------------------------------------------- box coding


def test_encode_decode_round_trip_and_paper_formula():
    g = torch.Generator().manual_seed(2)
    anchors, boxes = random_boxes(50, 200, 60, g), random_boxes(50, 200, 60, g)
    anchors[:, 2:] += 1.0  # no zero-size anchor
    boxes[:, 2:] += 1.0
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        deltas = encode_boxes(boxes, anchors, weights)
        assert torch.allclose(decode_boxes(deltas, anchors, weights), boxes, atol=1e-3)
    # [FRCNN Eq. 2] by hand: anchor centre (5, 5) size 10; box centre (7, 5) width 20, height 5.
    t = encode_boxes(torch.tensor([[-3.0, 2.5, 17, 7.5]]), torch.tensor([[0.0, 0, 10, 10]]), (1, 1, 1, 1))
    assert torch.allclose(t, torch.tensor([[0.2, 0.0, math.log(2.0), math.log(0.5)]]))
    # huge tw/th are clamped at log(1000/16): the decoded width is at most 62.5 × the anchor's
    big = decode_boxes(torch.tensor([[0.0, 0, 100, 100]]), torch.tensor([[0.0, 0, 10, 10]]), (1, 1, 1, 1))
    assert torch.isfinite(big).all() and torch.allclose(big[0, 2] - big[0, 0], torch.tensor(625.0))


def test_anchors_cover_the_grid_with_the_requested_sizes():
    anchors = make_anchors((4, 5), 8, (8.0, 16.0), (0.5, 1.0, 2.0), "cpu")
    assert anchors.shape == (4 * 5 * 6, 4)
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    assert torch.allclose((w * h).sqrt()[:6], torch.tensor([8.0, 16, 8, 16, 8, 16]))  # area s², ratio-major
    assert torch.allclose((h / w)[:6], torch.tensor([0.5, 0.5, 1, 1, 2, 2]))
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert torch.allclose(centres[0], torch.tensor([4.0, 4.0]))  # cell (0, 0) centre
    assert torch.allclose(centres[-1], torch.tensor([36.0, 28.0]))  # cell (y=3, x=4)


# ------------------------------------------------------------------------------------------------- roi_align


def test_roi_align_hand_case():
    # a linear ramp f(y, x) = x is reproduced exactly by bilinear sampling away from the borders
    features = torch.arange(8.0).repeat(8, 1)[None, None]  # (1, 1, 8, 8)
    out = roi_align(features, torch.tensor([[0.0, 1, 1, 5, 5]]), 2, 1.0, 2, aligned=False)
    assert torch.allclose(out[0, 0], torch.tensor([[2.0, 4.0], [2.0, 4.0]]))  # bin centres at x = 2, 4
    out = roi_align(features, torch.tensor([[0.0, 1, 1, 5, 5]]), 2, 1.0, 2, aligned=True)
    assert torch.allclose(out[0, 0], torch.tensor([[1.5, 3.5], [1.5, 3.5]]))  # half-pixel shift
    assert roi_align(features, torch.zeros(0, 5), (3, 2), 1.0, 2).shape == (0, 1, 3, 2)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
def test_roi_align_matches_torchvision(aligned, sampling_ratio):
    ops = oracle("torchvision.ops", reason="torchvision is the oracle")
    g = torch.Generator().manual_seed(3)
    for H, W, scale in ((7, 11, 1.0), (16, 16, 0.5), (5, 3, 0.25), (32, 32, 0.125)):
        features = torch.randn(3, 4, H, W, generator=g)
        extent = max(H, W) / scale
        boxes = random_boxes(40, extent, 0.8 * extent, g)  # partly and fully outside, varied sizes
        boxes[:5, 2:] = boxes[:5, :2] + 0.01  # near-empty
        boxes[5:8, 2:] = boxes[5:8, :2] - 2.0  # inverted (x1 < x0): clamped (aligned=False) or empty
        rois = torch.cat([torch.randint(0, 3, (40, 1), generator=g).float(), boxes], dim=1)
        for output_size in (1, 7, (2, 5)):
            ours = roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
            reference = ops.roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
            assert ours.shape == reference.shape
            assert torch.allclose(ours, reference, atol=1e-5), (H, W, scale, output_size)


def test_roi_align_gradient_gradcheck_and_torchvision():
    features = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 5.1], [1, -1.5, 2.0, 3.0, 7.5], [1, 2.2, 1.1, 2.9, 2.0]],
                        dtype=torch.float64)
    for aligned in (False, True):
        assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, (3, 2), 1.0, 0, aligned), (features,))
    ops = oracle("torchvision.ops", reason="torchvision is the oracle")
    weights = torch.randn(3, 2, 3, 2, dtype=torch.float64)
    ours = torch.autograd.grad((roi_align(features, rois, (3, 2), 1.0, 2) * weights).sum(), features)[0]
    reference = torch.autograd.grad((ops.roi_align(features, rois, (3, 2), 1.0, 2) * weights).sum(), features)[0]
    assert torch.allclose(ours, reference, atol=1e-10)


# --------------------------------------------------------------------------------------------------- the model


def tiny_config(**overrides) -> DetectorConfig:
    """A small detector for 128×128 test images (the defaults are for 256×256 CXRs)."""
    fields = dict(widths=(8, 16, 32), representation_size=128, rpn_batch_per_image=128, roi_batch_per_image=64,
                  rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=300,
                  rpn_post_nms_top_n_test=100, score_thresh=0.01)
    return DetectorConfig(**{**fields, **overrides})


def blob_images(n: int, size: int = 128, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """n noisy images with (i mod 3) bright Gaussian blobs each, radius 5–10 px; box = centre ± radius."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images, targets = [], []
    for i in range(n):
        image = 0.3 + 0.05 * torch.randn(size, size, generator=g)
        boxes = []
        for _ in range(i % 3):
            r = 5 + 5 * torch.rand(1, generator=g).item()
            cx, cy = (r + 4 + (size - 2 * r - 8) * torch.rand(2, generator=g)).tolist()
            image += 0.5 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 2) ** 2))
            boxes.append([cx - r, cy - r, cx + r, cy + r])
        images.append(image.clamp(0, 1))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)})
    return torch.stack(images)[:, None], targets  # (n, 1, size, size)


def test_config_round_trip_and_unknown_field():
    config = tiny_config(fpn=True, aspect_ratios=(0.5, 1.0, 2.0))
    assert DetectorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(DataError, match="unknown"):
        DetectorConfig.from_dict({"widthz": [1]})


@pytest.mark.parametrize("fpn", [False, True])
def test_losses_finite_on_negative_and_mixed_batches(fpn):
    torch.manual_seed(0)
    model = FasterRCNN(tiny_config(fpn=fpn, strides=(2, 2, 2) if fpn else (2, 2, 1)))
    assert model.backbone.stride == (4 if fpn else 8)
    images, targets = blob_images(3)  # image 0 has no blob, 1 has one, 2 has two
    assert targets[0]["boxes"].shape == (0, 4)
    for batch in ([0], [0, 0], [0, 1, 2]):
        losses = model.losses(images[batch], [targets[i] for i in batch])
        assert set(losses) == {"rpn_objectness", "rpn_box", "roi_cls", "roi_box"}
        assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
        if batch == [0]:  # no positives anywhere: the box losses are exactly 0
            assert losses["rpn_box"] == 0 and losses["roi_box"] == 0
        model.zero_grad()
        sum(losses.values()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_invalid_targets_raise_data_error():
    model = FasterRCNN(tiny_config())
    images = torch.rand(2, 1, 64, 64)
    good = {"boxes": torch.tensor([[1.0, 1, 9, 9]])}
    for bad, message in (([[5.0, 5, 5, 9]], "degenerate"), ([[5.0, 9, 9, 2]], "degenerate"),
                         ([[0.0, 0, math.nan, 4]], "non-finite"), ([[1.0, 2, 3]], r"\(N, 4\)")):
        with pytest.raises(DataError, match=message):
            model.losses(images, [good, {"boxes": torch.tensor(bad)}])
    with pytest.raises(DataError, match="2 images"):
        model.losses(images, [good])


def test_predict_contract_and_mode_independence():
    torch.manual_seed(0)
    model = FasterRCNN(tiny_config(score_thresh=0.0, detections_per_img=7))
    images, _ = blob_images(3, size=96)
    out = model.predict(images)
    assert len(out) == 3
    for r in out:
        assert r["boxes"].shape[1] == 4 and len(r["boxes"]) == len(r["scores"]) <= 7
        assert (r["boxes"] >= 0).all() and (r["boxes"] <= 96).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
    model.eval()  # no BatchNorm or dropout: eval() changes nothing
    again = model.predict(images)
    assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(out, again))


def test_overfits_a_few_blob_images():
    metrics = oracle("nodule_diffusion.metrics", reason="AP is computed by metrics.py")
    images, targets = blob_images(6)  # 2 images without nodules, 6 nodules
    torch.manual_seed(0)
    model = FasterRCNN(tiny_config())
    history = train_detector(model, images, targets, steps=120, batch_size=3, lr=3e-3, seed=0, progress=False)
    assert len(history) == 120 and all(math.isfinite(v) for v in history[-1].values())
    first, last = sum(history[0].values()), sum(sum(h.values()) for h in history[-10:]) / 10
    assert last < 0.25 * first
    predictions = predict_all(model, images, batch_size=4)
    ap = metrics.average_precision([t["boxes"] for t in targets], [p["boxes"] for p in predictions],
                                   [p["scores"] for p in predictions], iou_threshold=0.5)
    assert ap >= 0.9, ap
