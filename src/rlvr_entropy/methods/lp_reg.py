"""Lp-Reg (arXiv 2510.03222, "Low-probability Tokens Sustain Exploration in RLVR"): protect valuable
low-probability tokens from being driven to zero by negative advantages.

Proxy distribution: drop tokens with pi < kappa * max pi (kappa = 0.02, presumed noise) and renormalize, so
pi_proxy(a) = pi(a) / Z for kept tokens (Z = kept mass) and 0 otherwise. Tokens with A < 0 whose log pi is in the
bottom ``rho`` (1%) of log pi over the valid negative-advantage tokens, and for which pi_theta(a) < pi_proxy(a)
(i.e. a is kept by the proxy), get an added KL(pi_theta || pi_proxy) penalty with coefficient beta (1.0), evaluated
at the sampled token with the k3 estimator (proxy detached):

    rho_t = pi_proxy(a) / pi_theta(a) = 1 / Z,   penalty = rho_t - 1 - log rho_t >= 0,
    d penalty / d log pi_theta(a) = 1 - rho_t < 0   (minimizing raises log pi_theta(a)).

Deviations from the paper / official code: this is a reconstruction from the paper's description (methods.md [V]);
the official code was not available here. The per-token KL is estimated at the sampled token (the full-vocabulary
KL(pi_theta || pi_proxy) is infinite because the proxy has zeros). The bottom-rho quantile is computed per call
(micro-batch). Z comes from the logits in one chunked pass without gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlvr_entropy import stats
from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_float
from rlvr_entropy.methods.base import Method, PGConfig, register_method


@torch.no_grad()
def proxy_log_mass(logits: torch.Tensor, kappa: float, *, mask: torch.Tensor | None = None,
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log Z, log max pi) per position: Z is the probability mass of tokens with pi >= kappa * max pi.
    logits [..., V] -> two [...] tensors; chunked, no gradient."""
    z, valid, lead = stats._flatten(logits, mask)
    cd = stats._compute_dtype(z.dtype)
    chunk = chunk_size or stats.default_chunk_size(z.shape[-1])
    log_z = torch.zeros(z.shape[0], dtype=cd, device=z.device)
    log_max = torch.zeros_like(log_z)
    for s in range(0, z.shape[0], chunk):
        blk = stats._rows(z, valid, s, s + chunk, cd)
        lse = torch.logsumexp(blk, -1)
        mx = blk.max(-1).values
        keep = blk >= (mx + math.log(kappa))[:, None]
        log_z[s:s + chunk] = torch.logsumexp(torch.where(keep, blk, torch.tensor(-math.inf, dtype=cd)), -1) - lse
        log_max[s:s + chunk] = mx - lse
    return log_z.reshape(lead), log_max.reshape(lead)


@dataclass(frozen=True)
class LpRegConfig(PGConfig):
    """Lp-Reg (arXiv 2510.03222)."""

    kappa: float = 0.02
    """Proxy threshold: tokens with pi < kappa * max pi are dropped."""
    rho: float = 0.01
    """Share of negative-advantage tokens (lowest log pi) that are protected."""
    beta: float = 1.0
    """Coefficient of the KL(pi_theta || pi_proxy) term."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("kappa", self.kappa, lo=0.0, hi=1.0, lo_open=True)
        check_float("rho", self.rho, lo=0.0, hi=1.0)
        check_float("beta", self.beta, lo=0.0)


@register_method
class LpReg(Method):
    name = "lp_reg"
    Config = LpRegConfig
    needs = ("logits",)

    @classmethod
    def neutral_overrides(cls):
        return {"beta": 0.0}

    def _loss(self, batch, *, new_step):
        c = self.config
        mask = batch.mask
        adv = batch.token_advantages()
        terms = self.pg_terms(batch, adv)
        lp = batch.clean(batch.log_prob)
        log_z, log_max = proxy_log_mass(batch.logits, c.kappa, mask=mask)
        log_z, log_max = batch.clean(log_z), batch.clean(log_max)
        with torch.no_grad():
            neg = mask & (adv < 0)
            kept = lp.detach() >= log_max.to(lp.dtype) + math.log(c.kappa)  # in the proxy's support
            protect = torch.zeros_like(mask)
            if bool(neg.any()) and c.rho > 0:
                vals = lp.detach()[neg]
                vals = vals if vals.dtype in (torch.float32, torch.float64) else vals.float()
                thr = torch.quantile(vals, c.rho)
                protect = neg & (lp.detach() <= thr.to(lp.dtype)) & kept & (log_z < 0)
        # k3 with the proxy detached: log rho = sg(log pi_proxy) - log pi = (sg(log pi) - log Z) - log pi
        log_rho = (lp.detach() - log_z.to(lp.dtype)) - lp
        k3 = torch.exp(log_rho) - 1 - log_rho
        k3 = torch.where(protect, k3, torch.zeros_like(k3))
        loss = self.aggregate(terms.loss + c.beta * k3, mask)
        metrics = self.pg_metrics(terms, batch)
        metrics.update({"protected_frac": masked_mean(protect.float(), mask),
                        "kl_mean": masked_mean(k3.detach(), mask),
                        "proxy_mass": masked_mean(log_z.exp(), mask)})
        return loss, metrics
