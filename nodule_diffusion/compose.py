"""LoRA composition: the merging strategies of the field, sampling-time rules, and the [OURS] composition objective.

Reading order: weight-space merges → sampling-time rules → the composition objective → diagnostics → the
sampling-time dispatch (`eps_function`: which adapters, merges and guidance a --strategy uses at every step).

Every strategy is a plain function. Weight-space strategies take adapters as effective factors
(`lora.adapter_factors`: {layer: (A (r, D_in), B (D_out, r))} with B·A = ΔW, scaling already inside B) and user
weights w_i, and return one composed adapter in the same form with scale 1; `lora.add_factors` loads it.

Implements
    linear / cat     exact Σ w_i·ΔW_i by concatenating factors              [peft "cat"]
    peft_linear      peft's rank-preserving "linear" (not exact: cross terms), for comparison
    svd              Σ w_i·ΔW_i, then truncated SVD re-factorisation          [peft "svd", kohya svd_merge_lora]
    ties             trim, elect sign, disjoint mean on full ΔW_i             [TIES Alg. 1]
    dare             random drop + rescale, optionally then TIES              [DARE]
    magnitude_prune  trim + weighted sum
    switch_schedule / composite_eps   LoRA Switch / LoRA Composite            [MultiLoRA]
    klora_scores / klora_choose       top-k magnitude selection per layer     [K-LoRA]
    ziplora_penalty  Σ_layers mean_j |m_1[j]·m_2[j]| over merger vectors      [ZipLoRA]
    token_maps / mean_token_map / attention_region / attention_overlap / token_attention / mean_pair_overlap
    preserve_loss / composition_loss
    composition_objective   the whole composition-training loss, numbered steps     [OURS Eq. 1–3], [ZipLoRA]
    delta_cosines / principal_angles  the "two failure causes" diagnostics
    eps_function     --strategy → ε(x_t, t, step) for sampling; guided_eps = CFG [CFG Eq. 6, Liu et al. Eq. 12];
                     base_guided = adapter guidance (CFG with the frozen base as ε(∅));
                     sampling_time_eps = switch / composite / klora

Papers
    [TIES]      Yadav et al. 2023, arXiv:2306.01708        [DARE]    Yu et al. 2024, arXiv:2311.03099
    [MultiLoRA] Zhong et al. 2024, arXiv:2402.16843        [K-LoRA]  Ouyang et al. CVPR 2025, arXiv:2502.18461
    [ZipLoRA]   Shah et al. 2023, arXiv:2311.13600         [CLoRA]   Meral et al. 2024, arXiv:2403.19776
    [CFG]       Ho & Salimans 2022, arXiv:2207.12598       [Liu et al. 2022] composable diffusion, arXiv:2206.01714
    [OURS]      notes/method.md §3 (the paper, arXiv 2603.01659, publishes no formula): L = λ_p·L_preserve
                + λ_o·L_orth + λ_a·L_attn + λ_d·L_denoise                                    [OURS Eq. 1]

Deviations
    DEVIATION: ties / dare / magnitude_prune always act on the full ΔW_i and re-factor by SVD (peft's "*_svd"
    variants); peft's variants acting on stacked A's and B's separately are a heuristic and are not provided.
    DEVIATION: svd's clamp clips U_k and V_kᵀ before multiplying by S_k (peft clips U_k·S_k and V_kᵀ).
    DEVIATION: attention overlap (soft-IoU of min-max normalised maps inside the dilated mask) is our proposal.
    DEVIATION: train.py trains `ortho` with λ_p = 0, λ_d = 1 by default, not method.md §3's distillation-led
    objective (this function's own defaults): trained 100 steps, L_preserve unlearns the composition
    (benchmarks/RESULTS.md, "Composition budget").
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from nodule_diffusion import lora
from nodule_diffusion.common import DataError
from nodule_diffusion.diffusion import adapter_names, attr_tensor, composed_path, denoising_loss, load_lora

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (A (r, D_in), B (D_out, r)), B·A = ΔW


def _layers(adapters: list[Factors], weights: list[float]) -> list[str]:
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"need ≥ 1 adapter and one weight each: {len(adapters)} adapters, {len(weights)} weights")
    layers = sorted(adapters[0])
    if any(sorted(a) != layers for a in adapters[1:]):
        raise ValueError("all adapters must cover the same layers")
    return layers


def _delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return B.float() @ A.float()  # (D_out, D_in)


# ----------------------------------------------------------------------------- exact and SVD merges

def linear(adapters: list[Factors], weights: list[float]) -> Factors:
    """Exact Σ_i w_i·ΔW_i as factors of rank Σ r_i: A' = [w_1A_1; …; w_nA_n] (rows), B' = [B_1 … B_n] (columns).

    B'·A' = Σ_i B_i·(w_i·A_i) exactly, as for diffusers' multi-adapter forward. We call it `linear` because it is
    the linear combination of the ΔW_i; peft's combination_type="linear" is a different, rank-r construction
    with cross terms (see `peft_linear`), and peft's "cat" is this one.
    """
    out = {}
    for layer in _layers(adapters, weights):
        out[layer] = (torch.cat([w * a[layer][0] for a, w in zip(adapters, weights)], dim=0),  # (Σr, D_in)
                      torch.cat([a[layer][1] for a in adapters], dim=1))  # (D_out, Σr)
    return out


cat = linear  # peft's name for the same exact construction


def peft_linear(adapters: list[Factors], weights: list[float]) -> Factors:
    """peft's "linear": A' = Σ sign(w_i)·√|w_i|·A_i, B' = Σ √|w_i|·B_i, rank r (all r_i equal).

    B'·A' = Σ_i w_i·B_iA_i + Σ_{i≠j} ±√|w_i w_j|·B_iA_j: the cross terms make it NOT the weighted sum for n > 1.
    With effective factors (s inside B) this equals peft's when every s_i = 1 (α = r); peft splits √s_i between
    A and B instead, which changes the cross terms but not their existence. Kept only for comparison.
    """
    out = {}
    for layer in _layers(adapters, weights):
        if len({a[layer][0].shape[0] for a in adapters}) != 1:
            raise ValueError("peft_linear needs adapters of equal rank")
        out[layer] = (sum(math.copysign(math.sqrt(abs(w)), w) * a[layer][0] for a, w in zip(adapters, weights)),
                      sum(math.sqrt(abs(w)) * a[layer][1] for a, w in zip(adapters, weights)))
    return out


def _refactor(delta: torch.Tensor, rank: int | None = None, clamp: float | None = None):
    """ΔW (D_out, D_in) → (A' (k, D_in), B' (D_out, k)) with B'A' the best rank-k approximation (Eckart–Young).

    k = rank or min(D_out, D_in) (then B'A' = ΔW up to float error). clamp q ∈ (0, 1]: clip entries of U_k and
    V_kᵀ to ±quantile_q(|[U_k, V_kᵀ]|), a heuristic against outliers (kohya-ss svd_merge_lora).
    """
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # U (D_out, K), S (K,), Vh (K, D_in)
    k = min(rank or S.numel(), S.numel())
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    if clamp is not None:
        limit = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]).abs(), clamp)  # over k·(D_out + D_in) entries
        U, Vh = U.clamp(-limit, limit), Vh.clamp(-limit, limit)
    return Vh, U * S  # A' = V_kᵀ, B' = U_k·diag(S_k)   # (k, D_in), (D_out, k)


def svd(adapters: list[Factors], weights: list[float], rank: int | None = None,
        clamp: float | None = None) -> Factors:
    """ΔW = Σ w_i·ΔW_i, then the rank-k truncated SVD; k defaults to max r_i (exact when k ≥ rank of ΔW)."""
    rank = rank or max(a[layer][0].shape[0] for a in adapters for layer in a)
    out = {}
    for layer in _layers(adapters, weights):
        delta = sum(w * _delta(*a[layer]) for a, w in zip(adapters, weights))
        out[layer] = _refactor(delta, rank, clamp)
    return out


# ----------------------------------------------------------------------------- TIES / DARE / magnitude pruning

def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """[TIES Alg. 1, trim] keep the ⌊density·numel⌋ entries of largest |τ|, zero the rest."""
    k = int(density * tau.numel())
    mask = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    mask[torch.topk(tau.abs().flatten(), k).indices] = True  # flat index over D_out·D_in
    return tau * mask.view_as(tau)


def _elect_and_mean(taus: torch.Tensor, weights: torch.Tensor, majority: str) -> torch.Tensor:
    """[TIES Alg. 1, elect + disjoint merge] taus (n, D_out, D_in) → elected sign γ, then the mean of the agreeing
    weighted entries (D_out, D_in)."""
    if majority == "total":
        gamma = torch.where(taus.sum(0) >= 0, 1.0, -1.0)  # γ = sign(Σ_i τ_i), ties → +1
    elif majority == "frequency":
        gamma = torch.where(taus.sign().sum(0) >= 0, 1.0, -1.0)  # γ = sign(Σ_i sign τ_i)
    else:
        raise ValueError(f"majority must be 'total' or 'frequency', got {majority!r}")
    agree = (taus.sign() == gamma).float()  # zeros never agree, so pruned entries do not count
    weighted = weights.view(-1, 1, 1) * taus  # (n, 1, 1) · (n, D_out, D_in)
    # τ = Σ_i 1[sign τ_i = γ]·w_i·τ_i / max(1, Σ_i 1[sign τ_i = γ])
    return (agree * weighted).sum(0) / agree.sum(0).clamp(min=1.0)  # (D_out, D_in)


def _full_merge(adapters, weights, merge_layer, rank):
    """Per layer: τ_i = ΔW_i stacked (n, D_out, D_in), merged by merge_layer(taus, w) → (D_out, D_in), re-factored."""
    out = {}
    for layer in _layers(adapters, weights):
        taus = torch.stack([_delta(*a[layer]) for a in adapters])  # (n, D_out, D_in)
        out[layer] = _refactor(merge_layer(taus, torch.tensor(weights, dtype=taus.dtype, device=taus.device)), rank)
    return out


def ties(adapters: list[Factors], weights: list[float], density: float = 0.2, majority: str = "total",
         rank: int | None = None) -> Factors:
    """TIES on full ΔW_i: trim to `density` (paper default 20%), elect signs, disjoint weighted mean, re-factor."""
    return _full_merge(adapters, weights, lambda taus, w: _elect_and_mean(
        torch.stack([_trim(t, density) for t in taus]), w, majority), rank)


def dare(adapters: list[Factors], weights: list[float], density: float, seed: int, ties: bool = False,
         majority: str = "total", rank: int | None = None) -> Factors:
    """DARE on full ΔW_i: keep each entry with probability `density` and rescale, τ̃ = m⊙τ/density with
    m ~ Bernoulli(density) [DARE], so E[τ̃] = τ; then Σ w_i·τ̃_i, or TIES election + mean (ties=True).
    One CPU generator seeded by `seed` draws the masks layer by layer in sorted order: reproducible."""
    generator = torch.Generator().manual_seed(seed)

    def merge_layer(taus, w):
        keep = torch.rand(taus.shape, generator=generator).to(taus.device) < density  # (n, D_out, D_in)
        rescaled = taus * keep / density
        if ties:
            return _elect_and_mean(rescaled, w, majority)
        return (w.view(-1, 1, 1) * rescaled).sum(0)  # Σ_i w_i·τ̃_i   # (D_out, D_in)

    return _full_merge(adapters, weights, merge_layer, rank)


def magnitude_prune(adapters: list[Factors], weights: list[float], density: float,
                    rank: int | None = None) -> Factors:
    """Trim each ΔW_i to `density` by magnitude, then Σ w_i·trim(ΔW_i), re-factored."""
    return _full_merge(adapters, weights, lambda taus, w: sum(
        wi * _trim(t, density) for t, wi in zip(taus, w)), rank)


# ----------------------------------------------------------------------------- sampling-time strategies

def switch_schedule(step_index: int, names: list[str], tau: int = 5) -> str:
    """[MultiLoRA] LoRA Switch: the adapter active at denoising step k is names[⌊k/τ⌋ mod n] (τ = 5)."""
    return names[(step_index // tau) % len(names)]


def composite_eps(eps_list: list[torch.Tensor]) -> torch.Tensor:
    """[MultiLoRA] LoRA Composite: ε̂ = (1/n)·Σ_i ε_{θ+ΔW_i}; call once for the conditional and once for
    the unconditional branch, then guide: ε̃ = ε̂_u + g·(ε̂_c − ε̂_u). Equal shapes, e.g. (B, 1, H, W)."""
    return torch.stack(eps_list).mean(0)


@torch.no_grad()
def klora_scores(factors_a: Factors, factors_b: Factors,
                 k: int | None = None) -> dict[str, tuple[float, float, float]]:
    """[K-LoRA] per layer (S_a, S_b, γ): S = Σ of the k largest |ΔW| entries (k defaults to r_a·r_b);
    γ, shared by all layers, is the mean over layers of ‖ΔW_a‖₁/‖ΔW_b‖₁, recomputed without layers whose
    ratio is ≥ 3× the first mean (K-LoRA's outlier rule). Constant per layer: compute once, cache."""
    scores, ratios = {}, {}
    for layer in sorted(factors_a):
        delta_a, delta_b = _delta(*factors_a[layer]), _delta(*factors_b[layer])
        top = k or factors_a[layer][0].shape[0] * factors_b[layer][0].shape[0]
        top = min(top, delta_a.numel())
        # S = Σ top-k |ΔW| over the D_out·D_in entries
        scores[layer] = (torch.topk(delta_a.abs().flatten(), top).values.sum().item(),
                         torch.topk(delta_b.abs().flatten(), top).values.sum().item())
        ratios[layer] = (delta_a.abs().sum() / delta_b.abs().sum().clamp(min=1e-12)).item()
    first_mean = sum(ratios.values()) / len(ratios)
    kept = [v for v in ratios.values() if v < 3 * first_mean] or list(ratios.values())
    gamma = sum(kept) / len(kept)
    return {layer: (s_a, s_b, gamma) for layer, (s_a, s_b) in scores.items()}


def klora_choose(S_a: float, S_b: float, gamma: float, call_index: int, total_calls: int,
                 alpha: float = 1.5, beta: float = 0.5) -> int:
    """[K-LoRA] 0 (use ΔW_a) if S_a/γ > S_b·s(t), else 1 (ΔW_b), with s(t) = α·t/T + β.

    t = call_index counts LoRA-layer forward calls so far, T = total_calls = steps × LoRA layers; s grows, so b
    (K-LoRA's "style" adapter) is favoured as sampling proceeds. Pure function."""
    progress = alpha * call_index / total_calls + beta
    return 0 if S_a / gamma > S_b * progress else 1


def ziplora_penalty(model: torch.nn.Module, names: list[str]) -> torch.Tensor:
    """[ZipLoRA] Σ_layers Σ_{i<j} mean_j |m_i[j]·m_j[j]| over the merger vectors (absent merger = ones)."""
    total = torch.zeros(())
    for layer in lora.lora_layers(model).values():
        mergers = [layer.lora_m[n] if n in layer.lora_m else torch.ones(layer.in_features, device=layer.weight.device)
                   for n in names if n in layer.lora_A]
        for i in range(len(mergers)):
            for j in range(i + 1, len(mergers)):
                total = total + (mergers[i] * mergers[j]).abs().mean()
    return total


# ----------------------------------------------------------------------------- composition objective [OURS]

def token_maps(cross_attention_maps: list[torch.Tensor], position: int) -> list[torch.Tensor]:
    """Per-layer spatial maps of one context token, averaged over heads.

    cross_attention_maps: per layer (B, h, H_l·W_l, L) softmax probabilities over the L tokens, square H_l = W_l.
    Returns per layer (B, H_l, W_l)."""
    maps = []
    for probs in cross_attention_maps:
        B, _, N, _ = probs.shape
        side = math.isqrt(N)
        assert side * side == N, f"cross-attention map with {N} queries is not square"
        maps.append(probs[..., position].mean(1).reshape(B, side, side))  # (B, H_l, W_l)
    return maps


def mean_token_map(maps: list[torch.Tensor], size: int = 16) -> torch.Tensor:
    """Bilinearly resize per-layer maps (B, H_l, W_l) to size × size and average layers → (B, size·size)."""
    resized = [F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
               for m in maps]  # each (B, size, size)
    return torch.stack(resized).mean(0).flatten(1)  # (B, size·size)


def attention_region(mask: torch.Tensor, size: int, dilation: int = 3) -> torch.Tensor:
    """R = dilate(mask, `dilation` px) resized to size × size: bool (B, size·size). mask (B, 1, H, W) or (B, H, W)."""
    mask = mask.float().reshape(mask.shape[0], 1, *mask.shape[-2:])  # (B, 1, H, W)
    dilated = F.max_pool2d(mask, 2 * dilation + 1, stride=1, padding=dilation)  # square structuring element
    return (F.adaptive_max_pool2d(dilated, size) > 0).flatten(1)  # a cell is in R if any pixel is  # (B, size²)


def attention_overlap(maps_a: torch.Tensor, maps_b: torch.Tensor, region: torch.Tensor,
                      eps: float = 1e-8) -> torch.Tensor:
    """L_attn: soft-IoU of two tokens' attention inside R, mean over the batch, in [0, 1].

    maps_a, maps_b (B, N) float probabilities for one token each (heads averaged); region (B, N) bool.
    [OURS Eq. 3] P̂ = (P − min_R P)/(max_R P − min_R P + ε);  O = Σ_R min(P̂_a,P̂_b) / (Σ_R max(P̂_a,P̂_b) + ε).
    1 for identical (non-constant) maps, 0 for disjoint support; a map constant on R normalises to 0.
    """
    region = region.float()

    def normalise(p):
        low = torch.where(region > 0, p, torch.full_like(p, float("inf"))).amin(1, keepdim=True)
        high = torch.where(region > 0, p, torch.full_like(p, -float("inf"))).amax(1, keepdim=True)
        return ((p - low) / (high - low + eps)).nan_to_num(0.0) * region  # zero outside R; empty R → 0

    a, b = normalise(maps_a), normalise(maps_b)
    overlap = torch.minimum(a, b).sum(1) / (torch.maximum(a, b).sum(1) + eps)  # (B,)
    return overlap.mean()


def preserve_loss(pairs) -> torch.Tensor:
    """L_preserve = Σ_k Σ w·(ε_composed(x^k) − sg ε_k(x^k))² / Σ w over (student, teacher[, weight]) triples
    [ZipLoRA Eq. 2]: the composed model keeps each attribute's single-adapter behaviour on its own data.
    weight (like the student) defaults to ones, i.e. the plain mean squared error."""
    total = 0.0
    for student, teacher, *weight in pairs:
        w = weight[0] if weight else torch.ones_like(student)
        total = total + (w * (student.float() - teacher.detach().float()) ** 2).sum() / w.sum()
    return total


def composition_loss(preserve: torch.Tensor, orth: torch.Tensor, attn: torch.Tensor, lambda_orth: float,
                     lambda_attn: float, denoise: torch.Tensor | float = 0.0, lambda_denoise: float = 0.0,
                     lambda_preserve: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """[OURS Eq. 1] L = λ_p·L_preserve + λ_o·L_orth + λ_a·L_attn + λ_d·L_denoise; returns (L, {part: float})."""
    total = lambda_preserve * preserve + lambda_orth * orth + lambda_attn * attn + lambda_denoise * denoise
    parts = {"preserve": preserve, "orth": orth, "attn": attn, "denoise": denoise, "total": total}
    return total, {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in parts.items()}


def token_attention(model, attributes: list[str], size: int = 16) -> list[torch.Tensor]:
    """The cross-attention map of each attribute's token in the last forward pass (captured with
    `model.unet.set_attention_capture(True)`), heads and layers averaged: one (B, size²) map per attribute."""
    maps = [probs for probs, _ in model.unet.cross_attention_maps()]  # per layer (B, h, H_l*W_l, L)
    return [mean_token_map(token_maps(maps, model.tokens.token_position(a)), size) for a in attributes]


def mean_pair_overlap(per_token: list[torch.Tensor], mask: torch.Tensor, size: int = 16) -> torch.Tensor:
    """L_attn of one batch: the mean over token pairs of their soft-IoU inside R = dilate(M)  [OURS Eq. 3]."""
    region = attention_region(mask, size)  # (B, size²) bool
    pairs = [(i, j) for i in range(len(per_token)) for j in range(i + 1, len(per_token))]
    return sum(attention_overlap(per_token[i], per_token[j], region) for i, j in pairs) / max(len(pairs), 1)


def composition_objective(model, names: list[str], draw_batch, generator: torch.Generator, strategy: str = "ortho",
                          lambda_orth: float = 1.0, lambda_attn: float = 0.1, lambda_zip: float = 0.01,
                          lambda_denoise: float = 0.0, lambda_preserve: float = 1.0,
                          draw_joint=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The whole composition-training loss of one step [OURS Eq. 1–3] (or ZipLoRA's, strategy="ziplora").

    model: a DiffusionModel with the adapters `names` ("attribute=value") loaded and merger vectors added;
    draw_batch(k) -> a batch (data.NoduleCrops keys) of nodules carrying names[k]; draw_joint() -> a batch of
    nodules carrying every one of `names` (only read when λ_d > 0); t and ε come from `generator`.
    For each adapter k, with c_k = the token of names[k] alone and c_all = every composed token:
    1. t ~ U{0, …, T−1}, ε ~ N(0, I), x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε                    [DDPM Alg. 1 l.3–4, Eq. 4]
    2. teacher = ε_{θ+ΔW_k}(x_t, t, c_k): adapter k alone, no gradient
    3. student = ε_{θ+Σ_i ΔW̃_i}(x_t, t, c_all): every adapter with its trained mergers m_i (ortho, method.md §3);
       ziplora: ε_{θ+Σ_i ΔW̃_i}(x_t, t, c_k), the teacher's own condition, as ZipLoRA Eq. 2 gives the merged
       model the prompt of the reference it reproduces
    4. L_preserve += Σ w·(student − teacher)² / Σ w, w = 1 + (λ−1)·dilate(M)  [ZipLoRA Eq. 2, mask-weighted]
    5. ortho: L_attn += mean over token pairs of overlap(attn_i, attn_j inside dilate(M))          [OURS Eq. 3]
    6. ortho: L_denoise = the composed model's denoising loss (diffusion.denoising_loss, c_all, uniform over t)
       on nodules carrying every composed value                                     [method.md §3, λ_d·L_denoise]
    7. ortho:   L = λ_p·L_preserve + λ_o·L_orth(ΔW̃_1 … ΔW̃_n) + λ_a·L_attn + λ_d·L_denoise    [OURS Eq. 1, 2]
       ziplora: L = L_preserve + λ_z·Σ_layers Σ_{i<j} mean|m_i ⊙ m_j|                           [ZipLoRA Eq. 3]
    Steps 1–5 run per adapter when there is an L_preserve to compute (ziplora, or λ_p > 0), or no joint batch
    (λ_d = 0), and L_attn is then their mean; otherwise (train.py's default, λ_p = 0, λ_d > 0) the only forward
    is step 6's, and L_attn is measured on it: one forward and backward a step instead of three.
    Why step 6: step 4 asks the composed model, told every value, to reproduce adapter k's ε on nodules that
    carry value k and any value of the other attributes, i.e. to draw the others' prior; trained longer, it
    unlearns the composition (benchmarks/RESULTS.md, "Composition budget"). L_denoise is the only term that
    shows the composed model what the requested combination looks like.
    Returns (L, {part: float}) for logging.
    """
    vocab, scheduler = model.vocab, model.diffusion.scheduler()
    attributes = dict(n.split("=", 1) for n in names)
    with_attention = strategy == "ortho" and lambda_attn > 0
    preserving = strategy == "ziplora" or lambda_preserve > 0
    per_adapter = preserving or lambda_denoise == 0
    pairs, overlaps = [], []
    for k, name in enumerate(names if per_adapter else []):
        batch = draw_batch(k)
        x0 = batch["x0"]
        # 1.
        t = torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        xt = scheduler.add_noise(x0, noise, t)
        own = dict([name.split("=", 1)])
        # 2.
        if preserving:
            with torch.no_grad():
                lora.set_active(model.unet, [name])
                teacher = model(xt, t, batch["mask"], batch["context"], attr_tensor(own, vocab, len(x0), x0.device))
        # 3.
        lora.set_active(model.unet, names)
        model.unet.set_attention_capture(with_attention)
        told = own if strategy == "ziplora" else attributes
        student = model(xt, t, batch["mask"], batch["context"], attr_tensor(told, vocab, len(x0), x0.device))
        # 4.
        if preserving:
            pairs.append((student, teacher, 1.0 + (model.diffusion.mask_weight - 1.0) * batch["region"]))
        # 5.
        if with_attention:
            overlaps.append(mean_pair_overlap(token_attention(model, list(attributes)), batch["mask"]))
        model.unet.set_attention_capture(False)
    preserve = preserve_loss(pairs) if pairs else torch.zeros(())
    if strategy == "ortho":
        denoise = 0.0
        if lambda_denoise > 0:  # 6.
            batch = draw_joint()
            lora.set_active(model.unet, names)
            model.unet.set_attention_capture(with_attention and not per_adapter)
            denoise = denoising_loss(model, scheduler, batch, model.diffusion.mask_weight, generator,
                                     attr_tensor(attributes, vocab, len(batch["x0"]), batch["x0"].device))
            if with_attention and not per_adapter:  # 5. on the joint batch
                overlaps.append(mean_pair_overlap(token_attention(model, list(attributes)), batch["mask"]))
            model.unet.set_attention_capture(False)
        # 7.
        orth = lora.orthogonality_loss([lora.adapter_factors(model.unet, n) for n in names])
        attn = sum(overlaps) / len(overlaps) if overlaps else torch.zeros((), device=orth.device)
        return composition_loss(preserve, orth, attn, lambda_orth, lambda_attn, denoise, lambda_denoise,
                                lambda_preserve)
    penalty = ziplora_penalty(model.unet, names)
    return preserve + lambda_zip * penalty, {"preserve": float(preserve.detach()), "zip": float(penalty.detach())}


# ----------------------------------------------------------------------------- diagnostics

@torch.no_grad()
def delta_cosines(factors_a: Factors, factors_b: Factors) -> dict[str, float]:
    """Per layer cos(ΔW_a, ΔW_b) = ⟨ΔW_a, ΔW_b⟩_F/(‖ΔW_a‖_F·‖ΔW_b‖_F) ∈ [−1, 1] by the trace trick; 0 if a ΔW = 0."""
    out = {}
    for layer in sorted(factors_a):
        (A_a, B_a), (A_b, B_b) = factors_a[layer], factors_b[layer]
        inner = lora.frobenius_inner(A_a.float(), B_a.float(), A_b.float(), B_b.float())
        norms = (lora.frobenius_inner(A_a.float(), B_a.float(), A_a.float(), B_a.float())
                 * lora.frobenius_inner(A_b.float(), B_b.float(), A_b.float(), B_b.float())).sqrt()
        out[layer] = float(inner / norms) if norms > 0 else 0.0
    return out


def _span(matrix: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Orthonormal basis (D, k) of the column space, k = numerical rank (singular values > rtol·S_max)."""
    U, S, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    return U[:, : int((S > rtol * S.max()).sum())] if S.numel() and S.max() > 0 else U[:, :0]


@torch.no_grad()
def principal_angles(factors_a: Factors, factors_b: Factors, space: str = "column") -> dict[str, torch.Tensor]:
    """Per layer the principal angles (degrees, ascending, float32 (min(k_a, k_b),)) between the column spaces
    (space="column", the output directions) or row spaces ("row", the input directions) of ΔW_a and ΔW_b.

    Björck & Golub 1973: cos θ_i = σ_i(Q_aᵀQ_b) for orthonormal bases Q. DEVIATION: Q comes from the SVD of ΔW
    (numerical rank) rather than a QR of B or Aᵀ, so rank-deficient factors (B = 0 at init) do not add spurious
    directions; ΔW is small here (dims ≤ 256)."""
    out = {}
    for layer in sorted(factors_a):
        delta_a, delta_b = _delta(*factors_a[layer]), _delta(*factors_b[layer])
        if space == "row":
            delta_a, delta_b = delta_a.T, delta_b.T  # (D_in, D_out): row space of ΔW = column space of ΔWᵀ
        elif space != "column":
            raise ValueError(f"space must be 'column' or 'row', got {space!r}")
        cosines = torch.linalg.svdvals(_span(delta_a).T @ _span(delta_b))  # (min(k_a, k_b),), descending
        out[layer] = torch.rad2deg(torch.arccos(cosines.clamp(-1.0, 1.0))).float()
    return out


# ----------------------------------------------------------------------------- sampling-time dispatch

MERGES = {"linear": linear, "svd": svd, "ties": ties,
          "dare": lambda adapters, weights: dare(adapters, weights, density=0.5, seed=0)}
STRATEGIES = ("base", "lora", *MERGES, "ortho", "ziplora", "switch", "composite", "klora", "cfg")


def eps_function(model, fingerprint: str, strategy: str, attributes: dict[str, str], lora_dir: Path,
                 guidance: float = 3.0, compositional: bool = False, tau: int = 5, steps: int = 50,
                 adapter_guidance: float = 1.0):
    """The sampling-time dispatch: load what `strategy` needs onto `model` and return
    eps(x_t, t (B,), step_index, masks, contexts) -> model output (B, 1, S, S). Every file is checked first.
    adapter_guidance g ≠ 1: base_guided, the adapted model guided away from the base (strategies with adapters;
    base and cfg have none and ignore it, as every strategy but cfg ignores `guidance`)."""
    names = adapter_names(attributes)
    if strategy in ("base", "cfg") or not names:
        if strategy not in ("base", "cfg"):
            raise DataError(f"--strategy {strategy} needs --attributes")
        return guided_eps(model, attributes, guidance if strategy == "cfg" else None, compositional)
    base = copy.deepcopy(model) if adapter_guidance != 1 else None  # before any adapter is loaded: the frozen base
    cond = adapted_eps(model, fingerprint, strategy, names, attributes, lora_dir, tau, steps)
    return cond if base is None else base_guided(cond, base, adapter_guidance)


def adapted_eps(model, fingerprint: str, strategy: str, names: list[str], attributes: dict[str, str],
                lora_dir: Path, tau: int, steps: int):
    """ε of the base with the adapters of an adapter strategy (lora, merges, ortho, ziplora, sampling-time)."""
    if strategy == "lora" and len(names) != 1:
        raise DataError("--strategy lora takes exactly one attribute value; use a composition strategy for more")
    if strategy in ("ortho", "ziplora"):
        path = composed_path(lora_dir.parent, strategy, names)
        if not path.is_file():
            raise DataError(f"{path}: no composed adapter; run train.py --stage compose --strategy {strategy} "
                            f"--attributes {','.join(names)} first")
        load_lora(path, model, fingerprint, "composed")
        lora.set_active(model.unet, ["composed"])
        lora.merge(model.unet)  # a fixed adapter set: W0 + ΔW folded once, 1.5× faster sampling (same output)
        return guided_eps(model, attributes, None, False)
    for name in names:
        load_lora(lora_dir / f"{name}.pt", model, fingerprint, name)
    if strategy == "lora":
        lora.set_active(model.unet, names)
    elif strategy in MERGES:
        factors = MERGES[strategy]([lora.adapter_factors(model.unet, n) for n in names], [1.0] * len(names))
        lora.add_factors(model.unet, "composed", {k: (a.detach(), b.detach()) for k, (a, b) in factors.items()})
        lora.set_active(model.unet, ["composed"])
    if strategy in ("lora", *MERGES):
        lora.merge(model.unet)  # as above; the sampling-time strategies below switch adapters and stay unmerged
        return guided_eps(model, attributes, None, False)
    return sampling_time_eps(model, strategy, names, attributes, tau, steps)


def guided_eps(model, attributes: dict[str, str], guidance: float | None, compositional: bool):
    """ε(x_t) with the requested tokens; with `guidance`, classifier-free guidance [CFG Eq. 6]:
    joint ε̃ = ε(∅) + g·(ε(y) − ε(∅)); compositional ε̃ = ε(∅) + Σ_k g·(ε(y_k) − ε(∅)) [Liu et al. 2022 Eq. 12]."""
    vocab = model.vocab

    @torch.no_grad()
    def eps(xt, t, k, masks, contexts):
        cond = model(xt, t, masks, contexts, attr_tensor(attributes, vocab, len(xt), xt.device))
        if guidance is None:
            return cond
        null = model(xt, t, masks, contexts, attr_tensor({}, vocab, len(xt), xt.device))
        if not compositional:
            return null + guidance * (cond - null)
        parts = [model(xt, t, masks, contexts, attr_tensor({a: v}, vocab, len(xt), xt.device)) - null
                 for a, v in attributes.items()]
        return null + guidance * sum(parts)
    return eps


def base_guided(cond_eps, base, g: float):
    """Adapter guidance: ε̃ = ε_base(∅) + g·(ε_adapted(y) − ε_base(∅)), classifier-free guidance [CFG Eq. 6] whose
    unconditional model is the frozen base (no adapter, every attribute null) and whose conditional one is the
    adapted model told the requested values; g = 1 is the adapted model alone. For v- and x0-prediction the same
    combination holds: each output is linear in ε given x_t.

    DEVIATION: the paper samples the adapted model itself (g = 1). A LoRA trained on a few hundred nodules moves
    the base's output only part of the way: g = 1.5 (synthesis.ADAPTER_GUIDANCE) lifts the benchmark's ground
    glass from 0.61 to 0.77 and calcified from 0.77 to 0.95 (benchmarks/RESULTS.md, "Adapter guidance"), at
    twice the forwards a step.
    cond_eps: eps(x_t, t, k, masks, contexts) of the adapted model; base: a copy of the model without adapters."""
    vocab = base.vocab

    @torch.no_grad()
    def eps(xt, t, k, masks, contexts):
        cond = cond_eps(xt, t, k, masks, contexts)
        null = base(xt, t, masks, contexts, attr_tensor({}, vocab, len(xt), xt.device))
        return null + g * (cond - null)
    return eps


def sampling_time_eps(model, strategy: str, names: list[str], attributes: dict[str, str], tau: int, steps: int):
    """Sampling-time compositions: switch, composite and K-LoRA change the active adapters during sampling."""
    vocab = model.vocab
    layers = lora.lora_layers(model.unet)
    if strategy == "klora":
        if len(names) != 2:
            raise DataError("--strategy klora composes exactly two adapters")
        fa, fb = (lora.adapter_factors(model.unet, n) for n in names)
        scores = klora_scores(fa, fb)

    @torch.no_grad()
    def eps(xt, t, k, masks, contexts):
        attrs = attr_tensor(attributes, vocab, len(xt), xt.device)
        if strategy == "switch":
            lora.set_active(model.unet, [switch_schedule(k, names, tau)])
        elif strategy == "composite":
            outs = []
            for n in names:
                lora.set_active(model.unet, [n])
                outs.append(model(xt, t, masks, contexts, attrs))
            return composite_eps(outs)
        else:  # klora: per layer, per step
            for i, (name, layer) in enumerate(layers.items()):
                s_a, s_b, gamma = scores[name]
                pick = klora_choose(s_a, s_b, gamma, k * len(layers) + i, steps * len(layers))
                layer.set_active([names[pick]])
        return model(xt, t, masks, contexts, attrs)
    return eps
