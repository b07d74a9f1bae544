"""FLUX.1 backbone over diffusers' ``FluxPipeline`` modules.

The trainer sees plain latents ``[B, 16, H/8, W/8]``; FLUX's transformer wants them packed into 2x2
patches, ``[B, (H/16)·(W/16), 64]``, with per-token position ids. The adapter packs on the way in and
unpacks the velocity on the way out with the pipeline's own ``_pack_latents`` / ``_unpack_latents``
(packing is a pure permutation, so the velocity of the packed latents unpacks to the velocity of the
plain ones).

Timestep: ``FluxPipeline`` passes t/1000 = σ itself (the transformer rescales inside). FLUX.1-dev is
guidance-distilled: its guidance embedding takes a scale (pipeline default 3.5), set here with the
build option ``embedded_guidance``; ``velocity(guidance_scale=g, uncond=...)`` is true
classifier-free guidance on top (the pipeline's ``true_cfg_scale``), one forward of 2B.
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

__all__ = ["FluxBackbone", "build_flux", "TINY_FLUX"]

# Tiny configs after diffusers' FLUX pipeline tests; the scheduler is FLUX.1-dev's (dynamic shifting).
TINY_FLUX: dict[str, Any] = {
    "transformer": dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        axes_dims_rope=[4, 4, 8]),
    "vae": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.0609, scaling_factor=1.5035),
    "text_encoder": dict(hidden_size=32),
    "text_encoder_2": dict(d_model=32),
    "scheduler": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096),
    "max_sequence_length": 16,
}

_LORA_CANDIDATES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out")


class FluxBackbone(ImageBackbone):
    """FLUX.1 (dev: guidance-distilled; schnell) text-to-image."""

    lora_candidates = _LORA_CANDIDATES
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(self, pipe: Any, *, device: torch.device, dtype: torch.dtype, max_sequence_length: int = 512,
                 embedded_guidance: float | None = None, decode_batch_size: int = 8,
                 cache_device: str | torch.device | None = None, allow_download: bool = False,
                 attention_backend: str | None = None) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(device=device, dtype=dtype, cache_device=cache_device, allow_download=allow_download)
        self.family = "flux"
        self.pipe = pipe
        self.transformer = pipe.transformer
        for name, v in (("max_sequence_length", max_sequence_length), ("decode_batch_size", decode_batch_size)):
            checks.positive_int(name, v)
        if max_sequence_length > 512:
            raise ValueError(f"max_sequence_length: FLUX takes at most 512 T5 tokens, got {max_sequence_length}")
        self.max_sequence_length = max_sequence_length
        self.decode_batch_size = decode_batch_size
        if self.transformer.config.patch_size != 1:
            raise ValueError(f"transformer.patch_size: FLUX packs 2x2 latent patches itself and expects patch_size 1, "
                             f"got {self.transformer.config.patch_size}")
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        if embedded_guidance is not None and (isinstance(embedded_guidance, bool)
                                              or not isinstance(embedded_guidance, (int, float))):
            raise TypeError(f"embedded_guidance: expected a float, got {type(embedded_guidance).__name__}")
        if embedded_guidance is not None and not self.guidance_embeds:
            raise ValueError("embedded_guidance: this FLUX transformer has no guidance embedding (guidance_embeds="
                             "False, e.g. FLUX.1-schnell); use velocity(guidance_scale=..., uncond=...) for CFG")
        # FluxPipeline's default guidance_scale (3.5) feeds the distilled guidance embedding
        self.embedded_guidance = (3.5 if embedded_guidance is None else float(embedded_guidance)) \
            if self.guidance_embeds else None
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self._freeze_frozen_parts([pipe.text_encoder, pipe.text_encoder_2, pipe.vae])
        self.transformer.eval()
        self.attention_backend = set_attention_backend([self.transformer], attention_backend,
                                                       allow_download=allow_download)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4  # 2x2 packing: 64 packed channels = 16 latent channels

    def _patch_multiple(self) -> int:
        return 2

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        if num_frames != 1:
            raise ValueError(f"num_frames: FLUX generates images, expected 1, got {num_frames!r}")
        self._check_image_size(height, width)
        self._resolution = (height, width)
        vsf = self.pipe.vae_scale_factor
        return (self.latent_channels, height // vsf, width // vsf)

    def sigmas(self, num_steps: int, device: str | torch.device | None = None, *, height: int | None = None,
               width: int | None = None) -> torch.Tensor:
        """FluxPipeline's schedule: σ = linspace(1, 1/N, N), time-shifted by mu(image tokens) when the
        scheduler uses dynamic shifting (FLUX.1-dev), then a final 0. The resolution comes from
        ``height``/``width``, else the last ``latent_shape`` call, else 1024²."""
        import numpy as np

        checks.positive_int("num_steps", num_steps)
        h, w = self._schedule_resolution(height, width)
        seq_len = (h // (2 * self.pipe.vae_scale_factor)) * (w // (2 * self.pipe.vae_scale_factor))
        grid = None if self.scheduler.config.get("use_flow_sigmas", False) else \
            np.linspace(1.0, 1.0 / num_steps, num_steps)
        return self._flow_sigmas(num_steps, sigmas=grid, image_seq_len=seq_len, device=device)

    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                    max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → FLUX tokens ``[B, (H/2)(W/2), 4C]``."""
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """FLUX tokens → ``[B, C, height, width]`` (latent height/width)."""
        vsf = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(tokens, height * vsf, width * vsf, vsf)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, *,
                 guidance_scale: float = 1.0, uncond: PromptEmbeds | None = None,
                 transformer: torch.nn.Module | None = None) -> torch.Tensor:
        sigma = self._check_velocity_inputs(latents, sigma, cond, uncond, guidance_scale)
        c, h, w = latents.shape[1:]
        if c != self.latent_channels or h % 2 or w % 2:
            raise ValueError(f"latents: expected [B, {self.latent_channels}, H, W] with even H and W, got "
                             f"{tuple(latents.shape)}")
        model = transformer if transformer is not None else self.transformer

        def forward(x: torch.Tensor, s: torch.Tensor, emb: PromptEmbeds) -> torch.Tensor:
            dtype = module_dtype(model)
            text = emb.tensors["encoder_hidden_states"]
            img_ids = self.pipe._prepare_latent_image_ids(x.shape[0], h // 2, w // 2, x.device, dtype)
            txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=dtype)  # FluxPipeline's text ids
            guidance = None
            if self.guidance_embeds:
                guidance = torch.full((x.shape[0],), self.embedded_guidance, device=x.device, dtype=torch.float32)
            out = model(hidden_states=self.pack(x.to(dtype)), timestep=s,  # FluxPipeline: timestep / 1000 = σ
                        guidance=guidance, pooled_projections=emb.tensors["pooled_projections"].to(dtype),
                        encoder_hidden_states=text.to(dtype), txt_ids=txt_ids, img_ids=img_ids,
                        return_dict=False)[0]
            return self.unpack(out, h, w)
        return self._guided(forward, latents, sigma, cond, uncond, guidance_scale).to(latents.dtype)


def _tiny_pipe(spec: dict[str, Any], *, dtype: torch.dtype, vae_dtype: torch.dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    t = spec["transformer"]
    checks = (("transformer.pooled_projection_dim", t["pooled_projection_dim"], "text_encoder.hidden_size",
               spec["text_encoder"]["hidden_size"]),
              ("transformer.joint_attention_dim", t["joint_attention_dim"], "text_encoder_2.d_model",
               spec["text_encoder_2"]["d_model"]),
              ("transformer.in_channels", t["in_channels"], "4 x vae.latent_channels",
               4 * spec["vae"]["latent_channels"]))
    for name, got, what, want in checks:
        if got != want:
            raise ValueError(f"tiny: {name} ({got}) must equal {what} ({want})")
    return FluxPipeline(
        transformer=cast_like_pretrained(FluxTransformer2DModel(**t), dtype),
        scheduler=FlowMatchEulerDiscreteScheduler(**spec["scheduler"]),
        vae=cast_like_pretrained(AutoencoderKL(**spec["vae"]), vae_dtype),
        text_encoder=cast_like_pretrained(tiny_clip(with_projection=False, **spec["text_encoder"]), dtype),
        tokenizer=byte_tokenizer(style="clip", model_max_length=77),
        text_encoder_2=cast_like_pretrained(tiny_t5(**spec["text_encoder_2"]), dtype),
        tokenizer_2=byte_tokenizer(style="t5", model_max_length=spec["max_sequence_length"]))


def build_flux(*, path: str | None = None, tiny: dict | bool | None = None, allow_download: bool = False,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attention_backend: str | None = None, vae_dtype: torch.dtype | str = torch.float32,
               max_sequence_length: int | None = None, **options: Any) -> FluxBackbone:
    """FLUX.1. Options: ``embedded_guidance`` (FLUX.1-dev's distilled guidance, 3.5), ``max_sequence_length``
    (T5 tokens, 512), ``vae_dtype`` (float32), ``decode_batch_size`` (8), ``cache_device``."""
    pipe, max_len, device = load_image_pipeline(
        "flux", "FluxPipeline", path=path, tiny=tiny, allow_download=allow_download, dtype=dtype, vae_dtype=vae_dtype,
        device=device, tiny_defaults=TINY_FLUX, tiny_pipe=_tiny_pipe, default_max_sequence_length=512,
        max_sequence_length=max_sequence_length)
    return FluxBackbone(pipe, device=device, dtype=dtype, max_sequence_length=max_len, allow_download=allow_download,
                        attention_backend=attention_backend, **options)
