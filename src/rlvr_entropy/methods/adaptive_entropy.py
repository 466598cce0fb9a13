"""Adaptive entropy bonus with Skywork-OR1's controller (arXiv 2505.22312, section 3.2.4).

Once per optimizer step (the first call with a new ``step``):

    H   = token-mean entropy of the batch's valid tokens (detached; every rank's tokens when ``gather_fn`` is set)
    c  <- clip(c + delta if H < H_target else c - delta, c_min, c_max)

and on every call of that step

    L = L_PG - c * 1[H < H_target] * agg(H_t)

with agg the PG term's ``loss_agg_mode``. Defaults (Skywork-OR1; methods.md [V]): H_target 0.2, delta 1e-4,
c in [0, 0.005], c_0 = 0. The coefficient lives in an :class:`~rlvr_entropy.controllers.AdaptiveCoefficient`
exposed through ``controllers()`` (saved by ``state_dict()``). ``coef_max = 0`` is exactly grpo.

Deviations from the paper / official code:
- Order: measure, update, then apply the updated c (methods.md's reading). If the paper's alpha_k = c_k 1[e_k <
  target] means c before the update with e_k (from memory, not checked), the applied coefficient here is one step
  of delta ahead of it (at most 1e-4 with the defaults). TRL 1.16 (``use_adaptive_entropy``) applies the coefficient
  and gate from the end of the previous step (one step of lag, no bonus in the first step), measures H over the
  whole gradient-accumulation window and compares with ``<=``; here H is the first micro-batch's entropy (all
  ranks' first micro-batches with ``gather_fn``).
- H is the mean entropy of the full next-token distribution under the current parameters
  (``TokenBatch.current_entropy``); how Skywork-OR1's trainer measures e_k (which batch, before or after the
  update) was not checked. On-policy, at the first micro-batch, current and rollout policy agree.
- A step whose first batch has no valid token (on every rank) leaves the controller unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.controllers.adaptive import AdaptiveCoefficient
from rlvr_entropy.core.aggregation import masked_mean, masked_sum
from rlvr_entropy.core.validation import check_float
from rlvr_entropy.methods.base import GatherFn, Method, PGConfig, register_method


@torch.no_grad()
def measure_entropy(entropy: torch.Tensor, mask: torch.Tensor, gather_fn: GatherFn | None = None) -> float | None:
    """Token-mean of ``entropy`` [B, T] over ``mask`` (bool [B, T]), over every rank when ``gather_fn`` (an
    all-gather concatenating 1-D tensors) is given; None when there is no valid token anywhere."""
    e = entropy.detach().to(torch.float64)
    local = torch.stack([masked_sum(e, mask), mask.sum().to(torch.float64)])  # [2]: sum, count
    if gather_fn is not None:  # a collective: every rank calls it, even with no valid token
        local = gather_fn(local).reshape(-1, 2).sum(0)
    total, count = (float(v) for v in local)
    return None if count == 0 else total / count


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
        if new_step:
            measured = measure_entropy(h, batch.mask, self.gather_fn)
            if measured is not None:
                self.ctrl.update(measured)
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
        if self.ctrl.last_entropy is not None:
            metrics["measured_entropy"] = self.ctrl.last_entropy
        return loss, metrics
