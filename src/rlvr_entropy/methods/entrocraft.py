"""Entrocraft: an entropy band that switches the advantage estimator (arXiv 2604.26326; official code
lblaoke/entrocraft@26165bde, verl/trainer/ppo/core_algos.py:343-379 ``grpo_range*`` and their call site in
verl/trainer/ppo/ray_trainer.py:258-282).

Once per training step s of S, with H the batch entropy and the band [l_s, u_s]:

    l_s = l0 + (l1 - l0) s / S,   u_s = u0 + (u1 - u0) s / S          (grpo_range_linear, the paper's best)
    H > u_s  ->  A_i = max(R_i, 0)                                      (RAFT++: only positive samples; sharpens)
    H < l_s  ->  A_i = min(R_i, 0)                                      (NSR: only negative samples; flattens)
    else     ->  A_i = (R_i - mean_g) / (std_g + 1e-6)                  (GRPO)

Ties go to GRPO (strict > and <); "> u_s" is tested first. H is the token-mean entropy of the ROLLOUT policy over
every response token of the step's batch (``TokenBatch.old_entropy``, logits / rollout temperature), same step, no
lag. "Rejected" samples stay in the batch with advantage 0: their tokens still count in the token-mean.

R_i are the official fork's scores: its math reward returns +1 / -1 (``1.0 if retval > 0.5 else -1.0``,
verl/utils/reward_score/math_reward.py:29). With {0, 1} rewards the NSR branch would give all-zero advantages
and could not raise entropy, so by default the method maps each reward the same way (``reward_threshold=0.5``:
+1 above, -1 otherwise; identity on +-1 rewards).

Defaults: the official run (scripts/grpo/grpo_range_linear/qwen3-4b-base_numina_math_grpo_range_linear_n8.slurm):
lower 0.6 -> 0.4, upper 0.7 -> 0.5, linear; verl's PG loss (clip 0.2 / 0.2, dual clip 3, token-mean).
S = ``total_steps``: set it to the run's length (official: len(train_dataloader) x epochs, 97 for 100k prompts at
1024 per step); the trainer's own defaults (lower 1, upper 0) are unusable and not offered.

The step protocol: an engine that holds the step's rollout batch calls :meth:`Entrocraft.begin_step` with it on
every rank before the step's micro-batches (a collective through ``dist``): that measures H over every rank and
counts the step, so the step decides with its own entropy, as the official trainer. Without it the method
measures H over each step's micro-batches (every rank, in ``end_step``) and decides the next step with it.

Deviations from the official code:
- Without ``begin_step``: one step of lag (the first step is GRPO), and s counts the protocol's steps (one per
  ``end_step`` with a valid token) rather than rollout steps.
- The GRPO branch uses the batch's advantages by default (``grpo_source="batch"``): the engine's GRPO estimator,
  which is the official one when it divides by the group std with eps 1e-6 (the official trainer always does;
  the testbed and verl default to it, TRL's eps is 1e-4). ``grpo_source="rewards"`` recomputes the official
  estimator from ``rewards`` and ``group_reward`` / ``group_reward_std`` / ``group_size`` (a group of one: mean 0,
  std 1), independent of the engine; it uses the rewards as given (GRPO of the +-1 scores differs only in eps).
- ``reward_threshold`` binarizes non-binary rewards (None uses them as given: the estimator's own behaviour).
- H is always the token mean (the official aggregates with the actor's loss_agg_mode: token-mean in its run).
- No KL loss term (the official run adds low_var_kl 0.001, which still acts on rejected samples).
- Options (not the code): ``schedule="cosine"`` is grpo_range_cos, ``"constant"`` is grpo_range (l0, u0).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from rlvr_entropy.controllers.band import BandState
from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.batch import TokenBatch
from rlvr_entropy.core.validation import check_choice, check_float, check_int, check_shape, check_tensor
from rlvr_entropy.methods.base import Method, PGConfig, register_method

__all__ = ["entrocraft_advantages", "entropy_band", "band_branch", "grpo_group_advantages", "Entrocraft",
           "EntrocraftConfig"]

SCHEDULES = ("linear", "cosine", "constant")
BRANCH_CODE = {"raft": 1.0, "grpo": 0.0, "nsr": -1.0}


# ------------------------------------------------------------------------------------------------ the math
def _range(name: str, value: object) -> tuple[float, float]:
    """(start, end) from a pair of numbers or a "start,end" string (the CLI); NaN rejected, inf allowed."""
    if isinstance(value, str):
        value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        try:
            value = [float(v) for v in value]
        except ValueError:
            raise ValueError(f"{name} must be a pair of numbers (start, end), got {value!r}") from None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair of numbers (start, end), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(float(v)):
            raise ValueError(f"{name} must be a pair of numbers (start, end), got {value!r}")
        out.append(float(v))
    return out[0], out[1]


def entropy_band(step: int, total_steps: int, lower: Sequence[float], upper: Sequence[float],
                 schedule: str = "linear") -> tuple[float, float]:
    """(l_s, u_s) with the official arithmetic (Python floats, core_algos.py:400-401 / 437-439): linear
    l0 + (l1 - l0) * s / S; cosine with progress 0.5 (1 - cos(pi s / S)); constant (l0, u0). Not clamped to s <= S
    (the official extrapolates)."""
    check_choice("schedule", schedule, SCHEDULES)
    for name, v in (("step", step), ("total_steps", total_steps)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    step, total_steps = int(step), int(total_steps)
    (l0, l1), (u0, u1) = _range("lower", lower), _range("upper", upper)
    if schedule == "constant":
        return l0, u0
    if schedule == "linear":
        return l0 + (l1 - l0) * step / total_steps, u0 + (u1 - u0) * step / total_steps
    progress = 0.5 * (1 - math.cos(math.pi * step / total_steps))
    return l0 + (l1 - l0) * progress, u0 + (u1 - u0) * progress


def band_branch(entropy: float, lower: float, upper: float) -> str:
    """"raft" if H > upper, else "nsr" if H < lower, else "grpo" (ties go to GRPO; "> upper" wins if
    lower > upper)."""
    if entropy > upper:
        return "raft"
    if entropy < lower:
        return "nsr"
    return "grpo"


def _group_index(group_ids: object, B: int) -> torch.Tensor:
    """Group ids (a tensor, or any sequence of hashables such as verl's uid strings) -> long [B], numbered in order
    of first appearance."""
    if isinstance(group_ids, torch.Tensor):
        check_shape("group_ids", group_ids, (B,))
        keys = group_ids.tolist()
    else:
        try:
            keys = list(group_ids)  # type: ignore[call-overload]
        except TypeError:
            raise ValueError(f"group_ids must be a tensor or a sequence of length {B}") from None
        if len(keys) != B:
            raise ValueError(f"group_ids must have shape [{B}], got length {len(keys)}")
    seen: dict = {}
    try:
        return torch.tensor([seen.setdefault(k, len(seen)) for k in keys], dtype=torch.long)
    except TypeError:
        raise ValueError("group_ids must hold hashable values") from None


def grpo_group_advantages(rewards: torch.Tensor, group_ids: object, eps: float = 1e-6) -> torch.Tensor:
    """The official GRPO estimator (core_algos.py:276-339, norm by std always on): (R - mean_g) / (std_g + eps) with
    torch.mean / torch.std (unbiased) over each group's rewards in row order; a group of one gets mean 0, std 1.
    rewards [B], group_ids [B] -> [B]."""
    idx = _group_index(group_ids, rewards.shape[0]).to(rewards.device)
    out = torch.empty_like(rewards)
    for g in range(int(idx.max()) + 1 if idx.numel() else 0):
        rows = (idx == g).nonzero().squeeze(-1)
        vals = rewards[rows]
        if vals.numel() == 1:
            out[rows] = (vals - 0.0) / (1.0 + eps)
        else:
            out[rows] = (vals - vals.mean()) / (vals.std() + eps)
    return out


def _check_rewards(rewards: object) -> torch.Tensor:
    check_tensor("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {list(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards has non-finite value(s) (NaN or inf)")
    return rewards.detach()


def entrocraft_advantages(rewards: torch.Tensor, group_ids: object, *, step: int, total_steps: int,
                          entropy: float, lower: Sequence[float] = (0.6, 0.4), upper: Sequence[float] = (0.7, 0.5),
                          schedule: str = "linear", eps: float = 1e-6) -> torch.Tensor:
    """Entrocraft's advantages for one step (compute_grpo_range_linear_outcome_advantage, entrocraft.md section 1).

    rewards [B] (the scores R_i, used as given), group_ids [B] (tensor or sequence), step s (1 at the first update),
    total_steps S, entropy H (the step's batch token-mean entropy of the rollout policy), lower / upper =
    (start, end) -> advantages [B]: RAFT++ max(R, 0) if H > u_s, NSR min(R, 0) if H < l_s, else GRPO. Multiply by
    the response mask for verl's [B, T] layout. Raises ValueError naming the argument on bad input.
    """
    rewards = _check_rewards(rewards)
    h = float(entropy) if isinstance(entropy, (numbers.Real, torch.Tensor)) and not isinstance(entropy, bool) \
        else float("nan")
    if not math.isfinite(h):
        raise ValueError(f"entropy must be a finite number, got {entropy!r}")
    check_float("eps", eps, lo=0.0)
    lo, hi = entropy_band(step, total_steps, lower, upper, schedule)
    br = band_branch(h, lo, hi)
    if br == "raft":
        _group_index(group_ids, rewards.shape[0])  # validated even when unused
        return rewards.clamp(min=0.0)
    if br == "nsr":
        _group_index(group_ids, rewards.shape[0])
        return rewards.clamp(max=0.0)
    return grpo_group_advantages(rewards, group_ids, eps)


# ---------------------------------------------------------------------------------------------- the method
@dataclass(frozen=True)
class EntrocraftConfig(PGConfig):
    """Entrocraft (arXiv 2604.26326); defaults from the official run (lblaoke/entrocraft@26165bde)."""

    dual_clip: float | None = 3.0
    """Dual-clip c for A < 0: verl's clip_ratio_c, always on in verl's vanilla loss."""
    lower: tuple[float, float] = (0.6, 0.4)
    """(l0, l1): lower bound of the band at s = 0 and s = S (official run: entropy_lower_bound_range [0.6, 0.4])."""
    upper: tuple[float, float] = (0.7, 0.5)
    """(u0, u1): upper bound (official run: entropy_upper_bound_range [0.7, 0.5]; the project page's demo curve
    goes to ~0.2)."""
    schedule: str = "linear"
    """"linear" (grpo_range_linear, the paper's best), "cosine" (grpo_range_cos) or "constant" (grpo_range: l0, u0)."""
    total_steps: int = 97
    """S of the schedule: the run's number of training steps (official: len(train_dataloader) x total_epochs; 97
    for 100k prompts at 1024 per step, 1 epoch). Set it to your run's length."""
    reward_threshold: float | None = 0.5
    """Scores R = +1 if reward > threshold else -1, as the fork's math reward (math_reward.py:29); identity on +-1
    rewards. None uses the rewards as given (then {0, 1} rewards make the NSR branch all zero)."""
    grpo_source: str = "batch"
    """Advantages inside the band: "batch" (the batch's advantages: the engine's GRPO estimator) or "rewards" (the
    official estimator recomputed from rewards and group_reward / group_reward_std / group_size)."""
    eps: float = 1e-6
    """epsilon of (R - mean) / (std + eps) for grpo_source="rewards" (official: 1e-6)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "lower", _range("lower", self.lower))
        object.__setattr__(self, "upper", _range("upper", self.upper))
        check_choice("schedule", self.schedule, SCHEDULES)
        check_int("total_steps", self.total_steps, lo=1)
        if self.reward_threshold is not None:
            check_float("reward_threshold", self.reward_threshold)
        check_choice("grpo_source", self.grpo_source, ("batch", "rewards"))
        check_float("eps", self.eps, lo=0.0)
        for k in (0, 1):
            if self.lower[k] > self.upper[k]:
                raise ValueError(f"lower must be <= upper at both ends of the schedule, got lower={self.lower}, "
                                 f"upper={self.upper}")


@register_method
class Entrocraft(Method):
    """Entrocraft; see the module docstring. State: the step counter and the measured entropy (``"band"``)."""

    name = "entrocraft"
    Config = EntrocraftConfig
    needs = ("rewards", "old_entropy")
    observes = ("entropy_sum", "tokens")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.band = BandState()
        self._driven = False  # True once the engine calls begin_step (then each step decides with its own H)

    def controllers(self):
        return {"band": self.band}

    @classmethod
    def neutral_overrides(cls):
        inf = float("inf")
        return {"lower": (-inf, -inf), "upper": (inf, inf), "schedule": "constant"}

    # ------------------------------------------------------------------------------------------ pieces
    @torch.no_grad()
    def begin_step(self, batch: TokenBatch) -> float | None:
        """Start a training step with its whole rollout batch (this rank's share; every rank calls it, before the
        step's ``compute_loss`` calls): measures H, the token-mean of ``old_entropy`` over every rank's valid tokens
        (a collective through ``dist``), and counts the step. Returns H (None when no rank has a valid token: the
        previous value is kept)."""
        if not isinstance(batch, TokenBatch):
            raise ValueError(f"batch must be a TokenBatch, got {type(batch).__name__}")
        h = batch.clean(batch.require("old_entropy", self.name).detach().to(torch.float64))
        total, count = self.dist.all_reduce_sum(torch.stack([h.sum(), batch.mask.sum().to(torch.float64)])).tolist()
        self._driven = True
        self.band.begin(total / count if count > 0 else None)
        return total / count if count > 0 else None

    @property
    def current_step(self) -> int:
        """s of the step in progress (1 at the first step)."""
        return self.band.steps if self._driven else self.band.steps + 1

    def decision(self) -> tuple[str, float, float]:
        """(branch, l_s, u_s) for the step in progress; "grpo" before any measurement."""
        c = self.config
        lo, hi = entropy_band(self.current_step, c.total_steps, c.lower, c.upper, c.schedule)
        h = self.band.entropy
        return ("grpo" if h is None else band_branch(h, lo, hi)), lo, hi

    def scores(self, rewards: torch.Tensor) -> torch.Tensor:
        """R_i [B]: +1 / -1 around ``reward_threshold``, or the rewards as given."""
        t = self.config.reward_threshold
        if t is None:
            return rewards
        return torch.where(rewards > t, torch.ones_like(rewards), -torch.ones_like(rewards))

    def _grpo(self, batch: TokenBatch) -> torch.Tensor:
        if self.config.grpo_source == "batch":
            return batch.token_advantages()
        dt = batch.log_prob.dtype
        r = batch.rewards.detach().to(dt)
        mean = batch.require("group_reward", self.name).detach().to(dt)
        std = batch.require("group_reward_std", self.name).detach().to(dt)
        one = batch.require("group_size", self.name) <= 1
        a = torch.where(one, (r - 0.0) / (1.0 + self.config.eps), (r - mean) / (std + self.config.eps))
        return batch.clean(a[:, None].expand(batch.shape))

    # -------------------------------------------------------------------------------------------- loss
    def _loss(self, batch, *, new_step):
        mask = batch.mask
        h = batch.clean(batch.old_entropy.detach().to(torch.float64))
        self.observe(entropy_sum=h.sum(), tokens=mask.sum())
        branch, lo, hi = self.decision()
        if branch == "grpo":
            adv = self._grpo(batch)
        else:
            s = self.scores(batch.rewards.detach().to(batch.log_prob.dtype))
            a = s.clamp(min=0.0) if branch == "raft" else s.clamp(max=0.0)
            adv = batch.clean(a[:, None].expand(batch.shape))
        terms = self.pg_terms(batch, adv)
        loss = self.aggregate(terms.loss, mask)
        with torch.no_grad():
            metrics = self.pg_metrics(terms, batch)
            rows = mask.any(-1)
            metrics.update({
                "branch": BRANCH_CODE[branch],
                "lower": lo,
                "upper": hi,
                "step": float(self.current_step),
                "measured_entropy": float("nan") if self.band.entropy is None else self.band.entropy,
                "batch_entropy": masked_mean(h, mask),
                "adv_mean": masked_mean(adv, mask),
                "active_frac": masked_mean((adv != 0).any(-1).to(adv.dtype), rows),
            })
        return loss, metrics

    def _update(self, sums):
        if not self._driven and sums["tokens"] > 0:  # no begin_step: this step's H decides the next step
            self.band.begin(sums["entropy_sum"] / sums["tokens"])
