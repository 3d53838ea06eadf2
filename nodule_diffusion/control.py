"""Attribute control at sampling time: from a checkpoint and adapter files to a `generate` function.

Strategies (notes/method.md §2, design §4):
    base                    no attribute control (generic token, attributes null)
    lora                    one single-attribute adapter                                          [LoRA]
    linear, svd, ties, dare weight-space merges of the single adapters, folded into one adapter     [compose.py]
    ortho, ziplora          the composed adapter written by `train.py --stage compose`             [OURS], [ZipLoRA]
    switch                  one adapter active at a time, cycling every τ denoising steps          [Zhong et al. 2024]
    composite               mean of the ε of every adapter alone, at every step                    [Zhong et al. 2024]
    klora                   per layer, the adapter with the larger top-k |ΔW| mass, time-weighted  [K-LoRA]
    cfg                     the CFG baseline checkpoint with joint or compositional guidance       [CFG], [Liu et al. 2022]
"""

from __future__ import annotations

from pathlib import Path

import torch

from nodule_diffusion import compose, lora, stages
from nodule_diffusion.common import DataError
from nodule_diffusion.synthesis import generate_crops

MERGES = {"linear": compose.linear, "svd": compose.svd, "ties": compose.ties,
          "dare": lambda adapters, weights: compose.dare(adapters, weights, density=0.5, seed=0)}
STRATEGIES = ("base", "lora", *MERGES, "ortho", "ziplora", "switch", "composite", "klora", "cfg")


def parse_attributes(text: str, vocab: dict) -> dict[str, str]:
    """'texture=ground_glass,margin=spiculated' -> dict, validated against the vocabulary."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if name not in vocab or value not in vocab[name]:
            allowed = "; ".join(f"{a}={'|'.join(v)}" for a, v in vocab.items())
            raise DataError(f"--attributes: unknown value {item!r}; allowed: {allowed}")
        out[name] = value
    return out


def attr_tensor(attributes: dict[str, str], vocab: dict, n: int, device) -> torch.Tensor:
    row = [vocab[a].index(attributes[a]) if a in attributes else -1 for a in vocab]
    return torch.tensor([row] * n, dtype=torch.long, device=device)  # (n, K)


def composed_path(out_dir: Path, strategy: str, names: list[str]) -> Path:
    return Path(out_dir) / "compose" / f"{strategy}_{'+'.join(sorted(names))}.pt"


def build_generator(ckpt: str, strategy: str, attributes: dict[str, str], lora_dir: Path, device,
                    steps: int = 50, eta: float = 0.0, sampler: str = "ddim", guidance: float = 3.0,
                    compositional: bool = False, tau: int = 5):
    """Returns (generate(masks, contexts, requests) -> x0 crops, model). Every file is checked before sampling."""
    if strategy not in STRATEGIES:
        raise DataError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    model, payload = stages.load_model(ckpt, device)
    model.eval()
    if (strategy == "cfg") != (payload["kind"] == "cfg"):
        raise DataError(f"{ckpt}: strategy {strategy!r} needs a {'cfg' if strategy == 'cfg' else 'base'} "
                        f"checkpoint, this one is {payload['kind']!r}")
    names = [f"{a}={v}" for a, v in attributes.items()]
    eps_fn = _eps_function(model, payload["fingerprint"], strategy, names, attributes, Path(lora_dir),
                           guidance, compositional, tau, steps)
    scheduler = model.diffusion.scheduler(sampler)
    scheduler.set_timesteps(steps)

    def generate(masks, contexts, requests, originals=None):  # originals: unused, the model sees only context
        masks, contexts = masks.to(device), contexts.to(device)
        return generate_crops(lambda xt, t, k: eps_fn(xt, t, k, masks, contexts), scheduler, masks, contexts,
                              [r.seed for r in requests], [r.index for r in requests], eta)

    return generate, model


def _eps_function(model, fingerprint, strategy, names, attributes, lora_dir, guidance, compositional, tau, steps):
    if strategy in ("base", "cfg") or not names:
        if strategy not in ("base", "cfg"):
            raise DataError(f"--strategy {strategy} needs --attributes")
        return _plain_eps(model, attributes, guidance if strategy == "cfg" else None, compositional)
    if strategy == "lora" and len(names) != 1:
        raise DataError("--strategy lora takes exactly one attribute value; use a composition strategy for more")
    if strategy in ("ortho", "ziplora"):
        path = composed_path(lora_dir.parent, strategy, names)
        if not path.is_file():
            raise DataError(f"{path}: no composed adapter; run train.py --stage compose --strategy {strategy} "
                            f"--attributes {','.join(names)} first")
        stages.load_lora(path, model, fingerprint, "composed")
        lora.set_active(model.unet, ["composed"])
        return _plain_eps(model, attributes, None, False)
    for name in names:
        stages.load_lora(lora_dir / f"{name}.pt", model, fingerprint, name)
    if strategy == "lora":
        lora.set_active(model.unet, names)
    elif strategy in MERGES:
        factors = MERGES[strategy]([lora.adapter_factors(model.unet, n) for n in names], [1.0] * len(names))
        lora.add_factors(model.unet, "composed", {k: (a.detach(), b.detach()) for k, (a, b) in factors.items()})
        lora.set_active(model.unet, ["composed"])
    if strategy in ("lora", *MERGES):
        return _plain_eps(model, attributes, None, False)
    return _dynamic_eps(model, strategy, names, attributes, tau, steps)


def _plain_eps(model, attributes, guidance, compositional):
    """ε(x_t) with the requested tokens; with `guidance`, classifier-free guidance [CFG Eq. 6]:
    joint ε̃ = ε(∅) + g·(ε(y) − ε(∅)); compositional ε̃ = ε(∅) + Σ_k g·(ε(y_k) − ε(∅)) [Liu et al. 2022 Eq. 12]."""
    vocab = model.vocab

    @torch.no_grad()
    def eps(xt, t, k, masks, contexts):
        cond = model(xt, t, masks, contexts, attr_tensor(attributes, vocab, len(xt), xt.device))
        if guidance is None:
            return cond
        null = model(xt, t, masks, contexts, attr_tensor({}, vocab, len(xt), xt.device))
        if not compositional:
            return null + guidance * (cond - null)
        parts = [model(xt, t, masks, contexts, attr_tensor({a: v}, vocab, len(xt), xt.device)) - null
                 for a, v in attributes.items()]
        return null + guidance * sum(parts)
    return eps


def _dynamic_eps(model, strategy, names, attributes, tau, steps):
    """Sampling-time compositions: switch, composite and K-LoRA change the active adapters during sampling."""
    vocab = model.vocab
    layers = lora.lora_layers(model.unet)
    if strategy == "klora":
        if len(names) != 2:
            raise DataError("--strategy klora composes exactly two adapters")
        fa, fb = (lora.adapter_factors(model.unet, n) for n in names)
        scores = compose.klora_scores(fa, fb)

    @torch.no_grad()
    def eps(xt, t, k, masks, contexts):
        attrs = attr_tensor(attributes, vocab, len(xt), xt.device)
        if strategy == "switch":
            lora.set_active(model.unet, [compose.switch_schedule(k, names, tau)])
        elif strategy == "composite":
            outs = []
            for n in names:
                lora.set_active(model.unet, [n])
                outs.append(model(xt, t, masks, contexts, attrs))
            return compose.composite_eps(outs)
        else:  # klora: per layer, per step
            for i, (name, layer) in enumerate(layers.items()):
                s_a, s_b, gamma = scores[name]
                pick = compose.klora_choose(s_a, s_b, gamma, k * len(layers) + i, steps * len(layers))
                layer.set_active([names[pick]])
        return model(xt, t, masks, contexts, attrs)
    return eps
