"""Diffusion parts the prior and the decoder share: the training pair, its loss weights, the
variational bound of learned variances, conditioning dropout, classifier-free guidance and the
sampling loop.

The schedules and the update rules are diffusers' ``DDPMScheduler`` / ``DDIMScheduler``; what
is written here is only the glue diffusers leaves to each pipeline, as pure functions with the
paper's formula next to each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr

Sampler = Literal["ddim", "ddpm"]
Prediction = Literal["epsilon", "sample", "v_prediction"]
# model_fn(x_t, t, cond) -> the model's prediction (ε, x_0 or v: the scheduler's prediction_type)
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def train_scheduler(
    timesteps: int, prediction_type: Prediction, clip_sample: bool
) -> DDPMScheduler:
    """The cosine-schedule DDPM used in training (Nichol & Dhariwal 2021, eq. 17)."""
    return DDPMScheduler(
        num_train_timesteps=timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=clip_sample,
        timestep_spacing="trailing",  # sampling starts at t = T-1 (Lin et al. 2024, sec. 3.3)
    )


def noised(
    scheduler: DDPMScheduler, x0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, ε, t) for a uniformly drawn t per sample.

    1. t ~ U{0, …, T-1}, ε ~ N(0, I)
    2. x_t = √ᾱ_t · x_0 + √(1-ᾱ_t) · ε          (Ho et al. 2020, eq. 4)
    """
    t = torch.randint(
        0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device, dtype=torch.long
    )
    noise = torch.randn_like(x0)
    return scheduler.add_noise(x0, noise, t), noise, t


def regression_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the model learns to output for x_t, by the scheduler's ``prediction_type``.

    ε (Ho et al. 2020), x_0, or v = √ᾱ_t · ε − √(1-ᾱ_t) · x_0 (Salimans & Ho 2022, sec. 4).
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"unknown prediction_type {kind!r}")


def snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023, eq. 9 and table 1); ones if no γ.

    With SNR_t = ᾱ_t / (1-ᾱ_t), the x_0 loss is weighted by min(SNR_t, γ); the same weight on ε
    and v losses is min(SNR_t, γ) / SNR_t and min(SNR_t, γ) / (SNR_t + 1). The clamp stops the
    nearly noise-free steps (huge SNR) from dominating the gradient, so training spends its
    updates on the noise levels that decide an image's layout and colours.
    """
    if gamma is None:
        return torch.ones(t.shape[0], device=t.device)
    snr = compute_snr(scheduler, t)  # diffusers': (√ᾱ_t / √(1-ᾱ_t))²
    w = snr.clamp(max=float(gamma))
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return w / snr
    if kind == "v_prediction":
        return w / (snr + 1.0)
    return w


def diffusion_mse(
    scheduler: DDPMScheduler,
    pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """The mean over the batch of ‖target − pred‖² per sample, Min-SNR-γ weighted if ``snr_gamma``."""
    target = regression_target(scheduler, x0, noise, t).float()
    per_sample = (pred.float() - target).pow(2).flatten(1).mean(dim=1)
    return (per_sample * snr_weights(scheduler, t, snr_gamma)).mean()


# --- the variational bound (learned variances) -----------------------------------------------


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(μ₁, σ₁²) ‖ N(μ₂, σ₂²)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)) + 0.5 * (
        (mean1 - mean2) ** 2
    ) * torch.exp(-logvar2)


def discretized_gaussian_nll(
    x0: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    """−log p(x_0 | x_1) per element for 8-bit data in [-1, 1] (Ho et al. 2020, eq. 13), nats."""

    def cdf(v: torch.Tensor) -> torch.Tensor:  # standard normal CDF
        return 0.5 * (1.0 + torch.erf(v / math.sqrt(2.0)))

    inv_std = torch.exp(-0.5 * logvar)
    centered = x0 - mean
    upper = cdf(inv_std * (centered + 1.0 / 255))
    lower = cdf(inv_std * (centered - 1.0 / 255))
    prob = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1.0 - lower, upper - lower))
    return -torch.log(prob.clamp_min(1e-12))


def vlb_term(
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """L_t of the variational bound per sample, in bits per dimension (Nichol & Dhariwal 2021).

    1. x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t                       (ε from the model, gradient stopped)
    2. μ(x_t, x) = √ᾱ_{t−1} β_t/(1−ᾱ_t) · x + √α_t (1−ᾱ_{t−1})/(1−ᾱ_t) · x_t   (Ho et al., eq. 7)
    3. log Σ_θ = (v+1)/2 · log β_t + (1 − (v+1)/2) · log β̃_t,  β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t
       (eq. 15; log β̃_0 clipped to log β̃_1, as the paper's code)
    4. L_t = KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)) for t > 0, −log p_θ(x_0|x_1) at t = 0
    """
    ab = scheduler.alphas_cumprod.to(x0.device, torch.float32)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    betas = 1.0 - ab / ab_prev
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)  # β̃_t
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))

    def at(a: torch.Tensor) -> torch.Tensor:
        return a[t].view(-1, 1, 1, 1)

    # 1. x̂_0 from the model's ε (gradient stopped: L_vlb trains only the variance)
    x0_hat = (x_t - at((1.0 - ab).sqrt()) * eps.detach()) / at(ab.sqrt())
    # 2. the posterior mean of the true x_0 and of x̂_0
    coef_x0 = at(ab_prev.sqrt() * betas / (1.0 - ab))
    coef_xt = at((1.0 - betas).sqrt() * (1.0 - ab_prev) / (1.0 - ab))
    true_mean = coef_x0 * x0 + coef_xt * x_t
    model_mean = coef_x0 * x0_hat + coef_xt * x_t
    # 3. the model's log-variance, interpolated between log β_t and log β̃_t
    frac = (v + 1.0) / 2.0
    model_logvar = frac * at(torch.log(betas)) + (1.0 - frac) * at(post_logvar)
    # 4. KL for t > 0, the discretized decoder NLL at t = 0; nats → bits
    kl = normal_kl(true_mean, at(post_logvar), model_mean, model_logvar).mean(dim=(1, 2, 3))
    nll = discretized_gaussian_nll(x0, model_mean, model_logvar).mean(dim=(1, 2, 3))
    return torch.where(t == 0, nll, kl) / math.log(2.0)


# --- conditioning and sampling ----------------------------------------------------------------


def drop_condition(cond: torch.Tensor, prob: float) -> torch.Tensor:
    """Replace each row of ``cond`` by the null condition (zeros) with probability ``prob``.

    Training with dropped conditions gives the same network an unconditional mode, which
    classifier-free guidance needs (Ho & Salimans 2022, sec. 3.2).
    """
    if prob <= 0:
        return cond
    keep = torch.rand(cond.shape[0], device=cond.device) >= prob
    return cond * keep.view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)


def guided(
    model_fn: ModelFn,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    scale: float,
    guided_channels: int | None = None,
) -> torch.Tensor:
    """Classifier-free guidance: out = out(∅) + s · (out(c) − out(∅))  (Ho & Salimans 2022, eq. 6).

    ``scale == 1`` is the plain conditional model and costs one forward pass, not two. With
    ``guided_channels`` only the first channels (ε) are guided and the rest (a learned variance)
    come from the conditional output, as GLIDE does.
    """
    if scale == 1.0:
        return model_fn(x, t, cond)
    both = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))
    out_cond, out_null = both.chunk(2)
    out = out_null + scale * (out_cond - out_null)
    if guided_channels is not None:
        out = torch.cat([out[:, :guided_channels], out_cond[:, guided_channels:]], dim=1)
    return out


def check_sampling_args(steps: int, guidance_scale: float, sampler: str) -> None:
    """Clear errors for the sampling arguments a user types."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not guidance_scale > 0:
        raise ValueError(f"guidance scale must be > 0, got {guidance_scale}")
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")


@torch.no_grad()
def sample_loop(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    cond: torch.Tensor,
    scheduler_config: dict[str, Any],
    steps: int,
    guidance_scale: float,
    seed: int,
    sampler: Sampler = "ddim",
    guided_channels: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Draw x_0 by running the reverse process from pure noise (in ``dtype``, by default the
    condition's; an integer condition, token ids, needs it given).

    1. x_T ~ N(0, I), drawn from a CPU generator seeded by ``seed`` (same noise on any device)
    2. for each t of the ``steps`` sub-sampled timesteps: out = guided(model, x_t, t, c)
    3. x_{t-1} = DDIM (Song et al. 2021, eq. 12, η = 0) or DDPM (Ho et al. 2020, eq. 11) step
    """
    check_sampling_args(steps, guidance_scale, sampler)
    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    scheduler = cls.from_config(scheduler_config)
    device = cond.device
    scheduler.set_timesteps(int(steps), device=device)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    dtype = cond.dtype if dtype is None else dtype
    x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        t_batch = t.expand(shape[0]).to(device)
        out = guided(model_fn, x, t_batch, cond, float(guidance_scale), guided_channels)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x
