"""The EMA a checkpoint holds and a resume loads back (no Ray)."""

from __future__ import annotations

import torch

from unclip.training.engine.ema import Ema


def test_ema_follows_then_averages():
    model = torch.nn.Linear(2, 1)
    ema = Ema(model, decay=0.5, update_after=1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 1)  # before update_after: a copy
    assert torch.all(ema.shadow["weight"] == 1.0)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, 2)
    assert torch.allclose(ema.shadow["weight"], torch.full_like(model.weight, 2.0))
    # What a checkpoint holds and a resume loads back: host copies, not views of the average.
    saved = ema.state_dict()
    ema.update(model, 3)
    assert torch.allclose(saved["weight"], torch.full_like(model.weight, 2.0))
    ema.load_state_dict(saved)
    assert torch.equal(ema.shadow["weight"], saved["weight"])


def test_ema_averages_trainable_weights_in_fp32_whatever_their_dtype():
    model = torch.nn.Linear(2, 1).to(torch.bfloat16)
    model.bias.requires_grad_(False)  # frozen: nothing to average
    ema = Ema(model, decay=0.75, update_after=0)
    assert list(ema.shadow) == ["weight"] and ema.shadow["weight"].dtype == torch.float32
    start = model.weight.detach().float().clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 1)
    torch.testing.assert_close(ema.shadow["weight"], 0.75 * start + 0.25)
    saved = ema.state_dict()
    assert saved["weight"].dtype == torch.float32 and saved["weight"].device.type == "cpu"


def test_ema_copies_the_weights_until_update_after():
    model = torch.nn.Linear(2, 1)
    ema = Ema(model, decay=0.5, update_after=3)
    for step, value in ((1, 1.0), (2, 3.0), (3, 5.0)):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model, step)
        assert torch.all(ema.shadow["weight"] == value)
    with torch.no_grad():
        model.weight.fill_(7.0)
    ema.update(model, 4)
    assert torch.all(ema.shadow["weight"] == 6.0)
