"""Input checks shared by the layers: every failure is a ValueError that names the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ConvergenceWarning(UserWarning):
    """A forward solver stopped at its iteration limit before meeting its tolerance."""


class IllConditionedWarning(UserWarning):
    """A backward linear system was singular or indefinite for some samples."""


def check_tensor(
    x: object, name: str, ndims: Sequence[int] | None = None, min_ndim: int | None = None
) -> torch.Tensor:
    """A floating-point, finite tensor of an accepted rank."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if ndims is not None and x.dim() not in ndims:
        raise ValueError(
            f"{name} must have {' or '.join(str(d) for d in ndims)} dimensions, "
            f"got shape {tuple(x.shape)}"
        )
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    # min and max propagate NaN and expose +-inf: one read of x with no temporary, where
    # isfinite(x).all() writes a bool tensor and reads it again
    lo, hi = torch.aminmax(x.detach().reshape(-1))
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_finite_by(reduced: torch.Tensor, x: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` if x holds NaN or inf, given a sum-like reduction of x.

    NaN or inf anywhere in x makes such a reduction non-finite, so a finite one (which the
    caller computes anyway, e.g. a mean) proves x finite for free; only a non-finite one (NaN
    or inf in x, or a sum that overflowed) pays for the element-wise check.
    """
    if not math.isfinite(float(reduced.detach().sum())):
        check_tensor(x, name)


def check_positive(value: object, name: str) -> float:
    """A finite real number > 0 (a Python number, or a one-element tensor)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        v = float(value.detach())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)  # Python and NumPy numbers alike
    else:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return v


def check_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are solved in float32 and cast back."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Checks of a LayerOptions field (``option(check=...)``): each takes (value, name) and
# returns the validated value or raises a ValueError naming the option.


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def at_least(minimum: int) -> Callable[[object, str], int]:
    """An integer >= ``minimum``."""
    return lambda value, name: check_int(value, name, minimum)


def one_of(choices: Sequence[str]) -> Callable[[object, str], str]:
    return lambda value, name: check_choice(value, name, choices)


def or_none(check: Callable[[object, str], Any]) -> Callable[[object, str], Any]:
    """None (a default resolved at call time, e.g. per dtype), or a value passing ``check``."""
    return lambda value, name: None if value is None else check(value, name)
