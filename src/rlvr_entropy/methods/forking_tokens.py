"""Forking tokens (Wang et al., "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement
Learning for LLM Reasoning", arXiv 2506.01939): the policy gradient only on the high-entropy tokens.

    tau  = q-quantile of {H_t : t valid}             (linear interpolation, like torch.quantile)
    keep = valid & (H_t >= tau)
    L    = agg(keep_t * l_t)                          (agg over ALL valid tokens: denominators unchanged)

with l_t the PPO/GRPO token loss and q = 0.8 (the top 20% of tokens by entropy).

Scopes:
- "batch" (the paper; TRL 1.16's ``top_entropy_quantile``): tau over the batch's valid tokens, or over every rank's
  when ``Method.gather_fn`` is set (TRL gathers across processes). Semantics follow TRL's
  ``GRPOTrainer.get_high_entropy_mask``: tau = torch.quantile(values, q) with linear interpolation, keep H >= tau
  (ties at tau are kept), and the masked-out tokens still count in the aggregation's denominators (TRL multiplies
  the per-token loss by the mask and normalizes with the completion mask). TRL's ``top_entropy_quantile = p``
  (the share kept) is ``quantile = 1 - p`` here.
- "response" (the SIREN repository's baseline): tau per response, over that response's valid tokens.

H_t comes from ``TokenBatch.current_entropy`` (detached; no gradient flows through the selection).

Deviations from the paper / official code: for float64 entropies the quantile is computed in float64 (TRL rounds
the values to float32 first), so a token equal to tau up to float32 rounding can be decided differently; float32
and half-precision entropies give TRL's mask exactly (tested against ``get_high_entropy_mask``). The quantile is
computed with a sort instead of torch.quantile (same arithmetic, tested equal), so there is no limit on the number
of tokens (torch.quantile refuses more than 2^24 values, which a gathered batch can exceed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_choice, check_float
from rlvr_entropy.methods.base import GatherFn, Method, PGConfig, register_method

SCOPES = ("batch", "response")


def linear_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) of 1-D ``values`` [n], n >= 1 -> 0-dim, via a sort.

    rank = q (n - 1) in the values' dtype; result = lerp(sorted[floor(rank)], sorted[ceil(rank)], rank - floor).
    """
    s = torch.sort(values).values                                               # [n] ascending
    rank = torch.tensor(q, dtype=s.dtype, device=s.device) * (s.numel() - 1)
    below = rank.floor()
    return torch.lerp(s[below.long()], s[rank.ceil().long()], rank - below)


def row_linear_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile of the valid entries, like ``torch.nanquantile(where(mask, values, nan), q, dim=-1)``.
    values [B, T], mask bool [B, T] -> [B]; NaN for a row with no valid entry."""
    inf = torch.full((), float("inf"), dtype=values.dtype, device=values.device)
    s = torch.sort(torch.where(mask, values, inf), dim=-1).values              # [B, T] valid values first
    n = mask.sum(-1, keepdim=True)                                              # [B, 1]
    rank = torch.tensor(q, dtype=s.dtype, device=s.device) * (n - 1).clamp(min=0).to(s.dtype)
    below = rank.floor()
    top = max(s.shape[-1] - 1, 0)
    lo = s.gather(-1, below.long().clamp(max=top))
    hi = s.gather(-1, rank.ceil().long().clamp(max=top))
    tau = torch.lerp(lo, hi, rank - below)                                      # [B, 1]
    return torch.where(n > 0, tau, torch.full_like(tau, float("nan"))).squeeze(-1)


@torch.no_grad()
def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, quantile: float = 0.8, scope: str = "batch",
                      gather_fn: GatherFn | None = None) -> torch.Tensor:
    """tau: 0-dim (scope "batch"; NaN when no rank has a valid token) or [B] (scope "response"; NaN for empty rows).

    entropy [B, T] (any value at padding, NaN included), mask bool [B, T]. Computed in float32 (float64 for float64
    entropies). ``gather_fn`` (scope "batch") concatenates 1-D tensors across ranks; every rank must call this.
    """
    check_float("quantile", quantile, lo=0.0, hi=1.0)
    check_choice("scope", scope, SCOPES)
    cd = torch.float64 if entropy.dtype == torch.float64 else torch.float32
    e = entropy.detach().to(cd)
    if scope == "batch":
        vals = e[mask]                                                          # [n] valid entropies
        if gather_fn is not None:
            vals = gather_fn(vals).to(cd)
        if vals.numel() == 0:
            return torch.full((), float("nan"), dtype=cd, device=e.device)
        return linear_quantile(vals, quantile)
    return row_linear_quantile(torch.where(mask, e, torch.zeros((), dtype=cd, device=e.device)), mask, quantile)


@torch.no_grad()
def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float = 0.8, scope: str = "batch",
                      gather_fn: GatherFn | None = None) -> torch.Tensor:
    """bool [B, T]: valid tokens whose entropy is >= the ``quantile`` of the valid entropies (per batch, across
    ranks with ``gather_fn``, or per response). See :func:`entropy_threshold`."""
    return _keep(entropy, mask, entropy_threshold(entropy, mask, quantile, scope, gather_fn))


def _keep(entropy: torch.Tensor, mask: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """valid & (H >= tau), compared in tau's dtype; tau 0-dim or [B]. NaN (padding, empty rows) compares False."""
    e = entropy.detach().to(tau.dtype)
    return (e >= (tau[:, None] if tau.dim() == 1 else tau)) & mask


@dataclass(frozen=True)
class ForkingTokensConfig(PGConfig):
    """Policy gradient on the high-entropy "forking" tokens (arXiv 2506.01939)."""

    quantile: float = 0.8
    """Entropy quantile q of arXiv 2506.01939: tokens with H >= the q-quantile keep their gradient (0.8: top 20%;
    TRL's top_entropy_quantile = 1 - q); 0 = grpo."""
    scope: str = "batch"
    """Population of the quantile: "batch" (arXiv 2506.01939, TRL; across ranks via gather_fn) or "response"
    (per response, the SIREN repository's baseline)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("quantile", self.quantile, lo=0.0, hi=1.0)
        check_choice("scope", self.scope, SCOPES)


@register_method
class ForkingTokens(Method):
    name = "forking_tokens"
    Config = ForkingTokensConfig
    detached_inputs = ("entropy", "logits")

    @classmethod
    def neutral_overrides(cls):
        return {"quantile": 0.0}

    def _loss(self, batch, *, new_step):
        c = self.config
        h = batch.current_entropy(self.name).detach()                          # [B, T], 0 at padding
        tau = entropy_threshold(h, batch.mask, c.quantile, c.scope, self.gather_fn)
        keep = _keep(h, batch.mask, tau)                                        # bool [B, T]
        terms = self.pg_terms(batch)
        loss_mat = torch.where(keep, terms.loss, torch.zeros((), dtype=terms.loss.dtype, device=h.device))
        loss = self.aggregate(loss_mat, batch.mask)                             # denominators: all valid tokens
        metrics = self.pg_metrics(terms, batch)
        with torch.no_grad():
            if c.scope == "batch":
                thr = torch.nan_to_num(tau, nan=0.0)
            else:
                thr = masked_mean(torch.nan_to_num(tau, nan=0.0), batch.mask.any(-1))
            metrics.update({
                "kept_frac": masked_mean(keep.to(h.dtype), batch.mask),
                "threshold": thr,
                "entropy": masked_mean(h, batch.mask),
            })
        return loss, metrics
