"""Local-weights CLIP-family rewards: CLIP score, PickScore, HPS-style scorers, LAION aesthetic MLP.

No weights ship on PyPI for any of these, so every reward here loads from a local directory given in
its options (``path=``) and never downloads. The directory is a transformers ``CLIPModel`` checkpoint
(``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), for example a snapshot of
``openai/clip-vit-large-patch14`` or ``yuvalkirstain/PickScore_v1`` fetched once with
``huggingface-cli download <repo> --local-dir <dir>``. Tokenizer and preprocessing come from the same
directory when it has them (``tokenizer.json`` / ``vocab.json``, ``preprocessor_config.json``);
otherwise the bundled OpenAI CLIP BPE vocabulary (``assets/``, shared by OpenAI CLIP and OpenCLIP
ViT-H/L models) and the standard CLIP normalisation are used.

Images are preprocessed in torch on the model's device (no PIL round trip): resize of the short side
(bicubic, antialiased), centre crop, mean/std normalisation, as ``CLIPImageProcessor`` does. For video,
up to ``max_frames`` evenly spaced frames are scored and the scores averaged.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tempfile
import threading
import weakref
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from otca_fast.devices import DTYPES
from otca_fast.rewards._image import check_option, frame_index
from otca_fast.rewards.registry import RewardFn, check_frames, register_reward

__all__ = [
    "clip_tokenizer", "ClipEmbedder", "AestheticMLP", "load_aesthetic_head", "clip_score", "pickscore",
    "hps", "laion_aesthetic", "CLIP_MEAN", "CLIP_STD",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
_CLIP_VOCAB = 49408
_TEXT_CACHE_MAX = 4096


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable-unicode table (bytes that are not printable map above 255)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The OpenAI CLIP tokenizer (49,408 ids, 77 tokens), rebuilt offline from the bundled BPE file.

    ``clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]``.
    """
    from transformers import CLIPTokenizer

    raw = resources.files("otca_fast.rewards").joinpath("assets").joinpath(_BPE_FILE).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _BPE_SHA256:
        raise RuntimeError(f"otca_fast/rewards/assets/{_BPE_FILE} is corrupt: sha256 {digest}, "
                           f"expected {_BPE_SHA256}; reinstall otca_fast")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # CLIP's recipe: line 0 is a header; the next 49152 - 256 - 2 lines are the merges used.
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    # vocab.json + merges.txt through from_pretrained: the one constructor path that is the same in
    # transformers 4 and 5 (5 changed CLIPTokenizer(...) to take in-memory vocab/merges).
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                           encoding="utf-8")
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    if len(tok) != _CLIP_VOCAB:
        raise RuntimeError(f"rebuilt CLIP tokenizer has {len(tok)} ids, expected {_CLIP_VOCAB}")
    return tok


def _resolve_dtype(dtype: str | torch.dtype, reward: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"reward {reward!r}: option dtype: expected one of {list(DTYPES)}, got {dtype!r}")


def _check_model_dir(path: object, reward: str, option: str = "path") -> Path:
    expected = ("a local directory in transformers CLIPModel format (config.json + model.safetensors or "
                "pytorch_model.bin), e.g. fetched once with `huggingface-cli download "
                "openai/clip-vit-large-patch14 --local-dir <dir>`")
    if path is None:
        raise ValueError(f"reward {reward!r}: option {option} is required: {expected}")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"reward {reward!r}: option {option}: expected a str path, got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"reward {reward!r}: option {option}={str(path)!r} is not a directory; "
                                f"expected {expected}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"reward {reward!r}: {str(p)!r} has no config.json; expected {expected}")
    return p


@dataclass(frozen=True)
class _Preprocess:
    resize: tuple[str, int, int] | None   # ("short", s, 0) or ("exact", h, w)
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _size_of(value: object, what: str) -> tuple[str, int, int]:
    if isinstance(value, int):
        return ("short", value, 0)
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return ("short", int(value["shortest_edge"]), 0)
        if "height" in value and "width" in value:
            return ("exact", int(value["height"]), int(value["width"]))
    raise ValueError(f"preprocessor_config.json: {what}={value!r}: expected an int, "
                     f"{{'shortest_edge': n}} or {{'height': h, 'width': w}}")


def _read_preprocess(path: Path, image_size: int) -> _Preprocess:
    cfg_file = path / "preprocessor_config.json"
    if not cfg_file.is_file():
        # Every OpenAI CLIP / OpenCLIP checkpoint uses these: short side to the model's input size,
        # centre crop, the OpenAI mean/std.
        return _Preprocess(("short", image_size, 0), (image_size, image_size), CLIP_MEAN, CLIP_STD)
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    resize = _size_of(cfg.get("size", image_size), "size") if cfg.get("do_resize", True) else None
    crop = None
    if cfg.get("do_center_crop", True):
        kind, h, w = _size_of(cfg.get("crop_size", image_size), "crop_size")
        crop = (h, h) if kind == "short" else (h, w)
    mean, std = CLIP_MEAN, CLIP_STD
    if cfg.get("do_normalize", True):
        mean = tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN))
        std = tuple(float(v) for v in cfg.get("image_std", CLIP_STD))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if crop is not None and resize is not None:
        kind, a, b = resize
        smallest = a if kind == "short" else min(a, b)
        if min(crop) > smallest:
            raise ValueError(f"{cfg_file}: crop_size {crop} is larger than the resized image ({resize}); "
                             f"padding crops are not supported")
    return _Preprocess(resize, crop, mean, std)  # type: ignore[arg-type]


class _ClipCheckpoint:
    """One loaded local ``CLIPModel`` with its tokenizer, preprocessing and prompt-embedding cache.

    Shared by every reward built on the same (directory, dtype, device): ``clip_score`` and
    ``laion_aesthetic`` on one ViT-L/14 hold one copy of the weights, not two.
    """

    def __init__(self, p: Path, dtype: torch.dtype, fixed_device: torch.device | None, reward: str) -> None:
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        config = CLIPConfig.from_pretrained(str(p), local_files_only=True)
        if config.model_type != "clip":
            raise ValueError(f"reward {reward!r}: {str(p)!r} holds a {config.model_type!r} model; expected a "
                             f"transformers CLIPModel (model_type 'clip')")
        try:
            model = CLIPModel.from_pretrained(str(p), local_files_only=True)
        except OSError as exc:
            raise FileNotFoundError(f"reward {reward!r}: cannot load CLIPModel weights from {str(p)!r} "
                                    f"(expected model.safetensors or pytorch_model.bin): {exc}") from exc
        self.dtype = dtype
        self.model = model.eval().requires_grad_(False).to(dtype)
        self.fixed_device = fixed_device
        if fixed_device is not None:
            self.model.to(fixed_device)
        if any((p / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            self.tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        else:
            vocab = config.text_config.vocab_size
            if vocab != _CLIP_VOCAB:
                raise FileNotFoundError(
                    f"reward {reward!r}: {str(p)!r} has no tokenizer files and the model's text vocabulary "
                    f"({vocab} ids) is not CLIP's BPE ({_CLIP_VOCAB}); save the model's tokenizer there "
                    f"(tokenizer.save_pretrained)")
            self.tokenizer = clip_tokenizer()
        self.max_length = int(config.text_config.max_position_embeddings)
        self.projection_dim = int(config.projection_dim)
        self.preprocess = _read_preprocess(p, int(config.vision_config.image_size))
        self.logit_scale = float(self.model.logit_scale.detach().float().exp())
        self.text_cache: dict[str, torch.Tensor] = {}
        self.lock = threading.RLock()

    def place(self, tensor: torch.Tensor) -> torch.device:
        target = self.fixed_device or tensor.device
        if self.model.logit_scale.device != target:
            self.model.to(target)
            self.text_cache.clear()
        return target


_CHECKPOINTS: weakref.WeakValueDictionary[tuple, _ClipCheckpoint] = weakref.WeakValueDictionary()
_CHECKPOINTS_LOCK = threading.Lock()


class ClipEmbedder:
    """A local transformers ``CLIPModel`` with its tokenizer and torch-side image preprocessing.

    ``device=None`` follows the frames: the model moves (once) to the device of the frames it is given.
    Embedders on the same directory, dtype and device share one loaded model.
    """

    def __init__(self, path: str | Path, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype = "float32", batch_size: int = 32, reward: str = "clip") -> None:
        p = _check_model_dir(path, reward)
        check_option(batch_size, "batch_size", kind=int, lo=1, reward=reward)
        self.batch_size = batch_size
        resolved = _resolve_dtype(dtype, reward)
        fixed = None if device is None else torch.device(device)
        key = (str(p.resolve()), resolved, None if fixed is None else str(fixed))
        with _CHECKPOINTS_LOCK:
            checkpoint = _CHECKPOINTS.get(key)
            if checkpoint is None:
                checkpoint = _ClipCheckpoint(p, resolved, fixed, reward)
                _CHECKPOINTS[key] = checkpoint
        self.checkpoint = checkpoint

    @property
    def model(self):
        return self.checkpoint.model

    @property
    def preprocess(self) -> _Preprocess:
        return self.checkpoint.preprocess

    @property
    def logit_scale(self) -> float:
        return self.checkpoint.logit_scale

    @property
    def projection_dim(self) -> int:
        return self.checkpoint.projection_dim

    @property
    def device(self) -> torch.device:
        return self.checkpoint.model.logit_scale.device

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> normalised model input, as ``CLIPImageProcessor`` computes it."""
        x = images.float()
        pre = self.preprocess
        if pre.resize is not None:
            h, w = x.shape[-2:]
            kind, a, b = pre.resize
            if kind == "short":
                # transformers' shortest-edge rule: short side -> a, long side -> int(a · long / short)
                size = (a, int(a * w / h)) if h <= w else (int(a * h / w), a)
            else:
                size = (a, b)
            if size != (h, w):
                # PIL's bicubic filter is antialiased when downscaling; so is this. Clamp as 8-bit would.
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
                x = x.clamp(0.0, 1.0)
        if pre.crop is not None:
            ch, cw = pre.crop
            h, w = x.shape[-2:]
            if h < ch or w < cw:
                raise ValueError(f"frames of {h}x{w} pixels are smaller than the model's {ch}x{cw} crop and "
                                 f"preprocessor_config.json disables resizing")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        mean = x.new_tensor(pre.mean).view(1, 3, 1, 1)
        std = x.new_tensor(pre.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``[N, D]`` float32 of ``[N, 3, H, W]`` images in [0, 1]."""
        ck = self.checkpoint
        with ck.lock:
            device = ck.place(images)
            out = []
            for chunk in images.split(self.batch_size):
                px = self.pixel_values(chunk.to(device)).to(ck.dtype)
                pooled = ck.model.vision_model(pixel_values=px).pooler_output
                out.append(F.normalize(ck.model.visual_projection(pooled).float(), dim=-1))
            return torch.cat(out)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[P, D]`` float32 on the model's device; each distinct prompt is
        encoded once and cached (GRPO groups repeat every prompt G times; prompts recur across epochs)."""
        ck = self.checkpoint
        with ck.lock:
            device = self.device
            missing = list(dict.fromkeys(p for p in prompts if p not in ck.text_cache))
            for start in range(0, len(missing), self.batch_size):
                chunk = missing[start:start + self.batch_size]
                tokens = ck.tokenizer(chunk, padding=True, truncation=True, max_length=ck.max_length,
                                      return_tensors="pt").to(device)
                pooled = ck.model.text_model(input_ids=tokens["input_ids"],
                                             attention_mask=tokens["attention_mask"]).pooler_output
                emb = F.normalize(ck.model.text_projection(pooled).float(), dim=-1)
                if len(ck.text_cache) + len(chunk) > _TEXT_CACHE_MAX:
                    ck.text_cache.clear()
                ck.text_cache.update(zip(chunk, emb))
            return torch.stack([ck.text_cache[p] for p in prompts])


def _clip_like(reward: str, *, path: str | None, device: str | None, dtype: str, batch_size: int,
               max_frames: int, scale: float, use_logit_scale: bool) -> RewardFn:
    check_option(max_frames, "max_frames", kind=int, lo=1, reward=reward)
    check_option(scale, "scale", kind=(int, float), reward=reward)
    if not isinstance(use_logit_scale, bool):
        raise TypeError(f"reward {reward!r}: option use_logit_scale: expected a bool, "
                        f"got {use_logit_scale!r}")
    embedder = ClipEmbedder(path, device=device, dtype=dtype, batch_size=batch_size, reward=reward)
    # score = scale · τ · cos(image, text), τ = exp(logit_scale) (the model's own temperature, ~100)
    # or 1 (plain cosine, HPS v2 convention)
    multiplier = float(scale) * (embedder.logit_scale if use_logit_scale else 1.0)

    def fn(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        prompts = check_frames(frames, prompts)
        idx = frame_index(frames.shape[1], max_frames).to(frames.device)
        picked = frames.index_select(1, idx)                                  # [B, n, 3, H, W]
        b, n = picked.shape[:2]
        img = embedder.image_embeds(picked.flatten(0, 1)).view(b, n, -1)
        txt = embedder.text_embeds(prompts)                                   # [B, D]
        cos = torch.einsum("bnd,bd->bn", img, txt)
        return multiplier * cos.mean(dim=1)

    return fn


@register_reward("clip_score", role="alignment", cheap=False)
def clip_score(*, path: str | None = None, scale: float = 1.0 / 30.0, use_logit_scale: bool = True,
               max_frames: int = 8, device: str | None = None, dtype: str = "float32",
               batch_size: int = 32) -> RewardFn:
    """Text–image alignment ``scale · exp(logit_scale) · cos(E_img, E_txt)`` with a local CLIP
    (``path=``, e.g. openai/clip-vit-large-patch14). Defaults match Flow-GRPO's ``clipscore``
    (``logits_per_image / 30``)."""
    return _clip_like("clip_score", path=path, device=device, dtype=dtype, batch_size=batch_size,
                      max_frames=max_frames, scale=scale, use_logit_scale=use_logit_scale)


@register_reward("pickscore", role="quality", cheap=False)
def pickscore(*, path: str | None = None, scale: float = 1.0 / 26.0, use_logit_scale: bool = True,
              max_frames: int = 8, device: str | None = None, dtype: str = "float32",
              batch_size: int = 32) -> RewardFn:
    """PickScore (a CLIP-H fine-tuned on Pick-a-Pic preferences; ``path=`` a local snapshot of
    yuvalkirstain/PickScore_v1, tokenizer/preprocessing of laion/CLIP-ViT-H-14 or the bundled ones):
    ``scale · exp(logit_scale) · cos``, ``/26`` as in Flow-GRPO."""
    return _clip_like("pickscore", path=path, device=device, dtype=dtype, batch_size=batch_size,
                      max_frames=max_frames, scale=scale, use_logit_scale=use_logit_scale)


@register_reward("hps", role="quality", cheap=False)
def hps(*, path: str | None = None, scale: float = 1.0, use_logit_scale: bool = False, max_frames: int = 8,
        device: str | None = None, dtype: str = "float32", batch_size: int = 32) -> RewardFn:
    """HPS-style human-preference score: plain ``cos(E_img, E_txt)`` of a preference-tuned CLIP-H, as
    DanceGRPO computes HPS v2.1. ``path=`` must hold the scorer in transformers ``CLIPModel`` format
    (HPS v2 is distributed as an open_clip checkpoint and needs converting first)."""
    return _clip_like("hps", path=path, device=device, dtype=dtype, batch_size=batch_size,
                      max_frames=max_frames, scale=scale, use_logit_scale=use_logit_scale)


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head (christophschuhmann/improved-aesthetic-predictor).

    ``relu=False``: Linear(d,1024) Drop Linear(1024,128) Drop Linear(128,64) Drop Linear(64,16)
    Linear(16,1) — the published ``sac+logos+ava1-l14-linearMSE.pth``. ``relu=True``: the ReLU variant
    (a ReLU after each of the first four linears). Input: unit-norm CLIP image embeddings.
    """

    def __init__(self, input_size: int, relu: bool = False) -> None:
        super().__init__()
        dims = [input_size, 1024, 128, 64, 16]
        drops = [0.2, 0.2, 0.1, 0.0]
        layers: list[nn.Module] = []
        for i in range(4):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if relu:
                layers.append(nn.ReLU())
            if drops[i]:
                layers.append(nn.Dropout(drops[i]))
        layers.append(nn.Linear(16, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def load_aesthetic_head(head: str | Path, *, reward: str = "laion_aesthetic") -> AestheticMLP:
    """Load the LAION aesthetic MLP from a ``.pth``/``.pt`` state dict (``torch.load(weights_only=True)``)
    or a ``.safetensors`` file; the variant (with or without ReLU) is read off the layer indices."""
    if head is None:
        raise ValueError(f"reward {reward!r}: option head is required: the LAION aesthetic MLP weights, "
                         f"e.g. sac+logos+ava1-l14-linearMSE.pth from "
                         f"christophschuhmann/improved-aesthetic-predictor")
    if not isinstance(head, (str, Path)):
        raise TypeError(f"reward {reward!r}: option head: expected a str path, got {type(head).__name__}")
    p = Path(head).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"reward {reward!r}: option head={str(head)!r} is not a file; expected the "
                                f"LAION aesthetic MLP state dict (.pth, .pt or .safetensors)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or "layers.0.weight" not in state:
        raise ValueError(f"reward {reward!r}: {str(p)!r} is not a LAION aesthetic MLP state dict "
                         f"(expected keys layers.0.weight ... layers.N.bias)")
    relu = "layers.3.weight" in state   # linears at 0,3,6,9,11 with ReLUs; at 0,2,4,6,7 without
    mlp = AestheticMLP(int(state["layers.0.weight"].shape[1]), relu=relu)
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"reward {reward!r}: {str(p)!r} does not match the LAION aesthetic MLP "
                         f"(Linear(d,1024) ... Linear(16,1)): {exc}") from exc
    return mlp.eval().requires_grad_(False)


@register_reward("laion_aesthetic", role="quality", cheap=False)
def laion_aesthetic(*, path: str | None = None, head: str | None = None, max_frames: int = 8,
                    device: str | None = None, dtype: str = "float32", batch_size: int = 32) -> RewardFn:
    """LAION aesthetic score (about 1–10): the aesthetic MLP ``head=`` on the unit-norm image embedding
    of the CLIP at ``path=`` (ViT-L/14 for the published head), as DDPO and Flow-GRPO compute it."""
    check_option(max_frames, "max_frames", kind=int, lo=1, reward="laion_aesthetic")
    mlp = load_aesthetic_head(head)
    embedder = ClipEmbedder(path, device=device, dtype=dtype, batch_size=batch_size, reward="laion_aesthetic")
    dim = embedder.projection_dim
    if mlp.layers[0].in_features != dim:
        raise ValueError(f"reward 'laion_aesthetic': the head takes {mlp.layers[0].in_features}-d embeddings "
                         f"but the CLIP at {path!r} projects to {dim}-d (the published head needs ViT-L/14, "
                         f"768-d)")

    def fn(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_frames(frames, prompts)
        idx = frame_index(frames.shape[1], max_frames).to(frames.device)
        picked = frames.index_select(1, idx)
        b, n = picked.shape[:2]
        emb = embedder.image_embeds(picked.flatten(0, 1))
        head_mlp = mlp.to(emb.device)
        return head_mlp(emb).view(b, n).mean(dim=1)

    return fn
