"""Insert synthetic nodules into chest radiographs with a trained model (and attribute LoRAs).

Examples:
    # one random nodule per held-out phantom image, base model (size/shape control only)
    python sample.py --ckpt runs/demo/base.pt --images phantom --n_images 20 --out_dir runs/demo/synthetic
    # attributes through the ortho-composed adapter (train.py --stage compose first)
    python sample.py --ckpt runs/demo/base.pt --attributes texture=ground_glass,margin=spiculated \\
        --strategy ortho --out_dir runs/demo/syn_ortho
    # one attribute LoRA, sampled as the paper does (no adapter guidance; the default is 1.5)
    python sample.py --ckpt runs/demo/base.pt --attributes texture=ground_glass --strategy lora --adapter_guidance 1
    # a training-free merge of the single adapters, or a sampling-time strategy
    python sample.py --ckpt runs/demo/base.pt --attributes texture=solid,margin=ill_defined --strategy linear
    # CFG baseline with compositional guidance
    python sample.py --ckpt runs/demo/cfg.pt --strategy cfg --guidance 3 --compositional \\
        --attributes texture=ground_glass,margin=spiculated
    # your own images and an explicit request list (CSV: image,cx,cy,diameter_mm[,mask][,<attribute> ...])
    python sample.py --ckpt runs/demo/base.pt --images csv:my/annotations.csv --requests my/requests.csv
Strategies: base, lora, linear, svd, ties, dare, ortho, ziplora, switch, composite, klora, cfg (see README).
Outputs under --out_dir: images/ (each in its source's format, identical outside the nodules, for DICOM, PNG,
MetaImage and JSRT sources; 16-bit PNG for JPEG, TIFF and colour), masks/, annotations.csv, annotations.json
(COCO), contact_sheet.png. Noise is seeded per nodule by (--seed, index): results do not depend on batch size or
device. --out_dir must be new or empty (--overwrite replaces an earlier sample.py folder as a whole); everything
is written into a temporary sibling folder that is renamed at the end, so images and annotations always agree.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from nodule_diffusion import checks, common, datasets, synthesis
from nodule_diffusion.data import DataError, image_size, read_mask
from nodule_diffusion.diffusion import load_model, parse_attributes
from nodule_diffusion.synthesis import Request


@dataclass
class SampleConfig:
    ckpt: str = "runs/demo/base.pt"  # base (or cfg) checkpoint from train.py
    lora_dir: str = ""  # folder of attribute adapters (default: <ckpt folder>/lora)
    images: str = "phantom"  # images to insert into: phantom (held-out seed) or FORMAT:PATH
    n_images: int = 20  # phantom images to generate when --images phantom
    requests: str = ""  # optional CSV of explicit requests (image,cx,cy,diameter_mm[,mask][,attributes...])
    attributes: str = ""  # e.g. texture=ground_glass,margin=spiculated (empty: no attribute control)
    strategy: str = "base"  # base | lora | linear | svd | ties | dare | ortho | ziplora | switch | composite | klora | cfg
    per_image: int = 1  # random nodules per image when there is no --requests
    min_diameter_mm: float = 8.0  # random nodules: diameters uniform in [min, max] mm
    max_diameter_mm: float = 20.0  # random nodules: largest diameter in mm
    steps: int = synthesis.SAMPLE_STEPS  # sampling steps
    sampler: str = "ddim"  # ddim | ddpm
    eta: float = synthesis.SAMPLE_ETA  # DDIM η (1 = DDPM-like, the default: sharper nodules; 0 = deterministic)
    guidance: float = 3.0  # CFG scale g (strategy cfg)
    compositional: bool = False  # CFG: one guidance term per attribute [Liu et al. 2022]
    adapter_guidance: float = synthesis.ADAPTER_GUIDANCE  # ε_base + g·(ε_adapted − ε_base); 1: adapted model alone
    spacing_mm: float = 1.4  # the model's working resolution (must match training)
    seed: int = 1  # phantom images use this seed too, so they differ from the training images (seed 0)
    device: str = "auto"  # auto | cpu | cuda
    out_dir: str = "runs/demo/synthetic"  # images/, masks/, annotations.csv/.json, contact_sheet.png go here
    overwrite: bool = False  # replace an output folder that an earlier sample.py run wrote


def read_requests(path: Path, vocab: dict, records, attributes: dict, spacing_mm: float) -> dict:
    """Requests CSV -> {image path: [Request]}; image paths relative to the CSV, each row checked against its
    image (checks.check_request; masks by data.read_mask). spacing_mm: of images without one (synthesize's rule).

    One run conditions on one attribute set (--attributes): attribute columns, where given, must agree with it,
    so that no written label differs from what the nodule was generated with.
    """
    known = {str(r.image): r for r in records}
    out: dict[str, list[Request]] = {}
    try:
        rows = list(csv.DictReader(path.open(newline="", encoding="utf-8-sig")))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable requests CSV ({err})") from err
    for line, row in enumerate(rows, start=2):
        where = f"{path} row {line}"
        image = str((path.parent / (row.get("image") or "")).resolve())
        if image not in known:
            raise DataError(f"{where}: image {row.get('image')!r} is not among --images")
        try:
            cx, cy = float(row["cx"]), float(row["cy"])
            diameter = float(row["diameter_mm"]) if row.get("diameter_mm") else None
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{where}: needs numeric cx, cy and diameter_mm ({err})") from err
        record = known[image]
        spacing, size_hw = record.spacing_mm or spacing_mm, image_size(record.image, record.frame)
        mask = read_mask(path.parent / row["mask"], size_hw) if row.get("mask") else None
        if diameter is None and mask is None:
            raise DataError(f"{where}: give diameter_mm or mask")
        checks.check_request(where, cx, cy, diameter, mask, size_hw, spacing)
        attrs = parse_attributes(",".join(f"{a}={row[a]}" for a in vocab if row.get(a)), vocab)
        if any(attributes.get(a) != v for a, v in attrs.items()):
            raise DataError(f"{where}: attributes {attrs} differ from --attributes {attributes}; run sample.py "
                            f"once per attribute set")
        attrs = dict(attributes)
        out.setdefault(image, []).append(Request(cx, cy, None if diameter is None else diameter / spacing, mask,
                                                 attrs, 0, sum(len(v) for v in out.values())))
    if not out:
        raise DataError(f"{path}: no request rows after the header (one row per nodule: image,cx,cy,diameter_mm)")
    return out


def parse_args(argv=None) -> SampleConfig:
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file of flag values")
    common.add_dataclass_args(parser, SampleConfig)
    args = parser.parse_args(argv)
    file_cfg = common.read_config_file(args.config)
    common.check_config_keys(args.config, file_cfg, SampleConfig)
    cfg = common.config_from_args(SampleConfig, args, file_cfg)
    checks.check_ranges(cfg, checks.FLAG_RANGES)
    if cfg.min_diameter_mm > cfg.max_diameter_mm:
        raise DataError(f"--min_diameter_mm {cfg.min_diameter_mm:g} is larger than --max_diameter_mm "
                        f"{cfg.max_diameter_mm:g}")
    return cfg


def check_output_folder(cfg: SampleConfig) -> Path:
    """--out_dir: outside the inputs (and holding none: --overwrite replaces it), new or empty unless --overwrite,
    and only a folder an earlier sample.py run wrote is replaced; its parent (for the temporary folder) writable."""
    out = Path(cfg.out_dir)
    inputs = {"--images": datasets.parse_data_spec(cfg.images)[1], "--requests": cfg.requests or None}
    checks.check_output_dir(out, inputs)
    for flag, value in inputs.items():
        if value is not None and out.resolve() in Path(value).resolve().parents:
            raise DataError(f"--out_dir {out}: holds {flag} {value}; write the outputs somewhere else")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out_dir {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise DataError(f"--out_dir {out}: not empty; give a new folder, or --overwrite to replace the outputs "
                            f"of an earlier sample.py run")
        try:
            written_by_us = "sample" in json.loads((out / "config.json").read_text())
        except (OSError, ValueError, TypeError):
            written_by_us = False
        if not written_by_us:
            raise DataError(f"--out_dir {out}: --overwrite replaces only a folder written by sample.py (it has a "
                            f"config.json of sample.py); this one is not")
    checks.check_writable_dir(out.parent, f"--out_dir {out}: its parent folder")
    return out


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an earlier `out` is moved aside first and deleted only afterwards, so at
    every moment each folder holds one complete run."""
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def main(argv=None) -> None:
    cfg = parse_args(argv)
    device = common.resolve_device(cfg.device)
    out = check_output_folder(cfg)
    common.print_config(cfg)
    common.seed_everything(cfg.seed)
    lora_dir = Path(cfg.lora_dir) if cfg.lora_dir else Path(cfg.ckpt).parent / "lora"
    model, payload = load_model(cfg.ckpt, "cpu")
    vocab, crop_size = model.vocab, model.unet_config.crop_size
    attributes = parse_attributes(cfg.attributes, vocab)
    generate, _ = synthesis.build_generator(cfg.ckpt, cfg.strategy, attributes, lora_dir, device, cfg.steps,
                                              cfg.eta, cfg.sampler, cfg.guidance, cfg.compositional,
                                              adapter_guidance=cfg.adapter_guidance)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # beside out_dir: the final rename stays on one disk
    try:
        records = datasets.load_records(cfg.images, tmp / "data", cfg.n_images, cfg.seed, vocab)
        requests = None
        if cfg.requests:
            requests = read_requests(Path(cfg.requests), vocab, records, attributes, cfg.spacing_mm)
            records = [r for r in records if str(r.image) in requests]
        common.write_json(tmp / "config.json", {"sample": cfg, "base_fingerprint": payload["fingerprint"]})
        result = synthesis.synthesize(records, generate, tmp, vocab, cfg.spacing_mm, crop_size, attributes,
                                      cfg.per_image, (cfg.min_diameter_mm, cfg.max_diameter_mm), cfg.seed,
                                      requests, final_dir=out)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(1 for r in result for nod in r.nodules if nod.extra.get("synthetic") == "1")
    print(f"inserted {n} nodules into {len(result)} images -> {out / 'annotations.csv'}, "
          f"{out / 'annotations.json'}, {out / 'contact_sheet.png'}")


if __name__ == "__main__":
    common.run_cli(main)
