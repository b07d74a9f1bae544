"""Wan2.1 / Wan2.2 text-to-video backbones over diffusers' ``WanPipeline`` modules.

Latents are ``[B, 16, (F−1)/4 + 1, H/8, W/8]`` (the Wan VAE compresses 4x in time and 8x in space;
the transformer patchifies (1, 2, 2), so H and W must be multiples of 16 and F = 4k + 1). The
transformer's timestep is t = 1000·σ, exactly what ``WanPipeline`` feeds it (its scheduler's
``timesteps`` are ``sigmas · num_train_timesteps``).

Wan2.2 A14B is a two-expert model: the high-noise expert (``transformer``) denoises the steps with
t ≥ boundary_ratio · 1000 (0.875 · 1000 for T2V-A14B), the low-noise expert (``transformer_2``) the
rest. ``velocity`` routes every sample by its own σ, so one batch may mix both experts; the option
``trainable_experts`` ("both", "high", "low") chooses what ``Backbone.transformer`` exposes to the
optimiser and LoRA, the other expert staying frozen.
"""

from __future__ import annotations

from typing import Any

import torch

from otca_fast import checks
from otca_fast.devices import as_dtype
from otca_fast.models.base import DiffusersBackbone, cast_like_pretrained, module_dtype, set_attention_backend
from otca_fast.models.embeds import PromptEmbeds
from otca_fast.models.loading import (
    check_build_source,
    from_pretrained_kwargs,
    merge_tiny,
    pipeline_dtype_kwargs,
    resolve_checkpoint,
)
from otca_fast.models.text import byte_tokenizer, tiny_umt5

__all__ = ["WanBackbone", "WanExperts", "build_wan21", "build_wan22", "wan21_1_3b_config", "TINY_WAN"]

# Tiny configs (diffusers' own WanPipeline tests): 2 layers, 2 heads of 12, ~30k parameters.
TINY_WAN: dict[str, Any] = {
    "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
    "vae": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
    "text_encoder": dict(d_model=32),
    "max_sequence_length": 16,
    "flow_shift": 3.0,
}
TINY_WAN22: dict[str, Any] = {**TINY_WAN, "boundary_ratio": 0.875, "flow_shift": 12.0}

_LORA_CANDIDATES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def wan21_1_3b_config() -> dict[str, Any]:
    """``WanTransformer3DModel`` kwargs of the published Wan2.1-T2V-1.3B transformer (random weights:
    ``WanTransformer3DModel(**wan21_1_3b_config())``, about 1.4e9 parameters; for GPU throughput work)."""
    return dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                rope_max_seq_len=1024)


def _route_experts(high: torch.nn.Module, low: torch.nn.Module, boundary_timestep: float,
                   hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   **kwargs: Any) -> torch.Tensor:
    """WanPipeline's expert choice, per sample: t ≥ boundary → high-noise expert, else low-noise."""
    t0 = timestep if timestep.dim() == 1 else timestep[:, 0]
    is_high = t0 >= boundary_timestep

    def call(model, idx):
        x, t, e = ((hidden_states, timestep, encoder_hidden_states) if idx is None else
                   (hidden_states[idx], timestep[idx], encoder_hidden_states[idx]))
        return model(hidden_states=x.to(module_dtype(model)), timestep=t,
                     encoder_hidden_states=e.to(module_dtype(model)), return_dict=False, **kwargs)[0]

    n_high = int(is_high.sum())
    if n_high == is_high.numel():
        return call(high, None)
    if n_high == 0:
        return call(low, None)
    hi = is_high.nonzero().squeeze(1)
    lo = (~is_high).nonzero().squeeze(1)
    out_high, out_low = call(high, hi), call(low, lo)
    # scatter back to the input order through the inverse permutation (autograd-friendly, no in-place)
    order = torch.cat([hi, lo])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat([out_high, out_low.to(out_high.dtype)])[inverse]


class WanExperts(torch.nn.Module):
    """Wan2.2's two experts as one trainable module (``trainable_experts="both"``).

    ``forward`` takes the arguments of ``WanTransformer3DModel.forward`` and routes each sample by
    its timestep; the adapter helpers apply to both experts, so ``add_adapter(LoraConfig(...))`` puts
    LoRA on both and peft's ``target_modules`` suffixes match inside either.
    """

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module, boundary_timestep: float) -> None:
        super().__init__()
        self.high = high
        self.low = low
        self.boundary_timestep = float(boundary_timestep)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False, **kwargs: Any) -> tuple[torch.Tensor]:
        if return_dict:
            raise ValueError("return_dict: WanExperts returns a tuple (out,); pass return_dict=False")
        return (_route_experts(self.high, self.low, self.boundary_timestep, hidden_states, timestep,
                               encoder_hidden_states, **kwargs),)

    @property
    def dtype(self) -> torch.dtype:
        return module_dtype(self.high)

    @property
    def config(self):  # both experts share one architecture
        return self.high.config

    def _both(self, method: str, *args: Any, **kwargs: Any) -> None:
        for expert in (self.high, self.low):
            getattr(expert, method)(*args, **kwargs)

    def enable_gradient_checkpointing(self, *args: Any, **kwargs: Any) -> None:
        self._both("enable_gradient_checkpointing", *args, **kwargs)

    def disable_gradient_checkpointing(self) -> None:
        self._both("disable_gradient_checkpointing")

    def set_attention_backend(self, backend: str) -> None:
        self._both("set_attention_backend", backend)

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        self._both("add_adapter", adapter_config, adapter_name=adapter_name)

    def enable_adapters(self) -> None:
        self._both("enable_adapters")

    def disable_adapters(self) -> None:
        self._both("disable_adapters")

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self._both("set_adapter", adapter_name)


class WanBackbone(DiffusersBackbone):
    """Wan2.1 (one transformer) or Wan2.2 (one or two experts) text-to-video."""

    is_video = True
    lora_candidates = _LORA_CANDIDATES

    def __init__(self, pipe: Any, *, family: str, device: torch.device, dtype: torch.dtype,
                 max_sequence_length: int = 512, shift: float | None = None, trainable_experts: str = "both",
                 guidance_scale_2: float | None = None, boundary_ratio: float | None = None,
                 decode_batch_size: int = 1, cache_device: str | torch.device | None = None,
                 allow_download: bool = False, attention_backend: str | None = None) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(device=device, dtype=dtype, cache_device=cache_device, allow_download=allow_download)
        self.family = family
        self.pipe = pipe
        checks.positive_int("max_sequence_length", max_sequence_length)
        checks.positive_int("decode_batch_size", decode_batch_size)
        self.max_sequence_length = max_sequence_length
        self.decode_batch_size = decode_batch_size
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False))
        self.num_train_timesteps = int(pipe.scheduler.config.get("num_train_timesteps", 1000))

        high, low = pipe.transformer, getattr(pipe, "transformer_2", None)
        if high is None:
            raise ValueError("transformer: this Wan pipeline has no (high-noise) transformer; a low-noise-only "
                             "checkpoint cannot sample from pure noise")
        self.two_experts = low is not None
        if family == "wan2.1" and self.two_experts:
            raise ValueError("family: this checkpoint has two experts (transformer_2): it is Wan2.2, use "
                             "family 'wan2.2'")
        if not self.two_experts and (trainable_experts != "both" or guidance_scale_2 is not None):
            raise ValueError("trainable_experts / guidance_scale_2: only for two-expert Wan2.2 (A14B) checkpoints, "
                             "this one has a single transformer")
        if trainable_experts not in ("both", "high", "low"):
            raise ValueError(f"trainable_experts: expected 'both', 'high' or 'low', got {trainable_experts!r}")
        if guidance_scale_2 is not None and (isinstance(guidance_scale_2, bool)
                                             or not isinstance(guidance_scale_2, (int, float))):
            raise TypeError(f"guidance_scale_2: expected a float or None, got {type(guidance_scale_2).__name__}")
        self.trainable_experts = trainable_experts
        self.guidance_scale_2 = None if guidance_scale_2 is None else float(guidance_scale_2)
        self.high, self.low = high, low
        if self.two_experts:
            ratio = boundary_ratio if boundary_ratio is not None else pipe.config.get("boundary_ratio")
            if ratio is None or isinstance(ratio, bool) or not (0.0 < float(ratio) < 1.0):
                raise ValueError(f"boundary_ratio: a two-expert Wan2.2 needs a boundary ratio in (0, 1) "
                                 f"(T2V-A14B: 0.875), got {ratio!r}")
            self.boundary_ratio = float(ratio)
            # WanPipeline: boundary_timestep = boundary_ratio * num_train_timesteps, high expert for t >= it
            self.boundary_timestep = self.boundary_ratio * self.num_train_timesteps
            if trainable_experts == "both":
                self.transformer = WanExperts(high, low, self.boundary_timestep)
            else:
                self.transformer = high if trainable_experts == "high" else low
                (low if trainable_experts == "high" else high).requires_grad_(False)
        else:
            self.boundary_ratio = None
            self.boundary_timestep = None
            self.transformer = high

        # sigma schedule: FlowMatchEulerDiscreteScheduler with the checkpoint's shift (UniPC configs call it
        # flow_shift); sigma_t = shift·s / (1 + (shift − 1)·s) over the scheduler's linear grid s
        cfg = pipe.scheduler.config
        if shift is None:
            shift = cfg.get("flow_shift", None) if "flow_shift" in cfg else cfg.get("shift", None)
        if shift is None or isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift <= 0:
            raise ValueError(f"shift: expected a positive float (the checkpoint's scheduler gives none), got {shift!r}")
        self.shift = float(shift)
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps,
                                                         shift=self.shift)

        self._freeze_frozen_parts([pipe.text_encoder, pipe.vae])
        for expert in (high, low):
            if expert is not None:
                expert.eval()  # no dropout in Wan, but keep rollout and training forwards identical
        experts = [m for m in (high, low) if m is not None]
        self.attention_backend = set_attention_backend(experts, attention_backend, allow_download=allow_download)

    # -- shapes and schedule ------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        ts, ss = self.pipe.vae_scale_factor_temporal, self.pipe.vae_scale_factor_spatial
        ph, pw = self.high.config.patch_size[1:]
        for name, v in (("height", height), ("width", width), ("num_frames", num_frames)):
            checks.positive_int(name, v)
        if (num_frames - 1) % ts:
            raise ValueError(f"num_frames: Wan needs {ts}k+1 frames (the VAE compresses time {ts}x), got {num_frames}")
        for name, v, p in (("height", height, ph), ("width", width, pw)):
            if v % (ss * p):
                raise ValueError(f"{name}: Wan needs a multiple of {ss * p} (VAE {ss}x times patch {p}), got {v}")
        return (self.pipe.vae.config.z_dim, (num_frames - 1) // ts + 1, height // ss, width // ss)

    def sigmas(self, num_steps: int, device: str | torch.device | None = None) -> torch.Tensor:
        checks.positive_int("num_steps", num_steps)
        self.scheduler.set_timesteps(num_steps, device="cpu")
        return self.scheduler.sigmas.to(device=device or self.device, dtype=torch.float32)

    # -- text ---------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        # WanPipeline's own UMT5 path: clean, pad to max_sequence_length, zero the padded positions
        embeds, _ = self.pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_sequence_length, device=device)
        return {"encoder_hidden_states": embeds}

    # -- velocity -----------------------------------------------------------------------------------
    def _experts(self, transformer: torch.nn.Module | None) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(high, low) experts with ``transformer`` standing in for the trainable part."""
        if transformer is None:
            return self.high, self.low
        if self.trainable_experts == "both":
            high, low = getattr(transformer, "high", None), getattr(transformer, "low", None)
            if high is None or low is None:
                raise TypeError(f"transformer: with trainable_experts='both' the override must hold both experts "
                                f"(.high and .low, like Backbone.transformer), got {type(transformer).__name__}")
            return high, low
        return (transformer, self.low) if self.trainable_experts == "high" else (self.high, transformer)

    def _timestep(self, sigma: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        t = sigma * self.num_train_timesteps  # WanPipeline feeds scheduler.timesteps = σ·1000
        if self.expand_timesteps:
            # Wan2.2 TI2V: one timestep per latent token (frames x H/2 x W/2), all equal for text-to-video
            f, h, w = latents.shape[2:]
            ph, pw = self.high.config.patch_size[1:]
            t = t[:, None].expand(-1, f * (h // ph) * (w // pw))
        return t

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, *,
                 guidance_scale: float = 1.0, uncond: PromptEmbeds | None = None,
                 transformer: torch.nn.Module | None = None) -> torch.Tensor:
        sigma = self._check_velocity_inputs(latents, sigma, cond, uncond, guidance_scale)
        if not self.two_experts:
            model = transformer if transformer is not None else self.transformer

            def forward(x, s, emb):
                dtype = module_dtype(model)
                return model(hidden_states=x.to(dtype), timestep=self._timestep(s, x),
                             encoder_hidden_states=emb.tensors["encoder_hidden_states"].to(dtype),
                             return_dict=False)[0]
            return self._guided(forward, latents, sigma, cond, uncond, guidance_scale).to(latents.dtype)

        high, low = self._experts(transformer)

        def routed(x, s, emb):
            return _route_experts(high, low, self.boundary_timestep, x, self._timestep(s, x),
                                  emb.tensors["encoder_hidden_states"])
        scale: float | torch.Tensor = guidance_scale
        if self.guidance_scale_2 is not None and guidance_scale != 1.0 and uncond is not None:
            # WanPipeline's guidance_scale_2: the low-noise expert's samples use their own CFG scale
            is_high = sigma * self.num_train_timesteps >= self.boundary_timestep
            scale = torch.where(is_high, float(guidance_scale), self.guidance_scale_2)
        return self._guided(routed, latents, sigma, cond, uncond, scale).to(latents.dtype)

    # -- pixels ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents: expected [B, C, F, H, W] Wan latents, got {got}")
        vae = self.pipe.vae
        z = vae.config.z_dim
        if latents.shape[1] != z:
            raise ValueError(f"latents: expected {z} channels (the VAE's z_dim), got {latents.shape[1]}")
        vae_device = next(vae.parameters()).device
        vae_dtype = next(vae.parameters()).dtype
        # undo the per-channel normalisation WanPipeline's latents carry: x = z·std + mean
        mean = torch.tensor(vae.config.latents_mean, device=vae_device, dtype=vae_dtype).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=vae_device, dtype=vae_dtype).view(1, z, 1, 1, 1)
        frames = []
        for chunk in latents.split(self.decode_batch_size):
            video = vae.decode(chunk.to(vae_device, vae_dtype) * std + mean, return_dict=False)[0]
            frames.append(self.pipe.video_processor.postprocess_video(video, output_type="pt").float())
        return torch.cat(frames).to(latents.device)


# ---------------------------------------------------------------------------------------------
# factories
# ---------------------------------------------------------------------------------------------

def _tiny_pipe(spec: dict[str, Any], *, two_experts: bool, dtype: torch.dtype, vae_dtype: torch.dtype):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    text_dim = spec["transformer"].get("text_dim")
    d_model = spec["text_encoder"].get("d_model")
    if text_dim != d_model:
        raise ValueError(f"tiny: transformer.text_dim ({text_dim}) must equal text_encoder.d_model ({d_model})")
    transformer = cast_like_pretrained(WanTransformer3DModel(**spec["transformer"]), dtype)
    transformer_2 = cast_like_pretrained(WanTransformer3DModel(**spec["transformer"]), dtype) if two_experts else None
    return WanPipeline(
        tokenizer=byte_tokenizer(style="t5", model_max_length=spec["max_sequence_length"]),
        text_encoder=cast_like_pretrained(tiny_umt5(**spec["text_encoder"]), dtype),
        vae=cast_like_pretrained(AutoencoderKLWan(**spec["vae"]), vae_dtype),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=spec["flow_shift"]),
        transformer=transformer, transformer_2=transformer_2,
        boundary_ratio=spec.get("boundary_ratio") if two_experts else None)


def _build(family: str, *, path: Any, tiny: Any, allow_download: bool, dtype: torch.dtype, device: torch.device,
           attention_backend: str | None, vae_dtype: torch.dtype | str = torch.float32,
           max_sequence_length: int | None = None, **options: Any) -> WanBackbone:
    check_build_source(family, path, tiny)
    vae_dtype = as_dtype("vae_dtype", vae_dtype)
    if tiny not in (None, False):
        spec = merge_tiny(TINY_WAN22 if family == "wan2.2" else TINY_WAN, tiny, family=family)
        pipe = _tiny_pipe(spec, two_experts=family == "wan2.2", dtype=dtype, vae_dtype=vae_dtype)
        max_len = spec["max_sequence_length"] if max_sequence_length is None else max_sequence_length
    else:
        from diffusers import AutoencoderKLWan, WanPipeline

        src, _ = resolve_checkpoint(path, family, allow_download=allow_download)
        kw = from_pretrained_kwargs(allow_download=allow_download)
        # the Wan VAE is small and numerically touchy: keep it in float32 unless asked otherwise
        vae = AutoencoderKLWan.from_pretrained(src, subfolder="vae", torch_dtype=vae_dtype, **kw)
        pipe = WanPipeline.from_pretrained(src, vae=vae, **pipeline_dtype_kwargs(dtype), **kw)
        # WanPipeline.__call__ pads prompts to 512 UMT5 tokens; match it so embeddings equal the pipeline's
        max_len = 512 if max_sequence_length is None else max_sequence_length
    pipe.to(device)
    return WanBackbone(pipe, family=family, device=device, dtype=dtype, max_sequence_length=max_len,
                       allow_download=allow_download, attention_backend=attention_backend, **options)


def build_wan21(*, path: str | None = None, tiny: dict | bool | None = None, allow_download: bool = False,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                attention_backend: str | None = None, **options: Any) -> WanBackbone:
    """Wan2.1 text-to-video. Options: ``shift`` (default: the checkpoint's flow_shift), ``max_sequence_length``
    (512), ``vae_dtype`` (float32), ``decode_batch_size`` (1), ``cache_device`` (the backbone's device)."""
    return _build("wan2.1", path=path, tiny=tiny, allow_download=allow_download, dtype=dtype,
                  device=torch.device(device), attention_backend=attention_backend, **options)


def build_wan22(*, path: str | None = None, tiny: dict | bool | None = None, allow_download: bool = False,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                attention_backend: str | None = None, **options: Any) -> WanBackbone:
    """Wan2.2 text-to-video (A14B: two experts split at ``boundary_ratio``). Options as Wan2.1, plus
    ``trainable_experts`` ("both" default, "high", "low"), ``guidance_scale_2`` (CFG scale of the
    low-noise expert; default: the same as the high-noise one) and ``boundary_ratio`` (default: the
    checkpoint's)."""
    return _build("wan2.2", path=path, tiny=tiny, allow_download=allow_download, dtype=dtype,
                  device=torch.device(device), attention_backend=attention_backend, **options)
