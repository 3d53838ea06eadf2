"""Training objectives and the one visible training loop shared by every stage of `train.py`.

Papers: [DDPM] arXiv:2006.11239, [IDDPM] arXiv:2102.09672, [CFG] arXiv:2207.12598, [LoRA] arXiv:2106.09685,
[ZipLoRA] arXiv:2311.13600, [OURS] the composition objective of design §4 / notes/method.md §3.

    denoising_loss     ε-MSE (or v / x0 target) up-weighted inside the dilated nodule mask   [DDPM Eq. 14]
    DiffusionModel     UNet + attribute tokens + scheduler, and its ε(x_t, t) call
    EMA                exponential moving average of weights used for sampling               [IDDPM §3]
    fit                AdamW + linear warm-up + gradient clipping + optional bf16 autocast, exact resume

DEVIATION: the paper's base model and resolution are unknown (notes/method.md §1); we train a small pixel-space
inpainting UNet on nodule-centred crops (design §4) so that everything runs on a laptop CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from nodule_diffusion.common import autocast, unwrap
from nodule_diffusion.schedulers import DDIMScheduler, DDPMScheduler
from nodule_diffusion.unet import AttributeTokens, UNet, UNetConfig


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "cosine"  # cosine keeps small 32-px crops from being pure noise too early [IDDPM §3.2]
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample
    mask_weight: float = 5.0  # loss weight inside dilate(M) relative to outside (1.0 = plain ε-MSE)

    def scheduler(self, sampler: str = "ddim"):
        """The sampler; x0_pred is clipped to the data range [−1, 1] at every step, as pixel-space DDPM
        samplers do (improved-diffusion's clip_denoised), which keeps a weakly trained model's chain bounded."""
        cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
        return cls(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                   prediction_type=self.prediction_type, clip_sample=True)


class DiffusionModel(torch.nn.Module):
    """ε_θ(x_t, t, c; M, C): the inpainting UNet with its attribute tokens (design §4).

    Input channels are [x_t, M, C] with C = x0·(1 − dilate(M)); tokens c = AttributeTokens(attrs), attrs (B, K)
    int64 with −1 = null token.
    """

    def __init__(self, unet_config: UNetConfig, vocab: dict[str, list[str]], diffusion: DiffusionConfig):
        super().__init__()
        self.unet_config, self.vocab, self.diffusion = unet_config, vocab, diffusion
        self.unet = UNet(unet_config)
        self.tokens = AttributeTokens(vocab, unet_config.context_dim)

    def forward(self, xt: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, context_image: torch.Tensor,
                attrs: torch.Tensor) -> torch.Tensor:
        x = torch.cat([xt, mask, context_image], dim=1)  # (B, 3, S, S)
        return self.unet(x, t, self.tokens(attrs))  # (B, 1, S, S)


def denoising_loss(model, scheduler, batch: dict, mask_weight: float, generator: torch.Generator,
                   attrs: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted denoising loss on one batch of crops (keys of data.NoduleCrops).

    1. t ~ U{0, …, T−1}, ε ~ N(0, I)                                     [DDPM Alg. 1 l.3–4]
    2. x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε                                       [DDPM Eq. 4]
    3. loss = Σ w·‖target − model(x_t, t)‖² / Σ w, w = 1 + (λ−1)·dilate(M)  [DDPM Eq. 14, mask-weighted]
    Randomness comes from `generator` (CPU) so that a resumed run draws exactly the same numbers.
    """
    x0 = batch["x0"]
    b = x0.shape[0]
    t = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    xt = scheduler.add_noise(x0, noise, t)
    pred = model(xt, t, batch["mask"], batch["context"], batch["attrs"] if attrs is None else attrs)
    target = scheduler.training_target(x0, noise, t)
    weight = 1.0 + (mask_weight - 1.0) * batch["region"]
    return (weight * (pred.float() - target) ** 2).sum() / weight.sum()


class EMA:
    """θ_ema ← d_k·θ_ema + (1 − d_k)·θ over floating-point tensors of a state dict [IDDPM §3].

    DEVIATION: d_k = min(decay, (1 + k)/(10 + k)) at update k (the warm-up of TensorFlow's
    ExponentialMovingAverage with num_updates). A constant 0.999 would leave a short CPU run's EMA weights mostly
    at their (zero-output) initialisation; with the warm-up the EMA tracks the weights early and averages late.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in unwrap(module).state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for name, value in unwrap(module).state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[name].lerp_(value.detach(), 1.0 - decay)
            else:
                self.shadow[name].copy_(value)


@dataclass
class LoopConfig:
    steps: int = 800  # ≈ 6 min on a 2-core CPU at batch 16 with the default UNet
    batch_size: int = 16
    lr: float = 3e-4
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 disables EMA
    bf16: bool = True  # bf16 autocast on CUDA only
    log_every: int = 50
    checkpoint_every: int = 500
    sample_every: int = 500  # sample grid PNG every N steps (0 = only at the end)
    extra: dict = field(default_factory=dict)


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up over min(warmup, steps/5) steps, then constant (short CPU runs do not profit from decay)."""
    warmup = max(1, min(cfg.warmup, cfg.steps // 5))
    return cfg.lr * min(1.0, (step + 1) / warmup)


def fit(model: torch.nn.Module, params: list[torch.nn.Parameter], loss_fn, cfg: LoopConfig,
        device: torch.device, generator: torch.Generator, state: dict | None = None, on_step=None,
        desc: str = "train", rank: int = 0) -> dict:
    """The training loop: AdamW, warm-up, clipping, EMA, autocast, tqdm; resumable from `state`.

    loss_fn(step) -> (loss tensor, dict of extra scalars to log). `on_step(step, loop_state)` is called after every
    optimiser step (the script uses it for logging, checkpoints and sample grids). Returns the loop state:
    {step, optimizer, ema (or None), generator, losses}. With `state` from a checkpoint the run continues exactly:
    same data order, same noise, same losses.
    """
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
            ema.updates = state["step"]
        generator.set_state(state["generator"])
        start = state["step"]
    loop = {"step": start, "optimizer": optimizer, "ema": ema, "generator": generator}
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, disable=rank != 0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with autocast(device, cfg.bf16):
            loss, extras = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower --lr")
        loop.update(step=step + 1, loss=loss.item(), extras=extras)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if on_step is not None:
            on_step(step + 1, loop)
    return loop


def loop_state_dict(loop: dict) -> dict:
    """The parts of a loop state that go into a checkpoint (tensors and primitives only)."""
    return {"step": loop["step"], "optimizer": loop["optimizer"].state_dict(),
            "ema": None if loop["ema"] is None else loop["ema"].shadow, "generator": loop["generator"].get_state()}


def random_batch(dataset, batch_size: int, generator: torch.Generator, device: torch.device,
                 subset: torch.Tensor | None = None) -> dict:
    """A random batch of crops (optionally from a subset of indices), moved to `device`."""
    pool = torch.arange(len(dataset)) if subset is None else subset
    idx = pool[torch.randint(0, len(pool), (batch_size,), generator=generator)]
    return {k: v.to(device) for k, v in dataset.get(idx, generator).items()}


def drop_attributes(attrs: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """CFG training: each attribute independently replaced by its null token (−1) with probability p [CFG §3.2]."""
    drop = torch.rand(attrs.shape, generator=generator) < p
    return attrs.masked_fill(drop.to(attrs.device), -1)


def mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (weight * (a.float() - b.float()) ** 2).sum() / weight.sum()

