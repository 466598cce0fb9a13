"""Thermostat: closed-loop entropy control that restores entropy by pulling toward the reference policy (this
library).

The two seed methods are open-loop: SIREN pulls a selected entropy toward a fixed anchor with a fixed coefficient,
STEER damps the tokens with the largest estimated entropy change whatever the current entropy. Thermostat closes the
loop, and restores entropy where the reference policy (the model RL started from) had it:

1. Keep a floor H* = m x H0 under the batch's token-mean entropy, H0 measured at the first step (saved like SIREN's
   anchor). Its level m follows the training batch's reach (the share of prompts whose group solved at least one
   sample, controllers/reach.py): it descends while the reach holds and rises when the reach falls more than
   ``reach_tol`` below its first steps' mean, so the floor gives way where losing entropy costs no reach and holds
   entropy where it does. (``reach_tol=None``: a fixed floor ramping linearly to 0.7 x H0 over 40 steps, for an
   engine whose batches carry no group statistics.)
2. A one-sided PI controller on the relative error e = (H* - H) / H* gives u in [0, 1]. Entropy above the floor is
   left alone (u = 0: plain GRPO).
3. Below the floor the loss gains a pull toward the reference, coefficient u x ``pull_coef``:

       loss = agg(l_t + u pull_coef k3_t),   k3_t = exp(delta_t) - delta_t - 1,   delta_t = log pi_ref(o_t) - log pi(o_t)

   on the sampled tokens (:func:`pull_term`). Its gradient with respect to log pi_t is 1 - pi_ref / pi: over tokens
   drawn from pi it is pi - pi_ref in logit space, the gradient of the forward KL(pi_ref || pi) at the visited
   position. It is mass-covering: a move the reference keeps (a rarer valid operation at a forking position) is
   never driven to zero, and it adds entropy only where the reference had it, unlike an entropy bonus (toward
   uniform, and explosive) or damping the update (slower everywhere, design round 4).

Why the pull (docs/methods/thermostat.md, design round 4): on countdown3 GRPO's held-out problems that go from
solvable to unsolved are those whose solutions need a move the policy stopped choosing; the damping thermostat
(weights <= 1 on the tokens predicted to lower entropy) held entropy but not those moves, and paid for it in pass@1.
On the design seeds the pull gave a higher pass@1 at the same pass@8 on every task (the table there).

The controller's step: the PI update runs in ``Method.end_step``, once per optimizer step, from the entropy and the
reach measured over that step's whole batch (every micro-batch, every rank); step k's pull uses the u computed at
the end of step k - 1 (none in the first step, which measures H0).

Inputs: ``ref_log_prob`` (the reference's log-prob of each sampled token: TRL and verl compute it for their KL
term; docs/engines), the current entropy (``entropy``, or ``logits`` / ``lm_head``), ``group_reward`` for the
reach-gated floor. No logits are needed beyond the entropy.

Options that lost on the design seeds left the method (their measurements are in docs/methods/thermostat.md and
thermostat_design.md): the damping actuator (exact first-order entropy-change predictions and closed-form weights,
the thermostat's first design) and its variants (two-sided control, one uniform weight, restriction to SIREN's or
the peak positions, damping by advantage sign or quadrant, boosting, renormalizing, a difficulty split,
annealing).

Deviations: the pull is the sampled-token (k3) estimate of the forward KL's gradient, not the full-vocabulary forward
KL (which would need the reference's logits at every position); the log-ratio is clamped to +-clamp_log_ratio before
exp (verl's k3 clamps at +-20 too, and also clips the value at 10).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.controllers.pi import EntropyPI
from rlvr_entropy.controllers.reach import ReachFloor
from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_float, check_int
from rlvr_entropy.methods.base import Method, PGConfig, register_method


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
    pull_coef: float = 0.5
    """Coefficient of the pull toward the reference at full control (u = 1): loss + u x pull_coef x k3. 0.5 won
    against damping on the design seeds (docs/methods/thermostat.md, round 4); 0 disables the actuator (GRPO)."""
    target: float | None = None
    """H0 in nats, the entropy the floor is a share of; None measures it at the first step (saved in state_dict)."""
    target_end: float | None = None
    """Fixed floor (reach_tol=None): optional absolute end point (nats) of its linear schedule; takes precedence
    over target_end_scale."""
    target_end_scale: float | None = 0.7
    """Fixed floor (reach_tol=None): end point of the schedule, x H0."""
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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("kp", self.kp, lo=0.0)
        check_float("ki", self.ki, lo=0.0)
        check_float("i_max", self.i_max, lo=0.0)
        check_float("pull_coef", self.pull_coef, lo=0.0)
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
    needs = ("ref_log_prob",)
    observes = ("entropy_sum", "tokens", "reach_rows", "rows")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
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

    def _loss(self, batch, *, new_step):
        c = self.config
        mask = batch.mask
        terms = self.pg_terms(batch)
        h_tok = batch.current_entropy(self.name).detach()
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
        k3 = pull_term(batch.clean(batch.log_prob), batch.clean(batch.ref_log_prob), mask, c.clamp_log_ratio)
        beta = self.pi.u * c.pull_coef
        loss = self.aggregate(terms.loss + beta * k3, mask) if beta > 0 else self.aggregate(terms.loss, mask)
        with torch.no_grad():
            metrics = self.pg_metrics(terms, batch)
            metrics.update({
                "target": float(self.pi.target) if self.pi.target is not None else float("nan"),
                **({"reach_ema": self.reach.ema if self.reach.ema is not None else float("nan"),
                    "floor_scale": self.reach.m} if self.reach is not None else {}),
                "entropy": masked_mean(h_tok, mask),  # the controlled quantity: token-mean entropy
                "error": self.pi.last_error,
                "u": self.pi.u,
                "integral": self.pi.integral,
                "pull_coef": beta,
                "kl": masked_mean(k3.detach(), mask),  # k3 estimate of KL(pi || pi_ref) on the sampled tokens
            })
        return loss, metrics

    def _update(self, sums):
        if self.reach is not None and sums["rows"] > 0:  # the floor's level for this step's error
            self.pi.target_scale = self.reach.update(sums["reach_rows"] / sums["rows"])
        if sums["tokens"] > 0:  # the controlled quantity over the whole step, every rank
            self.pi.update(sums["entropy_sum"] / sums["tokens"])
