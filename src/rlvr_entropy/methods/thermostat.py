"""Thermostat: closed-loop entropy control with exact first-order entropy-change predictions (this library).

The two seed methods are open-loop: SIREN pulls a selected entropy toward a fixed anchor with a fixed coefficient;
STEER damps the tokens with the largest *estimated* entropy change whatever its direction and whatever the current
entropy, with a closed form that tracks the true first-order change poorly. Thermostat closes the loop:

1. Predict each token's first-order entropy change for the update the surrogate is about to make, exactly, from
   its logits (steer.md, last section):
       d_t = -w_t [pi_a (log pi_a + H) - sum_k pi_k^2 (log pi_k + H)],   w_t = A_t r_t if the token is not clipped,
   else 0 (the gradient of the clipped surrogate with respect to log pi is -w_t).
2. Keep a floor H* = m x H0 under the token-mean entropy, H0 measured at the first step (saved like SIREN's
   anchor). Its level m follows the training batch's reach (the share of prompts whose group solved at least one
   sample, controllers/reach.py): it descends while the reach holds and rises when the reach falls more than
   ``reach_tol`` below its first steps' mean, so the floor gives way where losing entropy costs no reach and holds
   entropy where it does. (``reach_tol=None``: a fixed floor ramping linearly to 0.7 x H0 over 40 steps, for an
   engine whose batches carry no group statistics.) A one-sided PI controller on the relative error
   e = (H* - H) / H* gives u in [0, 1]: the share of the batch's predicted entropy movement S = mean_t |d_t| to
   cancel. Entropy above the floor is left alone (u = 0: plain GRPO).
3. Damp only the tokens that push entropy down (d_t < 0) so that the weighted predicted batch change rises by u S:
   each gets weight clip(1 - c e_t, weight_min, 1) with e_t = |d_t| / |A_t r_t| (its entropy change per unit of
   policy-gradient coefficient) and c solved exactly, the minimizer of sum_t |A_t r_t| (1 - weight_t)^2 under that
   cancellation. The tokens that move entropy most per unit of learning signal give way first; near-deterministic
   positions (arithmetic, formatting) keep learning; every other token keeps weight 1.

The controller's step: the PI update runs in ``Method.end_step``, once per optimizer step, from the entropy
measured over that step's whole batch (every micro-batch, every rank); step k's weights use the u computed at the
end of step k - 1 (none in the first step, which measures H0).

Why this form: weights never exceed 1, so the controller can only slow updates (no explosion from the controller
itself, unlike an entropy bonus); at or above the floor it is GRPO exactly; one closed-form scalar per batch.
Options that lost on the design seeds (two-sided control, one uniform weight, restricting control to SIREN's or
the peak positions, damping by advantage sign or only the high-probability quadrants, boosting the right-way
tokens, renormalized weights, a difficulty split by group success, a final annealing phase with or without an
entropy penalty) left the method; their measurements are in docs/methods/thermostat.md and thermostat_design.md.

Deviations: the prediction is for a step on the logits (tabular softmax), not for Adam on the network weights; only
its direction and relative size are used, and the controller corrects the residual through the measured entropy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy import stats
from rlvr_entropy.controllers.pi import EntropyPI
from rlvr_entropy.controllers.reach import ReachFloor
from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_choice, check_float, check_int
from rlvr_entropy.methods.base import Method, PGConfig, register_method
from rlvr_entropy.stats import Stat


@dataclass(frozen=True)
class ThermostatConfig(PGConfig):
    """Closed-loop entropy control (this library). PG defaults follow DAPO (clip-higher, token-mean)."""

    eps_high: float = 0.28
    """Clip-higher epsilon_high (DAPO, arXiv 2503.14476)."""
    kp: float = 2.0
    """Proportional gain on the relative entropy error (H* - H) / H*."""
    ki: float = 0.2
    """Integral gain (per step) on the accumulated relative error."""
    i_max: float = 5.0
    """Anti-windup clamp of the integral term."""
    weight_min: float = 0.0
    """Smallest weight a damped token can get (1.0 disables damping)."""
    target: float | None = None
    """H0 in nats, the entropy the floor is a share of; None measures it at the first step (saved in state_dict)."""
    target_end: float | None = None
    """Fixed floor (reach_tol=None): optional absolute end point (nats) of its linear schedule; takes precedence
    over target_end_scale."""
    target_end_scale: float | None = 0.7
    """Fixed floor (reach_tol=None): end point of the schedule, x H0. 0.7 kept most of the pass@k gain at about
    GRPO's pass@1 on countdown3's design seeds (docs/methods/thermostat.md)."""
    schedule_steps: int | None = 40
    """Fixed floor (reach_tol=None): steps over which it moves linearly from H0 to its end point, then stays; None
    keeps it at H0. A ramp, not a jump: the controller does not fight the first steps' natural entropy drop."""
    reach_tol: float | None = 0.03
    """Reach-gated floor: the floor's level follows the training batch's reach (share of prompts whose group solved
    at least one sample; reads ``TokenBatch.group_reward``, rewards in [0, 1]): it descends while the reach holds
    and rises when it falls more than this below its reference (the mean of the first 10 steps;
    controllers/reach.py); the schedule fields are then unused. None: the fixed schedule (for an engine whose
    batches carry no group statistics). 0.03 won on the design seeds (docs/methods/thermostat.md)."""
    reach_gain: float = 0.5
    """Gain of the reach-gated floor (per step, on the reach error)."""
    reach_min_scale: float = 0.3
    """Lowest level of the reach-gated floor, x the first measured entropy."""
    actuator: str = "damp"
    """How the controller raises entropy: "damp" (weights <= 1 on the tokens predicted to lower it; reads the
    logits) or "pull" (a pull toward the reference policy with coefficient u x pull_coef; reads ref_log_prob)."""
    pull_coef: float = 0.5
    """actuator="pull": the pull's coefficient at u = 1 (per-token k3 term, aggregated like the surrogate)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("kp", self.kp, lo=0.0)
        check_float("ki", self.ki, lo=0.0)
        check_float("i_max", self.i_max, lo=0.0)
        check_float("weight_min", self.weight_min, lo=0.0, hi=1.0)
        if self.target is not None:
            check_float("target", self.target, lo=0.0, lo_open=True)
        if self.target_end is not None:
            check_float("target_end", self.target_end, lo=0.0, lo_open=True)
        check_int("schedule_steps", self.schedule_steps, lo=1, allow_none=True)
        if self.target_end_scale is not None:
            check_float("target_end_scale", self.target_end_scale, lo=0.0, lo_open=True)
        if self.reach_tol is not None:
            check_float("reach_tol", self.reach_tol, lo=0.0, hi=1.0)
        check_float("reach_gain", self.reach_gain, lo=0.0)
        check_float("reach_min_scale", self.reach_min_scale, lo=0.0, hi=1.0)
        check_choice("actuator", self.actuator, ("damp", "pull"))
        check_float("pull_coef", self.pull_coef, lo=0.0)


@torch.no_grad()
def entropy_bracket(logits: torch.Tensor, log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pi_a (log pi_a + H) - sum_k pi_k^2 (log pi_k + H) per token, [B, T] (0 at padding): the first-order entropy
    change per unit of policy-gradient coefficient, up to sign (d_t = -coef_t x this). Its absolute value is the
    efficiency that shares the damping (:func:`damping_weight`). logits [B, T, V], log_prob/mask [B, T]."""
    h, s2 = stats.entropy_change_terms(logits, mask)
    return _bracket(h, s2, log_prob, mask)


def _bracket(h: torch.Tensor, s2: torch.Tensor, log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`entropy_bracket` from the change terms (H, sum_k pi_k^2 (log pi_k + H)) [B, T]."""
    lpa = torch.where(mask, log_prob.detach().to(h.dtype), torch.zeros((), dtype=h.dtype))
    return torch.where(mask, lpa.exp() * (lpa + h) - s2, torch.zeros_like(h))


def _change(bracket: torch.Tensor, coef: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """d = -coef x bracket at valid positions, 0 at padding (whatever coef holds there)."""
    return torch.where(mask, -coef.to(bracket.dtype) * bracket, torch.zeros_like(bracket))


@torch.no_grad()
def predicted_change(logits: torch.Tensor, log_prob: torch.Tensor, coef: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Exact first-order entropy change per token divided by the learning rate, [B, T] (0 at padding).

    Same formula as ``stats.predicted_entropy_change(form="exact")`` but takes the sampled token's log-prob instead
    of its id (a TokenBatch has no ids); logits [B, T, V], log_prob/coef/mask [B, T].
    """
    return _change(entropy_bracket(logits, log_prob, mask), coef, mask)


def proportional_cut(amount: torch.Tensor, eff: torch.Tensor, need: float, cap: float) -> torch.Tensor:
    """Exact solution of the box-constrained allocation behind :func:`damping_weight`.

    amount [M] >= 0 (each token's |d_t| / N), eff [M] >= 0 (its entropy change per unit of policy-gradient
    coefficient), need >= 0, cap in (0, 1]. Returns the cuts x [M] = min(c eff, cap) with sum(x amount) = need
    (every x = cap when even that cannot cover ``need``). These minimize sum_t |coef_t| x_t^2 subject to the
    cancellation (KKT of a convex QP: x_t proportional to |d_t| / |coef_t| = eff_t, clipped to the box). c is
    found in closed form: sort by eff, evaluate the piecewise-linear cancellation at each breakpoint c_j = cap /
    eff_j, and solve the linear piece that contains ``need``.
    """
    if need <= 0.0 or amount.numel() == 0:
        return torch.zeros_like(amount)
    total = float(amount.sum()) * cap
    if need >= total:
        return torch.full_like(amount, cap)
    e, order = torch.sort(eff, descending=True)
    a = amount[order]
    ea = e * a
    cum_a = torch.cumsum(a, 0)
    tail = ea.sum() - torch.cumsum(ea, 0)  # sum over i > j of eff_i amount_i
    pos = e > 0
    f = torch.where(pos, cap * cum_a + cap / torch.where(pos, e, torch.ones_like(e)) * tail,
                    torch.full_like(e, total))
    j = int(torch.nonzero(f >= need)[0])  # first breakpoint whose cancellation reaches need
    sat_a = float(cum_a[j - 1]) if j > 0 else 0.0
    lin = float(tail[j - 1]) if j > 0 else float(ea.sum())
    c = (need - cap * sat_a) / lin if lin > 0 else 0.0
    return torch.clamp(c * eff, max=cap)


def damping_weight(d: torch.Tensor, mask: torch.Tensor, u: float, weight_min: float,
                   efficiency: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Closed-form weights [B, T]: the valid tokens that push entropy down (d < 0) get w_t = clip(1 - c
    efficiency_t, weight_min, 1), every other token 1.

    d [B, T] predicted changes, mask bool [B, T], u in [0, 1] the controller output: the damped set must cancel
    C = u S of predicted change, S = mean |d| over the valid tokens (N of them). ``efficiency`` [B, T] (>= 0:
    |d_t| / |coef_t|, the entropy change per unit of policy-gradient coefficient) shares the cut: c is solved
    exactly (:func:`proportional_cut`), the tokens that move entropy most per unit of learning signal give way
    first. Returns (weights, mean weight of the damped set; 1.0 when nothing is damped)."""
    ones = torch.ones_like(d)
    if u <= 0.0 or not bool(mask.any()):
        return ones, 1.0
    n = mask.sum().clamp(min=1)
    need = u * float(torch.where(mask, d.abs(), torch.zeros_like(d)).sum() / n)
    down = mask & (d < 0)
    if need <= 0.0 or not bool(down.any()):
        return ones, 1.0
    cut = proportional_cut(d[down].abs() / n, efficiency[down].to(d.dtype), need, 1.0 - weight_min)
    return ones.masked_scatter(down, 1.0 - cut), float((1.0 - cut).mean())


def pull_term(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, mask: torch.Tensor,
              clamp: float = 20.0) -> torch.Tensor:
    """k3_t = exp(delta) - delta - 1 with delta = ref_log_prob - log_prob (clamped to +-clamp), [B, T], 0 at padding.

    On tokens sampled from pi, its gradient with respect to log pi_t is 1 - pi_ref / pi: in expectation
    pi - pi_ref in logit space, the gradient of the forward KL(pi_ref || pi) at the visited position. It pulls
    every token toward its reference probability (down where pi over-weights it, up where pi under-weights it), so
    a mode the reference keeps is never driven to zero. log_prob (with gradient) / ref_log_prob / mask [B, T]."""
    delta = torch.clamp(ref_log_prob.detach() - log_prob, -clamp, clamp)
    return torch.where(mask, torch.exp(delta) - delta - 1.0, torch.zeros_like(delta))


@register_method
class Thermostat(Method):
    name = "thermostat"
    Config = ThermostatConfig
    needs = ("logits",)
    smooth_in_inputs = False  # weights are detached functions of log_prob and logits
    observes = ("entropy_sum", "tokens", "reach_rows", "rows")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        if c.actuator == "pull":
            self.needs = ("ref_log_prob",)
        gated = c.reach_tol is not None
        self.reach = ReachFloor(c.reach_tol, c.reach_gain, min_scale=c.reach_min_scale) if gated else None
        self.pi = EntropyPI(c.kp, c.ki, i_max=c.i_max, target=c.target, target_end=c.target_end,
                            schedule_steps=None if gated else c.schedule_steps,
                            target_end_scale=None if c.target_end is not None else c.target_end_scale, floor=True)

    def controllers(self):
        return {"pi": self.pi, **({"reach": self.reach} if self.reach is not None else {})}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if self.reach is not None:
            self.pi.target_scale = self.reach.m

    @classmethod
    def neutral_overrides(cls):
        return {"kp": 0.0, "ki": 0.0}

    def logits_requests(self) -> tuple[Stat, ...]:
        """The distribution statistics the loss reads (what an engine prefetches; rlvr_entropy.kernels)."""
        return (Stat.change_terms(),) if self.config.actuator == "damp" else ()

    def _loss(self, batch, *, new_step):
        c = self.config
        mask = batch.mask
        adv = batch.token_advantages()
        terms = self.pg_terms(batch, adv)
        h_tok = batch.current_entropy(self.name).detach()
        h_now = masked_mean(h_tok, mask)  # the controlled quantity: token-mean entropy
        self.observe(entropy_sum=torch.where(mask, h_tok.to(torch.float64), 0.0).sum(), tokens=mask.sum())
        if self.reach is not None and self._observing:  # rows whose group solved at least one sample
            if batch.group_reward is None:
                raise ValueError("thermostat's reach-gated floor (reach_tol) needs TokenBatch.group_reward (each "
                                 "response's group mean reward); pass it, or reach_tol=None for the fixed schedule")
            gr = batch.group_reward.detach()
            rows = mask.any(-1)
            bad = rows & ((gr < 0) | (gr > 1)).to(rows.device)
            if bool(bad.any()):
                raise ValueError(f"group_reward: the reach-gated floor reads rewards in [0, 1] (a group solved a "
                                 f"sample when its mean is > 0), got {float(gr[bad][0])}; rescale the rewards or "
                                 "set reach_tol=None")
            self.observe(reach_rows=(rows & (gr > 0).to(rows.device)).sum(), rows=rows.sum())
        if c.actuator == "pull":
            loss, act = self._pull(batch, terms, mask)
        else:
            loss, act = self._damp(batch, terms, adv, mask)
        with torch.no_grad():
            metrics = self.pg_metrics(terms, batch)
            metrics.update(act)
            metrics.update({
                "target": float(self.pi.target) if self.pi.target is not None else float("nan"),
                **({"reach_ema": self.reach.ema if self.reach.ema is not None else float("nan"),
                    "floor_scale": self.reach.m} if self.reach is not None else {}),
                "entropy": h_now,
                "error": self.pi.last_error,
                "u": self.pi.u,
                "integral": self.pi.integral,
            })
        return loss, metrics

    def _damp(self, batch, terms, adv, mask):
        c = self.config
        coef = terms.coef(adv)
        with torch.no_grad():  # one pass over the logits (or the lm_head source's shared pass)
            bracket = _bracket(*batch.stat(Stat.change_terms(), self.name), batch.clean(batch.log_prob), mask)
        d = _change(bracket, coef, mask)
        # |d_t| / |coef_t| where coef_t != 0: each token's entropy change per unit of policy-gradient coefficient
        w, lam = damping_weight(d, mask, self.pi.u, c.weight_min, bracket.abs())
        loss = self.aggregate(w * terms.loss, mask)
        with torch.no_grad():
            return loss, {"lambda": lam, "predicted_change": masked_mean(d, mask),
                          "predicted_change_weighted": masked_mean(w * d, mask),
                          "damped_frac": masked_mean((w < 1).float(), mask), "weight_mean": masked_mean(w, mask)}

    def _pull(self, batch, terms, mask):
        c = self.config
        k3 = pull_term(batch.clean(batch.log_prob), batch.clean(batch.ref_log_prob), mask, c.clamp_log_ratio)
        beta = self.pi.u * c.pull_coef
        loss = self.aggregate(terms.loss + beta * k3, mask) if beta > 0 else self.aggregate(terms.loss, mask)
        return loss, {"pull_coef": beta, "kl": masked_mean(k3.detach(), mask)}

    def _update(self, sums):
        if self.reach is not None and sums["rows"] > 0:  # the floor's level for this step's error
            self.pi.target_scale = self.reach.update(sums["reach_rows"] / sums["rows"])
        if sums["tokens"] > 0:  # the controlled quantity over the whole step, every rank
            self.pi.update(sums["entropy_sum"] / sums["tokens"])
