"""The backbone a config names, built on a device, with what the trainer needs to know of it."""

from __future__ import annotations

import torch

from otca_fast.config import ConfigError
from otca_fast.devices import DTYPES
from otca_fast.models.base import Backbone, build_backbone
from otca_fast.rollout import chunks

__all__ = ["backbone_from_config", "latent_shape_from_config", "embed_prompts"]


def backbone_from_config(model, device: torch.device) -> Backbone:
    """The backbone of the config's ``model`` section; a :class:`ConfigError` naming the section otherwise."""
    try:
        return build_backbone(model.family, path=None if model.path is None else str(model.path),
                              tiny=model.tiny or None, allow_download=model.allow_download, dtype=DTYPES[model.dtype],
                              device=device, attention_backend=model.attention_backend, **model.options)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"model ({model.family}): {e}") from None


def latent_shape_from_config(backbone: Backbone, sample) -> tuple[int, ...]:
    """The latent shape of one sample of the config's ``sample`` section (height, width, frames)."""
    try:
        return tuple(backbone.latent_shape(sample.height, sample.width, sample.num_frames))
    except ValueError as e:
        raise ConfigError(f"sample.height / width / num_frames: {e}") from None


def embed_prompts(backbone: Backbone, texts: list[str], *, offload_text_encoder: bool) -> None:
    """Embed every prompt once (the backbone caches them), then let the text encoders leave the GPU."""
    texts = list(dict.fromkeys(texts))
    for part in chunks(len(texts), 64):
        backbone.encode_prompts(texts[part])
    if offload_text_encoder:
        backbone.offload_text_encoder()
