"""Adaptive entropy bonus with Skywork-OR1's controller (arXiv 2505.22312, section 3.2.4).

At the end of every optimizer step (``Method.end_step``):

    H   = token-mean entropy of the step's valid tokens (detached; every micro-batch of the step, every rank)
    c  <- clip(c + delta if H < H_target else c - delta, c_min, c_max)

and on every call of the next step

    L = L_PG - c * 1[H < H_target] * agg(H_t)

with agg the PG term's ``loss_agg_mode``. Defaults (Skywork-OR1; methods.md [V]): H_target 0.2, delta 1e-4,
c in [0, 0.005], c_0 = 0. The coefficient lives in an :class:`~rlvr_entropy.controllers.AdaptiveCoefficient`
exposed through ``controllers()`` (saved by ``state_dict()``). ``coef_max = 0`` is exactly grpo.

Deviations from the paper / official code:
- Order: as TRL 1.16 (``use_adaptive_entropy``): the coefficient and gate applied in step k come from the entropy
  measured over step k - 1's whole batch (every micro-batch of the accumulation window, every rank), so there is
  no bonus in the first step. TRL compares with ``<=``, Skywork-OR1 (and this module) with ``<``; they differ only
  when H equals the target exactly.
- H is the mean entropy of the full next-token distribution under the current parameters
  (``TokenBatch.current_entropy``); how Skywork-OR1's trainer measures e_k (which batch, before or after the
  update) was not checked. On-policy, at the first micro-batch, current and rollout policy agree.
- A step with no valid token (on every rank) leaves the controller unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.controllers.adaptive import AdaptiveCoefficient
from rlvr_entropy.core.aggregation import masked_mean, masked_sum
from rlvr_entropy.core.validation import check_float
from rlvr_entropy.methods.base import Method, PGConfig, register_method


@dataclass(frozen=True)
class AdaptiveEntropyConfig(PGConfig):
    """Skywork-OR1 adaptive entropy control (arXiv 2505.22312, section 3.2.4)."""

    target: float = 0.2
    """Target entropy tgt-ent (nats) of Skywork-OR1 (arXiv 2505.22312): the bonus is on only while H < target."""
    delta: float = 1e-4
    """Coefficient step Delta per optimizer step (arXiv 2505.22312)."""
    coef_min: float = 0.0
    """Lower bound of the coefficient c (arXiv 2505.22312: 0)."""
    coef_max: float = 0.005
    """Upper bound of the coefficient c (arXiv 2505.22312: 0.005); 0 = grpo."""
    coef_init: float = 0.0
    """Initial coefficient c_0 (arXiv 2505.22312: 0); must lie in [coef_min, coef_max]."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("target", self.target, lo=0.0)
        check_float("delta", self.delta, lo=0.0)
        check_float("coef_min", self.coef_min, lo=0.0)
        check_float("coef_max", self.coef_max, lo=0.0)
        if self.coef_min > self.coef_max:
            raise ValueError(f"coef_min ({self.coef_min}) must be <= coef_max ({self.coef_max})")
        check_float("coef_init", self.coef_init, lo=self.coef_min, hi=self.coef_max)


@register_method
class AdaptiveEntropy(Method):
    name = "adaptive_entropy"
    Config = AdaptiveEntropyConfig
    observes = ("entropy_sum", "tokens")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        self.ctrl = AdaptiveCoefficient(c.target, c.delta, c.coef_min, c.coef_max, c.coef_init)

    def controllers(self):
        return {"coef": self.ctrl}

    @classmethod
    def neutral_overrides(cls):
        return {"coef_max": 0.0}

    def _loss(self, batch, *, new_step):
        h = batch.current_entropy(self.name)                 # [B, T], with gradient when given / from logits
        self.observe(entropy_sum=masked_sum(h.detach().to(torch.float64), batch.mask), tokens=batch.mask.sum())
        active = self.ctrl.active()
        coef = self.ctrl.coef if active else 0.0
        terms = self.pg_terms(batch)
        pg = self.aggregate(terms.loss, batch.mask)
        loss = pg - coef * self.aggregate(h, batch.mask) if coef != 0.0 else pg
        metrics = self.pg_metrics(terms, batch)
        metrics.update({
            "coefficient": self.ctrl.coef,
            "applied_coefficient": coef,
            "target": self.config.target,
            "entropy": masked_mean(h.detach(), batch.mask),
            "active": float(active),
        })
        metrics["measured_entropy"] = float("nan") if self.ctrl.last_entropy is None else self.ctrl.last_entropy
        return loss, metrics

    def _update(self, sums):
        if sums["tokens"] > 0:
            self.ctrl.update(sums["entropy_sum"] / sums["tokens"])
