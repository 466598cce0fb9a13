"""EntroPIC: PI control of entropy through a loss term on confident tokens (arXiv 2511.15248; official code
yk7333/EntroPIC@2470730c: core_algos.py:811-901 ``compute_policy_loss_entropic``, dp_actor.py:120-220, over
volcengine/verl@4424616d).

    L = L_PG + alpha * L_adj
    L_PG  = agg(dual-clip PPO token loss, mask)                       (clip 0.2 / 0.2, c = 3, token-mean)
    L_adj = agg(-r |A|, M),  M = mask & (log pi_theta > log tau),  tau = 0.95   (same aggregation, own mask)
    alpha = clip(K_i I + K_p (H - H_target), -1, 1)                    (EntroPICController)

r = exp(clamp(log pi_theta - log pi_old, -20, 20)) is the UNCLIPPED ratio, with gradient; M and alpha are
constants. H is the current policy's entropy (logits / sampling temperature) aggregated with the PG term's mode.
For alpha > 0 (entropy too high) every confident token is pushed up whatever its sign: positive samples are
reinforced harder and negative ones suppressed less, which sharpens; alpha < 0 the reverse. L_adj is normalized by
the number of confident tokens N_M (not N), so with few confident tokens it weighs more; with none it is 0.

The step (this library's protocol, methods/base.py):
- each ``compute_loss`` call (micro-batch k) uses the integral I as it stands and this micro-batch's own entropy
  H_k in the proportional term, as the official actor does per micro-batch;
- ``end_step`` adds (H_step - H_target) to I once, where H_step is the entropy of the whole step (every micro-batch,
  every rank) aggregated as if it were one batch. Official: I gains sum_k (H_k - H_target) rows_k / mini-batch
  size, the row-weighted mean of the micro-batch errors of that rank.

Defaults: H_target 0.1 (run_entropic.sh:13, the only value that runs), K_p 1, K_i 0.01 (entropic.yaml:15-16),
tau 0.95 (the loss function's default), verl's PG defaults (clip 0.2 / 0.2, dual clip 3, token-mean).

Deviations from the official code (each fix of an official bug is an option, off by default):
- Rank- and split-invariant integral: one update per optimizer step from the whole step's entropy (above), so every
  rank holds the same I and alpha (the official keeps one I per data-parallel rank, never all-reduced). With one
  micro-batch per step on one rank this is the official update; with equal-sized micro-batches (token-mean) it
  equals the official row-weighted mean; across ranks it is the mean of the official per-rank increments (equal
  rows per rank). Within a step the micro-batches after the first do not yet see the step's own earlier errors in
  I (official: I_{k-1} includes them); the difference in alpha is at most K_i |e| (0.01 |e| by default).
- I is saved by ``state_dict()`` (the official loses it on resume) with the number of updates.
- A micro-batch (or step) with no valid token measures nothing (the official measures H = 0 there). Rows count
  once each however many tokens they hold, as in the official only through the aggregation mode.
- The method aggregates with the library's ``agg_loss``: "seq-mean-token-sum-norm" is the mean of row sums over
  ``norm_length`` (verl >= 0.6; verl@4424616d sums the rows and divides by the padded length) and "token-mean"
  divides by the count (verl: count + 1e-8). :func:`entropic_policy_loss` follows verl@4424616d exactly.
  "token-sum" (not a verl@4424616d mode) measures the controller's entropy as a token mean.
- H_target <= 0 runs (the official code stops with a TypeError unless H_target > 0 or entropy_coeff != 0).
- Options: ``adjust_ratio="clipped"`` uses clip(r, 1 - eps_low, 1 + eps_high) in L_adj (official: unclipped, so
  off-policy one stale confident token can dominate the loss); ``integral_max`` clamps I (anti-windup; official
  none); ``fold=True`` normalizes L_adj by the PG term's mask instead of M, i.e. the (1 +- alpha) per-token
  reweighting of confident tokens inside L_PG that third-party summaries describe (not the official code);
  ``ki=0`` is the paper's P-only variant.
- No importance-sampling weights in the method (TokenBatch carries none); :func:`entropic_policy_loss` takes them
  and, as the official code, applies them to L_PG only.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from rlvr_entropy.controllers.entropic import EntroPICController
from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.batch import TokenBatch
from rlvr_entropy.core.surrogate import PGTerms, ppo_token_loss
from rlvr_entropy.core.validation import check_choice, check_finite_where, check_float, check_shape, check_tensor
from rlvr_entropy.methods.base import Method, PGConfig, register_method

__all__ = ["entropic_policy_loss", "EntroPICController", "EntroPICConfig", "EntroPIC", "confident_mask"]

VERL_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# ------------------------------------------------------------------------------------------------ the math
def confident_mask(log_prob: torch.Tensor, mask: torch.Tensor, high_prob_threshold: float = 0.95) -> torch.Tensor:
    """M = mask & (log_prob > log tau), bool [B, T], no gradient. As the official code: strict ">", the threshold is
    torch.log of a float32 tensor (log 0.95 = -0.0512933...), compared in torch's promoted dtype; the CURRENT
    log-prob decides."""
    thr = torch.log(torch.tensor(float(high_prob_threshold), device=log_prob.device))  # float32, 0-dim
    lp = torch.where(mask, log_prob.detach(), torch.full((), float("-inf"), dtype=log_prob.dtype,
                                                          device=log_prob.device))
    return mask & (lp > thr)


def _scalar(name: str, value: object) -> float:
    """A finite Python float from a number, a numpy scalar or a one-element tensor (detached)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {list(value.shape)}")
        value = float(value.detach())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _verl_agg(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """verl@4424616d ``agg_loss`` (core_algos.py:772-808): token-mean divides by (count + 1e-8); the seq-mean
    modes drop rows without a valid token (means with + 1e-8); seq-mean-token-sum-norm sums the row sums and divides
    by the padded length. Padding is never read (``where`` instead of ``x * mask``)."""
    z = torch.where(mask, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return z.sum() / (m.sum() + 1e-8)
    row_sum = z.sum(-1)                                                       # [B]
    count = m.sum(-1)                                                         # [B]
    if mode == "seq-mean-token-sum-norm":
        return row_sum.sum() / loss_mat.shape[-1]
    seq = row_sum / (count + 1e-8) if mode == "seq-mean-token-mean" else row_sum
    seq_mask = (count > 0).to(loss_mat.dtype)
    return (seq * seq_mask).sum() / (seq_mask.sum() + 1e-8)


def _entropic_loss(terms: PGTerms, adv: torch.Tensor, mask: torch.Tensor, conf: torch.Tensor, alpha: float,
                   agg: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, eps_low: float, eps_high: float,
                   is_weights: torch.Tensor | None = None, adjust_ratio: str = "unclipped",
                   fold: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, L_PG, L_adj) from the PPO terms. adv [B, T] (0 at padding), mask/conf bool [B, T]."""
    pg_mat = terms.loss if is_weights is None else terms.loss * is_weights
    pg = agg(pg_mat, mask)
    r = terms.ratio if adjust_ratio == "unclipped" else torch.clamp(terms.ratio, 1.0 - eps_low, 1.0 + eps_high)
    adj_mat = -r * adv.abs()                                                  # IS weights not applied (official)
    if fold:  # the confident tokens' term, normalized like L_PG
        adj = agg(torch.where(conf, adj_mat, torch.zeros((), dtype=adj_mat.dtype, device=adj_mat.device)), mask)
    else:
        adj = agg(adj_mat, conf)
    return pg + alpha * adj, pg, adj


def entropic_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                         mask: torch.Tensor, *, alpha: float, high_prob_threshold: float = 0.95,
                         eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = 3.0,
                         loss_agg_mode: str = "token-mean", is_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The official EntroPIC loss for a given alpha (``compute_policy_loss_entropic``, entropic.md section 2).

    log_prob [B, T] (with gradient), old_log_prob [B, T], advantages [B, T] or [B], mask [B, T] (bool or 0/1),
    is_weights [B, T] (rollout importance weights, applied to L_PG only) -> 0-dim

        L_PG + alpha * agg(-r |A|, mask & (log_prob > log tau))

    with verl@4424616d's aggregation (:func:`_verl_agg`) and r the unclipped ratio (log-ratio clamped to +-20).
    Padding is never read. Raises ValueError naming the argument for a wrong shape, a non-finite value at a valid
    position or a bad setting.
    """
    batch = TokenBatch(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, mask=mask)
    alpha = _scalar("alpha", alpha)
    check_float("high_prob_threshold", high_prob_threshold, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    check_float("eps_low", eps_low, lo=0.0, hi=1.0, hi_open=True)
    check_float("eps_high", eps_high, lo=0.0)
    if dual_clip is not None:
        check_float("dual_clip", dual_clip, lo=1.0, lo_open=True)
    check_choice("loss_agg_mode", loss_agg_mode, VERL_AGG_MODES)
    m = batch.mask
    if is_weights is not None:
        check_tensor("is_weights", is_weights)
        check_shape("is_weights", is_weights, tuple(m.shape), "same as log_prob")
        check_finite_where("is_weights", is_weights, m)
        is_weights = batch.clean(is_weights.detach().to(log_prob.dtype))
    adv = batch.token_advantages()
    terms = ppo_token_loss(batch.clean(log_prob), batch.clean(old_log_prob), adv, eps_low=eps_low,
                           eps_high=eps_high, dual_clip=dual_clip, clamp_log_ratio=20.0)
    conf = confident_mask(log_prob, m, high_prob_threshold)
    agg = lambda x, mk: _verl_agg(x, mk, loss_agg_mode)  # noqa: E731
    loss, _, _ = _entropic_loss(terms, adv, m, conf, alpha, agg, eps_low=eps_low, eps_high=eps_high,
                                is_weights=is_weights)
    return loss


def _agg_parts(x: torch.Tensor, mask: torch.Tensor, mode: str, norm_length: int | None) -> tuple[float, float]:
    """(numerator, denominator) with numerator / denominator = ``agg_loss(x, mask, mode)`` on one batch, and sums of
    both over micro-batches and ranks = the aggregate of the whole step as one batch. "token-sum" uses the token
    mean. x [B, T] detached, mask bool [B, T]."""
    x = torch.where(mask, x.detach().to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    if mode in ("token-mean", "token-sum"):
        return float(x.sum()), float(mask.sum())
    count = mask.sum(-1)
    rows = count > 0
    row = x.sum(-1)
    if mode == "seq-mean-token-mean":
        row = row / count.clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        row = row / float(norm_length if norm_length is not None else x.shape[-1])
    return float(row[rows].sum()), float(rows.sum())


# ---------------------------------------------------------------------------------------------- the method
@dataclass(frozen=True)
class EntroPICConfig(PGConfig):
    """EntroPIC (arXiv 2511.15248); defaults from the official code (yk7333/EntroPIC@2470730c)."""

    dual_clip: float | None = 3.0
    """Dual-clip c for A < 0: verl's clip_ratio_c, always on in the official loss (core_algos.py:852)."""
    target: float = 0.1
    """H_target (nats, temperature-scaled entropy): run_entropic.sh:13 (the yaml's -1 and the dataclass's 0 crash)."""
    kp: float = 1.0
    """Proportional gain K_p on H - H_target (config/entropic.yaml:15, run_entropic.sh:14)."""
    ki: float = 0.01
    """Integral gain K_i (config/entropic.yaml:16, run_entropic.sh:15); 0 is the paper's P-only variant."""
    alpha_max: float = 1.0
    """alpha is clipped to [-alpha_max, alpha_max] (np.clip(., -1, 1), dp_actor.py:143)."""
    integral_max: float | None = None
    """Option (anti-windup, not in the official code): clamp I to [-integral_max, integral_max]; None: unbounded."""
    high_prob_threshold: float = 0.95
    """tau of the confident-token mask log pi > log tau (the loss function's default; dp_actor never passes it)."""
    adjust_ratio: str = "unclipped"
    """Ratio in L_adj: "unclipped" (official: only the +-20 log-ratio clamp) or "clipped" (clip(r, 1 - eps_low,
    1 + eps_high), an option that bounds the off-policy term)."""
    fold: bool = False
    """Option: normalize L_adj by the PG term's mask (N tokens) instead of the confident ones (N_M): the (1 +- alpha)
    per-token reweighting of confident tokens inside L_PG. Official: False."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("target", self.target)
        check_float("kp", self.kp)
        check_float("ki", self.ki)
        check_float("alpha_max", self.alpha_max, lo=0.0)
        if self.integral_max is not None:
            check_float("integral_max", self.integral_max, lo=0.0)
        check_float("high_prob_threshold", self.high_prob_threshold, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_choice("adjust_ratio", self.adjust_ratio, ("unclipped", "clipped"))
        if not isinstance(self.fold, bool):
            raise ValueError(f"fold must be a bool, got {self.fold!r}")
        for name in ("target", "kp", "ki"):
            if abs(float(getattr(self, name))) == float("inf"):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}")


@register_method
class EntroPIC(Method):
    """EntroPIC; see the module docstring. State: the PI controller (``controllers()["pi"]``)."""

    name = "entropic"
    Config = EntroPICConfig
    detached_inputs = ("entropy",)  # the entropy only sets alpha (a constant of the loss)
    observes = ("entropy_num", "entropy_den")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        c = self.config
        self.ctrl = EntroPICController(c.target, c.kp, c.ki, alpha_max=c.alpha_max, integral_max=c.integral_max)

    def controllers(self):
        return {"pi": self.ctrl}

    @classmethod
    def neutral_overrides(cls):
        return {"kp": 0.0, "ki": 0.0}

    def _loss(self, batch, *, new_step):
        c = self.config
        mask = batch.mask
        h_tok = batch.current_entropy(self.name).detach()                   # [B, T], 0 at padding
        num, den = _agg_parts(h_tok, mask, c.loss_agg_mode, c.norm_length)
        self.observe(entropy_num=num, entropy_den=den)
        h = num / den if den > 0 else None                                  # this micro-batch's H_k
        alpha = self.ctrl.alpha(c.target if h is None else h)
        adv = batch.token_advantages()
        terms = self.pg_terms(batch, adv)
        conf = confident_mask(batch.log_prob, mask, c.high_prob_threshold)
        loss, pg, adj = _entropic_loss(terms, adv, mask, conf, alpha, self.aggregate, eps_low=c.eps_low,
                                       eps_high=c.eps_high, adjust_ratio=c.adjust_ratio, fold=c.fold)
        with torch.no_grad():
            metrics = self.pg_metrics(terms, batch)
            metrics.update({
                "alpha": alpha,
                "integral": self.ctrl.integral,
                "entropy": float("nan") if h is None else h,
                "error": float("nan") if h is None else h - c.target,
                "target": c.target,
                "pg_loss": pg.detach(),
                "adjust_loss": adj.detach(),
                "confident_frac": masked_mean(conf.float(), mask),
            })
        return loss, metrics

    def _update(self, sums):
        if sums["entropy_den"] > 0:  # the whole step (every micro-batch, every rank) as one batch
            self.ctrl.update(sums["entropy_num"] / sums["entropy_den"], weight=1.0)
