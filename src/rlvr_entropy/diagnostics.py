"""Entropy-change diagnostics: predicted (first-order) vs measured change of token entropy across an update.

Before an optimizer step, :func:`rlvr_entropy.stats.predicted_entropy_change` predicts each token's entropy change
(divided by the learning rate) in two forms: STEER's closed form and the exact first-order form for a softmax step
(steer.md, last section). After the step the entropy at the same positions is recomputed; :func:`change_report`
correlates predicted with measured (Pearson and Spearman), overall and per quadrant: the sign of the advantage x
whether the sampled token is "high probability" (pi_a > exp(-H), the sign rule of STEER's indicator).

The probe reads either materialized logits [B, T, V] or an :class:`rlvr_entropy.kernels.LMHeadSource` (hidden
states + LM head: the same statistics from a tiled pass, without [B, T, V] logits; a source that already holds them
from the loss pass costs nothing more).

Imports only torch. Shapes: positions are flattened to [N] after masking.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from rlvr_entropy import stats
from rlvr_entropy.kernels.lm_head import LMHeadSource
from rlvr_entropy.stats import Stat

QUADRANTS = ("pos_high", "pos_low", "neg_high", "neg_low")
FORMS = ("exact", "steer")


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors; NaN when fewer than 2 points or a constant input."""
    x = x.double().flatten()
    y = y.double().flatten()
    if x.numel() != y.numel():
        raise ValueError(f"x and y must have the same number of elements, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum()) / den if den > 0 else math.nan


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), 0-based."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64)
    uniq, inv = torch.unique(x, return_inverse=True)
    if uniq.numel() < x.numel():
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, ranks)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
        ranks = (sums / counts)[inv]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(_ranks(x), _ranks(y))


def quadrant_of(advantages: torch.Tensor, log_prob: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """Quadrant index [N] (into QUADRANTS): A > 0 or not, x pi_a > exp(-H) or not. A == 0 counts as negative."""
    high = log_prob > -entropy
    pos = advantages > 0
    return torch.where(pos, torch.where(high, 0, 1), torch.where(high, 2, 3))


@dataclass
class ProbeRecord:
    """What one probe saw, flattened over valid positions [N]."""

    step: int
    predicted: dict[str, torch.Tensor]
    measured: torch.Tensor
    quadrant: torch.Tensor
    report: dict[str, float] = field(default_factory=dict)

    def to_json(self, max_points: int = 2000) -> dict[str, Any]:
        n = self.measured.numel()
        idx = torch.arange(n) if n <= max_points else torch.randperm(
            n, generator=torch.Generator().manual_seed(0))[:max_points]
        return {
            "step": self.step,
            "report": self.report,
            "measured": self.measured[idx].tolist(),
            "quadrant": self.quadrant[idx].tolist(),
            **{f"predicted_{k}": v[idx].tolist() for k, v in self.predicted.items()},
        }


def change_report(predicted: dict[str, torch.Tensor], measured: torch.Tensor, quadrant: torch.Tensor) -> dict[str, float]:
    """Correlations of each predicted form with the measured change, overall and per quadrant.

    Keys: "<form>/pearson", "<form>/spearman", "<form>/pearson/<quadrant>", plus "count/<quadrant>".
    """
    out: dict[str, float] = {}
    for form, pred in predicted.items():
        out[f"{form}/pearson"] = pearson(pred, measured)
        out[f"{form}/spearman"] = spearman(pred, measured)
        for qi, q in enumerate(QUADRANTS):
            sel = quadrant == qi
            out[f"{form}/pearson/{q}"] = pearson(pred[sel], measured[sel])
    for qi, q in enumerate(QUADRANTS):
        out[f"count/{q}"] = float((quadrant == qi).sum())
    return out


class EntropyChangeProbe:
    """Two-phase probe around one update.

    ``before(logits, token_ids, coef, mask, advantages)`` records the entropy and both predictions;
    ``after(logits_after)`` recomputes the entropy at the same positions and returns a :class:`ProbeRecord`.
    logits [B, T, V] (temperature applied) or an :class:`~rlvr_entropy.kernels.LMHeadSource` (then token_ids must
    be the source's), token_ids/coef/mask/advantages [B, T]. ``coef`` is the signed update coefficient w (A r for
    tokens the surrogate pushes, 0 where clipped, times any token weight).
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None

    @torch.no_grad()
    def before(self, logits, token_ids, coef, mask, advantages, step: int = 0) -> None:
        mask = mask.bool()
        if isinstance(logits, LMHeadSource):
            src = logits
            if tuple(token_ids.shape) != tuple(src.shape) or not bool(
                    (token_ids.to(src.token_ids.device).long() == src.token_ids)[mask.to(src.mask.device)].all()):
                raise ValueError("token_ids must be the LMHeadSource's token ids at the valid positions")
            if bool((mask.to(src.mask.device) & ~src.mask).any()):
                raise ValueError("mask has valid positions outside the LMHeadSource's mask")
            src.prefetch(Stat.log_prob(), Stat.entropy(), Stat.change_terms())  # one pass unless already cached
            h, logp = src.entropy().detach(), src.log_prob().detach()
            second = src.change_terms()[1]
            h, logp, second = (x.to(mask.device) for x in (h, logp, second))
            preds = {f: stats.predicted_entropy_change_from_terms(logp, h, second, coef.detach(), form=f,
                                                                 mask=mask)[mask] for f in FORMS}
        else:
            h = stats.entropy(logits.detach(), mask=mask)
            logp = torch.log_softmax(logits.detach().float(), -1).gather(-1, token_ids[..., None].long()).squeeze(-1)
            preds = {f: stats.predicted_entropy_change(logits.detach(), token_ids, coef.detach(), form=f,
                                                       mask=mask)[mask] for f in FORMS}
        self._state = dict(h=h[mask], mask=mask, quadrant=quadrant_of(advantages[mask], logp[mask], h[mask]),
                           preds=preds, step=step)

    @torch.no_grad()
    def after(self, logits_after) -> ProbeRecord:
        if self._state is None:
            raise RuntimeError("EntropyChangeProbe.after() called before before()")
        s, self._state = self._state, None
        if isinstance(logits_after, LMHeadSource):
            if bool((s["mask"].to(logits_after.mask.device) & ~logits_after.mask).any()):
                raise ValueError("the probed positions must be valid in the LMHeadSource passed to after()")
            h_after = logits_after.entropy().detach().to(s["mask"].device)[s["mask"]]
        else:
            h_after = stats.entropy(logits_after.detach(), mask=s["mask"])[s["mask"]]
        measured = (h_after - s["h"]).double()
        rec = ProbeRecord(step=s["step"], predicted={k: v.double() for k, v in s["preds"].items()},
                          measured=measured, quadrant=s["quadrant"])
        rec.report = change_report(rec.predicted, rec.measured, rec.quadrant)
        return rec
