"""Tests for nodule_diffusion.training and nodule_diffusion.diffusion: loss, EMA, exact resume, checkpoints, LoRA stage.

All models are the tiny UNet of conftest.py (16-px crops, 16/32 channels); runs are a handful of optimiser steps,
except the "loss goes down" test (40 steps on the easy disk data set).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_loop, tiny_unet_config
from nodule_diffusion import diffusion, lora, training
from nodule_diffusion.data import DEFAULT_VOCAB, DataError
from nodule_diffusion.diffusion import DiffusionConfig, DiffusionModel, denoising_loss, loop_state_dict, snr_weight
from nodule_diffusion.training import EMA, RunFiles, drop_attributes

CPU = torch.device("cpu")


def new_model(seed: int = 0, **diffusion) -> DiffusionModel:
    torch.manual_seed(seed)
    return DiffusionModel(tiny_unet_config(), DEFAULT_VOCAB, DiffusionConfig(**diffusion))


def fixed_inputs(model: DiffusionModel, n: int = 3):
    """A fixed batch of model inputs (x_t, t, mask, context, attrs) for output comparisons."""
    g = torch.Generator().manual_seed(7)
    s = model.unet_config.crop_size
    xt, context = torch.randn(n, 1, s, s, generator=g), torch.randn(n, 1, s, s, generator=g)
    mask = (torch.rand(n, 1, s, s, generator=g) > 0.7).float()
    t = torch.tensor([0, 500, 999][:n])
    attrs = torch.tensor([[-1, -1, -1], [0, 1, -1], [2, 2, 1]][:n])
    return xt, t, mask, context, attrs


# ----------------------------------------------------------------------------------------------- loss, EMA, CFG
def test_denoising_loss_weights_the_nodule_region(disk_crops):
    """A model whose error is exactly 1 inside the region R and 0 outside: loss = mean_b λ|R_b| / (λ|R_b| + |¬R_b|)."""
    batch = disk_crops.get(torch.arange(4), torch.Generator().manual_seed(0))
    scheduler = DiffusionConfig(prediction_type="sample").scheduler()  # target = x0, known to the fake model

    def fake_model(xt, t, mask, context, attrs):
        return batch["x0"] + batch["region"]

    lam = 5.0
    loss = denoising_loss(fake_model, scheduler, batch, lam, torch.Generator().manual_seed(0))
    inside = batch["region"].flatten(1).sum(1)  # (B,) region pixels per crop
    outside = batch["region"][0].numel() - inside
    assert (inside > 0).all() and (outside > 0).all()
    assert loss.item() == pytest.approx((lam * inside / (lam * inside + outside)).mean().item(), rel=1e-5)


def test_denoising_loss_at_a_given_t_sees_that_t_and_the_same_noise(disk_crops):
    """t given: the model is called at exactly that t, and with the x_t a drawn t of that value would give (the
    generator advances as when drawing), so losses at chosen noise levels are paired with the training loss."""
    batch = disk_crops.get(torch.arange(4), torch.Generator().manual_seed(0))
    scheduler = DiffusionConfig().scheduler()
    seen = []

    def model(xt, t, mask, context, attrs):
        seen.append((xt, t))
        return xt * 0.5

    drawn = denoising_loss(model, scheduler, batch, 5.0, torch.Generator().manual_seed(3))
    t_drawn = seen[-1][1]
    given = denoising_loss(model, scheduler, batch, 5.0, torch.Generator().manual_seed(3), t=t_drawn.clone())
    assert torch.equal(seen[-1][0], seen[0][0]) and given.item() == drawn.item()
    other = torch.full_like(t_drawn, 10)
    assert not torch.equal(other, t_drawn)
    low = denoising_loss(model, scheduler, batch, 5.0, torch.Generator().manual_seed(3), t=other)
    assert torch.equal(seen[-1][1], other) and low.item() != drawn.item()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weight_matches_the_paper(kind):
    """[MINSNR Eq. 8] min(SNR, γ) on the x0-MSE, expressed for each target; γ = 0 switches it off."""
    scheduler = DiffusionConfig(prediction_type=kind).scheduler()
    t = torch.tensor([0, 100, 500, 900, 999])
    alpha_bar = scheduler.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    # ε-MSE = x0-MSE · SNR and v-MSE = x0-MSE · (SNR + 1), so each weight times that factor must be min(SNR, γ)
    factor = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[kind]
    weight = snr_weight(scheduler, t, 5.0).double()
    torch.testing.assert_close(weight * factor, torch.clamp(snr, max=5.0), rtol=1e-5, atol=1e-7)
    assert torch.equal(snr_weight(scheduler, t, 0.0), torch.ones(5))


def test_ema_update_formula():
    """θ_ema ← d_k·θ_ema + (1 − d_k)·θ with the warm-up d_k = min(decay, (1 + k)/(10 + k)) at update k."""
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.75)
    for k in range(30):  # d_k = 0.1, 0.18, … then capped at 0.75 once (1 + k)/(10 + k) exceeds it (k ≥ 24)
        before = {key: v.clone() for key, v in ema.shadow.items()}
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        ema.update(net)
        d = min(0.75, (1 + k) / (10 + k))
        for name, value in net.state_dict().items():
            assert torch.allclose(ema.shadow[name], d * before[name] + (1 - d) * value, rtol=1e-6, atol=1e-5), (k, name)


def test_drop_attributes_rate_is_p():
    """Each attribute is nulled independently with probability p: rate ≈ p, joint rate ≈ p² [CFG §3.2]."""
    attrs = torch.zeros(40000, 3, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    p = 0.1
    dropped = drop_attributes(attrs, p, g) == -1
    assert set(drop_attributes(attrs, p, g).unique().tolist()) <= {-1, 0}  # kept values are untouched
    sd = math.sqrt(p * (1 - p) / dropped.numel())
    assert abs(dropped.float().mean().item() - p) < 5 * sd
    for k in range(3):  # every column at the same rate
        assert abs(dropped[:, k].float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / len(attrs))
    both = (dropped[:, 0] & dropped[:, 1]).float().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p / len(attrs))  # independence across attributes
    assert not (drop_attributes(attrs, 0.0, g) == -1).any()
    assert (drop_attributes(attrs, 1.0, g) == -1).all()


# ----------------------------------------------------------------------------------------------- training loop
def test_training_lowers_the_loss(disk_crops, tmp_path):
    """40 steps on bright disks bring the (fixed-draw) denoising loss well below its initial value of ≈ 1."""
    model = new_model(0, prediction_type="epsilon", min_snr_gamma=0.0)  # unweighted ε-MSE starts at E[ε²] = 1
    scheduler = model.diffusion.scheduler()

    def evaluate() -> float:
        g = torch.Generator().manual_seed(123)  # the same crops, t and ε before and after training
        batch = disk_crops.get(torch.arange(len(disk_crops)), g)
        null = torch.full_like(batch["attrs"], -1)
        with torch.no_grad():
            return sum(denoising_loss(model, scheduler, batch, 5.0, g, null).item() for _ in range(4)) / 4

    before = evaluate()
    assert before == pytest.approx(1.0, abs=0.15)  # zero-initialised output: loss = E[ε²] = 1 at the start
    training.train_base(model, disk_crops, tiny_loop(40, ema_decay=0.0), CPU, torch.Generator().manual_seed(0))
    assert evaluate() < 0.5 * before


class LossList:
    """A stand-in for the run's JsonlLogger: collects the logged losses (tiny_loop logs every step)."""

    def __init__(self, losses: list):
        self.losses = losses

    def log(self, **record):
        self.losses.append(record["loss"])


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(disk_crops, tmp_path):
    """Train 6 steps straight vs 3 steps → checkpoint on disk → rebuild → 3 more: identical losses and weights."""
    loop = tiny_loop(6)
    straight, losses_straight = new_model(0), []
    state_straight = training.train_base(straight, disk_crops, loop, CPU, torch.Generator().manual_seed(5),
                                         files=RunFiles(LossList(losses_straight)))

    first, losses_resumed = new_model(0), []
    state = training.train_base(first, disk_crops, tiny_loop(3), CPU, torch.Generator().manual_seed(5),
                                files=RunFiles(LossList(losses_resumed)))
    path = tmp_path / "interrupted.pt"
    diffusion.save_model(path, first, state, "base", {})
    del first, state
    second, payload = diffusion.load_model(path, CPU, raw=True)
    assert payload["loop"]["step"] == 3
    generator = torch.Generator().manual_seed(999)  # deliberately wrong: the checkpoint's state must win
    resumed = training.train_base(second, disk_crops, loop, CPU, generator, state=payload["loop"],
                                  files=RunFiles(LossList(losses_resumed)))

    assert len(losses_straight) == 6 and losses_resumed == losses_straight  # bit-identical floats
    for (name, a), b in zip(straight.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    for name, value in state_straight["ema"].shadow.items():
        assert torch.equal(value, resumed["ema"].shadow[name]), name
    assert resumed["step"] == 6


# ----------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_rebuilds_the_model(disk_crops, tmp_path):
    """weights_only=True loads the file; load_model rebuilds raw and EMA models from it alone, same outputs."""
    model = new_model(1)
    state = training.train_base(model, disk_crops, tiny_loop(2), CPU, torch.Generator().manual_seed(0))
    path = tmp_path / "base.pt"
    diffusion.save_model(path, model, state, "base", {"note": "test"})

    payload = torch.load(path, weights_only=True)
    for key in ("format_version", "kind", "unet_config", "vocab", "diffusion_config", "weights", "model", "loop",
                "rng_state", "train_config", "fingerprint"):
        assert key in payload, key
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in payload["model"])
    assert payload["fingerprint"] == diffusion.fingerprint(payload["weights"])
    loop = loop_state_dict(state)
    assert payload["loop"]["step"] == loop["step"] == 2

    inputs = fixed_inputs(model)
    model.eval()
    raw, _ = diffusion.load_model(path, CPU, raw=True)
    ema_model, _ = diffusion.load_model(path, CPU)
    raw.eval(), ema_model.eval()
    with torch.no_grad():
        assert torch.equal(raw(*inputs), model(*inputs))
        model.load_state_dict(state["ema"].shadow)  # the EMA checkpoint weights are the loop's EMA shadow
        assert torch.equal(ema_model(*inputs), model(*inputs))
    assert raw.unet_config == model.unet_config and raw.vocab == model.vocab
    assert raw.diffusion == model.diffusion


def test_broken_checkpoints_raise_data_error(tiny_base, tmp_path):
    data = tiny_base.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    for path in (truncated, empty, foreign, tmp_path / "missing.pt"):
        with pytest.raises(DataError, match=path.name):
            diffusion.load_model(path, CPU)


def test_checkpoint_of_the_wrong_kind_is_refused(tiny_base, tmp_path):
    model, payload = diffusion.load_model(tiny_base, CPU)
    lora.inject_lora(model.unet, diffusion.LORA_TARGETS, "texture=solid", 2, 2.0)
    path = tmp_path / "texture=solid.pt"
    diffusion.save_lora(path, model, "texture=solid", payload["fingerprint"], {})
    with pytest.raises(DataError, match="not a diffusion model checkpoint"):
        diffusion.load_model(path, CPU)


# ----------------------------------------------------------------------------------------------- LoRA stage
def _base_name(key: str) -> str:
    """State-dict key of a wrapped layer → the key it had before injection (`to_q.base.weight` → `to_q.weight`)."""
    return key.replace(".base.", ".")


def test_lora_stage_trains_only_the_adapter_and_its_token(tiny_base, disk_crops):
    model, _ = diffusion.load_model(tiny_base, CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training.train_lora(model, disk_crops, "texture", "solid", 4, 4.0, tiny_loop(3), CPU,
                      torch.Generator().manual_seed(0))

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_A.texture=solid" in n or "lora_B.texture=solid" in n) for n in trainable
                             if n != "tokens.values.texture=solid")
    assert "tokens.values.texture=solid" in trainable
    adapters = lora.adapter_state(model.unet, "texture=solid")
    assert adapters and any(v.abs().max() > 0 for k, v in adapters.items() if k.endswith("lora_B"))  # B left 0

    after = model.state_dict()
    for key, value in after.items():
        if ".lora_" in key:
            continue
        old = before[_base_name(key)]
        if key == "tokens.values.texture=solid":
            assert not torch.equal(value, old), "the attribute token should have trained"
        else:
            assert torch.equal(value, old), f"{key} changed during the LoRA stage"
    assert {_base_name(k) for k in after if ".lora_" not in k} == set(before)


def test_lora_stage_rejects_values_without_data(tiny_base, disk_crops):
    model, _ = diffusion.load_model(tiny_base, CPU)
    with pytest.raises(DataError, match="unknown attribute value"):
        training.train_lora(model, disk_crops, "texture", "plaid", 2, 2.0, tiny_loop(1), CPU, torch.Generator())
    with pytest.raises(DataError, match="calcification=calcified"):  # the disk data set has no calcification labels
        training.train_lora(model, disk_crops, "calcification", "calcified", 2, 2.0, tiny_loop(1), CPU,
                          torch.Generator())
