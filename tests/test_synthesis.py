"""Tests for nodule_diffusion.synthesis (and its generator, build_generator): insertion leaves every pixel outside the
nodule region bit-identical, noise is seeded per output so batch size does not matter, requested shapes
have the requested size, and the feathered paste is exact where its weight is 0 or 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nodule_diffusion import synthesis
from nodule_diffusion.data import DEFAULT_VOCAB, DataError, crop_at, dilate, nodule_region, region_px
from nodule_diffusion.schedulers import DDIMScheduler, DDPMScheduler
from nodule_diffusion.synthesis import (Request, feather, generate_crops, insert_nodules, paste, random_requests,
                                        request_mask)

S = 16  # crop size of the tiny model


def background(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.6, (h, w)).astype(np.float32)


def white(masks, contexts, requests, originals=None):
    """A stand-in generator: every crop pixel at the top of the range (+1), so every blended pixel changes."""
    return torch.ones(len(requests), 1, *masks.shape[2:])


def dilate_np(mask: np.ndarray, pixels: int) -> np.ndarray:
    return dilate(torch.from_numpy(mask.astype(np.float32))[None, None], pixels)[0, 0].numpy() > 0.5


def region_np(mask: np.ndarray) -> np.ndarray:
    return nodule_region(torch.from_numpy(mask.astype(np.float32))[None, None])[0, 0].numpy() > 0.5


def requested_region(shape, req: Request) -> np.ndarray:
    """nodule_region(M) of a request at scale 1, in image coordinates (clipped where the window leaves the image).

    Built from the requested mask itself rather than from the in-image part returned by insert_nodules, because
    near the border the dilation of the part of M that lies outside the image may reach into it.
    """
    region = region_np(request_mask(req, S, 1.0))
    top, left = crop_at(np.zeros(shape, np.float32), req.cx, req.cy, S)[1]
    out = np.zeros(shape, bool)
    for y, x in zip(*np.nonzero(region)):
        if 0 <= top + y < shape[0] and 0 <= left + x < shape[1]:
            out[top + y, left + x] = True
    return out


# ----------------------------------------------------------------------------------------------- paste, feather
@pytest.mark.parametrize("top, left", [(10, 12), (-5, 50), (58, -7), (100, 100), (-40, 0)])
def test_paste_with_zero_weight_is_the_identity(top, left):
    image = background(48, 60)
    generated = np.random.default_rng(1).uniform(-5, 5, (S, S)).astype(np.float32)
    out = paste(image, generated, np.zeros((S, S), np.float32), top, left)
    assert out.dtype == image.dtype and np.array_equal(out, image)
    assert out is not image  # a copy: the caller's image is never modified


def test_paste_with_unit_weight_copies_the_window():
    image = background(48, 60)
    generated = np.random.default_rng(1).uniform(0, 1, (S, S)).astype(np.float32)
    out = paste(image, generated, np.ones((S, S), np.float32), -3, 50)  # window overlaps the top-right corner
    assert np.array_equal(out[0:13, 50:60], generated[3:16, 0:10])
    untouched = np.ones_like(image, bool)
    untouched[0:13, 50:60] = False
    assert np.array_equal(out[untouched], image[untouched])


def test_feather_is_one_on_the_mask_and_zero_outside_the_region():
    mask = np.zeros((S, S), np.float32)
    mask[6:10, 5:11] = 1
    region, weight = feather(mask)
    assert np.array_equal(region, region_np(mask))
    assert np.all(weight[mask > 0] == 1.0) and np.all(weight[~region] == 0.0)
    assert weight.min() >= 0 and weight.max() <= 1
    assert ((weight > 0) & (weight < 1)).any()  # a feathered edge, not a hard cut


# ----------------------------------------------------------------------------------------------- request masks
@pytest.mark.parametrize("diameter_px, scale", [(20.0, 1.0), (10.0, 2.0), (60.0, 0.5)])
def test_request_mask_ellipse_has_the_requested_size(diameter_px, scale):
    """Ellipse with semi-axes r and r·aspect, r = d·scale/2: area = π r² · aspect.

    The aspect ratio is seeded, so it is measured from the mask's second moments (a filled ellipse with semi-axes
    a ≥ b has covariance eigenvalues a²/4 and b²/4) and then the area and the major axis are checked against it.
    """
    r = diameter_px * scale / 2
    for index in range(5):
        mask = request_mask(Request(32, 32, diameter_px=diameter_px, seed=3, index=index), 48, scale)
        assert mask.shape == (48, 48) and set(np.unique(mask)) <= {0.0, 1.0}
        ys, xs = np.nonzero(mask)
        cov = np.cov(np.stack([xs, ys]).astype(np.float64))
        small, large = np.linalg.eigvalsh(cov)
        a, aspect = 2 * math.sqrt(large), math.sqrt(small / large)
        assert a == pytest.approx(r, rel=0.04)
        assert 0.74 <= aspect <= 1.0 + 1e-9
        assert mask.sum() == pytest.approx(math.pi * r * r * aspect, rel=0.04)
        assert xs.mean() + 0.5 == pytest.approx(24, abs=0.3) and ys.mean() + 0.5 == pytest.approx(24, abs=0.3)


def test_request_mask_from_a_mask_file_is_its_crop():
    full = np.zeros((64, 64), bool)
    full[28:35, 30:38] = True
    mask = request_mask(Request(34.0, 31.5, mask=full), S, 1.0)
    expected = crop_at(full.astype(np.float32), 34.0, 31.5, S)[0]
    assert np.array_equal(mask, expected) and mask.sum() == full.sum()
    with pytest.raises(DataError, match="diameter or a mask"):
        request_mask(Request(10, 10), S, 1.0)


# ----------------------------------------------------------------------------------------------- insertion
def test_insert_leaves_pixels_outside_the_nodule_region_bit_identical():
    image = background()
    requests = [Request(30.0, 28.0, diameter_px=8.0, index=0), Request(1.5, 40.0, diameter_px=10.0, index=1),
                Request(63.0, 63.0, diameter_px=9.0, index=2)]  # interior, left border, bottom-right corner
    out, masks = insert_nodules(image, requests, white, S, scale=1.0)
    changed = out != image
    allowed = np.zeros_like(changed)
    for req, mask in zip(requests, masks):
        region = requested_region(image.shape, req)
        assert mask.dtype == bool and mask.any() and not (mask & ~region).any()
        assert np.all(out[mask] == 1.0)  # the weight is 1 on M: the generated (white) value is used there
        allowed |= region
    assert changed.any() and not (changed & ~allowed).any()
    # An interior nodule alone: the returned mask's region bounds the change, and the change fills M.
    alone, (mask,) = insert_nodules(image, requests[:1], white, S, scale=1.0)
    assert not ((alone != image) & ~region_np(mask)).any() and (alone != image)[mask].all()
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_insert_at_another_pixel_spacing_changes_only_the_nodule(scale):
    """scale = working px per image px. The change is resampled back; only pixels near the nodule may change."""
    image = background()
    req = Request(33.0, 30.0, diameter_px=10.0 / scale, index=0)  # 10 working px across at any scale
    out, (mask,) = insert_nodules(image, [req], white, S, scale=scale)
    changed = out != image
    reach = int(region_px(torch.from_numpy(request_mask(req, S, scale))[None, None]))  # working px
    margin = math.ceil(reach / scale) + 1  # the region's reach in image px, plus one pixel for resampling
    assert changed.any() and not (changed & ~dilate_np(mask, margin)).any()
    native = round(S / scale)
    top, left = crop_at(image, req.cx, req.cy, native)[1]
    window = np.zeros_like(changed)
    window[top:top + native, left:left + native] = True
    assert not (changed & ~window).any()
    diameter = 2 * math.sqrt(mask.sum() / math.pi)  # in image pixels
    assert diameter == pytest.approx(10.0 / scale, rel=0.25)


def test_insert_refuses_an_empty_mask():
    with pytest.raises(DataError, match="empty mask"):
        insert_nodules(background(), [Request(30, 30, mask=np.zeros((64, 64), bool))], white, S)


def test_random_requests_fall_in_the_lung_field_with_requested_sizes():
    image = background()
    lungs = np.zeros((64, 64), bool)
    lungs[20:40, 10:30] = True
    rng = np.random.default_rng(0)
    reqs = random_requests(image, 20, 1.4, rng, DEFAULT_VOCAB, {"texture": "ground_glass"}, (7.0, 14.0), seed=9,
                           start_index=5, lung_mask=lungs)
    assert [r.index for r in reqs] == list(range(5, 25)) and all(r.seed == 9 for r in reqs)
    for r in reqs:
        assert lungs[int(r.cy), int(r.cx)]
        assert 7.0 / 1.4 <= r.diameter_px <= 14.0 / 1.4
        assert r.attributes["texture"] == "ground_glass"
        assert all(r.attributes[a] in values for a, values in DEFAULT_VOCAB.items())


# ----------------------------------------------------------------------------------------------- seeded generation
def _masks_and_contexts(n: int):
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(n, 1, S, S, generator=g) > 0.6).float()
    return masks, torch.rand(n, 1, S, S, generator=g) * 2 - 1


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_generate_crops_does_not_depend_on_batch_size(sampler, eta):
    """A per-element ε function: batch 4 and four batches of 1 give bit-identical crops (fresh noise included)."""
    scheduler = DDIMScheduler() if sampler == "ddim" else DDPMScheduler()
    scheduler.set_timesteps(6)
    masks, contexts = _masks_and_contexts(4)

    def eps_fn(xt, t, k):
        return 0.3 * xt + 0.01 * t[:, None, None, None] / 1000

    together = generate_crops(eps_fn, scheduler, masks, contexts, [11] * 4, [0, 1, 2, 3], eta)
    alone = torch.cat([generate_crops(eps_fn, scheduler, masks[i:i + 1], contexts[i:i + 1], [11], [i], eta)
                       for i in range(4)])
    assert torch.equal(together, alone)
    assert together.min() >= -1 and together.max() <= 1


def test_model_generation_is_batch_independent_and_reproducible(tiny_base, tmp_path):
    """The real tiny model through synthesis.build_generator: batch 1 vs 4, repeat, and another seed."""
    generate, _ = synthesis.build_generator(str(tiny_base), "base", {}, tmp_path / "lora", torch.device("cpu"),
                                          steps=4)
    masks, contexts = _masks_and_contexts(4)
    reqs = [Request(0, 0, diameter_px=5, seed=3, index=i) for i in range(4)]
    together = generate(masks, contexts, reqs)
    alone = torch.cat([generate(masks[i:i + 1], contexts[i:i + 1], [reqs[i]]) for i in range(4)])
    # Different batch sizes may take different float kernels, so allow float32 round-off, nothing more.
    assert (together - alone).abs().max() <= 1e-5
    assert torch.equal(generate(masks, contexts, reqs), together)  # reproducible
    other = generate(masks, contexts, [Request(0, 0, diameter_px=5, seed=4, index=i) for i in range(4)])
    assert (other - together).abs().amax(dim=(1, 2, 3)).min() > 0.1  # every output differs under another seed
    shifted = generate(masks, contexts, [Request(0, 0, diameter_px=5, seed=3, index=i + 1) for i in range(4)])
    assert (shifted - together).abs().amax(dim=(1, 2, 3)).min() > 0.1  # and under another index


def test_synthesize_batches_first_nodules_without_changing_the_result(tiny_base, disk_records, tmp_path,
                                                                        monkeypatch):
    """synthesis.first_crops generates the first nodule of up to FIRST_BATCH images in one call; the images
    written equal those of one-at-a-time generation to float32 round-off, and the annotations are identical."""
    from PIL import Image

    from conftest import CROP_SIZE, IMAGE_SIZE, SPACING_MM

    generate, model = synthesis.build_generator(str(tiny_base), "base", {}, tmp_path / "lora", torch.device("cpu"),
                                              steps=4)
    batch_sizes = []

    def counted(masks, contexts, reqs, originals=None):
        batch_sizes.append(len(reqs))
        return generate(masks, contexts, reqs, originals)

    records = disk_records[:5]
    c = IMAGE_SIZE / 2
    requests = {str(r.image): [Request(c, c, diameter_px=5, seed=2, index=2 * i),
                               Request(c / 2, c / 2, diameter_px=4, seed=2, index=2 * i + 1)]
                for i, r in enumerate(records)}

    def run(folder, first_batch):
        monkeypatch.setattr(synthesis, "FIRST_BATCH", first_batch)
        out = synthesis.synthesize(records, counted, tmp_path / folder, model.vocab, SPACING_MM, CROP_SIZE, {}, 2,
                                   (4.0, 6.0), 2, requests=requests, derived_out=False)
        pixels = [np.asarray(Image.open(r.image), dtype=np.float64) / 65535 for r in out]
        assert all(0.1 < p.mean() < 0.9 for p in pixels)  # 16-bit PNGs read back in [0, 1]
        return pixels, (tmp_path / folder / "annotations.csv").read_text().replace(folder, "F")

    batch_sizes.clear()
    batched, csv_batched = run("batched", 16)
    assert batch_sizes == [5] + [1] * 5  # the five first nodules together, the second ones after them, one each
    batch_sizes.clear()
    single, csv_single = run("single", 1)
    assert batch_sizes == [1] * 10
    assert csv_batched == csv_single
    assert max(np.abs(a - b).max() for a, b in zip(batched, single)) <= 2 / 65535  # 16-bit PNG round-off
