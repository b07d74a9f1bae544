"""The shapes-video world: the embedded default that trains on a laptop CPU.

* :mod:`otca_fast.toy.world`    — procedural clips, the prompt grammar and the fixed train / held-out split;
* :mod:`otca_fast.toy.rewards`  — three pixel-only rewards (``shapes_alignment``, ``shapes_motion``,
  ``shapes_quality``), registered in :mod:`otca_fast.rewards` when imported;
* :mod:`otca_fast.toy.text`     — the byte-level BPE tokenizer and the small UMT5 text encoder;
* :mod:`otca_fast.toy.model`    — the tiny pixel-space Wan transformer, its shipped weights, and the
  ``"shapes"`` backbone;
* :mod:`otca_fast.toy.pretrain` — ``python -m otca_fast.toy.pretrain``, which made those weights.

Importing this package registers the ``"shapes"`` backbone family (``otca_fast.models.build_backbone``
imports it on first use); the diffusers/transformers imports happen only when a backbone is built.
"""

from __future__ import annotations

from typing import Any

from otca_fast.models.base import register_backbone

__all__ = ["build_shapes_backbone", "register_toy_rewards"]


def build_shapes_backbone(**kwargs: Any):
    """``build_backbone("shapes", ...)``: see :func:`otca_fast.toy.model.build_shapes_backbone`."""
    from otca_fast.toy.model import build_shapes_backbone as build

    return build(**kwargs)


def register_toy_rewards() -> None:
    """Register the world's rewards (``shapes_alignment`` / ``_motion`` / ``_quality``) and its eval-only
    ``shapes_exam`` in the reward registry (importing their modules does it)."""
    import otca_fast.toy.exam  # noqa: F401
    import otca_fast.toy.rewards  # noqa: F401


register_backbone("shapes", build_shapes_backbone)
