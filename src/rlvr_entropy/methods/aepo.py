"""AEPO: temperature-switched REINFORCE samples around a target entropy (arXiv 2510.08141, "Arbitrary Entropy
Policy Optimization"; official code 597358816/AEPO@b353a054, an EasyR1 fork: verl/trainer/ray_trainer.py:730-845,
branch trainer.algorithm == "AEPO").

The README writes grad J = grad J_GRPO + alpha E_{o ~ pi^T}[grad log pi(o|q) R(q, o)] with T = T_high when the
entropy is below the target, else T_low. The code realizes it as batch surgery, once per training step:

1. Main rollout: B prompts x n at the rollout temperature, rewards, GRPO advantages (R - mean) / (std + 1e-6).
2. T = T_high (1.2) if H_prev <= H_target (0.5) else T_low (0.8)                    (:func:`aepo_temperature`)
3. The first B // 4 prompts are generated again, n each, at temperature T; GRPO advantages within those groups.
4. Keep the responses whose advantage is > 0.05 (correct answers in groups that are not all correct), in order,
   and set their advantage to 1 on every token                                       (:func:`aepo_select`)
5. k = min(60, #kept), halved (k // 2) when H_prev > H_target                      (:func:`aepo_num_samples`)
6. Update batch = the first k kept samples followed by main rows k.. (the first k GRPO rows are DROPPED, the size
   is unchanged), old log-probs recomputed at T = 1 (the training temperature)   (:func:`aepo_update_rows`)
7. The standard EasyR1 update: dual-clip PPO (clip 0.2 / 0.2, c = 3), token-mean per micro-batch.
8. H_prev := the step's "actor/entropy_loss", the mean over micro-batches of -masked_mean(log_prob) of the SAMPLED
   tokens of the update batch at T = 1 under the current policy: a one-sample NLL estimate, used one step later
   (0 at the start, so the first step takes T_high).

In this library the loss is that standard update (so with ``reinforce_sample_num=0`` it is grpo); the method
holds H_prev and tells the engine what to do around the rollout:
- ``plan = method.rollout_plan(B)`` before the extra generation: T and how many prompts to generate again (it
  first closes the previous step's measurement into H_prev);
- ``upd = method.assemble(main_advantages, extra_advantages)``: which rows form the update batch, and their
  advantages (1 for the k temperature samples). The engine builds its micro-batches from those rows, with
  old_log_prob (and old_entropy) of the temperature samples recomputed at the training temperature.
- every ``compute_loss`` adds its NLL estimate to the step's sums; ``end_step`` reduces them over every rank.
Without ``rollout_plan`` / ``assemble`` (an engine that does not do the surgery) the method is grpo.

Defaults: entropy_base 0.5, reinforce_sample_num 60, temperature_high 1.2, temperature_low 0.8
(verl/trainer/config.py:85-88, examples/qwen-math-7b-AEPO.sh:16-18); selection threshold 0.05 (ray_trainer.py:801);
EasyR1's actor defaults clip 0.2 / 0.2, dual clip 3 (verl/workers/actor/config.py).

Deviations from the official code:
- H_prev is the token mean of the estimate over every micro-batch and rank of the step (split- and
  rank-invariant); the official mean of per-micro-batch means is ``entropy_average="micro_batch"``. Both cover
  every optimizer step since the previous ``rollout_plan``.
- When no temperature sample qualifies, k = 0 and the step is plain GRPO (the official code crashes on len(None)).
- H_prev is saved by ``state_dict()`` (the official restarts it at 0).
- The log-ratio is clamped to +-20 before exp (EasyR1 does not clamp; identical unless |log r| > 20).
- Options (not the code): ``entropy_estimate="entropy"`` uses the full-vocabulary entropy of the current policy
  (the README names H(pi_old)) instead of the sampled-token NLL.
- Where the temperature samples land is the engine's business: the official dispatches rows to ranks in order
  without shuffling, so they act on the first optimizer update of the step only (rank 0's first mini-batch). The
  testbed shuffles the update batch into its minibatches like any rollout. EntropyGRPOTrainer (TRL) keeps the
  official order over the whole generation batch (the kept samples in global positions 0..k-1, i.e. rank 0's first
  rows, then rank 1's when k exceeds a rank's rows) and TRL shuffles each rank's rows over its micro-batches as it
  does every generation: with several optimizer steps per generation batch they act on any of them, not only the
  first. The verl plugin refuses the method (docs/engines/verl.md says why).
- Under TRL, B is the generation batch (generation_batch_size / num_generations prompts over every process), one plan
  per generation batch; the temperature rollout's reward is the weighted sum of TRL's reward functions, and its
  advantages (for the selection only) are the official (R - mean) / (std + 1e-6) whatever TRL's scale_rewards; with
  vLLM's importance-sampling correction the kept samples' ratio compares trainer and vLLM at the sampling
  temperature (the official has no such correction). See docs/engines/trl.md.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from rlvr_entropy.controllers.lagged import LaggedValue
from rlvr_entropy.core.aggregation import masked_mean, masked_sum
from rlvr_entropy.core.validation import check_choice, check_float, check_int, check_tensor
from rlvr_entropy.methods.base import Method, PGConfig, register_method

__all__ = ["aepo_temperature", "aepo_num_samples", "aepo_advantages", "aepo_select", "aepo_update_rows", "AEPOPlan",
           "AEPOUpdate", "AEPO", "AEPOConfig"]


def _entropy(value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"entropy must be a finite number, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------ the math
def aepo_temperature(entropy: float, target: float = 0.5, t_high: float = 1.2, t_low: float = 0.8) -> float:
    """T_high if H_prev <= H_target (ties -> T_high, ray_trainer.py:787-790), else T_low."""
    return float(t_high) if _entropy(entropy) <= target else float(t_low)


def aepo_num_samples(entropy: float, kept: int, target: float = 0.5, reinforce_sample_num: int = 60) -> int:
    """k = min(reinforce_sample_num, kept), halved (integer division) when H_prev > H_target (lines 804-807)."""
    for name, v in (("kept", kept), ("reinforce_sample_num", reinforce_sample_num)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    k = min(int(reinforce_sample_num), int(kept))
    return k if _entropy(entropy) <= target else k // 2


def aepo_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages of the temperature rollout, as the official code computes them (EasyR1 core_algos.py:138-175):
    (R - mean_g) / (std_g + eps) over groups of ``group`` consecutive responses, std unbiased (torch.std).

    rewards [M] (M a multiple of ``group``). A NaN reward (a response no reward function could score) is left out of
    its group's mean and std and gets advantage 0, as TRL treats unscorable completions; a group with fewer than two
    scored responses gets 0 (the official code asserts n > 1). Returns [M], float32 or the rewards' float dtype."""
    check_tensor("rewards", rewards)
    check_int("group", group, lo=1)
    if rewards.dim() != 1 or rewards.numel() % group:
        raise ValueError(f"rewards must have shape [M] with M a multiple of group={group}, got {list(rewards.shape)}")
    if bool(torch.isinf(rewards).any()):
        raise ValueError("rewards has infinite value(s)")
    r = rewards.detach().to(torch.float64).view(-1, group)  # [M / group, group]
    ok = ~torch.isnan(r)
    n = ok.sum(1, keepdim=True)
    mean = torch.where(ok, r, 0.0).sum(1, keepdim=True) / n.clamp(min=1)
    var = torch.where(ok, (r - mean) ** 2, 0.0).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    adv = (r - mean) / (var.sqrt() + eps)
    adv = torch.where(ok & (n > 1), adv, 0.0).reshape(-1)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def aepo_select(advantages: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """Indices (long, in row order) of the responses whose advantage is > threshold (_select_by_advantage,
    absolute=False). advantages [M] or [M, T] (read at token 0, as the official code)."""
    check_tensor("advantages", advantages)
    if advantages.dim() not in (1, 2):
        raise ValueError(f"advantages must have shape [M] or [M, T], got {list(advantages.shape)}")
    a = advantages.detach()
    a = a[:, 0] if a.dim() == 2 else a
    if not bool(torch.isfinite(a).all()):
        raise ValueError("advantages has non-finite value(s) (NaN or inf)")
    check_float("threshold", threshold)
    return (a > threshold).nonzero().squeeze(-1)


@dataclass(frozen=True)
class AEPOPlan:
    """What the engine generates in addition to the main rollout this step."""

    temperature: float
    """Sampling temperature of the extra responses (T_high or T_low)."""
    num_prompts: int
    """Generate the FIRST this many prompts of the step again (B // 4), with the main rollout's n each."""
    entropy: float
    """H_prev the decision used."""


@dataclass(frozen=True)
class AEPOUpdate:
    """The update batch: ``extra_rows`` of the temperature rollout followed by ``main_rows`` of the main rollout."""

    extra_rows: torch.Tensor
    """long [k]: rows of the temperature rollout (its first k qualifying responses)."""
    main_rows: torch.Tensor
    """long [N - k]: rows k.. of the main rollout (the first k are dropped)."""
    advantages: torch.Tensor
    """[k + N - k] advantages of the update rows in that order: 1 for the temperature samples, then the main
    rows' own."""

    @property
    def k(self) -> int:
        return int(self.extra_rows.numel())


def aepo_update_rows(main_advantages: torch.Tensor, extra_advantages: torch.Tensor, *, entropy: float,
                     target: float = 0.5, reinforce_sample_num: int = 60, threshold: float = 0.05) -> AEPOUpdate:
    """Steps 4-6: select the temperature samples (advantage > threshold), take the first k, and replace the first
    k main rows (ray_trainer.py:801-808). main_advantages [N] (or [N, T], read at token 0), extra_advantages [M]
    (or [M, T]). No qualifying sample gives k = 0 (the official code crashes)."""
    kept = aepo_select(extra_advantages, threshold)
    check_tensor("main_advantages", main_advantages)
    if main_advantages.dim() not in (1, 2):
        raise ValueError(f"main_advantages must have shape [N] or [N, T], got {list(main_advantages.shape)}")
    main = main_advantages.detach()
    main = main[:, 0] if main.dim() == 2 else main
    k = aepo_num_samples(entropy, int(kept.numel()), target, reinforce_sample_num)
    n = main.shape[0]
    rows = torch.arange(min(k, n), n, device=main.device)
    adv = torch.cat([torch.ones(k, dtype=main.dtype, device=main.device), main[rows]])
    return AEPOUpdate(extra_rows=kept[:k], main_rows=rows, advantages=adv)


# ---------------------------------------------------------------------------------------------- the method
@dataclass(frozen=True)
class AEPOConfig(PGConfig):
    """AEPO (arXiv 2510.08141); defaults from the official code (597358816/AEPO@b353a054)."""

    dual_clip: float | None = 3.0
    """Dual-clip c for A < 0 (EasyR1 clip_ratio_dual 3.0, verl/workers/actor/config.py)."""
    target: float = 0.5
    """H_target, trainer.entropy_base (verl/trainer/config.py:87, examples/qwen-math-7b-AEPO.sh:16)."""
    t_high: float = 1.2
    """Temperature of the extra samples while H_prev <= H_target (trainer.temperature_high, config.py:85)."""
    t_low: float = 0.8
    """Temperature of the extra samples while H_prev > H_target (trainer.temperature_low, config.py:86)."""
    reinforce_sample_num: int = 60
    """Most temperature samples per step (trainer.reinforce_sample_num, config.py:88; halved above the target).
    Official scale: 60 of 2560 rows (512 prompts x 5); 0 turns the method into grpo."""
    resample_divisor: int = 4
    """The first len(prompts) // resample_divisor prompts are generated again at T (ray_trainer.py:791)."""
    select_threshold: float = 0.05
    """Temperature samples with GRPO advantage > this are kept (ray_trainer.py:801)."""
    initial_entropy: float = 0.0
    """H_prev before the first measurement (ray_trainer.py:730: 0, so the first step takes T_high)."""
    entropy_estimate: str = "nll"
    """"nll": -log pi of the sampled tokens of the update batch at the training temperature (the code,
    dp_actor.py:321); "entropy": the full-vocabulary entropy of the current policy (TokenBatch.entropy / logits)."""
    entropy_average: str = "token"
    """"token": token mean over the step (every micro-batch and rank); "micro_batch": the official mean of the
    per-micro-batch token means (depends on how the step is split)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("target", self.target)
        check_float("t_high", self.t_high, lo=0.0, lo_open=True)
        check_float("t_low", self.t_low, lo=0.0, lo_open=True)
        check_int("reinforce_sample_num", self.reinforce_sample_num, lo=0)
        check_int("resample_divisor", self.resample_divisor, lo=1)
        check_float("select_threshold", self.select_threshold)
        check_float("initial_entropy", self.initial_entropy)
        check_choice("entropy_estimate", self.entropy_estimate, ("nll", "entropy"))
        check_choice("entropy_average", self.entropy_average, ("token", "micro_batch"))
        for name in ("target", "t_high", "t_low", "select_threshold", "initial_entropy"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}")


@register_method
class AEPO(Method):
    """AEPO; see the module docstring. State: H_prev and the step's pending measurement (``"entropy"``)."""

    name = "aepo"
    Config = AEPOConfig
    detached_inputs = ("entropy",)  # read only for the entropy_estimate="entropy" measurement
    observes = ("estimate_sum", "estimate_count")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.h_prev = LaggedValue(self.config.initial_entropy)
        self.last_k: int | None = None

    def controllers(self):
        return {"entropy": self.h_prev}

    @classmethod
    def neutral_overrides(cls):
        return {"reinforce_sample_num": 0}

    # ----------------------------------------------------------------------------------- engine-facing
    def rollout_plan(self, num_prompts: int) -> AEPOPlan:
        """Call once per training step, before the extra generation (on every rank: the state is the same there):
        closes the previous step's measurement into H_prev and returns the temperature and the number of prompts to
        generate again (0 with ``reinforce_sample_num=0``)."""
        n = self.num_resampled(num_prompts)
        c = self.config
        h = self.h_prev.close()
        return AEPOPlan(temperature=aepo_temperature(h, c.target, c.t_high, c.t_low), num_prompts=n, entropy=h)

    def num_resampled(self, num_prompts: int) -> int:
        """How many of a step's ``num_prompts`` prompts the plan generates again (the first len // resample_divisor;
        0 with ``reinforce_sample_num=0``): what ``rollout_plan`` returns, without touching the state, for an engine
        that checks its batch shapes up front."""
        check_int("num_prompts", num_prompts, lo=0)
        c = self.config
        return num_prompts // c.resample_divisor if c.reinforce_sample_num > 0 else 0

    def assemble(self, main_advantages: torch.Tensor, extra_advantages: torch.Tensor) -> AEPOUpdate:
        """The update rows and their advantages from the main rollout's and the temperature rollout's GRPO
        advantages (per response, or [rows, T]), with the H_prev of this step's plan."""
        c = self.config
        upd = aepo_update_rows(main_advantages, extra_advantages, entropy=self.h_prev.value, target=c.target,
                               reinforce_sample_num=c.reinforce_sample_num, threshold=c.select_threshold)
        self.last_k = upd.k
        return upd

    # -------------------------------------------------------------------------------------------- loss
    def _loss(self, batch, *, new_step):
        c = self.config
        mask = batch.mask
        if c.entropy_estimate == "nll":
            x = -batch.clean(batch.log_prob.detach().to(torch.float64))
        else:
            x = batch.current_entropy(self.name).detach().to(torch.float64)
        if c.entropy_average == "token":
            self.observe(estimate_sum=masked_sum(x, mask), estimate_count=mask.sum())
        else:  # EasyR1's masked_mean (eps 1e-8) of this micro-batch, one per micro-batch
            self.observe(estimate_sum=masked_sum(x, mask) / (mask.sum() + 1e-8), estimate_count=1.0)
        terms = self.pg_terms(batch)
        loss = self.aggregate(terms.loss, mask)
        with torch.no_grad():
            metrics = self.pg_metrics(terms, batch)
            metrics.update({
                "entropy_estimate": masked_mean(x, mask),
                "h_prev": self.h_prev.value,
                "temperature": aepo_temperature(self.h_prev.value, c.target, c.t_high, c.t_low),
                "reinforce_samples": float("nan") if self.last_k is None else float(self.last_k),
            })
        return loss, metrics

    def _update(self, sums):
        self.h_prev.add(sums["estimate_sum"], sums["estimate_count"])
