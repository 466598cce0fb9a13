"""Thermostat: closed-loop entropy control with exact first-order entropy-change predictions.

The two seed methods are open-loop: SIREN pulls a selected entropy toward a fixed anchor with a fixed coefficient;
STEER damps the tokens with the largest *estimated* entropy change whatever its direction and whatever the current
entropy, with a closed form that tracks the true first-order change poorly. Thermostat closes the loop:

1. Predict each token's first-order entropy change for the update the surrogate is about to make, exactly, from
   its logits (steer.md, last section):
       d_t = -w_t [pi_a (log pi_a + H) - sum_k pi_k^2 (log pi_k + H)],   w_t = A_t r_t if the token is not clipped,
   else 0 (the gradient of the clipped surrogate with respect to log pi is -w_t).
2. Keep a target entropy H* (measured at the first step and saved like SIREN's anchor; by default it ramps
   linearly from 1.0 to 0.7 x that value over 40 steps, then stays, and it is a floor: entropy above it is left
   alone). A PI controller on the relative error e = (H* - H) / H* gives a control signal u in [0, 1] ([-1, 1]
   with ``floor=False``): the share of the batch's predicted entropy movement S = mean_t |d_t| to cancel.
3. Damp only the tokens that push the wrong way (d_t < 0 when u > 0, i.e. entropy below target; d_t > 0 when
   u < 0) so that the weighted predicted batch change moves by u * S. By default (``allocation="efficient"``)
   each wrong-way token gets weight clip(1 - c e_t, weight_min, 1) with e_t = |d_t| / |A_t r_t| (its entropy change
   per unit of policy-gradient coefficient) and c solved exactly: the minimizer of sum_t |A_t r_t| (1 - weight_t)^2
   under that cancellation, so the tokens that move entropy most per unit of learning signal give way first and
   near-deterministic positions keep learning. ``allocation="uniform"`` gives the whole set one weight
   lambda = clip(1 - |u| S / |sum_wrong d_t / N|, weight_min, 1). Every other token keeps weight 1, so the
   policy-gradient signal pushing the right way is untouched.
   Options: ``weight_max > 1`` first boosts the right-way tokens (one closed-form weight mu <= weight_max) and
   damps only what the boost cannot cover; ``protect="low_prob"`` lets only the high-probability quadrants give
   way; ``damp_first`` orders the wrong-way tokens by advantage sign; ``solved_at`` / ``damp_only`` /
   ``control_only_unsolved`` split responses by their group's success rate (``TokenBatch.group_reward``);
   ``anneal_start`` / ``sharpen`` add a final phase whose target descends, optionally lowered by a controlled
   entropy penalty. Measured on the testbed, none of these beat the defaults (docs/methods/thermostat.md).
4. Optionally (``restrict="siren"``) only SIREN's positions (top-p entropy, per-response peak), or (``"peak"``) the
   per-response peak of the full entropy, are eligible for damping, and the controlled quantity is the entropy at
   those positions: the deterministic parts of a response (arithmetic, formatting) may sharpen freely while the
   forking positions keep their entropy.

The controller's step: the PI update runs in ``Method.end_step``, once per optimizer step, from the controlled
entropy measured over that step's whole batch (every micro-batch, every rank); step k's weights use the u computed
at the end of step k - 1 (none in the first step, which measures H0).

Design notes (why this form): the efficient allocation is the least distortion of the policy gradient (weighted
by each token's coefficient) that buys the requested entropy correction, with one closed-form scalar per batch;
every allocation reduces to GRPO exactly when u = 0 (at or above a floor target, or kp = ki = 0). Weights never
exceed 1, so the step size never grows (no explosion from the controller itself), unlike an entropy bonus.

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
    """Smallest weight a wrong-way token can get (1.0 disables damping)."""
    weight_max: float = 1.0
    """Largest weight a right-way token can get. Above 1 the controller first *boosts* the tokens that push entropy
    toward the target (up to this weight) and damps the wrong-way ones only for what the boost cannot cover;
    1.0 only damps (weights never exceed 1)."""
    target: float | None = None
    """Target entropy H* in nats; None measures it at the first step (saved in state_dict)."""
    target_scale: float = 1.0
    """Start of the target: H* = target_scale x the first measured entropy (when target is None) or x target."""
    target_end: float | None = None
    """Optional absolute end point (nats) of the linear target schedule; takes precedence over target_end_scale."""
    target_end_scale: float | None = 0.7
    """End point of the schedule relative to the start value: 0.7 x the first measured entropy. Chosen on the
    testbed's design seeds (docs/methods/thermostat.md): the end is the pass@1 / pass@k dial; 0.7 keeps most of the
    pass@k gain at about GRPO's pass@1."""
    schedule_steps: int | None = 40
    """Steps over which the target moves linearly from its start to its end point, then stays; None keeps it at
    the start value (target_scale x H0). A ramp instead of a jump: the controller does not fight the first steps'
    natural entropy drop, and the target never asks for a change the policy cannot follow. 40 steps follows the
    testbed's natural decline closely (design table), so the floor is reached without a gap above it."""
    floor: bool = True
    """One-sided control: the target is a floor. Entropy below it is raised as usual; entropy above it is left alone
    (u >= 0, integral >= 0) instead of pushed down, so on a task whose entropy does not collapse the method stays
    plain GRPO."""
    anneal_start: int | None = None
    """Step at which a final annealing phase begins (None: none). From then the target moves linearly from where
    the schedule stands to ``anneal_end_scale`` x the first measured entropy over ``anneal_steps`` steps, and
    with ``sharpen > 0`` entropy above the target is lowered (see ``sharpen``)."""
    anneal_steps: int = 30
    """Length of the annealing ramp in steps."""
    anneal_end_scale: float = 0.5
    """End point of the annealing ramp relative to the first measured entropy."""
    sharpen: float = 0.0
    """Entropy-penalty coefficient at full control output during the annealing phase: when entropy is above the
    target, loss += sharpen x |u| x the aggregated token entropy. It lowers entropy the way a lower sampling
    temperature does (mass moves toward each position's mode and an evenly split fork stays even, to first order)
    instead of the policy gradient's way (one branch reinforced). 0: entropy above the target is left to the
    policy gradient."""
    renormalize: bool = False
    """Rescale the weights so their mean over valid tokens is 1 (keeps the step size; then weights can exceed 1)."""
    restrict: str = "none"
    """"none": every valid token is eligible for damping; "siren": only SIREN's selected positions (top-p entropy
    above the per-response quantile); "peak": the same per-response peak selection on the full entropy. When
    restricted, the controlled quantity is the mean entropy of the eligible positions."""
    top_p: float = 0.8
    """Nucleus for restrict="siren" (SIREN default, arXiv 2509.25133)."""
    quantile: float = 0.8
    """Per-response peak-entropy quantile for restrict="siren" / "peak" (SIREN default)."""
    protect: str = "none"
    """"none": every wrong-way token may be damped; "low_prob": never damp a token whose sampled action is below
    the entropy-neutral probability (pi_a (log pi_a + H) < sum_k pi_k^2 (log pi_k + H): reinforcing it would raise
    the entropy). Only the high-probability quadrants give way then: confident correct tokens (A > 0, which
    sharpen) when entropy is too low, confident wrong ones (A < 0, which flatten) when it is too high; a rare
    correct answer is always learned and a rare mistake always pushed down at full strength."""
    damp_first: str = "none"
    """Which wrong-way tokens give way first: "none" (all alike, one weight), "negative" (negative-advantage
    tokens first, then the rest only if needed) or "positive" (positive-advantage tokens first)."""
    solved_at: float | None = None
    """Difficulty split (reads ``TokenBatch.group_reward``, the success rate of each response's group): a response
    whose group solved at least this share is on a "solved" problem, otherwise on an "unsolved" one. Used by
    ``damp_only``; None: no split."""
    damp_only: str = "all"
    """With ``solved_at``: which responses may be damped. "all": every response; "solved": only responses on solved
    problems (the rare successes on unsolved problems always learn at full strength); "unsolved": only responses
    on unsolved problems (solved problems sharpen freely)."""
    control_only_unsolved: bool = False
    """With ``solved_at``: leave the solved problems' tokens out of the controlled quantity and its target, so
    only the entropy on unsolved problems is held (and only they can be damped)."""
    reach_tol: float | None = None
    """Reach-gated floor (None: off, the fixed ramp above). The floor's level follows the training batch's reach
    (share of prompts whose group solved at least one sample; reads ``TokenBatch.group_reward``): it descends while
    the reach holds and rises when it falls more than this below its reference (controllers/reach.py); the
    schedule fields are then unused."""
    reach_gain: float = 0.5
    """Gain of the reach-gated floor (per step, on the reach error)."""
    reach_min_scale: float = 0.3
    """Lowest level of the reach-gated floor, x the first measured entropy."""
    allocation: str = "efficient"
    """How the cancellation is shared inside the wrong-way set. "uniform": one weight lambda for every wrong-way
    token. "efficient": w_t = clip(1 - c e_t, weight_min, 1) with e_t = |d_t| / |A_t r_t| (the entropy change per
    unit of policy-gradient coefficient) and c solved exactly: the minimizer of sum_t |A_t r_t| (1 - w_t)^2 under
    the same cancellation, so the tokens that move entropy most per unit of learning signal give way first and
    near-deterministic positions (e_t ~ 0: arithmetic, formatting) keep learning at full strength."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("kp", self.kp, lo=0.0)
        check_float("ki", self.ki, lo=0.0)
        check_float("i_max", self.i_max, lo=0.0)
        check_float("weight_min", self.weight_min, lo=0.0, hi=1.0)
        check_float("weight_max", self.weight_max, lo=1.0)
        if self.target is not None:
            check_float("target", self.target, lo=0.0, lo_open=True)
        if self.target_end is not None:
            check_float("target_end", self.target_end, lo=0.0, lo_open=True)
        check_int("schedule_steps", self.schedule_steps, lo=1, allow_none=True)
        check_float("target_scale", self.target_scale, lo=0.0, lo_open=True)
        if self.target_end_scale is not None:
            check_float("target_end_scale", self.target_end_scale, lo=0.0, lo_open=True)
        check_choice("restrict", self.restrict, ("none", "siren", "peak"))
        if not isinstance(self.floor, bool):
            raise ValueError(f"floor must be a bool, got {self.floor!r}")
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"renormalize must be a bool, got {self.renormalize!r}")
        check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        check_float("quantile", self.quantile, lo=0.0, hi=1.0)
        check_choice("damp_first", self.damp_first, ("none", "negative", "positive"))
        check_choice("protect", self.protect, ("none", "low_prob"))
        check_choice("allocation", self.allocation, ("uniform", "efficient"))
        if self.reach_tol is not None:
            check_float("reach_tol", self.reach_tol, lo=0.0, hi=1.0)
        check_float("reach_gain", self.reach_gain, lo=0.0)
        check_float("reach_min_scale", self.reach_min_scale, lo=0.0, hi=1.0)
        if self.solved_at is not None:
            check_float("solved_at", self.solved_at)
        check_choice("damp_only", self.damp_only, ("all", "solved", "unsolved"))
        check_int("anneal_start", self.anneal_start, lo=0, allow_none=True)
        check_int("anneal_steps", self.anneal_steps, lo=1)
        check_float("anneal_end_scale", self.anneal_end_scale, lo=0.0, lo_open=True)
        check_float("sharpen", self.sharpen, lo=0.0)
        if not isinstance(self.control_only_unsolved, bool):
            raise ValueError(f"control_only_unsolved must be a bool, got {self.control_only_unsolved!r}")
        if self.solved_at is None and (self.damp_only != "all" or self.control_only_unsolved):
            raise ValueError("damp_only and control_only_unsolved need solved_at (the group success rate that "
                             "splits solved from unsolved problems)")


@torch.no_grad()
def entropy_bracket(logits: torch.Tensor, log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pi_a (log pi_a + H) - sum_k pi_k^2 (log pi_k + H) per token, [B, T] (0 at padding): the first-order entropy
    change per unit of policy-gradient coefficient, up to sign (d_t = -coef_t x this). Its absolute value is the
    efficiency of ``allocation="efficient"``. logits [B, T, V], log_prob/mask [B, T]."""
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


def _sides(d: torch.Tensor, eligible: torch.Tensor, u: float) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """(n, S, toward, against) for predicted changes d [B, T] and controller output u != 0: the eligible count
    (at least 1), S = mean |d| over the eligible tokens, and the eligible tokens pushing entropy toward the target
    (d > 0 when u > 0, d < 0 when u < 0) and against it."""
    n = eligible.sum().clamp(min=1)
    s = float(torch.where(eligible, d.abs(), torch.zeros_like(d)).sum() / n)
    up, down = eligible & (d > 0), eligible & (d < 0)
    return (n, s, up, down) if u > 0 else (n, s, down, up)


def proportional_cut(amount: torch.Tensor, eff: torch.Tensor, need: float, cap: float) -> torch.Tensor:
    """Exact solution of the box-constrained allocation behind ``allocation="efficient"``, for one group.

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


def damping_weight(d: torch.Tensor, eligible: torch.Tensor, u: float, weight_min: float,
                   first: torch.Tensor | None = None,
                   dampable: torch.Tensor | None = None,
                   efficiency: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[float, ...]]:
    """Closed-form weights [B, T]: wrong-way eligible tokens get a damping weight, all others 1.

    d [B, T] predicted changes, eligible bool [B, T], u the controller output (share of S = mean |d| over the
    eligible tokens to cancel). The wrong-way set (d < 0 when u > 0, d > 0 when u < 0) must cancel C = |u| S.
    Without ``first`` every wrong-way token gets one weight lambda = clip(1 - C / W, weight_min, 1), W = |sum of
    their d| / N. With ``first`` (bool [B, T]) the wrong-way tokens in ``first`` are damped first (down to
    weight_min); only the part of C they cannot cancel is taken from the others, again with one closed-form
    weight. ``dampable`` (bool [B, T]) shrinks the wrong-way set to those tokens (S still counts every eligible
    token). ``efficiency`` [B, T] (>= 0: |d_t| / |coef_t|, the entropy change per unit of policy-gradient
    coefficient) replaces the one weight per group by w_t = clip(1 - c efficiency_t, weight_min, 1) with c solved
    exactly (:func:`proportional_cut`): the tokens that move entropy most per unit of learning signal give way
    first. Returns (weights, lambdas): one lambda per group, the mean weight of its tokens (1.0 for a group left
    alone).
    """
    ones = torch.ones_like(d)
    n_groups = 1 if first is None else 2
    if u == 0.0 or not bool(eligible.any()):
        return ones, (1.0,) * n_groups
    n, s, _, wrong = _sides(d, eligible, u)
    if dampable is not None:
        wrong = wrong & dampable
    need = abs(u) * s
    groups = [wrong] if first is None else [wrong & first, wrong & ~first]
    w, lams = ones, []
    for g in groups:
        size = float(torch.where(g, d, torch.zeros_like(d)).sum().abs() / n)
        if size <= 0.0 or need <= 0.0:
            lams.append(1.0)
            continue
        if efficiency is not None:
            cap = 1.0 - weight_min
            cut = proportional_cut(d[g].abs() / n, efficiency[g].to(d.dtype), need, cap)
            need = 0.0 if cap * size > need else need - cap * size
            w = w.masked_scatter(g, 1.0 - cut)
            lams.append(float((1.0 - cut).mean()))
            continue
        lam = 1.0 - need / size
        if lam >= weight_min:  # this group cancels all that is left
            need = 0.0
        else:
            lam = weight_min
            need -= (1.0 - lam) * size
        w = torch.where(g, torch.full_like(d, lam), w)
        lams.append(lam)
    return w, tuple(lams)


def boost_weight(d: torch.Tensor, eligible: torch.Tensor, u: float, weight_max: float) -> tuple[float, float]:
    """Closed-form boost of the right-way tokens: (mu, u_rest).

    The right-way set (eligible tokens with d > 0 when u > 0, d < 0 when u < 0) gets one weight
    mu = clip(1 + |u| S / R, 1, weight_max), R = |sum of their d| / N and S = mean |d| over the eligible tokens, so
    that the weighted predicted batch change moves by up to u S. ``u_rest`` is the signed share of S the boost could
    not cover (0 when it covered everything), to be cancelled by :func:`damping_weight`.
    """
    if u == 0.0 or weight_max <= 1.0 or not bool(eligible.any()):
        return 1.0, u
    n, s, right, _ = _sides(d, eligible, u)
    size = float(torch.where(right, d, torch.zeros_like(d)).sum().abs() / n)
    need = abs(u) * s
    if size <= 0.0 or need <= 0.0:
        return 1.0, u
    mu = min(1.0 + need / size, weight_max)
    rest = max(need - (mu - 1.0) * size, 0.0)
    return mu, (rest / s if s > 0 else 0.0) * (1.0 if u > 0 else -1.0)


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
        gated = c.reach_tol is not None
        self.reach = ReachFloor(c.reach_tol, c.reach_gain, min_scale=c.reach_min_scale) if gated else None
        self.pi = EntropyPI(c.kp, c.ki, i_max=c.i_max, target=c.target, target_end=c.target_end,
                            schedule_steps=None if gated else c.schedule_steps, target_scale=c.target_scale,
                            target_end_scale=None if c.target_end is not None else c.target_end_scale,
                            floor=c.floor, anneal_start=c.anneal_start, anneal_steps=c.anneal_steps,
                            anneal_end_scale=c.anneal_end_scale if c.anneal_start is not None else None,
                            anneal_two_sided=c.sharpen > 0)

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
        c = self.config
        return (Stat.change_terms(),) + ((Stat.top_p_entropy(c.top_p),) if c.restrict == "siren" else ())

    def _loss(self, batch, *, new_step):
        c = self.config
        mask = batch.mask
        adv = batch.token_advantages()
        terms = self.pg_terms(batch, adv)
        coef = terms.coef(adv)
        with torch.no_grad():  # one pass over the logits (or the lm_head source's shared pass)
            bracket = _bracket(*batch.stat(Stat.change_terms(), self.name), batch.clean(batch.log_prob), mask)
        d = _change(bracket, coef, mask)
        h_tok = batch.current_entropy(self.name).detach()
        eligible = mask
        if c.restrict != "none":
            from rlvr_entropy.methods.siren import peak_entropy_mask

            sel = h_tok if c.restrict == "peak" else batch.stat(Stat.top_p_entropy(c.top_p), self.name).detach()
            eligible = peak_entropy_mask(sel, mask, quantile=c.quantile)
        unsolved = shield = None
        if c.solved_at is not None:
            gr = batch.require("group_reward", self.name).detach()
            unsolved = mask & (gr < c.solved_at)[:, None].to(mask.device)
            if c.control_only_unsolved:
                eligible = eligible & unsolved
            shield = {"all": None, "solved": mask & ~unsolved, "unsolved": unsolved}[c.damp_only]
        # the controlled quantity: token-mean entropy over the eligible positions (all valid tokens by default)
        h_now = masked_mean(h_tok, eligible)
        self.observe(entropy_sum=torch.where(eligible, h_tok.to(torch.float64), 0.0).sum(), tokens=eligible.sum())
        if self.reach is not None:  # rows whose group solved at least one sample
            gr = batch.require("group_reward", self.name).detach()
            rows = mask.any(-1)
            self.observe(reach_rows=(rows & (gr > 0).to(rows.device)).sum(), rows=rows.sum())
        first = None if c.damp_first == "none" else (adv < 0 if c.damp_first == "negative" else adv > 0)
        u = self.pi.u
        beta = 0.0
        if c.sharpen > 0 and self.pi.annealing and u < 0:  # above the target while annealing: sharpen, no damping
            beta, u = c.sharpen * -u, 0.0
        mu, u_rest = boost_weight(d, eligible, u, c.weight_max)
        # high-probability quadrants: d and the update coefficient have opposite signs (steer.md's quadrants)
        dampable = None if c.protect == "none" else (d * coef.to(d.dtype) < 0)
        if shield is not None:
            dampable = shield if dampable is None else dampable & shield
        eff = bracket.abs() if c.allocation == "efficient" else None  # = |d_t| / |coef_t| where coef_t != 0
        w, lams = damping_weight(d, eligible, u_rest, c.weight_min, first, dampable, eff)
        if mu != 1.0:  # the right-way set is disjoint from the damped (wrong-way) one
            w = torch.where(_sides(d, eligible, u)[2], torch.full_like(w, mu), w)
        if c.renormalize and bool(mask.any()):
            w = w / masked_mean(w, mask).clamp(min=1e-8)
        loss = self.aggregate(w * terms.loss, mask)
        if beta > 0:
            loss = loss + beta * self.aggregate(batch.current_entropy(self.name), mask)
        with torch.no_grad():
            metrics = self.pg_metrics(terms, batch)
            metrics.update({
                "target": float(self.pi.target) if self.pi.target is not None else float("nan"),
                **({"reach_ema": self.reach.ema if self.reach.ema is not None else float("nan"),
                    "floor_scale": self.reach.m} if self.reach is not None else {}),
                "entropy": h_now,
                "token_entropy": masked_mean(h_tok, mask),
                "eligible_frac": masked_mean(eligible.float(), mask),
                **({"unsolved_frac": masked_mean(unsolved.float(), mask)} if unsolved is not None else {}),
                "error": self.pi.last_error,
                "u": self.pi.u,
                "integral": self.pi.integral,
                "lambda": lams[0],
                "boost": mu,
                "sharpen": beta,
                **({"lambda_rest": lams[1]} if len(lams) > 1 else {}),
                "predicted_change": masked_mean(d, mask),
                "predicted_change_weighted": masked_mean(w * d, mask),
                "damped_frac": masked_mean((w < 1).float(), mask),
                "boosted_frac": masked_mean((w > 1).float(), mask),
                "weight_mean": masked_mean(w, mask),
            })
        return loss, metrics

    def _update(self, sums):
        if self.reach is not None and sums["rows"] > 0:  # the floor's level for this step's error
            self.pi.target_scale = self.reach.update(sums["reach_rows"] / sums["rows"])
        if sums["tokens"] > 0:  # the controlled quantity over the whole step, every rank
            self.pi.update(sums["entropy_sum"] / sums["tokens"])
