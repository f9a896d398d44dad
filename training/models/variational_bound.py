"""The variational bound term of a diffusion model with learned variance (Nichol & Dhariwal 2021).

The decoder's ``learned_variance`` option trains Σ_θ with the hybrid loss L_simple + λ·L_vlb;
these are the pure functions of L_vlb, each step beside its equation.
"""

from __future__ import annotations

import math
from typing import Any

import torch


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
    scheduler: Any,
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
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))

    def at(a: torch.Tensor) -> torch.Tensor:
        return a[t].view(-1, 1, 1, 1)

    coef_x0 = at(ab_prev.sqrt() * betas / (1.0 - ab))
    coef_xt = at((1.0 - betas).sqrt() * (1.0 - ab_prev) / (1.0 - ab))
    true_mean = coef_x0 * x0 + coef_xt * x_t
    x0_hat = (x_t - at((1.0 - ab).sqrt()) * eps.detach()) / at(ab.sqrt())
    model_mean = coef_x0 * x0_hat + coef_xt * x_t
    frac = (v + 1.0) / 2.0
    model_logvar = frac * at(torch.log(betas)) + (1.0 - frac) * at(post_logvar)
    kl = normal_kl(true_mean, at(post_logvar), model_mean, model_logvar).mean(dim=(1, 2, 3))
    nll = discretized_gaussian_nll(x0, model_mean, model_logvar).mean(dim=(1, 2, 3))
    return torch.where(t == 0, nll, kl) / math.log(2.0)
