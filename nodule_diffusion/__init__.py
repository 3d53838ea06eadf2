"""nodule_diffusion: fine-grained lung-nodule synthesis on chest radiographs (arXiv 2603.01659), in plain PyTorch.

Modules (one job each; see README.md for the data flow):
    phantom     procedural CXRs with attribute-labelled nodules (the embedded default dataset)
    data        DataError, image reading, annotation CSV/COCO, nodule masks, crop dataset
    formats     DICOM, MetaImage and JSRT readers, derived-DICOM writer
    derived     write synthetic images back in their source's format, bit-identical outside the inserted regions
    datasets    JSRT / NODE21 / ChestX-ray14 / VinDr / CSV / COCO loaders behind one --data option
    schedulers  beta schedules, forward noising, DDPM and DDIM steps
    unet        mask-conditioned UNet with cross-attention to attribute tokens
    lora        LoRA layers, injection, merge/unmerge, adapter files, orthogonality loss
    compose     LoRA composition strategies and the composition-training objective
    synthesis   pasting generated nodules into full CXRs, exports
    detector    compact Faster R-CNN
    metrics     AUC, FROC/CPM, AP, NODE21 score, bootstrap CIs, Frechet distance, Dice
    judge       attribute classifier used to score controllability and realism
    checks      physical ranges and size limits of the input; request-row and flag checks (issue 11)
    common      seeding, devices, dataclass -> argparse, atomic checkpoints (schema, content hash), logging
"""

__version__ = "0.1.0"
