"""The four training stages of `train.py`: base model, attribute LoRAs, LoRA composition, CFG baseline.

    base      mask-conditioned inpainting model on all nodules, generic token, attributes null   (design §4)
    lora      one LoRA per attribute value a on the nodules carrying a, with a learned token, base frozen [LoRA]
    compose   composition training of an attribute pair/triple: L = L_preserve + λ_o·L_orth + λ_a·L_attn [OURS]
              (or `ziplora`: L_preserve + λ·Σ|m_1·m_2| [ZipLoRA §3])
    cfg       baseline: one model with attribute tokens, each dropped to null with p = 0.1             [CFG §3.2]

Each stage reads a base checkpoint or trains one, runs `training.fit` and writes atomic files under out_dir.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nodule_diffusion import compose, lora
from nodule_diffusion.common import DataError, load_checkpoint, rng_state, save_checkpoint, to_plain, unwrap
from nodule_diffusion.data import NoduleCrops
from nodule_diffusion.training import (DiffusionConfig, DiffusionModel, LoopConfig, denoising_loss,
                                       drop_attributes, fit, loop_state_dict, mse, random_batch)
from nodule_diffusion.unet import UNetConfig

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")  # attention projections [LoRA §4.2; diffusers SD LoRA]


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
    model = DiffusionModel(UNetConfig.from_dict(payload["unet_config"]), payload["vocab"],
                           DiffusionConfig(**payload["diffusion_config"]))
    try:
        model.load_state_dict(payload["model" if raw else "weights"])
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not fit the stored config ({str(err).splitlines()[0]})") from err
    return model.to(device), payload


# ----------------------------------------------------------------------------------------------- stages
def train_base(model: DiffusionModel, crops: NoduleCrops, cfg: LoopConfig, device, generator, out: Path,
               state=None, on_step=None, cfg_dropout: float | None = None, rank: int = 0) -> dict:
    """Base stage (generic token, attributes null) or, with cfg_dropout, the CFG baseline (attribute tokens)."""
    scheduler = model.diffusion.scheduler()
    net = model if not torch.distributed.is_initialized() else torch.nn.parallel.DistributedDataParallel(model)

    def loss_fn(step):
        batch = random_batch(crops, cfg.batch_size, generator, device)
        if cfg_dropout is None:
            attrs = torch.full_like(batch["attrs"], -1)  # base: generic "nodule" token, every attribute null
        else:
            attrs = drop_attributes(batch["attrs"], cfg_dropout, generator)
        return denoising_loss(net, scheduler, batch, model.diffusion.mask_weight, generator, attrs), {}

    return fit(model, list(model.parameters()), loss_fn, cfg, device, generator, state, on_step,
               desc="cfg" if cfg_dropout is not None else "base", rank=rank)


def subset_of(crops: NoduleCrops, vocab: dict, attribute: str, value: str) -> torch.Tensor:
    """Indices of crops whose `attribute` equals `value`; DataError when there are none."""
    if attribute not in vocab or value not in vocab[attribute]:
        allowed = "; ".join(f"{a}={'|'.join(v)}" for a, v in vocab.items())
        raise DataError(f"unknown attribute value {attribute}={value}; allowed: {allowed}")
    k = list(vocab).index(attribute)
    idx = torch.nonzero(crops.attrs[:, k] == vocab[attribute].index(value)).flatten()
    if len(idx) == 0:
        raise DataError(f"no labelled nodules with {attribute}={value} in the training data: a LoRA stage needs "
                        f"nodules carrying the attribute (give labels through the project's CSV)")
    return idx


def only(attrs: torch.Tensor, vocab: dict, keep: list[str]) -> torch.Tensor:
    """attrs with every attribute not in `keep` set to null (−1)."""
    out = attrs.clone()
    for k, name in enumerate(vocab):
        if name not in keep:
            out[:, k] = -1
    return out


def train_lora(model: DiffusionModel, crops: NoduleCrops, attribute: str, value: str, r: int, alpha: float,
               cfg: LoopConfig, device, generator, on_step=None, init: str = "kaiming") -> dict:
    """LoRA stage for one attribute value: adapter on the attention projections + that value's token train.

    init="orthogonal_bases": Orthogonal Adaptation [Po et al. 2024 §3.2]: A is a fixed slice of a shared random
    orthogonal basis, disjoint for every value of the vocabulary, and only B trains; any two such adapters then
    have ⟨ΔW_i, ΔW_j⟩_F = 0 by construction (the "fixed orthogonal bases" strategy, merged by `linear`).
    """
    idx = subset_of(crops, model.vocab, attribute, value)
    name = f"{attribute}={value}"
    model.requires_grad_(False)
    lora.inject_lora(model.unet, LORA_TARGETS, name, r, alpha)
    if init == "orthogonal_bases":
        _fix_orthogonal_basis(model, name, r)
    elif init != "kaiming":
        raise DataError(f"--lora_init {init!r}: choose kaiming or orthogonal_bases")
    lora.set_active(model.unet, [name])
    token = model.tokens.values[name]
    token.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    scheduler = model.diffusion.scheduler()

    def loss_fn(step):
        batch = random_batch(crops, cfg.batch_size, generator, device, subset=idx)
        attrs = only(batch["attrs"], model.vocab, [attribute])
        return denoising_loss(model, scheduler, batch, model.diffusion.mask_weight, generator, attrs), {}

    cfg = LoopConfig(**{**to_plain(cfg), "ema_decay": 0.0})  # adapters are small and short-trained: no EMA
    return fit(model, params, loss_fn, cfg, device, generator, None, on_step, desc=f"lora {name}")


def _fix_orthogonal_basis(model: DiffusionModel, name: str, r: int) -> None:
    """Replace A of adapter `name` in every layer by its disjoint slice of a seeded orthogonal basis; freeze A."""
    values = [f"{a}={v}" for a, vs in model.vocab.items() for v in vs]
    slot = values.index(name)
    with torch.no_grad():
        for layer_name, layer in lora.lora_layers(model.unet).items():
            if layer.in_features < r * len(values):
                raise DataError(f"orthogonal_bases: layer {layer_name} has {layer.in_features} inputs, fewer than "
                                f"rank {r} × {len(values)} vocabulary values; lower --lora_rank")
            bases = lora.orthogonal_bases(layer.in_features, r, len(values), seed=0)  # same seed: shared basis
            layer.lora_A[name].copy_(bases[slot])
            layer.lora_A[name].requires_grad_(False)


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


def train_compose(model: DiffusionModel, crops: NoduleCrops, names: list[str], strategy: str, cfg: LoopConfig,
                  device, generator, lambda_orth: float, lambda_attn: float, lambda_zip: float,
                  on_step=None) -> dict:
    """Composition training of loaded adapters `names` (each "attribute=value").

    Trainable: ZipLoRA-style merger vectors m_k per adapted layer [ZipLoRA §3] (base, factors, tokens frozen).
    1. L_preserve = Σ_k ‖ε_{θ+ΣΔW̃}(x_t, c_all) − sg ε_{θ+ΔW_k}(x_t, c_k)‖² on nodules carrying k  [ZipLoRA Eq. 2]
    2. ortho:   + λ_o·L_orth(ΔW̃_1…ΔW̃_n) + λ_a·mean_{i<j} overlap(attn_i, attn_j inside dilate(M))   [OURS]
       ziplora: + λ·Σ_layers mean|m_i ⊙ m_j|                                                          [ZipLoRA Eq. 3]
    """
    vocab = model.vocab
    pairs = [n.split("=", 1) for n in names]
    subsets = [subset_of(crops, vocab, a, v) for a, v in pairs]
    model.requires_grad_(False)
    for layer in lora.lora_layers(model.unet).values():
        for n in names:
            layer.add_merger(n)
    params = [p for layer in lora.lora_layers(model.unet).values() for k, p in layer.lora_m.items() if k in names]
    for p in params:
        p.requires_grad_(True)
    scheduler = model.diffusion.scheduler()
    positions = [model.tokens.token_position(a) for a, _ in pairs]
    attributes = [a for a, _ in pairs]

    def loss_fn(step):
        preserve, overlap = 0.0, torch.zeros((), device=device)
        for k, (a, v) in enumerate(pairs):
            batch = random_batch(crops, cfg.batch_size, generator, device, subset=subsets[k])
            b = batch["x0"].shape[0]
            t = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator).to(device)
            noise = torch.randn(batch["x0"].shape, generator=generator).to(device)
            xt = scheduler.add_noise(batch["x0"], noise, t)
            attrs_all = batch["attrs"].clone()
            for (a2, v2) in pairs:  # the composed model sees every composed attribute's token
                attrs_all[:, list(vocab).index(a2)] = vocab[a2].index(v2)
            attrs_all = only(attrs_all, vocab, attributes)
            with torch.no_grad():  # teacher: adapter k alone with its own token
                lora.set_active(model.unet, [names[k]])
                teacher = model(xt, t, batch["mask"], batch["context"], only(batch["attrs"], vocab, [a]))
            lora.set_active(model.unet, names)
            model.unet.set_attention_capture(strategy == "ortho" and lambda_attn > 0)
            student = model(xt, t, batch["mask"], batch["context"], attrs_all)
            weight = 1.0 + (model.diffusion.mask_weight - 1.0) * batch["region"]
            preserve = preserve + mse(student, teacher, weight)
            if strategy == "ortho" and lambda_attn > 0:
                overlap = overlap + attention_overlap(model, positions, batch["mask"])
            model.unet.set_attention_capture(False)
        factors = [lora.adapter_factors(model.unet, n) for n in names]
        if strategy == "ortho":
            orth = lora.orthogonality_loss(factors)
            total, parts = compose.composition_loss(preserve, orth, overlap / len(pairs), lambda_orth, lambda_attn)
        else:
            penalty = compose.ziplora_penalty(model.unet, names)
            total, parts = preserve + lambda_zip * penalty, {"preserve": float(preserve), "zip": float(penalty)}
        return total, parts

    cfg = LoopConfig(**{**to_plain(cfg), "ema_decay": 0.0})
    return fit(model, params, loss_fn, cfg, device, generator, None, on_step, desc=f"compose {strategy}")


def attention_overlap(model: DiffusionModel, positions: list[int], mask: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Mean over token pairs of the soft-IoU overlap of their cross-attention maps inside dilate(M) [OURS]."""
    maps = [probs for probs, _ in model.unet.cross_attention_maps()]  # per layer (B, h, H_l*W_l, L)
    per_token = [compose.mean_token_map(compose.token_maps(maps, p), size) for p in positions]  # (B, size²) each
    region = compose.attention_region(mask, size)  # (B, size²) bool
    pairs = [(i, j) for i in range(len(positions)) for j in range(i + 1, len(positions))]
    return sum(compose.attention_overlap(per_token[i], per_token[j], region) for i, j in pairs) / max(len(pairs), 1)


def composed_factors(model: DiffusionModel, names: list[str]) -> dict:
    """Fold the trained mergers into one exact composed adapter: the weighted sum of the ΔW̃_k (`linear`)."""
    return compose.linear([lora.adapter_factors(model.unet, n) for n in names], [1.0] * len(names))


def save_composed(path: Path, model: DiffusionModel, names: list[str], base_fp: str, config: dict) -> None:
    """Write the composed adapter (factors folded, scale 1) with every attribute token it needs."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    factors = {k: (a.detach(), b.detach()) for k, (a, b) in composed_factors(model, names).items()}
    lora.add_factors(model.unet, "composed", factors)
    extra = {f"token:{n}": model.tokens.values[n].detach().cpu() for n in names}
    lora.save_adapter(path, model.unet, "composed", base_fp, {**config, "adapters": names}, extra)
    lora.remove_adapter(model.unet, "composed")
    parts = path.with_suffix(".parts")  # each adapter with its trained mergers: the "after" of the diagnostics
    parts.mkdir(parents=True, exist_ok=True)
    for n in names:
        save_lora(parts / f"{n}.pt", model, n, base_fp, {**config, "adapter": n})


# ----------------------------------------------------------------------------------------------- data
def load_records(spec: str, cache_dir: Path, n_images: int, seed: int, vocab: dict) -> list:
    """Records for a `--data` spec: "phantom" (generated once into cache_dir, seeded) or "FORMAT:PATH".

    Under DDP only rank 0 generates the phantom; the other ranks wait at a barrier and then read it.
    """
    from nodule_diffusion import datasets, phantom
    from nodule_diffusion.data import read_annotations

    fmt, path = datasets.parse_data_spec(spec)
    if fmt == "phantom":
        folder = Path(cache_dir) / f"phantom_seed{seed}_n{n_images}"
        csv_path = folder / "annotations.csv"
        distributed = torch.distributed.is_initialized()
        if not csv_path.is_file() and (not distributed or torch.distributed.get_rank() == 0):
            phantom.make_dataset(folder, n_images, seed, vocab=vocab)
        if distributed:
            torch.distributed.barrier()
        return read_annotations(csv_path, vocab)
    return datasets.load_data(fmt, path, vocab)
