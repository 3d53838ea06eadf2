"""Glue that the three scripts share: presets, sample grids, synthetic-set writing and the one-command demo.

`run_all` is the README's first command: phantom data → base model → attribute LoRAs → `ortho` composition →
nodules inserted into held-out phantom images → detectors real-only vs real+synthetic → report.md. Every step
calls the same functions as the individual stages of train.py / sample.py / eval_detect.py (no second code path).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nodule_diffusion import common, control, stages
from nodule_diffusion.data import ImageRecord, Nodule, attribute_indices, write_annotations, write_coco
from nodule_diffusion.synthesis import contact_sheet, generate_crops, insert_nodules, random_requests

# Presets: defaults for `--stage all` (explicit flags still win). Budgets: design §7.
# UNet and loop sizes measured on a 2-core laptop-class CPU (README "Measured"); attention only at 8×8 (level 2)
# and in the middle block keeps a step near 0.5 s at batch 16.
PRESETS = {
    "demo": {"steps": 400, "batch_size": 16, "n_images": 300, "attention_levels": [2], "lora_steps": 100,
             "compose_steps": 30, "det_steps": 250, "seeds": 1, "synthetic_images": 100, "test_images": 120,
             "low_data": 40, "n_boot": 200, "sample_every": 200, "checkpoint_every": 200,
             "attributes": "texture=ground_glass,margin=spiculated"},
    "benchmark": {"steps": 2500, "batch_size": 32, "n_images": 600, "attention_levels": [2], "lora_steps": 300,
                  "compose_steps": 60, "det_steps": 500, "seeds": 3, "synthetic_images": 150,
                  "test_images": 150, "low_data": 50, "attributes": "texture=ground_glass,margin=spiculated"},
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise common.DataError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@torch.no_grad()
def _generate_for(model, crops, indices, attrs, steps=25, seed=0):
    """Generate crops for dataset items `indices` (their masks and contexts) with the given attribute rows."""
    batch = crops.get(torch.as_tensor(indices))
    device = next(model.parameters()).device
    scheduler = model.diffusion.scheduler("ddim")
    scheduler.set_timesteps(steps)
    mask, context = batch["mask"].to(device), batch["context"].to(device)
    attrs = attrs.to(device)
    x0 = generate_crops(lambda xt, t, k: model(xt, t, mask, context, attrs), scheduler, mask, context,
                        [seed] * len(indices), list(indices))
    return batch, x0.cpu()


def _grid(batch, x0, path, labels):
    """mask | real | generated, where "generated" is what insertion keeps: the model's pixels inside the dilated
    mask, the real context outside it."""
    tiles, names = [], []
    pasted = batch["context"] + batch["region"] * x0  # context is zero inside the region
    for i in range(len(x0)):
        tiles += [batch["mask"][i, 0].numpy(), (batch["x0"][i, 0].numpy() + 1) / 2, (pasted[i, 0].numpy() + 1) / 2]
        names += ["mask", "real", labels[i]]
    contact_sheet(tiles, names, path, columns=9)


def sample_grid(ckpt: Path, crops, path: Path, device, n: int = 9) -> None:
    """PNG grid of mask | real | generated triplets for the first n crops (the model's EMA weights)."""
    model, _ = stages.load_model(ckpt, device)
    model.eval()
    idx = list(range(min(n, len(crops))))
    attrs = torch.full((len(idx), len(model.vocab)), -1, dtype=torch.long)
    batch, x0 = _generate_for(model, crops, idx, attrs)
    _grid(batch, x0, path, ["generated"] * len(idx))


def lora_grid(model, crops, name: str, path: Path, device, n: int = 9) -> None:
    """PNG grid for one attribute adapter: masks of nodules *without* the value, generated *with* it."""
    attribute, value = name.split("=", 1)
    k = list(model.vocab).index(attribute)
    other = torch.nonzero(crops.attrs[:, k] != model.vocab[attribute].index(value)).flatten()[:n].tolist()
    idx = other or list(range(min(n, len(crops))))
    attrs = torch.tensor([attribute_indices({attribute: value}, model.vocab)] * len(idx))
    model.eval()
    batch, x0 = _generate_for(model, crops, idx, attrs)
    _grid(batch, x0, path, [value] * len(idx))


def synthesize(records: list[ImageRecord], generate, out_dir: Path, vocab: dict, spacing_mm: float,
               crop_size: int, attributes: dict, per_image: int, diameter_mm: tuple[float, float], seed: int,
               requests: dict | None = None, dicom_out: bool = True) -> list[ImageRecord]:
    """Insert nodules into every record's image; write images, annotations.csv, annotations.json, contact sheet.

    requests: optional {image path: [Request, ...]} (from a requests CSV); else `per_image` random requests in
    the lung field. Output records keep the source nodules (extra synthetic=0) and add the inserted ones
    (synthetic=1, with seed and index). DICOM inputs give derived DICOMs, everything else 16-bit PNG.
    """
    from nodule_diffusion import formats
    from nodule_diffusion.data import read_image

    out_dir.mkdir(parents=True, exist_ok=True)
    out_records, sizes, crops, labels, index = [], [], [], [], 0
    rng = np.random.default_rng(seed)
    for rec in tqdm(records, desc="insert"):
        image = read_image(rec.image, rec.frame)
        spacing = rec.spacing_mm or spacing_mm
        scale = spacing / spacing_mm  # working pixels per image pixel
        todo = (requests or {}).get(str(rec.image))
        if todo is None:
            # Label only what the model is asked for: `generate` conditions on `attributes` alone, so drawing the
            # other attributes at random would write labels the nodule was never generated with.
            requested = {a: vocab[a] for a in attributes}
            todo = random_requests(image, per_image, spacing, rng, requested, attributes, diameter_mm, seed, index)
        index += len(todo)
        new_image, masks = insert_nodules(image, todo, generate, crop_size, scale)
        stem = f"{Path(rec.image).stem}_syn{seed}"
        is_dicom = rec.image.suffix.lower() in (".dcm", ".dicom") or formats.is_dicom(rec.image)
        target = out_dir / "images" / (stem + (".dcm" if is_dicom and dicom_out else ".png"))
        nodules = [replace(n, extra={**n.extra, "synthetic": "0"}) for n in rec.nodules]
        for req, mask in zip(todo, masks):
            ys, xs = np.nonzero(mask)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            mask_path = out_dir / "masks" / f"{stem}_{req.index}.png"
            common.save_image_png(mask_path, mask.astype(np.uint8) * 255)
            nodules.append(Nodule(box=box, attributes=dict(req.attributes), mask=mask_path,
                                  diameter_mm=None if req.diameter_px is None else req.diameter_px * spacing,
                                  extra={"synthetic": "1", "seed": str(req.seed), "index": str(req.index),
                                         "source": str(rec.image)}))
            patch = image_crop(new_image, box)
            crops.append(patch)
            labels.append(",".join(v[:5] for v in req.attributes.values()) or "nodule")
        if is_dicom and dicom_out:
            desc = "; ".join(f"nodule {n.extra.get('index')} {n.attributes} box {[round(v) for v in n.box]}"
                             for n in nodules if n.extra.get("synthetic") == "1")
            formats.write_derived_dicom(target, rec.image, new_image, f"nodule_diffusion synthetic: {desc}")
        else:
            common.save_image_png(target, new_image)
        out_records.append(ImageRecord(image=target, nodules=nodules, spacing_mm=spacing))
        sizes.append(new_image.shape)
    write_annotations(out_dir / "annotations.csv", out_records, vocab)
    write_coco(out_dir / "annotations.json", out_records, sizes)
    contact_sheet(crops[:64], labels[:64], out_dir / "contact_sheet.png")
    return out_records


def image_crop(image: np.ndarray, box, size: int = 40) -> np.ndarray:
    from nodule_diffusion.data import crop_at

    return crop_at(image, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, size)[0]


@dataclass
class DemoConfig:
    lora_steps: int = 300  # optimiser steps per attribute LoRA
    compose_steps: int = 100  # composition-training steps
    synthetic_images: int = 150  # held-out phantom images that receive one synthetic nodule each
    test_images: int = 150  # held-out phantom test images for the detectors


def run_all(train, loop, unet_cfg, diffusion, detect, demo: DemoConfig, run_stage) -> dict:
    """The whole pipeline on phantom data (README command 1). `run_stage` is train.py's stage runner."""
    from nodule_diffusion import evaluation

    start, out = time.time(), Path(train.out_dir)
    names = [n.strip() for n in train.attributes.split(",") if n.strip()]
    base = out / "base.pt"
    print("== 1/5 base model"); run_stage(replace(train, stage="base"), loop, unet_cfg, diffusion)  # noqa: E702
    print("== 2/5 attribute LoRAs")
    for name in names:
        run_stage(replace(train, stage="lora", ckpt=str(base), attribute=name),
                  replace(loop, steps=demo.lora_steps), unet_cfg, diffusion)
    print("== 3/5 ortho composition")
    run_stage(replace(train, stage="compose", ckpt=str(base), strategy="ortho"),
              replace(loop, steps=demo.compose_steps), unet_cfg, diffusion)
    print("== 4/5 inserting nodules into held-out images")
    device = common.resolve_device(train.device)
    attributes = control.parse_attributes(train.attributes, stages.load_model(base, "cpu")[0].vocab)
    generate, model = control.build_generator(str(base), "ortho", attributes, out / "lora", device, steps=25)
    pool = stages.load_records("phantom", out / "data", demo.synthetic_images, train.seed + 1, model.vocab)
    synthetic = synthesize(pool, generate, out / "synthetic", model.vocab, train.spacing_mm, unet_cfg.crop_size,
                           attributes, 1, (8.0, 20.0), train.seed)
    print("== 5/5 detectors: real only vs real + synthetic")
    real = stages.load_records("phantom", out / "data", train.n_images, train.seed, model.vocab)
    real = evaluation.low_data_subset(real, detect.low_data, train.seed)
    test = stages.load_records("phantom", out / "data", demo.test_images, train.seed + 2, model.vocab)
    report = evaluate_detection(real, synthetic, test, detect, train.spacing_mm, device, out)
    report["wall_time_s"] = round(time.time() - start, 1)
    common.write_json(out / "report.json", report)
    write_demo_report(out, report, names)
    print((out / "report.md").read_text())
    return report


def evaluate_detection(real, synthetic, test, detect, spacing_mm, device, out: Path) -> dict:
    """Detectors on real vs real+synthetic; writes report.json, report_detect.md and froc.png under `out`."""
    from nodule_diffusion import evaluation

    size = detect.image_size
    real_set = evaluation.detection_set(real, spacing_mm, size)
    syn_set = evaluation.detection_set(synthetic, spacing_mm, size)
    both = (torch.cat([real_set[0], syn_set[0]]), real_set[1] + syn_set[1])
    test_set = evaluation.detection_set(test, spacing_mm, size)
    report, preds = evaluation.detect_experiment({"real_only": real_set, "real+synthetic": both}, test_set,
                                                 detect, device)
    gt = [t["boxes"].numpy() for t in test_set[1]]
    evaluation.froc_plot(out / "froc.png", gt, preds)
    for name, runs in preds.items():  # first seed of each arm
        evaluation.detections_png(out / f"detections_{name.replace('+', '_')}.png", test_set[0], gt, runs[0])
    (out / "report_detect.md").write_text(evaluation.report_markdown(report, "Detection: real only vs real + synthetic"))
    common.write_json(out / "report_detect.json", report)
    return report


def write_demo_report(out: Path, report: dict, names: list[str]) -> None:
    """report.md: the detection table plus the pictures a reader wants to see."""
    from nodule_diffusion import evaluation

    grids = sorted(p.name for p in out.glob("samples_base_*.png"))[-1:]
    lines = [evaluation.report_markdown(report, "nodule_diffusion demo report"),
             f"Wall time: {report.get('wall_time_s', 0):.0f} s.", "", "## Pictures", "",
             *(f"Base model, mask | real | generated: ![]({g})" for g in grids),
             *(f"\nLoRA `{n}` (masks of nodules without the value, generated with it): ![](lora/{n}.png)"
               for n in names),
             "\nInserted nodules (`ortho` composition of " + " + ".join(names) + "): "
             "![](synthetic/contact_sheet.png)", "\nFROC curves: ![](froc.png)",
             "\nTest images, ground truth (green) and top detections (red): real only "
             "![](detections_real_only.png), real + synthetic ![](detections_real_synthetic.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
