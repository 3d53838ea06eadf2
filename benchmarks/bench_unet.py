"""Speed of our UNet against diffusers' UNet2DConditionModel built with the same architecture.

The twin uses the same widths, depth (layers_per_block = num_res_blocks), attention placement
(CrossAttnDownBlock2D / CrossAttnUpBlock2D at our attention levels, UNetMidBlock2DCrossAttn in the middle),
heads, cross_attention_dim = context_dim, GEGLU feed-forward and linear proj_in/proj_out. Before timing, our
weights are copied into the twin and the two outputs are compared, so the two networks compute the same function
(tests/test_unet.py uses `diffusers_twin` and `copy_weights_to_diffusers` from here for its parity test).

Measured, interleaved over --repeats rounds; the fastest round is kept (timeit's rule: on a shared machine the
minimum is the least disturbed estimate):
  - training step fwd+bwd: FLOPs from torch.utils.flop_counter.FlopCounterMode on one fwd+bwd, divided by time;
  - sampling: --steps forward passes under no_grad (a DDIM-50 loop's network cost), reported as crops/s;
  - the machine's fp32 matmul GFLOP/s (1024×1024×1024) as the ceiling for reference.

Examples:
    python benchmarks/bench_unet.py
    python benchmarks/bench_unet.py --batch 16 --repeats 3 --out results.json
    python benchmarks/bench_unet.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodule_diffusion.unet import UNet, UNetConfig, count_parameters  # noqa: E402

# Our parameter names → diffusers' names, applied in order (each a re.sub).
_NAME_RULES = [
    (r"^t_mlp\.0\.", "time_embedding.linear_1."),
    (r"^t_mlp\.2\.", "time_embedding.linear_2."),
    (r"^down\.(\d+)\.res\.", r"down_blocks.\1.resnets."),
    (r"^down\.(\d+)\.attn\.", r"down_blocks.\1.attentions."),
    (r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0.conv."),
    (r"^up\.(\d+)\.res\.", r"up_blocks.\1.resnets."),
    (r"^up\.(\d+)\.attn\.", r"up_blocks.\1.attentions."),
    (r"^up\.(\d+)\.resample\.conv\.", r"up_blocks.\1.upsamplers.0.conv."),
    (r"^mid_res1\.", "mid_block.resnets.0."),
    (r"^mid_res2\.", "mid_block.resnets.1."),
    (r"^mid_attn\.", "mid_block.attentions.0."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"\.t_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.(norm[123]|attn[12]|ff)\.", r"\1.transformer_blocks.0.\2."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.fc1\.", ".ff.net.0.proj."),
    (r"\.ff\.fc2\.", ".ff.net.2."),
]


def diffusers_name(name: str) -> str:
    for pattern, repl in _NAME_RULES:
        name = re.sub(pattern, repl, name)
    return name


def diffusers_twin(cfg: UNetConfig):
    """diffusers UNet2DConditionModel with our architecture (needs mid_attention=True: diffusers has no
    ResBlock-only mid block with cross-attention elsewhere)."""
    from diffusers import UNet2DConditionModel

    assert cfg.mid_attention, "the diffusers twin always has a cross-attention mid block"
    levels = range(len(cfg.channel_mult))
    return UNet2DConditionModel(
        sample_size=cfg.crop_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D"
                               for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D"
                             for i in reversed(levels)),
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.norm_groups,
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.num_heads,  # diffusers' UNet2DConditionModel reads this as the number of heads
        use_linear_projection=True, dropout=cfg.dropout,
    )


def copy_weights_to_diffusers(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Copy every parameter of our UNet into the twin; every twin parameter must be covered exactly once."""
    target = dict(theirs.named_parameters())
    mapped = {diffusers_name(name): p for name, p in ours.named_parameters()}
    if set(mapped) != set(target):
        raise ValueError(f"name mismatch: ours-only {sorted(set(mapped) - set(target))[:5]}, "
                         f"diffusers-only {sorted(set(target) - set(mapped))[:5]}")
    with torch.no_grad():
        for name, p in mapped.items():
            target[name].copy_(p)


def matmul_gflops(device: torch.device, n: int = 1024, iters: int = 20) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_flops(model, call) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call(model).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_train(model, call, device) -> float:
    """Seconds for one fwd + bwd of a squared-output loss."""
    sync(device)
    start = time.perf_counter()
    call(model).pow(2).mean().backward()
    sync(device)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


@torch.no_grad()
def time_sampling(model, call, device, steps: int) -> float:
    """Seconds for `steps` forward passes (the network cost of a DDIM loop with that many steps)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        call(model)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--crop_size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4, help="context length L (1 generic + 3 attributes)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (forward passes) per timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds; the fastest is kept")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = UNetConfig(crop_size=args.crop_size)
    ours = UNet(cfg)
    with torch.no_grad():  # make the zero-initialised layers non-zero, or the output comparison is trivial
        for p in ours.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    theirs = diffusers_twin(cfg)
    copy_weights_to_diffusers(ours, theirs)
    ours, theirs = ours.to(device), theirs.to(device)

    x = torch.randn(args.batch, cfg.in_channels, cfg.crop_size, cfg.crop_size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    context = torch.randn(args.batch, args.tokens, cfg.context_dim, device=device)
    calls = {"ours": lambda m: m(x, t, context), "diffusers": lambda m: m(x, t, context).sample}
    models = {"ours": ours, "diffusers": theirs}
    with torch.no_grad():
        reference = calls["diffusers"](theirs)
        max_diff = (calls["ours"](ours) - reference).abs().max().item() / reference.abs().max().item()

    flops = {name: train_flops(models[name], calls[name]) for name in models}
    train_s, sample_s = {n: [] for n in models}, {n: [] for n in models}
    for _ in tqdm(range(args.repeats), desc="timing rounds"):  # interleaved: other load hits both alike
        for name in models:
            time_train(models[name], calls[name], device)  # warm-up / allocator reuse
            train_s[name].append(time_train(models[name], calls[name], device))
            sample_s[name].append(time_sampling(models[name], calls[name], device, args.steps))

    results = {"device": str(device), "threads": args.threads, "batch": args.batch, "crop_size": cfg.crop_size,
               "steps": args.steps, "config": cfg.to_dict(), "max_rel_output_diff": max_diff,
               "matmul_gflops": matmul_gflops(device), "models": {}}
    for name in models:
        step = min(train_s[name])
        results["models"][name] = {
            "params": count_parameters(models[name]), "train_gflop": flops[name] / 1e9,
            "train_step_s": step, "train_gflops": flops[name] / 1e9 / step,
            "sample_crops_per_s": args.batch / min(sample_s[name])}
    ours_r, theirs_r = results["models"]["ours"], results["models"]["diffusers"]
    results["ratio_train_gflops"] = ours_r["train_gflops"] / theirs_r["train_gflops"]
    results["ratio_sample_crops_per_s"] = ours_r["sample_crops_per_s"] / theirs_r["sample_crops_per_s"]

    print(f"device {device}, {args.threads} threads, batch {args.batch}, {cfg.crop_size}² crops, "
          f"matmul {results['matmul_gflops']:.1f} GFLOP/s, max |ours − diffusers| / max |diffusers| = {max_diff:.1e}")
    print(f"{'model':<10} {'params':>9} {'GFLOP/step':>11} {'step s':>8} {'GFLOP/s':>8} {'crops/s':>9}")
    for name, r in results["models"].items():
        print(f"{name:<10} {r['params']:>9} {r['train_gflop']:>11.2f} {r['train_step_s']:>8.3f} "
              f"{r['train_gflops']:>8.1f} {r['sample_crops_per_s']:>9.1f}")
    print(f"ratio ours/diffusers: train GFLOP/s {results['ratio_train_gflops']:.3f}, "
          f"sampling crops/s {results['ratio_sample_crops_per_s']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
