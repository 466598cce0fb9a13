"""Shared pieces of Clip-Cov and KL-Cov (Cui et al., arXiv 2505.22617): token covariance and scoped selection."""
from __future__ import annotations

import torch

from rlvr_entropy.methods.base import GatherFn


@torch.no_grad()
def token_covariance(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     gather_fn: GatherFn | None = None) -> torch.Tensor:
    """Cov_t = (A_t - mean A)(log pi_t - mean log pi) over valid tokens, [B, T] (0 at padding).

    Means are over the valid tokens of this call, or of every rank when ``gather_fn`` is given.
    """
    lp = log_prob.detach()
    a = advantages.detach()
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    sums = torch.stack([torch.where(mask, a, zero).sum(), torch.where(mask, lp, zero).sum(),
                        mask.sum().to(lp.dtype)])
    if gather_fn is not None:
        sums = gather_fn(sums).reshape(-1, 3).sum(0)
    n = sums[2].clamp(min=1)
    cov = (a - sums[0] / n) * (lp - sums[1] / n)
    return torch.where(mask, cov, zero)


def _generator(seed: int | None, counter: int) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + counter)
