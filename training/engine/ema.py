"""The exponential moving average of the weights that an export may carry instead of them."""

from __future__ import annotations

import torch


class Ema:
    """Exponential moving average of the trainable weights, kept in fp32 on rank 0.

    Not diffusers' ``EMAModel``: its decay ramps up as (1 + s) / (10 + s) where this one is
    constant after ``ema_update_after`` steps (the config's meaning), it keeps the average in
    the weights' dtype (bf16 under bf16 training: updates of (1 − decay)·Δw would round away),
    and its state is an unnamed list, so the ``ema.pt`` (name → tensor) of every existing
    checkpoint would no longer load.

    ZeRO stages 0-2 keep the full weights on every rank after each step, so rank 0 alone can
    average them; ZeRO-3 is refused by :func:`~unclip.training.engine.trainer.validate_trainer_config`.
    The average lives beside the weights (on their device): a per-step copy to the host would
    sync the GPU once per parameter. :meth:`state_dict` is the host copy that checkpoints hold.
    """

    def __init__(self, module: torch.nn.Module, decay: float, update_after: int) -> None:
        self.decay, self.update_after = decay, update_after
        self.shadow = {
            n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        # ema <- decay * ema + (1 - decay) * w; before update_after it just follows w.
        weight = 1.0 if step <= self.update_after else 1.0 - self.decay
        params = dict(module.named_parameters())
        names = list(self.shadow)
        current = [params[n].detach() for n in names]
        if any(w.dtype != torch.float32 for w in current):
            current = [w.float() for w in current]
        torch._foreach_lerp_([self.shadow[n] for n in names], current, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, fp32 on the host."""
        return {n: v.detach().to("cpu", copy=True) for n, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, v in state.items():
            self.shadow[n].copy_(v)
