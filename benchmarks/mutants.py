"""The single-line bugs of issue 12 as mutants: apply each, run the behaviour tests, revert; CAUGHT / MISSED.

    python benchmarks/mutants.py .                       # tests/test_glue_behaviour.py + tests/test_judge_rng.py
    python benchmarks/mutants.py . tests/                # or any test selection (slower)
A mutant whose text is not found exactly once is reported SKIP (the code moved: update the table).
"""
import subprocess, sys
from pathlib import Path

MUTANTS = [
    ("CFG joint: cond + g(cond-null)", "nodule_diffusion/compose.py",
     "return null + guidance * (cond - null)", "return cond + guidance * (cond - null)"),
    ("CFG compositional: no g", "nodule_diffusion/compose.py",
     "return null + guidance * sum(parts)", "return null + sum(parts)"),
    ("LoRA stage conditions on every attribute", "nodule_diffusion/training.py",
     "attrs = only(batch[\"attrs\"], model.vocab, [attribute])", "attrs = batch[\"attrs\"]"),
    ("base stage conditions on labels", "nodule_diffusion/training.py",
     "attrs = torch.full_like(batch[\"attrs\"], -1)", "attrs = batch[\"attrs\"]"),
    ("compose teacher sees every attribute", "nodule_diffusion/compose.py",
     "attr_tensor(own, vocab, len(x0), x0.device))", "attr_tensor(attributes, vocab, len(x0), x0.device))"),
    ("insertion hides M not dilate(M)", "nodule_diffusion/synthesis.py",
     "context = x0 * torch.from_numpy(1.0 - region.astype(np.float32))[None, None]",
     "context = x0 * torch.from_numpy(1.0 - mask)[None, None]"),
    ("noise seeded with seed + index", "nodule_diffusion/synthesis.py",
     "seed * 1_000_003 + index", "seed + index"),
    ("bootstrap_ci 90 %", "nodule_diffusion/metrics.py",
     "seed: int = 0,\n                 alpha: float = 0.05", "seed: int = 0,\n                 alpha: float = 0.1"),
    ("paired bootstrap 90 %", "nodule_diffusion/metrics.py",
     "n_images: int, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05",
     "n_images: int, n_boot: int = 1000, seed: int = 0, alpha: float = 0.1"),
    ("box clip H/W swapped", "nodule_diffusion/detector.py", "    H, W = image_size\n", "    W, H = image_size\n"),
    ("training never draws t = 0", "nodule_diffusion/diffusion.py",
     "t = torch.randint(0, scheduler.num_train_timesteps", "t = torch.randint(1, scheduler.num_train_timesteps"),
    ("compose never draws t = 0", "nodule_diffusion/compose.py",
     "t = torch.randint(0, scheduler.num_train_timesteps", "t = torch.randint(1, scheduler.num_train_timesteps"),
    ("warm-up off by one (step/w)", "nodule_diffusion/training.py", "(step + 1) / warmup", "step / warmup"),
    ("warm-up off by one ((step+2)/w)", "nodule_diffusion/training.py", "(step + 1) / warmup", "(step + 2) / warmup"),
    ("judge reseeds the global RNG", "nodule_diffusion/judge.py",
     "with torch.random.fork_rng(devices=[]):", "if True:"),
    ("compose student sees only its own attribute", "nodule_diffusion/compose.py",
     "attr_tensor(attributes, vocab, len(x0), x0.device))\n        # 4.", "attr_tensor(own, vocab, len(x0), x0.device))\n        # 4."),
    ("tqdm floods a redirected log", "nodule_diffusion/common.py",
     'return {} if getattr(stream, "isatty", lambda: False)() else {"mininterval": 60.0}', "return {}"),
    ("flag help ignores field comments", "nodule_diffusion/common.py",
     'or comments.get(f.name, "")', 'or ""'),
]
root = Path(sys.argv[1])
tests = sys.argv[2:] or ["tests/test_glue_behaviour.py", "tests/test_judge_rng.py"]
for name, rel, old, new in MUTANTS:
    path = root / rel
    text = path.read_text()
    if text.count(old) != 1:
        print(f"SKIP ({text.count(old)} matches) {name}"); continue
    path.write_text(text.replace(old, new))
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                           cwd=root, capture_output=True, text=True)
    finally:
        path.write_text(text)
    print(("CAUGHT " if r.returncode else "MISSED ") + name, flush=True)
