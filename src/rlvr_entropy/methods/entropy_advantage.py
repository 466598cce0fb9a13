"""Entropy-shaped advantage (Cheng et al., "Reasoning with Exploration: An Entropy Perspective", arXiv 2506.14758).

    A'_t = A + min(alpha * sg(H_t), |A| / kappa)

The entropy term is detached and clipped by |A| / kappa so it never flips the sign of the advantage. The shaped
advantage goes through the PPO/GRPO surrogate. Defaults alpha = 0.4, kappa = 2.

Deviations from the paper / official code: kappa = 2 is from memory of the paper ([R] in methods.md); the SIREN
repository's baseline uses kappa = 1. H_t is the current policy's entropy (detached), from ``entropy`` or ``logits``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_float
from rlvr_entropy.methods.base import Method, PGConfig, register_method


def shaped_advantages(advantages: torch.Tensor, entropy: torch.Tensor, alpha: float, kappa: float) -> torch.Tensor:
    """A' = A + min(alpha * H, |A| / kappa). advantages, entropy [B, T] (detached) -> [B, T]."""
    return advantages + torch.minimum(alpha * entropy.detach(), advantages.abs() / kappa)


@dataclass(frozen=True)
class EntropyAdvantageConfig(PGConfig):
    """Entropy-based advantage shaping (arXiv 2506.14758)."""

    alpha: float = 0.4
    """Entropy scale alpha."""
    kappa: float = 2.0
    """Clip ratio kappa: the entropy term is at most |A| / kappa (SIREN repo baseline: 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("alpha", self.alpha, lo=0.0)
        check_float("kappa", self.kappa, lo=0.0, lo_open=True)


@register_method
class EntropyAdvantage(Method):
    name = "entropy_advantage"
    detached_inputs = ("entropy", "logits")
    Config = EntropyAdvantageConfig

    @classmethod
    def neutral_overrides(cls):
        return {"alpha": 0.0}

    def _loss(self, batch, *, new_step):
        h = batch.current_entropy(self.name).detach()
        adv = batch.token_advantages()
        shaped = batch.clean(shaped_advantages(adv, h, self.config.alpha, self.config.kappa))
        terms = self.pg_terms(batch, shaped)
        loss = self.aggregate(terms.loss, batch.mask)
        metrics = self.pg_metrics(terms, batch)
        metrics.update({"bonus_mean": masked_mean(shaped - adv, batch.mask), "entropy": masked_mean(h, batch.mask)})
        return loss, metrics
