"""W-REINFORCE (Zhu et al., "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning",
arXiv 2506.01347): positive samples are down-weighted, negative samples keep full weight.

    A_i = +lambda if reward_i > threshold (correct) else -1,   lambda = 0.1

The advantage replaces the batch's advantages and goes through the PPO surrogate (ratio 1 on-policy, so the gradient
is REINFORCE's). ``lam=0`` is NSR alone (negative sample reinforcement), which the paper shows keeps entropy and
pass@k at large k; ``psr_only`` keeps only the positive samples.

Deviations: the paper trains on-policy with plain REINFORCE; the PPO clip only matters off-policy. There is no setting
that equals grpo: with lambda = 1 it equals grpo with advantages 2 r - 1 for rewards in {0, 1} (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_float
from rlvr_entropy.methods.base import Method, PGConfig, register_method


def w_reinforce_advantages(rewards: torch.Tensor, lam: float, threshold: float = 0.5, psr_only: bool = False) -> torch.Tensor:
    """[B] advantages: +lam for correct (reward > threshold), -1 for incorrect (0 when psr_only)."""
    correct = rewards > threshold
    neg = torch.zeros_like(rewards) if psr_only else -torch.ones_like(rewards)
    return torch.where(correct, torch.full_like(rewards, lam), neg)


@dataclass(frozen=True)
class WReinforceConfig(PGConfig):
    """Weighted REINFORCE (arXiv 2506.01347)."""

    lam: float = 0.1
    """Weight lambda of positive samples (paper: 0.1); 0 = NSR only."""
    threshold: float = 0.5
    """A response is correct when its reward exceeds this (rewards in {0, 1})."""
    psr_only: bool = False
    """Keep only positive samples (PSR ablation)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("lam", self.lam, lo=0.0)
        check_float("threshold", self.threshold)
        if not isinstance(self.psr_only, bool):
            raise ValueError(f"psr_only must be a bool, got {self.psr_only!r}")


@register_method
class WReinforce(Method):
    name = "w_reinforce"
    Config = WReinforceConfig
    needs = ("rewards",)

    def _loss(self, batch, *, new_step):
        c = self.config
        adv_b = w_reinforce_advantages(batch.rewards.to(batch.log_prob.dtype), c.lam, c.threshold, c.psr_only)
        adv = batch.clean(adv_b[:, None].expand(batch.shape))
        terms = self.pg_terms(batch, adv)
        loss = self.aggregate(terms.loss, batch.mask)
        metrics = self.pg_metrics(terms, batch)
        metrics.update({"correct_frac": (batch.rewards > c.threshold).float().mean()})
        return loss, metrics
