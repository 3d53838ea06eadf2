"""Tests for nodule_diffusion.schedulers: diffusers parity (oracle), analytic identities, reproducibility.

Parity tests give diffusers our float64 ᾱ table and float64 inputs, so the step formulas are compared at ~1e-10;
the float32 tables are compared with diffusers' own separately.
"""

import math

import numpy as np
import pytest
import torch

from conftest import oracle
from nodule_diffusion.schedulers import (DDIMScheduler, DDPMScheduler, SchedulerConfig, make_betas,
                                         sample_loop)

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
DIFFUSERS_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
SHAPE = (2, 1, 4, 4)  # (B, C, H, W)


def _diffusers():
    return oracle("diffusers", reason="diffusers is the parity oracle")


def _reference(cls_name, T, schedule, prediction, spacing, beta_start=1e-4, beta_end=0.02):
    """diffusers scheduler with our float64 ᾱ table (no clipping), so only the step formulas are compared."""
    cls = getattr(_diffusers(), cls_name)
    ref = cls(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end,
              beta_schedule=DIFFUSERS_SCHEDULE[schedule], prediction_type=prediction, timestep_spacing=spacing,
              clip_sample=False)
    betas64 = torch.from_numpy(make_betas(schedule, T, beta_start, beta_end))
    ref.alphas_cumprod = torch.cumprod(1.0 - betas64, 0)  # (T,) float64
    return ref


def _random_pair(seed):
    g = torch.Generator().manual_seed(seed)
    xt = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    model_output = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return xt, model_output


# ---- tables -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("T", [1000, 50])
def test_tables_match_diffusers(schedule, T):
    ours = DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule)
    ref = _diffusers().DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_SCHEDULE[schedule])
    assert ours.betas.dtype == ours.alphas.dtype == ours.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(ours.betas, ref.betas, rtol=1e-6, atol=1e-9)
    # 1 − β in float32 (diffusers) vs float64 then cast (ours): equal up to float32 spacing near 1.
    torch.testing.assert_close(ours.alphas, ref.alphas, rtol=1e-6, atol=1e-7)
    # diffusers takes the cumulative product in float32; ours is float64 then cast, hence the looser tolerance.
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=2e-5, atol=1e-7)


def test_cosine_schedule_properties():
    betas = make_betas("cosine", 1000)
    assert betas.max() <= 0.999 and betas.min() > 0
    assert betas[-1] == pytest.approx(0.999)  # the clip of [IDDPM §3.2] is active at the end
    # [IDDPM Eq. 17] without the clip: ᾱ_t = f(t+1)/f(0), f(u) = cos²((u/T + s)/(1 + s)·π/2).
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = np.cumprod(1 - betas)
    for t in (0, 100, 500, 900):
        assert alpha_bar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-12)


def test_scaled_linear_is_squared_linspace_of_sqrt():
    betas = make_betas("scaled_linear", 10, 0.00085, 0.012)
    assert np.allclose(np.sqrt(betas), np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 10), atol=1e-15)


def test_bad_config_raises():
    for kwargs in ({"beta_schedule": "sigmoid"}, {"prediction_type": "score"}, {"timestep_spacing": "karras"}):
        with pytest.raises(ValueError):
            DDIMScheduler(**kwargs)
    with pytest.raises(ValueError):
        DDIMScheduler().set_timesteps(1001)


# ---- forward process and parameterisations -----------------------------------------------------------------------
@pytest.mark.parametrize("t_value", [0, 300, 999])
def test_q_sample_moments(t_value):
    sched = DDPMScheduler()
    alpha_bar = float(sched.alphas_cumprod[t_value])
    N = 200_000
    x0 = torch.tensor([0.5, -0.8]).reshape(1, 1, 1, 2).expand(N, 1, 1, 2)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t_value))
    xt = sched.add_noise(x0, noise, torch.full((N,), t_value, dtype=torch.int64))
    mean, var = xt.double().mean(0).flatten(), xt.double().var(0).flatten()
    std_err_mean = math.sqrt((1 - alpha_bar) / N)
    assert torch.allclose(mean, math.sqrt(alpha_bar) * torch.tensor([0.5, -0.8], dtype=torch.float64),
                          atol=5 * std_err_mean)
    assert torch.allclose(var, torch.full((2,), 1 - alpha_bar, dtype=torch.float64),
                          rtol=5 * math.sqrt(2 / N), atol=1e-9)


def test_add_noise_and_velocity_match_diffusers():
    ours = DDPMScheduler(beta_schedule="cosine")
    ref = _diffusers().DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_parameterisation_round_trips(prediction):
    sched = DDIMScheduler(prediction_type=prediction)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(5, 1, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(5, 1, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 800, 999])
    xt = sched.add_noise(x0, eps, t)
    target = sched.training_target(x0, eps, t)
    torch.testing.assert_close(sched.predict_x0(target, xt, t), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(sched.predict_eps(target, xt, t), eps, rtol=0, atol=1e-9)
    # v ↔ (x0, eps): [VPRED §4] x0 = √ᾱ·xt − √(1−ᾱ)·v and eps = √ᾱ·v + √(1−ᾱ)·xt.
    v = sched.get_velocity(x0, eps, t)
    a = torch.cumprod(1 - torch.from_numpy(make_betas("linear", 1000)), 0)[t].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(a.sqrt() * v + (1 - a).sqrt() * xt, eps, rtol=0, atol=1e-9)


# ---- timesteps ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T", [1000, 50, 7])
def test_set_timesteps_matches_diffusers_and_is_well_formed(spacing, T):
    ours = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ref = _diffusers().DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    for n in range(1, T + 1):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        ts = ours.timesteps
        assert ts.dtype == torch.int64 and ts.shape == (n,)
        assert (ts[:-1] > ts[1:]).all() and ts.min() >= 0 and ts.max() <= T - 1
        if len(ref.timesteps) == n:
            assert torch.equal(ts, ref.timesteps), (n, ts, ref.timesteps)
        else:  # diffusers' float-length quirk (trailing only): one extra entry −1, documented DEVIATION
            assert spacing == "trailing" and ref.timesteps[-1] == -1 and torch.equal(ts, ref.timesteps[:n])
        # explicit pairs: consecutive entries, the last one to −1 (ᾱ = 1)
        assert [ours.prev_timestep(t) for t in ts.tolist()] == ts.tolist()[1:] + [-1]


def test_step_outside_chain_raises():
    sched = DDIMScheduler()
    sched.set_timesteps(10)
    xt, out = _random_pair(0)
    with pytest.raises(ValueError):
        sched.step(out, 5, xt)


# ---- steps vs diffusers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddpm_step_matches_diffusers(schedule, prediction, spacing):
    T = 200
    ours = DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule, prediction_type=prediction,
                         timestep_spacing=spacing)
    ref = _reference("DDPMScheduler", T, schedule, prediction, spacing)
    for n in (T, 10, 7):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        steps = ours.timesteps.tolist()
        for k, t in enumerate(steps if n < T else steps[:3] + steps[-3:]):
            xt, out = _random_pair(k)
            got = ours.step(out, t, xt, generator=torch.Generator().manual_seed(k))
            want = ref.step(out, t, xt, generator=torch.Generator().manual_seed(k)).prev_sample
            # 1e-8: at the last step diffusers adds √(1e-20)·noise through its variance clamp
            torch.testing.assert_close(got, want, rtol=0, atol=1e-8)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers_leading(schedule, prediction, eta):
    T = 200
    ours = DDIMScheduler(num_train_timesteps=T, beta_schedule=schedule, prediction_type=prediction)
    ref = _reference("DDIMScheduler", T, schedule, prediction, "leading")
    for n in (T, 10, 7):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        steps = ours.timesteps.tolist()
        for k, t in enumerate(steps if n < T else steps[:3] + steps[-3:]):
            xt, out = _random_pair(k)
            noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64)
            got = ours.step(out, t, xt, eta=eta, noise=noise)
            want = ref.step(out, t, xt, eta=eta, variance_noise=noise).prev_sample
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_step_trailing_linspace_vs_diffusers(spacing, prediction):
    """diffusers' DDIM steps t → t − T//m; for each of our pairs (t, t_prev) pick m with T//m = t − t_prev (or
    m = 1 for the last step, t − T < 0 → ᾱ = 1) so that diffusers takes the same pair, then compare."""
    T, n, eta = 1000, 30, 0.7
    ours = DDIMScheduler(num_train_timesteps=T, prediction_type=prediction, timestep_spacing=spacing)
    ref = _reference("DDIMScheduler", T, "linear", prediction, spacing)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    pairs = [(t, ours.prev_timestep(t)) for t in ours.timesteps.tolist()]
    # The documented DEVIATION is real here: diffusers' own t − T//n is not our chain for some pair.
    assert any(t_prev >= 0 and t - T // n != t_prev for t, t_prev in pairs)
    compared = 0
    for k, (t, t_prev) in enumerate(pairs):
        m = 1 if t_prev < 0 else next((m for m in range(1, T + 1) if T // m == t - t_prev), None)
        if m is None:
            continue
        ref.num_inference_steps = m
        xt, out = _random_pair(k)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        want = ref.step(out, t, xt, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours.step(out, t, xt, eta=eta, noise=noise), want, rtol=0, atol=1e-10)
        compared += 1
    assert compared == len(pairs)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sample_loop_full_ddim_chain_matches_diffusers(eta):
    """The loop that synthesis samples with (sample_loop) against diffusers' DDIM run step by step over the same
    chain (leading spacing, where diffusers' t − T//n equals our pairs), same fresh noise at every step."""
    T, n = 1000, 12
    ours = DDIMScheduler(num_train_timesteps=T)
    ref = _reference("DDIMScheduler", T, "linear", "epsilon", "leading")
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    model_fn = lambda xt, t, k: 0.3 * xt + 1e-4 * t.reshape(-1, 1, 1, 1).to(xt.dtype)  # noqa: E731
    xT = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noises = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = xT
    for k, t in enumerate(ref.timesteps):
        out = model_fn(want, t.expand(SHAPE[0]), k)
        want = ref.step(out, t, want, eta=eta, variance_noise=noises[k]).prev_sample
    got = sample_loop(model_fn, ours, xT, eta=eta, noises=noises)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


# ---- analytic identities ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_eta1_full_chain_is_ddpm_posterior(prediction):
    T = 1000
    ddim = DDIMScheduler(num_train_timesteps=T, prediction_type=prediction)
    ddpm = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction)
    betas = torch.from_numpy(make_betas("linear", T))
    alpha_bar = torch.cumprod(1 - betas, 0)
    zeros = torch.zeros(SHAPE, dtype=torch.float64)
    for k, t in enumerate([999, 600, 31, 1]):
        xt, out = _random_pair(k)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        torch.testing.assert_close(ddim.step(out, t, xt, eta=1.0, noise=z), ddpm.step(out, t, xt, noise=z),
                                   rtol=0, atol=1e-10)
        # variance: the noise enters with σ_t² = β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t  [DDPM Eq. 7]
        beta_tilde = float((1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]) * betas[t])
        noisy_part = ddim.step(out, t, xt, eta=1.0, noise=z) - ddim.step(out, t, xt, eta=1.0, noise=zeros)
        torch.testing.assert_close(noisy_part, math.sqrt(beta_tilde) * z, rtol=0, atol=1e-10)
        if prediction == "epsilon":
            # mean: [DDPM Eq. 11] μ = (xt − β_t/√(1−ᾱ_t)·eps_pred)/√α_t
            mean = (xt - float(betas[t] / (1 - alpha_bar[t]).sqrt()) * out) / math.sqrt(1 - float(betas[t]))
            torch.testing.assert_close(ddpm.step(out, t, xt, noise=zeros), mean, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_last_step_lands_on_alpha_bar_one(cls, spacing):
    sched = cls(timestep_spacing=spacing, prediction_type="v_prediction")
    sched.set_timesteps(13)
    t_last = int(sched.timesteps[-1])
    assert sched.prev_timestep(t_last) == -1 and sched.alpha_bar(-1) == 1.0
    xt, out = _random_pair(3)
    # ᾱ_prev = 1: the step returns x0_pred exactly and draws no noise
    torch.testing.assert_close(sched.step(out, t_last, xt, generator=None), sched.predict_x0(out, xt, t_last),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_oracle_denoiser_recovers_x0(cls, prediction):
    """A model that knows x0 outputs the exact target, so every chain ends on x0 [DDIM Eq. 12, DDPM Eq. 7]."""
    sched = cls(prediction_type=prediction, timestep_spacing="trailing")
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1

    alpha_bar = torch.cumprod(1 - torch.from_numpy(make_betas("linear", 1000)), 0)  # (T,) float64

    def knows_x0(xt, t_batch, step_index):
        a = alpha_bar[t_batch].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        eps = (xt - a.sqrt() * x0) / (1 - a).sqrt()  # [DDPM Eq. 4] solved for eps
        return sched.training_target(x0, eps, t_batch)

    xT = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    got = sample_loop(knows_x0, sched, xT, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, x0, rtol=0, atol=1e-5)


# ---- reproducibility, noise handling, options ---------------------------------------------------------------------
@pytest.mark.parametrize("cls,eta", [(DDIMScheduler, 0.5), (DDPMScheduler, 0.0)])
def test_seeded_loop_reproduces_and_is_batch_independent(cls, eta):
    sched = cls(num_train_timesteps=100)
    sched.set_timesteps(10)
    model_fn = lambda xt, t, k: 0.1 * xt + 1e-3 * t.reshape(-1, 1, 1, 1)  # noqa: E731
    xT = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(seed, x=xT):
        return sample_loop(model_fn, sched, x, eta=eta, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
    # one generator per sample: a sample's result does not depend on the batch it is in
    per_sample = sample_loop(model_fn, sched, xT, eta=eta,
                             generator=[torch.Generator().manual_seed(10 + i) for i in range(3)])
    alone = sample_loop(model_fn, sched, xT[1:2], eta=eta, generator=[torch.Generator().manual_seed(11)])
    torch.testing.assert_close(per_sample[1:2], alone, rtol=0, atol=1e-6)


def test_given_noises_equal_manual_steps_and_eta0_ignores_generator():
    sched = DDIMScheduler(num_train_timesteps=100)
    sched.set_timesteps(5)
    model_fn = lambda xt, t, k: 0.2 * xt  # noqa: E731
    xT = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    noises = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1))  # (n, B, C, H, W)
    xt = xT
    for i, t in enumerate(sched.timesteps):
        xt = sched.step(model_fn(xt, t.expand(SHAPE[0]), i), t, xt, eta=0.3, noise=noises[i])
    torch.testing.assert_close(sample_loop(model_fn, sched, xT, eta=0.3, noises=noises), xt, rtol=0, atol=0)
    # η = 0 is deterministic: no noise is drawn, the generator is irrelevant
    a = sample_loop(model_fn, sched, xT, generator=torch.Generator().manual_seed(0))
    b = sample_loop(model_fn, sched, xT, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        sample_loop(model_fn, DDPMScheduler(num_train_timesteps=100), xT, eta=0.5)


def test_dtype_preserved_and_clip_only_when_asked():
    xt = torch.full(SHAPE, 3.0)
    out = torch.full(SHAPE, 2.5, dtype=torch.float64)  # "sample" prediction far outside [-1, 1]
    for clip in (False, True):
        sched = DDIMScheduler(prediction_type="sample", clip_sample=clip)
        sched.set_timesteps(4)
        x_prev = sched.step(out, sched.timesteps[-1], xt)
        assert x_prev.dtype == torch.float32
        assert torch.allclose(x_prev, torch.full(SHAPE, 1.0 if clip else 2.5))
    assert SchedulerConfig().clip_sample is False
