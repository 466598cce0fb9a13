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
computed from ``logits`` or ``lm_head``); the clamped entropy needs ``logits`` or ``lm_head`` (the tiled LM-head
pass of :mod:`rlvr_entropy.kernels` computes it without [B, T, V] logits).

Deviations from the paper / official code: AEnt also adapts its coefficient to keep the clamped entropy between
two bounds; here the coefficient is fixed (``adaptive_entropy`` has Skywork-OR1's controller, on the full
entropy). The kept set is a constant of the step (no gradient flows through which tokens are dropped); ties at the
boundary logit are broken by vocabulary index, which changes the gradient's split between tied tokens but not the
value.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_float
from rlvr_entropy.methods.base import Method, PGConfig, register_method
from rlvr_entropy.stats import Stat, clamped_entropy, kept_count  # noqa: F401  (re-exported: the AEnt pieces)


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

    def logits_requests(self) -> tuple[Stat, ...]:
        """The distribution statistic the bonus reads beyond the entropy (the clamped entropy when clamping)."""
        f = self.config.clamp_fraction
        return (Stat.clamped_entropy(f),) if f > 0 else ()

    def bonus_entropy(self, batch) -> torch.Tensor:
        """[B, T] entropy the bonus acts on (with gradient), 0 at padding."""
        if self.config.clamp_fraction > 0:
            h = batch.stat(Stat.clamped_entropy(self.config.clamp_fraction), self.name)
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
