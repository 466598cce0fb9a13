"""Masked reductions and loss aggregation modes.

Aggregation modes follow verl's ``agg_loss`` (verl/trainer/ppo/core_algos.py), with one deliberate difference:
a batch with no valid token aggregates to exactly 0 (verl divides 0 by 0 in "token-mean").

Shapes: loss_mat [B, T], mask bool [B, T].
"""
from __future__ import annotations

from typing import Literal

import torch

AggMode = Literal["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of ``x`` where ``mask``; masked entries never contribute (NaN there is ignored, gradient 0)."""
    z = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return z.sum() if dim is None else z.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; 0 (not NaN) where nothing is valid."""
    s = masked_sum(x, mask, dim)
    n = mask.sum() if dim is None else mask.sum(dim)
    return s / n.clamp(min=1).to(s.dtype)


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
             norm_length: int | None = None) -> torch.Tensor:
    """Aggregate a per-token loss [B, T] into a scalar.

    - "token-mean": sum over valid tokens / number of valid tokens.
    - "token-sum": sum over valid tokens.
    - "seq-mean-token-mean": mean over non-empty rows of each row's token mean.
    - "seq-mean-token-sum": mean over non-empty rows of each row's token sum.
    - "seq-mean-token-sum-norm": "seq-mean-token-sum" divided by ``norm_length`` (Dr. GRPO; SIREN uses the
      maximum response length). ``None`` uses T, as verl does; then the loss depends on padding.
    Rows with no valid token are excluded from the row mean, as in verl.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {list(AGG_MODES)}, got {mode!r}")
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if mode == "token-sum":
        return masked_sum(loss_mat, mask)
    counts = mask.sum(-1)
    nonempty = counts > 0
    row_sum = masked_sum(loss_mat, mask, dim=-1)
    if mode == "seq-mean-token-mean":
        row = row_sum / counts.clamp(min=1).to(row_sum.dtype)
    else:
        row = row_sum
    out = masked_sum(row, nonempty) / nonempty.sum().clamp(min=1).to(row.dtype)
    if mode == "seq-mean-token-sum-norm":
        out = out / float(norm_length if norm_length is not None else loss_mat.shape[-1])
    return out
