"""How much data and training does the attribute judge need before its verdict measures the generator?

Trains `judge.AttributeJudge` on the nodules of a phantom training set (seed 0) with a given number of images,
steps and width, and scores it on held-out phantom images (seed 2): accuracy per attribute and recall per margin
value. The phantom benchmark's judge settings (`phantom_benchmark.benchmark_judge`) come from this table.

Examples:
    python benchmarks/judge_budget.py --n_images 400 --steps 1200             # the default judge's budget
    python benchmarks/judge_budget.py --n_images 1600 --steps 3000 --width 16  # the benchmark's judge
    OMP_NUM_THREADS=1 python benchmarks/judge_budget.py --n_images 1600 --steps 3000 --width 32 &  # one per core
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodule_diffusion import phantom  # noqa: E402
from nodule_diffusion.data import NoduleCrops  # noqa: E402
from nodule_diffusion.datasets import load_records  # noqa: E402
from nodule_diffusion.judge import AttributeJudge, JudgeConfig, attribute_accuracy, train_judge  # noqa: E402


def crops_of(cache: Path, n_images: int, seed: int, vocab: dict) -> dict:
    """Every nodule crop (32 px at 1.4 mm) of a phantom set, as one NoduleCrops batch."""
    records = [r for r in load_records("phantom", cache, n_images, seed, vocab) if r.nodules]
    crops = NoduleCrops(records, vocab, 32, 1.4, augment=False)
    return crops.get(torch.arange(len(crops)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_images", type=int, default=400, help="phantom training images (seed 0)")
    parser.add_argument("--n_test", type=int, default=150, help="held-out phantom images (seed 2)")
    parser.add_argument("--steps", type=int, default=1200, help="judge optimiser steps")
    parser.add_argument("--width", type=int, default=16, choices=(8, 16, 32, 64), help="judge width")
    parser.add_argument("--cache", default="", help="phantom data folder (default: a temporary one)")
    args = parser.parse_args()
    vocab = phantom.PhantomConfig().vocab
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache or tmp)
        train, test = crops_of(cache, args.n_images, 0, vocab), crops_of(cache, args.n_test, 2, vocab)
        start = time.time()
        judge = AttributeJudge(vocab, JudgeConfig(steps=args.steps, width=args.width))
        train_acc = train_judge(judge, train["x0"], train["attrs"], progress=False)
        seconds = time.time() - start
    pred = judge.predict(test["x0"])
    k = list(vocab).index("margin")
    recall = {v: float((pred[test["attrs"][:, k] == i, k] == i).float().mean()) for i, v in enumerate(vocab["margin"])}
    result = {"n_images": args.n_images, "steps": args.steps, "width": args.width, "n_train_crops": len(train["x0"]),
              "n_test_crops": len(test["x0"]), "train_seconds": round(seconds), "train_accuracy": train_acc,
              "held_out_accuracy": attribute_accuracy(pred, test["attrs"], vocab), "held_out_margin_recall": recall,
              "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
