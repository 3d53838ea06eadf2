"""Shared tiny fixtures for the integration tests (training stages, synthesis, scripts).

Everything here is deliberately small so that the whole integration suite runs in well under a minute on a 2-core
CPU: 64×64 images with bright disks (an "easy" data set whose nodules a tiny model learns in a few hundred steps),
16-px crops, and a two-level UNet with 16/32 channels.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from nodule_diffusion import common, diffusion, training
from nodule_diffusion.data import DEFAULT_VOCAB, ImageRecord, Nodule, NoduleCrops, read_annotations, write_annotations
from nodule_diffusion.diffusion import DiffusionConfig, DiffusionModel
from nodule_diffusion.training import LoopConfig
from nodule_diffusion.unet import UNetConfig

SPACING_MM = 1.4  # the tiny images are written at the models' working resolution, so no resampling happens
IMAGE_SIZE = 64
CROP_SIZE = 16

# The same tiny architecture in Python and as train.py flags (the end-to-end script test uses the latter).
TINY_UNET = dict(crop_size=CROP_SIZE, base_channels=16, channel_mult=(1, 2), attention_levels=(1,),
                 context_dim=32, num_heads=4, norm_groups=8, mid_attention=False)
TINY_UNET_FLAGS = ["--crop_size", "16", "--base_channels", "16", "--channel_mult", "1", "2",
                   "--attention_levels", "1", "--context_dim", "32", "--num_heads", "4", "--norm_groups", "8",
                   "--no-mid_attention"]


def oracle(module: str, reason: str):
    """`pytest.importorskip` for the oracle libraries (diffusers, peft, torchvision, sklearn, pycocotools, scipy,
    pydicom), except under CI (the `CI` environment variable set): there a missing oracle is a failure, not a skip,
    because a skipped oracle test silently drops the only check of the behaviour it guards."""
    if os.environ.get("CI"):
        try:
            return importlib.import_module(module)
        except ImportError as err:
            pytest.fail(f"CI: oracle {module} is missing ({reason}): {err}")
    return pytest.importorskip(module, reason=reason)


def tiny_unet_config() -> UNetConfig:
    return UNetConfig(**TINY_UNET)


def tiny_loop(steps: int, **overrides) -> LoopConfig:
    """A LoopConfig for a handful of CPU steps (no sample grids, no bf16)."""
    values = dict(steps=steps, batch_size=4, lr=1e-3, warmup=1, ema_decay=0.9, bf16=False, log_every=1,
                  checkpoint_every=steps, sample_every=0)
    return LoopConfig(**{**values, **overrides})


def write_disk_dataset(folder: Path, n_images: int = 8, seed: int = 0) -> Path:
    """A CSV data set of `n_images` noisy 64×64 images with two bright disks each; returns the CSV path.

    Attribute values cycle deterministically so that every texture and margin value occurs; the disk brightness
    depends on the texture (solid brightest), which gives a LoRA something to learn. Every image is float32 in
    [0, 1] and written as a 16-bit PNG.
    """
    rng = np.random.default_rng(seed)
    textures, margins = DEFAULT_VOCAB["texture"], DEFAULT_VOCAB["margin"]
    contrast = {"solid": 0.5, "part_solid": 0.35, "ground_glass": 0.2}
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5  # pixel centres
    records = []
    for i in range(n_images):
        image = rng.uniform(0.2, 0.3, (IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
        nodules = []
        for k, (cx, cy) in enumerate([(20.0, 24.0), (44.0, 40.0)]):
            cx, cy, r = cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3), rng.uniform(3.0, 5.0)
            j = 2 * i + k
            texture, margin = textures[j % 3], margins[(j // 3) % 3]
            image[(xs - cx) ** 2 + (ys - cy) ** 2 <= r * r] += contrast[texture]
            nodules.append(Nodule((cx - r, cy - r, cx + r, cy + r), {"texture": texture, "margin": margin},
                                  diameter_mm=2 * r * SPACING_MM))
        path = folder / "images" / f"disk_{i:02d}.png"
        common.save_image_png(path, np.clip(image, 0, 1))
        records.append(ImageRecord(path.resolve(), nodules, SPACING_MM))
    return write_annotations(folder / "annotations.csv", records, DEFAULT_VOCAB)


def train_tiny_base(path: Path, crops: NoduleCrops, seed: int, steps: int = 4) -> Path:
    """Train a tiny base model for a few steps (seeded init and data order) and save its checkpoint."""
    torch.manual_seed(seed)
    model = DiffusionModel(tiny_unet_config(), DEFAULT_VOCAB, DiffusionConfig())
    generator = torch.Generator().manual_seed(seed)
    loop = tiny_loop(steps)
    state = training.train_base(model, crops, loop, torch.device("cpu"), generator)
    diffusion.save_model(path, model, state, "base", {"seed": seed})
    return path


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    """The test machine has 2 shared cores: one intra-op thread avoids oversubscription with other jobs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def disk_csv(tmp_path_factory) -> Path:
    """The annotation CSV of the tiny disk data set (8 images, 16 nodules)."""
    return write_disk_dataset(tmp_path_factory.mktemp("disks"))


@pytest.fixture(scope="session")
def disk_records(disk_csv):
    return read_annotations(disk_csv, DEFAULT_VOCAB)


@pytest.fixture(scope="session")
def disk_crops(disk_records) -> NoduleCrops:
    """16-px nodule crops of the disk data set (augmented: shifts and flips drawn from the caller's generator)."""
    return NoduleCrops(disk_records, DEFAULT_VOCAB, CROP_SIZE, SPACING_MM)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, disk_crops) -> Path:
    """A tiny base checkpoint trained for 4 steps with seed 0 (kind 'base', EMA weights, fingerprint)."""
    return train_tiny_base(tmp_path_factory.mktemp("base") / "base.pt", disk_crops, seed=0)


DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def make_dicom(path, pixels, photometric="MONOCHROME2", bits=12, **tags):
    """A small DX file: `pixels` (H, W) uint16 stored values (or (F, H, W) / (H, W, 3) for the error cases)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX_SOP_CLASS
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.SeriesNumber = "P001", "Test^Patient", "DX", 3
    ds.ImageType = ["ORIGINAL", "PRIMARY", "POST_PROCESSED"]
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    else:
        ds.PhotometricInterpretation, ds.Rows, ds.Columns = photometric, 4, 4
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path
