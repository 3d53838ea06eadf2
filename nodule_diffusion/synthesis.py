"""Inserting generated nodules into full chest radiographs (design §4 "Synthesis").

    request_mask      the requested nodule shape: a mask PNG, or an ellipse of a given diameter (seeded)
    generate_crops    the reverse diffusion chain for a batch of crops, noise seeded per output (seed, index)
    paste             feathered paste-back: pixels outside dilate(M) are bit-identical to the input
    insert_nodules    crop → generate → paste for every request of one image, at any pixel spacing
    random_requests   nodules drawn inside the lung fields (sizes and attribute mix configurable)

Reproducibility (design §3): every output's noise comes from its own CPU generator seeded by (seed, index), and
the noise of every DDIM/DDPM step is drawn from it, so a result does not depend on batch size or device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from nodule_diffusion.data import DataError, crop_at, dilate
from nodule_diffusion.schedulers import DDIMScheduler


@dataclass
class Request:
    """One nodule to insert. Coordinates in the image's own pixels; `mask` (H, W) bool overrides the diameter."""

    cx: float
    cy: float
    diameter_px: float | None = None
    mask: np.ndarray | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    index: int = 0


def output_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of output `index` under `seed`: independent of batch size and device."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def request_mask(request: Request, crop_size: int, scale: float) -> np.ndarray:
    """The (S, S) float mask of a request in the working-resolution crop (scale = working px per image px).

    Without a mask file, an ellipse of the requested diameter with a seeded aspect ratio in [0.75, 1] and a seeded
    orientation: a size alone does not fix a shape, and a little variety keeps synthetic sets from being uniform.
    """
    if request.mask is not None:
        native = crop_at(request.mask.astype(np.float32), request.cx, request.cy, round(crop_size / scale))[0]
        pil = Image.fromarray(native, mode="F").resize((crop_size, crop_size), Image.BILINEAR)
        return (np.asarray(pil) >= 0.5).astype(np.float32)
    if request.diameter_px is None:
        raise DataError("a nodule request needs a diameter or a mask")
    rng = np.random.default_rng([request.seed, request.index, 7])
    radius = request.diameter_px * scale / 2
    aspect, theta = rng.uniform(0.75, 1.0), rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:crop_size, 0:crop_size] + 0.5 - crop_size / 2  # pixel centres relative to the crop centre
    u = xs * np.cos(theta) + ys * np.sin(theta)
    v = -xs * np.sin(theta) + ys * np.cos(theta)
    return ((u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1.0).astype(np.float32)


@torch.no_grad()
def generate_crops(eps_fn, scheduler, mask: torch.Tensor, context: torch.Tensor, seeds: list[int],
                   indices: list[int], eta: float = 0.0) -> torch.Tensor:
    """Run the reverse chain over `scheduler.timesteps` for a batch of crops.

    eps_fn(xt, t (B,), step_index) -> model output (B, 1, S, S); mask/context (B, 1, S, S) on the model's device.
    1. x_T ~ N(0, I) from each output's own generator                                  [DDPM Alg. 2 l.1]
    2. for each (t, t_prev): x_prev = step(model(x_t, t), t, x_t, noise from the same generators) [DDIM Eq. 12]
    Returns x0 (B, 1, S, S) in [-1, 1] (clamped: the data range).
    """
    device = mask.device
    gens = [output_generator(s, i) for s, i in zip(seeds, indices)]
    shape = (1, *mask.shape[1:])
    xt = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(device)  # (B, 1, S, S)
    ddpm = not isinstance(scheduler, DDIMScheduler)  # DDPM steps take no eta
    for k, t in enumerate(scheduler.timesteps.tolist()):
        out = eps_fn(xt, torch.full((len(xt),), t, dtype=torch.long, device=device), k)
        noise = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(device)
        if ddpm:
            xt = scheduler.step(out.float(), t, xt, noise=noise)
        else:
            xt = scheduler.step(out.float(), t, xt, eta=eta, noise=noise)
    return xt.clamp(-1, 1)


def feather(mask: np.ndarray, dilate_px: int) -> tuple[np.ndarray, np.ndarray]:
    """(region, weight): region = dilate(M, d) as bool; weight in [0, 1] = a blurred dilate(M, d/2), zero outside region."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, S, S)
    region = dilate(m, dilate_px)[0, 0].numpy() > 0.5
    inner = dilate(m, max(dilate_px // 2, 0))
    k = 2 * max(dilate_px // 2, 1) + 1
    weight = torch.nn.functional.avg_pool2d(inner, k, stride=1, padding=k // 2, count_include_pad=False)
    weight = np.maximum(weight[0, 0].numpy(), mask) * region  # full weight on M itself, 0 outside the region
    return region, weight.astype(np.float32)


def paste(image: np.ndarray, generated: np.ndarray, weight: np.ndarray, top: int, left: int) -> np.ndarray:
    """Blend `generated` into `image` at (top, left) with `weight`; pixels where weight == 0 stay bit-identical."""
    out = image.copy()
    h, w = image.shape
    s_h, s_w = weight.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + s_h, h), min(left + s_w, w)
    if y1 <= y0 or x1 <= x0:
        return out
    win = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
    wgt, gen = weight[win], generated[win]
    region = out[y0:y1, x0:x1]
    blended = region * (1 - wgt) + gen * wgt
    out[y0:y1, x0:x1] = np.where(wgt > 0, blended, region).astype(image.dtype)
    return out


def _resize(arr: np.ndarray, size: int, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(arr.astype(np.float32), mode="F").resize((size, size), resample), np.float32)


def insert_nodules(image: np.ndarray, requests: list[Request], generate, crop_size: int, scale: float = 1.0,
                   dilate_px: int = 2) -> tuple[np.ndarray, list[np.ndarray]]:
    """Insert every request into `image` (float32 (H, W) in [0, 1]); returns (new image, full-size bool masks).

    `scale` = working-resolution pixels per image pixel (1 when the image already has the model's spacing):
    the window of crop_size/scale image pixels around each centre is resampled to the crop size, generated at the
    working resolution, and only the change is resampled back, so anatomy is never blurred outside the nodule.
    `generate(masks (B,1,S,S), contexts (B,1,S,S), requests, originals (B,1,S,S)) -> x0 (B,1,S,S)` in [-1, 1]
    (the diffusion model sees only the masked context; the insertion baselines add onto the original crop).
    Requests are processed one after another so that overlapping nodules see each other.
    """
    out, full_masks = image.astype(np.float32).copy(), []
    native = max(1, round(crop_size / scale))
    for req in requests:
        patch, (top, left) = crop_at(out, req.cx, req.cy, native)
        work = _resize(patch, crop_size, Image.BOX) if native != crop_size else patch
        mask = request_mask(req, crop_size, scale)
        if mask.sum() == 0:
            raise DataError(f"nodule request at ({req.cx:.0f}, {req.cy:.0f}) has an empty mask")
        region, weight = feather(mask, dilate_px)
        x0 = torch.from_numpy(work * 2 - 1)[None, None]  # (1, 1, S, S) in [-1, 1]
        context = x0 * torch.from_numpy(1.0 - region.astype(np.float32))[None, None]
        gen = generate(torch.from_numpy(mask)[None, None], context, [req], x0)[0, 0].cpu().numpy()
        gen01 = (gen + 1) / 2
        if native != crop_size:  # resample the change and the weight back to the image's pixels
            delta = _resize(gen01 - work, native, Image.BILINEAR)
            weight = _resize(weight, native, Image.BILINEAR) * (_resize(region.astype(np.float32), native,
                                                                         Image.NEAREST) > 0)
            gen01 = patch + delta
            mask = _resize(mask, native, Image.BILINEAR)
        out = np.clip(paste(out, gen01, weight, top, left), 0.0, 1.0)
        full = paste(np.zeros_like(out), (mask >= 0.5).astype(np.float32), (mask >= 0.5).astype(np.float32),
                     top, left)
        full_masks.append(full > 0.5)
    return out, full_masks


def lung_field_mask(image: np.ndarray) -> np.ndarray:
    """A rough lung-field mask for random placement: dark (low-density) pixels inside the central thorax box.

    Lungs are the large dark areas of a CXR; we threshold a smoothed image at its 35th percentile inside the
    central 80 % × 70 % box and keep pixels at least 8 % of the width from the box edges.
    """
    h, w = image.shape
    smooth = torch.nn.functional.avg_pool2d(torch.from_numpy(image)[None, None], 9, 1, 4,
                                            count_include_pad=False)[0, 0].numpy()
    box = np.zeros_like(image, dtype=bool)
    box[int(0.15 * h):int(0.85 * h), int(0.12 * w):int(0.88 * w)] = True
    threshold = np.percentile(smooth[box], 35)
    return box & (smooth <= threshold)


def random_requests(image: np.ndarray, n: int, spacing_mm: float, rng: np.random.Generator,
                    vocab: dict[str, list[str]], attributes: dict[str, str] | None, diameter_mm: tuple[float, float],
                    seed: int, start_index: int, lung_mask: np.ndarray | None = None) -> list[Request]:
    """`n` requests at random lung-field positions with diameters uniform in `diameter_mm` (mm).

    Fixed `attributes` are used as given; attributes left out are drawn uniformly from the vocabulary.
    """
    lungs = lung_field_mask(image) if lung_mask is None else lung_mask
    ys, xs = np.nonzero(lungs)
    if len(ys) == 0:
        raise DataError("no lung field found to place nodules in")
    requests = []
    for k in range(n):
        j = rng.integers(len(ys))
        attrs = {name: (attributes or {}).get(name) or values[rng.integers(len(values))]
                 for name, values in vocab.items()}
        requests.append(Request(cx=float(xs[j]) + 0.5, cy=float(ys[j]) + 0.5,
                                diameter_px=float(rng.uniform(*diameter_mm)) / spacing_mm,
                                attributes=attrs, seed=seed, index=start_index + k))
    return requests


def contact_sheet(crops: list[np.ndarray], labels: list[str], path, columns: int = 8, zoom: int = 3) -> None:
    """A PNG grid of (S, S) crops in [0, 1], each with a short label underneath."""
    from PIL import ImageDraw

    from nodule_diffusion.common import atomic_path

    if not crops:
        return
    s = crops[0].shape[0] * zoom
    rows = (len(crops) + columns - 1) // columns
    sheet = Image.new("L", (columns * s, rows * (s + 12)), 0)
    draw = ImageDraw.Draw(sheet)
    for i, (crop, label) in enumerate(zip(crops, labels)):
        r, c = divmod(i, columns)
        tile = Image.fromarray((np.clip(crop, 0, 1) * 255).astype(np.uint8)).resize((s, s), Image.NEAREST)
        sheet.paste(tile, (c * s, r * (s + 12)))
        draw.text((c * s + 2, r * (s + 12) + s), label[: s // 6], fill=255)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
