"""``PromptEmbeds``: the batched text conditioning a backbone hands its transformer.

Its own module because the prompt cache (:mod:`otca_fast.models.text`) builds it and the backbones
(:mod:`otca_fast.models.base` and the families) consume it; it imports torch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from otca_fast import checks

__all__ = ["PromptEmbeds"]


@dataclass
class PromptEmbeds:
    """Batched text conditioning: whatever the transformer needs, keyed by its forward argument name.

    Every tensor has the batch on dim 0 (e.g. ``encoder_hidden_states`` ``[B, L, D]``,
    ``pooled_projections`` ``[B, P]``). Indexing and concatenation act on that dim, so a group of G
    samples of one prompt is ``embeds.index([i] * G)``.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, dict) or not self.tensors:
            raise ValueError(f"tensors: expected a non-empty dict name -> tensor, got {self.tensors!r}")
        sizes = {}
        for name, t in self.tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensors[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 1:
                raise ValueError(f"tensors[{name!r}]: expected a batch dimension, got a 0-d tensor")
            sizes[name] = t.shape[0]
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors: every tensor needs the same batch size on dim 0, got {sizes}")

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def index(self, idx: int | slice | Sequence[int] | torch.Tensor) -> PromptEmbeds:
        """Rows ``idx`` of every tensor (an int keeps a batch of one)."""
        if isinstance(idx, bool):
            raise TypeError("idx: expected an int, slice, sequence of ints or index tensor, got bool")
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        elif not isinstance(idx, (slice, torch.Tensor)):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        if isinstance(idx, torch.Tensor):
            if idx.dtype == torch.bool or idx.dtype.is_floating_point:
                raise TypeError(f"idx: expected integer indices, got dtype {idx.dtype}")
            if idx.numel() and (int(idx.max()) >= self.batch_size or int(idx.min()) < -self.batch_size):
                raise IndexError(f"idx: indices must lie in [-{self.batch_size}, {self.batch_size}), got "
                                 f"[{int(idx.min())}, {int(idx.max())}]")
        out = {}
        for k, t in self.tensors.items():
            out[k] = t[idx.to(t.device)] if isinstance(idx, torch.Tensor) else t[idx]
        return PromptEmbeds(out)

    @staticmethod
    def cat(items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate along the batch; all items must carry the same tensor names."""
        items = checks.non_empty_list_of("items", items, PromptEmbeds)
        keys = set(items[0].tensors)
        for i, e in enumerate(items[1:], 1):
            if set(e.tensors) != keys:
                raise ValueError(f"items[{i}]: expected tensors {sorted(keys)}, got {sorted(e.tensors)}")
        return PromptEmbeds({k: torch.cat([e.tensors[k] for e in items], dim=0) for k in items[0].tensors})

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> PromptEmbeds:
        """A copy on ``device`` and/or in floating ``dtype`` (integer tensors keep their dtype)."""
        return PromptEmbeds({k: t.to(device=device, dtype=dtype if t.dtype.is_floating_point else None)
                             for k, t in self.tensors.items()})
