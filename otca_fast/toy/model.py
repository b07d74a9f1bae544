"""The shapes base model: a tiny diffusers ``WanTransformer3DModel`` in pixel space + its text encoder.

Why pixel space: no trained tiny video VAE exists offline (none ships on PyPI), training one would eat the
pretraining budget, and a VAE's blur would sit between the generator and the pixel rewards. A 9x32x32 RGB
clip is only 27,648 numbers; with patch (3, 4, 4) it is 3x8x8 = 192 tokens of 144 values, which a
four-layer, 128-wide transformer trains on in about 0.4 CPU-seconds per batch of 16 (one core).
``decode`` is then the affine map [-1, 1] → [0, 1].

Flow-matching convention (shared with every backbone, so ``otca_fast.ops.sde_step`` drives it):
x_t = (1 − σ)·x0 + σ·ε, v = ε − x0, σ from 1 (noise) to 0 (data), timestep = 1000·σ (diffusers'
``FlowMatchEulerDiscreteScheduler`` scale, which Wan's sinusoidal time embedding was built for).

Why x-prediction: the transformer outputs the clean clip x̂0 and :meth:`ShapesModel.velocity` returns
v = (x_t − x̂0)/σ. A pixel-space transformer with large patches (144 values per token here) that must
output v has to carry the token's full-dimensional noise through its width; one that outputs x̂0 only has
to produce a point on the (low-dimensional) data manifold (Li & He, "Back to Basics: Let Denoising
Generative Models Denoise", 2025, "JiT"). A velocity model narrower than a patch kept visible noise in
every sample (see the check in ``ShapesModel``); with x-prediction the width may sit below the patch.
The input also carries x, y, t coordinate planes (:func:`coordinate_planes`): RoPE alone gave the model
no absolute position to place and move the object by.

Files (``assets/`` by default): ``shapes_base.safetensors`` (keys ``transformer.*`` and ``text_encoder.*``),
``shapes_base.json`` (architecture, schedule and how the weights were made) and ``tokenizer.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import UMT5EncoderModel

from otca_fast import checks, ops
from otca_fast.models.base import DiffusersBackbone, PromptEmbeds, set_attention_backend
from otca_fast.toy.text import (
    DEFAULT_TEXT_ENCODER,
    build_text_encoder,
    build_tokenizer,
    encode_text,
    load_tokenizer,
    tokenize,
)
from otca_fast.toy.world import WorldConfig

__all__ = [
    "ASSETS_DIR", "WEIGHTS_FILE", "META_FILE", "TOKENIZER_FILE", "DEFAULT_TRANSFORMER", "PREDICTIONS",
    "SIGMA_FLOOR", "COORDINATE_CHANNELS", "coordinate_planes", "ShapesModel",
    "shifted_sigmas", "frames_to_latents", "latents_to_frames", "ShapesBackbone", "build_shapes_backbone",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
WEIGHTS_FILE = "shapes_base.safetensors"
META_FILE = "shapes_base.json"
TOKENIZER_FILE = "tokenizer.json"

# 4 blocks of width 128 (4 heads x 32) over patches of 3 frames x 4 x 4 pixels x RGB = 144 values: 3x8x8 =
# 192 tokens for a 9x32x32 clip. A width below the patch volume is fine because the transformer predicts
# x0 (a point on the data manifold); a *velocity*-predicting model of this width left visible noise in
# every sample, since noise outside the output projection's range can never be predicted (see
# ShapesModel). rope_max_seq_len bounds the frame / row / column count after patching.
DEFAULT_TRANSFORMER: dict = {
    "patch_size": (3, 4, 4), "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 6,
    "out_channels": 3, "text_dim": DEFAULT_TEXT_ENCODER["d_model"], "freq_dim": 64, "ffn_dim": 256,
    "num_layers": 4, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
    "rope_max_seq_len": 32,
}
TIMESTEP_SCALE = 1000.0
PREDICTIONS = ("x0", "velocity")
COORDINATE_CHANNELS = 3
SIGMA_FLOOR = 0.05


def shifted_sigmas(num_steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """``[num_steps + 1]`` sigmas from 1 to 0: σ' = shift·σ / (1 + (shift − 1)·σ) on a uniform grid (SD3)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive int, got {num_steps!r}")
    if shift <= 0:
        raise ValueError(f"shift: expected > 0, got {shift}")
    sigma = torch.linspace(1.0, 0.0, num_steps + 1, device=device)
    return shift * sigma / (1 + (shift - 1) * sigma)


def coordinate_planes(latents: torch.Tensor) -> torch.Tensor:
    """``[B, 3, F, H, W]`` planes holding each pixel's x, y and frame index, scaled to [-1, 1].

    Wan's only positional signal is RoPE, which is relative: a token cannot tell where in the frame, or in
    which frame, it sits, except from boundary effects a model needs a long training to exploit. Appended
    to the input (``in_channels`` = 3 + 3), these planes give every token its absolute position; without
    them the base model drew pieces of the object all over the frame and never moved them.
    """
    b, _, f, h, w = latents.shape

    def axis(n: int) -> torch.Tensor:
        return torch.linspace(-1.0, 1.0, n, device=latents.device, dtype=latents.dtype) if n > 1 else \
            torch.zeros(1, device=latents.device, dtype=latents.dtype)

    t, y, x = torch.meshgrid(axis(f), axis(h), axis(w), indexing="ij")
    return torch.stack([x, y, t]).unsqueeze(0).expand(b, -1, -1, -1, -1)


def frames_to_latents(frames: torch.Tensor) -> torch.Tensor:
    """Frames ``[B, F, 3, H, W]`` in [0, 1] → latents ``[B, 3, F, H, W]`` in [-1, 1] (Wan's layout)."""
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames: expected [B, F, 3, H, W], got {tuple(frames.shape)}")
    return frames.permute(0, 2, 1, 3, 4) * 2 - 1


def latents_to_frames(latents: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, 3, F, H, W]`` → frames ``[B, F, 3, H, W]`` float32 in [0, 1] (clamped)."""
    if latents.dim() != 5 or latents.shape[1] != 3:
        raise ValueError(f"latents: expected [B, 3, F, H, W], got {tuple(latents.shape)}")
    return ((latents.float() + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()


class ShapesModel(torch.nn.Module):
    """Text encoder + Wan transformer of the shapes world (see the module docstring)."""

    def __init__(self, transformer: WanTransformer3DModel, text_encoder: UMT5EncoderModel, tokenizer: Tokenizer,
                 *, world: WorldConfig | None = None, shift: float = 1.0, max_sequence_length: int = 16,
                 prediction: str = "x0", meta: dict | None = None) -> None:
        super().__init__()
        if not isinstance(transformer, WanTransformer3DModel):
            raise TypeError(f"transformer: expected a WanTransformer3DModel, got {type(transformer).__name__}")
        if transformer.config.in_channels != 3 + COORDINATE_CHANNELS or transformer.config.out_channels != 3:
            raise ValueError(f"transformer: expected in_channels = {3 + COORDINATE_CHANNELS} (RGB + x, y, t "
                             f"coordinate planes) and out_channels = 3 (RGB), got "
                             f"{transformer.config.in_channels}/{transformer.config.out_channels}")
        if transformer.config.text_dim != text_encoder.config.d_model:
            raise ValueError(f"transformer.text_dim ({transformer.config.text_dim}) must equal the text "
                             f"encoder's d_model ({text_encoder.config.d_model})")
        if tokenizer.get_vocab_size() != text_encoder.config.vocab_size:
            raise ValueError(f"tokenizer: vocabulary of {tokenizer.get_vocab_size()} tokens does not match the "
                             f"text encoder's vocab_size {text_encoder.config.vocab_size}")
        if shift <= 0:
            raise ValueError(f"shift: expected > 0, got {shift}")
        checks.choice("prediction", prediction, list(PREDICTIONS))
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        patch_values = 3 * math.prod(transformer.config.patch_size)
        if prediction == "velocity" and width < patch_values:
            # v = W·h + b with W [patch_values, width]: noise outside W's range can never be predicted
            raise ValueError(f"transformer: width {width} (heads x head dim) is below the {patch_values} values of a "
                             f"patch {tuple(transformer.config.patch_size)} x 3 channels; a velocity-predicting "
                             f"model would leave unremovable noise. Use prediction='x0', more heads or a smaller "
                             f"patch")
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.world = world or WorldConfig()
        self.shift = float(shift)
        self.prediction = prediction
        self.max_sequence_length = int(max_sequence_length)
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ construction / files
    @classmethod
    def from_config(cls, *, transformer: dict | None = None, text_encoder: dict | None = None,
                    world: WorldConfig | None = None, shift: float = 1.0, max_sequence_length: int = 16,
                    prediction: str = "x0", seed: int | None = None) -> ShapesModel:
        """Randomly initialised model (``transformer`` / ``text_encoder`` override the default fields)."""
        if seed is not None:
            torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        encoder = build_text_encoder(tokenizer.get_vocab_size(), **(text_encoder or {}))
        fields = {**DEFAULT_TRANSFORMER, "text_dim": encoder.config.d_model, **(transformer or {})}
        return cls(WanTransformer3DModel(**fields), encoder, tokenizer, world=world, shift=shift,
                   max_sequence_length=max_sequence_length, prediction=prediction)

    @classmethod
    def load(cls, directory: str | os.PathLike | None = None, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> ShapesModel:
        """Load the weights in ``directory`` (default: the ones shipped in the package). Offline."""
        root = Path(directory) if directory is not None else ASSETS_DIR
        missing = [name for name in (WEIGHTS_FILE, META_FILE, TOKENIZER_FILE) if not (root / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"directory {str(root)!r}: expected {WEIGHTS_FILE}, {META_FILE} and {TOKENIZER_FILE} "
                f"(written by `python -m otca_fast.toy.pretrain --out DIR`), missing {missing}")
        meta = json.loads((root / META_FILE).read_text())
        tokenizer = load_tokenizer((root / TOKENIZER_FILE).read_text())
        arch = meta["architecture"]
        encoder = build_text_encoder(tokenizer.get_vocab_size(), **arch["text_encoder"])
        transformer_fields = dict(arch["transformer"])
        transformer_fields["patch_size"] = tuple(transformer_fields["patch_size"])
        transformer = WanTransformer3DModel(**transformer_fields)
        state = load_file(str(root / WEIGHTS_FILE))
        for prefix, module in (("transformer.", transformer), ("text_encoder.", encoder)):
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            result = module.load_state_dict(part, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(f"{root / WEIGHTS_FILE}: {prefix[:-1]} weights do not match the architecture in "
                                 f"{META_FILE}: missing {result.missing_keys[:5]}, "
                                 f"unexpected {result.unexpected_keys[:5]}")
        world = WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["world"].items()})
        model = cls(transformer, encoder, tokenizer, world=world, shift=meta["schedule"]["shift"],
                    max_sequence_length=arch["max_sequence_length"], prediction=meta["schedule"]["prediction"],
                    meta=meta)
        return model.to(device=device, dtype=dtype).eval()

    def architecture(self) -> dict:
        transformer = dict(self.transformer.config)
        keep = set(DEFAULT_TRANSFORMER) | {"image_dim", "added_kv_proj_dim", "pos_embed_seq_len"}
        transformer = {k: (list(v) if isinstance(v, tuple) else v) for k, v in transformer.items() if k in keep}
        text = {k: getattr(self.text_encoder.config, k) for k in DEFAULT_TEXT_ENCODER}
        return {"transformer": transformer, "text_encoder": text, "max_sequence_length": self.max_sequence_length}

    def save(self, directory: str | os.PathLike, meta: dict | None = None) -> Path:
        """Write the three files into ``directory`` (each to a temporary name, then renamed)."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        state = {}
        for prefix, module in (("transformer.", self.transformer), ("text_encoder.", self.text_encoder)):
            # clone: the T5 encoder ties `shared` and `encoder.embed_tokens`, and safetensors refuses
            # tensors that share storage
            state.update({prefix + k: v.detach().to("cpu", torch.float32).clone().contiguous()
                          for k, v in module.state_dict().items()})
        full_meta = {**self.meta, **(meta or {}), "architecture": self.architecture(),
                     "world": {k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in vars(self.world).items()},
                     "schedule": {"shift": self.shift, "timestep_scale": TIMESTEP_SCALE,
                                  "prediction": self.prediction, "sigma_floor": SIGMA_FLOOR}}
        files = {
            WEIGHTS_FILE: lambda p: save_file(state, p, metadata={"format": "pt", "family": "shapes"}),
            META_FILE: lambda p: Path(p).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n"),
            TOKENIZER_FILE: lambda p: Path(p).write_text(self.tokenizer.to_str()),
        }
        for name, write in files.items():
            tmp = root / (name + ".tmp")
            write(str(tmp))
            os.replace(tmp, root / name)
        self.meta = full_meta
        return root

    # ------------------------------------------------------------------ conditioning
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, max_sequence_length, text_dim]`` embeddings (differentiable through the text encoder)."""
        ids, mask = tokenize(self.tokenizer, prompts, self.max_sequence_length, self.device)
        return encode_text(self.text_encoder, ids, mask).to(self.dtype)

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, int, int, int]:
        h = self.world.height if height is None else height
        w = self.world.width if width is None else width
        f = self.world.frames if num_frames is None else num_frames
        pt, ph, pw = self.transformer.config.patch_size
        for name, value, patch in (("num_frames", f, pt), ("height", h, ph), ("width", w, pw)):
            if not isinstance(value, int) or value < 1 or value % patch:
                raise ValueError(f"{name}: expected a positive multiple of the patch size {patch}, got {value!r}")
        rope = self.transformer.config.rope_max_seq_len
        if max(f // pt, h // ph, w // pw) > rope:
            raise ValueError(f"height/width/num_frames: at most {rope} patches per axis (rope_max_seq_len), got "
                             f"{(f // pt, h // ph, w // pw)}")
        return (3, f, h, w)

    # ------------------------------------------------------------------ denoising
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, *,
                 transformer: torch.nn.Module | None = None) -> torch.Tensor:
        """Predicted v = ε − x0 for ``latents`` ``[B, 3, F, H, W]`` at noise level ``sigma`` ``[B]``.

        With ``prediction="x0"`` the transformer outputs the clean clip x̂0 and v = (x_t − x̂0) / max(σ, 0.05)
        (x_t = x0 + σ·v); with ``"velocity"`` it outputs v itself.
        """
        net = self.transformer if transformer is None else transformer
        sigma = sigma.to(device=latents.device, dtype=torch.float32)
        inputs = torch.cat([latents, coordinate_planes(latents)], dim=1)
        out = net(hidden_states=inputs, timestep=sigma * TIMESTEP_SCALE,
                  encoder_hidden_states=embeds.to(latents.dtype), return_dict=False)[0]
        if self.prediction == "velocity":
            return out
        # the floor keeps the division finite at the last steps (JiT clips 1 − t the same way)
        scale = sigma.clamp_min(SIGMA_FLOOR).view(-1, *([1] * (latents.dim() - 1)))
        return ((latents.float() - out.float()) / scale).to(latents.dtype)

    def guided_velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                        uncond: torch.Tensor | None = None, guidance_scale: float = 1.0, *,
                        transformer: torch.nn.Module | None = None) -> torch.Tensor:
        """Classifier-free guidance v_u + g·(v_c − v_u), cond and uncond in one batched forward."""
        if guidance_scale == 1.0 or uncond is None:
            return self.velocity(latents, sigma, cond, transformer=transformer)
        both = self.velocity(torch.cat([latents, latents]), torch.cat([sigma, sigma]),
                             torch.cat([cond, uncond.expand_as(cond)]), transformer=transformer)
        v_cond, v_uncond = both.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def sigmas(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        return shifted_sigmas(num_steps, self.shift, device=device)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], *, num_steps: int = 20, guidance_scale: float = 1.0,
               generator: torch.Generator | None = None, dynamics: str = "ode", noise_level: float = 0.7,
               num_frames: int | None = None, height: int | None = None, width: int | None = None,
               return_latents: bool = False) -> torch.Tensor:
        """Generate clips ``[B, F, 3, H, W]`` in [0, 1] (or the final latents) with ``ops.sde_step``."""
        prompts = list(prompts)
        shape = self.latent_shape(height, width, num_frames)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""]) if guidance_scale != 1.0 else None
        latents = torch.randn((len(prompts), *shape), generator=generator, device=self.device).to(self.dtype)
        sigmas = self.sigmas(num_steps, device=self.device)
        for i in range(num_steps):
            sigma = sigmas[i].expand(len(prompts))
            v = self.guided_velocity(latents, sigma, cond, uncond, guidance_scale)
            latents = ops.sde_step(latents, v, float(sigmas[i]), float(sigmas[i + 1]), dynamics=dynamics,
                                   noise_level=noise_level, generator=generator,
                                   sigma_max=float(sigmas[1]))[0]
        return latents if return_latents else latents_to_frames(latents)


# ---------------------------------------------------------------------------------------------
# the "shapes" Backbone (otca_fast.models interface)
# ---------------------------------------------------------------------------------------------

class ShapesBackbone(DiffusersBackbone):
    """:class:`ShapesModel` behind the trainer's :class:`~otca_fast.models.Backbone` interface.

    Latents are pixel clips ``[3, F, H, W]`` in [-1, 1]; ``decode`` maps them to frames in [0, 1]. The text
    encoder is frozen (it was trained with the transformer during pretraining; RL fine-tunes the
    transformer only), and each prompt is encoded once into the prompt cache.
    """

    family = "shapes"
    is_video = True
    # peft suffixes: self- and cross-attention projections and both feed-forward layers of every block
    lora_candidates = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")

    def __init__(self, model: ShapesModel, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 cache_device: str | torch.device | None = None, attention_backend: str | None = None,
                 allow_download: bool = False) -> None:
        if not isinstance(model, ShapesModel):
            raise TypeError(f"model: expected a ShapesModel, got {type(model).__name__}")
        super().__init__(device=device, dtype=dtype, cache_device=cache_device, allow_download=allow_download)
        self.model = model.to(device=self.device, dtype=dtype)
        self.pipe = self.model          # DiffusersBackbone finds the text encoder as pipe.text_encoder
        self.transformer = self.model.transformer
        self._freeze_frozen_parts([self.model.text_encoder])
        set_attention_backend([self.transformer], attention_backend, allow_download=allow_download)

    @property
    def world(self) -> WorldConfig:
        return self.model.world

    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        ids, mask = tokenize(self.model.tokenizer, prompts, self.model.max_sequence_length, device)
        embeds = encode_text(self.model.text_encoder, ids, mask)
        return {"encoder_hidden_states": embeds.to(self.dtype)}

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, *,
                 guidance_scale: float = 1.0, uncond: PromptEmbeds | None = None,
                 transformer: torch.nn.Module | None = None) -> torch.Tensor:
        sigma = self._check_velocity_inputs(latents, sigma, cond, uncond, guidance_scale)
        if latents.shape[1] != 3:
            raise ValueError(f"latents: expected 3 channels (RGB pixels) for shapes, got shape {tuple(latents.shape)}")

        def forward(x: torch.Tensor, s: torch.Tensor, c: PromptEmbeds) -> torch.Tensor:
            return self.model.velocity(x, s, c.tensors["encoder_hidden_states"], transformer=transformer)

        return self._guided(forward, latents, sigma, cond, uncond, guidance_scale)

    def latent_shape(self, height: int, width: int, num_frames: int = 1) -> tuple[int, ...]:
        return self.model.latent_shape(height, width, num_frames)

    def sigmas(self, num_steps: int, device: str | torch.device | None = None) -> torch.Tensor:
        return self.model.sigmas(num_steps, device=device).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents_to_frames(latents)


def build_shapes_backbone(*, path: str | os.PathLike | None = None, tiny: dict | bool | None = None,
                          allow_download: bool = False, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu", attention_backend: str | None = None,
                          cache_device: str | torch.device | None = None, seed: int = 0) -> ShapesBackbone:
    """The ``build_backbone("shapes", ...)`` factory.

    * neither ``path`` nor ``tiny``: the pretrained weights shipped in the package (offline);
    * ``path``: a directory written by ``python -m otca_fast.toy.pretrain --out DIR``;
    * ``tiny``: the same architecture with random weights (``True``, or a dict with ``transformer`` /
      ``text_encoder`` config overrides), seeded by ``seed``, for tests.

    ``allow_download`` is accepted for interface symmetry: nothing here is ever downloaded.
    """
    has_tiny = tiny not in (None, False)
    if path is not None and has_tiny:
        raise ValueError(f"shapes: give either path (a pretrained directory) or tiny (random weights), not both "
                         f"(got path={str(path)!r} and tiny={tiny!r})")
    if has_tiny:
        overrides = {} if tiny is True else tiny
        if not isinstance(overrides, dict):
            raise TypeError(f"tiny: expected true or a dict of overrides, got {tiny!r}")
        unknown = set(overrides) - {"transformer", "text_encoder"}
        if unknown:
            raise ValueError(f"tiny: unknown keys {sorted(unknown)} for family 'shapes'; expected some of "
                             f"['text_encoder', 'transformer']")
        generator_state = torch.random.get_rng_state()
        model = ShapesModel.from_config(transformer=overrides.get("transformer"),
                                        text_encoder=overrides.get("text_encoder"), seed=seed)
        torch.random.set_rng_state(generator_state)
    else:
        model = ShapesModel.load(path)
    return ShapesBackbone(model.eval(), device=device, dtype=dtype, cache_device=cache_device,
                          attention_backend=attention_backend, allow_download=allow_download)
