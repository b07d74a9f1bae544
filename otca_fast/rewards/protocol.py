"""The reward server's wire format, shared by the server (:mod:`otca_fast.rewards.serve`) and its client
(the ``remote`` reward, :mod:`otca_fast.rewards.remote`).

Nothing is ever unpickled: frames travel as a safetensors file (raw little-endian tensor bytes after a
JSON header), everything else as JSON.

**Request** ``POST /score``, ``Content-Type: application/x-otca-frames+safetensors``, the body a
safetensors file holding exactly one tensor, ``frames`` ``[B, F, 3, H, W]``:

* ``uint8``: ``round(255·x)``, the 8-bit frames a user would save (4x smaller than float32, and what
  the weight-free metrics compute on anyway);
* ``float16`` / ``float32``: the float frames in [0, 1] as they are (float32 scores exactly as in process).

and its metadata (string values, JSON-encoded): ``prompts`` (a list of B strings) and ``rewards`` (the
served names to score, a non-empty list without repeats).

**Answer** ``200`` with ``{"results": {name: result}}``, one result per requested reward:

* ``{"scores": [B floats]}`` (a reward);
* ``{"parts": {part: [B floats]}}`` (a multi-part metric, e.g. ``shapes_exam``);
* ``{"error": {"type": ..., "message": ..., "index": i or null, "prompt": ... or null}}`` (the reward
  raised or returned a non-finite or malformed score; ``index`` is the failing sample when one is to blame).

Malformed requests get a 4xx with ``{"error": message}``; ``GET /health`` answers with what is served.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from otca_fast import checks

__all__ = ["PROTOCOL", "CONTENT_TYPE", "FRAME_DTYPES", "ProtocolError", "ScoreRequest", "encode_request",
           "decode_request", "encode_result", "encode_failure", "decode_result", "slice_result"]

PROTOCOL = 1
CONTENT_TYPE = "application/x-otca-frames+safetensors"
FRAME_DTYPES: dict[str, torch.dtype] = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
# A safetensors header holds one tensor's entry and the prompts: 16 MiB leaves room for thousands of long
# prompts and stops a forged length from asking for gigabytes.
_MAX_HEADER_BYTES = 16 * 2**20
# decoders end with clamp(x / 2 + 0.5, 0, 1); half-precision round-off may step just outside (as in registry)
_RANGE_TOL = 1e-3


class ProtocolError(ValueError):
    """A request or an answer that does not follow the wire format; the message says what is wrong."""


@dataclass
class ScoreRequest:
    """A decoded request: float32 frames in [0, 1] on the CPU, their prompts, the rewards to score."""

    frames: torch.Tensor
    prompts: list[str]
    rewards: list[str]
    wire_dtype: str


def encode_request(frames: torch.Tensor, prompts: Sequence[str], rewards: Sequence[str], *,
                   frames_dtype: str = "uint8") -> bytes:
    """The body of a ``POST /score``: ``frames`` ``[B, F, 3, H, W]`` float in [0, 1] as ``frames_dtype``."""
    from safetensors.torch import save

    from otca_fast.rewards._image import quantize

    checks.choice("frames_dtype", frames_dtype, list(FRAME_DTYPES))
    if frames_dtype == "uint8":
        wire = quantize(frames)
    else:
        wire = frames.detach().to(FRAME_DTYPES[frames_dtype])
    metadata = {"prompts": json.dumps(list(prompts)), "rewards": json.dumps(list(rewards))}
    return save({"frames": wire.cpu().contiguous()}, metadata=metadata)


def _json_list_of_str(metadata: Mapping[str, str], key: str) -> list[str]:
    if key not in metadata:
        raise ProtocolError(f"metadata: expected a {key!r} entry (a JSON list of strings), got keys {sorted(metadata)}")
    try:
        value = json.loads(metadata[key])
    except (TypeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"metadata[{key!r}]: expected a JSON list of strings, got invalid JSON ({e})") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"metadata[{key!r}]: expected a JSON list of strings, got {type(value).__name__}")
    return value


def decode_request(body: bytes) -> ScoreRequest:
    """Parse and validate a ``POST /score`` body; :class:`ProtocolError` says what is wrong."""
    from safetensors.torch import load

    if len(body) < 8:
        raise ProtocolError(f"body: expected a safetensors file (an 8-byte header length, a JSON header, the "
                            f"tensor bytes), got {len(body)} bytes")
    size = int.from_bytes(body[:8], "little")
    if size > min(len(body) - 8, _MAX_HEADER_BYTES):
        raise ProtocolError(f"body: the safetensors header claims {size} bytes; the body has {len(body) - 8} after "
                            f"the length (at most {_MAX_HEADER_BYTES} allowed)")
    try:
        header = json.loads(body[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"body: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"body: the safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ProtocolError("body: __metadata__ of the safetensors header must be an object of strings")
    names = sorted(k for k in header if k != "__metadata__")
    if names != ["frames"]:
        raise ProtocolError(f"body: expected exactly one tensor named 'frames', got {names}")
    try:
        frames = load(body)["frames"]
    except Exception as e:  # noqa: BLE001 - safetensors' own error type; any failure is a malformed body
        raise ProtocolError(f"body: not a valid safetensors file ({e})") from None
    wire_dtype = next((k for k, v in FRAME_DTYPES.items() if v == frames.dtype), None)
    if wire_dtype is None:
        raise ProtocolError(f"frames: expected dtype {' | '.join(FRAME_DTYPES)}, got {frames.dtype}")
    if frames.ndim != 5 or frames.shape[2] != 3 or min(frames.shape) == 0:
        raise ProtocolError(f"frames: expected shape [B, F, 3, H, W] with no empty dimension, got "
                            f"{list(frames.shape)}")
    prompts = _json_list_of_str(metadata, "prompts")
    if len(prompts) != frames.shape[0]:
        raise ProtocolError(f"prompts: expected {frames.shape[0]} (one per clip of frames), got {len(prompts)}")
    rewards = _json_list_of_str(metadata, "rewards")
    if not rewards or len(set(rewards)) != len(rewards):
        raise ProtocolError(f"rewards: expected a non-empty list of distinct names, got {rewards}")
    if wire_dtype == "uint8":
        frames = frames.float() / 255.0
    else:
        frames = frames.float()
        lo, hi = (float(v) for v in torch.aminmax(frames))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ProtocolError("frames: contain NaN or Inf")
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ProtocolError(f"frames: expected values in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return ScoreRequest(frames=frames, prompts=prompts, rewards=rewards, wire_dtype=wire_dtype)


def encode_result(name: str, values: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A result from :func:`otca_fast.rewards.score_metrics` of one reward (``{name: [B]}``, or
    ``{name/part: [B], name: headline}`` for a multi-part metric)."""
    parts = {key.split("/", 1)[1]: value.tolist() for key, value in values.items() if key.startswith(name + "/")}
    if parts:
        return {"parts": parts}
    return {"scores": values[name].tolist()}


def encode_failure(error) -> dict[str, Any]:
    """A result from a :class:`otca_fast.rewards.RewardError` raised on the server."""
    return {"error": {"type": type(error.cause).__name__, "message": str(error.cause), "index": error.index,
                      "prompt": error.prompt}}


def slice_result(result: dict[str, Any], rows: slice) -> dict[str, Any]:
    """The rows ``rows`` of a successful result (the server splits a batch merged from several requests)."""
    if "scores" in result:
        return {"scores": result["scores"][rows]}
    return {"parts": {part: values[rows] for part, values in result["parts"].items()}}


def _scores(values: Any, batch: int, what: str) -> torch.Tensor:
    if not isinstance(values, list) or len(values) != batch or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ProtocolError(f"{what}: expected a list of {batch} numbers")
    return torch.tensor(values, dtype=torch.float64)


def decode_result(result: Any, batch: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """A result as the raw output of a reward: ``[B]`` float64 scores or ``{part: [B]}``. A server-side
    failure is returned as a :class:`otca_fast.rewards.RewardCallError` (raise it) with the failing sample."""
    from otca_fast.rewards.registry import RewardCallError

    if not isinstance(result, dict) or len(result) != 1 or next(iter(result)) not in ("scores", "parts", "error"):
        raise ProtocolError(f"result: expected one of 'scores', 'parts', 'error', got {str(result)[:200]}")
    if "scores" in result:
        return _scores(result["scores"], batch, "scores")
    if "parts" in result:
        parts = result["parts"]
        if not isinstance(parts, dict) or not parts:
            raise ProtocolError("parts: expected a non-empty object {part: [B numbers]}")
        return {str(part): _scores(values, batch, f"parts[{part!r}]") for part, values in parts.items()}
    error = result["error"]
    if not isinstance(error, dict):
        raise ProtocolError("error: expected an object {type, message, index, prompt}")
    index = error.get("index")
    index = index if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < batch else None
    return RewardCallError(f"{error.get('type', 'Error')}: {error.get('message', '')}", index)
