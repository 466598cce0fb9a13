"""STEER: entropy-change-aware token reweighting (Rethinking Entropy Interventions in RLVR: An Entropy Change
Perspective, arXiv 2510.10150; official code github.com/zz-haooo/STEER, loss mode "entropy_control" in
verl/trainer/ppo/core_algos.py).

For a softmax policy, one policy-gradient step changes the entropy at a state, to first order, by
Omega = -eta E[w (1 - pi)^2 (log pi + H)], w = I_clip r A. STEER estimates a per-token magnitude

    m_t = | (A_t / pi_old) * pi * (1 - pi)^k * (log pi + H_old) |        (no grad; k = 2 in the paper)

with pi clamped to [1e-8, 1 - 1e-8], pi_old to [1e-8, 1], non-finite m -> 0, and maps it to a weight that damps
the biggest movers (M, m_min: max / min of m over the valid tokens of the micro-batch):
- "exp" (paper's main form): c = -ln(w_min) / max(M, 0.02), weight = clamp(exp(-c m), w_min, 1) (the largest m
  gets w_min unless M < 0.02);
- "linear": weight = clamp(w_max - (m - m_min)(w_max - w_min)/(M - m_min), w_min, w_max), and the midpoint
  (w_min + w_max)/2 when M == m_min.
Padding gets weight 0. The detached weights multiply the per-token PPO loss after clipping (eps 0.2 / 0.28) and
dual-clip (c = 10):

    loss = agg_t( weight_t * l_t ),   token-mean: sum_t weight_t l_t / #valid tokens (not / sum of weights)

Deviations from the paper / official code:
- Exponent k: the paper's k = 2 is the default; the released code at HEAD uses k = 1 (``exponent=1``).
- w_min: the released script's 0.8 is the default; the paper's final version reports 0.7 (ablation 0.5..0.8).
  The linear mapping's script uses w_min = 0.8, w_max = 1.2 (pass them; the defaults are for "exp").
- H: the entropy of pi_old from ``TokenBatch.old_entropy`` (computed in the old-log-prob pass, as the official code
  does). When it is missing, the current entropy (``TokenBatch.entropy``, or computed from ``logits``) is used,
  detached: equal to H_old for the first update of each rollout (on-policy), an approximation afterwards.
- Scope: min/max over the micro-batch like the official code (``scope="micro_batch"``); ``scope="global"`` takes
  them over every rank through ``Method.gather_fn`` (one all-gather of two numbers).
- No gradient flows through the weights, so finite differences of the loss see a different function than autograd
  (``smooth_in_inputs = False``); the tests check the gradient against the surrogate with fixed weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.batch import TokenBatch
from rlvr_entropy.core.validation import (as_bool_mask, check_choice, check_finite_where, check_float, check_shape,
                                          check_tensor)
from rlvr_entropy.methods.base import Method, PGConfig, register_method

MAPPINGS = ("exp", "linear")
SCOPES = ("micro_batch", "global")
M_FLOOR = 0.02
"""Floor of M in the exponential mapping's rate c = -ln(w_min) / max(M, 0.02) (official code)."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def steer_magnitude(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    entropy: torch.Tensor, mask: torch.Tensor, exponent: int = 2) -> torch.Tensor:
    """m = |(A / pi_old) pi (1 - pi)^k (log pi + H)| [B, T], 0 at padding and where non-finite; no gradient.

    log_prob, old_log_prob, entropy (of pi_old) [B, T]; advantages [B] or [B, T]; mask bool [B, T]. Computed in
    float32 (float64 for float64 log_prob) whatever the input dtype. Inputs are not validated (see
    :func:`steer_token_weights`)."""
    cd = _compute_dtype(log_prob.dtype)
    pi = log_prob.detach().to(cd).exp().clamp(1e-8, 1 - 1e-8)               # [B, T]
    pi_old = old_log_prob.detach().to(cd).exp().clamp(1e-8, 1.0)            # [B, T]
    adv = advantages.detach().to(cd)
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(pi)
    m = ((adv / pi_old) * pi * (1 - pi) ** exponent * (torch.log(pi) + entropy.detach().to(cd))).abs()
    return torch.where(torch.isfinite(m) & mask, m, torch.zeros((), dtype=cd, device=m.device))


@torch.no_grad()
def _map_weights(m: torch.Tensor, mask: torch.Tensor, weight_min: float, weight_max: float, mapping: str,
                 gather_fn: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [B, T], M 0-dim) from magnitudes m [B, T] (>= 0, finite). M is -inf when no token is valid."""
    inf = torch.tensor(math.inf, dtype=m.dtype, device=m.device)
    local = torch.stack([torch.where(mask, m, -inf).amax() if m.numel() else -inf,
                         torch.where(mask, m, inf).amin() if m.numel() else inf])  # [2]: max, min
    if gather_fn is not None:  # every rank must call it (a collective), even with no valid token
        allv = gather_fn(local).reshape(-1, 2)
        local = torch.stack([allv[:, 0].amax(), allv[:, 1].amin()])
    M, m_min = local[0], local[1]
    if mapping == "exp":
        c = -math.log(weight_min) / torch.clamp(M, min=M_FLOOR)
        w = torch.clamp(torch.exp(-c * m), weight_min, 1.0)
    else:
        span = M - m_min
        if bool(span > 0):
            w = torch.clamp(weight_max - (m - m_min) * ((weight_max - weight_min) / span), weight_min, weight_max)
        else:  # one distinct value (or no valid token): the midpoint
            w = torch.full_like(m, (weight_min + weight_max) / 2)
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device)), M


def _check_weight_args(weight_min: float, weight_max: float, mapping: str, exponent: int) -> None:
    check_float("weight_min", weight_min, lo=0.0, lo_open=True)
    check_float("weight_max", weight_max, lo=0.0, lo_open=True)
    if weight_min > weight_max:
        raise ValueError(f"weight_min ({weight_min}) must be <= weight_max ({weight_max})")
    check_choice("mapping", mapping, MAPPINGS)
    if mapping == "exp" and weight_min > 1.0:
        raise ValueError(f"weight_min must be in (0, 1] with mapping='exp', got {weight_min!r}")
    if isinstance(exponent, bool):
        raise ValueError(f"exponent must be one of [1, 2], got {exponent!r}")
    check_choice("exponent", exponent, (1, 2))


def steer_token_weights(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        entropy: torch.Tensor, mask: torch.Tensor, *, weight_min: float = 0.8,
                        weight_max: float = 1.0, mapping: str = "exp", exponent: int = 2,
                        gather_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """STEER's token weights [B, T] (steer.md, "The weights (what the code does)"); no gradient.

    log_prob, old_log_prob, entropy (of pi_old over the full vocabulary): [B, T]; advantages [B] or [B, T];
    mask bool [B, T]. Padded positions may hold anything (NaN included) and get weight 0; a batch with no valid
    token gets all zeros. ``mapping`` "exp" uses ``weight_min`` only (weights in [weight_min, 1]); "linear" uses
    both bounds. ``exponent`` is k in (1 - pi)^k (paper 2, released code 1).

    ``gather_fn`` (global scope) is an all-gather: it receives the local [max, min] of m (a 1-D tensor of 2) and
    returns every rank's pairs concatenated (a tensor of 2 x ranks); the weights then use the global extremes.
    Without it the extremes are those of this call (the micro-batch, as in the official code). Weights are float32
    (float64 for float64 log_prob).
    """
    for name, x in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("entropy", entropy)):
        check_tensor(name, x)
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must have shape [B, T], got {list(log_prob.shape)}")
    shape = tuple(log_prob.shape)
    mask = as_bool_mask("mask", mask)
    check_shape("mask", mask, shape, "same as log_prob")
    check_shape("old_log_prob", old_log_prob, shape, "same as log_prob")
    check_shape("entropy", entropy, shape, "same as log_prob")
    check_tensor("advantages", advantages)
    check_shape("advantages", advantages, shape[:1] if advantages.dim() == 1 else shape, "[B] or [B, T]")
    for name, x in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("entropy", entropy)):
        check_finite_where(name, x, mask)
    _check_weight_args(weight_min, weight_max, mapping, exponent)
    m = steer_magnitude(log_prob, old_log_prob, advantages, entropy, mask, exponent)
    return _map_weights(m, mask, weight_min, weight_max, mapping, gather_fn)[0]


@dataclass(frozen=True)
class SteerConfig(PGConfig):
    """STEER (arXiv 2510.10150); PG settings of the paper: clip 0.2 / 0.28, dual-clip 10, token-mean."""

    eps_high: float = 0.28
    """Clip-higher epsilon_high (arXiv 2510.10150, after DAPO arXiv 2503.14476: 0.28)."""
    dual_clip: float | None = 10.0
    """Dual-clip c for A < 0 (arXiv 2510.10150 training setup: 10)."""
    weight_min: float = 0.8
    """Smallest weight w_min (arXiv 2510.10150: released script 0.8; paper's final version 0.7; ablation 0.5..0.8)."""
    weight_max: float = 1.0
    """Largest weight w_max, used by mapping="linear" only (the linear script uses 0.8 / 1.2); "exp" caps at 1."""
    mapping: str = "exp"
    """Weight mapping of m (arXiv 2510.10150): "exp" (the paper's main form) or "linear"."""
    exponent: int = 2
    """k in (1 - pi)^k of the entropy-change estimate (arXiv 2510.10150 eq. for delta(a|s): 2; released code: 1)."""
    scope: str = "micro_batch"
    """Population of M and m_min: "micro_batch" (official code) or "global" (every rank, via Method.gather_fn)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_weight_args(self.weight_min, self.weight_max, self.mapping, self.exponent)
        check_choice("scope", self.scope, SCOPES)


@register_method
class Steer(Method):
    """STEER; see the module docstring. Reads ``old_entropy`` (entropy of pi_old), else the current entropy."""

    name = "steer"
    Config = SteerConfig
    smooth_in_inputs = False  # weights are stop-gradient functions of log_prob
    detached_inputs = ("entropy",)
    zero_advantage_rows_inert = True  # token losses and magnitudes m are multiples of A (m = 0 on such rows)

    @classmethod
    def neutral_overrides(cls):
        return {"weight_min": 1.0, "weight_max": 1.0}

    def old_entropy(self, batch: TokenBatch) -> torch.Tensor:
        """H of pi_old [B, T] (0 at padding, detached): ``old_entropy``, else the current entropy."""
        if batch.old_entropy is not None:
            return batch.clean(batch.old_entropy.detach())
        if batch.entropy is None and batch.logits is None:
            raise ValueError(f"method {self.name!r} needs TokenBatch.old_entropy (the entropy of pi_old); "
                             "without it, pass entropy or logits (the current entropy is used, detached)")
        return batch.current_entropy(self.name).detach()

    def _loss(self, batch, *, new_step):
        c = self.config
        mask = batch.mask
        adv = batch.token_advantages()
        m = steer_magnitude(batch.clean(batch.log_prob), batch.clean(batch.old_log_prob), adv,
                            self.old_entropy(batch), mask, c.exponent)
        gather = self.gather_fn if c.scope == "global" else None
        w, M = _map_weights(m, mask, c.weight_min, c.weight_max, c.mapping, gather)
        terms = self.pg_terms(batch, adv)
        loss = self.aggregate(w.to(terms.loss.dtype) * terms.loss, mask)
        with torch.no_grad():
            metrics = self.pg_metrics(terms, batch)
            any_valid = bool(mask.any())
            zero = torch.zeros((), dtype=w.dtype)
            metrics.update({
                "weight_mean": masked_mean(w, mask),
                "weight_min": torch.where(mask, w, torch.ones_like(w)).amin() if any_valid else zero,
                "frac_damped": masked_mean((w < 1).float(), mask),
                "omega_max": M if bool(torch.isfinite(M)) else zero,
            })
        return loss, metrics
