"""Shared diffusion glue: training pairs, conditioning dropout, guidance, the sampling loop."""

from __future__ import annotations

import pytest
import torch

from unclip.training.diffusion import (
    check_sampling_args,
    diffusion_mse,
    drop_condition,
    guided,
    noised,
    regression_target,
    sample_loop,
    snr_weights,
    train_scheduler,
)


def test_noised_follows_the_forward_process():
    sched = train_scheduler(100, "epsilon", clip_sample=True)
    assert sched.config.beta_schedule == "squaredcos_cap_v2"
    torch.manual_seed(0)
    x0 = torch.randn(64, 4)
    x_t, noise, t = noised(sched, x0)
    a = sched.alphas_cumprod[t].view(-1, 1)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-5)
    assert t.min() >= 0 and t.max() < 100


def test_drop_condition_zeroes_whole_rows_at_the_given_rate():
    torch.manual_seed(0)
    cond = torch.ones(4000, 3)
    dropped = drop_condition(cond, 0.25)
    zero_rows = (dropped == 0).all(dim=1)
    assert ((dropped == 0) == zero_rows[:, None]).all()
    assert 0.2 < zero_rows.float().mean() < 0.3
    assert drop_condition(cond, 0.0) is cond


def test_guidance_mixes_conditional_and_null_predictions():
    calls = []

    def model_fn(x, t, c):
        calls.append(x.shape[0])
        return c.sum(dim=1, keepdim=True).expand_as(x) + 1.0

    x, t, c = torch.zeros(2, 3), torch.tensor([5, 5]), torch.ones(2, 3)
    assert torch.allclose(guided(model_fn, x, t, c, 1.0), torch.full((2, 3), 4.0))
    assert calls == [2]
    # null: 1, cond: 4 → 1 + 3 · (4 − 1) = 10
    assert torch.allclose(guided(model_fn, x, t, c, 3.0), torch.full((2, 3), 10.0))
    assert calls == [2, 4]


def test_sample_loop_is_seeded_and_checks_its_arguments():
    sched = train_scheduler(50, "sample", clip_sample=False)

    def model_fn(x, t, c):  # predicts x_0 = c
        return c

    cond = torch.full((3, 4), 0.5)
    a = sample_loop(model_fn, (3, 4), cond, dict(sched.config), 10, 1.0, seed=1)
    b = sample_loop(model_fn, (3, 4), cond, dict(sched.config), 10, 1.0, seed=1)
    assert torch.equal(a, b) and torch.allclose(a, cond, atol=1e-3)
    c = sample_loop(model_fn, (3, 4), cond, dict(sched.config), 10, 1.0, seed=1, sampler="ddpm")
    assert c.shape == (3, 4)
    for bad in (
        {"steps": 0},
        {"guidance_scale": 0.0},
        {"guidance_scale": -1.0},
        {"sampler": "euler"},
    ):
        args = {"steps": 5, "guidance_scale": 1.0, "sampler": "ddim", **bad}
        with pytest.raises(ValueError):
            check_sampling_args(**args)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_an_exact_model_samples_its_data_point(sampler, prediction):
    """With the exact ε (or x_0) of a one-point data set, the loop must land on that point."""
    sched = train_scheduler(1000, prediction, clip_sample=False)
    alphas = sched.alphas_cumprod
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1

    def model_fn(x, t, c):
        if prediction == "sample":
            return x0
        a = alphas[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    out = sample_loop(model_fn, x0.shape, torch.zeros(2, 8), dict(sched.config), 8, 1.0, 0, sampler)
    assert torch.allclose(out, x0, atol=1e-4)


def test_regression_targets_and_min_snr_weights_follow_the_papers():
    torch.manual_seed(0)
    x0, noise = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    t = torch.tensor([0, 10, 50, 90, 99])
    a = train_scheduler(100, "epsilon", clip_sample=False).alphas_cumprod[t]
    snr = a / (1 - a)
    want = {
        "epsilon": (noise, torch.minimum(snr, torch.tensor(5.0)) / snr),
        "sample": (x0, torch.minimum(snr, torch.tensor(5.0))),
        "v_prediction": (
            a.sqrt().view(-1, 1, 1, 1) * noise - (1 - a).sqrt().view(-1, 1, 1, 1) * x0,
            torch.minimum(snr, torch.tensor(5.0)) / (snr + 1),
        ),
    }
    for kind, (target, weight) in want.items():
        sched = train_scheduler(100, kind, clip_sample=False)
        assert torch.allclose(regression_target(sched, x0, noise, t), target, atol=1e-6)
        assert torch.allclose(snr_weights(sched, t, 5.0), weight, rtol=1e-5)
        assert torch.equal(snr_weights(sched, t, None), torch.ones(5))
        # the weighted loss is the weighted mean of the per-sample MSEs; exact targets cost 0
        pred = torch.zeros_like(x0)
        per = target.pow(2).flatten(1).mean(1)
        assert torch.isclose(diffusion_mse(sched, pred, x0, noise, t, 5.0), (per * weight).mean())
        assert diffusion_mse(sched, target, x0, noise, t, 5.0) == 0
    # the clamp: nearly clean steps (huge SNR) weigh γ in x_0 terms, noisy ones their SNR
    w = snr_weights(train_scheduler(100, "sample", clip_sample=False), t, 5.0)
    assert w[0] == 5.0 and w[-1] < 1e-2
