"""Tests for nodule_diffusion.metrics: hand-computed toy cases, brute-force and library oracles."""

import math

import numpy as np
import pytest
import torch

from conftest import oracle
from nodule_diffusion import metrics

# ------------------------------------------------------------------------------------------ helpers


def random_scene(rng, n_images=12, p_negative=0.3, p_no_det=0.15):
    """Per-image lists: GT boxes, detections (jittered GT copies + random FPs) and scores.

    Some images have no GT and some have no detections, so both edge cases are always exercised.
    """
    gt, boxes, scores = [], [], []
    for i in range(n_images):
        n_gt = 0 if (rng.random() < p_negative or i == 0) else int(rng.integers(1, 4))
        xy = rng.uniform(0, 200, size=(n_gt, 2))
        wh = rng.uniform(8, 40, size=(n_gt, 2))
        g = np.concatenate([xy, xy + wh], axis=1)
        dets = [g[j] + rng.normal(0, rng.uniform(0.02, 0.3) * wh[j].mean(), size=4) for j in range(n_gt) for _ in
                range(int(rng.integers(0, 3)))]  # 0–2 jittered copies per GT: hits, misses and duplicates
        for _ in range(int(rng.integers(0, 4))):  # random false positives
            p, s = rng.uniform(0, 200, size=2), rng.uniform(8, 40, size=2)
            dets.append(np.concatenate([p, p + s]))
        d = np.array(dets).reshape(-1, 4)
        d[:, 2:] = np.maximum(d[:, 2:], d[:, :2] + 1.0)  # keep boxes well-formed after jitter
        if rng.random() < p_no_det and i != 1:
            d = np.zeros((0, 4))
        gt.append(g)
        boxes.append(d)
        scores.append(rng.random(len(d)))
    return gt, boxes, scores


# ---------------------------------------------------------------------------------------------- AUC


def test_roc_auc_matches_sklearn_with_ties():
    sklearn_metrics = oracle("sklearn.metrics", reason="scikit-learn is the AUC oracle")
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 200))
        labels = rng.integers(0, 2, size=n)
        labels[:2] = [0, 1]  # both classes present
        scores = np.round(rng.random(n) + 0.3 * labels, 1)  # rounding creates many ties
        expected = sklearn_metrics.roc_auc_score(labels, scores)
        assert metrics.roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    # torch tensors are accepted too
    assert metrics.roc_auc(torch.tensor(labels), torch.tensor(scores)) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_hand_cases():
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert metrics.roc_auc([0, 1], [0.5, 0.5]) == 0.5  # a tied pair counts one half
    # pairs (pos, neg): (0.8, 0.2) win, (0.8, 0.8) half, (0.4, 0.2) win, (0.4, 0.8) loss → 2.5 / 4
    assert metrics.roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.2, 0.8]) == 0.625


def test_roc_auc_one_class_raises():
    with pytest.raises(ValueError, match="one class"):
        metrics.roc_auc([1, 1, 1], [0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="one class"):
        metrics.roc_auc(np.zeros(4), np.arange(4.0))


# ---------------------------------------------------------------------------------------------- IoU


def test_box_iou_np_known_values_and_degenerate():
    a = np.array([[0, 0, 10, 10], [5, 5, 5, 5]], dtype=float)
    b = np.array([[0, 0, 10, 5], [20, 20, 30, 30], [5, 5, 5, 5]], dtype=float)
    iou = metrics.box_iou_np(a, b)
    np.testing.assert_allclose(iou, [[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert metrics.box_iou_np(np.zeros((0, 4)), b).shape == (0, 3)


def test_box_iou_np_matches_torchvision():
    ops = oracle("torchvision.ops", reason="torchvision is the IoU oracle")
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 50, size=(30, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, size=(30, 2))], axis=1)
    expected = ops.box_iou(torch.tensor(boxes[:12]), torch.tensor(boxes[12:])).numpy()
    np.testing.assert_allclose(metrics.box_iou_np(boxes[:12], boxes[12:]), expected, atol=1e-12)


# --------------------------------------------------------------------------------------------- FROC


def toy_froc_scene():
    """Hand-built: 2 nodules, 3 images (one negative). Curve worked out in the test below."""
    gt = [np.array([[10, 10, 20, 20]]), np.array([[30, 30, 40, 40]]), np.zeros((0, 4))]
    boxes = [np.array([[10, 10, 20, 20], [11, 11, 21, 21], [50, 50, 60, 60]]),  # TP, duplicate on A, FP
             np.array([[30, 30, 40, 40], [0, 0, 5, 5]]),  # TP, FP
             np.array([[70, 70, 80, 80]])]  # FP on the negative image
    scores = [np.array([0.9, 0.8, 0.7]), np.array([0.6, 0.5]), np.array([0.95])]
    return gt, boxes, scores


def test_froc_hand_computed():
    result = metrics.froc(*toy_froc_scene())
    # τ:      inf  0.95  0.9  0.7  0.6  0.5   (0.8 is the duplicate: dropped, defines no point)
    # FP:     0    1     1    2    2    3     → / 3 images (the negative counts)
    # found:  0    0     1    1    2    2     → / 2 nodules
    np.testing.assert_allclose(result["curve_thresholds"], [np.inf, 0.95, 0.9, 0.7, 0.6, 0.5])
    np.testing.assert_allclose(result["curve_fp_per_image"], np.array([0, 1, 1, 2, 2, 3]) / 3)
    np.testing.assert_allclose(result["curve_sensitivity"], [0, 0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(result["sensitivity"], [0, 0, 0.5, 1, 1, 1, 1])
    assert result["n_images"] == 3 and result["n_nodules"] == 2
    assert metrics.cpm(*toy_froc_scene()) == pytest.approx(4.5 / 7)


def test_froc_counts_false_positives_over_all_images():
    gt, boxes, scores = toy_froc_scene()
    # One more negative image without detections: FP/image becomes FP/4, so 1 FP fits under 0.25 FP/image.
    result = metrics.froc(gt + [np.zeros((0, 4))], boxes + [np.zeros((0, 4))], scores + [np.zeros(0)])
    np.testing.assert_allclose(result["curve_fp_per_image"], np.array([0, 1, 1, 2, 2, 3]) / 4)
    np.testing.assert_allclose(result["sensitivity"], [0, 0.5, 1, 1, 1, 1, 1])


def test_froc_hit_rule_is_strict_iou_greater_than_threshold():
    gt = [np.array([[0.0, 0.0, 10.0, 10.0]])]
    boxes = [np.array([[0.0, 0.0, 10.0, 2.0]])]  # IoU = 20 / 100 = 0.2 exactly
    scores = [np.array([0.9])]
    strict = metrics.froc(gt, boxes, scores, fp_rates=(8.0,), iou_threshold=0.2)
    assert strict["sensitivity"][0] == 0.0 and strict["curve_fp_per_image"][-1] == 1.0  # a FP, not a hit
    loose = metrics.froc(gt, boxes, scores, fp_rates=(8.0,), iou_threshold=0.19)
    assert loose["sensitivity"][0] == 1.0 and loose["curve_fp_per_image"][-1] == 0.0


def brute_force_froc_point(gt, boxes, scores, tau, iou_threshold=0.2):
    """Independent per-threshold count: keep dets with score ≥ τ, count found nodules and unmatched dets."""
    found = fps = 0
    for g, d, s in zip(gt, boxes, scores):
        kept = d[s >= tau]
        for gt_box in g:
            found += any(metrics.box_iou_np(gt_box[None], k[None])[0, 0] > iou_threshold for k in kept)
        for k in kept:
            fps += not any(metrics.box_iou_np(gt_box[None], k[None])[0, 0] > iou_threshold for gt_box in g)
    return found, fps


def test_froc_curve_matches_brute_force_on_random_scenes():
    rng = np.random.default_rng(2)
    for _ in range(5):
        gt, boxes, scores = random_scene(rng)
        result = metrics.froc(gt, boxes, scores)
        n_nodules, n_images = sum(len(g) for g in gt), len(gt)
        for tau, fp_rate, sens in zip(result["curve_thresholds"], result["curve_fp_per_image"],
                                      result["curve_sensitivity"]):
            found, fps = brute_force_froc_point(gt, boxes, scores, tau)
            assert sens == pytest.approx(found / n_nodules) and fp_rate == pytest.approx(fps / n_images)
        assert np.all(np.diff(result["sensitivity"]) >= 0)  # more FP allowed never lowers sensitivity
        assert metrics.cpm(gt, boxes, scores) == pytest.approx(result["sensitivity"].mean())


def test_froc_without_nodules_is_nan():
    result = metrics.froc([np.zeros((0, 4))], [np.array([[0, 0, 5, 5]])], [np.array([0.5])])
    assert np.all(np.isnan(result["sensitivity"]))


# ----------------------------------------------------------------------------------------------- AP


def test_average_precision_hand_computed():
    g1, g2, g3 = [0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]
    gt = [np.array([g1, g2], float), np.array([g3], float), np.zeros((0, 4))]
    boxes = [np.array([g1, [1, 1, 11, 11]], float), np.array([g3], float), np.array([[80, 80, 90, 90]], float)]
    scores = [np.array([0.9, 0.6]), np.array([0.7]), np.array([0.8])]
    # pooled order 0.9 TP(g1), 0.8 FP, 0.7 TP(g3), 0.6 FP (g1 already matched); g2 never found.
    # recall 1/3, 1/3, 2/3, 2/3; monotone precision 1, 2/3, 2/3, 1/2
    # 101-point: recall 0..0.33 → 1 (34 points), 0.34..0.66 → 2/3 (33 points), 0.67..1 → 0
    expected = (34 * 1.0 + 33 * 2.0 / 3.0) / 101
    assert metrics.average_precision(gt, boxes, scores) == pytest.approx(expected)


def test_average_precision_edge_cases():
    gt = [np.array([[0.0, 0.0, 10.0, 10.0]])]
    half = [np.array([[0.0, 0.0, 10.0, 5.0]])]  # IoU = 0.5 exactly: a match at IoU ≥ 0.5
    assert metrics.average_precision(gt, half, [np.array([0.3])]) == 1.0
    assert metrics.average_precision(gt, half, [np.array([0.3])], iou_threshold=0.51) == 0.0
    assert metrics.average_precision(gt, [np.zeros((0, 4))], [np.zeros(0)]) == 0.0  # GT but no detections
    assert math.isnan(metrics.average_precision([np.zeros((0, 4))], half, [np.array([0.3])]))  # no GT at all


def coco_ap50(gt, boxes, scores):
    """AP@0.5 from pycocotools COCOeval: single category, area 'all', large maxDets."""
    coco_mod = oracle("pycocotools.coco", reason="pycocotools is the AP oracle")
    cocoeval_mod = oracle("pycocotools.cocoeval", reason="pycocotools is the AP oracle")

    def xywh(b):
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    annotations = []
    for i, g in enumerate(gt):
        for b in g:
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 1, "bbox": xywh(b),
                                "iscrowd": 0, "area": float((b[2] - b[0]) * (b[3] - b[1]))})
    coco_gt = coco_mod.COCO()
    coco_gt.dataset = {"images": [{"id": i, "width": 256, "height": 256} for i in range(len(gt))],
                       "annotations": annotations, "categories": [{"id": 1, "name": "nodule"}]}
    coco_gt.createIndex()
    results = [{"image_id": i, "category_id": 1, "bbox": xywh(b), "score": float(s)}
               for i, (d, sc) in enumerate(zip(boxes, scores)) for b, s in zip(d, sc)]
    evaluator = cocoeval_mod.COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    evaluator.params.iouThrs = np.array([0.5])
    evaluator.params.areaRng, evaluator.params.areaRngLbl = [[0, 1e10]], ["all"]
    evaluator.params.maxDets = [10000]
    evaluator.evaluate()
    evaluator.accumulate()
    precision = evaluator.eval["precision"][0, :, 0, 0, 0]  # (101,) at IoU 0.5, class 1, area all
    return float(np.mean(precision[precision > -1]))


def test_average_precision_matches_pycocotools():
    oracle("pycocotools", reason="pycocotools is the AP oracle")
    rng = np.random.default_rng(3)
    for _ in range(6):
        gt, boxes, scores = random_scene(rng, n_images=10)
        assert any(len(g) == 0 for g in gt) and any(len(d) == 0 for d in boxes)
        expected = coco_ap50(gt, boxes, scores)
        assert metrics.average_precision(gt, boxes, scores) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------- NODE21 summary


def test_image_scores_and_node21():
    np.testing.assert_allclose(metrics.image_scores([[0.1, 0.5], [], torch.tensor([0.3])]), [0.5, 0.0, 0.3])
    assert metrics.node21_score(0.8, 0.4) == pytest.approx(0.75 * 0.8 + 0.25 * 0.4)


def test_detection_report():
    gt, boxes, scores = toy_froc_scene()
    report = metrics.detection_report(gt, boxes, scores)
    # image scores 0.9, 0.6 (positives) and 0.95 (negative): each positive loses to the negative → AUC 0
    assert report["auc"] == 0.0
    assert report["sens@0.25"] == 0.0 and report["sens@1"] == 1.0
    assert report["cpm"] == pytest.approx(4.5 / 7)
    assert report["node21"] == pytest.approx(0.75 * report["auc"] + 0.25 * report["sens@0.25"])
    assert report["ap50"] == pytest.approx(metrics.average_precision(gt, boxes, scores))
    negatives_only = metrics.detection_report([np.zeros((0, 4))] * 2, boxes[:2], scores[:2])
    assert math.isnan(negatives_only["auc"]) and math.isnan(negatives_only["node21"])


# ------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, size=60)
    scores = rng.random(60) + 0.5 * labels

    def auc(idx):
        return metrics.roc_auc(labels[idx], scores[idx])

    first = metrics.bootstrap_ci(auc, 60, n_boot=200, seed=7)
    assert first["low"] <= first["estimate"] <= first["high"]
    assert first["estimate"] == pytest.approx(metrics.roc_auc(labels, scores))
    assert first == metrics.bootstrap_ci(auc, 60, n_boot=200, seed=7)
    assert first != metrics.bootstrap_ci(auc, 60, n_boot=200, seed=8)


def test_bootstrap_skips_undefined_resamples():
    labels, scores = np.array([1, 0, 0, 0, 0, 0]), np.linspace(0, 1, 6)
    result = metrics.bootstrap_ci(lambda idx: metrics.roc_auc(labels[idx], scores[idx]), 6, n_boot=100)
    assert result["n_skipped"] > 0  # resamples without the single positive have no AUC
    assert result["n_valid"] + result["n_skipped"] == 100


def test_paired_bootstrap_diff():
    rng = np.random.default_rng(5)
    values = rng.random(40)

    def mean_a(idx):
        return values[idx].mean() + 0.1

    def mean_b(idx):
        return values[idx].mean()

    result = metrics.paired_bootstrap_diff(mean_a, mean_b, 40, n_boot=100)
    # pairing removes the image-to-image variation entirely: every resample differs by exactly 0.1
    assert result["low"] == pytest.approx(0.1) and result["high"] == pytest.approx(0.1)
    assert result["estimate"] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_scipy_sqrtm_formula():
    linalg = oracle("scipy.linalg", reason="scipy.linalg.sqrtm is the FD oracle")
    rng = np.random.default_rng(6)
    a = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8)) + 0.5
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b - 2 * covmean)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert metrics.frechet_distance(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_known_values():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(100, 5))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    # a shifted copy has the identical covariance, so FD = ‖shift‖² exactly
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-9)
    # 1-D Gaussians: FD = (μ_a − μ_b)² + (σ_a − σ_b)² with sample std (ddof = 1)
    x, y = rng.normal(1.0, 2.0, size=300), rng.normal(-1.0, 0.5, size=200)
    expected = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert metrics.frechet_distance(x[:, None], y[:, None]) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_few_samples_warns_but_is_finite():
    rng = np.random.default_rng(8)
    with pytest.warns(RuntimeWarning, match="singular"):
        fd = metrics.frechet_distance(rng.normal(size=(10, 32)), rng.normal(size=(12, 32)))
    assert math.isfinite(fd) and fd >= 0
    with pytest.raises(ValueError):
        metrics.frechet_distance(rng.normal(size=(10, 3)), rng.normal(size=(10, 4)))


# ---------------------------------------------------------------------------------------------- Dice


def test_dice_edge_cases():
    empty = np.zeros((4, 4), bool)
    a = np.zeros((4, 4), bool)
    a[0, :] = True  # 4 pixels
    b = np.zeros((4, 4), bool)
    b[0, :2] = b[1, :2] = True  # 4 pixels, 2 shared with a
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.dice(a, empty) == 0.0
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, b) == 0.5
    assert metrics.dice(torch.tensor(a, dtype=torch.uint8), torch.tensor(b)) == 0.5
    with pytest.raises(ValueError):
        metrics.dice(a, np.zeros((3, 3)))


def test_mean_abs_laplacian_analytic():
    ys, xs = np.mgrid[0:8, 0:8].astype(float)
    inner = np.zeros((1, 1, 8, 8))
    inner[..., 1:-1, 1:-1] = 1.0  # away from the zero padding
    assert metrics.mean_abs_laplacian((0.3 * xs + 0.1 * ys)[None, None], inner) == pytest.approx(0.0, abs=1e-12)
    checker = np.where((xs + ys) % 2 == 0, 1.0, -1.0)[None, None]  # each neighbour differs by 2: |∇²| = 8
    assert metrics.mean_abs_laplacian(checker, inner) == pytest.approx(8.0)
    quadratic = (xs ** 2)[None, None]  # ∇²(x²) = 2
    assert metrics.mean_abs_laplacian(torch.tensor(quadratic), torch.tensor(inner)) == pytest.approx(2.0)



def test_otsu_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    for values in (rng.normal(0, 1, 50), np.r_[rng.normal(0, 0.1, 40), rng.normal(3, 0.5, 15)],
                   rng.integers(0, 4, 30).astype(float)):
        v, distinct = np.sort(values), np.unique(values)
        best, best_t = -1.0, None
        for t in (distinct[:-1] + distinct[1:]) / 2:  # every threshold between two neighbouring distinct values
            low, high = v[v <= t], v[v > t]
            if len(low) and len(high):
                w0 = len(low) / len(v)
                between = w0 * (1 - w0) * (low.mean() - high.mean()) ** 2
                if between > best + 1e-12:
                    best, best_t = between, t
        assert metrics.otsu_threshold(values) == pytest.approx(best_t)
    assert metrics.otsu_threshold(np.r_[np.zeros(10), np.ones(5)]) == pytest.approx(0.5)  # two levels: midway
    assert metrics.otsu_threshold(np.full(5, 2.0)) == 2.0


def test_added_density_body_recovers_a_disc_and_ignores_calcium():
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    r = np.hypot(xs - 16, ys - 16)
    body = r <= 5
    region = r <= 10
    rng = np.random.default_rng(0)
    for added in (0.2 * body,                                # a flat disc
                  0.2 * body + 0.4 * (r <= 1.5),             # + bright central calcium (the max is 3× the body)
                  0.06 * body + 0.02 * rng.standard_normal(body.shape)):   # faint and noisy (ground glass)
        seg = metrics.added_density_body(np.maximum(added, 0), region)
        assert metrics.dice(seg, body) > 0.9
        assert not (seg & ~region).any()
    assert not metrics.added_density_body(np.zeros((8, 8)), np.zeros((8, 8), bool)).any()


def test_gaussian_blur_keeps_shape_and_mass():
    impulse = np.zeros((21, 21))
    impulse[10, 10] = 1.0
    blurred = metrics.gaussian_blur(impulse, 1.3)
    assert blurred.shape == impulse.shape and blurred.sum() == pytest.approx(1.0)  # far from the edges
    ys, xs = np.mgrid[0:21, 0:21] - 10
    assert (blurred * (xs ** 2)).sum() == pytest.approx(1.3 ** 2, rel=0.02)   # variance σ² along each axis
    assert metrics.gaussian_blur(np.ones((3, 3)), 1.3).shape == (3, 3)      # kernel wider than the array
    flat = np.full((9, 9), 0.5, np.float32)
    kept = metrics.gaussian_blur(flat, 1.3, "replicate")                    # phantom.py's detector blur
    assert kept.dtype == np.float32 and np.allclose(kept, 0.5)              # edges repeated: a flat field stays flat
    assert metrics.gaussian_blur(flat, 1.3)[0, 0] < 0.4                      # zero edge: nothing outside the array
