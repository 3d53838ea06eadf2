"""Synthesis: from trained files to nodules inserted into full chest radiographs (design §4 "Synthesis").

Reading order (one call chain, sample.py → synthesize):
    build_generator   checkpoint + adapter files + --strategy → generate(masks, contexts, requests) -> crops
    generate_crops    the reverse chain (schedulers.sample_loop) for a batch of crops, noise seeded per (seed, index)
    request_mask      the requested nodule shape: a mask PNG, or an ellipse of a given diameter (seeded)
    paste             feathered paste-back: pixels outside the nodule region are bit-identical to the input
    model_inputs      the crop, mask, region and masked context the model sees for one request
    insert_nodules    crop → generate → paste for every request of one image, at any pixel spacing
    first_crops       the first nodule of up to FIRST_BATCH images generated in one batch
    random_requests   nodules drawn inside the lung fields (sizes and attribute mix configurable)
    synthesize        every image of a set: insert, write images (derived.write_derived: the source's format, its
                      stored values kept outside the nodules), annotations.csv, COCO JSON, contact sheet
    sample_grid / lora_grid   mask | real | generated grids written during and after training

Reproducibility (design §3): every output's noise comes from its own CPU generator seeded by (seed, index), and
the noise of every DDIM/DDPM step is drawn from it, so a result does not depend on batch size or device.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from nodule_diffusion import compose, derived
from nodule_diffusion.common import atomic_path, progress_options, save_image_png
from nodule_diffusion.data import (REGION_REACH, DataError, ImageRecord, Nodule, NoduleCrops, crop_at, nodule_region,
                                   read_image, surround_ring, write_annotations, write_coco)
from nodule_diffusion.diffusion import attr_tensor, load_model
from nodule_diffusion.schedulers import DDIMScheduler, sample_loop


# The default reverse chain: DDIM over 50 steps with η = 1, the DDPM-like stochastic chain [DDIM Eq. 16]. At the
# demo budget η = 0 (25 steps) kept an adapter's output near the conditional mean: the ground-glass LoCon LoRA
# (200 steps) scored 0.59 with η = 0 and 0.84 with η = 1, and mean |∇²| in the region was 0.151 / 0.125 against
# 0.151 on real crops (benchmarks/RESULTS.md, "Sampler"). Design §4 says DDIM or DDPM and leaves η open.
SAMPLE_STEPS, SAMPLE_ETA = 50, 1.0
# Adapter guidance g of every adapter strategy (compose.base_guided; 1 = the adapted model alone, the paper's):
# on the benchmark's models (64 nodules per value) g = 1.5 met 6 of the 8 single-value targets against 5 at g = 1,
# with a lower FD_judge for 6 of 8 values, and lifted `ortho`'s pairs from 0.45 to 0.60 both correct; g = 2 also
# met 6 but broke part-solid (0.66; 0.22 at g = 3), and every g > 1 weakened the three-attribute `ortho`
# (benchmarks/RESULTS.md, "Adapter guidance"). Strategies without adapters (base, cfg) do not use it.
ADAPTER_GUIDANCE = 1.5


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


def build_generator(ckpt: str, strategy: str, attributes: dict[str, str], lora_dir: Path, device,
                    steps: int = SAMPLE_STEPS, eta: float = SAMPLE_ETA, sampler: str = "ddim", guidance: float = 3.0,
                    compositional: bool = False, tau: int = 5, adapter_guidance: float = ADAPTER_GUIDANCE):
    """Returns (generate(masks, contexts, requests) -> x0 crops, model). Every file is checked before sampling.

    The model is rebuilt from the checkpoint alone (EMA weights); compose.eps_function loads the adapters the
    strategy needs and gives the ε of every step (with adapter_guidance ≠ 1, guided away from the base:
    compose.base_guided); generate_crops runs the reverse chain.
    """
    if strategy not in compose.STRATEGIES:
        raise DataError(f"--strategy {strategy!r}: choose one of {', '.join(compose.STRATEGIES)}")
    model, payload = load_model(ckpt, device)
    model.eval()
    if (strategy == "cfg") != (payload["kind"] == "cfg"):
        raise DataError(f"{ckpt}: strategy {strategy!r} needs a {'cfg' if strategy == 'cfg' else 'base'} "
                        f"checkpoint, this one is {payload['kind']!r}")
    eps_fn = compose.eps_function(model, payload["fingerprint"], strategy, attributes, Path(lora_dir), guidance,
                                  compositional, tau, steps, adapter_guidance)
    scheduler = model.diffusion.scheduler(sampler)
    scheduler.set_timesteps(steps)

    def generate(masks, contexts, requests, originals=None):  # originals: unused, the model sees only context
        masks, contexts = masks.to(device), contexts.to(device)
        return generate_crops(lambda xt, t, k: eps_fn(xt, t, k, masks, contexts), scheduler, masks, contexts,
                              [r.seed for r in requests], [r.index for r in requests], eta)

    return generate, model


@torch.no_grad()
def generate_crops(eps_fn, scheduler, mask: torch.Tensor, context: torch.Tensor, seeds: list[int],
                   indices: list[int], eta: float = 0.0) -> torch.Tensor:
    """Run the reverse chain over `scheduler.timesteps` for a batch of crops.

    eps_fn(xt, t (B,), step_index) -> model output (B, 1, S, S); mask/context (B, 1, S, S) on the model's device.
    1. x_T ~ N(0, I) from each output's own generator                                  [DDPM Alg. 2 l.1]
    2. schedulers.sample_loop: x_prev = step(model(x_t, t), t, x_t), fresh noise from the same generators
    Returns x0 (B, 1, S, S) in [-1, 1] (clamped: the data range). DDPM takes no η (ignored).
    """
    gens = [output_generator(s, i) for s, i in zip(seeds, indices)]
    shape = (1, *mask.shape[1:])
    xT = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(mask.device)  # (B, 1, S, S)
    eta = eta if isinstance(scheduler, DDIMScheduler) else 0.0
    x0 = sample_loop(lambda xt, t, k: eps_fn(xt, t, k).float(), scheduler, xT, eta, generator=gens)
    return x0.clamp(-1, 1)


def feather(mask: np.ndarray, reach: float = REGION_REACH) -> tuple[np.ndarray, np.ndarray]:
    """(region, weight) of an (S, S) mask: region = data.nodule_region(M) as bool (the same region the training crops
    regenerate); weight in [0, 1] = the region box-blurred over 3 px, 1 on M itself, 0 outside the region."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, S, S)
    region = nodule_region(m, reach)  # (1, 1, S, S) {0, 1}
    weight = torch.nn.functional.avg_pool2d(region, 3, stride=1, padding=1, count_include_pad=False)
    region = region[0, 0].numpy() > 0.5
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
    # = region·(1 − w) + gen·w, written so that it is never below region where gen ≥ region (w = 1: exactly gen)
    blended = np.where(wgt >= 1, gen, region + wgt * (gen - region))
    out[y0:y1, x0:x1] = np.where(wgt > 0, blended, region).astype(image.dtype)
    return out


def no_darker_than_surround(crop: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A nodule adds attenuation, so it is never less dense than the lung around it (design §4): when the mean
    of `crop` (S, S) inside the mask is below the mean of the ring 1–3 px outside it, the mask is lifted by the
    difference. [OURS] a faint (ground-glass) nodule on a background darker than its surround needs this."""
    ring, inside = surround_ring(mask > 0.5), mask > 0.5
    if not ring.any() or not inside.any():
        return crop
    deficit = float(crop[ring].mean() - crop[inside].mean())
    if deficit <= 0:
        return crop
    # + 1e-3 (0.1 % of the range; a quarter step of an 8-bit PNG, 4 of a 12-bit DICOM): the written, quantised
    # image must still pass the comparison
    return crop + (deficit + 1e-3) * inside.astype(crop.dtype)


def _resize(arr: np.ndarray, size: int, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(arr.astype(np.float32), mode="F").resize((size, size), resample), np.float32)


class ModelInputs(NamedTuple):
    """What the model sees for one request: patch = the native window around the centre, corner = its (top, left);
    work = the patch at the working resolution (S, S); mask, region, weight (S, S); x0, context (1, 1, S, S) in
    [-1, 1], the context zero inside the region."""

    patch: np.ndarray
    corner: tuple[int, int]
    work: np.ndarray
    mask: np.ndarray
    region: np.ndarray
    weight: np.ndarray
    x0: torch.Tensor
    context: torch.Tensor


def model_inputs(image: np.ndarray, req: Request, crop_size: int, scale: float,
                 reach: float = REGION_REACH) -> ModelInputs:
    """The ModelInputs of one request in `image` (float32 (H, W) in [0, 1]) at `scale` working px per image px."""
    native = max(1, round(crop_size / scale))
    patch, corner = crop_at(image, req.cx, req.cy, native)
    work = _resize(patch, crop_size, Image.BOX) if native != crop_size else patch
    mask = request_mask(req, crop_size, scale)
    if mask.sum() == 0:
        raise DataError(f"nodule request at ({req.cx:.0f}, {req.cy:.0f}) has an empty mask")
    region, weight = feather(mask, reach)
    x0 = torch.from_numpy(work * 2 - 1)[None, None]  # (1, 1, S, S) in [-1, 1]
    context = x0 * torch.from_numpy(1.0 - region.astype(np.float32))[None, None]
    return ModelInputs(patch, corner, work, mask, region, weight, x0, context)


def insert_nodules(image: np.ndarray, requests: list[Request], generate, crop_size: int, scale: float = 1.0,
                   reach: float = REGION_REACH, first: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Insert every request into `image` (float32 (H, W) in [0, 1]); returns (new image, full-size bool masks).

    `scale` = working-resolution pixels per image pixel (1 when the image already has the model's spacing):
    the window of crop_size/scale image pixels around each centre is resampled to the crop size, generated at the
    working resolution, and only the change is resampled back, so anatomy is never blurred outside the nodule.
    `generate(masks (B,1,S,S), contexts (B,1,S,S), requests, originals (B,1,S,S)) -> x0 (B,1,S,S)` in [-1, 1]
    (the diffusion model sees only the masked context; the insertion baselines add onto the original crop).
    Requests are processed one after another so that overlapping nodules see each other; `first` (S, S), if
    given, is the generated crop of requests[0] (its inputs depend on `image` alone; synthesize batches those).
    A nodule adds attenuation (design §4): only the generated excess over the original crop is pasted,
    max(generated − original, 0), so an insertion never lowers the density of any pixel, and the nodule is
    lifted where needed so that it is never less dense than the ring around it (no_darker_than_surround).
    """
    out, full_masks = image.astype(np.float32).copy(), []
    for i, req in enumerate(requests):
        patch, (top, left), work, mask, region, weight, x0, context = model_inputs(out, req, crop_size, scale, reach)
        native = patch.shape[0]  # the window's side in image pixels, as model_inputs chose it
        if i == 0 and first is not None:
            gen = first
        else:
            gen = generate(torch.from_numpy(mask)[None, None], context, [req], x0)[0, 0].cpu().numpy()
        gen01 = work + np.maximum((gen + 1) / 2 - work, 0.0)  # density only added
        if native != crop_size:  # resample the change and the weight back to the image's pixels
            delta = _resize(gen01 - work, native, Image.BILINEAR)
            weight = _resize(weight, native, Image.BILINEAR) * (_resize(region.astype(np.float32), native,
                                                                         Image.NEAREST) > 0)
            gen01 = patch + delta
            mask = _resize(mask, native, Image.BILINEAR)
        out = np.clip(paste(out, gen01, weight, top, left), 0.0, 1.0)
        full = paste(np.zeros_like(out), (mask >= 0.5).astype(np.float32), (mask >= 0.5).astype(np.float32),
                     top, left) > 0.5
        full_masks.append((full, top, left))
    # Last, every nodule against its ring on the image's own pixels: a later nodule's halo may brighten an
    # earlier one's ring, so the lift waits until all are pasted (and is repeated once for lifts that interact).
    for _ in range(2):
        for full, top, left in full_masks:
            out = _lift_in_window(out, full, top, left, native)
    return out, [full for full, _, _ in full_masks]


def _lift_in_window(image: np.ndarray, mask: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """no_darker_than_surround on the image's own pixels, in the window (+ 4 px for the ring) that holds the
    nodule: the comparison density_check makes on the written image. Applied at the model's resolution before
    pasting, it failed at other spacings (4 of 6 nodules at 0.7 mm/px and 5 of 6 at 0.35 mm were darker than
    their ring; tests/test_derived.py), because resampling moves the ring and the feathered paste dims it."""
    y0, x0 = max(top - 4, 0), max(left - 4, 0)
    y1, x1 = min(top + size + 4, image.shape[0]), min(left + size + 4, image.shape[1])
    window = image[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = np.clip(no_darker_than_surround(window, mask[y0:y1, x0:x1]), 0.0, 1.0)
    return image


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


# ----------------------------------------------------------------------------------------------- synthetic sets
# Images whose first nodule is generated in one batch: 1.9× faster than one at a time on one CPU thread, and at
# most this many source images (full-size DICOMs included) are held in memory at once.
FIRST_BATCH = 16


def first_crops(chunk, generate, crop_size: int) -> list[np.ndarray | None]:
    """The generated (S, S) crop of the first request of every image in `chunk` ((record, image, spacing, scale,
    requests) tuples), in one `generate` call: its inputs depend on the source image alone. None where no request.
    Each output's noise comes from its own (seed, index) generator, so batching changes no draw."""
    firsts = [None] * len(chunk)
    items = [(i, todo[0], model_inputs(image.astype(np.float32), todo[0], crop_size, scale))
             for i, (_, image, _, scale, todo) in enumerate(chunk) if todo]
    if not items:
        return firsts
    masks = torch.cat([torch.from_numpy(inputs.mask)[None, None] for _, _, inputs in items])  # (B, 1, S, S)
    contexts = torch.cat([inputs.context for _, _, inputs in items])                          # (B, 1, S, S)
    originals = torch.cat([inputs.x0 for _, _, inputs in items])                              # (B, 1, S, S)
    generated = generate(masks, contexts, [req for _, req, _ in items], originals)
    for (i, _, _), crop in zip(items, generated):
        firsts[i] = crop[0].cpu().numpy()
    return firsts


def synthesize(records: list[ImageRecord], generate, out_dir: Path, vocab: dict, spacing_mm: float,
               crop_size: int, attributes: dict, per_image: int, diameter_mm: tuple[float, float], seed: int,
               requests: dict | None = None, derived_out: bool = True,
               final_dir: Path | None = None) -> list[ImageRecord]:
    """Insert nodules into every record's image; write images, annotations.csv, annotations.json, contact sheet.

    requests: optional {image path: [Request, ...]} (from a requests CSV); else `per_image` random requests in
    the lung field. Output records keep the source nodules (extra synthetic=0) and add the inserted ones
    (synthetic=1, with seed and index). Images whose format can be written back losslessly (DICOM, 8/16-bit
    greyscale PNG, MetaImage, JSRT; derived.can_write_back) give a derived file of that format, identical to the
    source outside the inserted regions; JPEG, TIFF and colour sources (or derived_out=False) give 16-bit PNG.
    Output names `<stem>_<8 hex of the source path>_syn<seed>` stay apart when two sources share a file name.
    final_dir: where out_dir will be renamed to (sample.py writes into a temporary folder); source paths under
    out_dir are recorded as under final_dir.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out_records, sizes, crops, labels = [], [], [], []
    prepared = _prepared(records, requests, vocab, spacing_mm, attributes, per_image, diameter_mm, seed)
    bar = tqdm(total=len(records), desc="insert", **progress_options())
    while chunk := list(itertools.islice(prepared, FIRST_BATCH)):  # at most FIRST_BATCH source images in memory
        for (rec, image, spacing, scale, todo), first in zip(chunk, first_crops(chunk, generate, crop_size)):
            new_image, masks = insert_nodules(image, todo, generate, crop_size, scale, first=first)
            record, patches, names = _write_inserted(rec, image, new_image, todo, masks, spacing, out_dir, seed,
                                                     derived_out, final_dir)
            out_records.append(record)
            sizes.append(new_image.shape)
            crops += patches
            labels += names
            bar.update(1)
    bar.close()
    write_annotations(out_dir / "annotations.csv", out_records, vocab)
    write_coco(out_dir / "annotations.json", out_records, sizes)
    contact_sheet(crops[:64], labels[:64], out_dir / "contact_sheet.png")
    return out_records


def _prepared(records, requests, vocab, spacing_mm, attributes, per_image, diameter_mm, seed):
    """Yield (record, image, spacing, scale, requests) per record, read lazily, requests drawn in record order:
    the given ones, or `per_image` random ones in the lung field (one rng for the set, indices counting on)."""
    rng, index = np.random.default_rng(seed), 0
    for rec in records:
        image = read_image(rec.image, rec.frame)
        spacing = rec.spacing_mm or spacing_mm
        todo = (requests or {}).get(str(rec.image))
        if todo is None:
            # Label only what the model is asked for: `generate` conditions on `attributes` alone, so drawing the
            # other attributes at random would write labels the nodule was never generated with.
            requested = {a: vocab[a] for a in attributes}
            todo = random_requests(image, per_image, spacing, rng, requested, attributes, diameter_mm, seed, index)
        index += len(todo)
        yield rec, image, spacing, spacing / spacing_mm, todo  # scale: working pixels per image pixel


def _write_inserted(rec: ImageRecord, image, new_image, todo: list[Request], masks, spacing: float, out_dir: Path,
                    seed: int, derived_out: bool, final_dir: Path | None):
    """Write one image with its inserted nodules (masks as PNGs) and return (its record, contact-sheet crops,
    their labels). Source nodules are kept with extra synthetic=0, inserted ones get synthetic=1, seed, index."""
    source = Path(rec.image)
    if final_dir is not None and Path(out_dir).resolve() in source.resolve().parents:
        source = Path(final_dir).resolve() / source.resolve().relative_to(Path(out_dir).resolve())
    tag = hashlib.sha256(f"{source}|{rec.frame}".encode()).hexdigest()[:8]  # same name, other folder or frame
    stem = f"{source.stem}_{tag}_syn{seed}"
    write_back = derived_out and derived.can_write_back(rec.image)
    target = out_dir / "images" / (stem + (derived.derived_suffix(rec.image) if write_back else ".png"))
    nodules = [replace(n, extra={**n.extra, "synthetic": "0"}) for n in rec.nodules]
    patches, names = [], []  # contact-sheet crops and their labels
    for req, mask in zip(todo, masks):
        ys, xs = np.nonzero(mask)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        mask_path = out_dir / "masks" / f"{stem}_{req.index}.png"
        save_image_png(mask_path, mask.astype(np.uint8) * 255)
        nodules.append(Nodule(box=box, attributes=dict(req.attributes), mask=mask_path,
                              diameter_mm=None if req.diameter_px is None else req.diameter_px * spacing,
                              extra={"synthetic": "1", "seed": str(req.seed), "index": str(req.index),
                                     "source": str(source)}))
        patches.append(image_crop(new_image, box))
        names.append(",".join(v[:5] for v in req.attributes.values()) or "nodule")
    if write_back:  # the source's stored values outside the nodules, bit for bit, at native resolution
        desc = "; ".join(f"nodule {n.extra.get('index')} {n.attributes} box {[round(v) for v in n.box]}"
                         for n in nodules if n.extra.get("synthetic") == "1")
        derived.write_derived(rec.image, image, new_image, new_image != image, target, frame=rec.frame,
                              description=f"nodule_diffusion synthetic: {desc}")
    else:
        save_image_png(target, new_image)
    record = ImageRecord(image=target, nodules=nodules, spacing_mm=spacing, frame=rec.frame if write_back else None)
    return record, patches, names


def image_crop(image: np.ndarray, box, size: int = 40) -> np.ndarray:
    return crop_at(image, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, size)[0]


# ----------------------------------------------------------------------------------------------- grids
@torch.no_grad()
def generate_for(model, crops, indices, attrs, steps=SAMPLE_STEPS, seed=0, sampler="ddim", eta=SAMPLE_ETA,
                 eps=None):
    """Generate crops for dataset items `indices` (their masks and contexts) with the given attribute rows, or
    with eps(x_t, t, k, masks, contexts) (compose.eps_function's form) in place of the model told `attrs`."""
    batch = crops.get(torch.as_tensor(indices))
    device = next(model.parameters()).device
    scheduler = model.diffusion.scheduler(sampler)
    scheduler.set_timesteps(steps)
    mask, context = batch["mask"].to(device), batch["context"].to(device)
    attrs = attrs.to(device)
    if eps is None:
        eps = lambda xt, t, k, masks, contexts: model(xt, t, masks, contexts, attrs)  # noqa: E731
    x0 = generate_crops(lambda xt, t, k: eps(xt, t, k, mask, context), scheduler, mask, context,
                        [seed] * len(indices), list(indices), eta)
    return batch, x0.cpu()


def triplet_grid(batch, x0, path, labels):
    """mask | real | generated, where "generated" is what insertion keeps: the model's pixels inside the nodule
    region, the real context outside it."""
    tiles, names = [], []
    pasted = batch["context"] + batch["region"] * x0  # context is zero inside the region
    for i in range(len(x0)):
        tiles += [batch["mask"][i, 0].numpy(), (batch["x0"][i, 0].numpy() + 1) / 2, (pasted[i, 0].numpy() + 1) / 2]
        names += ["mask", "real", labels[i]]
    contact_sheet(tiles, names, path, columns=9)


def sample_grid(model, crops: NoduleCrops, path: Path, n: int = 9) -> None:
    """PNG grid of mask | real | generated triplets for the first n crops, generic token (the base stage)."""
    idx = list(range(min(n, len(crops))))
    attrs = attr_tensor({}, model.vocab, len(idx), "cpu")
    batch, x0 = generate_for(model, crops, idx, attrs)
    triplet_grid(batch, x0, path, ["generated"] * len(idx))


def lora_grid(model, crops: NoduleCrops, name: str, path: Path, adapter_guidance: float = 1.0, base=None,
              n: int = 9) -> None:
    """PNG grid for one attribute adapter: masks of nodules *without* the value, generated *with* it; with
    adapter_guidance ≠ 1 guided away from `base`, the model without adapters (compose.base_guided; train.py
    passes sample.py's default, ADAPTER_GUIDANCE)."""
    attribute, value = name.split("=", 1)
    k = list(model.vocab).index(attribute)
    other = torch.nonzero(crops.attrs[:, k] != model.vocab[attribute].index(value)).flatten()[:n].tolist()
    idx = other or list(range(min(n, len(crops))))
    attrs = attr_tensor({attribute: value}, model.vocab, len(idx), "cpu")
    model.eval()
    eps = None
    if adapter_guidance != 1:
        if base is None:
            raise ValueError("lora_grid: adapter_guidance ≠ 1 needs the base model (without adapters)")
        base.eval()
        eps = compose.base_guided(compose.guided_eps(model, {attribute: value}, None, False), base, adapter_guidance)
    batch, x0 = generate_for(model, crops, idx, attrs, eps=eps)
    triplet_grid(batch, x0, path, [value] * len(idx))
