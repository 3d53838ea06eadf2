"""Can an attribute be read from the conditioning mask alone? (design §3; issue 10 target: ≤ chance + 0.10.)

A random forest on the mask-shape features of `judge.mask_features` (area, axes, perimeter, compactness, box fill,
border-radius harmonics) is trained on the nodules of one phantom seed and scored on another. Chance = the
held-out majority-class rate. Written as JSON and printed as a table.

Examples:
    python benchmarks/mask_independence.py
    python benchmarks/mask_independence.py --n_train 600 --n_test 300 --out mask_independence.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodule_diffusion import phantom  # noqa: E402
from nodule_diffusion.data import DEFAULT_VOCAB, NoduleCrops, read_annotations  # noqa: E402
from nodule_diffusion.judge import mask_features  # noqa: E402


def features_and_labels(folder: Path, n_images: int, seed: int, crop_size: int = 32):
    """(mask features (N, F) float64, attribute labels (N, K) int64) of every nodule of a phantom dataset."""
    csv = phantom.make_dataset(folder, n_images, seed, progress=False)
    crops = NoduleCrops(read_annotations(csv), DEFAULT_VOCAB, crop_size, 1.4, augment=False)
    batch = crops.get(torch.arange(len(crops)))
    return mask_features(batch["mask"]).numpy(), batch["attrs"].numpy()


def mask_only_accuracy(train, test, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per attribute: held-out accuracy of a 300-tree random forest on mask features, and the chance rate."""
    (x_a, y_a), (x_b, y_b) = train, test
    out = {}
    for k, name in enumerate(DEFAULT_VOCAB):
        forest = RandomForestClassifier(300, random_state=seed).fit(x_a, y_a[:, k])
        chance = np.bincount(y_b[:, k]).max() / len(y_b)
        out[name] = {"accuracy": float((forest.predict(x_b) == y_b[:, k]).mean()), "chance": float(chance)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Examples:")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n_train", type=int, default=600, help="phantom images for training (seed 0)")
    parser.add_argument("--n_test", type=int, default=300, help="held-out phantom images (seed 1)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train = features_and_labels(Path(tmp) / "train", args.n_train, 0)
        test = features_and_labels(Path(tmp) / "test", args.n_test, 1)
    result = mask_only_accuracy(train, test)
    result["n_nodules"] = {"train": len(train[0]), "test": len(test[0])}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
