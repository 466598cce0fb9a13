"""Adaptive entropy bonus with Skywork-OR1's controller (arXiv 2505.22312, section 3.2.4).

Each optimizer step (the first call with a new ``step``): measure the batch's token-mean entropy H (detached),
update c <- clip(c + delta if H < H_target else c - delta, c_min, c_max), then apply
L = L_PG - c * agg(H_t) only while H < H_target.

Defaults: H_target 0.2, delta 1e-4, c in [0, 0.005], c_0 = 0 (Skywork-OR1; also TRL 1.16's
``use_adaptive_entropy``). The coefficient lives in an :class:`~rlvr_entropy.controllers.AdaptiveCoefficient`
saved in ``state_dict()``.

Deviations from the paper / official code: H is measured on the batch the method sees at the first call of a step
(the first micro-batch when an engine splits a step); TRL measures it over the whole accumulation window and applies
the update on the next step. Here the update uses the current step's measurement.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.controllers.adaptive import AdaptiveCoefficient
from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_float
from rlvr_entropy.methods.base import Method, PGConfig, register_method


@dataclass(frozen=True)
class AdaptiveEntropyConfig(PGConfig):
    """Skywork-OR1 adaptive entropy control (arXiv 2505.22312)."""

    target: float = 0.2
    """Target entropy H_target (nats)."""
    delta: float = 1e-4
    """Coefficient step per optimizer step."""
    coef_min: float = 0.0
    """Lower bound of the coefficient."""
    coef_max: float = 0.005
    """Upper bound of the coefficient."""
    coef_init: float = 0.0
    """Initial coefficient c_0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("target", self.target, lo=0.0)
        check_float("delta", self.delta, lo=0.0)
        check_float("coef_min", self.coef_min, lo=0.0)
        check_float("coef_max", self.coef_max, lo=0.0)
        if self.coef_min > self.coef_max:
            raise ValueError(f"coef_min ({self.coef_min}) must be <= coef_max ({self.coef_max})")
        check_float("coef_init", self.coef_init, lo=0.0)


@register_method
class AdaptiveEntropy(Method):
    name = "adaptive_entropy"
    Config = AdaptiveEntropyConfig

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        self.ctrl = AdaptiveCoefficient(c.target, c.delta, c.coef_min, c.coef_max, c.coef_init)

    def controllers(self):
        return {"coef": self.ctrl}

    @classmethod
    def neutral_overrides(cls):
        return {"coef_max": 0.0, "coef_init": 0.0}

    def _loss(self, batch, *, new_step):
        terms = self.pg_terms(batch)
        pg = self.aggregate(terms.loss, batch.mask)
        h = batch.current_entropy(self.name)
        h_mean = masked_mean(h.detach(), batch.mask)
        if new_step and bool(batch.mask.any()):
            self.ctrl.update(float(h_mean))
        coef = self.ctrl.coef if self.ctrl.active() else 0.0
        loss = pg - coef * self.aggregate(h, batch.mask) if coef != 0.0 else pg
        metrics = self.pg_metrics(terms, batch)
        metrics.update({"coef": self.ctrl.coef, "applied_coef": coef, "entropy": h_mean,
                        "target": self.config.target, "active": float(self.ctrl.active())})
        return loss, metrics
