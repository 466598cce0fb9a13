"""KL-Cov (Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models",
arXiv 2505.22617, Sec. 4; verl's ``compute_policy_loss_kl_cov``): no ratio clipping; the tokens with the largest
covariance between log-probability and advantage get a KL penalty that holds them near the old policy.

    Cov_t = (A_t - mean A) (log pi_t - mean log pi)          valid tokens, means over the valid tokens, detached
    S     = the max(1, int(kl_cov_ratio * N)) valid tokens with the largest Cov_t   (N = valid tokens; top-k)
    l_t   = -A r + beta |log r|   for t in S,   -A r otherwise
    L     = agg(l)

Defaults: kl_cov_ratio 2e-3 (the paper's value for Qwen2.5-7B; 2e-4 for 32B, and verl's config default 2e-4),
ppo_kl_coef beta = 1.0 (the paper and verl's function fallback; verl's PolicyLossConfig default is 0.1). Pass
``kl_cov_ratio=2e-4, ppo_kl_coef=0.1`` to reproduce verl's defaults. The selection is deterministic (top-k; ties
broken by ``torch.topk`` on CPU, as verl does).

KL-Cov has no clipping: ``eps_low`` and ``eps_high`` are not used. ``dual_clip``, when set, bounds the policy term
-A r at -c A for A < 0 (verl's KL-Cov has none; the default None matches verl).

Scope: "micro_batch" (default, verl and the official code) or "global" (the paper's whole-batch reading: means,
N and the top-k over every rank's tokens through ``Method.gather_fn``; the ranks together select exactly what
"micro_batch" selects on the concatenation of their micro-batches, ties included). Without a ``gather_fn`` the
global scope is the micro-batch scope.

Deviations from the paper / official code:
- The log-ratio is clamped to [-20, 20] before exp (``clamp_log_ratio``; verl's KL-Cov does not clamp, so a far
  off-policy token overflows: verl#6478); |log r| uses the clamped log-ratio. Where the clamp is inactive the loss
  and gradients equal verl's (tests/methods/test_verl_parity.py).
- Half-precision inputs: the covariance is computed in float32 (verl computes it in the inputs' dtype).
- The scope option and the optional dual-clip are additions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_choice, check_float
from rlvr_entropy.methods._scoped import World, gather_rows, select_topk
from rlvr_entropy.methods.base import Method, PGConfig, register_method
from rlvr_entropy.methods.clip_cov import SCOPES, covariance_sums, token_covariance


def kl_cov_count(ratio: float, num_valid: int) -> int:
    """Number of penalized tokens: max(1, int(ratio * N)), 0 when N = 0 (verl's k_percent_nums)."""
    return max(1, int(num_valid * ratio)) if num_valid > 0 else 0


@torch.no_grad()
def kl_cov_select(cov: torch.Tensor, mask: torch.Tensor, k: int, *, world: World | None = None,
                  counts: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, T]: the k valid tokens with the largest covariance (``cov`` [B, T], ``mask`` bool [B, T]).

    Like verl: the valid covariances in row-major order, ``torch.topk`` on CPU. With a ``world`` (global scope)
    the top-k is over every rank's valid tokens, in rank order, and every rank gets its own share; ``counts`` [R]
    (every rank's number of valid tokens) saves a gather when already known.
    """
    vals = cov[mask]                                                        # [n] row-major
    pick = select_topk(vals, k, largest=True, world=world, counts=counts)   # bool [n]
    sel = torch.zeros_like(mask)
    sel[mask] = pick
    return sel


def kl_cov_token_loss(ratio: torch.Tensor, log_ratio: torch.Tensor, advantages: torch.Tensor,
                      selected: torch.Tensor, beta: float, dual_clip: float | None = None) -> torch.Tensor:
    """l_t [B, T]: -A r, plus beta |log r| where ``selected``; -A r is bounded at -c A for A < 0 when
    ``dual_clip`` = c. ratio, log_ratio [B, T] with gradient; advantages [B, T]; selected bool [B, T]."""
    pg = -advantages * ratio
    if dual_clip is not None:
        pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * dual_clip), pg)
    return torch.where(selected, pg + beta * log_ratio.abs(), pg)


@dataclass(frozen=True)
class KLCovConfig(PGConfig):
    """KL-Cov (arXiv 2505.22617). eps_low / eps_high are not used (no ratio clipping)."""

    kl_cov_ratio: float = 2e-3
    """Share k of valid tokens that get the KL penalty (arXiv 2505.22617, KL-Cov "k": 2e-3 for 7B, 2e-4 for 32B;
    verl's config default 2e-4)."""
    ppo_kl_coef: float = 1.0
    """KL coefficient beta on |log r| (arXiv 2505.22617: 1; verl's PolicyLossConfig default 0.1); 0 = no penalty."""
    scope: str = "micro_batch"
    """Population of the top-k: "micro_batch" (verl, official code) or "global" (every rank, via gather_fn)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("kl_cov_ratio", self.kl_cov_ratio, lo=0.0, hi=1.0, lo_open=True)
        check_float("ppo_kl_coef", self.ppo_kl_coef, lo=0.0)
        check_choice("scope", self.scope, SCOPES)


@register_method
class KLCov(Method):
    name = "kl_cov"
    Config = KLCovConfig

    @classmethod
    def neutral_overrides(cls):
        return None  # no clipping at all: never equal to grpo (tests/methods/test_kl_cov.py checks the relation)

    def _loss(self, batch, *, new_step):
        c = self.config
        mask = batch.mask
        adv = batch.token_advantages()
        terms = self.pg_terms(batch, adv)                                       # for r and log r (clamped)
        world, means, n_valid = None, None, batch.num_tokens
        if c.scope == "global" and self.gather_fn is not None:
            world = gather_rows(self.gather_fn, covariance_sums(batch.log_prob, batch.advantages, mask))
            tot = world.rows.sum(0)
            n_valid = int(tot[2])
            means = (tot[0] / tot[2], tot[1] / tot[2]) if n_valid > 0 else (0.0, 0.0)
        cov = token_covariance(batch.log_prob, batch.advantages, mask, means=means)  # [B, T], detached
        counts = world.rows[:, 2] if world is not None else None
        sel = kl_cov_select(cov, mask, kl_cov_count(c.kl_cov_ratio, n_valid), world=world, counts=counts)
        loss_mat = kl_cov_token_loss(terms.ratio, terms.log_ratio, adv, sel, c.ppo_kl_coef, c.dual_clip)
        loss = self.aggregate(loss_mat, mask)
        with torch.no_grad():
            abs_kl = terms.log_ratio.detach().abs()
            metrics = {
                "selected_frac": masked_mean(sel.float(), mask),
                "abs_kl": masked_mean(abs_kl, mask),                                # verl's ppo_kl for KL-Cov
                "selected_abs_kl": masked_mean(abs_kl, sel),
                "cov_mean": masked_mean(cov.float(), mask),
                "selected_cov_mean": masked_mean(cov.float(), sel),
                "approx_kl": masked_mean(-terms.log_ratio.detach(), mask),
                "ratio_mean": masked_mean(terms.ratio.detach(), mask),
            }
            if c.dual_clip is not None:
                metrics["dual_clip_frac"] = masked_mean(
                    ((adv < 0) & (-adv * terms.ratio.detach() > -adv * c.dual_clip)).float(), mask)
        return loss, metrics

