"""Backbone adapters over diffusers: Wan2.1 / Wan2.2 (text-to-video), SD3 / SD3.5 and FLUX.1 (images).

``build_backbone(family, path=... | tiny=...)`` returns a :class:`Backbone`; see docs/models.md for
the supported checkpoints, the expected local directory layout and the attention backends.
Importing this package pulls in torch only; diffusers is imported when a family is first built.
"""

from otca_fast.models.base import (
    Backbone,
    BackboneFactory,
    DiffusersBackbone,
    PromptEmbeds,
    attention_backend_names,
    build_backbone,
    list_backbones,
    register_backbone,
    set_attention_backend,
)
from otca_fast.models.loading import LAYOUTS, CheckpointLayout, check_checkpoint_dir, layout_for
from otca_fast.models.text import PromptCache, byte_tokenizer
from otca_fast.models.wan import wan21_1_3b_config  # torch-only import: diffusers loads on first build

__all__ = [
    "Backbone", "BackboneFactory", "DiffusersBackbone", "PromptEmbeds", "build_backbone", "register_backbone",
    "list_backbones", "attention_backend_names", "set_attention_backend", "PromptCache", "byte_tokenizer",
    "CheckpointLayout", "LAYOUTS", "layout_for", "check_checkpoint_dir", "wan21_1_3b_config",
]

