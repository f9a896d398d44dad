"""Small stand-ins for the resume tests, without Ray or DeepSpeed: a source known by its shard
counts, a task known by its identity, and an engine that saves and loads as DeepSpeed's does."""

from __future__ import annotations

import os
from typing import Any

import torch

from unclip.datasets.stream import ShardSource, StreamShard
from unclip.training.engine.ema import Ema


class Rows(ShardSource):
    """A source known by its shard counts alone (what plans and identities are made of)."""

    def __init__(self, n: int = 96, shard_size: int = 20) -> None:
        sizes = [min(shard_size, n - i) for i in range(0, n, shard_size)]
        self.shards = [StreamShard(f"rows/{i:05d}", c) for i, c in enumerate(sizes)]

    def read(self, shard: int, start: int, stop: int, stats: Any) -> list[Any]:
        raise AssertionError("nothing here reads samples")

    def collate(self, samples: list[Any]) -> dict[str, Any]:
        raise AssertionError("nothing here reads samples")


class Described:
    """A task as the driver's check sees it: its identity."""

    def __init__(self, **identity: Any) -> None:
        self.identity = {"model": "regression", "n": 96, **identity}

    def describe(self) -> dict[str, Any]:
        return self.identity


class TorchEngine:
    """DeepSpeed's engine as checkpoints call it: ``save_checkpoint`` / ``load_checkpoint`` of
    a module with its AdamW state and LR schedule under ``{dir}/{tag}/``; ``(None, None)`` where
    nothing was saved, as DeepSpeed answers."""

    FILE = "mp_rank_00_model_states.pt"

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.module = torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
        )
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: 1 / (1 + k))
        self.loads: list[str] = []

    def train(self, steps: int, ema: Ema | None = None, first: int = 1) -> None:
        for s in range(first, first + steps):
            x = torch.linspace(-1, 1, 24).reshape(8, 3) * s
            loss = (self.module(x) - x.sum(1, keepdim=True)).pow(2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            if ema is not None:
                ema.update(self.module, s)

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        os.makedirs(os.path.join(save_dir, tag))
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, os.path.join(save_dir, tag, self.FILE))

    def load_checkpoint(
        self,
        load_dir: str,
        tag: str,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
    ) -> tuple[str | None, Any]:
        path = os.path.join(load_dir, tag, self.FILE)
        self.loads.append(path)
        if not os.path.isfile(path):
            return None, None
        state = torch.load(path, weights_only=True)
        self.module.load_state_dict(state["module"])
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        if load_lr_scheduler_states:
            self.scheduler.load_state_dict(state["scheduler"])
        return path, {}
