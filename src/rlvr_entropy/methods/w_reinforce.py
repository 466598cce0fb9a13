"""W-REINFORCE (Zhu et al., "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning",
arXiv 2506.01347).

The paper splits the RLVR objective with rewards in {-1, +1} into positive and negative sample reinforcement,
L = L_PSR + L_NSR, and proposes the weighted objective L = lambda L_PSR + L_NSR (lambda = 0.1). Per response:

    A_i = +lambda   if reward_i > threshold (correct)
    A_i = -1        otherwise (incorrect)

A_i replaces the batch's advantages (they are ignored: there is no group baseline) and goes through the PPO/GRPO
surrogate; on-policy the ratio is 1 and the gradient is REINFORCE's, -A_i grad log pi. Switches:
``nsr_only`` (NSR: A = 0 / -1, i.e. lambda = 0) and ``psr_only`` (PSR: A = +1 / 0, the paper's L_PSR with unit
weight; lambda is ignored). With lambda = 1 and rewards in {0, 1} it is grpo with advantages 2 r - 1.

Deviations from the paper / official code: the paper trains on-policy with plain REINFORCE; here the ratio is
clipped like every method's (it only matters off-policy) and aggregated with ``loss_agg_mode``. Rewards are
binarized with ``threshold`` (0.5 for {0, 1} rewards). The official code was not read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_float
from rlvr_entropy.methods.base import Method, PGConfig, register_method


def w_reinforce_advantages(rewards: torch.Tensor, lam: float = 0.1, threshold: float = 0.5, *,
                           psr_only: bool = False, nsr_only: bool = False) -> torch.Tensor:
    """rewards [B] -> advantages [B]: +lam for correct (reward > threshold), -1 for incorrect.

    ``nsr_only``: 0 for correct; ``psr_only``: +1 for correct and 0 for incorrect (lam ignored).
    """
    if psr_only and nsr_only:
        raise ValueError("psr_only and nsr_only cannot both be set")
    pos = 1.0 if psr_only else (0.0 if nsr_only else float(lam))
    neg = 0.0 if psr_only else -1.0
    correct = rewards > threshold
    return torch.where(correct, torch.full_like(rewards, pos), torch.full_like(rewards, neg))


@dataclass(frozen=True)
class WReinforceConfig(PGConfig):
    """Weighted REINFORCE (arXiv 2506.01347)."""

    lam: float = 0.1
    """Weight lambda of positive samples in lambda L_PSR + L_NSR (arXiv 2506.01347: 0.1); 0 = NSR only."""
    threshold: float = 0.5
    """A response is correct when its reward exceeds this (0.5 for {0, 1} rewards)."""
    psr_only: bool = False
    """Positive sample reinforcement only (arXiv 2506.01347's PSR): A = +1 for correct, 0 for incorrect."""
    nsr_only: bool = False
    """Negative sample reinforcement only (arXiv 2506.01347's NSR): A = 0 for correct, -1 for incorrect."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("lam", self.lam, lo=0.0)
        check_float("threshold", self.threshold)
        for name in ("psr_only", "nsr_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.psr_only and self.nsr_only:
            raise ValueError("psr_only and nsr_only cannot both be True")


@register_method
class WReinforce(Method):
    name = "w_reinforce"
    Config = WReinforceConfig
    needs = ("rewards",)

    # neutral_overrides() stays None: no setting ignores the batch's advantages the way grpo uses them. With lam = 1
    # it equals grpo on advantages 2 r - 1 (tests/methods/test_w_reinforce.py).

    def _loss(self, batch, *, new_step):
        c = self.config
        rewards = batch.rewards.detach().to(batch.log_prob.dtype)              # [B]
        adv_b = w_reinforce_advantages(rewards, c.lam, c.threshold, psr_only=c.psr_only, nsr_only=c.nsr_only)
        adv = batch.clean(adv_b[:, None].expand(batch.shape))                   # [B, T], 0 at padding
        terms = self.pg_terms(batch, adv)
        loss = self.aggregate(terms.loss, batch.mask)
        metrics = self.pg_metrics(terms, batch)
        with torch.no_grad():
            rows = batch.mask.any(-1)                                           # responses with a valid token
            metrics.update({
                "correct_frac": masked_mean((rewards > c.threshold).to(rewards.dtype), rows),
                "adv_mean": masked_mean(adv, batch.mask),
            })
        return loss, metrics
