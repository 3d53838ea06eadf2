"""The diffusion model of design §4 and everything that is *one* of it: config, ε call, denoising loss, files.

Papers: [DDPM] arXiv:2006.11239, [IDDPM] arXiv:2102.09672, [LoRA] arXiv:2106.09685, [LDM] arXiv:2112.10752,
[VPRED] Salimans & Ho, arXiv:2202.00512 (v-prediction), [MINSNR] Hang et al., arXiv:2303.09556 (Min-SNR-γ).

    DiffusionConfig    T, β schedule, prediction target, mask weight λ; builds the DDIM/DDPM sampler
    DiffusionModel     ε_θ(x_t, t, c; M, C) = UNet([x_t, M, C], t, tokens(attrs))             [LDM §3.3]
    denoising_loss     v-MSE (or ε / x0 target), Min-SNR-γ weighted over t, up-weighted in the nodule region
    save_model / load_model / fingerprint / loop_state_dict   model checkpoints, rebuilt from the file alone
    save_lora / load_lora / composed_path     adapter files with the attribute tokens they need
    check_value / parse_attributes / adapter_names / attr_tensor / only / subset_of
                       the one attribute-vocabulary path: "texture=solid,…" → validated dict → (B, K) rows

Attribute rows: attrs (B, K) int64, column k = value index of the k-th vocabulary attribute, −1 = null token.

DEVIATION: the paper's base model and resolution are unknown (notes/method.md §1); we train a small pixel-space
inpainting UNet on nodule-centred crops (design §4) so that everything runs on a laptop CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nodule_diffusion import lora
from nodule_diffusion.common import DataError, load_checkpoint, rng_state, save_checkpoint, to_plain, unwrap
from nodule_diffusion.data import NoduleCrops, attribute_indices
from nodule_diffusion.schedulers import DDIMScheduler, DDPMScheduler
from nodule_diffusion.unet import AttributeTokens, UNet, UNetConfig

# Attention projections [LoRA §4.2; diffusers SD LoRA], the transformer blocks' proj_in / proj_out and feed-forward
# (fc1, fc2), and the ResBlocks' 3×3 convolutions conv1 / conv2 as LoCon [LyCORIS §3] (design §4: "optionally
# feed-forward and convs"). Why (issue 10): texture and margin detail at 32 px is drawn by the ResBlocks, at
# resolutions where no attention runs.
# At 100 CPU steps, lr 5e-3, DDIM-50 η = 1, judge accuracy went from all linears to + convolutions: 0.41 → 0.53
# (ground glass), 0.44 → 0.94 (calcified), 0.31 → 0.94 (spiculated); fine-tuning the whole UNet gave 0.69, 0.88,
# 0.78 (benchmarks/controllability_sweep.py; RESULTS.md, "LoRA reach").
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "fc1", "fc2", "conv1", "conv2")


# ----------------------------------------------------------------------------------------------- model and loss
@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000  # T, the length of the forward chain [DDPM §4]
    beta_schedule: str = "cosine"  # cosine keeps small 32-px crops from being pure noise too early [IDDPM §3.2]
    # v [VPRED §4]: at the demo budget (400 steps) ε-prediction sampled speckle (mean |Laplacian| in the region
    # 0.36 vs 0.14 on real crops), v-prediction with Min-SNR-5 gave 0.09 (benchmarks/RESULTS.md, "Base model").
    prediction_type: str = "v_prediction"  # what the UNet predicts: v_prediction | epsilon | sample (x0)
    min_snr_gamma: float = 5.0  # Min-SNR-γ weight per timestep [MINSNR Eq. 8]; 0 = uniform over t
    mask_weight: float = 5.0  # loss weight inside the nodule region relative to outside (1.0 = plain MSE)

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


def snr_weight(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weight (B,) per timestep [MINSNR Eq. 8], for the scheduler's target; 1 when gamma = 0.

    SNR_t = ᾱ_t / (1 − ᾱ_t). The weight min(SNR_t, γ)/SNR_t on ε-MSE equals min(SNR_t, γ) on x0-MSE; a v-MSE
    is (SNR_t + 1)·x0-MSE, so its weight is min(SNR_t, γ)/(SNR_t + 1) [MINSNR §3.4].
    """
    if gamma <= 0:
        return torch.ones(t.shape, device=t.device)
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    kind = scheduler.prediction_type
    return clipped / snr if kind == "epsilon" else clipped / (snr + 1.0) if kind == "v_prediction" else clipped


def denoising_loss(model, scheduler, batch: dict, mask_weight: float, generator: torch.Generator,
                   attrs: torch.Tensor | None = None, min_snr_gamma: float = 0.0,
                   t: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted denoising loss on one batch of crops (keys of data.NoduleCrops).

    1. t ~ U{0, …, T−1} (or the given t (B,), to measure the loss at chosen noise levels), ε ~ N(0, I)
                                                                          [DDPM Alg. 1 l.3–4]
    2. x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε                                       [DDPM Eq. 4]
    3. per crop: ℓ_b = Σ w·‖target − model(x_t, t)‖² / Σ w, w = 1 + (λ−1)·region   [DDPM Eq. 14, weighted]
    4. loss = mean_b snr_weight(t_b)·ℓ_b                                 [MINSNR Eq. 8]; γ = 0: plain mean
    Randomness comes from `generator` (CPU) so that a resumed run draws exactly the same numbers.
    """
    x0 = batch["x0"]
    b = x0.shape[0]
    drawn = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator)  # drawn either way: a
    t = (drawn if t is None else t).to(x0.device)  # given t leaves the noise the same as a drawn one would see
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    xt = scheduler.add_noise(x0, noise, t)
    pred = model(xt, t, batch["mask"], batch["context"], batch["attrs"] if attrs is None else attrs)
    target = scheduler.training_target(x0, noise, t)
    weight = 1.0 + (mask_weight - 1.0) * batch["region"]  # (B, 1, S, S)
    per_crop = (weight * (pred.float() - target) ** 2).flatten(1).sum(1) / weight.flatten(1).sum(1)  # (B,)
    return (snr_weight(scheduler, t, min_snr_gamma) * per_crop).mean()


# ----------------------------------------------------------------------------------------------- attribute vocabulary
def check_value(attribute: str, value: str, vocab: dict, where: str = "--attributes") -> None:
    """DataError naming `where` and every allowed value unless `attribute=value` is in the vocabulary."""
    if attribute not in vocab or value not in vocab[attribute]:
        allowed = "; ".join(f"{a}={'|'.join(v)}" for a, v in vocab.items())
        raise DataError(f"{where}: unknown attribute value {attribute}={value}; allowed: {allowed}")


def parse_attributes(text: str, vocab: dict) -> dict[str, str]:
    """'texture=ground_glass,margin=spiculated' -> dict, validated against the vocabulary (one value each)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        check_value(name, value, vocab)
        if name in out:
            raise DataError(f"--attributes: {name} is given twice ({name}={out[name]}, {name}={value}); one value each")
        out[name] = value
    return out


def adapter_names(attributes: dict[str, str]) -> list[str]:
    """{attribute: value} -> adapter names ["attribute=value", …] in the given order (one LoRA per value)."""
    return [f"{a}={v}" for a, v in attributes.items()]


def attr_tensor(attributes: dict[str, str], vocab: dict, n: int, device) -> torch.Tensor:
    """n identical attribute rows (n, K) int64 for `attributes`; attributes left out are null (−1)."""
    return torch.tensor([attribute_indices(attributes, vocab)] * n, dtype=torch.long, device=device)  # (n, K)


def subset_of(crops: NoduleCrops, vocab: dict, attribute: str, value: str) -> torch.Tensor:
    """Indices of crops whose `attribute` equals `value`; DataError when there are none."""
    check_value(attribute, value, vocab, "LoRA stage")
    k = list(vocab).index(attribute)
    idx = torch.nonzero(crops.attrs[:, k] == vocab[attribute].index(value)).flatten()
    if len(idx) == 0:
        raise DataError(f"no labelled nodules with {attribute}={value} in the training data: a LoRA stage needs "
                        f"nodules carrying the attribute (give labels through the project's CSV)")
    return idx


def joint_subset(crops: NoduleCrops, vocab: dict, names: list[str]) -> torch.Tensor:
    """Indices of crops carrying every one of `names` ("attribute=value"); empty when none does (DataError when
    one value alone has no crop, as `subset_of`)."""
    subsets = [subset_of(crops, vocab, *n.split("=", 1)) for n in names]
    joint = subsets[0]
    for subset in subsets[1:]:
        joint = joint[torch.isin(joint, subset)]
    return joint


def only(attrs: torch.Tensor, vocab: dict, keep: list[str]) -> torch.Tensor:
    """attrs with every attribute not in `keep` set to null (−1)."""
    out = attrs.clone()
    for k, name in enumerate(vocab):
        if name not in keep:
            out[:, k] = -1
    return out


# ----------------------------------------------------------------------------------------------- checkpoints
def save_model(path: Path, model: DiffusionModel, loop: dict | None, kind: str, train_config: dict) -> None:
    """Checkpoint = plain dict; sampling weights are the EMA weights when EMA ran (`weights`)."""
    weights = loop["ema"].shadow if loop is not None and loop["ema"] is not None else unwrap(model).state_dict()
    save_checkpoint(path, {
        "kind": kind, "unet_config": model.unet_config.to_dict(), "vocab": model.vocab,
        "diffusion_config": to_plain(model.diffusion), "weights": {k: v.cpu() for k, v in weights.items()},
        "model": {k: v.cpu() for k, v in unwrap(model).state_dict().items()},
        "loop": None if loop is None else loop_state_dict(loop), "rng_state": rng_state(),
        "train_config": to_plain(train_config), "fingerprint": fingerprint(weights)})


def fingerprint(weights: dict) -> str:
    """Names the base an adapter belongs to: SHA-256 of the UNet weights used for sampling (tokens excluded)."""
    return lora.fingerprint_state_dict({k: v for k, v in weights.items() if k.startswith("unet.")})


def load_model(path: str | Path, device: torch.device, raw: bool = False) -> tuple[DiffusionModel, dict]:
    """Rebuild a DiffusionModel from a checkpoint alone (EMA weights unless raw=True); returns (model, payload)."""
    payload = load_checkpoint(path)
    if payload.get("kind") not in ("base", "cfg"):
        raise DataError(f"{path}: not a diffusion model checkpoint (kind {payload.get('kind')!r})")
    known = set(DiffusionConfig.__dataclass_fields__)
    if unknown := sorted(set(payload["diffusion_config"]) - known):  # written by newer code, or edited
        raise DataError(f"{path}: diffusion_config has unknown key(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(known))}")
    model = DiffusionModel(UNetConfig.from_dict(payload["unet_config"], source=str(path)), payload["vocab"],
                           DiffusionConfig(**payload["diffusion_config"]))
    try:
        model.load_state_dict(payload["model" if raw else "weights"])
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not fit the stored config ({str(err).splitlines()[0]})") from err
    return model.to(device), payload


def loop_state_dict(loop: dict) -> dict:
    """The parts of a loop state that go into a checkpoint (tensors and primitives only)."""
    return {"step": loop["step"], "optimizer": loop["optimizer"].state_dict(),
            "ema": None if loop["ema"] is None else loop["ema"].shadow, "generator": loop["generator"].get_state()}


def save_lora(path: Path, model: DiffusionModel, name: str, base_fp: str, config: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    extra = {f"token:{name}": model.tokens.values[name].detach().cpu()}
    lora.save_adapter(path, model.unet, name, base_fp, config, extra)


def load_lora(path: Path, model: DiffusionModel, base_fp: str, name: str | None = None) -> tuple[str, dict]:
    """Load an adapter file and the attribute tokens it carries; returns (adapter name, config)."""
    payload_name = name or Path(path).stem
    if not Path(path).is_file():
        raise DataError(f"{path}: adapter file not found (train it with train.py --stage lora)")
    config, extra = lora.load_adapter(path, model.unet, payload_name, base_fp)
    with torch.no_grad():
        for key, tensor in extra.items():
            if key.startswith("token:"):
                model.tokens.values[key[len("token:"):]].copy_(tensor)
    return payload_name, config


def composed_path(out_dir: Path, strategy: str, names: list[str]) -> Path:
    """Where `train.py --stage compose` writes the composed adapter of `names`, and sample.py looks for it."""
    return Path(out_dir) / "compose" / f"{strategy}_{'+'.join(sorted(names))}.pt"
