"""Argument checks shared by the package: every error names the argument, the expected and the actual value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def float_tensor(name: str, value: Any, *, dim: int | None = None,
                 min_dim: int | None = None) -> torch.Tensor:
    """``value`` as-is after checking it is a floating tensor with the expected number of dims."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-d tensor, got shape {tuple(value.shape)}")
    if min_dim is not None and value.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(value.shape)}")
    return value


def non_empty_list_of(name: str, items: Any, cls: type) -> list:
    """``items`` as a list, after checking it holds at least one item and only instances of ``cls``."""
    items = list(items)
    if not items:
        raise ValueError(f"{name}: expected at least one {cls.__name__}, got an empty sequence")
    for i, item in enumerate(items):
        if not isinstance(item, cls):
            raise TypeError(f"{name}[{i}]: expected a {cls.__name__}, got {type(item).__name__}")
    return items


def raise_if_not_finite(name: str, value: torch.Tensor, what: str = "index") -> None:
    """A clear error at the first non-finite entry (its full index, as a tensor would be indexed: ``1`` or
    ``(1, 2)``), nothing when all are finite."""
    bad = ~torch.isfinite(value)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: expected finite values, got {float(value[idx])} at {what} "
                         f"{idx[0] if len(idx) == 1 else idx}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference math and the credit are computed in: float32 whatever the input dtype
    (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def choice(name: str, value: Any, options: Sequence[Any]) -> None:
    """``value`` must be one of ``options`` (the message shows them as given: a tuple or a list)."""
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")


def finite_number(name: str, value: Any) -> float:
    """``value`` as a float; a TypeError for a bool, a non-number, NaN or Inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def positive(name: str, value: Any) -> float:
    """A finite number > 0 (as a float)."""
    number = finite_number(name, value)
    if not number > 0:
        raise ValueError(f"{name}: expected a value > 0, got {value!r}")
    return number


def unit_interval(name: str, value: Any) -> float:
    """A finite number in [0, 1] (as a float)."""
    number = finite_number(name, value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name}: expected a value in [0, 1], got {value!r}")
    return number


def fraction(name: str, value: Any) -> float:
    """A finite number in (0, 1] (as a float)."""
    number = finite_number(name, value)
    if not 0.0 < number <= 1.0:
        raise ValueError(f"{name}: expected a value in (0, 1], got {value!r}")
    return number


def integer(name: str, value: Any, *, minimum: int) -> int:
    """An int (not a bool) >= ``minimum``: a TypeError for a non-int, a ValueError below the minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def int_at_least(name: str, value: Any, minimum: int) -> int:
    """An int (not a bool) >= ``minimum``, with one ValueError for a non-int and for a small one alike."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def positive_int(name: str, value: Any) -> int:
    """An int (not a bool) >= 1; a ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def boolean(name: str, value: Any) -> bool:
    """A bool (not merely truthy); a TypeError otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value
