"""The backbone interface the trainer drives and the family registry (the prompt-embedding container,
:class:`PromptEmbeds`, lives in :mod:`otca_fast.models.embeds` and is re-exported here).

A backbone is a thin adapter over diffusers modules that speaks one convention whatever the model:

* latents are plain per-sample tensors (``[C, F, H, W]`` for video, ``[C, H, W]`` for images; FLUX's
  2x2 token packing stays inside its adapter);
* ``velocity(x_t, σ)`` is the flow-matching velocity v = noise − x0 of x_t = (1 − σ)·x0 + σ·noise, with
  σ ∈ (0, 1] per sample; each adapter converts σ to its model's timestep convention;
* classifier-free guidance, when asked for, is one forward over the 2B batch [cond; uncond]:
  v = v_u + g·(v_c − v_u).

This module imports torch only; the diffusers-backed families register themselves lazily, so
``import otca_fast.models`` stays cheap and a family's heavy imports happen on first build.
"""

from __future__ import annotations

import abc
import importlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

from otca_fast import checks
from otca_fast.devices import as_dtype, resolve_device
from otca_fast.models.embeds import PromptEmbeds
from otca_fast.models.text import PromptCache

__all__ = [
    "Backbone", "DiffusersBackbone", "ImageBackbone", "PromptEmbeds", "BackboneFactory", "build_backbone",
    "register_backbone", "list_backbones", "set_attention_backend", "attention_backend_names",
    "cast_like_pretrained", "module_dtype", "as_dtype",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# the backbone interface
# ---------------------------------------------------------------------------------------------

class Backbone(abc.ABC):
    """What the trainer sees of a generator. One subclass per family (see ``build_backbone``)."""

    family: str
    is_video: bool
    transformer: torch.nn.Module  # the trainable module: LoRA attaches here (peft)

    @abc.abstractmethod
    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        """Per-sample latent shape of a ``num_frames`` x ``height`` x ``width`` output."""

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Text conditioning of ``prompts`` (cached per prompt string)."""

    @abc.abstractmethod
    def offload_text_encoder(self) -> None:
        """Move the text encoders off the accelerator once the cache holds every prompt needed."""

    @abc.abstractmethod
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, *,
                 guidance_scale: float = 1.0, uncond: PromptEmbeds | None = None,
                 transformer: torch.nn.Module | None = None) -> torch.Tensor:
        """Flow-matching velocity at noise level ``sigma`` ``[B]``, the shape and dtype of ``latents``."""

    @abc.abstractmethod
    def sigmas(self, num_steps: int, device: str | torch.device | None = None) -> torch.Tensor:
        """The family's sampling schedule, ``[num_steps + 1]`` float32 from 1 down to 0."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames ``[B, F, 3, H, W]`` float32 in [0, 1] (images: F = 1)."""

    @abc.abstractmethod
    def lora_target_modules(self) -> list[str]:
        """Default peft ``target_modules`` for this family's transformer."""


# ---------------------------------------------------------------------------------------------
# attention backends (diffusers' dispatcher)
# ---------------------------------------------------------------------------------------------

# Friendly spellings accepted next to diffusers' own names (AttentionBackendName values).
_BACKEND_ALIASES = {"sdpa": "native", "torch": "native", "flash_attn": "flash", "flash-attn": "flash",
                    "flash_attention": "flash", "sage_attention": "sage", "flash3": "_flash_3"}
_BACKEND_PACKAGES = {"flash": "flash-attn", "flash_varlen": "flash-attn", "_flash_3": "flash-attn 3 (hopper build)",
                     "_flash_varlen_3": "flash-attn 3 (hopper build)", "xformers": "xformers", "sage": "sageattention",
                     "sage_varlen": "sageattention"}


def attention_backend_names() -> list[str]:
    """Every attention backend name diffusers knows (``AttentionBackendName`` values), sorted."""
    from diffusers.models.attention_dispatch import AttentionBackendName
    return sorted(m.value for m in AttentionBackendName)


def _resolve_backend_name(backend: str, *, allow_download: bool) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"attention_backend: expected a backend name (str) or None, got {type(backend).__name__}")
    name = backend.strip().lower()
    name = _BACKEND_ALIASES.get(name, name)
    known = attention_backend_names()
    if name not in known:
        raise ValueError(f"attention_backend: expected one of {known} (or null for torch SDPA), got {backend!r}")
    if name.endswith("_hub") and not allow_download:
        # the *_hub backends fetch compiled kernels from the Hugging Face Hub on first use
        raise ValueError(f"attention_backend: {name!r} downloads its kernel from the Hugging Face Hub at run time; "
                         f"set model.allow_download: true to permit that, or pick a locally installed backend "
                         f"('native', 'flash', 'xformers', ...)")
    return name


def set_attention_backend(modules: Iterable[torch.nn.Module], backend: str | None, *,
                          allow_download: bool = False) -> str | None:
    """Route the attention of diffusers ``modules`` through ``backend`` (diffusers' dispatcher).

    ``None`` leaves diffusers' default (torch SDPA, or ``DIFFUSERS_ATTN_BACKEND`` when set). A
    backend whose package is missing raises a ``RuntimeError`` that names the package to install.
    Returns the resolved diffusers name.
    """
    if backend is None:
        return None
    name = _resolve_backend_name(backend, allow_download=allow_download)
    for module in modules:
        if module is None:
            continue
        setter = getattr(module, "set_attention_backend", None)
        if setter is None:
            raise TypeError(f"attention_backend: {type(module).__name__} does not support diffusers attention "
                            f"backends (no set_attention_backend)")
        # diffusers logs an "experimental feature" warning on every call; it says nothing actionable here
        diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
        level = diffusers_logger.level
        diffusers_logger.setLevel(logging.ERROR)
        try:
            setter(name)
        except (RuntimeError, ImportError) as e:
            package = _BACKEND_PACKAGES.get(name)
            hint = f" Install {package} (pip install {package.split(' ')[0]}) or" if package else ""
            raise RuntimeError(f"attention_backend={backend!r} is not usable on this machine: {e}{hint} choose "
                               f"another backend ('native' = torch SDPA always works).") from e
        finally:
            diffusers_logger.setLevel(level)
    return name


# ---------------------------------------------------------------------------------------------
# shared machinery of the diffusers families
# ---------------------------------------------------------------------------------------------

def _check_sigma(sigma: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """σ as a float32 ``[B]`` tensor on ``device``, each value in (0, 1]."""
    if isinstance(sigma, bool):
        raise TypeError("sigma: expected a float or a [B] tensor, got bool")
    if isinstance(sigma, (int, float)):
        sigma = torch.full((batch,), float(sigma), dtype=torch.float32)
    if not isinstance(sigma, torch.Tensor):
        raise TypeError(f"sigma: expected a float or a [B] tensor, got {type(sigma).__name__}")
    if not sigma.dtype.is_floating_point:
        raise TypeError(f"sigma: expected a floating tensor, got dtype {sigma.dtype}")
    if sigma.dim() == 0:
        sigma = sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma: expected shape ({batch},) (one noise level per sample), got {tuple(sigma.shape)}")
    sigma = sigma.to(device=device, dtype=torch.float32)
    lo, hi = torch.stack(torch.aminmax(sigma)).tolist()  # one host sync for both bounds
    if not (lo > 0.0 and hi <= 1.0):
        raise ValueError(f"sigma: expected values in (0, 1] (σ = 1 is pure noise; σ = 0 needs no model call), "
                         f"got range [{lo}, {hi}]")
    return sigma


def cast_like_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters and buffers to ``dtype`` the way ``from_pretrained(torch_dtype=...)`` does:
    tensors inside the class's ``_keep_in_fp32_modules`` (Wan: rope, time embedder, norms, ...) stay
    float32, so a tiny bf16 build has the numerics of a real bf16 checkpoint."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.dtype.is_floating_point:
            continue
        target = torch.float32 if keep and any(k in name.split(".") for k in keep) else dtype
        if t.dtype != target:
            t.data = t.data.to(target)
    return model


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """dtype of a transformer's frozen base weights, to cast its inputs to: LoRA weights (usually
    float32) and ``_keep_in_fp32_modules`` tensors are skipped."""
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    fallback = None
    for name, p in module.named_parameters():
        if not p.dtype.is_floating_point or "lora_" in name:
            continue
        if keep and any(k in name.split(".") for k in keep):
            fallback = fallback or p.dtype
            continue
        return p.dtype
    if fallback is None:
        raise ValueError(f"transformer: {type(module).__name__} has no floating parameters")
    return fallback


class DiffusersBackbone(Backbone):
    """Prompt cache, text-encoder offload, CFG batching and input checks shared by the diffusers families.

    Subclasses set ``pipe`` (the diffusers pipeline that owns the modules), ``transformer``,
    ``family``, ``is_video`` and ``lora_candidates``, and implement ``_encode`` (uncached prompts ->
    batched tensors), ``velocity`` (through :meth:`_check_velocity_inputs` and :meth:`_guided`),
    ``latent_shape``, ``sigmas`` and ``decode``.
    """

    pipe: Any
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    #: peft target suffixes tried, in order; only those present in the transformer are returned
    lora_candidates: tuple[str, ...] = ()

    def __init__(self, *, device: str | torch.device, dtype: torch.dtype, cache_device: str | torch.device | None,
                 allow_download: bool) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.allow_download = allow_download
        self.prompt_cache = PromptCache(device=self.device if cache_device is None else torch.device(cache_device))
        self._text_encoders_offloaded = False
        self._encode_lock = threading.Lock()

    # -- text ---------------------------------------------------------------------------------
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.pipe, n, None) for n in self.text_encoder_names) if m is not None]

    @property
    def text_encoder_device(self) -> torch.device:
        encoders = self.text_encoders()
        return next(encoders[0].parameters()).device if encoders else self.device

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Embeddings of ``prompts`` on the backbone's device; each distinct string is encoded once.

        After :meth:`offload_text_encoder` a prompt missing from the cache is still encoded, on the
        CPU where the encoders now live (slow for UMT5-XXL): embed every prompt you will need
        (training and evaluation) before offloading.
        """
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts: expected at least one prompt, got an empty list")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}]: expected str, got {type(p).__name__}")
        with self._encode_lock, torch.no_grad():
            embeds = self.prompt_cache.get(list(prompts), self._encode_on_text_device)
        return embeds.to(self.device)

    def _encode_on_text_device(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self._text_encoders_offloaded:
            logger.warning("encoding %d new prompt(s) on the CPU: the text encoders were offloaded before these "
                           "prompts were cached (embed all prompts before offload_text_encoder())", len(prompts))
        return self._encode(prompts, self.text_encoder_device)

    @abc.abstractmethod
    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Batched conditioning tensors of ``prompts`` (not cached), computed on ``device``."""

    def offload_text_encoder(self) -> None:
        """Move the text encoders to the CPU and release their accelerator memory (DanceGRPO's practice:
        embeddings are computed once per prompt, so the encoders need not stay on the GPU)."""
        for enc in self.text_encoders():
            enc.to("cpu")
        self._text_encoders_offloaded = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- velocity -------------------------------------------------------------------------------
    def _check_velocity_inputs(self, latents: torch.Tensor, sigma, cond: PromptEmbeds,
                               uncond: PromptEmbeds | None, guidance_scale: float) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents: expected a torch.Tensor, got {type(latents).__name__}")
        if not latents.dtype.is_floating_point:
            raise TypeError(f"latents: expected a floating tensor, got dtype {latents.dtype}")
        want = 5 if self.is_video else 4
        if latents.dim() != want:
            layout = "[B, C, F, H, W]" if self.is_video else "[B, C, H, W]"
            raise ValueError(f"latents: expected {layout} ({want}-d) for {self.family}, got shape "
                             f"{tuple(latents.shape)}")
        batch = latents.shape[0]
        if not isinstance(cond, PromptEmbeds):
            raise TypeError(f"cond: expected PromptEmbeds (from encode_prompts), got {type(cond).__name__}")
        if cond.batch_size != batch:
            raise ValueError(f"cond: expected batch {batch} (the batch of latents), got {cond.batch_size}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale: expected a float, got {type(guidance_scale).__name__}")
        if uncond is not None:
            if not isinstance(uncond, PromptEmbeds):
                raise TypeError(f"uncond: expected PromptEmbeds or None, got {type(uncond).__name__}")
            if uncond.batch_size != batch:
                raise ValueError(f"uncond: expected batch {batch} (the batch of latents), got {uncond.batch_size}")
        elif guidance_scale != 1.0 and self._needs_uncond_for_cfg():
            raise ValueError(f"uncond: guidance_scale={guidance_scale} asks for classifier-free guidance, which "
                             f"needs the unconditional embeddings (e.g. encode_prompts(['']*B)); got None")
        return _check_sigma(sigma, batch, latents.device)

    def _needs_uncond_for_cfg(self) -> bool:
        return True

    def _guided(self, forward: Callable[[torch.Tensor, torch.Tensor, PromptEmbeds], torch.Tensor],
                latents: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                guidance_scale: float | torch.Tensor) -> torch.Tensor:
        """v, or v_u + g·(v_c − v_u) from ONE forward over [cond; uncond] (2B) when guiding.

        ``guidance_scale`` is a float or a per-sample ``[B]`` tensor. At g = 1 the guided velocity
        equals v_c exactly, so the uncond half is skipped.
        """
        if uncond is None or (not isinstance(guidance_scale, torch.Tensor) and guidance_scale == 1.0):
            return forward(latents, sigma, cond)
        both = forward(torch.cat([latents, latents]), torch.cat([sigma, sigma]), PromptEmbeds.cat([cond, uncond]))
        v_cond, v_uncond = both.chunk(2)
        if isinstance(guidance_scale, torch.Tensor):
            guidance_scale = guidance_scale.to(v_cond.device, v_cond.dtype).view(-1, *([1] * (v_cond.dim() - 1)))
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    # -- peft -------------------------------------------------------------------------------------
    def lora_target_modules(self) -> list[str]:
        """Suffixes from ``lora_candidates`` that name ``nn.Linear`` layers of the trainable transformer
        (peft matches ``target_modules`` entries as module-name suffixes)."""
        names = [n for n, m in self.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
        found = [c for c in self.lora_candidates if any(n == c or n.endswith("." + c) for n in names)]
        if not found:
            raise RuntimeError(f"{self.family}: none of the LoRA targets {list(self.lora_candidates)} is a Linear "
                               f"layer of {type(self.transformer).__name__}")
        return found

    # -- shared helpers ---------------------------------------------------------------------------
    def _freeze_frozen_parts(self, modules: Iterable[torch.nn.Module | None]) -> None:
        """Text encoders and VAEs never train here: eval mode (no dropout) and no gradients."""
        for m in modules:
            if m is not None:
                m.eval()
                m.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

BackboneFactory = Callable[..., Backbone]

_REGISTRY: dict[str, BackboneFactory] = {}
# families whose factory lives in a module that registers it when imported ("module:function" is
# resolved and registered here; a bare module name is imported and must register itself)
_LAZY: dict[str, str] = {
    "wan2.1": "otca_fast.models.wan:build_wan21",
    "wan2.2": "otca_fast.models.wan:build_wan22",
    "sd3": "otca_fast.models.sd3:build_sd3",
    "flux": "otca_fast.models.flux:build_flux",
    "shapes": "otca_fast.toy",
}


def register_backbone(family: str, factory: BackboneFactory, *, overwrite: bool = False) -> None:
    """Make ``build_backbone(family, ...)`` call ``factory(path=..., tiny=..., allow_download=...,
    dtype=..., device=..., attention_backend=..., **options)``.

    Registering the same factory again is a no-op; a different factory for a taken name needs
    ``overwrite=True``.
    """
    if not isinstance(family, str) or not family.strip():
        raise ValueError(f"family: expected a non-empty string, got {family!r}")
    if not callable(factory):
        raise TypeError(f"factory: expected a callable returning a Backbone, got {type(factory).__name__}")
    key = family.strip().lower()
    existing = _REGISTRY.get(key)
    if existing is not None and existing is not factory and not overwrite:
        raise ValueError(f"family: {key!r} is already registered (to {getattr(existing, '__qualname__', existing)});"
                         f" pass overwrite=True to replace it")
    _REGISTRY[key] = factory


def list_backbones() -> list[str]:
    """Registered and built-in family names."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def _factory_for(family: str) -> BackboneFactory:
    if family in _REGISTRY:
        return _REGISTRY[family]
    target = _LAZY.get(family)
    if target is None:
        raise ValueError(f"family: expected one of {list_backbones()} (or one added with register_backbone), "
                         f"got {family!r}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name and not module_name.startswith(f"{e.name}."):
            raise  # a dependency of that module is missing: let the real error through
        raise ValueError(f"family: {family!r} is provided by {module_name}, which is not installed") from e
    if attr:
        register_backbone(family, getattr(module, attr))
    if family not in _REGISTRY:
        raise ValueError(f"family: importing {module_name} did not register {family!r} "
                         f"(it should call otca_fast.models.register_backbone({family!r}, factory))")
    return _REGISTRY[family]


def build_backbone(family: str, *, path: str | None = None, tiny: dict | bool | None = None,
                   allow_download: bool = False, dtype: torch.dtype | str = torch.float32,
                   device: str | torch.device = "cpu", attention_backend: str | None = None,
                   **options: Any) -> Backbone:
    """Build the backbone of ``family`` from a local diffusers directory (``path``) or tiny from config.

    ``tiny=True`` (or a dict of per-component config overrides) builds the same diffusers classes
    with small random weights, for tests. ``path`` must be a local directory unless
    ``allow_download`` (then a Hub repo id works too). ``device`` is a torch device or ``"auto"``
    (CUDA when available, else the CPU), as ``run.device``. ``options`` are family-specific (see each
    ``build_*`` factory and docs/models.md).
    """
    if not isinstance(family, str):
        raise TypeError(f"family: expected a string such as 'wan2.1', got {type(family).__name__}")
    dtype = as_dtype("dtype", dtype)  # the YAML spellings ("bfloat16", "bf16", ...) work too
    if not isinstance(allow_download, bool):
        raise TypeError(f"allow_download: expected a bool, got {type(allow_download).__name__}")
    if tiny is not None and not isinstance(tiny, (bool, dict)):
        raise TypeError(f"tiny: expected a bool or a dict of overrides, got {type(tiny).__name__}")
    device = resolve_device(device, what="device")
    factory = _factory_for(family.strip().lower())
    backbone = factory(path=path, tiny=tiny, allow_download=allow_download, dtype=dtype, device=device,
                       attention_backend=attention_backend, **options)
    if not isinstance(backbone, Backbone):
        raise TypeError(f"the factory of {family!r} returned {type(backbone).__name__}, expected a Backbone")
    return backbone


class ImageBackbone(DiffusersBackbone):
    """Shared parts of the image families (SD3, FLUX): VAE decode, resolution-aware sigma schedules."""

    is_video = False
    decode_batch_size = 8

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resolution: tuple[int, int] | None = None  # the last (height, width) given to latent_shape

    @property
    def default_resolution(self) -> tuple[int, int]:
        side = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return side, side

    def _schedule_resolution(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Resolution for resolution-dependent shifts: explicit, else the last ``latent_shape`` call,
        else the pipeline's default size (1024² for SD3-medium and FLUX.1)."""
        if (height is None) != (width is None):
            raise ValueError(f"height/width: give both or neither, got height={height!r} width={width!r}")
        if height is not None:
            self._check_image_size(height, width)
            return height, width
        return self._resolution or self.default_resolution

    def _check_image_size(self, height: int, width: int) -> int:
        multiple = self.pipe.vae_scale_factor * self._patch_multiple()
        for name, v in (("height", height), ("width", width)):
            checks.positive_int(name, v)
            if v % multiple:
                raise ValueError(f"{name}: {self.family} needs a multiple of {multiple} (VAE "
                                 f"{self.pipe.vae_scale_factor}x times patch {self._patch_multiple()}), got {v}")
        return multiple

    @abc.abstractmethod
    def _patch_multiple(self) -> int:
        """Latent pixels per transformer token side (SD3: patch_size; FLUX: 2, its 2x2 packing)."""

    def _flow_sigmas(self, num_steps: int, *, sigmas: Any, image_seq_len: int, device) -> torch.Tensor:
        """Run the family's ``FlowMatchEulerDiscreteScheduler.set_timesteps`` as its pipeline does."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        checks.positive_int("num_steps", num_steps)
        cfg = self.scheduler.config
        kwargs: dict[str, Any] = {}
        if cfg.get("use_dynamic_shifting", False):
            # resolution-dependent shift: mu grows linearly in the number of image tokens
            kwargs["mu"] = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", 1.15))
        if sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas, device="cpu", **kwargs)
        else:
            self.scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
        out = self.scheduler.sigmas.to(device=device or self.device, dtype=torch.float32)
        if out.numel() != num_steps + 1:
            raise RuntimeError(f"scheduler returned {out.numel()} sigmas for {num_steps} steps")
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents: expected [B, C, H, W] {self.family} latents, got {got}")
        vae = self.pipe.vae
        if latents.shape[1] != vae.config.latent_channels:
            raise ValueError(f"latents: expected {vae.config.latent_channels} channels (the VAE's latent_channels), "
                             f"got {latents.shape[1]}")
        p = next(vae.parameters())
        shift = vae.config.shift_factor or 0.0
        images = []
        for chunk in latents.split(self.decode_batch_size):
            # the pipelines' latents are (z − shift)·scaling; undo it before the VAE decoder
            z = chunk.to(p.device, p.dtype) / vae.config.scaling_factor + shift
            image = vae.decode(z, return_dict=False)[0]
            images.append(self.pipe.image_processor.postprocess(image, output_type="pt").float())
        return torch.cat(images).unsqueeze(1).to(latents.device)
