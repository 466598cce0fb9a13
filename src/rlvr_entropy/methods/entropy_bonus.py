"""Entropy bonus: L = L_PG - coef * agg(H_t), optionally on an AEnt-style clamped entropy.

- Plain bonus (the classic exploration term; in RLVR e.g. Skywork-OR1 arXiv 2505.22312 and Cui et al.
  arXiv 2505.22617 use coefficients 1e-3..5e-3). Known to explode entropy on large vocabularies; kept as a baseline.
- AEnt (arXiv 2509.03493): the entropy of the distribution with the lowest-logit ``clamp_fraction`` of the
  vocabulary dropped and renormalized ("clamped entropy"), which ignores the long tail of junk tokens.

H_t is aggregated with the same ``loss_agg_mode`` as the PG part.

Deviations from the paper / official code: AEnt also adapts its coefficient to keep entropy between two bounds;
here the coefficient is fixed (use ``adaptive_entropy`` for a controller). The clamped set keeps the
ceil((1 - clamp_fraction) V) largest logits (ties broken by index).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlvr_entropy import stats
from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_float
from rlvr_entropy.methods.base import Method, PGConfig, register_method


class _ClampedEntropy(torch.autograd.Function):
    """Entropy of softmax restricted to the top-n logits of each row, chunked; backward recomputes per chunk."""

    @staticmethod
    def forward(ctx, z, valid, n_keep, chunk):
        cd = stats._compute_dtype(z.dtype)
        N = z.shape[0]
        h = torch.zeros(N, dtype=cd, device=z.device)
        thr = torch.zeros(N, dtype=cd, device=z.device)
        lse = torch.zeros(N, dtype=cd, device=z.device)
        m = torch.full((N,), n_keep, dtype=torch.long, device=z.device)
        for s in range(0, N, chunk):
            blk = stats._rows(z, valid, s, s + chunk, cd)
            t = torch.topk(blk, n_keep, dim=-1).values[:, -1]
            keep = stats._kept(blk, t, m[s:s + chunk])
            zk = torch.where(keep, blk, torch.tensor(-math.inf, dtype=cd))
            ls = torch.logsumexp(zk, -1)
            h[s:s + chunk] = stats._plogp_entropy(zk - ls[:, None])
            thr[s:s + chunk], lse[s:s + chunk] = t, ls
        ctx.save_for_backward(z, valid if valid is not None else torch.empty(0), h, thr, lse, m)
        ctx.chunk, ctx.has_valid = chunk, valid is not None
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        z, valid, h, thr, lse, m = ctx.saved_tensors
        valid = valid if ctx.has_valid else None
        grad = torch.empty_like(z)
        gh = gh.to(h.dtype)
        for s in range(0, z.shape[0], ctx.chunk):
            e = s + ctx.chunk
            blk = stats._rows(z, valid, s, e, h.dtype)
            keep = stats._kept(blk, thr[s:e], m[s:e])
            logq = blk - lse[s:e, None]
            q = torch.where(keep, logq.exp(), 0.0)
            g = -(gh[s:e, None] * q) * torch.where(keep, logq + h[s:e, None], 0.0)
            if valid is not None:
                g = torch.where(valid[s:e, None], g, 0.0)
            grad[s:e] = g.to(z.dtype)
        return grad, None, None, None


def clamped_entropy(logits: torch.Tensor, clamp_fraction: float, *, mask: torch.Tensor | None = None,
                    chunk_size: int | None = None) -> torch.Tensor:
    """AEnt's clamped entropy: drop the lowest-logit ``clamp_fraction`` of the vocabulary, renormalize, take the
    entropy. logits [..., V] -> [...], differentiable, chunked over positions. clamp_fraction = 0 is the entropy."""
    check_float("clamp_fraction", clamp_fraction, lo=0.0, hi=1.0, hi_open=True)
    z, valid, lead = stats._flatten(logits, mask)
    V = z.shape[-1]
    n_keep = max(1, math.ceil((1.0 - clamp_fraction) * V))
    chunk = chunk_size or stats.default_chunk_size(V)
    return _ClampedEntropy.apply(z, valid, n_keep, chunk).reshape(lead)


@dataclass(frozen=True)
class EntropyBonusConfig(PGConfig):
    """Entropy bonus, optionally on AEnt's clamped entropy (arXiv 2509.03493)."""

    coef: float = 1e-3
    """Bonus coefficient beta (1e-3..5e-3 in RLVR recipes)."""
    clamp_fraction: float = 0.0
    """AEnt: share of the vocabulary (lowest logits) dropped before the entropy; 0 = plain entropy."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("coef", self.coef)
        check_float("clamp_fraction", self.clamp_fraction, lo=0.0, hi=1.0, hi_open=True)


@register_method
class EntropyBonus(Method):
    name = "entropy_bonus"
    Config = EntropyBonusConfig

    @classmethod
    def neutral_overrides(cls):
        return {"coef": 0.0}

    def bonus_entropy(self, batch) -> torch.Tensor:
        if self.config.clamp_fraction > 0:
            logits = batch.require("logits", self.name)
            return batch.clean(clamped_entropy(logits, self.config.clamp_fraction, mask=batch.mask))
        return batch.current_entropy(self.name)

    def _loss(self, batch, *, new_step):
        terms = self.pg_terms(batch)
        pg = self.aggregate(terms.loss, batch.mask)
        h = self.bonus_entropy(batch)
        ent = self.aggregate(h, batch.mask)
        loss = pg - self.config.coef * ent
        metrics = self.pg_metrics(terms, batch)
        metrics.update({"entropy": masked_mean(h.detach(), batch.mask), "bonus": (self.config.coef * ent).detach()})
        return loss, metrics
