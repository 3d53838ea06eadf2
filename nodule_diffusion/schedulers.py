"""Noise schedules, forward noising and the DDPM / DDIM reverse steps.

Implements
    - β schedules: "linear" [DDPM §4], "scaled_linear" (linspace of √β, squared; the [LDM] convention) and
      "cosine" [IDDPM Eq. 17] with β ≤ 0.999 [IDDPM §3.2]; computed in float64, held as float32 tensors.
    - forward noising q(xt | x0) [DDPM Eq. 4] (`add_noise`), the three model parameterisations
      (ε, x0 and v [VPRED §4]) and conversions between them.
    - inference timesteps for the "leading", "trailing" and "linspace" spacings [ZSNR Table 2], with explicit
      (t, t_prev) pairs taken from consecutive entries of `.timesteps`; the last pair goes to ᾱ = 1 (t_prev = −1).
    - `DDPMScheduler.step`: ancestral step from the posterior q(x_{t−1} | xt, x0) [DDPM Eq. 6, 7, Alg. 2].
    - `DDIMScheduler.step`: the generalised step [DDIM Eq. 12, 16], deterministic at η = 0.
    - `sample_loop`: the reverse chain over `.timesteps` for a model given as a callable.

Papers
    [DDPM]  Ho, Jain, Abbeel 2020, arXiv:2006.11239
    [DDIM]  Song, Meng, Ermon 2020, arXiv:2010.02502
    [IDDPM] Nichol, Dhariwal 2021, arXiv:2102.09672
    [VPRED] Salimans, Ho 2022 (progressive distillation), arXiv:2202.00512
    [LDM]   Rombach et al. 2022, arXiv:2112.10752
    [ZSNR]  Lin et al. 2024 (common diffusion noise schedules are flawed), arXiv:2305.08891

Notation (used in every name and comment below)
    T          number of training timesteps; t ∈ {0, …, T−1} indexes the tables (t = 0 is the least noisy)
    x0         clean image, (B, C, H, W) in [-1, 1]
    xt         noisy image at timestep t: xt = √ᾱ_t·x0 + √(1−ᾱ_t)·eps
    eps        standard normal noise, same shape as x0
    eps_pred   the noise implied by the model output
    x0_pred    the clean image implied by the model output
    v          velocity √ᾱ_t·eps − √(1−ᾱ_t)·x0 [VPRED §4]
    beta       β_t, per-step noise variance;  alpha = α_t = 1 − β_t
    alpha_bar  ᾱ_t = ∏_{s ≤ t} α_s;  ᾱ_{−1} := 1 (the clean image)
    t_prev     the next (smaller) timestep of the inference chain, −1 at the last step
    sigma_t    standard deviation of the fresh noise added by one reverse step
    eta        η ∈ [0, 1], DDIM stochasticity: 0 = deterministic DDIM, 1 = DDPM posterior variance

Shapes: B batch, C channels, H, W height and width. Timesteps are int64.

Deviations
    - DEVIATION: DDIM takes t_prev from the next entry of `.timesteps`, not diffusers' `t − T//n` (see
      `set_timesteps`); the two agree for "leading" spacing and differ for "trailing"/"linspace" whenever the
      spacing is not exactly T//n.
    - DEVIATION: "trailing" keeps the first n entries of diffusers' formula; a float-length quirk there can emit
      n+1 entries ending at t = −1 (e.g. T = 1000, n = 61).
    - Fresh noise is drawn only when it is used (σ_t > 0), i.e. never at the last step (t_prev = −1); in the
      full T-step DDPM chain this is exactly "when t > 0" [DDPM Alg. 2 l.3].
    - No clipping of x0_pred unless `clip_sample=True` (diffusers clips by default).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class SchedulerConfig:
    """Everything a scheduler is built from; store `dataclasses.asdict(config)` in checkpoints."""
    num_train_timesteps: int = 1000  # T [DDPM §4]
    beta_start: float = 1e-4         # β_0 [DDPM §4]; unused by "cosine"
    beta_end: float = 0.02           # β_{T−1} [DDPM §4]; unused by "cosine"
    beta_schedule: str = "linear"    # one of BETA_SCHEDULES
    prediction_type: str = "epsilon"  # what the network outputs: one of PREDICTION_TYPES
    timestep_spacing: str = "leading"  # how set_timesteps(n) picks n of the T timesteps
    clip_sample: bool = False        # clamp x0_pred to [-1, 1] inside step()

    def __post_init__(self):
        for name, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                              ("timestep_spacing", TIMESTEP_SPACINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps} must be >= 1")


def make_betas(schedule, num_train_timesteps, beta_start=1e-4, beta_end=0.02):
    """β_t for t = 0..T−1 as a float64 numpy array of shape (T,), each in (0, 0.999]."""
    T = num_train_timesteps
    if schedule == "linear":
        # [DDPM §4] β rises linearly from 1e-4 to 0.02 over T = 1000 steps.
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if schedule == "scaled_linear":
        # [LDM] convention: linear in √β, then squared (smaller β early on than "linear").
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    if schedule == "cosine":
        # [IDDPM Eq. 17] ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2), s = 0.008;
        # β_t = 1 − ᾱ(t+1)/ᾱ(t) (f(0) cancels), clipped to 0.999 to avoid the singularity at t = T [IDDPM §3.2].
        s = 0.008
        f = np.cos((np.arange(T + 1, dtype=np.float64) / T + s) / (1 + s) * math.pi / 2) ** 2  # (T+1,)
        return np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    raise ValueError(f"beta_schedule={schedule!r}; expected one of {BETA_SCHEDULES}")


def _fresh_noise(like, generator):
    """Standard normal noise shaped like `like`, drawn on the CPU (device-independent) and moved to its device.

    `generator` may be one torch.Generator, a list of B generators (one per sample, so that a sample's noise does
    not depend on the batch it is in), or None (global RNG).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}")
        noise = torch.cat([torch.randn((1, *like.shape[1:]), generator=g, dtype=like.dtype) for g in generator])
    else:
        noise = torch.randn(like.shape, generator=generator, dtype=like.dtype)
    return noise.to(like.device)


class NoiseSchedule:
    """β/ᾱ tables, forward noising, parameterisation conversions and the inference timestep chain.

    Shared by DDPMScheduler and DDIMScheduler, which add only `step`. Tables live on the CPU; the coefficients
    are moved to the data's device and dtype when used.
    """

    def __init__(self, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                 prediction_type="epsilon", timestep_spacing="leading", clip_sample=False):
        self.config = SchedulerConfig(num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type,
                                      timestep_spacing, clip_sample)
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)  # (T,) float64
        # float64 copy used for all coefficient arithmetic; the float32 tables are the public view.
        self._alpha_bar64 = torch.from_numpy(np.cumprod(1.0 - betas))        # (T,) ᾱ_t
        self._sqrt_alpha_bar64 = self._alpha_bar64.sqrt()                    # (T,) √ᾱ_t
        self._sqrt_one_minus_alpha_bar64 = (1.0 - self._alpha_bar64).sqrt()  # (T,) √(1−ᾱ_t)
        self.betas = torch.from_numpy(betas).float()                         # (T,) float32 β_t
        self.alphas = torch.from_numpy(1.0 - betas).float()                  # (T,) float32 α_t
        self.alphas_cumprod = self._alpha_bar64.float()                      # (T,) float32 ᾱ_t
        self.set_timesteps(num_train_timesteps)  # default chain: every training step, T−1 … 0

    # ---- tables -------------------------------------------------------------------------------------------------
    def alpha_bar(self, t):
        """ᾱ_t as a Python float (float64); t = −1 gives ᾱ = 1, the clean image."""
        return 1.0 if t < 0 else float(self._alpha_bar64[t])

    def _coefs(self, t, like):
        """(√ᾱ_t, √(1−ᾱ_t)), looked up in float64 then cast to like's dtype/device, each shaped (B, 1, 1, 1)
        for a (B,) tensor t, or (1, 1, 1, 1) for an int / 0-d t, so that they broadcast over like (B, C, H, W)."""
        t = torch.as_tensor(t).reshape(-1).long().cpu()  # (B,) or (1,)
        if t.min() < 0 or t.max() >= self.num_train_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.tolist()}")
        shape = (-1, *([1] * (like.dim() - 1)))
        sqrt_ab = self._sqrt_alpha_bar64[t].reshape(shape)                 # (B, 1, 1, 1)
        sqrt_1m_ab = self._sqrt_one_minus_alpha_bar64[t].reshape(shape)    # (B, 1, 1, 1)
        return sqrt_ab.to(like.device, like.dtype), sqrt_1m_ab.to(like.device, like.dtype)

    # ---- forward process and parameterisations --------------------------------------------------------------------
    def add_noise(self, x0, noise, t):
        """q_sample: xt = √ᾱ_t·x0 + √(1−ᾱ_t)·eps  [DDPM Eq. 4].

        x0, noise: (B, C, H, W) float; t: (B,) int64 in [0, T−1]. Returns xt, same shape and dtype as x0.
        """
        assert x0.shape == noise.shape, (x0.shape, noise.shape)
        assert t.dim() == 1 and t.shape[0] == x0.shape[0], f"t must be (B,), got {tuple(t.shape)}"
        sqrt_ab, sqrt_1m_ab = self._coefs(t, x0)
        return sqrt_ab * x0 + sqrt_1m_ab * noise

    def get_velocity(self, x0, noise, t):
        """v = √ᾱ_t·eps − √(1−ᾱ_t)·x0  [VPRED §4]. Shapes as in `add_noise`."""
        sqrt_ab, sqrt_1m_ab = self._coefs(t, x0)
        return sqrt_ab * noise - sqrt_1m_ab * x0

    def training_target(self, x0, noise, t):
        """What the network must output for `prediction_type`: eps, v, or x0 itself. Shapes as in `add_noise`."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.get_velocity(x0, noise, t)
        return x0

    def predict_x0(self, model_output, xt, t):
        """x0_pred from the network output; t an int, a 0-d tensor or a (B,) tensor. Returns xt's shape/dtype."""
        sqrt_ab, sqrt_1m_ab = self._coefs(t, xt)
        model_output = model_output.to(xt.dtype)
        if self.prediction_type == "epsilon":
            return (xt - sqrt_1m_ab * model_output) / sqrt_ab  # [DDPM Eq. 15] x0_pred = (xt − √(1−ᾱ)·eps_pred)/√ᾱ
        if self.prediction_type == "v_prediction":
            return sqrt_ab * xt - sqrt_1m_ab * model_output    # [VPRED §4] x0_pred = √ᾱ·xt − √(1−ᾱ)·v
        return model_output

    def predict_eps(self, model_output, xt, t):
        """eps_pred from the network output; t as in `predict_x0`. Returns xt's shape/dtype."""
        sqrt_ab, sqrt_1m_ab = self._coefs(t, xt)
        model_output = model_output.to(xt.dtype)
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            return sqrt_ab * model_output + sqrt_1m_ab * xt    # [VPRED §4] eps_pred = √ᾱ·v + √(1−ᾱ)·xt
        return (xt - sqrt_ab * model_output) / sqrt_1m_ab     # [DDPM Eq. 4] solved for eps

    # ---- inference chain ------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps):
        """Choose n of the T training timesteps; sets `.timesteps` (n,) int64, strictly descending, in [0, T−1].

        Spacings follow diffusers (steps_offset = 0), as named in [ZSNR Table 2]:
            leading   t_i = i·(T//n)                       → {0, T//n, …}, never reaches T−1
            trailing  t_i = round(T − i·T/n) − 1           → {T−1, …}, never reaches 0 unless n = T
            linspace  round(linspace(0, T−1, n))           → both ends
        """
        T, n = self.num_train_timesteps, int(num_inference_steps)
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps={n} must lie in [1, {T}]")
        spacing = self.config.timestep_spacing
        if spacing == "leading":
            timesteps = (np.arange(n) * (T // n))[::-1]
        elif spacing == "trailing":
            # DEVIATION: diffusers uses np.arange(T, 0, −T/n) whose float length can be n+1 (last entry −1);
            # we keep its first n values, which equal diffusers' wherever diffusers is well-formed.
            timesteps = np.round(np.arange(T, 0, -T / n))[:n] - 1
        else:
            timesteps = np.linspace(0, T - 1, n).round()[::-1]
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64).copy())  # (n,) int64
        # Explicit (t, t_prev) pairs from consecutive entries; the last step goes to ᾱ = 1 (t_prev = −1).
        # DEVIATION: diffusers' DDIM uses t_prev = t − T//n instead, which for "trailing"/"linspace" is not the
        # next timestep of the chain (and can be skipped or repeated); the pairs below are the chain itself.
        ts = self.timesteps.tolist()
        self._prev = dict(zip(ts, ts[1:] + [-1]))
        self.num_inference_steps = n

    def prev_timestep(self, t):
        """t_prev paired with t in the current chain (−1 at the last step); t an int or 0-d tensor."""
        t = int(t)
        if t not in self._prev:
            raise ValueError(f"timestep {t} is not in the current chain; call set_timesteps() and step along "
                             f".timesteps (first {self.timesteps[:3].tolist()} …)")
        return self._prev[t]

    def _x0_and_eps(self, model_output, t, xt):
        """Step helper: x0_pred (optionally clipped) and eps_pred, both in xt's dtype."""
        x0_pred = self.predict_x0(model_output, xt, t)
        eps_pred = self.predict_eps(model_output, xt, t)
        if self.config.clip_sample:
            # Clip x0_pred only; eps_pred stays the model's (as diffusers does without use_clipped_model_output).
            x0_pred = x0_pred.clamp(-1.0, 1.0)
        return x0_pred, eps_pred


class DDPMScheduler(NoiseSchedule):
    """Ancestral sampling from the Gaussian posterior [DDPM Alg. 2], over the current `.timesteps` chain."""

    def step(self, model_output, t, xt, noise=None, generator=None):
        """One reverse step xt → x_{t_prev} ~ q(x_{t_prev} | xt, x0 = x0_pred)  [DDPM Eq. 6, 7].

        model_output, xt: (B, C, H, W); t: int or 0-d tensor in `.timesteps`; noise: optional (B, C, H, W) standard
        normal, used when t_prev ≥ 0; else drawn from `generator` (one, a list of B, or None) on the CPU.
        Returns x_{t_prev} in xt's dtype.
        """
        # 1. The pair (t, t_prev) and its cumulative products.
        t = int(t)
        t_prev = self.prev_timestep(t)
        alpha_bar_t, alpha_bar_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        # With n < T steps the chain jumps t → t_prev, so the one-step β_t is replaced by the effective
        # β = 1 − ᾱ_t/ᾱ_prev (= β_t when t_prev = t − 1); α = 1 − β.
        alpha = alpha_bar_t / alpha_bar_prev
        beta = 1.0 - alpha
        # 2. x0_pred from the model output [DDPM Eq. 15]; clipping only if configured.
        x0_pred, _ = self._x0_and_eps(model_output, t, xt)
        # 3. Posterior mean [DDPM Eq. 7]: μ̃ = √ᾱ_prev·β/(1−ᾱ_t)·x0 + √α·(1−ᾱ_prev)/(1−ᾱ_t)·xt.
        coef_x0 = math.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar_t)
        coef_xt = math.sqrt(alpha) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
        mean = coef_x0 * x0_pred + coef_xt * xt
        # 4. Posterior variance [DDPM Eq. 7]: β̃ = (1−ᾱ_prev)/(1−ᾱ_t)·β; zero at the last step (ᾱ_prev = 1).
        variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta
        if t_prev < 0:
            return mean  # [DDPM Alg. 2 l.3] z = 0 at the last step
        # 5. [DDPM Alg. 2 l.4] x_{t−1} = μ̃ + σ_t·z, σ_t = √β̃, z ~ N(0, I).
        z = noise.to(xt) if noise is not None else _fresh_noise(xt, generator)
        return mean + math.sqrt(variance) * z


class DDIMScheduler(NoiseSchedule):
    """Generalised (non-Markovian) reverse step [DDIM Eq. 12] with σ_t(η) [DDIM Eq. 16]."""

    def step(self, model_output, t, xt, eta=0.0, noise=None, generator=None):
        """One reverse step xt → x_{t_prev}  [DDIM Eq. 12].

        model_output, xt: (B, C, H, W); t: int or 0-d tensor in `.timesteps`; eta ∈ [0, 1]; noise: optional
        (B, C, H, W) standard normal, used when σ_t > 0 (η > 0 and not the last step); else drawn from `generator`
        (one, a list of B, or None) on the CPU. Returns x_{t_prev} in xt's dtype.
        """
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta} must lie in [0, 1]")
        # 1. The explicit pair (t, t_prev) from the chain (t_prev = −1 at the last step).
        t = int(t)
        t_prev = self.prev_timestep(t)
        # 2. Cumulative products; ᾱ_prev = 1 at the last step, so the chain ends on x0_pred exactly.
        alpha_bar_t, alpha_bar_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        # 3. "predicted x0" [DDIM Eq. 12]: x0_pred = (xt − √(1−ᾱ_t)·eps_pred)/√ᾱ_t (or from v / x0 output).
        x0_pred, eps_pred = self._x0_and_eps(model_output, t, xt)
        # 4. σ_t(η) = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev)  [DDIM Eq. 16].
        sigma_t = eta * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev))
        # 5. "direction pointing to xt" [DDIM Eq. 12]: √(1 − ᾱ_prev − σ_t²)·eps_pred (clamped against rounding).
        direction = math.sqrt(max(1.0 - alpha_bar_prev - sigma_t ** 2, 0.0)) * eps_pred
        # 6. x_prev = √ᾱ_prev·x0_pred + direction + σ_t·eps  [DDIM Eq. 12].
        x_prev = math.sqrt(alpha_bar_prev) * x0_pred + direction
        if sigma_t > 0.0:
            z = noise.to(xt) if noise is not None else _fresh_noise(xt, generator)
            x_prev = x_prev + sigma_t * z
        return x_prev


@torch.no_grad()
def sample_loop(model_fn, scheduler, xT, eta=0.0, generator=None, noises=None, progress=False):
    """THE reverse chain: every sampler of the package (synthesis.generate_crops) and the parity tests run this.

    Runs over `scheduler.timesteps` (call `set_timesteps(n)` first) and returns x0.
    model_fn(xt, t_batch, step_index) -> model_output, with xt (B, C, H, W), t_batch (B,) int64 holding the original
    training timestep and step_index k = 0, 1, … (sampling-time LoRA strategies switch adapters by k).
    xT: (B, C, H, W) starting noise. eta: DDIM only (must stay 0 for DDPM). noises: optional per-step fresh noise,
    a sequence (or tensor) of n (B, C, H, W) entries indexed like `.timesteps`; otherwise drawn from `generator`
    (one, a list of B for per-sample seeding, or None) only when a step uses noise. Runs under torch.no_grad().
    Returns x0 (B, C, H, W) in xT's dtype.
    1. x_T given                                                         [DDPM Alg. 2 l.1]
    2. for k, t in enumerate(timesteps): x_prev = step(model(x_t, t, k), t, x_t)   [DDPM Alg. 2 l.3–4, DDIM Eq. 12]
    """
    is_ddim = isinstance(scheduler, DDIMScheduler)
    if not is_ddim and eta != 0.0:
        raise ValueError("eta applies to DDIMScheduler only")
    if noises is not None and len(noises) != len(scheduler.timesteps):
        raise ValueError(f"got {len(noises)} noises for {len(scheduler.timesteps)} steps")
    xt = xT
    for i, t in enumerate(tqdm(scheduler.timesteps.tolist(), desc="sampling", disable=not progress)):
        t_batch = torch.full((xt.shape[0],), t, dtype=torch.int64, device=xt.device)  # (B,)
        model_output = model_fn(xt, t_batch, i)
        noise = None if noises is None else noises[i]
        if is_ddim:
            xt = scheduler.step(model_output, t, xt, eta=eta, noise=noise, generator=generator)
        else:
            xt = scheduler.step(model_output, t, xt, noise=noise, generator=generator)
    return xt
