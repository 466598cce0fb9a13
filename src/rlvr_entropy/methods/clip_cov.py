"""Clip-Cov (Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models",
arXiv 2505.22617; also verl's ``compute_policy_loss_clip_cov``).

Among valid tokens not already clipped by PPO whose covariance Cov_t = (A_t - mean A)(log pi_t - mean log pi) lies
in (lb, ub), pick max(1, int(ratio * N)) at random and zero their loss (detach them from the gradient). Other tokens
get the clipped surrogate max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) (no dual-clip, as in verl).

Defaults (verl, paper): ratio 2e-4, lb 1, ub 5, eps 0.2 / 0.2.

Deviations from the paper / official code:
- The log-ratio is clamped to [-20, 20] before exp (verl does not: verl#6478), so a far off-policy token cannot
  overflow; where the clamp is inactive the loss equals verl's.
- Scope: "micro_batch" (verl, default) selects among this call's tokens; "global" selects among every rank's tokens
  through ``Method.gather_fn`` (the paper's whole-batch reading; equal to "micro_batch" without a gather_fn).
- Randomness: ``seed=None`` draws from the global torch RNG exactly as verl does (torch.randperm), so the same
  torch.manual_seed gives the same selection; an int seed uses a private generator advanced every call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_choice, check_float, check_int
from rlvr_entropy.methods._cov import _generator, token_covariance
from rlvr_entropy.methods.base import Method, PGConfig, register_method


@dataclass(frozen=True)
class ClipCovConfig(PGConfig):
    """Clip-Cov (arXiv 2505.22617); defaults are verl's."""

    ratio: float = 2e-4
    """Share of valid tokens whose gradient is removed (clip_cov_ratio)."""
    lb: float = 1.0
    """Covariance lower bound (clip_cov_lb)."""
    ub: float = 5.0
    """Covariance upper bound (clip_cov_ub)."""
    scope: str = "micro_batch"
    """"micro_batch" (verl) or "global" (every rank, via gather_fn)."""
    seed: int | None = None
    """None: global torch RNG (verl parity); int: a private generator."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("ratio", self.ratio, lo=0.0, hi=1.0, lo_open=True)
        check_float("lb", self.lb)
        check_float("ub", self.ub)
        if self.lb >= self.ub:
            raise ValueError(f"lb ({self.lb}) must be < ub ({self.ub})")
        check_choice("scope", self.scope, ("micro_batch", "global"))
        check_int("seed", self.seed, allow_none=True)


@register_method
class ClipCov(Method):
    name = "clip_cov"
    Config = ClipCovConfig

    @classmethod
    def neutral_overrides(cls):
        return {"lb": 1e30, "ub": 1e31}  # no covariance can fall in the window: nothing is detached

    @torch.no_grad()
    def select(self, cov: torch.Tensor, eligible: torch.Tensor, n_valid: int) -> torch.Tensor:
        """bool [B, T]: the tokens whose loss is zeroed."""
        c = self.config
        gen = _generator(c.seed, self._calls)
        sel = torch.zeros_like(eligible)
        if c.scope == "global" and self.gather_fn is not None:
            total = int(self.gather_fn(torch.tensor([float(n_valid)])).sum())
            num = max(int(c.ratio * total), 1)
            keys = torch.rand(eligible.shape, generator=gen, dtype=torch.float64)
            local = keys[eligible]
            allk = self.gather_fn(local)
            if allk.numel() == 0:
                return sel
            thr = torch.topk(allk, min(num, allk.numel())).values[-1]
            return eligible & (keys >= thr)
        num = max(int(c.ratio * n_valid), 1)
        idx = torch.nonzero(eligible)
        if len(idx) > 0:
            perm = torch.randperm(len(idx), generator=gen) if gen is not None else torch.randperm(len(idx))
            idx = idx[perm[: min(num, len(idx))]]
            sel[idx[:, 0], idx[:, 1]] = True
        return sel

    def _loss(self, batch, *, new_step):
        c = self.config
        adv = batch.token_advantages()
        lp = batch.clean(batch.log_prob)
        terms = self.pg_terms(batch, adv)
        ratio = terms.ratio
        l1 = -adv * ratio
        l2 = -adv * torch.clamp(ratio, 1 - c.eps_low, 1 + c.eps_high)
        clipped = (l2 > l1) & batch.mask
        cov = token_covariance(lp, adv, batch.mask, self.gather_fn if c.scope == "global" else None)
        eligible = batch.mask & ~clipped & (cov > c.lb) & (cov < c.ub)
        sel = self.select(cov, eligible, batch.num_tokens)
        loss_mat = torch.where(sel, torch.zeros_like(l1), torch.maximum(l1, l2))
        loss = self.aggregate(loss_mat, batch.mask)
        metrics = self.pg_metrics(terms, batch)
        metrics.update({"selected_frac": masked_mean(sel.float(), batch.mask),
                        "eligible_frac": masked_mean(eligible.float(), batch.mask),
                        "cov_mean": masked_mean(cov, batch.mask)})
        return loss, metrics
