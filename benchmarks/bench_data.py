"""Throughput of the cached crop dataset `data.NoduleCrops.get` (the diffusion training input pipeline).

Builds a NoduleCrops cache from a few phantom CXRs (`phantom.make_dataset`, or, with --source synthetic, from
noise images with elliptical nodules written here), then times batches of --batch random indices through
`.get`, with augmentation (random shifts and flips from a seeded generator) and without. The reference, timed
in the same run on the same cache, is the smallest possible pipeline: one vectorised gather of the centred
crops plus the same mask dilation and context product, with no per-sample work; the ratio ours/reference says
how much the per-sample augmentation loop costs. Target: >= 2,000 crops/s with augmentation on one CPU core.

Examples:
    python benchmarks/bench_data.py
    python benchmarks/bench_data.py --source synthetic --n_images 8 --batches 100 --out bench_data.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodule_diffusion import phantom  # noqa: E402
from nodule_diffusion.data import (  # noqa: E402
    DEFAULT_VOCAB, ImageRecord, Nodule, NoduleCrops, read_annotations)

TARGET_CROPS_PER_S = 2000.0


def synthetic_records(out_dir: Path, n_images: int, seed: int, size: int = 256) -> list[ImageRecord]:
    """Noise images (16-bit PNG) with 3 bright elliptical nodules each; boxes and attributes written here."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    records = []
    for i in range(n_images):
        image = 0.3 + 0.05 * rng.standard_normal((size, size))
        nodules = []
        for _ in range(3):
            cx, cy = rng.uniform(20, size - 20, 2)
            rx, ry = rng.uniform(3, 10, 2)
            image += 0.3 * ((((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) <= 1)
            attributes = {name: values[rng.integers(len(values))] for name, values in DEFAULT_VOCAB.items()}
            nodules.append(Nodule(box=(cx - rx, cy - ry, cx + rx, cy + ry), attributes=attributes))
        path = out_dir / f"synthetic_{i:03d}.png"
        Image.fromarray(np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)).save(path)
        records.append(ImageRecord(image=path, nodules=nodules, spacing_mm=1.4))
    return records


def reference_get(ds: NoduleCrops, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same batch contract as NoduleCrops.get(augment=False), as one vectorised gather."""
    m, s = ds.max_shift, ds.crop_size
    x0 = ds.patches[indices, :, m:m + s, m:m + s]  # (B, 1, S, S)
    mask = ds.masks[indices, :, m:m + s, m:m + s]  # (B, 1, S, S)
    region = ds.regions[indices, :, m:m + s, m:m + s]  # (B, 1, S, S)
    return {"x0": x0, "mask": mask, "region": region, "context": x0 * (1 - region), "attrs": ds.attrs[indices]}


def crops_per_second(fn, n_crops: int, batches: int, repeats: int) -> float:
    """Median over `repeats` rounds of (batches × batch) crops / seconds."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            fn()
        rates.append(batches * n_crops / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["phantom", "synthetic"], default="phantom")
    parser.add_argument("--n_images", type=int, default=16, help="images in the cache (phantom: negatives too)")
    parser.add_argument("--crop_size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200, help="batches per timing round")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the loader runs on one core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if args.source == "phantom":
            records = read_annotations(phantom.make_dataset(tmp, args.n_images, args.seed, progress=False))
        else:
            records = synthetic_records(Path(tmp), args.n_images, args.seed)
        ds_aug = NoduleCrops(records, DEFAULT_VOCAB, crop_size=args.crop_size, augment=True)
        build_s = time.perf_counter() - start
        ds_plain = NoduleCrops(records, DEFAULT_VOCAB, crop_size=args.crop_size, augment=False)

    generator = torch.Generator().manual_seed(args.seed)
    draw = torch.Generator().manual_seed(args.seed + 1)

    def indices() -> torch.Tensor:
        return torch.randint(0, len(ds_aug), (args.batch,), generator=draw)

    check = indices()  # the reference must return exactly what the unaugmented dataset returns
    ours, ref = ds_plain.get(check), reference_get(ds_plain, check)
    assert all(torch.equal(ours[k], ref[k]) for k in ours), "reference_get disagrees with NoduleCrops.get"

    rows = {
        "get, augment=True": crops_per_second(lambda: ds_aug.get(indices(), generator), args.batch, args.batches,
                                              args.repeats),
        "get, augment=False": crops_per_second(lambda: ds_plain.get(indices()), args.batch, args.batches,
                                               args.repeats),
        "reference (vectorised gather)": crops_per_second(lambda: reference_get(ds_plain, indices()), args.batch,
                                                          args.batches, args.repeats),
    }
    reference = rows["reference (vectorised gather)"]
    print(f"NoduleCrops: {len(ds_aug)} nodules from {len(records)} {args.source} images, crop {args.crop_size}, "
          f"batch {args.batch}, {args.threads} thread(s); cache built in {build_s:.2f} s")
    print(f"{'pipeline':<32}{'crops/s':>12}{'vs reference':>14}")
    for name, rate in rows.items():
        print(f"{name:<32}{rate:>12,.0f}{rate / reference:>13.2f}x")
    augmented = rows["get, augment=True"]
    verdict = "meets" if augmented >= TARGET_CROPS_PER_S else "MISSES"
    print(f"augmented throughput {augmented:,.0f} crops/s {verdict} the target of {TARGET_CROPS_PER_S:,.0f}")
    if args.out:
        result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "n_crops": len(ds_aug), "n_images": len(records), "cache_build_s": build_s,
                  "crops_per_s": rows, "ratio_vs_reference": {k: v / reference for k, v in rows.items()},
                  "target_crops_per_s": TARGET_CROPS_PER_S, "meets_target": augmented >= TARGET_CROPS_PER_S}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
