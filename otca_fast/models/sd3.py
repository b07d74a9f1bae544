"""Stable Diffusion 3 / 3.5 backbone over diffusers' ``StableDiffusion3Pipeline`` modules.

Latents are ``[B, 16, H/8, W/8]`` (the pipeline's scaled latents, (z − shift)·scaling). The
transformer's timestep is t = 1000·σ, as in the pipeline. Text conditioning is the pipeline's own:
two CLIP encoders (hidden states concatenated, then padded to T5's width) plus T5 tokens as
``encoder_hidden_states``, and the two pooled CLIP projections as ``pooled_projections``.

diffusers' SD3 attention processor (``JointAttnProcessor2_0``) calls torch SDPA directly, so the
attention-backend dispatcher would silently not apply. The adapter swaps in
:class:`SD3DispatchAttnProcessor`: the same joint attention, routed through
``dispatch_attention_fn`` so ``attention_backend`` (flash, xformers, ...) takes effect.
"""

from __future__ import annotations

from typing import Any

import torch

from otca_fast import checks
from otca_fast.models.base import (
    ImageBackbone,
    cast_like_pretrained,
    module_dtype,
    set_attention_backend,
)
from otca_fast.models.embeds import PromptEmbeds
from otca_fast.models.loading import (
    load_image_pipeline,
)
from otca_fast.models.text import byte_tokenizer, tiny_clip, tiny_t5

__all__ = ["SD3Backbone", "SD3DispatchAttnProcessor", "build_sd3", "TINY_SD3", "TINY_SD35_TRANSFORMER"]

# Tiny configs after diffusers' SD3 pipeline tests. The CLIP widths (16 + 16) sum to T5's d_model (32)
# as in the real model (768 + 1280 padded to 4096); the projections (32 + 32) give the pooled 64.
TINY_SD3: dict[str, Any] = {
    "transformer": dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                        pooled_projection_dim=64, out_channels=4),
    "vae": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.0609, scaling_factor=1.5035),
    "text_encoder": dict(hidden_size=16, projection_dim=32),
    "text_encoder_2": dict(hidden_size=16, projection_dim=32),
    "text_encoder_3": dict(d_model=32),
    "scheduler": dict(shift=3.0),
    "max_sequence_length": 16,
}
#: transformer overrides for an SD3.5-style tiny model (MMDiT-X dual attention in block 0, RMS qk-norm)
TINY_SD35_TRANSFORMER: dict[str, Any] = dict(num_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm",
                                             pos_embed_max_size=96)

_LORA_CANDIDATES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                    "attn2.to_out.0")


class SD3DispatchAttnProcessor:
    """``JointAttnProcessor2_0`` through diffusers' attention dispatcher.

    Same math: q, k, v of the image tokens (and of the text tokens when given) are projected,
    qk-normed per head, concatenated along the sequence ([image; text]), attended jointly and split
    back. Tensors stay ``[B, S, heads, head_dim]``, the dispatcher's layout (RMS/LayerNorm over
    head_dim does not care whether heads come before or after the sequence).
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if attention_mask is not None:
            raise ValueError("attention_mask: SD3's joint attention takes no mask (neither does diffusers' processor)")
        residual_len = hidden_states.shape[1]
        head_dim = attn.to_k.out_features // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (attn.heads, head_dim))

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), \
            heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq = heads(attn.add_q_proj(encoder_hidden_states))
            ek = heads(attn.add_k_proj(encoder_hidden_states))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=1)
            key = torch.cat([key, ek], dim=1)
            value = torch.cat([value, ev], dim=1)
        # parallel_config only when set: diffusers releases before context parallelism lack the keyword
        extra = {"parallel_config": self._parallel_config} if self._parallel_config is not None else {}
        out = dispatch_attention_fn(query, key, value, backend=self._attention_backend, **extra)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_out = out[:, :residual_len], out[:, residual_len:]
            if not attn.context_pre_only:
                encoder_out = attn.to_add_out(encoder_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, encoder_out) if encoder_hidden_states is not None else out


def install_dispatch_processors(transformer: torch.nn.Module) -> int:
    """Replace every ``JointAttnProcessor2_0`` of ``transformer`` by :class:`SD3DispatchAttnProcessor`;
    returns how many were replaced."""
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    n = 0
    for module in transformer.modules():
        if isinstance(module, Attention) and type(module.processor) is JointAttnProcessor2_0:
            module.set_processor(SD3DispatchAttnProcessor())
            n += 1
    return n


class SD3Backbone(ImageBackbone):
    """SD3 / SD3.5 (medium, large) text-to-image."""

    lora_candidates = _LORA_CANDIDATES
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(self, pipe: Any, *, device: torch.device, dtype: torch.dtype, max_sequence_length: int = 256,
                 shift: float | None = None, decode_batch_size: int = 8,
                 cache_device: str | torch.device | None = None, allow_download: bool = False,
                 attention_backend: str | None = None) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(device=device, dtype=dtype, cache_device=cache_device, allow_download=allow_download)
        self.family = "sd3"
        self.pipe = pipe
        self.transformer = pipe.transformer
        for name, v in (("max_sequence_length", max_sequence_length), ("decode_batch_size", decode_batch_size)):
            checks.positive_int(name, v)
        self.max_sequence_length = max_sequence_length
        self.decode_batch_size = decode_batch_size
        config = dict(pipe.scheduler.config)
        if shift is not None:
            if isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift <= 0:
                raise ValueError(f"shift: expected a positive float, got {shift!r}")
            config.update(shift=float(shift), use_dynamic_shifting=False)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        self._freeze_frozen_parts([pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae])
        self.transformer.eval()
        if install_dispatch_processors(self.transformer) == 0:
            raise RuntimeError("SD3 transformer: found no JointAttnProcessor2_0 to route through the attention "
                               "dispatcher (diffusers changed its SD3 attention?)")
        self.attention_backend = set_attention_backend([self.transformer], attention_backend,
                                                       allow_download=allow_download)

    def _patch_multiple(self) -> int:
        return self.transformer.config.patch_size

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        if num_frames != 1:
            raise ValueError(f"num_frames: SD3 generates images, expected 1, got {num_frames!r}")
        self._check_image_size(height, width)
        vsf, patch = self.pipe.vae_scale_factor, self._patch_multiple()
        max_tokens = self.transformer.config.pos_embed_max_size
        if max_tokens is not None and max(height, width) // vsf // patch > max_tokens:
            raise ValueError(f"height/width: SD3's positional embedding covers {max_tokens * vsf * patch} px per "
                             f"side, got {height}x{width}")
        self._resolution = (height, width)
        return (self.transformer.config.in_channels, height // vsf, width // vsf)

    def sigmas(self, num_steps: int, device: str | torch.device | None = None, *, height: int | None = None,
               width: int | None = None) -> torch.Tensor:
        """SD3's schedule: ``set_timesteps(num_steps)`` with the checkpoint's shift (3.0); with dynamic
        shifting (if configured) the shift depends on the resolution, see ``_schedule_resolution``."""
        h, w = self._schedule_resolution(height, width)
        patch = self._patch_multiple() * self.pipe.vae_scale_factor
        return self._flow_sigmas(num_steps, sigmas=None, image_seq_len=(h // patch) * (w // patch), device=device)

    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, *,
                 guidance_scale: float = 1.0, uncond: PromptEmbeds | None = None,
                 transformer: torch.nn.Module | None = None) -> torch.Tensor:
        sigma = self._check_velocity_inputs(latents, sigma, cond, uncond, guidance_scale)
        model = transformer if transformer is not None else self.transformer

        def forward(x: torch.Tensor, s: torch.Tensor, emb: PromptEmbeds) -> torch.Tensor:
            dtype = module_dtype(model)
            return model(hidden_states=x.to(dtype), timestep=s * 1000.0,  # SD3 pipeline: t = σ·1000
                         encoder_hidden_states=emb.tensors["encoder_hidden_states"].to(dtype),
                         pooled_projections=emb.tensors["pooled_projections"].to(dtype), return_dict=False)[0]
        return self._guided(forward, latents, sigma, cond, uncond, guidance_scale).to(latents.dtype)


def _tiny_pipe(spec: dict[str, Any], *, dtype: torch.dtype, vae_dtype: torch.dtype):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    t = spec["transformer"]
    clip_width = spec["text_encoder"]["hidden_size"] + spec["text_encoder_2"]["hidden_size"]
    pooled = spec["text_encoder"]["projection_dim"] + spec["text_encoder_2"]["projection_dim"]
    checks = (("transformer.pooled_projection_dim", t["pooled_projection_dim"], "the two CLIP projection_dims",
               pooled),
              ("transformer.joint_attention_dim", t["joint_attention_dim"], "text_encoder_3.d_model",
               spec["text_encoder_3"]["d_model"]),
              ("text_encoder_3.d_model", spec["text_encoder_3"]["d_model"], "at least the two CLIP hidden sizes",
               max(clip_width, spec["text_encoder_3"]["d_model"])))
    for name, got, what, want in checks:
        if got != want:
            raise ValueError(f"tiny: {name} ({got}) must equal {what} ({want})")

    def clip(key: str) -> torch.nn.Module:
        return cast_like_pretrained(tiny_clip(with_projection=True, **spec[key]), dtype)

    return StableDiffusion3Pipeline(
        transformer=cast_like_pretrained(SD3Transformer2DModel(**t), dtype),
        scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]),
        vae=cast_like_pretrained(AutoencoderKL(**spec["vae"]), vae_dtype),
        text_encoder=clip("text_encoder"), tokenizer=byte_tokenizer(style="clip", model_max_length=77),
        text_encoder_2=clip("text_encoder_2"), tokenizer_2=byte_tokenizer(style="clip", model_max_length=77),
        text_encoder_3=cast_like_pretrained(tiny_t5(**spec["text_encoder_3"]), dtype),
        tokenizer_3=byte_tokenizer(style="t5", model_max_length=spec["max_sequence_length"]))


def build_sd3(*, path: str | None = None, tiny: dict | bool | None = None, allow_download: bool = False,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              attention_backend: str | None = None, vae_dtype: torch.dtype | str = torch.float32,
              max_sequence_length: int | None = None, **options: Any) -> SD3Backbone:
    """SD3 / SD3.5. Options: ``shift`` (default: the checkpoint's, 3.0), ``max_sequence_length`` (T5 tokens,
    256), ``vae_dtype`` (float32), ``decode_batch_size`` (8), ``cache_device`` (the backbone's device).
    ``tiny={"transformer": TINY_SD35_TRANSFORMER}`` builds an SD3.5-style transformer."""
    pipe, max_len, device = load_image_pipeline(
        "sd3", "StableDiffusion3Pipeline", path=path, tiny=tiny, allow_download=allow_download, dtype=dtype,
        vae_dtype=vae_dtype, device=device, tiny_defaults=TINY_SD3, tiny_pipe=_tiny_pipe,
        default_max_sequence_length=256, max_sequence_length=max_sequence_length)
    return SD3Backbone(pipe, device=device, dtype=dtype, max_sequence_length=max_len, allow_download=allow_download,
                       attention_backend=attention_backend, **options)
