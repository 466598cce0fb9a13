"""KL-Cov (Cui et al., arXiv 2505.22617; also verl's ``compute_policy_loss_kl_cov``).

No ratio clipping. The top max(1, int(ratio * N)) valid tokens by covariance
Cov_t = (A_t - mean A)(log pi_t - mean log pi) get a KL penalty: l = -A r + beta |log r|; every other token l = -A r.

Defaults: ratio 2e-3 (paper, 7B models; 2e-4 for 32B and in verl's config), beta (ppo_kl_coef) 1.0 (paper; verl's
config default 0.1).

Deviations from the paper / official code: the log-ratio is clamped to [-20, 20] before exp (verl does not); scope
"global" ranks covariances over every rank through ``Method.gather_fn`` (the paper's whole-batch reading); the
default "micro_batch" matches verl.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_choice, check_float
from rlvr_entropy.methods._cov import token_covariance
from rlvr_entropy.methods.base import Method, PGConfig, register_method


@dataclass(frozen=True)
class KLCovConfig(PGConfig):
    """KL-Cov (arXiv 2505.22617)."""

    ratio: float = 2e-3
    """Share of valid tokens that get the KL penalty (kl_cov_ratio; 2e-3 for 7B, 2e-4 for 32B)."""
    beta: float = 1.0
    """KL coefficient (ppo_kl_coef; paper 1.0, verl default 0.1)."""
    scope: str = "micro_batch"
    """"micro_batch" (verl) or "global" (every rank, via gather_fn)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("ratio", self.ratio, lo=0.0, hi=1.0, lo_open=True)
        check_float("beta", self.beta, lo=0.0)
        check_choice("scope", self.scope, ("micro_batch", "global"))


@register_method
class KLCov(Method):
    name = "kl_cov"
    Config = KLCovConfig

    @torch.no_grad()
    def select(self, batch, cov: torch.Tensor) -> torch.Tensor:
        c = self.config
        mask = batch.mask
        sel = torch.zeros_like(mask)
        if c.scope == "global" and self.gather_fn is not None:
            allc = self.gather_fn(cov[mask])
            if allc.numel() == 0:
                return sel
            k = max(1, int(allc.numel() * c.ratio))
            thr = torch.topk(allc, k).values[-1]
            return mask & (cov >= thr)
        n = int(mask.sum())
        if n == 0:
            return sel
        # Same operations as verl, so the same tokens are picked (ties included).
        valid_idx = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
        a = batch.token_advantages()[mask].detach().reshape(-1).cpu()
        lp = batch.log_prob[mask].detach().reshape(-1).cpu()
        cov_v = (a - a.mean()) * (lp - lp.mean())
        k = max(1, int(len(cov_v) * c.ratio))
        top = valid_idx[torch.topk(cov_v, k, largest=True).indices.to(valid_idx.device)]
        sel.view(-1)[top] = True
        return sel

    def _loss(self, batch, *, new_step):
        c = self.config
        adv = batch.token_advantages()
        terms = self.pg_terms(batch, adv)
        l1 = -adv * terms.ratio
        cov = token_covariance(batch.clean(batch.log_prob), adv, batch.mask,
                               self.gather_fn if c.scope == "global" else None)
        sel = self.select(batch, cov)
        loss_mat = torch.where(sel, l1 + c.beta * terms.log_ratio.abs(), l1)
        loss = self.aggregate(loss_mat, batch.mask)
        metrics = self.pg_metrics(terms, batch)
        metrics.update({"selected_frac": masked_mean(sel.float(), batch.mask),
                        "abs_kl": masked_mean(terms.log_ratio.detach().abs(), batch.mask),
                        "cov_mean": masked_mean(cov, batch.mask)})
        return loss, metrics
