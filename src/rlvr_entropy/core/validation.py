"""Input checks shared by the core. Every failure is a ValueError that names the offending argument."""
from __future__ import annotations

from typing import Iterable

import torch


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_shape(name: str, x: torch.Tensor, shape: tuple[int, ...], what: str = "") -> None:
    if tuple(x.shape) != tuple(shape):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {list(shape)}{hint}, got {list(x.shape)}")


def check_finite_where(name: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Raise if ``x`` holds NaN or inf where ``mask`` is True (mask broadcasts over trailing dims)."""
    with torch.no_grad():
        bad = ~torch.isfinite(x)
        if mask is not None:
            m = mask
            while m.dim() < bad.dim():
                m = m.unsqueeze(-1)
            bad = bad & m
        if bool(bad.any()):
            n = int(bad.sum())
            raise ValueError(f"{name} has {n} non-finite value(s) (NaN or inf) at valid (unmasked) positions")


def as_bool_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    check_tensor(name, mask)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must be boolean (or hold only 0 and 1)")
        return mask != 0
    raise ValueError(f"{name} must be a bool tensor, got dtype {mask.dtype}")


def check_float(name: str, value: object, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Range check for a config value; ``lo_open``/``hi_open`` exclude the bound."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    ok = True
    if lo is not None:
        ok &= v > lo if lo_open else v >= lo
    if hi is not None:
        ok &= v < hi if hi_open else v <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ValueError(f"{name} must be in {left}{lo_s}, {hi_s}{right}, got {value!r}")


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_int(name: str, value: object, *, lo: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
