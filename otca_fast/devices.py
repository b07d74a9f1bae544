"""Config names of dtypes and devices, resolved in one place."""

from __future__ import annotations

import torch

# the dtypes a config may name (model.dtype, sample.latent_dtype, ...)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# short spellings that build_backbone(dtype=...) also accepts
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_SPELLINGS: dict[str, torch.dtype] = {**DTYPES, **{alias: DTYPES[name] for alias, name in DTYPE_ALIASES.items()}}


def as_dtype(name: str, value: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from a dtype or its YAML spelling ("float32", "bf16", ...); ``name`` names the
    argument in the error."""
    if isinstance(value, str) and value.strip().lower() in _SPELLINGS:
        return _SPELLINGS[value.strip().lower()]
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    raise TypeError(f"{name}: expected a floating torch.dtype or one of {sorted(_SPELLINGS)}, got {value!r}")


def resolve_device(name: str | torch.device, *, what: str = "run.device",
                   error: type[ValueError] = ValueError) -> torch.device:
    """``auto`` (CUDA when available, else the CPU) or a torch device name; a clear ``error`` for a CUDA device on
    a machine without one. ``what`` names the argument in the error."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as e:
            raise error(f"{what}: expected auto, cpu, cuda or cuda:N, got {name!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise error(f"{what}: {str(name)!r} but no CUDA device is available (use 'auto' or 'cpu')")
    return device
