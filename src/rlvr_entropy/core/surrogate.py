"""The PPO/GRPO clipped surrogate per token, shared by every method.

Token loss (PPO, arXiv 1707.06347; clip-higher, DAPO arXiv 2503.14476; dual-clip, arXiv 1912.09729):
    r = exp(clamp(log_prob - old_log_prob, -c, c))
    l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    l = min(l, -dual_clip A)  where A < 0 (only when dual_clip is set)
The log-ratio clamp (c = 20, as in verl's vanilla loss) keeps exp finite.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PGTerms:
    """Per-token pieces of the surrogate, all [B, T]."""

    loss: torch.Tensor          # l_t, with gradient through log_prob
    ratio: torch.Tensor         # r_t, with gradient
    log_ratio: torch.Tensor     # clamped log r_t, with gradient
    clipped: torch.Tensor       # bool: the clip bound is active (zero gradient from the surrogate)
    dual_clipped: torch.Tensor  # bool: the dual-clip bound is active (A < 0 and r > dual_clip)

    def coef(self, advantages: torch.Tensor) -> torch.Tensor:
        """Signed update coefficient w_t = A r for tokens the surrogate still pushes, 0 where a bound is active.

        The gradient of l_t with respect to log_prob is -w_t. Detached.
        """
        active = ~(self.clipped | self.dual_clipped)
        return torch.where(active, advantages * self.ratio.detach(), torch.zeros_like(advantages))


def ppo_token_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, *,
                   eps_low: float, eps_high: float, dual_clip: float | None = None,
                   clamp_log_ratio: float = 20.0) -> PGTerms:
    """Clipped surrogate per token. All inputs [B, T] (advantages already broadcast, padding already zeroed)."""
    log_ratio = torch.clamp(log_prob - old_log_prob.detach(), -clamp_log_ratio, clamp_log_ratio)
    ratio = torch.exp(log_ratio)
    l1 = -advantages * ratio
    l2 = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(l1, l2)
    clipped = l2 > l1
    if dual_clip is not None:
        l3 = -advantages * dual_clip
        dual = (advantages < 0) & (loss > l3)
        loss = torch.where(advantages < 0, torch.minimum(loss, l3), loss)
    else:
        dual = torch.zeros_like(clipped)
    return PGTerms(loss=loss, ratio=ratio, log_ratio=log_ratio, clipped=clipped, dual_clipped=dual)
