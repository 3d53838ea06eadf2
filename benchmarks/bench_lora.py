"""Benchmark: the cost of LoRA on the project's UNet, as ratios measured in one run.

1. inference with one adapter merged into the weights vs the plain base UNet        (target ratio ≤ 1.03)
2. inference with two adapters active and unmerged (extra thin matmuls) vs the base  (target ratio ≤ 1.15)
3. one LoRA training step (base frozen, only A/B train) vs one full fine-tuning step: time and peak memory

Timings are medians over `--repeats` rounds in which all variants run interleaved (the order rotating each
round), so a load change on a shared machine hits every variant alike; minima are kept in the JSON too. Peak
memory on CPU is the peak "Total Allocated" of the torch profiler's memory events during the first optimiser
step (activations + gradients + optimiser state; the weights, allocated before, are not counted); on CUDA it is
torch.cuda.max_memory_allocated above the weights.

Examples
    python benchmarks/bench_lora.py
    python benchmarks/bench_lora.py --batch 8 --repeats 30 --threads 2 --out bench_lora.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop chatter off stderr
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodule_diffusion import lora  # noqa: E402
from nodule_diffusion.unet import UNet, UNetConfig  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out")  # every attention projection, self and cross


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--crop", type=int, default=32, help="crop size in pixels (UNetConfig.crop_size)")
    p.add_argument("--base_channels", type=int, default=32)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r (alpha = r)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def with_adapters(base: UNet, names: list[str], rank: int, seed: int) -> UNet:
    """A copy of `base` with adapters `names` on every attention projection, B random (else ΔW = 0)."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        lora.inject_lora(model, TARGETS, name, r=rank, alpha=rank)
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                B = layer.lora_B[name]
                B.copy_(0.05 * torch.randn(B.shape, generator=generator).to(B.device))
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict, repeats: int, warmup: int, device) -> dict[str, float]:
    """Median (and, as "<key>_min", minimum) seconds per call of each fn; every round runs each fn once."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times, keys = {k: [] for k in fns}, list(fns)
    for round_index in range(repeats):
        shift = round_index % len(keys)  # rotate the order, so no variant always runs first
        for key in keys[shift:] + keys[:shift]:
            fn = fns[key]
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()} | {f"{k}_min": min(v) for k, v in times.items()}


def peak_step_memory(step, device) -> int:
    """Peak bytes allocated during one call of `step` beyond what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]  # one per allocation / free
    if not memory:
        return 0
    baseline = memory[0]["Total Allocated"] - memory[0]["Bytes"]  # the running total includes its own event
    return max(m["Total Allocated"] for m in memory) - baseline


def make_step(model: UNet, params: list, batch: dict):
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = torch.nn.functional.mse_loss(model(batch["x"], batch["t"], batch["context"]), batch["noise"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cfg = UNetConfig(crop_size=args.crop, base_channels=args.base_channels)
    base = UNet(cfg)
    for module in base.modules():  # the UNet zero-initialises output layers [IDDPM]; random ones make the
        for zeroed in ("conv_out", "proj_out"):  # merged-vs-unmerged check below see the adapters
            if hasattr(module, zeroed):
                torch.nn.init.normal_(getattr(module, zeroed).weight, std=0.02)
    base = base.to(device).eval()
    generator = torch.Generator().manual_seed(args.seed)
    batch = {"x": torch.randn(args.batch, cfg.in_channels, args.crop, args.crop, generator=generator),
             "t": torch.randint(0, 1000, (args.batch,), generator=generator),
             "context": torch.randn(args.batch, 4, cfg.context_dim, generator=generator),
             "noise": torch.randn(args.batch, cfg.out_channels, args.crop, args.crop, generator=generator)}
    batch = {k: v.to(device) for k, v in batch.items()}

    merged = with_adapters(base, ["a"], args.rank, args.seed)
    with torch.no_grad():
        unmerged_out = merged(batch["x"], batch["t"], batch["context"])
    lora.merge(merged)
    two = with_adapters(base, ["a", "b"], args.rank, args.seed + 1)

    def infer(model):
        return lambda: model(batch["x"], batch["t"], batch["context"])
    with torch.no_grad():
        merge_error = (infer(merged)() - unmerged_out).abs().max().item()
        adapter_effect = (infer(base)() - unmerged_out).abs().max().item()  # the check is only as good as this
        inference = interleaved_medians({"base": infer(base), "merged": infer(merged), "two_unmerged": infer(two)},
                                        args.repeats, args.warmup, device)

    full = copy.deepcopy(base).train()
    tuned = with_adapters(base, ["a"], args.rank, args.seed).train()
    for p in tuned.parameters():
        p.requires_grad_(False)
    for layer in lora.lora_layers(tuned).values():
        for p in (*layer.lora_A.values(), *layer.lora_B.values()):
            p.requires_grad_(True)
    lora_params = [p for p in tuned.parameters() if p.requires_grad]
    full_step, lora_step = make_step(full, list(full.parameters()), batch), make_step(tuned, lora_params, batch)
    memory = {"full": peak_step_memory(full_step, device), "lora": peak_step_memory(lora_step, device)}
    training = interleaved_medians({"full": full_step, "lora": lora_step}, max(args.repeats // 2, 3), 1, device)
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__, "n_lora_layers": len(lora.lora_layers(tuned)),
        "params": {"full": sum(p.numel() for p in full.parameters()), "lora": sum(p.numel() for p in lora_params)},
        "merge_max_abs_error": merge_error, "adapter_effect_max_abs": adapter_effect,
        "inference_s": inference, "train_step_s": training, "train_peak_bytes": memory,
        "ratios": {"merged_vs_base": inference["merged"] / inference["base"],
                   "two_unmerged_vs_base": inference["two_unmerged"] / inference["base"],
                   "lora_vs_full_step_time": training["lora"] / training["full"],
                   "lora_vs_full_peak_memory": memory["lora"] / memory["full"],
                   "merged_vs_base_min": inference["merged_min"] / inference["base_min"],
                   "two_unmerged_vs_base_min": inference["two_unmerged_min"] / inference["base_min"]},
    }


def print_table(result: dict) -> None:
    inf, train, mem, ratio = (result[k] for k in ("inference_s", "train_step_s", "train_peak_bytes", "ratios"))
    rows = [("inference: 1 adapter merged vs base", inf["base"] * 1e3, inf["merged"] * 1e3, "ms",
             ratio["merged_vs_base"], "<= 1.03"),
            ("inference: 2 adapters unmerged vs base", inf["base"] * 1e3, inf["two_unmerged"] * 1e3, "ms",
             ratio["two_unmerged_vs_base"], "<= 1.15"),
            ("train step time: LoRA vs full", train["full"] * 1e3, train["lora"] * 1e3, "ms",
             ratio["lora_vs_full_step_time"], "< 1"),
            ("train step peak memory: LoRA vs full", mem["full"] / 2**20, mem["lora"] / 2**20, "MiB",
             ratio["lora_vs_full_peak_memory"], "< 1")]
    print(f"{'measurement':42s} {'reference':>12s} {'value':>12s} {'ratio':>7s}  target")
    for name, ref, val, unit, r, target in rows:
        print(f"{name:42s} {ref:9.2f} {unit:>3s} {val:8.2f} {unit:>3s} {r:7.3f}  {target}")
    print(f"trainable parameters: LoRA {result['params']['lora']:,} vs full {result['params']['full']:,} "
          f"({result['n_lora_layers']} adapted layers)")
    print(f"merged vs unmerged output: max |diff| {result['merge_max_abs_error']:.2e} "
          f"(adapter effect on the output: max {result['adapter_effect_max_abs']:.2e})")


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
