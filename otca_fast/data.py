"""Prompts and seeds: the training data of a run and the random streams it draws from."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch

from otca_fast.config import ConfigError

__all__ = ["PromptSampler", "read_prompts", "seed_everything", "stream_seed"]


def stream_seed(seed: int, name: str) -> int:
    """A distinct, reproducible seed per random stream (crc32 is stable across processes)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the trainer does this before building anything random)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_prompts(inline: list[str], path: Path | None, what: str) -> list[str]:
    """The prompts given inline, then those of ``path`` (one per line, blank lines skipped)."""
    prompts = list(inline)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"data.{what}_file: file not found: {p} (one prompt per line)")
        prompts += [line.strip() for line in p.read_text().splitlines() if line.strip()]
    return prompts


class PromptSampler:
    """Draws ``per_step`` prompt indices per step from epochs of a (shuffled) permutation.

    Its whole state (epoch, position, permutation, generator) goes into checkpoints, so a resumed
    run draws the same prompts as an uninterrupted one.
    """

    def __init__(self, num_prompts: int, per_step: int, *, seed: int, shuffle: bool = True):
        if num_prompts < 1:
            raise ValueError(f"num_prompts: expected >= 1, got {num_prompts}")
        self.num_prompts, self.per_step, self.shuffle = num_prompts, per_step, shuffle
        self.generator = torch.Generator().manual_seed(stream_seed(seed, "prompts"))
        self.epoch, self.pos = 0, 0
        self.order = self._new_order()

    def _new_order(self) -> torch.Tensor:
        if self.shuffle:
            return torch.randperm(self.num_prompts, generator=self.generator)
        return torch.arange(self.num_prompts)

    def next(self) -> list[int]:
        out = []
        while len(out) < self.per_step:
            if self.pos == self.num_prompts:
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._new_order()
            out.append(int(self.order[self.pos]))
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "order": self.order.clone(),
                "generator": self.generator.get_state(), "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_prompts"]) != self.num_prompts:
            raise ValueError(f"checkpoint prompt sampler: saved for {int(state['num_prompts'])} prompts, the config "
                             f"has {self.num_prompts}; resume with the same data.prompts")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.order = state["order"].clone()
        self.generator.set_state(state["generator"])
