"""GRPO / PPO clipped surrogate: the baseline every other method modifies.

Loss: agg( max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)) [dual-clipped at -c A for A < 0] ).
References: PPO (Schulman et al., arXiv 1707.06347), GRPO (Shao et al., arXiv 2402.03300), clip-higher and
token-mean (DAPO, arXiv 2503.14476), dual-clip (Ye et al., arXiv 1912.09729), Dr. GRPO's fixed-length
normalization (arXiv 2503.20783, "seq-mean-token-sum-norm").

Defaults: eps_low = eps_high = 0.2, no dual-clip, token-mean (DAPO's aggregation; GRPO's paper used
seq-mean-token-mean). No KL term: RLVR recipes (DAPO, SIREN, STEER) drop it.

Deviations from verl's vanilla loss (verl/trainer/ppo/core_algos.py): dual-clip is off unless set (verl always
applies c = 3), and an all-padding batch gives 0 instead of NaN. With dual_clip=3 the values are equal.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlvr_entropy.methods.base import Method, PGConfig, register_method


@dataclass(frozen=True)
class GRPOConfig(PGConfig):
    """PPO/GRPO clipped surrogate; see :class:`PGConfig` for every field."""


@register_method
class GRPO(Method):
    name = "grpo"
    Config = GRPOConfig
    zero_advantage_rows_inert = True  # every token's loss is a multiple of its advantage

    def _loss(self, batch, *, new_step):
        terms = self.pg_terms(batch)
        loss = self.aggregate(terms.loss, batch.mask)
        return loss, self.pg_metrics(terms, batch)

    @classmethod
    def neutral_overrides(cls):
        return {}
