"""Shared pixel helpers for the reward families (internal)."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

_cache_lock = threading.Lock()
_cache: dict[str, object] = {}


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``[B, F, 3, H, W]`` float in [0, 1] -> ``[B, F, H, W, 3]`` uint8 RGB on the CPU (read-only).

    Rounds as image writers do (``round(255·x)``), so the metrics defined on 8-bit images (DDPO's JPEG
    size, VBench's flicker, OpenCV's Laplacian and colour conversions) see the integers they would read
    back from a saved file. CUDA frames are quantised on the GPU and copied as bytes (4x less traffic).

    The last conversion is memoised on the tensor's identity and in-place version counter, so several
    weight-free rewards scoring the same batch convert it once; the array is read-only for that reason.
    """
    try:
        version = frames._version
    except RuntimeError:   # inference-mode tensors have no version counter: do not memoise them
        version = None
    if version is not None:
        with _cache_lock:
            ref = _cache.get("ref")
            if ref is not None and ref() is frames and _cache.get("version") == version:
                return _cache["array"]  # type: ignore[return-value]
    array = quantize(frames).permute(0, 1, 3, 4, 2).contiguous().cpu().numpy()
    array.setflags(write=False)
    if version is not None:
        with _cache_lock:
            # A weak reference: the cache never keeps a batch of frames alive on its own.
            _cache.update(ref=weakref.ref(frames), version=version, array=array)
    return array


def quantize(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [0, 1] as uint8 ``round(255·x)`` (clamped), same shape and device."""
    # float32 first: bf16/fp16 cannot hold x·255 to the nearest integer (8/11-bit mantissas).
    return frames.detach().float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def frame_index(num_frames: int, max_frames: int) -> torch.Tensor:
    """Up to ``max_frames`` evenly spaced frame indices, first and last included."""
    n = min(num_frames, max_frames)
    return torch.linspace(0, num_frames - 1, n).round().long().unique()


def check_option(value: object, name: str, *, kind: type | tuple[type, ...], lo: float | None = None,
                 hi: float | None = None, allow_none: bool = False, reward: str) -> None:
    """Validate a numeric factory option; errors name the reward, the option, expected vs got."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TypeError(f"reward {reward!r}: option {name}: expected {names}"
                        f"{' or None' if allow_none else ''}, got {value!r}")
    if not np.isfinite(float(value)):
        raise ValueError(f"reward {reward!r}: option {name}: expected a finite number, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"reward {reward!r}: option {name}: expected >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"reward {reward!r}: option {name}: expected <= {hi}, got {value!r}")


def per_frame(pixels: np.ndarray, stat) -> torch.Tensor:
    """Apply ``stat(frame [H, W, 3] uint8) -> float`` to every frame of ``[B, F, H, W, 3]``; return the
    per-clip mean over frames, ``[B]`` float64."""
    b, f = pixels.shape[:2]
    values = np.empty((b, f), dtype=np.float64)
    for i in range(b):
        for j in range(f):
            values[i, j] = stat(pixels[i, j])
    return torch.from_numpy(values.mean(axis=1))
