"""Evaluation metrics: image-level AUC, FROC / CPM, AP@0.5, NODE21 score, bootstrap CIs, Fréchet distance, Dice.

Every function is pure, accepts numpy arrays or torch tensors, computes in float64 numpy, and pins its
protocol in its docstring (design §4 "Evaluation", notes/formats.md §3). Detection inputs are per-image lists
of equal length I (one entry per image, negatives included):
    gt_boxes[i]   (G_i, 4) float xyxy, absolute pixels; (0, 4) for an image without nodule
    det_boxes[i]  (N_i, 4) float xyxy, absolute pixels; (0, 4) when nothing was detected
    det_scores[i] (N_i,)   float confidence, higher = more likely a nodule

Implements
    roc_auc              Mann–Whitney U statistic with average ranks for ties [MW47]
    box_iou_np           pairwise IoU of xyxy boxes (zero-area pairs give 0); a numpy twin of detector.box_iou,
                         kept here so metrics never import the detector
    froc, cpm            FROC sensitivities at 1/8 … 8 FP/image and their mean, the Competition Performance
                         Metric [LUNA16] with the NODE21 hit rule IoU > 0.2 [NODE21]
    average_precision    single-class COCO AP at one IoU threshold, 101-point interpolation [COCO]
    image_scores, node21_score, detection_report
    bootstrap_ci, paired_bootstrap_diff   percentile bootstrap over images [EFRON93]
    frechet_distance     Fréchet distance between Gaussians fitted to two feature sets [FID]
    dice                 Dice overlap of two masks
    otsu_threshold       the threshold that maximises the between-class variance of two classes [OTSU79]
    added_density_body   the body of a nodule from the density it added: smoothed, then its half-level contour
    mean_abs_laplacian   mean |∇²x| over a region: high-frequency content (speckle), compared with real crops

Papers / protocols
    [MW47]   Mann & Whitney 1947; AUC = U / (n_pos·n_neg) (Hanley & McNeil 1982)
    [LUNA16] Setio et al. 2017, arXiv:1612.08012, §"Evaluation" (CPM = mean sensitivity at 7 FP rates)
    [NODE21] Sogancioglu et al. 2024, NODE21 challenge: score = 0.75·AUC + 0.25·sens@0.25 FP/image
    [COCO]   Lin et al. 2014, arXiv:1405.0312; protocol as in pycocotools COCOeval (checked, formats.md §3)
    [EFRON93] Efron & Tibshirani, An Introduction to the Bootstrap, 1993, ch. 13 (percentile interval)
    [OTSU79] Otsu 1979, IEEE Trans. SMC 9(1), Eq. 18: σ_B²(k) = ω0·ω1·(μ1 − μ0)²
    [FID]    Heusel et al. 2017, arXiv:1706.08500, Eq. for d²((m,C),(m_w,C_w)); Dowson & Landau 1982

Deviations
    DEVIATION (FROC): hit = IoU > threshold (NODE21 participant code), not LUNA16's distance-to-centre rule.
        A nodule counts once, with the score of the highest-scoring detection hitting it; further detections
        on an already-found nodule are dropped (neither TP nor FP), the convention of NODE21 participants
        (one team counted them as FP instead). A detection overlapping two nodules can find both (as LUNA16).
    DEVIATION (FROC): sensitivity at a FP rate is read off the step curve (most permissive threshold whose
        FP/image ≤ rate); LUNA16's script interpolates on a fine grid. No interpolation means no invention.
    DEVIATION (AP): no maxDets truncation (COCO keeps the top 100 per image) and no area ranges ('all').
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nodule_diffusion.common import progress_options

# Dimension letters: I images, G ground-truth boxes, N detections, D feature dimension.

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # FP/image [LUNA16]


def _np(x, dtype=np.float64) -> np.ndarray:
    """numpy array of `dtype` from a numpy array, torch tensor (any device) or sequence."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _boxes(x) -> np.ndarray:
    """(N, 4) float64 boxes; an empty input of any shape becomes (0, 4)."""
    b = _np(x)
    if b.size == 0:
        return np.zeros((0, 4))
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {b.shape}")
    return b


def _per_image(gt_boxes, det_boxes, det_scores) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Validate the three per-image lists and convert them to [(gt (G,4), boxes (N,4), scores (N,))]."""
    if not (len(gt_boxes) == len(det_boxes) == len(det_scores)):
        raise ValueError(f"per-image lists differ in length: {len(gt_boxes)}, {len(det_boxes)}, {len(det_scores)}")
    if len(gt_boxes) == 0:
        raise ValueError("no images to evaluate")
    images = []
    for i, (gt, boxes, scores) in enumerate(zip(gt_boxes, det_boxes, det_scores)):
        boxes, scores = _boxes(boxes), _np(scores).reshape(-1)  # (N, 4), (N,)
        if len(boxes) != len(scores):
            raise ValueError(f"image {i}: {len(boxes)} detection boxes but {len(scores)} scores")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"image {i}: non-finite detection score")
        images.append((_boxes(gt), boxes, scores))
    return images


# ---------------------------------------------------------------------------------------------- AUC / IoU


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x; tied values all get the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last member of each tie group
    first = last - counts + 1
    return ((first + last) / 2.0)[inverse]


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve, via the Mann–Whitney U statistic [MW47].

    labels: (I,) 0/1 or bool (1 = positive, e.g. image contains a nodule); scores: (I,) float, higher = more
    positive. Ties get average ranks, so a tied positive/negative pair counts ½ (same as the trapezoidal ROC).
    AUC = (Σ rank(positives) − n_pos·(n_pos+1)/2) / (n_pos·n_neg), in [0, 1].
    Raises ValueError when only one class is present (AUC undefined) or scores are not finite.
    """
    y, s = _np(labels).reshape(-1), _np(scores).reshape(-1)  # (I,), (I,)
    if len(y) != len(s):
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise ValueError("labels must be 0/1")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    positive = y == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC is undefined with one class only ({n_pos} positive, {n_neg} negative)")
    ranks = _average_ranks(s)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0  # [MW47] U of the positives
    return float(u / (n_pos * n_neg))


def box_iou_np(a, b) -> np.ndarray:
    """Pairwise IoU (G, N) float64 of xyxy boxes a (G, 4) and b (N, 4), absolute pixels.

    Area = (x1 − x0)·(y1 − y0), no +1 (continuous coordinates, as COCO / torchvision). A pair whose union
    has zero area (two degenerate boxes) gives 0 instead of 0/0.
    """
    a, b = _boxes(a), _boxes(b)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])  # (G,)
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # (N,)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])  # (G, N, 2)
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (G, N, 2)
    wh = np.clip(bottom_right - top_left, 0.0, None)  # (G, N, 2)
    inter = wh[..., 0] * wh[..., 1]  # (G, N)
    union = area_a[:, None] + area_b[None, :] - inter  # (G, N)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


# ------------------------------------------------------------------------------------------------- FROC


def _froc_hits(images, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per nodule: score of the best detection hitting it (−inf if none); and the scores of all FPs.

    A detection hits a nodule when IoU > iou_threshold (strict, NODE21). A detection hitting no nodule is a
    FP. A detection hitting a nodule that a higher-scoring detection also hits is dropped (see DEVIATION).
    """
    nodule_scores, fp_scores = [], []
    for gt, boxes, scores in images:
        hits = box_iou_np(gt, boxes) > iou_threshold  # (G, N)
        best = np.where(hits, scores[None, :], -np.inf)  # (G, N)
        nodule_scores.append(best.max(axis=1) if len(boxes) else np.full(len(gt), -np.inf))
        fp_scores.append(scores[~hits.any(axis=0)])
    return np.concatenate(nodule_scores), np.concatenate(fp_scores)


def froc(gt_boxes, det_boxes, det_scores, fp_rates: Sequence[float] = FROC_FP_RATES,
         iou_threshold: float = 0.2) -> dict:
    """Free-response ROC over a set of images [LUNA16] with the NODE21 hit rule.

    Protocol: for each score threshold τ (every distinct score, plus τ = +∞ giving the point (0, 0)), keep the
    detections with score ≥ τ. Sensitivity = found nodules / all nodules; FP rate = false positives / I, where I
    counts ALL images, negatives (no nodule) included. Hit = IoU > iou_threshold (strict); one hit per nodule
    (the highest-scoring detection hitting it), further detections on a found nodule are dropped, not FP.
    The sensitivity at rate r is that of the most permissive threshold whose FP/image ≤ r (step curve).

    Returns a dict of float64 arrays / numbers:
        fp_rates (R,), sensitivity (R,) at those rates (NaN when there is no nodule at all),
        curve_fp_per_image (T,), curve_sensitivity (T,), curve_thresholds (T,) (descending, first = +inf),
        n_images, n_nodules.
    """
    images = _per_image(gt_boxes, det_boxes, det_scores)
    nodule_scores, fp_scores = _froc_hits(images, iou_threshold)
    n_images, n_nodules = len(images), len(nodule_scores)
    found = nodule_scores[np.isfinite(nodule_scores)]
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([found, fp_scores]))[::-1]])  # (T,)
    # Count how many scores are ≥ τ for every τ: with an ascending sort, n − searchsorted(side="left").
    n_found = len(found) - np.searchsorted(np.sort(found), thresholds, side="left")  # (T,)
    n_fp = len(fp_scores) - np.searchsorted(np.sort(fp_scores), thresholds, side="left")  # (T,)
    sensitivity_curve = n_found / n_nodules if n_nodules else np.full(len(thresholds), np.nan)
    fp_curve = n_fp / n_images
    rates = np.asarray(fp_rates, dtype=np.float64)
    # fp_curve is non-decreasing as τ falls; the last index with FP ≤ r is the most permissive admissible τ.
    last_ok = np.searchsorted(fp_curve, rates, side="right") - 1  # (R,), ≥ 0 thanks to the (0, 0) point
    return {
        "fp_rates": rates,
        "sensitivity": sensitivity_curve[last_ok],
        "curve_fp_per_image": fp_curve,
        "curve_sensitivity": sensitivity_curve,
        "curve_thresholds": thresholds,
        "n_images": n_images,
        "n_nodules": n_nodules,
    }


def cpm(gt_boxes, det_boxes, det_scores, iou_threshold: float = 0.2) -> float:
    """Competition Performance Metric [LUNA16]: mean FROC sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP/image.

    Same protocol as `froc` (hit = IoU > iou_threshold). NaN when there is no nodule at all.
    """
    return float(np.mean(froc(gt_boxes, det_boxes, det_scores, FROC_FP_RATES, iou_threshold)["sensitivity"]))


# ---------------------------------------------------------------------------------------------------- AP


def _match_image(gt: np.ndarray, boxes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """COCO greedy matching in one image; boxes already sorted by descending score. Returns TP flags (N,).

    Each detection, in score order, takes the still-unmatched GT with the highest IoU, if that IoU ≥ threshold.
    """
    is_tp = np.zeros(len(boxes), dtype=bool)
    if len(gt) == 0 or len(boxes) == 0:
        return is_tp
    iou = box_iou_np(boxes, gt)  # (N, G)
    matched = np.zeros(len(gt), dtype=bool)
    for i in range(len(boxes)):
        candidates = np.where(matched, -1.0, iou[i])  # (G,) matched GTs are out of reach
        j = int(np.argmax(candidates))
        if candidates[j] >= iou_threshold:
            matched[j] = is_tp[i] = True
    return is_tp


def average_precision(gt_boxes, det_boxes, det_scores, iou_threshold: float = 0.5) -> float:
    """Single-class COCO average precision at one IoU threshold (AP@0.5 by default) [COCO].

    Protocol (pycocotools COCOeval with iouThrs=[t], area 'all', unlimited maxDets):
      1. per image, sort detections by score, descending, stable; greedy matching (see `_match_image`),
         match when IoU ≥ t (inclusive, unlike FROC's strict >);
      2. pool all images (image order, then score order) and sort again by score, stable;
      3. recall = cumTP / #GT, precision = cumTP / (cumTP + cumFP);
      4. make precision monotone: p(k) ← max_{k' ≥ k} p(k');
      5. for each of the 101 recall points 0, 0.01, …, 1 take the precision at the first rank whose recall
         reaches it (0 if never reached); AP = mean of the 101 values, in [0, 1].
    Images without GT only add false positives. NaN when there is no ground truth at all.
    """
    images = _per_image(gt_boxes, det_boxes, det_scores)
    n_gt = sum(len(gt) for gt, _, _ in images)
    if n_gt == 0:
        return math.nan
    all_scores, all_tp = [], []
    for gt, boxes, scores in images:
        order = np.argsort(-scores, kind="mergesort")  # 1. stable, descending
        all_scores.append(scores[order])
        all_tp.append(_match_image(gt, boxes[order], iou_threshold))
    scores, is_tp = np.concatenate(all_scores), np.concatenate(all_tp)
    is_tp = is_tp[np.argsort(-scores, kind="mergesort")]  # 2.
    tp_cum, fp_cum = np.cumsum(is_tp), np.cumsum(~is_tp)
    recall = tp_cum / n_gt  # 3.
    precision = tp_cum / np.maximum(tp_cum + fp_cum, 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # 4.
    recall_points = np.linspace(0.0, 1.0, 101)
    rank = np.searchsorted(recall, recall_points, side="left")  # 5. first rank with recall ≥ point
    reached = rank < len(precision)  # (101,) False where that recall is never reached (or no detections)
    sampled = np.zeros(len(recall_points))
    sampled[reached] = precision[rank[reached]]
    return float(np.mean(sampled))


# ---------------------------------------------------------------------------------------- NODE21 summary


def image_scores(det_scores_list) -> np.ndarray:
    """Image-level score (I,) float64: the maximum detection score of each image, 0 if it has none [NODE21]."""
    return np.array([float(_np(s).max()) if _np(s).size else 0.0 for s in det_scores_list])


def node21_score(auc: float, sens_at_025: float) -> float:
    """NODE21 detection-track ranking score = 0.75·AUC + 0.25·sensitivity at 0.25 FP/image [NODE21]."""
    return 0.75 * float(auc) + 0.25 * float(sens_at_025)


def detection_report(gt_boxes, det_boxes, det_scores, iou_threshold: float = 0.2,
                     ap_iou_threshold: float = 0.5) -> dict[str, float]:
    """All detection metrics of design §4 as a flat JSON-ready dict of floats.

    Keys: auc (image label = has ≥ 1 nodule, image score = max box score; NaN with one class only),
    sens@0.125 … sens@8 (FROC, hit = IoU > iou_threshold), cpm, ap50 (AP at ap_iou_threshold, IoU ≥),
    node21 (0.75·auc + 0.25·sens@0.25), n_images, n_positive_images, n_nodules.
    """
    curve = froc(gt_boxes, det_boxes, det_scores, FROC_FP_RATES, iou_threshold)
    labels = np.array([len(_boxes(g)) > 0 for g in gt_boxes], dtype=np.float64)
    try:
        auc = roc_auc(labels, image_scores(det_scores))
    except ValueError:  # one class only: AUC undefined, reported as NaN rather than failing the whole report
        auc = math.nan
    report = {"auc": auc}
    for rate, sens in zip(FROC_FP_RATES, curve["sensitivity"]):
        report[f"sens@{rate:g}"] = float(sens)
    report["cpm"] = float(np.mean(curve["sensitivity"]))
    report["ap50"] = average_precision(gt_boxes, det_boxes, det_scores, ap_iou_threshold)
    report["node21"] = node21_score(auc, report["sens@0.25"])
    report.update(n_images=float(curve["n_images"]), n_positive_images=float(labels.sum()),
                  n_nodules=float(curve["n_nodules"]))
    return report


# ---------------------------------------------------------------------------------------------- bootstrap


def _bootstrap(statistic: Callable[[np.ndarray], float], n_images: int, n_boot: int, seed: int, alpha: float,
               progress: bool) -> dict[str, float]:
    """Percentile bootstrap [EFRON93 ch. 13] of statistic(indices) over resampled image indices."""
    if n_images < 1 or n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_images ≥ 1, n_boot ≥ 1, 0 < alpha < 1; got {n_images}, {n_boot}, {alpha}")

    def evaluate(indices: np.ndarray) -> float:
        try:  # an undefined metric on this resample (e.g. AUC with one class) is skipped, not fatal
            value = float(statistic(indices))
        except ValueError:
            return math.nan
        return value if math.isfinite(value) else math.nan

    # All resamples are drawn up front, so resample b is the same whatever happened to resamples < b.
    resamples = np.random.default_rng(seed).integers(0, n_images, size=(n_boot, n_images))  # (n_boot, I)
    values = np.array([evaluate(idx) for idx in tqdm(resamples, desc="bootstrap", disable=not progress, **progress_options())])
    valid = values[np.isfinite(values)]
    low, high = (np.quantile(valid, [alpha / 2, 1 - alpha / 2]) if len(valid) else (math.nan, math.nan))
    return {"estimate": evaluate(np.arange(n_images)), "low": float(low), "high": float(high),
            "n_valid": int(len(valid)), "n_skipped": int(n_boot - len(valid))}


def bootstrap_ci(metric_fn: Callable[[np.ndarray], float], n_images: int, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, progress: bool = False) -> dict[str, float]:
    """Percentile bootstrap (1 − alpha) confidence interval of a metric over images [EFRON93].

    metric_fn(indices) -> float evaluates the metric on the images `indices` (int64 (I,), with repeats), e.g.
        lambda idx: cpm([gt[i] for i in idx], [boxes[i] for i in idx], [scores[i] for i in idx]).
    Resamples where the metric is undefined (metric_fn raises ValueError or returns NaN/inf) are skipped and
    counted. Deterministic for a given seed. Returns {estimate (on all images), low, high, n_valid, n_skipped}.
    """
    return _bootstrap(metric_fn, n_images, n_boot, seed, alpha, progress)


def paired_bootstrap_diff(fn_a: Callable[[np.ndarray], float], fn_b: Callable[[np.ndarray], float],
                          n_images: int, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                          progress: bool = False) -> dict[str, float]:
    """Paired percentile bootstrap CI of metric(system A) − metric(system B) on the same images [EFRON93].

    Both systems are evaluated on the SAME resampled image indices, so image difficulty cancels out of the
    difference. fn_a, fn_b and the returned dict are as in `bootstrap_ci`; a resample is skipped (and counted)
    when either metric is undefined on it. A CI excluding 0 means A and B differ at level alpha.
    """
    return _bootstrap(lambda idx: fn_a(idx) - fn_b(idx), n_images, n_boot, seed, alpha, progress)


# --------------------------------------------------------------------------------- Fréchet distance, Dice


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via eigh; tiny negative eigenvalues are clipped to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T  # (D, D)


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [FID] (we call it FD, not FID).

    feats_a (N_a, D), feats_b (N_b, D) float features (e.g. `AttributeJudge.features`). With sample means μ and
    covariances Σ (np.cov, ddof = 1):
        FD = ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2·tr √(Σ_a Σ_b)                  [FID; Dowson & Landau 1982]
    tr √(Σ_a Σ_b) is computed stably as Σ_i √max(λ_i, 0), λ = eigenvalues of the symmetric PSD matrix
    Σ_a^½ Σ_b Σ_a^½, which is similar to Σ_a Σ_b (no complex sqrtm, no eps retry). Result clipped at ≥ 0 (units:
    squared feature units). With N ≤ D the covariance is singular and FD is biased upwards: still computed
    (the eigh route handles singular Σ), but a RuntimeWarning is issued. Needs N ≥ 2 in both sets.
    """
    a, b = _np(feats_a), _np(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(a)} and {len(b)}")
    if min(len(a), len(b)) <= a.shape[1]:
        warnings.warn(f"Fréchet distance with N = {min(len(a), len(b))} ≤ D = {a.shape[1]}: covariance is "
                      "singular and the estimate is biased; use more samples or fewer features", RuntimeWarning)
    mean_diff = a.mean(axis=0) - b.mean(axis=0)  # (D,)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))  # (D, D)
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))  # (D, D)
    sqrt_a = _sqrtm_psd(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a  # (D, D) Σ_a^½ Σ_b Σ_a^½, PSD
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)  # symmetrise away round-off
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    fd = mean_diff @ mean_diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(fd, 0.0))


def dice(mask_a, mask_b) -> float:
    """Dice coefficient 2·|A ∩ B| / (|A| + |B|) in [0, 1] of two same-shape masks (nonzero = inside).

    Both masks empty → 1.0 (perfect agreement that there is nothing), one empty → 0.0.
    """
    a, b = _np(mask_a, bool), _np(mask_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def mean_abs_laplacian(images, region) -> float:
    """Σ |∇²x|·w / Σ w over images (B, 1, S, S) and region weights w (B, 1, S, S), 5-point stencil, zero padding.

    A realism check that a judge cannot give: a judge trained on real crops may read speckle as a margin or a
    texture, but speckle doubles this figure against the same masks' real crops (issue 10).
    """
    x, w = _np(images), _np(region)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    lap = (padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:]
           - 4 * x)  # ∇²x with the stencil [[0, 1, 0], [1, −4, 1], [0, 1, 0]]   # (B, 1, S, S)
    return float((np.abs(lap) * w).sum() / max(w.sum(), 1e-12))



def otsu_threshold(values) -> float:
    """Otsu's threshold of a set of values: t maximising ω0·ω1·(μ0 − μ1)² over the splits {v ≤ t}, {v > t}
    [OTSU79 Eq. 18], exact over every split of the sorted values (no histogram bins); t is the midpoint between
    the two values either side of the best split. Constant input → that value (nothing lies above it)."""
    v = np.sort(_np(values).ravel())
    n = len(v)
    if n < 2 or v[0] == v[-1]:
        return float(v[0]) if n else 0.0
    k = np.arange(1, n)                                    # split after the k smallest values
    cum = np.cumsum(v)
    mu0, mu1 = cum[:-1] / k, (cum[-1] - cum[:-1]) / (n - k)
    between = (k / n) * (1 - k / n) * (mu0 - mu1) ** 2     # [OTSU79 Eq. 18]
    between[v[1:] == v[:-1]] = -1.0                        # a split between equal values is not a threshold
    i = int(np.argmax(between))
    return float((v[i] + v[i + 1]) / 2)


def gaussian_blur(image: np.ndarray, sigma: float, edge: str = "zero") -> np.ndarray:
    """Separable Gaussian blur of an (H, W) array, σ in px, kernel radius ⌈3σ⌉, as a sum of shifted copies.
    edge="zero": nothing outside (added density); "replicate": edges repeated (phantom.py's detector blur)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(image.dtype if image.dtype.kind == "f" else np.float64)
    mode = {"zero": "constant", "replicate": "edge"}[edge]
    for axis in (0, 1):
        padded = np.pad(image, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode=mode)
        n = image.shape[axis]
        image = sum(w * padded.take(np.arange(k, k + n), axis=axis) for k, w in enumerate(taps))
    return image


def added_density_body(added, region, sigma: float = 1.3) -> np.ndarray:
    """Bool (H, W) body of a nodule from the density it added, `added` (H, W) ≥ 0, inside the bool (H, W) region
    that could change: blur by σ px (pixel noise and fine texture), split the region's values into nodule and
    background by Otsu's threshold, and keep what lies above half the nodule class's median: a half-level
    contour of the body. The median, not the maximum, so that bright calcium or a dense core does not raise it.

    On phantom nodules with pixel noise this recovers the body mask with Dice 0.84 on average (0.80 at worst per
    value; evaluation.segmentation_ceiling, tests/test_evaluation.py); a plain 30 %-of-maximum threshold reaches
    0.63 there (0.46 on ground glass, 0.51 on calcified nodules), too little for a Dice target of 0.8.
    """
    region = _np(region, bool)
    if not region.any():
        return region
    x = gaussian_blur(_np(added) * region, sigma)
    inside = x[region]
    nodule = inside[inside > otsu_threshold(inside)]
    if len(nodule) == 0:
        return np.zeros_like(region)
    return (x > 0.5 * np.median(nodule)) & region
