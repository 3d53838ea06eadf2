"""bf16 autocast (issue 10): used on the CPU only where bf16 units exist; the bf16 path keeps shapes and stays finite."""

import torch

from conftest import tiny_unet_config
from nodule_diffusion import common
from nodule_diffusion.data import DEFAULT_VOCAB
from nodule_diffusion.diffusion import DiffusionConfig, DiffusionModel


def test_autocast_turns_cpu_bf16_on_only_with_bf16_units(monkeypatch):
    cpu = torch.device("cpu")
    for fast in (False, True):
        monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: fast)
        with common.autocast(cpu, enabled=True):
            assert torch.is_autocast_enabled("cpu") == fast
        with common.autocast(cpu, enabled=False):
            assert not torch.is_autocast_enabled("cpu")


def test_bf16_training_step_is_finite_and_keeps_shapes():
    torch.manual_seed(0)
    model = DiffusionModel(tiny_unet_config(), DEFAULT_VOCAB, DiffusionConfig())
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised output layers would make every output 0
            p.add_(0.05 * torch.randn_like(p))
    s = model.unet_config.crop_size
    xt, mask = torch.randn(2, 1, s, s), (torch.rand(2, 1, s, s) > 0.5).float()
    t, attrs = torch.tensor([10, 900]), torch.full((2, 3), -1)
    ref = model(xt, t, mask, xt * (1 - mask), attrs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(xt, t, mask, xt * (1 - mask), attrs)
    assert low.shape == ref.shape and torch.isfinite(low.float()).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 has an 8-bit mantissa
    low.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
