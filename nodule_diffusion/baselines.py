"""Two simple nodule-insertion baselines that users would otherwise reach for (issue: phantom benchmark).

    copy_paste_generator   paste a real nodule crop (from the training set) with its mask, background-matched:
                           the nodule's excess over its own local background is added to the new location
    template_generator     an analytic nodule: the projection of a solid sphere, √(1 − r²/R²), scaled to a
                           contrast drawn from the real nodules and blended inside the mask (NODE21 generation
                           baseline style [NODE21, Sogancioglu et al. 2024 §III-B]; our version needs no CT)
Both return a `generate(masks, contexts, requests)` function with the same contract as the diffusion model's
(synthesis.build_generator), so `synthesis.synthesize` inserts them through exactly the same code path.
"""

from __future__ import annotations

import numpy as np
import torch

from nodule_diffusion.data import NoduleCrops


def _background(x0: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-crop mean intensity outside the region, (B, 1, 1, 1): the local background level."""
    outside = 1 - region
    return (x0 * outside).sum((1, 2, 3), keepdim=True) / outside.sum((1, 2, 3), keepdim=True).clamp(min=1)


def copy_paste_generator(crops: NoduleCrops, seed: int = 0):
    """Copy-paste of real nodules: x0_new = x0_orig + (x0_real − bg_real)·M_real.

    The pasted nodule keeps its own shape: among the real nodules whose mask area is within ±30 % of the
    requested one (the closest one if none), one is drawn at random per request (seeded by seed, index).
    """
    bank = crops.get(torch.arange(len(crops)))
    real_bg = _background(bank["x0"], bank["region"])  # (N, 1, 1, 1)
    excess = (bank["x0"] - real_bg) * bank["mask"]  # (N, 1, S, S): the nodule above its local background
    areas = bank["mask"].sum((1, 2, 3)).numpy()  # (N,)

    def generate(masks, contexts, requests, originals):
        out = []
        for mask, original, req in zip(masks, originals, requests):
            rng = np.random.default_rng([seed, req.seed, req.index])
            area = float(mask.sum())
            similar = np.nonzero(np.abs(areas - area) <= 0.3 * area)[0]
            j = int(rng.choice(similar)) if len(similar) else int(np.argmin(np.abs(areas - area)))
            out.append((original + excess[j]).clamp(-1, 1))
        return torch.stack(out)

    return generate


def template_generator(crops: NoduleCrops, seed: int = 0):
    """Analytic sphere-projection template inside the requested mask, contrast drawn from real nodules."""
    bank = crops.get(torch.arange(len(crops)))
    inside = (bank["x0"] * bank["mask"]).sum((1, 2, 3)) / bank["mask"].sum((1, 2, 3)).clamp(min=1)
    contrasts = (inside - _background(bank["x0"], bank["region"]).flatten()).clamp(min=0.02).numpy()  # (N,)

    def generate(masks, contexts, requests, originals):
        out = []
        for mask, original, req in zip(masks, originals, requests):
            rng = np.random.default_rng([seed, req.seed, req.index, 1])
            m = (mask[0] > 0.5).numpy()
            ys, xs = np.nonzero(m)
            radius = max(np.sqrt(m.sum() / np.pi), 1.0)
            yy, xx = np.mgrid[0:m.shape[0], 0:m.shape[1]]
            r2 = ((yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2) / radius ** 2
            profile = np.sqrt(np.clip(1 - r2, 0, 1)) * m  # projected thickness of a sphere, inside the mask
            amp = float(rng.choice(contrasts)) * 1.5  # the mean of √(1 − r²) over a disc is 2/3 of its peak
            out.append((original + torch.from_numpy(profile * amp).float()[None]).clamp(-1, 1))
        return torch.stack(out)

    return generate
