"""Entropy-shaped advantage (Cheng et al., "Reasoning with Exploration: An Entropy Perspective", arXiv 2506.14758).

    A'_t = A_t + min(alpha * sg(H_t), |A_t| / kappa)

then the usual clipped surrogate with A' in place of A. The entropy term is detached (sg: it shapes the advantage,
no gradient flows into the entropy) and capped at |A| / kappa, so for kappa >= 1 it never flips the sign of a
negative advantage and it is 0 wherever A = 0 (groups with all-equal rewards stay without gradient). Defaults:
alpha = 0.4, kappa = 2.

H_t is the current policy's entropy at each valid token, from ``TokenBatch.current_entropy`` (the given ``entropy``,
else computed from ``logits``), detached. Advantages may be per response [B] or per token [B, T].

Deviations from the paper / official code: kappa = 2 is from memory of the paper (methods.md marks it [R]); the
SIREN repository's baseline uses kappa = 1. alpha = 0.4 is the paper's value as given in methods.md. The official
code was not read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_float
from rlvr_entropy.methods.base import Method, PGConfig, register_method


def entropy_bonus_term(advantages: torch.Tensor, entropy: torch.Tensor, alpha: float, kappa: float) -> torch.Tensor:
    """psi_t = min(alpha * sg(H_t), |A_t| / kappa). advantages, entropy [B, T] -> [B, T], detached."""
    return torch.minimum(alpha * entropy.detach(), advantages.detach().abs() / kappa)


def shaped_advantages(advantages: torch.Tensor, entropy: torch.Tensor, alpha: float, kappa: float) -> torch.Tensor:
    """A' = A + min(alpha * sg(H), |A| / kappa). advantages, entropy [B, T] -> [B, T], detached."""
    return advantages.detach() + entropy_bonus_term(advantages, entropy, alpha, kappa)


@dataclass(frozen=True)
class EntropyAdvantageConfig(PGConfig):
    """Entropy-based advantage shaping (arXiv 2506.14758)."""

    alpha: float = 0.4
    """Entropy scale alpha of arXiv 2506.14758 (0.4); 0 = grpo."""
    kappa: float = 2.0
    """Cap ratio kappa of arXiv 2506.14758: the entropy term is at most |A| / kappa (2, from memory [R];
    the SIREN repository's baseline uses 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("alpha", self.alpha, lo=0.0)
        check_float("kappa", self.kappa, lo=0.0, lo_open=True)


@register_method
class EntropyAdvantage(Method):
    name = "entropy_advantage"
    Config = EntropyAdvantageConfig
    detached_inputs = ("entropy", "logits")

    @classmethod
    def neutral_overrides(cls):
        return {"alpha": 0.0}

    def _loss(self, batch, *, new_step):
        c = self.config
        h = batch.current_entropy(self.name).detach()         # [B, T], 0 at padding
        adv = batch.token_advantages()                          # [B, T], 0 at padding
        bonus = batch.clean(entropy_bonus_term(adv, h, c.alpha, c.kappa))
        shaped = adv + bonus
        terms = self.pg_terms(batch, shaped)
        loss = self.aggregate(terms.loss, batch.mask)
        metrics = self.pg_metrics(terms, batch)
        with torch.no_grad():
            capped = (adv.abs() / c.kappa < c.alpha * h) & batch.mask
            metrics.update({
                "bonus_mean": masked_mean(bonus, batch.mask),
                "capped_frac": masked_mean(capped.to(h.dtype), batch.mask),
                "entropy": masked_mean(h, batch.mask),
            })
        return loss, metrics
