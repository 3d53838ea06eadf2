"""Tests for nodule_diffusion.phantom: determinism, geometry of the ground truth, attribute signatures, disk I/O.

Expected values come from the spec, not from the generator's output: the analytic nodule tests check areas
against π·R² and peaks against the documented signature levels; the statistical tests check the documented
orderings (ground glass fainter than solid, spiculated rougher than smooth, calcified brighter than none) on
many nodules. Small images (96-128 px at a coarser spacing, so nodules keep their size in mm) keep this fast.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import oracle
from nodule_diffusion import phantom
from nodule_diffusion.data import DEFAULT_VOCAB, DataError, read_annotations, read_image
from nodule_diffusion.phantom import PhantomConfig, draw_nodule, image_rng, make_dataset, make_image

SMALL = dict(size=96, spacing_mm=3.5)        # 8-24 mm nodules are 2.3-6.9 px here
MEDIUM = dict(size=128, spacing_mm=2.8)


def _images(seed, n, **options):
    config = PhantomConfig(**options)
    return [make_image(image_rng(seed, i), config) for i in range(n)]


def _same(a, b):
    image_a, nodules_a, lung_a = a
    image_b, nodules_b, lung_b = b
    return (np.array_equal(image_a, image_b) and np.array_equal(lung_a, lung_b) and len(nodules_a) == len(nodules_b)
            and all(x["box"] == y["box"] and x["attributes"] == y["attributes"] and np.array_equal(x["mask"], y["mask"])
                    for x, y in zip(nodules_a, nodules_b)))


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_image_and_different_seeds_differ():
    config = PhantomConfig(**MEDIUM)
    first = make_image(image_rng(3, 7), config)
    assert _same(first, make_image(image_rng(3, 7), config))
    assert first[0].dtype == np.float32 and first[0].shape == (128, 128)
    assert 0.0 <= first[0].min() and first[0].max() <= 1.0
    for other in (image_rng(4, 7), image_rng(3, 8)):
        image = make_image(other, config)[0]
        assert np.abs(image - first[0]).mean() > 0.01       # other anatomy, not just other noise


def test_image_i_does_not_depend_on_n_images(tmp_path):
    make_dataset(tmp_path / "a", 2, seed=11, progress=False, **SMALL)
    make_dataset(tmp_path / "b", 5, seed=11, progress=False, **SMALL)
    for name in ("phantom_00000.png", "phantom_00001.png"):
        a = np.asarray(Image.open(tmp_path / "a" / "images" / name))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / "images" / name)))


# ------------------------------------------------------------------------------------------ ground-truth geometry
def test_masks_boxes_inside_lungs_and_image():
    scipy_ndimage = oracle("scipy.ndimage", reason="scipy is the connected-component oracle")
    count = 0
    for image, nodules, lung in _images(0, 30, negative_fraction=0.0, max_nodules=3, **MEDIUM):
        assert lung.dtype == bool and lung.shape == image.shape and lung.any()
        for nodule in nodules:
            mask, (x0, y0, x1, y1) = nodule["mask"], nodule["box"]
            ys, xs = np.nonzero(mask)
            assert mask.dtype == bool and mask.any()
            assert np.all(lung[mask]), "nodule leaves the lung field"
            assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]
            # the box is the mask's tight box in the pixel-edge convention (x1, y1 exclusive)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            # one 8-connected piece: spikes are attached to the body
            _, n_parts = scipy_ndimage.label(mask, structure=np.ones((3, 3)))
            assert n_parts == 1
            assert 8.0 <= nodule["diameter_mm"] <= 24.0
            count += 1
        coverage = sum((n["mask"].astype(int) for n in nodules), np.zeros(image.shape, int))
        assert coverage.max() <= 1, "nodules overlap"
    assert count > 40


def test_every_attribute_value_appears_and_negative_fraction():
    results = _images(1, 240, **SMALL)
    seen = {(a, v) for _, nodules, _ in results for n in nodules for a, v in n["attributes"].items()}
    assert seen == {(a, v) for a, values in DEFAULT_VOCAB.items() for v in values}
    for _, nodules, _ in results:
        assert len(nodules) <= 2
        for n in nodules:
            assert set(n["attributes"]) == set(DEFAULT_VOCAB)
    negatives = sum(not nodules for _, nodules, _ in results)
    # 240 draws at p = 0.25: sd ≈ 6.7 images, so ±25 is > 3.5 sd
    assert abs(negatives - 60) < 25
    assert all(not n for _, n, _ in _images(2, 10, negative_fraction=1.0, **SMALL))
    assert all(n for _, n, _ in _images(2, 10, negative_fraction=0.0, **SMALL))


# ------------------------------------------------------------------------------------------ signatures
def _draw_alone(attributes, diameter_px=14.0, seed=0):
    """A nodule of contrast C = 0.2 drawn on a black 64×64 image at its centre: (added density, mask)."""
    image = np.zeros((64, 64), np.float32)
    config = PhantomConfig(contrast=(0.2, 0.2))
    mask = draw_nodule(image, (32.0, 32.0), diameter_px, attributes, np.random.default_rng(seed), config)
    return image, mask


def test_draw_nodule_analytic_signatures():
    for seed in range(5):
        plain = {"texture": "solid", "margin": "well_defined", "calcification": "none"}
        solid, mask = _draw_alone(plain, seed=seed)
        # the body has the area π·R² (ellipse of equal area), R = 7 px, up to the pixel raster
        assert abs(mask.sum() - np.pi * 7.0 ** 2) < 0.12 * np.pi * 7.0 ** 2
        assert 0.2 * 0.9 <= solid.max() <= 0.2 * (1 + 0.05 * 3 / 1.22)     # solid: C, ±5 % mottle (3 waves)
        assert np.median(solid[mask]) > 0.75 * 0.2
        assert np.all(solid[~mask] < 0.5 * 0.2)                            # sharp edge: little outside
        glass, glass_mask = _draw_alone({**plain, "texture": "ground_glass"}, seed=seed)
        assert 0.2 < glass[glass_mask].mean() / solid[mask].mean() < 0.45  # ~1/3 of solid
        part, part_mask = _draw_alone({**plain, "texture": "part_solid"}, seed=seed)
        assert part.max() > 0.8 * 0.2                                      # dense core ...
        assert np.percentile(part[part_mask], 25) < 0.4 * 0.2              # ... in a faint rest
        calc, calc_mask = _draw_alone({**plain, "calcification": "calcified"}, seed=seed)
        assert calc.max() > 2.0 * 0.2                                      # well above the body's peak
        # margins draw beyond the body; the body mask is the same whatever the margin (same seed, same shape)
        spiky, spiky_mask = _draw_alone({**plain, "margin": "spiculated"}, seed=seed)
        blurred, blurred_mask = _draw_alone({**plain, "margin": "ill_defined"}, seed=seed)
        outside = ~mask & (np.hypot(*np.mgrid[0:64, 0:64] - 31.5) < 7 * 2)
        assert (spiky[outside] > 0.05 * 0.2).sum() > 3 * (solid[outside] > 0.05 * 0.2).sum() + 10   # spikes reach out
        assert blurred[outside].sum() > 3 * solid[outside].sum()           # a blurred border spills out
        for other in (spiky_mask, blurred_mask, glass_mask, part_mask, calc_mask):
            assert np.array_equal(other, mask)                             # no attribute changes the mask
    with pytest.raises(DataError, match="known"):
        _draw_alone({"texture": "cavitary"})


def _roughness(mask):
    """Perimeter² / (4π·area) with the 4-neighbour pixel-edge perimeter: ≈ 1.3-1.8 for a rastered disc."""
    perimeter = (mask[1:] != mask[:-1]).sum() + (mask[:, 1:] != mask[:, :-1]).sum()
    return perimeter ** 2 / (4 * np.pi * mask.sum())


def test_signatures_measurable_on_many_nodules():
    stats = {}
    for image, nodules, _ in _images(5, 60, negative_fraction=0.0, max_nodules=2):
        for n in nodules:
            mask, (x0, y0, x1, y1) = n["mask"], map(int, n["box"])
            ring = np.zeros_like(mask)
            ring[max(y0 - 6, 0):y1 + 6, max(x0 - 6, 0):x1 + 6] = True
            near = ring.copy()
            ring[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = False
            near[ring] = False
            near[mask] = False                                             # 0-3 px beyond the box, outside the body
            background = np.median(image[ring])
            values = dict(contrast=image[mask].mean() - background,
                          peak=np.percentile(image[mask], 98) - background,
                          spill=image[near].mean() - background, rough=_roughness(mask))
            for attribute, value in n["attributes"].items():
                for key, x in values.items():
                    stats.setdefault((attribute, value, key), []).append(x)
    med = {k: float(np.median(v)) for k, v in stats.items()}
    assert min(len(v) for v in stats.values()) >= 15
    assert med["texture", "ground_glass", "contrast"] < 0.5 * med["texture", "solid", "contrast"]
    assert med["texture", "part_solid", "contrast"] < med["texture", "solid", "contrast"]
    assert med["margin", "spiculated", "spill"] > 2.0 * med["margin", "well_defined", "spill"]
    assert med["margin", "ill_defined", "spill"] > 2.0 * med["margin", "well_defined", "spill"]
    assert med["calcification", "calcified", "peak"] > 1.5 * med["calcification", "none", "peak"]
    # the outline is shape, not margin: mask roughness is the same for every margin value (within sampling noise)
    rough = [med["margin", v, "rough"] for v in ("well_defined", "ill_defined", "spiculated")]
    assert max(rough) < 1.15 * min(rough)


# ------------------------------------------------------------------------------------------ vocabulary and config
def test_vocabulary_from_config():
    with pytest.raises(DataError, match="texture='cavitary'.*known: texture=solid"):
        PhantomConfig(vocab={"texture": ["solid", "cavitary"]})
    with pytest.raises(DataError, match="location"):
        PhantomConfig(vocab={"location": ["upper"]})
    with pytest.raises(DataError, match="attribute_weights"):
        PhantomConfig(attribute_weights={"texture": [1.0, 1.0]})
    with pytest.raises(DataError):
        PhantomConfig(diameter_mm=(8.0, 4.0))
    # a subset vocabulary: only that attribute is drawn (the rest keeps the default look), with weights
    vocab = {"texture": ["solid", "ground_glass"]}
    results = _images(3, 12, vocab=vocab, attribute_weights={"texture": [0.0, 1.0]}, negative_fraction=0.0, **SMALL)
    assert all(n["attributes"] == {"texture": "ground_glass"} for _, nodules, _ in results for n in nodules)


# ------------------------------------------------------------------------------------------ disk
def test_make_dataset_round_trip(tmp_path):
    csv_path = make_dataset(tmp_path, 6, seed=2, progress=False, negative_fraction=0.3, **SMALL)
    assert csv_path == tmp_path / "annotations.csv"
    records = read_annotations(csv_path, DEFAULT_VOCAB)
    assert [r.image.name for r in records] == [f"phantom_{i:05d}.png" for i in range(6)]
    config = PhantomConfig(negative_fraction=0.3, **SMALL)
    for i, record in enumerate(records):
        image, nodules, _ = make_image(image_rng(2, i), config)
        with Image.open(record.image) as pil:
            assert pil.mode.startswith("I;16") and np.asarray(pil).dtype == np.uint16
        assert np.abs(read_image(record.image) - image).max() <= 0.5 / 65535 + 1e-6
        assert record.spacing_mm == pytest.approx(3.5)
        assert len(record.nodules) == len(nodules)
        for written, nodule in zip(record.nodules, nodules):
            assert written.box == pytest.approx(nodule["box"])
            assert written.attributes == nodule["attributes"]
            assert written.diameter_mm == pytest.approx(nodule["diameter_mm"], abs=0.01)
            mask = np.asarray(Image.open(written.mask))
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
            assert np.array_equal(mask > 0, nodule["mask"])


def test_interrupted_run_leaves_no_csv(tmp_path, monkeypatch):
    make_dataset(tmp_path, 2, seed=0, progress=False, **SMALL)                # a complete earlier run
    calls = []

    def failing(rng, config):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return make_image(rng, config)

    monkeypatch.setattr(phantom, "make_image", failing)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(tmp_path, 4, seed=0, progress=False, **SMALL)
    assert not (tmp_path / "annotations.csv").exists()
    with pytest.raises(DataError, match="unknown"):
        make_dataset(tmp_path, 1, seed=0, progress=False, bogus=1)


def test_cli_writes_dataset_and_preview(tmp_path, capsys):
    phantom.main(["--out_dir", str(tmp_path), "--n_images", "3", "--seed", "1", "--size", "96",
                  "--spacing_mm", "3.5", "--no_progress", "--preview"])
    assert len(read_annotations(tmp_path / "annotations.csv", DEFAULT_VOCAB)) == 3
    with Image.open(tmp_path / "preview.png") as sheet:
        assert sheet.mode == "L" and sheet.width > 8 * 96 and sheet.height > 8 * 96   # 8 value rows + images
    with pytest.raises(SystemExit) as exit_info:
        phantom.run_cli(lambda: phantom.main(["--out_dir", str(tmp_path / "x"), "--size", "10"]))
    assert exit_info.value.code == 2 and "size >= 64" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ mask independence
def test_no_attribute_is_readable_from_the_mask(tmp_path):
    """Design §3 / issue 10: a random forest on mask-shape features reads no attribute better than chance + 0.10
    on a held-out seed (benchmarks/mask_independence.py runs the same check at a larger size)."""
    oracle("sklearn", "the random forest of the mask-only control")
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from mask_independence import features_and_labels, mask_only_accuracy
    train = features_and_labels(tmp_path / "a", 200, 0)
    test = features_and_labels(tmp_path / "b", 150, 1)
    for name, r in mask_only_accuracy(train, test).items():
        assert r["accuracy"] <= r["chance"] + 0.10, (name, r)
