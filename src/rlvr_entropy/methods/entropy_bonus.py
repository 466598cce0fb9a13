"""Entropy bonus: L = L_PG - coef * agg(H_t), optionally on AEnt's clamped entropy.

- Plain bonus: the classic exploration regularizer (PPO, arXiv 1707.06347), with H_t the entropy of the full
  next-token distribution at each valid response token. RLVR recipes use coef ~ 1e-3..5e-3 (methods.md; e.g. the
  upper bound 5e-3 of Skywork-OR1's adaptive coefficient, arXiv 2505.22312). Known to make entropy explode on large
  vocabularies; kept as a baseline.
- AEnt clamped entropy (Shen, "On Entropy Control in LLM-RL Algorithms", arXiv 2509.03493): with
  ``clamp_fraction`` = f > 0, the lowest-logit floor(f V) tokens of each position are dropped, the remaining
  probabilities renormalized (q = softmax of the kept logits), and H_t = -sum_kept q log q. This keeps the bonus
  from pushing mass onto the long tail of implausible tokens.

The entropy term is aggregated with the same ``loss_agg_mode`` (and ``norm_length``) as the PG term, so with
"seq-mean-token-mean" it is the mean over responses of each response's mean entropy, with "token-mean" the mean
over all valid tokens. H_t comes from ``TokenBatch.current_entropy`` (the given ``entropy`` with its gradient, else
computed from ``logits``); the clamped entropy needs ``logits``.

Deviations from the paper / official code: AEnt also adapts its coefficient to keep the clamped entropy between
two bounds; here the coefficient is fixed (``adaptive_entropy`` has Skywork-OR1's controller, on the full
entropy). The kept set is a constant of the step (no gradient flows through which tokens are dropped); ties at the
boundary logit are broken by vocabulary index, which changes the gradient's split between tied tokens but not the
value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlvr_entropy import stats
from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_float, check_int
from rlvr_entropy.methods.base import Method, PGConfig, register_method


def kept_count(vocab: int, clamp_fraction: float) -> int:
    """Number of logits AEnt keeps per position: V - floor(clamp_fraction * V), at least 1."""
    n_drop = math.floor(clamp_fraction * vocab + 1e-9)  # 1e-9: 0.3 * 10 must drop 3, not 2
    return max(1, vocab - n_drop)


def _kept_set(blk: torch.Tensor, thr: torch.Tensor, n_keep: int) -> torch.Tensor:
    """bool [c, V]: the n_keep largest logits of each row of blk [c, V], given thr [c] = the n_keep-th largest.

    {z >= thr} is the kept set unless more than one logit equals thr at the boundary; only those rows go through
    the index tie rule of ``stats._kept`` (the first tied entries in vocabulary order are kept)."""
    keep = blk >= thr[:, None]
    over = keep.sum(-1) > n_keep
    if bool(over.any()):
        i = over.nonzero().squeeze(1)
        keep[i] = stats._kept(blk[i], thr[i], torch.full_like(i, n_keep))
    return keep


class _ClampedEntropy(torch.autograd.Function):
    """Entropy of the softmax restricted to the n_keep largest logits of each row of z [N, V].

    Forward, per block of ``chunk`` rows: the n_keep-th largest logit (kthvalue), the kept set, then with
    y = z - max z and e = exp(y) on the kept set, S = sum e: H = log S - sum e y / S (a few passes over the block).
    Saved: z and three [N] vectors (threshold, logsumexp of the kept set, H). The backward recomputes the kept set
    block by block and writes dH/dz_v = -q_v (log q_v + H) on it (0 elsewhere), so no [N, V] temporary exists.
    """

    @staticmethod
    def forward(ctx, z, valid, n_keep, chunk):
        cd = stats._compute_dtype(z.dtype)
        N, V = z.shape
        h = torch.zeros(N, dtype=cd, device=z.device)
        thr = torch.zeros(N, dtype=cd, device=z.device)
        lse = torch.zeros(N, dtype=cd, device=z.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            blk = stats._rows(z, valid, s, e, cd)                                  # [c, V]
            t = torch.kthvalue(blk, V - n_keep + 1, dim=-1).values                 # [c] n_keep-th largest
            keep = _kept_set(blk, t, n_keep)                                       # bool [c, V]
            mx = blk.amax(-1)                                                      # [c] (always kept)
            y = blk - mx[:, None]                                                  # [c, V]
            ex = torch.exp(y).masked_fill_(~keep, 0)                               # e on the kept set, else 0
            y.masked_fill_(ex == 0, 0)                                             # no 0 * -inf below
            ssum = ex.sum(-1)                                                      # [c]
            logs = ssum.log()
            h[s:e] = logs - ex.mul_(y).sum(-1) / ssum
            thr[s:e], lse[s:e] = t, mx + logs
        ctx.save_for_backward(z, valid if valid is not None else torch.empty(0, dtype=torch.bool), h, thr, lse)
        ctx.n_keep, ctx.chunk, ctx.has_valid = n_keep, chunk, valid is not None
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        z, valid, h, thr, lse = ctx.saved_tensors
        valid = valid if ctx.has_valid else None
        cd = h.dtype
        gh = gh.to(cd)
        N = z.shape[0]
        grad = torch.empty_like(z)
        for s in range(0, N, ctx.chunk):
            e = min(s + ctx.chunk, N)
            blk = stats._rows(z, valid, s, e, cd)
            keep = _kept_set(blk, thr[s:e], ctx.n_keep)
            g = blk - lse[s:e, None]                                               # log q on the kept set
            q = torch.exp(g).masked_fill_(~keep, 0)
            g.add_(h[s:e, None]).masked_fill_(q == 0, 0)                           # q = 0: exactly 0, never 0 * -inf
            g.mul_(q).mul_(-gh[s:e, None])                                         # -q (log q + H) * dL/dH
            if valid is not None:
                g.masked_fill_(~valid[s:e, None], 0)
            grad[s:e] = g.to(z.dtype)
        return grad, None, None, None


def clamped_entropy(logits: torch.Tensor, clamp_fraction: float, *, mask: torch.Tensor | None = None,
                    chunk_size: int | None = None) -> torch.Tensor:
    """AEnt's clamped entropy (arXiv 2509.03493). logits [..., V] -> [...], differentiable, chunked over positions.

    Drops the floor(clamp_fraction * V) lowest logits of each position (ties broken by vocabulary index), takes the
    softmax of the rest and returns its entropy in nats. ``clamp_fraction = 0`` is :func:`rlvr_entropy.stats.entropy`.
    Positions outside ``mask`` (optional bool [...]) are treated as all-zero logits and get zero gradient (NaN there
    never leaks). Half-precision logits are computed in float32 (output float32, gradient in the logits' dtype).
    """
    check_float("clamp_fraction", clamp_fraction, lo=0.0, hi=1.0, hi_open=True)
    check_int("chunk_size", chunk_size, lo=1, allow_none=True)
    if clamp_fraction == 0:
        return stats.entropy(logits, mask=mask, chunk_size=chunk_size)
    z, valid, lead = stats._flatten(logits, mask)
    V = z.shape[-1]
    chunk = chunk_size or stats.default_chunk_size(V)
    return _ClampedEntropy.apply(z, valid, kept_count(V, clamp_fraction), chunk).reshape(lead)


@dataclass(frozen=True)
class EntropyBonusConfig(PGConfig):
    """Entropy bonus (PPO, arXiv 1707.06347), optionally on AEnt's clamped entropy (arXiv 2509.03493)."""

    coef: float = 1e-3
    """Bonus coefficient beta in L - beta agg(H); RLVR recipes use 1e-3..5e-3 (methods.md); 0 = grpo."""
    clamp_fraction: float = 0.0
    """AEnt (arXiv 2509.03493): share of the vocabulary (lowest logits) dropped before the entropy; 0 = full H."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("coef", self.coef, lo=0.0)
        check_float("clamp_fraction", self.clamp_fraction, lo=0.0, hi=1.0, hi_open=True)


@register_method
class EntropyBonus(Method):
    name = "entropy_bonus"
    Config = EntropyBonusConfig

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        if self.config.clamp_fraction > 0:
            # Instance-level: engines read ``method.needs`` to decide whether to build full logits.
            self.needs = ("logits",)

    @classmethod
    def neutral_overrides(cls):
        return {"coef": 0.0}

    def bonus_entropy(self, batch) -> torch.Tensor:
        """[B, T] entropy the bonus acts on (with gradient), 0 at padding."""
        if self.config.clamp_fraction > 0:
            logits = batch.require("logits", self.name)
            h = clamped_entropy(logits, self.config.clamp_fraction, mask=batch.mask)
            return batch.clean(h.to(batch.log_prob.dtype))
        return batch.current_entropy(self.name)

    def _loss(self, batch, *, new_step):
        terms = self.pg_terms(batch)
        pg = self.aggregate(terms.loss, batch.mask)
        h = self.bonus_entropy(batch)                      # [B, T]
        ent = self.aggregate(h, batch.mask)                # same aggregation as the PG term
        loss = pg - self.config.coef * ent
        metrics = self.pg_metrics(terms, batch)
        metrics.update({
            "pg_loss": pg.detach(),
            "entropy": masked_mean(h.detach(), batch.mask),
            "bonus": (self.config.coef * ent).detach(),
        })
        return loss, metrics
