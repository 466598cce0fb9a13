"""SIREN: selective entropy regularization (Rethinking Entropy Regularization in Large Reasoning Models,
arXiv 2509.25133; official code github.com/Linn3a/siren, verl/verl/workers/actor/dp_actor.py).

    loss = L_PG + beta * (H_sel - A)^2

1. H_p[i, t]: entropy of each position's top-p nucleus, renormalized (``stats.top_p_entropy``; exclusive boundary,
   top_k = 10000, p = 0.8, temperature already applied to the logits).
2. Peak mask: per response, tau_i = q-quantile (linear interpolation) of the row's valid H_p; selected
   M = (H_p > tau_i) & valid (strict >).
3. H_sel = (1/B) sum_i [sum_t M H_p / sum_t M]; a row with no selected token contributes 0 and still counts in B.
4. A: the anchor, measured once with the initial policy at the first training step (no gradient), kept in an
   :class:`~rlvr_entropy.controllers.Anchor` that is saved with checkpoints.

PG part as in the official runs: PPO clip 0.2/0.2, dual-clip 3, seq-mean-token-sum-norm over the maximum response
length 3072.

Deviations from the paper / official code:
- The anchor is part of ``state_dict()`` and survives a resume (the official code measures it again).
- The official runs sum size-weighted squared deviations over micro-batches; here H_sel and the penalty are computed
  per call (per micro-batch), so the regularizer depends on the micro-batch split (documented, not hidden). Call
  :meth:`Siren.prepare` with the whole rollout batch to measure the anchor on it, as the paper does.
- Top-p entropy leaves out the 1e-12 terms of the official renormalization (see ``stats.top_p_entropy``).
- Ablations as options: ``use_anchor=False`` (loss = L_PG - beta H_sel), ``use_top_p=False`` (full entropy),
  ``use_peak_mask=False`` (every valid token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy import stats
from rlvr_entropy.controllers.anchor import Anchor
from rlvr_entropy.core.batch import TokenBatch
from rlvr_entropy.core.validation import (as_bool_mask, check_finite_where, check_float, check_int, check_shape,
                                          check_tensor)
from rlvr_entropy.methods.base import Method, PGConfig, register_method


def _check_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    check_tensor("entropy", entropy)
    if entropy.dim() != 2:
        raise ValueError(f"entropy must have shape [B, T], got {list(entropy.shape)}")
    mask = as_bool_mask("mask", mask)
    check_shape("mask", mask, tuple(entropy.shape), "same as entropy")
    check_finite_where("entropy", entropy, mask)
    check_float("quantile", quantile, lo=0.0, hi=1.0)
    return mask


def peak_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float = 0.8) -> torch.Tensor:
    """SIREN's per-response peak-entropy positions (siren.md section 2). entropy [B, T], mask bool [B, T] ->
    bool [B, T]: valid positions whose value is strictly above the row's ``quantile`` (linear interpolation over the
    row's valid values, like torch.nanquantile). Rows with all-equal values or no valid token select nothing."""
    mask = _check_entropy_mask(entropy, mask, quantile)
    with torch.no_grad():
        e = entropy.detach().to(torch.float64 if entropy.dtype == torch.float64 else torch.float32)
        vals = torch.where(mask, e, torch.full_like(e, float("nan")))
        tau = torch.nanquantile(vals, float(quantile), dim=-1, keepdim=True, interpolation="linear")  # [B, 1]
        return (e > tau) & mask  # NaN tau (empty row) compares False


def _row_mean_over(values: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i mean of values over sel in row i (0 for rows with no selection). [B, T] -> 0-dim."""
    z = torch.where(sel, values, torch.zeros((), dtype=values.dtype, device=values.device))
    cnt = sel.sum(-1)
    row = z.sum(-1) / cnt.clamp(min=1).to(values.dtype)
    return row.mean() if row.numel() else values.sum() * 0


def selected_entropy(entropy: torch.Tensor, mask: torch.Tensor, quantile: float = 0.8) -> torch.Tensor:
    """H_sel (siren.md section 3): seq-mean-token-mean of ``entropy`` over :func:`peak_entropy_mask`; a row with no
    selected token contributes 0 but counts in B. Differentiable w.r.t. entropy. [B, T] -> 0-dim."""
    sel = peak_entropy_mask(entropy, mask, quantile)
    return _row_mean_over(entropy, sel)


@dataclass(frozen=True)
class SirenConfig(PGConfig):
    """SIREN (arXiv 2509.25133); PG defaults are the official runs' (siren.md section 5)."""

    dual_clip: float | None = 3.0
    """Dual-clip c for A < 0 (official runs: 3)."""
    loss_agg_mode: str = "seq-mean-token-sum-norm"
    """Official runs: seq-mean-token-sum-norm over the maximum response length."""
    norm_length: int | None = 3072
    """Maximum response length of the official runs (the divisor of seq-mean-token-sum-norm)."""
    beta: float = 0.005
    """Penalty coefficient beta of (H_sel - A)^2 (paper: 0.005, no schedule)."""
    top_p: float = 0.8
    """Nucleus p of the top-p entropy (paper: 0.8)."""
    top_k: int | None = 10000
    """Only the top-k logits are considered for the nucleus (official code: 10000; None = all)."""
    inclusive: bool = False
    """False: the token crossing p is excluded (official code); True: textbook nucleus."""
    quantile: float = 0.8
    """Per-response quantile of the peak-entropy mask (paper: 0.8, i.e. the top 20% positions)."""
    anchor_value: float | None = None
    """Anchor A; None measures it at the first step with the initial policy (paper)."""
    use_anchor: bool = True
    """Ablation: False gives the plain selective bonus -beta * H_sel."""
    use_top_p: bool = True
    """Ablation: False uses the full-vocabulary entropy."""
    use_peak_mask: bool = True
    """Ablation: False regularizes every valid position."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("beta", self.beta, lo=0.0)
        check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        check_int("top_k", self.top_k, lo=1, allow_none=True)
        check_float("quantile", self.quantile, lo=0.0, hi=1.0)
        if self.anchor_value is not None:
            check_float("anchor_value", self.anchor_value, lo=0.0)
        for f in ("inclusive", "use_anchor", "use_top_p", "use_peak_mask"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f} must be a bool, got {getattr(self, f)!r}")


@register_method
class Siren(Method):
    name = "siren"
    Config = SirenConfig
    needs = ("logits",)

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.anchor = Anchor(self.config.anchor_value)

    def controllers(self):
        return {"anchor": self.anchor}

    @classmethod
    def neutral_overrides(cls):
        return {"beta": 0.0}

    def position_entropy(self, batch: TokenBatch) -> torch.Tensor:
        """H_p [B, T] (0 at padding), with gradient to the logits."""
        c = self.config
        logits = batch.require("logits", self.name)
        if c.use_top_p:
            h = stats.top_p_entropy(logits, p=c.top_p, top_k=c.top_k, inclusive=c.inclusive, mask=batch.mask)
        else:
            h = stats.entropy(logits, mask=batch.mask)
        return batch.clean(h)

    def selection(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return peak_entropy_mask(h.detach(), mask, self.config.quantile) if self.config.use_peak_mask else mask

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> float | None:
        """Measure the anchor on a whole rollout batch (before micro-batching), if it is not set yet."""
        if self.anchor.is_set or not bool(batch.mask.any()):
            return self.anchor.value
        h = self.position_entropy(batch)
        return self.anchor.set_if_unset(float(_row_mean_over(h, self.selection(h, batch.mask))))

    def _loss(self, batch, *, new_step):
        c = self.config
        terms = self.pg_terms(batch)
        pg = self.aggregate(terms.loss, batch.mask)
        h = self.position_entropy(batch)
        sel = self.selection(h, batch.mask)
        h_sel = _row_mean_over(h, sel)
        if c.use_anchor:
            if not self.anchor.is_set and bool(batch.mask.any()):
                self.anchor.set(float(h_sel.detach()))
            if self.anchor.is_set:
                reg = c.beta * (h_sel - self.anchor.value) ** 2
            else:
                reg = h_sel * 0.0
        else:
            reg = -c.beta * h_sel
        loss = pg + reg
        with torch.no_grad():
            from rlvr_entropy.core.aggregation import masked_mean

            metrics = self.pg_metrics(terms, batch)
            metrics.update({
                "selected_entropy": h_sel.detach(),
                "anchor": float(self.anchor.value) if self.anchor.is_set else float("nan"),
                "reg": reg.detach(),
                "selected_frac": masked_mean(sel.float(), batch.mask),
                "top_p_entropy": masked_mean(h.detach(), batch.mask),
            })
        return loss, metrics
