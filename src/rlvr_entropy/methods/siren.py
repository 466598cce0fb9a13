"""SIREN: selective entropy regularization (Rethinking Entropy Regularization in Large Reasoning Models,
arXiv 2509.25133; official code github.com/Linn3a/siren at fa59a8d, verl/verl/workers/actor/dp_actor.py).

    loss = L_PG + beta * (H_sel - A)^2

1. H_p [B, T]: entropy of each position's top-p nucleus, renormalized (:func:`rlvr_entropy.stats.top_p_entropy`;
   exclusive boundary, top_k = 10000, p = 0.8; the logits already carry the sampling temperature). Read through
   ``TokenBatch.stat``: from ``logits``, or from ``lm_head`` (hidden states + LM head, tiled, no [B, T, V] logits;
   :mod:`rlvr_entropy.kernels`).
2. Peak mask (:func:`peak_entropy_mask`): per response, tau_i = the q-quantile (linear interpolation, like
   torch.nanquantile) of the row's valid H_p; selected M = (H_p > tau_i) & valid (strict >, computed from detached
   values: the set is a constant).
3. H_sel = (1/B) sum_i [sum_t M H_p / sum_t M] (:func:`selected_entropy`); a row with no selected token
   contributes 0 and still counts in B.
4. A: the anchor, measured once with the initial policy on the whole first training step (every micro-batch,
   every rank: the mean over responses of their H_sel, no gradient), kept in an
   :class:`~rlvr_entropy.controllers.Anchor` that is saved with checkpoints.

PG part as in the official runs: PPO clip 0.2 / 0.2, dual-clip 3, seq-mean-token-sum-norm over the maximum
response length 3072, no KL.

The anchor: an engine that holds the whole first rollout batch with its logits may call :meth:`Siren.prepare` with
it (on every rank) before the first ``compute_loss``; that measures A on the whole global batch, as the paper does.
Without it the first rollout measures A: its micro-batches carry no penalty (the anchor is not known yet) and add
their responses' H_sel to the sums, and the ``end_step(rollout_end=True)`` that completes the first pass over the
rollout sets A from the sums of every rank (``observes_per = "rollout"``: when the rollout spans several optimizer
steps, as with TRL's ``steps_per_generation`` or verl's mini-batches, the steps before carry no penalty either).
Either way A does not depend on how the batch is split into micro-batches, optimizer steps or ranks.

Deviations from the paper / official code:
- The anchor is part of ``state_dict()`` and survives a resume (the official code measures it again after a
  restart, with the current policy instead of the initial one).
- Without ``prepare``, a rollout trained in several optimizer steps is measured step by step: the first step's
  micro-batches with the initial policy, later ones with the policy after the steps before (the paper measures
  every response with the initial policy; at the paper's lr of 1e-6 the difference is negligible; ``prepare``
  gives the paper's exact value where the engine holds the whole rollout with its logits).
- Without ``prepare``, the first rollout has no penalty: the official code measures A on the first batch and
  applies (H_sel - A)^2 in the same step, whose gradient is 0 when that batch is a single micro-batch and small
  otherwise. A response with no valid token does not count in the anchor's mean (it does in the official B), so
  padding rows cannot move it.
- The official runs sum size-weighted squared deviations over micro-batches; here H_sel and the penalty are
  computed per ``compute_loss`` call, i.e. per micro-batch. The regularizer therefore depends on the micro-batch
  split (a square of a mean is not a mean of squares); with one micro-batch per step it is the paper's formula.
- Top-p entropy leaves out the 1e-12 terms of the official renormalization (see ``stats.top_p_entropy``); the
  tests check the difference is below 1e-9.
- The quantile is computed with a sort (the same arithmetic as torch.nanquantile's linear interpolation, without
  its 16M-element limit on the tensor size).
- Ablations as options: ``use_anchor=False`` (loss = L_PG - beta H_sel), ``use_top_p=False`` (full-vocabulary
  entropy), ``use_peak_mask=False`` (every valid token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.controllers.anchor import Anchor
from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.batch import TokenBatch
from rlvr_entropy.core.validation import (as_bool_mask, check_finite_where, check_float, check_int, check_shape,
                                          check_tensor)
from rlvr_entropy.methods.base import Method, PGConfig, register_method
from rlvr_entropy.stats import Stat


def _check_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    check_tensor("entropy", entropy)
    if entropy.dim() != 2:
        raise ValueError(f"entropy must have shape [B, T], got {list(entropy.shape)}")
    if not entropy.is_floating_point():
        raise ValueError(f"entropy must be a floating tensor, got {entropy.dtype}")
    mask = as_bool_mask("mask", mask)
    check_shape("mask", mask, tuple(entropy.shape), "same as entropy")
    check_finite_where("entropy", entropy, mask)
    check_float("quantile", quantile, lo=0.0, hi=1.0)
    return mask


@torch.no_grad()
def row_quantile(values: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Per-row ``quantile`` of the valid entries, linear interpolation. values [B, T], mask bool [B, T] -> [B]
    (NaN for a row with no valid entry). Same arithmetic as ``torch.nanquantile(where(mask, values, nan), q, -1)``
    (rank = q (n - 1) in the values' dtype, lerp between the neighbours), but with a sort, so there is no limit on
    the tensor size."""
    v = torch.where(mask, values, torch.full((), float("inf"), dtype=values.dtype, device=values.device))
    s = torch.sort(v, dim=-1).values                                           # [B, T], valid values first
    n = mask.sum(-1, keepdim=True)                                             # [B, 1]
    rank = torch.tensor(quantile, dtype=values.dtype, device=values.device) * (n - 1).clamp(min=0).to(values.dtype)
    below = rank.floor()
    lo = s.gather(-1, below.long().clamp(max=max(s.shape[-1] - 1, 0)))
    hi = s.gather(-1, rank.ceil().long().clamp(max=max(s.shape[-1] - 1, 0)))
    tau = torch.lerp(lo, hi, rank - below)
    return torch.where(n > 0, tau, torch.full_like(tau, float("nan"))).squeeze(-1)


def peak_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float = 0.8) -> torch.Tensor:
    """SIREN's per-response peak-entropy positions (siren.md section 2). entropy [B, T], mask bool [B, T] ->
    bool [B, T]: valid positions whose value is strictly above the row's ``quantile`` (linear interpolation over
    the row's valid values, like torch.nanquantile). Ties at tau are not selected, so a row whose values are all
    equal selects nothing; a row with no valid token selects nothing. No gradient (values are detached); padded
    positions may hold anything, NaN included."""
    mask = _check_entropy_mask(entropy, mask, quantile)
    if entropy.numel() == 0:
        return mask.clone()
    with torch.no_grad():
        e = entropy.detach().to(torch.float64 if entropy.dtype == torch.float64 else torch.float32)
        e = torch.where(mask, e, torch.zeros((), dtype=e.dtype, device=e.device))
        tau = row_quantile(e, mask, quantile)                 # [B], NaN for empty rows
        return (e > tau[:, None]) & mask                      # NaN compares False


def _row_mean_over(values: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i mean of values over sel in row i (a row with no selection gives 0 and counts in B).
    values [B, T] (anything, NaN included, outside sel), sel bool [B, T] -> 0-dim."""
    z = torch.where(sel, values, torch.zeros((), dtype=values.dtype, device=values.device))
    row = z.sum(-1) / sel.sum(-1).clamp(min=1).to(values.dtype)  # [B]
    return row.mean() if row.numel() else z.sum() * 0


def selected_entropy(entropy: torch.Tensor, mask: torch.Tensor, quantile: float = 0.8) -> torch.Tensor:
    """H_sel (siren.md section 3): seq-mean-token-mean of ``entropy`` over :func:`peak_entropy_mask`; a row with
    no selected token contributes 0 but counts in B. Differentiable w.r.t. ``entropy`` (the selection itself is
    computed from detached values). entropy [B, T], mask bool [B, T] -> 0-dim."""
    sel = peak_entropy_mask(entropy, mask, quantile)
    return _row_mean_over(entropy, sel)


@dataclass(frozen=True)
class SirenConfig(PGConfig):
    """SIREN (arXiv 2509.25133); PG defaults are those of the official runs (siren.md section 5)."""

    dual_clip: float | None = 3.0
    """Dual-clip c for A < 0 (official runs: 3, verl's default)."""
    loss_agg_mode: str = "seq-mean-token-sum-norm"
    """Official runs: seq-mean-token-sum-norm (Dr. GRPO) over the maximum response length."""
    norm_length: int | None = 3072
    """Maximum response length of the official runs (the divisor of seq-mean-token-sum-norm)."""
    beta: float = 0.005
    """Penalty coefficient beta of beta (H_sel - A)^2 (arXiv 2509.25133 section 4: 0.005, no schedule)."""
    top_p: float = 0.8
    """Nucleus mass p of the top-p entropy H_p (arXiv 2509.25133 section 3.1: 0.8)."""
    top_k: int | None = 10000
    """Only the top K logits are considered for the nucleus (official code: 10000; clamped to V; None = all)."""
    inclusive: bool = False
    """False: the token at which the cumulative sum reaches p is excluded (official code); True: textbook nucleus."""
    quantile: float = 0.8
    """Per-response quantile q of the peak-entropy mask (arXiv 2509.25133: 0.8, the top 20% positions)."""
    anchor_value: float | None = None
    """Anchor A; None measures it at the first step with the initial policy (arXiv 2509.25133 section 4)."""
    use_anchor: bool = True
    """Ablation (arXiv 2509.25133): False gives the plain selective bonus -beta H_sel."""
    use_top_p: bool = True
    """Ablation (arXiv 2509.25133): False uses the full-vocabulary entropy instead of H_p."""
    use_peak_mask: bool = True
    """Ablation (arXiv 2509.25133): False regularizes every valid position."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("beta", self.beta, lo=0.0)
        check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        check_int("top_k", self.top_k, lo=1, allow_none=True)
        check_float("quantile", self.quantile, lo=0.0, hi=1.0)
        if self.anchor_value is not None:
            check_float("anchor_value", self.anchor_value, lo=0.0)
        for f in ("inclusive", "use_anchor", "use_top_p", "use_peak_mask"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f} must be a bool, got {getattr(self, f)!r}")


@register_method
class Siren(Method):
    """SIREN; see the module docstring. State: the anchor (``controllers()["anchor"]``)."""

    name = "siren"
    Config = SirenConfig
    needs = ("logits",)
    observes = ("h_sel_sum", "responses")
    observes_per = "rollout"  # the anchor spans every optimizer step of the first rollout

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.anchor = Anchor(self.config.anchor_value)

    def controllers(self):
        return {"anchor": self.anchor}

    @classmethod
    def neutral_overrides(cls):
        return {"beta": 0.0}

    # ------------------------------------------------------------------------------------------ pieces
    def logits_requests(self) -> tuple[Stat, ...]:
        """The distribution statistic H_p is read from (what an engine prefetches; rlvr_entropy.kernels)."""
        c = self.config
        return (Stat.top_p_entropy(c.top_p, c.top_k, c.inclusive) if c.use_top_p else Stat.entropy(),)

    def position_entropy(self, batch: TokenBatch) -> torch.Tensor:
        """H_p [B, T] (top-p entropy, or the full entropy when ``use_top_p=False``), 0 at padding, with gradient
        to the logits (or, with ``TokenBatch.lm_head``, to the hidden states and the LM head)."""
        return batch.stat(self.logits_requests()[0], self.name)

    def selection(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Regularized positions, bool [B, T]: the peak mask of ``h`` (detached), or every valid position."""
        return peak_entropy_mask(h.detach(), mask, self.config.quantile) if self.config.use_peak_mask else mask

    def regularized_entropy(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H_sel 0-dim with gradient, H_p [B, T], selection bool [B, T]) of one batch."""
        h = self.position_entropy(batch)
        sel = self.selection(h, batch.mask)
        return _row_mean_over(h, sel), h, sel

    def _response_sums(self, h: torch.Tensor, sel: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over responses with a valid token of their H_sel, number of such responses): the anchor's sums."""
        h = h.detach().to(torch.float64)
        row = torch.where(sel, h, torch.zeros((), dtype=h.dtype, device=h.device)).sum(-1) / sel.sum(-1).clamp(min=1)
        has = mask.any(-1)
        return row[has].sum(), has.sum()

    @torch.no_grad()
    def prepare(self, batch: TokenBatch) -> float | None:
        """Measure the anchor on a whole rollout batch (with its logits), before micro-batching; call it once at
        the first training step, on every rank (a collective through ``dist`` unless the anchor is already set).
        Does nothing when the anchor is already set (given in the config, measured earlier, or restored from a
        checkpoint) or when ``use_anchor=False``; leaves it unset when no rank has a valid token. Returns the anchor
        (None if still unset)."""
        if self.config.use_anchor and not self.anchor.is_set:
            _, h, sel = self.regularized_entropy(batch)
            s, n = self._response_sums(h, sel, batch.mask)
            total, count = self.dist.all_reduce_sum(torch.stack([s, n.to(torch.float64)])).tolist()
            if count > 0:
                self.anchor.set(total / count)
        return self.anchor.value

    def _update(self, sums):
        if self.config.use_anchor and not self.anchor.is_set and sums["responses"] > 0:
            self.anchor.set(sums["h_sel_sum"] / sums["responses"])

    # -------------------------------------------------------------------------------------------- loss
    def _loss(self, batch, *, new_step):
        c = self.config
        terms = self.pg_terms(batch)
        pg = self.aggregate(terms.loss, batch.mask)
        h_sel, h, sel = self.regularized_entropy(batch)
        if c.use_anchor and self.anchor.is_set:
            reg = c.beta * (h_sel - self.anchor.value) ** 2
        elif c.use_anchor:  # first step without prepare(): no penalty, the step measures the anchor
            self.observe(**dict(zip(self.observes, self._response_sums(h, sel, batch.mask))))
            reg = h_sel * 0.0
        else:
            reg = -c.beta * h_sel
        loss = pg + reg
        with torch.no_grad():
            metrics = self.pg_metrics(terms, batch)
            metrics.update({
                "selected_entropy": h_sel.detach(),
                "anchor": float(self.anchor.value) if self.anchor.is_set else float("nan"),
                "reg": reg.detach(),
                "selected_frac": masked_mean(sel.float(), batch.mask),
                "top_p_entropy": masked_mean(h.detach(), batch.mask),
            })
        return loss, metrics
