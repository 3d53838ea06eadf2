"""bf16 autocast against fp32 for one UNet training step, on this machine (issue 10: "measure, don't assume").

Prints the fp32 / bf16 step-time ratio (> 1 means bf16 is faster), what `common.autocast` chooses here, and
the largest difference between the fp32 and bf16 outputs of the same weights (bf16 has an 8-bit mantissa).
Interleaved rounds, fastest kept (timeit's rule on a shared machine).

Examples:
    python benchmarks/bench_bf16.py
    python benchmarks/bench_bf16.py --threads 1 --batch 16 --out bf16.json
    python benchmarks/bench_bf16.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodule_diffusion.common import cpu_has_fast_bf16  # noqa: E402
from nodule_diffusion.unet import UNet, UNetConfig  # noqa: E402


def step_time(model, x, t, ctx, bf16: bool, device: torch.device, iters: int) -> float:
    """Seconds per forward + backward at batch x (fastest of `iters` single steps after one warm-up)."""
    best = float("inf")
    for i in range(iters + 1):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, t, ctx).float().pow(2).mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("Examples:")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="crops per step")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved fp32 / bf16 rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = UNetConfig()
    torch.manual_seed(0)
    model = UNet(cfg).to(device)
    x = torch.randn(args.batch, cfg.in_channels, cfg.crop_size, cfg.crop_size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    ctx = torch.randn(args.batch, 4, cfg.context_dim, device=device)
    times = {"fp32": float("inf"), "bf16": float("inf")}
    for _ in range(args.rounds):
        for name in times:
            times[name] = min(times[name], step_time(model, x, t, ctx, name == "bf16", device, args.iters))
    with torch.no_grad():
        for p in model.parameters():   # the zero-initialised output conv would make both outputs 0
            p.add_(0.02 * torch.randn_like(p))
        ref = model(x, t, ctx)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = model(x, t, ctx).float()
    result = {"machine": platform.processor() or platform.machine(), "device": args.device, "threads": args.threads,
              "batch": args.batch, "fp32_s": times["fp32"], "bf16_s": times["bf16"],
              "speedup_bf16": times["fp32"] / times["bf16"],
              "autocast_chooses_bf16": device.type == "cuda" or cpu_has_fast_bf16(),
              "max_abs_diff": float((ref - low).abs().max()), "ref_std": float(ref.std())}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
