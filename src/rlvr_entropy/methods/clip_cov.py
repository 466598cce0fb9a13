"""Clip-Cov (Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models",
arXiv 2505.22617, Sec. 4; verl's ``compute_policy_loss_clip_cov``): detach a few random tokens whose covariance
between log-probability and advantage is high, the tokens whose updates drive entropy down fastest.

    Cov_t = (A_t - mean A) (log pi_t - mean log pi)          valid tokens, means over the valid tokens, detached
    E     = {valid t : PPO does not clip t, lb < Cov_t < ub}
    S     = min(|E|, max(1, int(clip_cov_ratio * N))) tokens of E drawn uniformly at random (N = valid tokens)
    l_t   = 0 for t in S, else max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    L     = agg(l)                                            (the denominators still count every valid token)

Defaults are verl's (and the paper's): clip_cov_ratio 2e-4, window (1, 5), eps_low = eps_high = 0.2, no dual-clip.
``dual_clip`` is applied when set (as in grpo: tokens it bounds already have no gradient and are not eligible);
verl's Clip-Cov has none, so the default None matches verl.

Scope: "micro_batch" (default, verl and the official code: means, N and the draw over this call's tokens) or
"global" (the paper's whole-batch reading: every rank's tokens through ``Method.gather_fn``; the ranks together
select exactly what "micro_batch" would select on the concatenation of their micro-batches, for an int ``seed``).
Without a ``gather_fn`` the global scope is the micro-batch scope.

Randomness: ``seed=None`` draws with ``torch.randperm`` from the global torch RNG exactly as verl does (one call
per micro-batch that has an eligible token), so after the same ``torch.manual_seed`` the same tokens are dropped.
An int ``seed`` uses a private ``torch.Generator`` seeded from (seed, optimizer step, micro-batch index within
the step), so a run is reproducible, resumes included, when ``compute_loss`` receives ``step`` (without ``step``
the call counter replaces it). With the global scope and ``seed=None`` every rank draws one number from its
global RNG and all use rank 0's.

Deviations from the paper / official code:
- The log-ratio is clamped to [-20, 20] before exp (``clamp_log_ratio``; verl's Clip-Cov does not clamp, so a
  far off-policy token overflows to inf and the loss becomes inf or NaN: verl#6478). Where the clamp is inactive
  the loss and gradients equal verl's (tests/methods/test_verl_parity.py).
- The means of the covariance are exact (verl divides by N + 1e-8); a token can be classified differently only
  when its covariance is within ~1e-8 relative of a window bound.
- The covariance is computed in the inputs' dtype promoted to at least float32, from the advantages as given.
- The scope option and the seeded generator are additions.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from rlvr_entropy.core.aggregation import masked_mean
from rlvr_entropy.core.validation import check_choice, check_float, check_int
from rlvr_entropy.methods._scoped import World, gather_rows, select_random
from rlvr_entropy.methods.base import Method, PGConfig, register_method

SCOPES = ("micro_batch", "global")


# ------------------------------------------------------------------------------------------------ pure math
def _cov_dtype(*xs: torch.Tensor) -> torch.dtype:
    d = torch.float32
    for x in xs:
        d = torch.promote_types(d, x.dtype)
    return d


def _token_adv(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = advantages.detach()
    return a[:, None].expand(like.shape) if a.dim() == 1 else a


@torch.no_grad()
def covariance_sums(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[sum A, sum log pi, N] over the valid tokens, float64 [3] (what the global scope gathers).

    log_prob [B, T], advantages [B] or [B, T], mask bool [B, T]; padding (NaN included) is ignored."""
    lp = log_prob.detach().to(torch.float64)
    a = _token_adv(advantages, lp).to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=lp.device)
    return torch.stack([torch.where(mask, a, zero).sum(), torch.where(mask, lp, zero).sum(),
                        mask.sum().to(torch.float64)])


@torch.no_grad()
def token_covariance(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                     means: tuple[float | torch.Tensor, float | torch.Tensor] | None = None) -> torch.Tensor:
    """Cov_t = (A_t - mean A)(log pi_t - mean log pi) [B, T], 0 at padding, detached (arXiv 2505.22617, Eq. 4).

    log_prob [B, T]; advantages [B] (one per response) or [B, T]; mask bool [B, T]. The means are over the valid
    tokens of this call, or ``means = (mean A, mean log pi)`` when given (the global scope passes every rank's).
    Computed in the inputs' dtype promoted to at least float32.
    """
    cd = _cov_dtype(log_prob, advantages)
    lp = log_prob.detach().to(cd)
    a = _token_adv(advantages, lp).to(cd)
    if means is None:
        ma, ml = a[mask].mean(), lp[mask].mean()  # NaN when nothing is valid; masked out below
    else:
        ma, ml = (torch.as_tensor(m, dtype=cd, device=lp.device) for m in means)
    cov = (a - ma) * (lp - ml)
    return torch.where(mask, cov, torch.zeros((), dtype=cd, device=lp.device))


def clip_cov_count(ratio: float, num_valid: int) -> int:
    """Number of tokens to detach: max(1, int(ratio * N)) (verl's clip_num)."""
    return max(int(ratio * num_valid), 1)


@torch.no_grad()
def clip_cov_eligible(cov: torch.Tensor, mask: torch.Tensor, clipped: torch.Tensor, lb: float,
                      ub: float) -> torch.Tensor:
    """bool [B, T]: valid, not clipped by PPO (``clipped`` bool [B, T]) and lb < Cov_t < ub."""
    return mask & ~clipped & (cov > lb) & (cov < ub)


@torch.no_grad()
def clip_cov_select(eligible: torch.Tensor, k: int, *, generator: torch.Generator | None = None,
                    world: World | None = None) -> torch.Tensor:
    """bool [B, T]: min(k, |E|) tokens drawn uniformly from the eligible set E (``eligible`` bool [B, T]).

    Like verl: E is enumerated in row-major order (``torch.nonzero``) and ``torch.randperm(|E|)[:k]`` picks the
    tokens, from ``generator`` or the global RNG (None). With a ``world`` (global scope) the candidates of every
    rank are enumerated in rank order and every rank must pass a generator in the same state.
    """
    idx = torch.nonzero(eligible)                                        # [n, 2] row-major
    pick = select_random(idx.shape[0], k, generator=generator, world=world, device=eligible.device)
    sel = torch.zeros_like(eligible)
    chosen = idx[pick]
    sel[chosen[:, 0], chosen[:, 1]] = True
    return sel


def seeded_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``keys`` through blake2b (stable across processes and runs)."""
    text = "/".join(str(x) for x in (seed,) + keys).encode()
    value = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(value)


# ------------------------------------------------------------------------------------------------ method
@dataclass(frozen=True)
class ClipCovConfig(PGConfig):
    """Clip-Cov (arXiv 2505.22617); defaults are verl's policy_loss defaults, which are the paper's."""

    clip_cov_ratio: float = 2e-4
    """Share r of the valid tokens that lose their gradient (arXiv 2505.22617, Clip-Cov "r"; verl clip_cov_ratio)."""
    lb: float = 1.0
    """Lower covariance bound omega_low of the window (arXiv 2505.22617; verl clip_cov_lb)."""
    ub: float = 5.0
    """Upper covariance bound omega_high of the window (arXiv 2505.22617; verl clip_cov_ub); lb >= ub: no token."""
    scope: str = "micro_batch"
    """Population of the selection: "micro_batch" (verl, official code) or "global" (every rank, via gather_fn)."""
    seed: int | None = None
    """None: the global torch RNG, consumed exactly like verl; an int: a private generator per (seed, step, micro)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("clip_cov_ratio", self.clip_cov_ratio, lo=0.0, hi=1.0, lo_open=True)
        check_float("lb", self.lb)
        check_float("ub", self.ub)
        if self.lb > self.ub:
            raise ValueError(f"lb must be <= ub, got lb={self.lb} > ub={self.ub}")
        check_choice("scope", self.scope, SCOPES)
        check_int("seed", self.seed, allow_none=True)


@register_method
class ClipCov(Method):
    name = "clip_cov"
    Config = ClipCovConfig

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        self._micro = 0  # index of this call within the current optimizer step

    @classmethod
    def neutral_overrides(cls):
        return {"lb": math.inf, "ub": math.inf}  # the window (inf, inf) is empty: no token is detached

    def _generator(self) -> torch.Generator | None:
        c = self.config
        if c.seed is None:
            return None
        step = f"step{self._step}" if self._step is not None else f"call{self._calls}"
        return seeded_generator(c.seed, step, self._micro)

    def _loss(self, batch, *, new_step):
        c = self.config
        self._micro = 0 if new_step else self._micro + 1
        mask = batch.mask
        terms = self.pg_terms(batch)                                            # clipped surrogate, [B, T]
        gen = self._generator()
        world, means, n_valid = None, None, batch.num_tokens
        if c.scope == "global" and self.gather_fn is not None:
            draw = float(torch.randint(0, 1 << 52, (1,)).item()) if c.seed is None else 0.0
            row = torch.cat([covariance_sums(batch.log_prob, batch.advantages, mask),
                             torch.tensor([draw], dtype=torch.float64, device=mask.device)])
            world = gather_rows(self.gather_fn, row)
            tot = world.rows[:, :3].sum(0)
            n_valid = int(tot[2])
            means = (tot[0] / tot[2], tot[1] / tot[2]) if n_valid > 0 else (0.0, 0.0)
            if c.seed is None:
                gen = torch.Generator().manual_seed(int(world.rows[0, 3]))
        cov = token_covariance(batch.log_prob, batch.advantages, mask, means=means)  # [B, T], detached
        eligible = clip_cov_eligible(cov, mask, terms.clipped | terms.dual_clipped, c.lb, c.ub)
        sel = clip_cov_select(eligible, clip_cov_count(c.clip_cov_ratio, n_valid), generator=gen, world=world)
        loss_mat = torch.where(sel, torch.zeros((), dtype=terms.loss.dtype, device=mask.device), terms.loss)
        loss = self.aggregate(loss_mat, mask)
        metrics = self.pg_metrics(terms, batch)
        with torch.no_grad():
            metrics.update({
                "selected_frac": masked_mean(sel.float(), mask),               # verl's pg_clipfrac
                "eligible_frac": masked_mean(eligible.float(), mask),
                "cov_mean": masked_mean(cov.float(), mask),
                "selected_cov_mean": masked_mean(cov.float(), sel),
            })
        return loss, metrics
