"""Lp-Reg (Huang et al., "Low-probability Tokens Sustain Exploration in Reinforcement Learning with Verifiable
Reward", arXiv 2510.03222; official code github.com/CarlanLark/Lp-Reg-dev: ``compute_policy_loss_lp_reg`` in
verl/trainer/ppo/core_algos.py, the proxy in ``apply_min_p`` of verl/workers/actor/dp_actor.py): keep the
negative advantages from extinguishing valuable low-probability tokens ("reasoning sparks") by regularizing them
towards a less noisy proxy distribution.

Proxy (min-p filter): drop the tokens with pi < kappa * max pi (presumed noise) and renormalize,

    pi_proxy(v) = pi(v) / Z  if pi(v) >= kappa * max pi,  else 0,      Z = mass of the kept tokens (detached)

Selection, per valid token t with sampled token a (A_t its advantage):

    C = the k valid tokens with A_t < 0 of lowest log pi_t, k = max(1, int(rho * #{A < 0}))   (bottom-k)
    P = {t in C : pi_theta(a) < pi_proxy(a)} = {t in C : a is kept by the proxy and Z < 1}
    the term is applied only when k >= min_tokens (2 in the official code, see below)

Loss:

    l_t = -A r + beta * k3_t                                      t in P
    l_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))        otherwise (dual-clipped when set)
    k3_t = min(rho_t - 1 - log rho_t, kl_clamp),   log rho_t = sg(log pi_proxy(a)) - log pi_theta(a) = -log Z

k3 is Schulman's estimator of KL(pi_theta || pi_proxy) from the sampled token (verl's "low_var_kl", which the
official code uses, clamped at 10 like it); its gradient is d k3 / d log pi_theta(a) = 1 - 1/Z < 0, so minimizing
raises pi_theta(a) towards pi_proxy(a). The exact KL(pi_theta || pi_proxy) over the vocabulary is infinite
whenever pi_theta puts mass on a token the proxy drops, which is why a per-token estimator at the sampled token is
used (as in the official code). The proxy is detached: Z is computed from the logits in chunks under no_grad
(:func:`rlvr_entropy.stats.proxy_log_mass`; from ``TokenBatch.lm_head`` in the tiled LM-head pass when the engine
passes hidden states instead of logits: two scalars per position, no [B, T, V] tensor), and the gradient flows
only through log_prob.

Defaults (official recipes / paper): kappa (min_p threshold) 0.02, rho (logp_neg_k_percent) 0.01, beta
(ppo_kl_coef) 1.0, kl_clamp 10, min_tokens 2. ``rho = 0`` disables the term: the loss is then grpo's (the neutral
setting). ``beta = 0`` alone is NOT grpo: as in the official code, the selected tokens' policy term is the
unclipped -A r.

Deviations from the paper / official code:
- Proxy policy: the official code builds the proxy from a second forward pass of the current weights (or, with
  minp_old_log_prob, of the rollout policy), applying the min-p filter to the logits before the temperature;
  here it comes from ``TokenBatch.logits`` or ``lm_head`` (temperature already applied). Identical for temperature 1 (the
  official recipes) and, for the rollout-policy variant, on the first update of each rollout (on-policy).
- Whether the sampled token is kept is decided from ``log_prob`` (pi(a) >= kappa * max pi), since the batch holds
  no token ids; it must be the log-softmax of the logits at the sampled token (as every engine provides).
- k >= min_tokens: the official code applies the term only when k > 1 (its way to switch off the unused
  positive-advantage branch), so micro-batches with fewer than 2 / rho negative-advantage tokens (200 at rho =
  0.01) get no regularization. ``min_tokens=1`` regularizes small batches too.
- Scope: the bottom-k is per micro-batch like the official code (``scope="micro_batch"``); ``scope="global"`` takes
  it over every rank's negative-advantage tokens through ``Method.gather_fn``.
- The log-ratio of the policy term is clamped to [-20, 20] before exp (the official code does not clamp);
  dual-clip applies to every token when set (the official loss has none).
- The positive-advantage branch of the official code (logp_pos_k_percent, 0 in every recipe) is not offered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_choice, check_float, check_int, check_tensor
from rlvr_entropy.methods._scoped import World, gather_rows, select_topk
from rlvr_entropy.methods.base import Method, PGConfig, register_method
from rlvr_entropy.stats import Stat, proxy_log_mass  # noqa: F401  (re-exported: the min-p proxy)

SCOPES = ("micro_batch", "global")


def lp_reg_count(rho: float, num_negative: int, min_tokens: int = 2) -> int:
    """k = max(1, int(rho * n)) of the official code, or 0 (no token) when rho = 0, n = 0 or k < min_tokens."""
    if rho <= 0 or num_negative <= 0:
        return 0
    k = max(1, int(num_negative * rho))
    return k if k >= min_tokens else 0


@torch.no_grad()
def lp_reg_select(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, log_proxy: torch.Tensor,
                  k: int, *, world: World | None = None, counts: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidates, protected), bool [B, T].

    candidates: the k valid tokens with A < 0 of lowest log pi (``torch.topk(largest=False)`` on CPU, in row-major
    order, like the official code; over every rank with a ``world``). protected: the candidates with
    log pi < log pi_proxy (``log_proxy`` [B, T], -inf where the proxy drops the token). log_prob [B, T],
    advantages [B, T] (0 at padding), mask bool [B, T].
    """
    lp = log_prob.detach()
    neg = mask & (advantages < 0)
    pick = select_topk(lp[neg], k, largest=False, world=world, counts=counts)
    cand = torch.zeros_like(mask)
    cand[neg] = pick
    return cand, cand & (lp < log_proxy)


def lp_reg_penalty(log_prob: torch.Tensor, log_proxy: torch.Tensor, protected: torch.Tensor,
                   kl_clamp: float | None = 10.0) -> torch.Tensor:
    """k3_t = rho - 1 - log rho with log rho = sg(log pi_proxy) - log pi, clamped at ``kl_clamp``, on ``protected``
    tokens, 0 elsewhere. [B, T], in log_prob's dtype promoted to at least float32; the gradient flows through
    log_prob only."""
    cd = torch.promote_types(log_prob.dtype, torch.float32)
    zero = torch.zeros((), dtype=cd, device=log_prob.device)
    target = torch.where(protected, log_proxy.detach().to(cd), zero)
    lp = torch.where(protected, log_prob.to(cd), zero)
    log_rho = target - lp
    k3 = torch.exp(log_rho) - log_rho - 1.0
    if kl_clamp is not None:
        k3 = torch.clamp(k3, max=kl_clamp)
    return torch.where(protected, k3, zero)


@dataclass(frozen=True)
class LpRegConfig(PGConfig):
    """Lp-Reg (arXiv 2510.03222; official code CarlanLark/Lp-Reg-dev)."""

    kappa: float = 0.02
    """Min-p threshold kappa of arXiv 2510.03222: the proxy drops tokens with pi < kappa * max pi (minp_p_threshold)."""
    rho: float = 0.01
    """Share rho of negative-advantage tokens (lowest log pi) regularized (arXiv 2510.03222; logp_neg_k_percent);
    0 disables the term (= grpo)."""
    beta: float = 1.0
    """Coefficient beta of the KL(pi_theta || pi_proxy) term (arXiv 2510.03222; ppo_kl_coef = 1)."""
    kl_clamp: float | None = 10.0
    """Upper clamp of the per-token k3 value (verl's low_var_kl, used by the official code, clamps at 10); None: off."""
    min_tokens: int = 2
    """The term applies only when k = max(1, int(rho * n)) >= min_tokens (official code: k > 1, i.e. 2)."""
    scope: str = "micro_batch"
    """Population of the bottom-k: "micro_batch" (official code) or "global" (every rank, via gather_fn)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("kappa", self.kappa, lo=0.0, hi=1.0, lo_open=True)
        check_float("rho", self.rho, lo=0.0, hi=1.0)
        check_float("beta", self.beta, lo=0.0)
        if self.kl_clamp is not None:
            check_float("kl_clamp", self.kl_clamp, lo=0.0, lo_open=True)
        check_int("min_tokens", self.min_tokens, lo=1)
        check_choice("scope", self.scope, SCOPES)


@register_method
class LpReg(Method):
    name = "lp_reg"
    Config = LpRegConfig
    needs = ("logits",)
    detached_inputs = ("logits",)  # the proxy is built from the logits under no_grad
    #: The proxy target sg(log pi_proxy(a)) = sg(log pi(a)) - log Z moves with log_prob but is detached (the
    #: official code's second, no-grad forward pass): the k3 value -log Z does not change with log_prob while its
    #: gradient is 1 - 1/Z, by design. tests/methods/test_lp_reg.py checks the gradient against a reference.
    smooth_in_inputs = False

    @classmethod
    def neutral_overrides(cls):
        return {"rho": 0.0}

    def logits_requests(self) -> tuple[Stat, ...]:
        """The distribution statistic the proxy is built from (per-position log Z and log max pi: no [B, T, V]
        tensor is needed, so the tiled LM-head route of rlvr_entropy.kernels serves it)."""
        return (Stat.proxy_log_mass(self.config.kappa),)

    def _loss(self, batch, *, new_step):
        c = self.config
        mask = batch.mask
        adv = batch.token_advantages()
        terms = self.pg_terms(batch, adv)                                       # PPO surrogate, [B, T]
        lp = batch.clean(batch.log_prob)
        log_z, log_max = batch.stat(Stat.proxy_log_mass(c.kappa), self.name)   # [B, T], no grad
        with torch.no_grad():
            lpd = lp.detach()
            cd = log_z.dtype if log_z.dtype == torch.float64 else torch.promote_types(lpd.dtype, torch.float32)
            lpc = lpd.to(cd)
            in_support = lpc >= log_max.to(cd) + math.log(c.kappa)              # pi(a) >= kappa * max pi
            neg_inf = torch.full((), -math.inf, dtype=cd, device=lpd.device)
            log_proxy = torch.where(mask & in_support, lpc - log_z.to(cd), neg_inf)  # log pi_proxy(a) [B, T]
            n_neg = int((mask & (adv < 0)).sum())
            world, counts = None, None
            if c.scope == "global" and self.gather_fn is not None:
                row = torch.tensor([float(n_neg)], dtype=torch.float64, device=mask.device)
                world = gather_rows(self.gather_fn, row)
                counts = world.rows[:, 0]
                n_neg = int(counts.sum())
            cand, protect = lp_reg_select(lpc, adv, mask, log_proxy, lp_reg_count(c.rho, n_neg, c.min_tokens),
                                          world=world, counts=counts)
        k3 = lp_reg_penalty(lp, log_proxy, protect, c.kl_clamp)
        pg_free = -adv * terms.ratio                                            # official: unclipped on P
        if c.dual_clip is not None:
            pg_free = torch.where(adv < 0, torch.minimum(pg_free, -adv * c.dual_clip), pg_free)
        loss_mat = torch.where(protect, pg_free + c.beta * k3, terms.loss)
        loss = self.aggregate(loss_mat, mask)
        metrics = self.pg_metrics(terms, batch)
        with torch.no_grad():
            metrics.update({
                "candidate_frac": masked_mean(cand.float(), mask),
                "protected_frac": masked_mean(protect.float(), mask),
                "kl_mean": masked_mean(k3.detach().float(), protect),            # mean k3 over protected tokens
                "proxy_mass": masked_mean(log_z.exp().float(), mask),            # mean Z over valid tokens
            })
        return loss, metrics
