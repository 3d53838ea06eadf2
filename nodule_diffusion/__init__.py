"""nodule_diffusion: fine-grained lung-nodule synthesis on chest radiographs (arXiv 2603.01659), in plain PyTorch.

Modules, in reading order (one job each; data flows down: scripts → training | synthesis | evaluation →
diffusion, lora, compose → unet, schedulers → common; see README.md):
    common      seeding, devices, dataclass -> argparse (help from field comments), atomic files and checkpoints
                (schema, content hash), logging, tqdm
    checks      physical ranges and size limits of the input; request-row and flag checks
    data        DataError, image reading, annotation CSV/COCO, nodule masks, the crop dataset
    formats     DICOM, MetaImage and JSRT readers
    derived     write synthetic images back in their source's format, bit-identical outside the inserted regions
    phantom     procedural CXRs with attribute-labelled nodules (the embedded default dataset)
    datasets    JSRT / NODE21 / ChestX-ray14 / VinDr / CSV / COCO loaders behind one --data option, load_records
    schedulers  beta schedules, forward noising, DDPM and DDIM steps, THE reverse loop (sample_loop)
    unet        mask-conditioned UNet with cross-attention to attribute tokens
    diffusion   the diffusion model (UNet + tokens + config), denoising loss, model/adapter checkpoints,
                the attribute vocabulary (parse, validate, to tensor)
    lora        LoRA layers, injection, merge/unmerge, adapter files, orthogonality loss
    compose     LoRA composition strategies, the composition objective [OURS Eq. 1–3], sampling-time dispatch
    training    EMA, the one training loop (writes its own logs, checkpoints, grids), the stage set-ups
    synthesis   generator from files, inserting nodules into full CXRs, synthetic sets, grids
    baselines   copy-paste and template insertion baselines
    detector    compact Faster R-CNN
    metrics     AUC, FROC/CPM, AP, NODE21 score, bootstrap CIs, Frechet distance, Dice
    judge       attribute classifier used to score controllability and realism
    evaluation  the detect / attributes / diagnose commands of eval_detect.py
"""

__version__ = "0.1.0"
