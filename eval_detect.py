"""Evaluate synthetic nodules: detection gain, attribute controllability and realism, composition diagnostics.

Examples:
    # detectors trained on real only vs real + synthetic (same budget, 3 seeds), tested on held-out phantom images
    python eval_detect.py detect --synthetic runs/demo/synthetic --seeds 3 --out_dir runs/demo/eval
    # low-data regime: 40 real training images with nodules
    python eval_detect.py detect --synthetic runs/demo/synthetic --low_data 40 --out_dir runs/demo/eval_low
    # your data: --real jsrt:/data/JSRT --test csv:/data/test/annotations.csv
    # controllability (attribute judge accuracy), per-attribute Frechet distance, mask Dice of a synthetic set
    python eval_detect.py attributes --synthetic runs/demo/syn_ortho --out_dir runs/demo/eval_attr
    # the paper's two failure causes, before/after composition: ΔW cosines, principal angles, attention overlap
    python eval_detect.py diagnose --ckpt runs/demo/base.pt --attributes texture=ground_glass,margin=spiculated
Outputs under --out_dir: report.json, report.md, froc.png (detect); attributes.json, attributes.md,
best_worst.png (attributes); diagnose.json, diagnose.png (diagnose). --out_dir must be new or empty unless
--overwrite (files of the same names are then replaced), and outside the --real / --test / --synthetic folders.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from nodule_diffusion import checks, common, datasets, evaluation
from nodule_diffusion.data import DEFAULT_VOCAB, DataError, read_annotations


@dataclass
class EvalConfig:
    real: str = "phantom"  # real training images: phantom (seed 0) or FORMAT:PATH
    n_images: int = 300  # phantom real images
    test: str = "phantom"  # test images: phantom (seed 2) or FORMAT:PATH
    test_images: int = 150  # phantom test images
    synthetic: str = ""  # folder written by sample.py (holds annotations.csv)
    ckpt: str = ""  # diagnose: base checkpoint
    attributes: str = "texture=ground_glass,margin=spiculated"  # diagnose: adapters to compare
    spacing_mm: float = 1.4  # working resolution in mm per pixel (must match training)
    seed: int = 0  # seed of the real phantom images (test images use seed + 2) and of the detectors
    device: str = "auto"  # auto | cpu | cuda
    out_dir: str = "runs/demo/eval"  # reports, pictures and the phantom cache go here
    overwrite: bool = False  # write into a non-empty --out_dir (replacing files of the same names)


def synthetic_records(folder: str, vocab: dict):
    if not folder:
        raise DataError("--synthetic DIR is required (a folder written by sample.py)")
    csv_path = Path(folder) / "annotations.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: not found; --synthetic must be a folder written by sample.py")
    return read_annotations(csv_path, vocab)


def detect(cfg: EvalConfig, det: evaluation.DetectConfig, device) -> None:
    out = Path(cfg.out_dir)
    data = out / "data"
    real = datasets.load_records(cfg.real, data, cfg.n_images, cfg.seed, DEFAULT_VOCAB)
    real = evaluation.low_data_subset(real, det.low_data, cfg.seed)
    test = datasets.load_records(cfg.test, data, cfg.test_images, cfg.seed + 2, DEFAULT_VOCAB)
    synthetic = synthetic_records(cfg.synthetic, DEFAULT_VOCAB)
    report = evaluation.evaluate_detection(real, synthetic, test, det, cfg.spacing_mm, device, out)
    common.write_json(out / "report.json", report)
    (out / "report.md").write_text((out / "report_detect.md").read_text() + "\n![FROC](froc.png)\n")
    print((out / "report.md").read_text())


def check_output_folder(cfg: EvalConfig) -> None:
    """--out_dir outside every input folder, new or empty unless --overwrite, writable: all before any work."""
    out = Path(cfg.out_dir)
    inputs = {"--real": datasets.parse_data_spec(cfg.real)[1], "--test": datasets.parse_data_spec(cfg.test)[1],
              "--synthetic": cfg.synthetic or None}
    checks.check_output_dir(out, inputs)
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise DataError(f"--out_dir {out}: not empty; give a new folder, or --overwrite to replace its reports")
    checks.check_writable_dir(out)


def parse_args(argv=None):
    """(command, EvalConfig, DetectConfig, JudgeSettings), every flag checked against checks.FLAG_RANGES."""
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["detect", "attributes", "diagnose"])
    parser.add_argument("--config", help="JSON file of flag values")
    configs = (EvalConfig, evaluation.DetectConfig, evaluation.JudgeSettings)
    for cls in configs:
        common.add_dataclass_args(parser, cls)
    args = parser.parse_args(argv)
    file_cfg = common.read_config_file(args.config)
    common.check_config_keys(args.config, file_cfg, *configs)
    cfg, det, judge = (common.config_from_args(cls, args, file_cfg) for cls in configs)
    for config in (cfg, det, judge):
        checks.check_ranges(config, checks.FLAG_RANGES)
    return args.command, cfg, det, judge


def main(argv=None) -> None:
    command, cfg, det, judge = parse_args(argv)
    device = common.resolve_device(cfg.device)
    check_output_folder(cfg)
    common.print_config(cfg)
    common.seed_everything(cfg.seed)
    if command == "detect":
        detect(cfg, det, device)
    elif command == "attributes":
        real = datasets.load_records(cfg.real, Path(cfg.out_dir) / "data", cfg.n_images, cfg.seed, DEFAULT_VOCAB)
        result = evaluation.attribute_report(real, synthetic_records(cfg.synthetic, DEFAULT_VOCAB), DEFAULT_VOCAB,
                                              cfg.spacing_mm, judge, device, Path(cfg.out_dir))
        print((Path(cfg.out_dir) / "attributes.md").read_text() if result else "")
    else:
        if not cfg.ckpt:
            raise DataError("diagnose needs --ckpt (the base checkpoint next to lora/ and compose/)")
        evaluation.diagnose(cfg.ckpt, cfg.attributes, Path(cfg.out_dir), device, cfg.seed)
        print((Path(cfg.out_dir) / "diagnose.md").read_text())


if __name__ == "__main__":
    common.run_cli(main)
