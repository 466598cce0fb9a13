"""STEER: entropy-change-aware token reweighting (Rethinking Entropy Interventions in RLVR: An Entropy Change
Perspective, arXiv 2510.10150; official code github.com/zz-haooo/STEER, loss mode "entropy_control").

For a softmax policy, one policy-gradient step changes the entropy at a state, to first order, by
Omega = -eta E[w (1 - pi)^2 (log pi + H)], w = I_clip r A. STEER estimates a per-token magnitude

    m_t = | (A_t / pi_old) * pi * (1 - pi)^k * (log pi + H_old) |        (no grad; k = 2 in the paper)

and maps it to a weight that damps the biggest movers:
- "exp" (paper): c = -ln(w_min) / max(M, 0.02), weight = clamp(exp(-c m), w_min, 1), M = max m over valid tokens
  (so the largest m gets w_min);
- "linear": weight = clamp(w_max - (m - m_min)(w_max - w_min)/(M - m_min), w_min, w_max), midpoint when M == m_min.
The detached weights multiply the per-token PPO loss after clipping (eps 0.2 / 0.28) and dual-clip (c = 10);
token-mean over valid tokens (the denominator is the token count, not the sum of weights).

Deviations from the paper / official code:
- Exponent k: the paper's k = 2 is the default; the released code at HEAD uses k = 1 (``exponent=1``).
- w_min: the released script uses 0.8 (default here); the paper's final version reports 0.7.
- H: the entropy of pi_old from ``TokenBatch.old_entropy``; when it is missing, the current entropy (detached) is
  used (exact on-policy).
- Scope: min/max over the micro-batch like the official code; a ``gather_fn`` (e.g. an all-gather) gives a global
  scope.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import (as_bool_mask, check_choice, check_finite_where, check_float, check_shape,
                                          check_tensor)
from rlvr_entropy.methods.base import Method, PGConfig, register_method

MAPPINGS = ("exp", "linear")


@torch.no_grad()
def steer_magnitude(log_prob, old_log_prob, advantages, entropy, mask, exponent: int = 2) -> torch.Tensor:
    """m_t = |(A / pi_old) pi (1 - pi)^k (log pi + H)| [B, T], 0 at padding and where non-finite."""
    pi = log_prob.detach().exp().clamp(1e-8, 1 - 1e-8)
    pi_old = old_log_prob.detach().exp().clamp(1e-8, 1.0)
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(pi)
    m = ((adv / pi_old) * pi * (1 - pi) ** exponent * (torch.log(pi) + entropy.detach())).abs()
    m = torch.where(torch.isfinite(m) & mask, m, torch.zeros_like(m))
    return m


def steer_token_weights(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        entropy: torch.Tensor, mask: torch.Tensor, *, weight_min: float = 0.8,
                        weight_max: float = 1.0, mapping: str = "exp", exponent: int = 2,
                        gather_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """STEER's token weights [B, T] (steer.md, "The weights"); no gradient; padding gets 0.

    log_prob, old_log_prob, entropy (of pi_old): [B, T]; advantages [B] or [B, T]; mask bool [B, T].
    ``gather_fn`` maps a 1-D tensor of local values to the values of every rank (global min/max scope).
    """
    for name, x in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("entropy", entropy)):
        check_tensor(name, x)
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must have shape [B, T], got {list(log_prob.shape)}")
    shape = tuple(log_prob.shape)
    mask = as_bool_mask("mask", mask)
    check_shape("mask", mask, shape)
    check_shape("old_log_prob", old_log_prob, shape)
    check_shape("entropy", entropy, shape)
    check_tensor("advantages", advantages)
    if advantages.dim() == 1:
        check_shape("advantages", advantages, shape[:1], "[B] or [B, T]")
    else:
        check_shape("advantages", advantages, shape, "[B] or [B, T]")
    for name, x in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("entropy", entropy)):
        check_finite_where(name, x, mask)
    check_float("weight_min", weight_min, lo=0.0, lo_open=True)
    check_float("weight_max", weight_max, lo=0.0, lo_open=True)
    if weight_min > weight_max:
        raise ValueError(f"weight_min ({weight_min}) must be <= weight_max ({weight_max})")
    check_choice("mapping", mapping, MAPPINGS)
    check_choice("exponent", exponent, (1, 2))
    with torch.no_grad():
        m = steer_magnitude(log_prob, old_log_prob, advantages, entropy, mask, exponent)
        if not bool(mask.any()) and gather_fn is None:
            return torch.zeros_like(m)
        big = torch.finfo(m.dtype).max
        local_max = torch.where(mask, m, torch.full_like(m, -big)).max().reshape(1)
        local_min = torch.where(mask, m, torch.full_like(m, big)).min().reshape(1)
        if gather_fn is not None:
            local_max = gather_fn(local_max).max().reshape(1)
            local_min = gather_fn(local_min).min().reshape(1)
        M, m_min = local_max[0], local_min[0]
        if mapping == "exp":
            c = -math.log(weight_min) / torch.clamp(M, min=0.02)
            w = torch.clamp(torch.exp(-c * m), weight_min, 1.0)
        else:
            span = M - m_min
            if float(span) > 0:
                w = torch.clamp(weight_max - (m - m_min) * (weight_max - weight_min) / span, weight_min, weight_max)
            else:
                w = torch.full_like(m, (weight_min + weight_max) / 2)
        return torch.where(mask, w, torch.zeros_like(w))


@dataclass(frozen=True)
class SteerConfig(PGConfig):
    """STEER (arXiv 2510.10150); PG settings of the paper: clip 0.2 / 0.28, dual-clip 10, token-mean."""

    eps_high: float = 0.28
    """Clip-higher epsilon_high (paper, after DAPO)."""
    dual_clip: float | None = 10.0
    """Dual-clip c (paper: 10)."""
    weight_min: float = 0.8
    """Smallest weight w_min (released script 0.8; paper's final version 0.7; ablation 0.5..0.8)."""
    weight_max: float = 1.0
    """Largest weight (exp mapping: 1; the linear mapping's script uses 0.8 / 1.2)."""
    mapping: str = "exp"
    """"exp" (paper's main form) or "linear"."""
    exponent: int = 2
    """k in (1 - pi)^k: 2 in the paper, 1 in the released code."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("weight_min", self.weight_min, lo=0.0, lo_open=True)
        check_float("weight_max", self.weight_max, lo=0.0, lo_open=True)
        if self.weight_min > self.weight_max:
            raise ValueError(f"weight_min ({self.weight_min}) must be <= weight_max ({self.weight_max})")
        if self.mapping == "exp" and self.weight_min > 1.0:
            raise ValueError(f"weight_min must be <= 1 with mapping='exp', got {self.weight_min}")
        check_choice("mapping", self.mapping, MAPPINGS)
        check_choice("exponent", self.exponent, (1, 2))


@register_method
class Steer(Method):
    name = "steer"
    Config = SteerConfig
    smooth_in_inputs = False  # weights are detached functions of log_prob

    @classmethod
    def neutral_overrides(cls):
        return {"weight_min": 1.0, "weight_max": 1.0}

    def _loss(self, batch, *, new_step):
        c = self.config
        ent = batch.old_entropy if batch.old_entropy is not None else batch.current_entropy(self.name).detach()
        w = steer_token_weights(batch.clean(batch.log_prob), batch.clean(batch.old_log_prob),
                                batch.token_advantages(), batch.clean(ent), batch.mask, weight_min=c.weight_min,
                                weight_max=c.weight_max, mapping=c.mapping, exponent=c.exponent,
                                gather_fn=self.gather_fn)
        terms = self.pg_terms(batch)
        loss = self.aggregate(w * terms.loss, batch.mask)
        with torch.no_grad():
            m = steer_magnitude(batch.clean(batch.log_prob), batch.clean(batch.old_log_prob), batch.token_advantages(),
                                batch.clean(ent), batch.mask, c.exponent)
            metrics = self.pg_metrics(terms, batch)
            metrics.update({
                "weight_mean": masked_mean(w, batch.mask),
                "weight_min": torch.where(batch.mask, w, torch.ones_like(w)).min() if bool(batch.mask.any())
                else torch.zeros(()),
                "frac_damped": masked_mean((w < 1).float(), batch.mask),
                "omega_max": m.max() if m.numel() else torch.zeros(()),
            })
        return loss, metrics
