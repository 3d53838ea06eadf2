"""Behaviour pins for the glue between the method's steps: what each callee *receives* (spy models) and
hand-computed results on fake models, so that a wrong formula or a wrong conditioning row fails a test.

Each test names the single-line bug it guards against (design notes §4 "Tests pin behaviour, not just shapes"):
    CFG guidance        ε̃ = ε(∅) + g·(ε(y) − ε(∅)), not ε(y) + g·(ε(y) − ε(∅))
    stage conditioning  base: every attribute null; LoRA: only its own attribute; compose: teacher k sees only
                        attribute k, the student every composed attribute
    insertion context   the model sees x0·(1 − nodule_region(M)), the same region as in training
    per-output noise    seeded by (seed, index) without collisions: (s, 1) ≠ (s + 1, 0)
    bootstrap           the default interval is 95 %, not 90 %
    detector clipping   x clipped to W and y to H (only non-square images show a swap)
    training timesteps  t ~ U{0, …, T−1}: t = 0 and t = T − 1 are both drawn
    warm-up             lr at step k is lr·min(1, (k + 1)/warmup)
    data                `--data phantom` is generated once per (seed, n) and read back; FORMAT:PATH delegates
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import oracle, tiny_loop

from nodule_diffusion import compose, datasets, diffusion, lora, metrics, synthesis, training
from nodule_diffusion.data import DEFAULT_VOCAB, REGION_REACH, NoduleCrops, nodule_region, read_image
from nodule_diffusion.detector import _clip_and_filter
from nodule_diffusion.schedulers import DDPMScheduler
from nodule_diffusion.diffusion import DiffusionConfig, denoising_loss
from nodule_diffusion.training import LoopConfig, fit, lr_at

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------- CFG guidance
class CodeModel:
    """A fake diffusion model whose output encodes the attribute row it was called with:
    ε = 7 + Σ_k (attrs_k + 1)·10^k everywhere, so ε(∅) = 7 and every conditioning row gives its own number."""

    vocab = DEFAULT_VOCAB

    def __init__(self):
        self.calls = []

    def __call__(self, xt, t, mask, context, attrs):
        self.calls.append(attrs.clone())
        code = 7.0 + ((attrs + 1).float() * torch.tensor([1.0, 10.0, 100.0])).sum(1)  # (B,)
        return torch.zeros_like(xt) + code.view(-1, 1, 1, 1)


def _eps_value(guidance, compositional, attributes):
    model = CodeModel()
    eps = compose.guided_eps(model, attributes, guidance, compositional)
    xt = torch.zeros(2, 1, 4, 4)
    out = eps(xt, torch.zeros(2, dtype=torch.long), 0, torch.zeros_like(xt), torch.zeros_like(xt))
    assert torch.all(out == out.flatten()[0])
    return float(out.flatten()[0])


def test_cfg_joint_guidance_formula():
    """[CFG Eq. 6] ε̃ = ε(∅) + g·(ε(y) − ε(∅)): ε(∅) = 7, ε(texture=solid, margin=spiculated) = 7 + 1 + 30."""
    null, cond = 7.0, 7.0 + 1 + 30
    got = _eps_value(3.0, False, {"texture": "solid", "margin": "spiculated"})
    assert got == pytest.approx(null + 3.0 * (cond - null))


def test_cfg_compositional_guidance_formula():
    """[Liu et al. 2022 Eq. 12] ε̃ = ε(∅) + Σ_k g·(ε(y_k) − ε(∅)), one term per attribute alone."""
    null, texture, margin = 7.0, 7.0 + 1, 7.0 + 30
    got = _eps_value(2.0, True, {"texture": "solid", "margin": "spiculated"})
    assert got == pytest.approx(null + 2.0 * ((texture - null) + (margin - null)))


def test_without_guidance_the_model_sees_the_requested_row_only():
    model = CodeModel()
    eps = compose.guided_eps(model, {"margin": "ill_defined"}, None, False)
    xt = torch.zeros(3, 1, 4, 4)
    eps(xt, torch.zeros(3, dtype=torch.long), 0, xt, xt)
    assert len(model.calls) == 1 and model.calls[0].tolist() == [[-1, 1, -1]] * 3


# ----------------------------------------------------------------------------------------------- stage conditioning
class Spy:
    """Wraps a DiffusionModel's forward and records (t, attrs, grad enabled) of every call."""

    def __init__(self, model):
        self.calls, self._forward = [], model.forward
        model.forward = self

    def __call__(self, xt, t, mask, context, attrs):
        self.calls.append((t.detach().cpu().clone(), attrs.detach().cpu().clone(), torch.is_grad_enabled()))
        return self._forward(xt, t, mask, context, attrs)


def _short_chain(model, steps=4):
    """Let the stage draw from T = `steps` timesteps so that every t is drawn in a few calls."""
    model.diffusion = DiffusionConfig(num_train_timesteps=steps, beta_schedule="linear")


def test_base_stage_conditions_on_the_generic_token_only(tiny_base, disk_crops):
    model, _ = diffusion.load_model(tiny_base, CPU)
    spy = Spy(model)
    training.train_base(model, disk_crops, tiny_loop(2), CPU, torch.Generator().manual_seed(0))
    assert spy.calls and all(bool((attrs == -1).all()) for _, attrs, _ in spy.calls)


def test_cfg_stage_sees_true_labels_or_null(tiny_base, disk_crops):
    model, _ = diffusion.load_model(tiny_base, CPU)
    spy = Spy(model)
    training.train_base(model, disk_crops, tiny_loop(6), CPU, torch.Generator().manual_seed(0), cfg_dropout=0.5)
    rows = torch.cat([attrs for _, attrs, _ in spy.calls])
    labels = set(map(tuple, disk_crops.attrs.tolist()))
    assert (rows >= 0).any() and (rows == -1).any()
    # every non-null entry is a real label of some crop in that column
    for k in range(rows.shape[1]):
        values = set(disk_crops.attrs[:, k].tolist())
        assert set(rows[:, k][rows[:, k] >= 0].tolist()) <= values
    assert labels  # sanity


def test_lora_stage_conditions_only_on_its_own_attribute(tiny_base, disk_crops):
    """A LoRA for texture=part_solid sees texture = part_solid and every other attribute null, on crops that
    carry the value (the disk crops also have margin labels: they must not leak into the conditioning)."""
    model, _ = diffusion.load_model(tiny_base, CPU)
    spy = Spy(model)
    training.train_lora(model, disk_crops, "texture", "part_solid", 2, 2.0, tiny_loop(3), CPU,
                      torch.Generator().manual_seed(0))
    assert len(spy.calls) == 3
    for _, attrs, _ in spy.calls:
        assert attrs[:, 0].tolist() == [1] * len(attrs)  # texture = part_solid (index 1)
        assert bool((attrs[:, 1:] == -1).all())  # margin and calcification null


def test_compose_stage_teacher_sees_one_attribute_student_sees_all(tiny_base, disk_crops):
    """[OURS Eq. 2] L_preserve distils adapter k alone with its own token (teacher, no grad) into the composed
    model conditioned on every composed attribute (student)."""
    model, payload = diffusion.load_model(tiny_base, CPU)
    names = ["texture=solid", "margin=well_defined"]
    for name in names:
        lora.inject_lora(model.unet, diffusion.LORA_TARGETS, name, 2, 2.0)
    spy = Spy(model)
    training.train_compose(model, disk_crops, names, "ortho", tiny_loop(2, ema_decay=0.0), CPU,
                         torch.Generator().manual_seed(0), 1.0, 0.1, 0.0)
    teachers = [attrs for _, attrs, grad in spy.calls if not grad]
    students = [attrs for _, attrs, grad in spy.calls if grad]
    assert len(teachers) == len(students) == 4  # 2 steps × 2 adapters
    for k, attrs in enumerate(teachers):
        expected = [0, -1, -1] if k % 2 == 0 else [-1, 0, -1]  # solid alone, then smooth alone
        assert attrs.tolist() == [expected] * len(attrs)
    for attrs in students:
        assert attrs.tolist() == [[0, 0, -1]] * len(attrs)


@pytest.mark.parametrize("stage", ["base", "lora", "compose"])
def test_every_stage_draws_t_from_0_to_T_minus_1(tiny_base, disk_crops, stage):
    """t ~ U{0, …, T−1} [DDPM Alg. 1 l.3] in every training objective: with T = 4 all four values occur."""
    model, _ = diffusion.load_model(tiny_base, CPU)
    _short_chain(model)
    gen = torch.Generator().manual_seed(0)
    if stage == "compose":
        for name in ("texture=solid", "margin=well_defined"):
            lora.inject_lora(model.unet, diffusion.LORA_TARGETS, name, 2, 2.0)
    spy = Spy(model)
    loop = tiny_loop(12, batch_size=4, ema_decay=0.0)
    if stage == "base":
        training.train_base(model, disk_crops, loop, CPU, gen)
    elif stage == "lora":
        training.train_lora(model, disk_crops, "texture", "solid", 2, 2.0, loop, CPU, gen)
    else:
        training.train_compose(model, disk_crops, ["texture=solid", "margin=well_defined"], "ortho", loop, CPU, gen,
                             1.0, 0.0, 0.0)
    drawn = set(torch.cat([t for t, _, _ in spy.calls]).tolist())
    assert drawn == {0, 1, 2, 3}


def test_denoising_loss_draws_t_from_0_to_T_minus_1(disk_crops):
    scheduler = DDPMScheduler(num_train_timesteps=3)
    seen = []

    def model(xt, t, mask, context, attrs):
        seen.extend(t.tolist())
        return torch.zeros_like(xt)

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = disk_crops.get(torch.arange(4), gen)
        denoising_loss(model, scheduler, batch, 5.0, gen)
    assert set(seen) == {0, 1, 2}


# ----------------------------------------------------------------------------------------------- warm-up
def test_warmup_learning_rate_is_linear_from_lr_over_warmup():
    """lr_k = lr·min(1, (k + 1)/w) with w = min(warmup, steps/5): the first step already moves (k = 0 → lr/w)."""
    cfg = LoopConfig(steps=100, lr=1.0, warmup=4)
    assert [lr_at(k, cfg) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    short = LoopConfig(steps=10, lr=1.0, warmup=100)  # w = steps // 5 = 2
    assert [lr_at(k, short) for k in range(3)] == [0.5, 1.0, 1.0]


def test_fit_applies_the_warmup_learning_rate_at_every_step():
    """With a constant gradient AdamW's k-th update is −lr_k·m̂/(√v̂ + ε) = −lr_k: Δp = −lr/4, −lr/2, −3lr/4, −lr."""
    holder = torch.nn.Module()
    holder.p = torch.nn.Parameter(torch.zeros(()))
    values = []

    def loss_fn(step):
        values.append(holder.p.item())
        return holder.p * 1.0, {}  # ∂L/∂p = 1

    cfg = LoopConfig(steps=40, lr=0.1, warmup=4, ema_decay=0.0, grad_clip=0.0, bf16=False)
    fit(holder, [holder.p], loss_fn, cfg, CPU, torch.Generator())
    deltas = np.diff(values[:6])
    assert deltas == pytest.approx([-0.025, -0.05, -0.075, -0.1, -0.1], rel=1e-3)


# ----------------------------------------------------------------------------------------------- insertion context
def test_insertion_hides_the_nodule_region_like_training():
    """The model sees x0·(1 − nodule_region(M)) with the same reach as the training crops, and the original crop."""
    seen = {}

    def spy(masks, contexts, requests, originals):
        seen.update(mask=masks.clone(), context=contexts.clone(), original=originals.clone())
        return originals

    image = np.random.default_rng(0).uniform(0.2, 0.6, (64, 64)).astype(np.float32)
    synthesis.insert_nodules(image, [synthesis.Request(32, 30, diameter_px=6)], spy, crop_size=16)
    region = nodule_region(seen["mask"]) > 0.5
    assert bool((region & (seen["mask"] < 0.5)).any())  # the ring region − M exists
    assert torch.all(seen["context"][region] == 0)
    assert torch.equal(seen["context"][~region], seen["original"][~region])
    # the same reach as the training crops (data.NoduleCrops) use
    training = inspect.signature(NoduleCrops.__init__).parameters["reach"].default
    insertion = inspect.signature(synthesis.insert_nodules).parameters["reach"].default
    assert training == insertion == REGION_REACH


def test_insertion_never_lowers_density():
    """A nodule adds attenuation: whatever the generator returns, no pixel of the image gets darker."""
    def dark(masks, contexts, requests, originals):
        return originals - 0.5 * masks + 0.3 * torch.randn(originals.shape, generator=torch.Generator().manual_seed(0))

    image = np.random.default_rng(1).uniform(0.2, 0.6, (64, 64)).astype(np.float32)
    for scale in (1.0, 0.5):
        out, _ = synthesis.insert_nodules(image, [synthesis.Request(30, 34, diameter_px=8 / scale)], dark,
                                          crop_size=16, scale=scale)
        assert (out >= image).all() and (out > image).any()


# ----------------------------------------------------------------------------------------------- per-output noise
def test_output_noise_is_seeded_by_seed_and_index_without_collisions():
    """(seed, index) pairs that a `seed + index` rule would map together get different noise."""
    first = {(s, i): torch.randn(4, generator=synthesis.output_generator(s, i)) for s in range(6) for i in range(6)}
    keys = list(first)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            assert not torch.equal(first[keys[a]], first[keys[b]]), (keys[a], keys[b])
    again = torch.randn(4, generator=synthesis.output_generator(3, 2))
    assert torch.equal(again, first[(3, 2)])


def test_generate_crops_gives_seed_s_index_1_other_noise_than_seed_s_plus_1_index_0():
    from nodule_diffusion.schedulers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(3)
    masks = torch.zeros(2, 1, 8, 8)
    out = synthesis.generate_crops(lambda xt, t, k: 0.5 * xt, scheduler, masks, masks, [5, 6], [1, 0])
    assert (out[0] - out[1]).abs().max() > 0.1


# ----------------------------------------------------------------------------------------------- bootstrap level
@pytest.mark.parametrize("paired", [False, True])
def test_bootstrap_default_interval_is_95_percent(paired):
    """For the mean of n normal values the percentile-bootstrap CI is ≈ mean ± z·σ/√n with z = 1.96 at 95 %
    (1.645 at 90 %): the half-width over the standard error must be near 1.96."""
    data = np.random.default_rng(0).normal(size=400)
    se = data.std() / np.sqrt(len(data))
    mean_of = lambda idx: float(data[idx].mean())  # noqa: E731
    if paired:
        ci = metrics.paired_bootstrap_diff(mean_of, lambda idx: 0.0, len(data), n_boot=4000)
    else:
        ci = metrics.bootstrap_ci(mean_of, len(data), n_boot=4000)
    z = (ci["high"] - ci["low"]) / 2 / se
    assert 1.85 < z < 2.07, z


# ----------------------------------------------------------------------------------------------- detector clipping
def test_boxes_are_clipped_to_width_in_x_and_height_in_y():
    """image_size = (H, W) = (20, 40): x ∈ [0, 40], y ∈ [0, 20] (a swap would clip x to 20 and y to 40)."""
    boxes = torch.tensor([[-5.0, -5.0, 50.0, 50.0], [30.0, 2.0, 45.0, 30.0]])
    clipped, scores = _clip_and_filter(boxes, torch.tensor([0.9, 0.8]), (20, 40), 1.0)
    assert clipped.tolist() == [[0.0, 0.0, 40.0, 20.0], [30.0, 2.0, 40.0, 20.0]]
    assert scores.tolist() == pytest.approx([0.9, 0.8])


# ----------------------------------------------------------------------------------------------- data specs
def test_phantom_records_are_generated_once_per_seed_and_size(tmp_path):
    first = datasets.load_records("phantom", tmp_path, 3, 5, DEFAULT_VOCAB)
    csv_path = tmp_path / "phantom_seed5_n3" / "annotations.csv"
    assert len(first) == 3 and csv_path.is_file()
    stamp = csv_path.stat().st_mtime_ns
    again = datasets.load_records("phantom", tmp_path, 3, 5, DEFAULT_VOCAB)
    assert csv_path.stat().st_mtime_ns == stamp  # read back, not regenerated
    assert [r.image for r in again] == [r.image for r in first]
    other = datasets.load_records("phantom", tmp_path, 3, 6, DEFAULT_VOCAB)
    assert not np.array_equal(read_image(other[0].image), read_image(first[0].image))  # the seed matters


def test_format_path_specs_are_read_by_the_dataset_loaders(disk_csv, tmp_path):
    records = datasets.load_records(f"csv:{disk_csv}", tmp_path, 999, 0, DEFAULT_VOCAB)
    assert len(records) == 8 and not list(tmp_path.iterdir())  # nothing generated

# ----------------------------------------------------------------------------------------------- oracles under CI
def test_a_missing_oracle_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI: oracle"):
        oracle("no_such_oracle_module", "a test of the helper")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        oracle("no_such_oracle_module", "a test of the helper")


# ----------------------------------------------------------------------------------------------- users
@pytest.mark.parametrize("script", ["train", "sample", "eval_detect"])
def test_every_flag_of_every_script_has_a_help_line(script, capsys):
    """`--help` explains each flag (from the dataclass field comments), not only its default."""
    import dataclasses
    import importlib

    from nodule_diffusion.common import field_comments

    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.main(["detect", "--help"] if script == "eval_detect" else ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    assert "Examples:" in text
    expected = {"train": "--lora_rank LORA_RANK LoRA rank r of every adapter",
                "sample": "--eta ETA DDIM η (1 = DDPM-like, the default",
                "eval_detect": "--low_data LOW_DATA keep only this many real training images"}[script]
    assert expected in text  # the field comment is the flag's help line
    configs = {"train": module.CONFIGS if script == "train" else (),
               "sample": (getattr(module, "SampleConfig", None),),
               "eval_detect": (getattr(module, "EvalConfig", None),)}[script]
    for cls in filter(None, configs):
        missing = [f.name for f in dataclasses.fields(cls) if f.type != "dict" and f.name not in field_comments(cls)]
        assert not missing, (cls.__name__, missing)


def test_progress_bars_do_not_flood_a_file():
    """On a non-terminal stream the bars update at most once a minute: a 0.6 s loop writes only its first and
    last state (a terminal bar would redraw every 0.1 s)."""
    import io
    import time

    from tqdm import tqdm

    from nodule_diffusion.common import progress_options

    stream = io.StringIO()
    for _ in tqdm(range(30), file=stream, **progress_options(stream)):
        time.sleep(0.02)
    assert stream.getvalue().count("\r") <= 2, stream.getvalue()
    assert progress_options(type("Tty", (), {"isatty": lambda self: True})()) == {}


def test_density_check_counts_nodules_darker_than_their_ring(tmp_path):
    """evaluation.density_check: mean inside the mask vs the ring 1–3 px outside, per inserted nodule."""
    from nodule_diffusion.common import save_image_png
    from nodule_diffusion.data import ImageRecord, Nodule
    from nodule_diffusion.evaluation import density_check
    yy, xx = np.mgrid[0:48, 0:48]
    records = []
    for k, level in enumerate((0.8, 0.1)):  # a bright nodule, then a dark "hole" on a 0.4 background
        mask = (xx - 24) ** 2 + (yy - 24) ** 2 <= 25
        image = np.where(mask, level, 0.4).astype(np.float32)
        save_image_png(tmp_path / f"i{k}.png", image)
        save_image_png(tmp_path / f"m{k}.png", mask.astype(np.uint8) * 255)
        records.append(ImageRecord(image=tmp_path / f"i{k}.png", nodules=[Nodule(
            box=(19.0, 19.0, 30.0, 30.0), attributes={}, mask=tmp_path / f"m{k}.png", extra={"synthetic": "1"})]))
    result = density_check(records)
    assert result["n_inserted"] == 2 and result["n_darker_than_ring"] == 1
    assert result["min_inside_minus_ring"] == pytest.approx(0.1 - 0.4, abs=2e-4)


def test_inserted_nodule_is_never_less_dense_than_its_ring():
    """A faint nodule on a background darker inside than around: the written nodule is lifted to its ring's mean."""
    from nodule_diffusion.data import dilate
    yy, xx = np.mgrid[0:64, 0:64]
    hole = ((xx - 32) ** 2 + (yy - 32) ** 2 <= 36)
    image = np.where(hole, 0.2, 0.5).astype(np.float32)  # the background is darker where the nodule goes

    def faint(masks, contexts, requests, originals):
        return originals + 0.05 * masks  # adds a little density: not enough to reach the ring's level

    out, (mask,) = synthesis.insert_nodules(image, [synthesis.Request(32, 32, diameter_px=12)], faint, crop_size=32)
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    ring = ((dilate(m, 3) - dilate(m, 1))[0, 0] > 0.5).numpy()
    assert out[mask].mean() >= out[ring].mean() - 1e-6
    assert (out >= image).all()
