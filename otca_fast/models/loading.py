"""Local checkpoint checks: is ``model.path`` a complete diffusers directory of the right family?

Nothing is downloaded at run time unless ``model.allow_download: true``. Before any
``from_pretrained`` the directory is checked against the family's expected layout, and a wrong or
incomplete path gets one ``ValueError`` that lists what is missing, the layout expected and the
command that fetches the checkpoint. The build-source helpers every family shares live here too:
:func:`check_build_source` (a checkpoint path or a tiny build, exactly one) and :func:`merge_tiny`
(the tiny build spec).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from otca_fast.devices import as_dtype

__all__ = ["CheckpointLayout", "LAYOUTS", "layout_for", "check_checkpoint_dir", "resolve_checkpoint",
           "from_pretrained_kwargs", "pipeline_dtype_kwargs", "check_build_source", "merge_tiny"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json", "tokenizer_config.json", "vocab.txt")


@dataclass(frozen=True)
class CheckpointLayout:
    """What a family's diffusers directory holds and where to get one."""

    family: str
    title: str
    pipeline_classes: tuple[str, ...]   # accepted model_index.json "_class_name" values
    components: tuple[str, ...]          # subfolders that must exist
    repos: tuple[str, ...]               # Hub repo ids of compatible checkpoints (first = suggested)
    gated: bool = False                  # the Hub asks you to accept a licence first

    def describe(self, path: str | Path) -> str:
        """The expected layout and how to obtain it, for error messages and the docs."""
        lines = [f"Expected a {self.title} checkpoint in diffusers format:", f"  {path}/model_index.json"]
        for c in self.components:
            kind = _component_kind(c)
            what = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer files (tokenizer.json, "
                    "spiece.model or vocab.json)"}.get(kind, "config.json + weights (*.safetensors)")
            lines.append(f"  {path}/{c}/  {what}")
        repo = self.repos[0]
        lines.append("Get it with (huggingface_hub >= 1.0; older releases spell it `huggingface-cli download`):")
        lines.append(f"  hf download {repo} --local-dir {path}")
        if len(self.repos) > 1:
            lines.append(f"  (compatible: {', '.join(self.repos[1:])})")
        if self.gated:
            lines.append(f"  {repo} is gated: accept its licence on huggingface.co and run `hf auth login` first.")
        lines.append("or set model.allow_download: true to let diffusers fetch a Hub repo id given as model.path.")
        return "\n".join(lines)


LAYOUTS: dict[str, CheckpointLayout] = {
    "wan2.1": CheckpointLayout(
        "wan2.1", "Wan2.1 text-to-video", ("WanPipeline",),
        ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
        ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers")),
    "wan2.2": CheckpointLayout(
        "wan2.2", "Wan2.2 text-to-video (A14B: two experts)", ("WanPipeline",),
        ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler"),
        ("Wan-AI/Wan2.2-T2V-A14B-Diffusers",)),
    "sd3": CheckpointLayout(
        "sd3", "Stable Diffusion 3 / 3.5", ("StableDiffusion3Pipeline",),
        ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
         "tokenizer_3", "scheduler"),
        ("stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large",
         "stabilityai/stable-diffusion-3-medium-diffusers"), gated=True),
    "flux": CheckpointLayout(
        "flux", "FLUX.1", ("FluxPipeline",),
        ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
        ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"), gated=True),
}


def layout_for(family: str) -> CheckpointLayout:
    try:
        return LAYOUTS[family]
    except KeyError:
        raise ValueError(f"family: no checkpoint layout known for {family!r}; expected one of {sorted(LAYOUTS)}") \
            from None


def _component_kind(name: str) -> str:
    if name.startswith("tokenizer"):
        return "tokenizer"
    if name.startswith("scheduler"):
        return "scheduler"
    return "model"


def _component_problem(folder: Path, name: str) -> str | None:
    """Why ``folder`` is not a usable component ``name`` (None when it looks complete)."""
    if not folder.is_dir():
        return f"missing {name}/"
    files = [p.name for p in folder.iterdir() if p.is_file()]
    kind = _component_kind(name)
    if kind == "scheduler":
        return None if "scheduler_config.json" in files else f"{name}/ has no scheduler_config.json"
    if kind == "tokenizer":
        return None if any(f in files for f in _TOKENIZER_FILES) else \
            f"{name}/ has no tokenizer files ({', '.join(_TOKENIZER_FILES)})"
    if "config.json" not in files:
        return f"{name}/ has no config.json"
    if not any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
        return f"{name}/ has no weights (*.safetensors); the download may be incomplete"
    index_files = [f for f in files if f.endswith(".index.json")]
    for index_name in index_files:
        try:
            shards = set(json.loads((folder / index_name).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{name}/{index_name} is not a readable shard index"
        absent = sorted(s for s in shards if s not in files)
        if absent:
            return f"{name}/ misses weight shards {absent[:3]}{' ...' if len(absent) > 3 else ''} " \
                   f"(incomplete download)"
    return None


def check_checkpoint_dir(path: str | Path, family: str) -> tuple[Path, dict[str, Any]]:
    """``(resolved path, model_index)`` of a complete ``family`` checkpoint directory, else ``ValueError``."""
    layout = layout_for(family)
    if not isinstance(path, (str, Path)):
        raise TypeError(f"model.path: expected a directory path (str), got {type(path).__name__}")
    p = Path(path).expanduser()
    problems: list[str] = []
    hints: list[str] = []
    index: dict[str, Any] = {}
    if not p.exists():
        problems.append("the directory does not exist")
    elif not p.is_dir():
        problems.append("it is a file, not a directory")
    else:
        index_file = p / "model_index.json"
        if not index_file.is_file():
            problems.append("missing model_index.json")
            if (p / "config.json").is_file() and (p.parent / "model_index.json").is_file():
                hints.append(f"{p} looks like one component of a pipeline; point model.path at its parent "
                             f"{p.parent}")
            if any(p.glob("Wan2.1_VAE.pth")) or any(p.glob("models_t5_umt5-xxl-enc-*.pth")):
                hints.append("this is the original Wan release, not the diffusers format: download the "
                             "'-Diffusers' repo instead")
        else:
            try:
                index = json.loads(index_file.read_text())
                if not isinstance(index, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                problems.append(f"model_index.json is not readable JSON ({e})")
                index = {}
            cls = index.get("_class_name")
            if index and cls not in layout.pipeline_classes:
                problems.append(f"model_index.json names pipeline {cls!r}, expected "
                                f"{' or '.join(layout.pipeline_classes)}")
                other = [f for f, lay in LAYOUTS.items() if cls in lay.pipeline_classes and f != family]
                if other:
                    hints.append(f"this looks like a {'/'.join(other)} checkpoint: set model.family accordingly")
        wrong_pipeline = bool(index) and index.get("_class_name") not in layout.pipeline_classes
        listed = [k for k, v in index.items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None]
        # another family's checkpoint: its missing components would only bury the real problem
        for name in () if wrong_pipeline else dict.fromkeys((*layout.components, *listed)):
            if name == "transformer_2" and "transformer_2" in index and _is_null(index["transformer_2"]):
                continue  # single-expert Wan2.2 (TI2V-5B): model_index.json declares no second transformer
            problem = _component_problem(p / name, name)
            if problem:
                problems.append(problem)
        if family == "wan2.1" and not _is_null(index.get("transformer_2")):
            problems.append("model_index.json lists transformer_2: this is a Wan2.2 two-expert checkpoint, "
                            "use model.family: wan2.2")
    if problems:
        bullet = "\n".join(f"  - {x}" for x in problems + hints)
        raise ValueError(f"model.path {str(path)!r} is not a usable {layout.title} checkpoint:\n{bullet}\n"
                         f"{layout.describe(p)}")
    return p.resolve(), index


def _is_null(entry: Any) -> bool:
    return entry is None or (isinstance(entry, list) and all(x is None for x in entry))


def _looks_like_repo_id(path: str | Path) -> bool:
    s = str(path)
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and all(s.split("/"))


def resolve_checkpoint(path: str | Path | None, family: str, *, allow_download: bool) -> tuple[str, dict[str, Any]]:
    """What to hand ``from_pretrained``: a checked local directory, or (``allow_download``) a Hub repo id.

    Returns ``(path or repo id, model_index)`` (the index is empty for a repo id: diffusers reads it
    after the download).
    """
    layout = layout_for(family)
    if path is None:
        raise ValueError(f"model.path: expected a local {layout.title} directory, got None\n{layout.describe('<dir>')}")
    p = Path(str(path)).expanduser()
    if not p.exists() and allow_download and _looks_like_repo_id(path):
        return str(path), {}
    local, index = check_checkpoint_dir(p, family)
    return str(local), index


def from_pretrained_kwargs(*, allow_download: bool) -> dict[str, Any]:
    """Keywords that keep ``from_pretrained`` off the network unless downloads are allowed."""
    return {"local_files_only": not allow_download}


def pipeline_dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """The dtype keyword of ``DiffusionPipeline.from_pretrained``: newer diffusers renamed ``torch_dtype``
    to ``dtype`` (and warn on the old name); older releases only know ``torch_dtype``."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def merge_tiny(defaults: dict[str, Any], tiny: bool | dict | None, *, family: str) -> dict[str, Any]:
    """The tiny build spec: ``defaults`` with ``tiny``'s overrides (one level deep for dict entries)."""
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()}
    if tiny is True:
        return spec
    if not isinstance(tiny, dict):
        raise TypeError(f"tiny: expected true or a dict of overrides, got {tiny!r}")
    for key, value in tiny.items():
        if key not in spec:
            raise ValueError(f"tiny: unknown key {key!r} for family {family!r}; expected some of {sorted(spec)}")
        if isinstance(spec[key], dict):
            if not isinstance(value, dict):
                raise TypeError(f"tiny.{key}: expected a dict of config overrides, got {type(value).__name__}")
            spec[key].update(value)
        else:
            spec[key] = value
    return spec


def check_build_source(family: str, path: Any, tiny: Any) -> None:
    """Exactly one of ``path`` (a checkpoint) and ``tiny`` (random weights) must be given."""
    has_tiny = tiny not in (None, False)
    if path is not None and has_tiny:
        raise ValueError(f"{family}: give either path (a local checkpoint) or tiny (random weights), not both "
                         f"(got path={str(path)!r} and tiny={tiny!r})")
    if path is None and not has_tiny:
        raise ValueError(f"{family}: give path= (a local diffusers directory) or tiny=True (random weights for "
                         f"tests).\n{layout_for(family).describe('<dir>')}")


def load_image_pipeline(family: str, pipeline_class: str, *, path: str | None, tiny: dict | bool | None,
                        allow_download: bool, dtype: torch.dtype, vae_dtype: torch.dtype | str,
                        device: str | torch.device, tiny_defaults: dict[str, Any], tiny_pipe: Callable[..., Any],
                        default_max_sequence_length: int, max_sequence_length: int | None):
    """The shared build of the SD3 and FLUX adapters: a tiny pipeline from config, or the checkpoint's.

    Returns ``(pipe on device, max_sequence_length, device)``. The VAE is loaded in
    ``vae_dtype`` (float32 by default: decoding in bf16 visibly bands), the rest in ``dtype``.
    """
    check_build_source(family, path, tiny)
    vae_dtype = as_dtype("vae_dtype", vae_dtype)
    device = torch.device(device)
    if tiny not in (None, False):
        spec = merge_tiny(tiny_defaults, tiny, family=family)
        pipe = tiny_pipe(spec, dtype=dtype, vae_dtype=vae_dtype)
        max_len = spec["max_sequence_length"] if max_sequence_length is None else max_sequence_length
    else:
        import diffusers

        src, _ = resolve_checkpoint(path, family, allow_download=allow_download)
        kw = from_pretrained_kwargs(allow_download=allow_download)
        vae = diffusers.AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=vae_dtype, **kw)
        pipe = getattr(diffusers, pipeline_class).from_pretrained(src, vae=vae, **pipeline_dtype_kwargs(dtype), **kw)
        max_len = default_max_sequence_length if max_sequence_length is None else max_sequence_length
    pipe.to(device)
    return pipe, max_len, device
