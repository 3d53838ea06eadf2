"""Train the nodule synthesis models, one stage at a time, or the whole demo pipeline.

Stages (design §1): base (mask-conditioned inpainting model) → lora (one adapter per attribute value) →
compose (orthogonality-regularised composition of two or three adapters) ; cfg is the baseline. `--stage all`
(run_all, with the --preset defaults) runs every stage, then sample.py's and eval_detect.py's steps, in-process.
This script only chooses what runs and which files it reads; training.fit writes checkpoints, logs and grids.

Examples:
    python train.py --stage all --preset demo --out_dir runs/demo          # everything, then sample + evaluate
    python train.py --stage base --out_dir runs/demo                       # phantom data by default
    python train.py --stage base --data jsrt:/data/JSRT --out_dir runs/jsrt --device cuda --batch_size 128
    python train.py --stage lora --ckpt runs/demo/base.pt --attribute texture=ground_glass
    python train.py --stage lora --ckpt runs/demo/base.pt --all_attributes
    python train.py --stage compose --ckpt runs/demo/base.pt --attributes texture=ground_glass,margin=spiculated
    python train.py --stage cfg --ckpt runs/demo/base.pt --out_dir runs/demo
    torchrun --nproc_per_node 2 train.py --stage base --out_dir runs/ddp      # DDP (gloo on CPU, nccl on GPU)
Outputs under --out_dir: base.pt / cfg.pt checkpoints, lora/<attribute>=<value>.pt adapters,
compose/<strategy>_<a>+<b>.pt composed adapters, samples_*.png grids, log.jsonl, config_<stage>.json.
Stages add to one folder; a stage refuses to replace an output file of its own (base.pt, an adapter, …) unless
--overwrite (base/cfg: or --resume), and --stage all wants an empty folder (README "What the scripts refuse").
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nodule_diffusion import checks, common, datasets, diffusion, evaluation, synthesis, training
from nodule_diffusion.common import DataError
from nodule_diffusion.data import DEFAULT_VOCAB, NoduleCrops
from nodule_diffusion.diffusion import DiffusionConfig, DiffusionModel
from nodule_diffusion.evaluation import DetectConfig
from nodule_diffusion.training import LoopConfig, RunFiles
from nodule_diffusion.unet import UNetConfig


# Presets: defaults for `--stage all` (explicit flags still win). Budgets: design §7.
# UNet and loop sizes measured on a 2-core laptop-class CPU (README "Measured"); attention only at 8×8 (level 2)
# and in the middle block keeps a step near 0.5 s at batch 16.
PRESETS = {
    "demo": {"steps": 400, "batch_size": 16, "n_images": 300, "attention_levels": [2], "lora_steps": 200,
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


@dataclass
class DemoConfig:
    lora_steps: int = 300  # optimiser steps per attribute LoRA
    compose_steps: int = 100  # composition-training steps
    synthetic_images: int = 150  # held-out phantom images that receive one synthetic nodule each
    test_images: int = 150  # held-out phantom test images for the detectors


@dataclass
class TrainConfig:
    stage: str = "base"  # base | lora | compose | cfg | all
    preset: str = ""  # demo | benchmark: defaults for --stage all (explicit flags still win)
    data: str = "phantom"  # phantom, or FORMAT:PATH (jsrt, node21, nih, vindr, csv, coco)
    n_images: int = 300  # phantom images to generate for training (negatives included)
    spacing_mm: float = 1.4  # working resolution: every dataset is resampled to this many mm per pixel
    out_dir: str = "runs/demo"  # every output of the run goes under this folder
    ckpt: str = ""  # base checkpoint (lora, compose, cfg stages)
    resume: bool = False  # continue base/cfg training from <out_dir>/<stage>.pt
    seed: int = 0  # one seed for data, initialisation and noise (phantom training data uses it too)
    device: str = "auto"  # auto | cpu | cuda
    attribute: str = ""  # lora stage: one attribute value, e.g. texture=ground_glass
    all_attributes: bool = False  # lora stage: one adapter per value of every attribute
    attributes: str = "texture=ground_glass,margin=spiculated"  # compose / all: values to compose (2 or 3)
    strategy: str = "ortho"  # compose stage: ortho | ziplora
    lora_rank: int = 8  # LoRA rank r of every adapter [LoRA §4.1]
    lora_alpha: float = 8.0  # scaling α/r = 1 at the default rank [LoRA §4.1]
    lora_init: str = "kaiming"  # kaiming | orthogonal_bases (fixed disjoint A per value, only B trains)
    lambda_orth: float = 1.0  # weight of L_orth [OURS]
    lambda_attn: float = 0.1  # weight of L_attn [OURS]
    # DEVIATION: λ_d = 1, λ_p = 0 rather than method.md §3's L_preserve-led objective: trained 100 steps, L_preserve
    # unlearns the composition (both correct 0.17 against linear's 0.48; benchmarks/RESULTS.md, "Composition budget")
    lambda_denoise: float = 1.0  # weight of L_denoise, on nodules carrying every composed value [OURS]
    lambda_preserve: float = 0.0  # weight of L_preserve, the distillation from each adapter alone [OURS]
    lambda_zip: float = 0.01  # ZipLoRA's merger-similarity weight [ZipLoRA §4]
    lora_lr: float = 2e-3  # LoRA learning rate: B starts at 0 and a CPU budget allows ~200 steps [LoRA §4.1]
    compose_lr: float = 0.01  # merger learning rate: m starts at 1 and must move within a few dozen steps
    adapter_guidance: float = synthesis.ADAPTER_GUIDANCE  # LoRA grids and --stage all: sample.py --adapter_guidance
    cfg_dropout: float = 0.1  # cfg stage: p of dropping each attribute to its null token [CFG §3.2]
    vocab: str = ""  # JSON file with the attribute vocabulary (default: texture, margin, calcification)
    overwrite: bool = False  # replace this stage's existing output files (--stage all: use a non-empty folder)


CONFIGS = (TrainConfig, LoopConfig, UNetConfig, DiffusionConfig, DetectConfig, DemoConfig)
STAGES = {"base", "lora", "compose", "cfg", "all"}


def parse_args(argv=None):
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file of flag values (flags given on the command line win)")
    for cls in CONFIGS:
        common.add_dataclass_args(parser, cls)
    args = parser.parse_args(argv)
    file_cfg = common.read_config_file(args.config)
    common.check_config_keys(args.config, file_cfg, *CONFIGS)
    train = common.config_from_args(TrainConfig, args, file_cfg)
    merged = {**(preset(train.preset) if train.preset else {}), **file_cfg}
    configs = [common.config_from_args(cls, args, merged) for cls in CONFIGS]
    for cfg in configs:
        checks.check_ranges(cfg, {**checks.FLAG_RANGES, "stage": STAGES})
    return configs


def read_vocab(path: str) -> dict:
    """The --vocab JSON file: attribute -> list of distinct value names (common.vocabulary), else DataError."""
    try:
        vocab = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"--vocab {path}: cannot read the vocabulary JSON ({err})") from None
    if (problem := common.vocabulary(vocab)) is not None:
        raise DataError(f"--vocab {path}: the vocabulary {problem}")
    return vocab


def check_output_folder(train: TrainConfig) -> None:
    """Before any work: --out_dir is a writable folder outside the input data; --stage all starts in an empty one.

    Stages add to one folder (lora writes beside base.pt), so for single stages only their own output files count:
    run_stage refuses to replace them unless --overwrite (base/cfg: or --resume).
    """
    out = Path(train.out_dir)
    checks.check_output_dir(out, {"--data": datasets.parse_data_spec(train.data)[1]})
    if train.stage == "all" and out.is_dir() and any(out.iterdir()) and not train.overwrite:
        raise DataError(f"--out_dir {out}: not empty; --stage all writes a whole run, give a new folder or "
                        f"--overwrite")
    checks.check_writable_dir(out)
    for sub in ("lora", "compose"):  # where the lora / compose stages write, checked before hours of training
        if train.stage in (sub, "all") and (out / sub).exists():
            checks.check_writable_dir(out / sub)


def check_new_outputs(train: TrainConfig, paths: list[Path]) -> None:
    """Refuse to replace an output file of this stage from an earlier run, unless --overwrite."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not train.overwrite:
        again = " or --resume to continue it" if train.stage in ("base", "cfg") else ""
        raise DataError(f"--out_dir {train.out_dir}: {', '.join(existing)} exists from an earlier run; give a new "
                        f"--out_dir, --overwrite to replace it{again}")


def main(argv=None) -> None:
    train, loop, unet_cfg, diffusion_cfg, detect, demo = parse_args(argv)
    common.resolve_device(train.device)
    if train.vocab:
        read_vocab(train.vocab)
    check_output_folder(train)
    out = Path(train.out_dir)
    common.print_config(train, loop, unet_cfg, diffusion_cfg)
    if train.stage == "all":
        common.write_json(out / "config_all.json",
                          {"train": train, "loop": loop, "unet": unet_cfg, "diffusion": diffusion_cfg})
        common.print_config(detect, demo)
        run_all(train, loop, unet_cfg, diffusion_cfg, detect, demo)
    else:
        run_stage(train, loop, unet_cfg, diffusion_cfg)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_stage(train: TrainConfig, loop: LoopConfig, unet_cfg: UNetConfig, diffusion_cfg: DiffusionConfig) -> list:
    """Run one training stage; returns the paths written."""
    device = common.resolve_device(train.device)
    rank, world = common.init_distributed(device)
    common.seed_everything(train.seed + rank)
    generator = torch.Generator().manual_seed(train.seed * 1000 + rank)  # data order and noise, resumable
    out = Path(train.out_dir)
    vocab = read_vocab(train.vocab) if train.vocab else DEFAULT_VOCAB
    if train.stage in ("lora", "compose", "cfg"):
        if not train.ckpt:
            raise common.DataError(f"--stage {train.stage} needs --ckpt (a base checkpoint from --stage base)")
        model, payload = diffusion.load_model(train.ckpt, device)
        vocab, unet_cfg = model.vocab, model.unet_config
    elif train.stage == "base":
        model, payload = DiffusionModel(unet_cfg, vocab, diffusion_cfg).to(device), None
    else:
        raise common.DataError(f"--stage {train.stage!r}: choose base, lora, compose, cfg or all")
    # Everything that can be refused is refused here, before the (slow) data loading and before any write.
    resumed = None
    if train.stage in ("base", "cfg"):
        check_new_outputs(replace(train, overwrite=train.overwrite or train.resume), [out / f"{train.stage}.pt"])
        if train.resume:
            resumed = training.resume_state(out / f"{train.stage}.pt", model, device, loop, common.to_plain(train))
    elif train.stage == "lora":
        check_new_outputs(train, [out / "lora" / f"{name}.pt" for name in wanted_adapters(train, vocab)])
    else:
        names = diffusion.adapter_names(diffusion.parse_attributes(train.attributes, vocab))
        check_new_outputs(train, [diffusion.composed_path(out, train.strategy, names)])
    records = datasets.load_records(train.data, out / "data", train.n_images, train.seed, vocab)
    crops = NoduleCrops(records, vocab, unet_cfg.crop_size, train.spacing_mm, augment=True, progress=rank == 0)
    print(f"{len(crops)} nodule crops of {unet_cfg.crop_size}px from {len(records)} images")
    if rank == 0 and train.stage in ("base", "cfg") and resumed is None and train.overwrite:
        forget_earlier_run(out, train.stage)
    if rank == 0:
        common.write_json(out / f"config_{train.stage}.json",
                          {"train": train, "loop": loop, "unet": unet_cfg, "diffusion": model.diffusion})
    log = common.JsonlLogger(out / "log.jsonl", enabled=rank == 0)
    if train.stage in ("base", "cfg"):
        return [train_full(train, loop, model, crops, device, generator, log, rank, resumed)]
    base_fp = payload["fingerprint"]
    if train.stage == "lora":
        return train_loras(train, loop, model, crops, device, generator, log, base_fp)
    return [train_composition(train, loop, model, crops, device, generator, log, base_fp)]


def forget_earlier_run(out: Path, stage: str) -> None:
    """--overwrite of a base/cfg run: drop the earlier run's sample grids and log lines of this stage, which would
    otherwise sit beside the new run's (the demo report shows the highest-numbered grid)."""
    for grid in out.glob(f"samples_{stage}_*.png"):
        grid.unlink()
    log = out / "log.jsonl"
    if log.is_file():
        kept = [line for line in log.read_text().splitlines(keepends=True)
                if not line.strip() or json.loads(line).get("stage") != stage]
        with common.atomic_path(log) as tmp:
            tmp.write_text("".join(kept))


def wanted_adapters(train: TrainConfig, vocab: dict) -> list[str]:
    """The adapter names the lora stage trains: `--attribute a=v` (validated) or every value (`--all_attributes`)."""
    if train.all_attributes:
        return [f"{a}={v}" for a, values in vocab.items() for v in values]
    if train.attribute:
        names = diffusion.adapter_names(diffusion.parse_attributes(train.attribute, vocab))
        if len(names) != 1:
            raise DataError(f"--attribute {train.attribute}: one value (ATTR=VALUE); use --all_attributes for all")
        return names
    raise common.DataError("--stage lora needs --attribute ATTR=VALUE or --all_attributes")


def train_full(train, loop, model, crops, device, generator, log, rank, resumed=None) -> Path:
    """Base or CFG stage; training.fit writes the periodic atomic checkpoints, sample grids and log lines.
    resumed: (model state, loop state) from training.resume_state, or None for a fresh run."""
    path = Path(train.out_dir) / f"{train.stage}.pt"
    state = None
    if resumed is not None:
        model.load_state_dict(resumed[0])
        state = resumed[1]
        print(f"resuming {path} at step {state['step']}")
    files = RunFiles(log=log, stage=train.stage, checkpoint=path, kind=train.stage,
                     train_config={"train": train, "loop": loop}, grid_crops=crops)
    dropout = train.cfg_dropout if train.stage == "cfg" else None
    training.train_base(model, crops, loop, device, generator, state, dropout, rank, files)
    print(f"wrote {path}")
    return path


def train_loras(train, loop, model, crops, device, generator, log, base_fp) -> list:
    """One adapter per requested attribute value (`--attribute a=v` or `--all_attributes`)."""
    paths = []
    # the LoRA grids' unconditional model under adapter guidance: frozen, so one copy serves every adapter
    base = diffusion.load_model(train.ckpt, device)[0] if train.adapter_guidance != 1 else None
    for k, name in enumerate(wanted_adapters(train, model.vocab)):
        attribute, _, value = name.partition("=")
        if k:  # every adapter starts from the same frozen base and token init: a fresh model from the checkpoint
            model = diffusion.load_model(train.ckpt, device)[0]
        training.train_lora(model, crops, attribute, value, train.lora_rank, train.lora_alpha,
                            replace(loop, lr=train.lora_lr), device, generator, train.lora_init,
                            RunFiles(log=log, stage=f"lora {name}"))
        path = Path(train.out_dir) / "lora" / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        diffusion.save_lora(path, model, name, base_fp, {"attribute": attribute, "value": value,
                                                         "r": train.lora_rank, "alpha": train.lora_alpha,
                                                         "init": train.lora_init,
                                                         "targets": list(diffusion.LORA_TARGETS), "steps": loop.steps})
        synthesis.lora_grid(model, crops, name, Path(train.out_dir) / "lora" / f"{name}.png",
                            train.adapter_guidance, base)
        paths.append(path)
        print(f"wrote {path}")
    return paths


def train_composition(train, loop, model, crops, device, generator, log, base_fp) -> Path:
    """Compose the single-attribute adapters named by --attributes with --strategy ortho | ziplora."""
    names = diffusion.adapter_names(diffusion.parse_attributes(train.attributes, model.vocab))
    if len(names) < 2:
        raise common.DataError("--attributes needs two or three values of different attributes, "
                               "e.g. texture=ground_glass,margin=spiculated")
    if train.strategy not in ("ortho", "ziplora"):
        raise common.DataError(f"--strategy {train.strategy!r}: composition training is 'ortho' or 'ziplora' "
                               "(training-free strategies are applied by sample.py)")
    for name in names:
        diffusion.load_lora(Path(train.out_dir) / "lora" / f"{name}.pt", model, base_fp, name)
    loop = replace(loop, lr=train.compose_lr)
    training.train_compose(model, crops, names, train.strategy, loop, device, generator, train.lambda_orth,
                           train.lambda_attn, train.lambda_zip, RunFiles(log=log, stage=f"compose {train.strategy}"),
                           train.lambda_denoise, train.lambda_preserve)
    path = diffusion.composed_path(Path(train.out_dir), train.strategy, names)
    training.save_composed(path, model, names, base_fp, {"strategy": train.strategy, "steps": loop.steps,
                                                         "lambda_orth": train.lambda_orth,
                                                         "lambda_attn": train.lambda_attn,
                                                         "lambda_denoise": train.lambda_denoise,
                                                         "lambda_preserve": train.lambda_preserve})
    print(f"wrote {path}")
    return path


def run_all(train, loop, unet_cfg, diffusion_cfg, detect, demo: DemoConfig) -> dict:
    """The whole pipeline on phantom data (README command 1): the same stages as the single commands.

    phantom data → base model → attribute LoRAs → `ortho` composition → nodules inserted into held-out phantom
    images → detectors real-only vs real+synthetic → report.md.
    """
    start, out = time.time(), Path(train.out_dir)
    base = out / "base.pt"
    print("== 1/6 base model"); run_stage(replace(train, stage="base"), loop, unet_cfg, diffusion_cfg)  # noqa: E702
    vocab = diffusion.load_model(base, "cpu")[0].vocab
    attributes = diffusion.parse_attributes(train.attributes, vocab)
    names = diffusion.adapter_names(attributes)
    print("== 2/6 attribute LoRAs")
    for name in names:
        run_stage(replace(train, stage="lora", ckpt=str(base), attribute=name),
                  replace(loop, steps=demo.lora_steps), unet_cfg, diffusion_cfg)
    print("== 3/6 controllability of each LoRA (judge on held-out nodules)")
    real = datasets.load_records("phantom", out / "data", train.n_images, train.seed, vocab)
    test = datasets.load_records("phantom", out / "data", demo.test_images, train.seed + 2, vocab)
    control = evaluation.controllability(str(base), out / "lora", names, real, test, train.spacing_mm,
                                         evaluation.JudgeSettings(crop_size=unet_cfg.crop_size),
                                         common.resolve_device(train.device),
                                         adapter_guidance=train.adapter_guidance)
    print("== 4/6 ortho composition")
    run_stage(replace(train, stage="compose", ckpt=str(base), strategy="ortho"),
              replace(loop, steps=demo.compose_steps), unet_cfg, diffusion_cfg)
    print("== 5/6 inserting nodules into held-out images")
    device = common.resolve_device(train.device)
    generate, model = synthesis.build_generator(str(base), "ortho", attributes, out / "lora", device,
                                                adapter_guidance=train.adapter_guidance)
    pool = datasets.load_records("phantom", out / "data", demo.synthetic_images, train.seed + 1, model.vocab)
    shutil.rmtree(out / "synthetic", ignore_errors=True)  # --overwrite: an earlier run's set must not mix in
    synthetic = synthesis.synthesize(pool, generate, out / "synthetic", model.vocab, train.spacing_mm,
                                     unet_cfg.crop_size, attributes, 1, (8.0, 20.0), train.seed)
    print("== 6/6 detectors: real only vs real + synthetic")
    real = evaluation.low_data_subset(real, detect.low_data, train.seed)
    report = evaluation.evaluate_detection(real, synthetic, test, detect, train.spacing_mm, device, out)
    report["controllability"] = control
    report["density"] = evaluation.density_check(synthetic)
    report["wall_time_s"] = round(time.time() - start, 1)
    common.write_json(out / "report.json", report)
    write_demo_report(out, report, names)
    print((out / "report.md").read_text())
    return report


def write_demo_report(out: Path, report: dict, names: list[str]) -> None:
    """report.md: the detection table plus the pictures a reader wants to see."""
    grids = sorted(p.name for p in out.glob("samples_base_*.png"))[-1:]
    lines = [evaluation.report_markdown(report, "nodule_diffusion demo report"),
             evaluation.controllability_markdown(report["controllability"]) if "controllability" in report else "",
             "Inserted nodules darker than the ring 1–3 px around them: "
             f"{report['density']['n_darker_than_ring']} of {report['density']['n_inserted']}.\n"
             if "density" in report else "",
             f"Wall time: {report.get('wall_time_s', 0):.0f} s.", "", "## Pictures", "",
             *(f"Base model, mask | real | generated: ![]({g})" for g in grids),
             *(f"\nLoRA `{n}` (masks of nodules without the value, generated with it): ![](lora/{n}.png)"
               for n in names),
             "\nInserted nodules (`ortho` composition of " + " + ".join(names) + "): "
             "![](synthetic/contact_sheet.png)", "\nFROC curves: ![](froc.png)",
             "\nTest images, ground truth (green) and top detections (red): real only "
             "![](detections_real_only.png), real + synthetic ![](detections_real_synthetic.png)", ""]
    (out / "report.md").write_text("\n".join(lines))


if __name__ == "__main__":
    common.run_cli(main)
