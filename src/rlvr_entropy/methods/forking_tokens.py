"""Forking tokens ("Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RL for LLM Reasoning",
arXiv 2506.01939): the policy gradient only on tokens whose entropy is at or above the q-quantile (q = 0.8).

- scope "batch" (paper; TRL 1.16's ``top_entropy_quantile``): threshold = torch.quantile (linear) of H over the
  batch's valid tokens (all ranks when ``gather_fn`` is set), keep H >= threshold;
- scope "response" (the SIREN repository's baseline): the same per response.
The masked-out tokens contribute 0 to the loss; the aggregation denominators still count every valid token, as in
TRL (the per-token loss is multiplied by the entropy mask).

Deviations: none known for scope "batch" (tested against TRL's ``get_high_entropy_mask``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_choice, check_float
from rlvr_entropy.methods.base import GatherFn, Method, PGConfig, register_method


@torch.no_grad()
def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float = 0.8, scope: str = "batch",
                      gather_fn: GatherFn | None = None) -> torch.Tensor:
    """bool [B, T]: valid tokens with entropy >= the ``quantile`` of valid entropies (per batch or per response)."""
    e = entropy.detach().float() if entropy.dtype != torch.float64 else entropy.detach()
    if scope == "batch":
        vals = e[mask]
        if gather_fn is not None:
            vals = gather_fn(vals)
        if vals.numel() == 0:
            return torch.zeros_like(mask)
        thr = torch.quantile(vals, quantile)
        return (e >= thr) & mask
    vals = torch.where(mask, e, torch.full_like(e, float("nan")))
    thr = torch.nanquantile(vals, quantile, dim=-1, keepdim=True)
    return (e >= thr) & mask


@dataclass(frozen=True)
class ForkingTokensConfig(PGConfig):
    """Policy gradient on the top-(1 - q) entropy tokens (arXiv 2506.01939)."""

    quantile: float = 0.8
    """Entropy quantile q: tokens with H >= the q-quantile are kept (paper: top 20%)."""
    scope: str = "batch"
    """"batch" (paper, TRL) or "response" (per-row quantile, SIREN repo baseline)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("quantile", self.quantile, lo=0.0, hi=1.0)
        check_choice("scope", self.scope, ("batch", "response"))


@register_method
class ForkingTokens(Method):
    name = "forking_tokens"
    detached_inputs = ("entropy", "logits")
    Config = ForkingTokensConfig

    @classmethod
    def neutral_overrides(cls):
        return {"quantile": 0.0}

    def _loss(self, batch, *, new_step):
        h = batch.current_entropy(self.name)
        keep = high_entropy_mask(h, batch.mask, self.config.quantile, self.config.scope, self.gather_fn)
        terms = self.pg_terms(batch)
        loss_mat = torch.where(keep, terms.loss, torch.zeros_like(terms.loss))
        loss = self.aggregate(loss_mat, batch.mask)
        metrics = self.pg_metrics(terms, batch)
        metrics.update({"kept_frac": masked_mean(keep.float(), batch.mask),
                        "entropy": masked_mean(h.detach(), batch.mask)})
        return loss, metrics
