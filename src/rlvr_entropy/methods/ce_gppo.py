"""CE-GPPO (arXiv 2509.20712): gradient-preserving clipping. Tokens outside the clip region keep a bounded gradient
through a stop-gradient ratio instead of none:

    A < 0 and r < 1 - eps_low:   l = -b1 (1 - eps_low) (r / sg(r)) A
    A > 0 and r > 1 + eps_high:  l = -b2 (1 + eps_high) (r / sg(r)) A
    otherwise:                   l = -r A            (dual-clipped at -c A for A < 0 when dual_clip is set)

Defaults b1 = 0.5 (paper range 0.5..0.75), b2 = 1.0, eps 0.2 / 0.2.

Deviations from the paper / official code: the loss VALUE of an out-of-region token is reported as the clipped PPO
value -(1 -/+ eps) A, with the gradient scaled by b1 / b2 exactly as in the paper
(l = -(1 - eps_low) A (1 + b1 (r / sg(r) - 1))). The gradients equal the paper's; the value differs by a constant,
which makes b1 = b2 = 0 exactly the PPO/GRPO loss (value and gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_float
from rlvr_entropy.methods.base import Method, PGConfig, register_method


def ce_gppo_token_loss(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float, b1: float,
                       b2: float, dual_clip: float | None = None):
    """Per-token CE-GPPO loss [B, T] and the two out-of-region masks. ``ratio`` carries the gradient."""
    a = advantages
    grad_path = ratio / ratio.detach() - 1.0  # value 0, gradient d log r
    low = (a < 0) & (ratio < 1 - eps_low)
    high = (a > 0) & (ratio > 1 + eps_high)
    inside = -a * ratio
    if dual_clip is not None:
        inside = torch.where(a < 0, torch.minimum(inside, -a * dual_clip), inside)
    l_low = -(1 - eps_low) * a * (1 + b1 * grad_path)
    l_high = -(1 + eps_high) * a * (1 + b2 * grad_path)
    loss = torch.where(low, l_low, torch.where(high, l_high, inside))
    return loss, low, high


@dataclass(frozen=True)
class CEGPPOConfig(PGConfig):
    """CE-GPPO (arXiv 2509.20712)."""

    b1: float = 0.5
    """Gradient scale beta_1 for A < 0 tokens below 1 - eps_low (paper: 0.5..0.75)."""
    b2: float = 1.0
    """Gradient scale beta_2 for A > 0 tokens above 1 + eps_high (paper: 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("b1", self.b1, lo=0.0)
        check_float("b2", self.b2, lo=0.0)


@register_method
class CEGPPO(Method):
    name = "ce_gppo"
    Config = CEGPPOConfig

    @classmethod
    def neutral_overrides(cls):
        return {"b1": 0.0, "b2": 0.0}

    def _loss(self, batch, *, new_step):
        c = self.config
        adv = batch.token_advantages()
        terms = self.pg_terms(batch, adv)
        loss_mat, low, high = ce_gppo_token_loss(terms.ratio, adv, c.eps_low, c.eps_high, c.b1, c.b2, c.dual_clip)
        loss = self.aggregate(loss_mat, batch.mask)
        metrics = self.pg_metrics(terms, batch)
        metrics.update({"low_frac": masked_mean(low.float(), batch.mask),
                        "high_frac": masked_mean(high.float(), batch.mask)})
        return loss, metrics
