"""Logits statistics, chunked over positions: entropy, SIREN's top-p entropy, predicted entropy change.

Every function takes logits [..., V] (temperature already applied) and returns [...]. Work is done on blocks of
``chunk_size`` positions, so at most a block x V of temporaries exists at once beyond the input, in the forward and
in the backward pass (custom autograd functions recompute what they need from the saved logits instead of keeping
[N, V] intermediates). Half-precision logits are processed in float32; outputs are float32 then (float64 stays
float64) and gradients come back in the logits' dtype.

An optional ``mask`` [...] (bool) marks the positions that matter: the others are treated as all-zero logits, so
NaN or inf there never leaks into a result or a gradient.
"""
from __future__ import annotations

import math

import torch

from rlvr_entropy.core.validation import check_float, check_int, check_tensor

__all__ = ["entropy", "top_p_entropy", "predicted_entropy_change", "nucleus_size", "default_chunk_size"]

_CHUNK_ELEMENTS = 1 << 23  # ~32 MiB of float32 per [chunk, V] temporary


def default_chunk_size(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flatten(logits: torch.Tensor, mask: torch.Tensor | None, name: str = "logits"):
    check_tensor(name, logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {list(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {logits.dtype}")
    lead = logits.shape[:-1]
    z = logits.reshape(-1, logits.shape[-1])
    if mask is None:
        valid = None
    else:
        check_tensor("mask", mask)
        if tuple(mask.shape) != tuple(lead):
            raise ValueError(f"mask must have shape {list(lead)} (logits without V), got {list(mask.shape)}")
        valid = mask.reshape(-1).to(torch.bool)
    return z, valid, lead


def _rows(z: torch.Tensor, valid: torch.Tensor | None, s: int, e: int, cd: torch.dtype) -> torch.Tensor:
    blk = z[s:e].to(cd)
    if valid is not None:
        blk = torch.where(valid[s:e, None], blk, torch.zeros((), dtype=cd, device=blk.device))
    return blk


def _plogp_entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros((), dtype=logp.dtype, device=logp.device)).sum(-1)


# ------------------------------------------------------------------------------------------------ entropy
class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, valid, chunk):  # z [N, V]
        cd = _compute_dtype(z.dtype)
        n = z.shape[0]
        lse = torch.empty(n, dtype=cd, device=z.device)
        h = torch.empty(n, dtype=cd, device=z.device)
        for s in range(0, n, chunk):
            blk = _rows(z, valid, s, s + chunk, cd)
            l = torch.logsumexp(blk, -1)
            lse[s:s + chunk] = l
            h[s:s + chunk] = _plogp_entropy(blk - l[:, None])
        ctx.save_for_backward(z, valid if valid is not None else torch.empty(0), lse, h)
        ctx.chunk = chunk
        ctx.has_valid = valid is not None
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        z, valid, lse, h = ctx.saved_tensors
        valid = valid if ctx.has_valid else None
        chunk = ctx.chunk
        cd = lse.dtype
        grad = torch.empty_like(z)
        gh = gh.to(cd)
        for s in range(0, z.shape[0], chunk):
            logp = _rows(z, valid, s, s + chunk, cd) - lse[s:s + chunk, None]
            p = logp.exp()
            g = -(gh[s:s + chunk, None] * p) * torch.where(p > 0, logp + h[s:s + chunk, None], 0.0)
            if valid is not None:
                g = torch.where(valid[s:s + chunk, None], g, 0.0)
            grad[s:s + chunk] = g.to(z.dtype)
        return grad, None, None


def entropy(logits: torch.Tensor, *, mask: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) in nats. logits [..., V] -> [...]; differentiable; chunked over positions."""
    z, valid, lead = _flatten(logits, mask)
    check_int("chunk_size", chunk_size, lo=1, allow_none=True)
    chunk = chunk_size or default_chunk_size(z.shape[-1])
    return _Entropy.apply(z, valid, chunk).reshape(lead)


# ------------------------------------------------------------------------------------------ top-p entropy
def _nucleus_rows(blk: torch.Tensor, lse: torch.Tensor, p: float, K: int, inclusive: bool):
    """For each row of blk [c, V]: (m [c], sorted top values [c, k]) where the nucleus is the first m.

    The top-k search starts small and grows only for rows whose cumulative probability has not reached p, so
    peaked (LLM-like) rows cost one small top-k.
    """
    c, V = blk.shape
    m = torch.zeros(c, dtype=torch.long, device=blk.device)
    thr = torch.full((c,), math.inf, dtype=blk.dtype, device=blk.device)
    rows = torch.arange(c, device=blk.device)
    k = min(K, 64)
    while rows.numel() > 0:
        vals = torch.topk(blk[rows], k, dim=-1, sorted=True).values  # [r, k] descending
        cum = torch.cumsum((vals - lse[rows, None]).exp(), -1)
        below = (cum < p).sum(-1)  # tokens strictly before the crossing
        reached = below < k
        done = reached | (k >= K)
        if inclusive:
            mm = torch.where(reached, below + 1, below).clamp(max=k)
        else:
            mm = below
        r_done = rows[done]
        m[r_done] = mm[done]
        idx = (mm[done] - 1).clamp(min=0)
        t = vals[done].gather(1, idx[:, None]).squeeze(1)
        thr[r_done] = torch.where(mm[done] > 0, t, torch.full_like(t, math.inf))
        rows = rows[~done]
        k = min(K, k * 8)
    return m, thr


def _kept(blk: torch.Tensor, thr: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Bool [c, V] of the nucleus: the m largest logits of each row (ties at the threshold broken by index)."""
    keep = blk > thr[:, None]
    ties = blk == thr[:, None]
    need = m - keep.sum(-1)  # how many tied entries to take
    if bool((ties.sum(-1) > need).any()):
        # Take the first `need` tied entries in index order (a fixed, documented tie rule).
        order = torch.cumsum(ties.to(torch.int32), -1)
        keep = keep | (ties & (order <= need[:, None]))
    else:
        keep = keep | ties
    return keep


class _TopPEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, valid, p, K, inclusive, chunk):
        cd = _compute_dtype(z.dtype)
        n = z.shape[0]
        h = torch.zeros(n, dtype=cd, device=z.device)
        lse_s = torch.zeros(n, dtype=cd, device=z.device)
        thr = torch.full((n,), math.inf, dtype=cd, device=z.device)
        m_all = torch.zeros(n, dtype=torch.long, device=z.device)
        for s in range(0, n, chunk):
            blk = _rows(z, valid, s, s + chunk, cd)
            lse = torch.logsumexp(blk, -1)
            m, t = _nucleus_rows(blk, lse, p, K, inclusive)
            keep = _kept(blk, t, m)
            ninf = torch.tensor(-math.inf, dtype=cd, device=z.device)
            zk = torch.where(keep, blk, ninf)
            ls = torch.logsumexp(zk, -1)  # -inf for empty rows
            logq = zk - ls[:, None]
            hb = _plogp_entropy(torch.where(keep, logq, ninf))
            hb = torch.where(m > 1, hb, torch.zeros_like(hb))
            h[s:s + chunk] = hb
            lse_s[s:s + chunk] = ls
            thr[s:s + chunk] = t
            m_all[s:s + chunk] = m
        ctx.save_for_backward(z, valid if valid is not None else torch.empty(0), h, lse_s, thr, m_all)
        ctx.chunk, ctx.has_valid = chunk, valid is not None
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        z, valid, h, lse_s, thr, m_all = ctx.saved_tensors
        valid = valid if ctx.has_valid else None
        cd, chunk = h.dtype, ctx.chunk
        gh = gh.to(cd)
        grad = torch.empty_like(z)
        for s in range(0, z.shape[0], chunk):
            e = s + chunk
            blk = _rows(z, valid, s, e, cd)
            keep = _kept(blk, thr[s:e], m_all[s:e]) & (m_all[s:e, None] > 1)
            logq = blk - lse_s[s:e, None]
            q = torch.where(keep, logq.exp(), 0.0)
            g = -(gh[s:e, None] * q) * torch.where(keep, logq + h[s:e, None], 0.0)
            if valid is not None:
                g = torch.where(valid[s:e, None], g, 0.0)
            grad[s:e] = g.to(z.dtype)
        return grad, None, None, None, None, None


def _check_top_p_args(p, top_k, chunk_size):
    check_float("p", p, lo=0.0, hi=1.0, lo_open=True)
    check_int("top_k", top_k, lo=1, allow_none=True)
    check_int("chunk_size", chunk_size, lo=1, allow_none=True)


def top_p_entropy(logits: torch.Tensor, p: float = 0.8, top_k: int | None = None, inclusive: bool = False, *,
                  mask: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of the renormalized top-p nucleus of softmax(logits) (SIREN, arXiv 2509.25133, section 3.1).

    logits [..., V] -> [...], differentiable. Probabilities are sorted descending (only the ``top_k`` largest are
    considered; None = all V), C_j is their cumulative sum over the FULL-vocabulary softmax, and the nucleus is
    the first m tokens with m = #{j : C_j < p} ("exclusive", the official SIREN code) or that plus the crossing
    token ("inclusive", the textbook nucleus). If C never reaches p within top_k, all top_k are kept. The entropy
    of q = pi restricted to the nucleus and renormalized is returned; an empty or one-token nucleus gives 0 with
    zero gradient. The nucleus itself is a constant (no gradient flows through the choice of tokens); ties at the
    boundary are broken by vocabulary index, which leaves the value unchanged.

    Deviation from the official code: the 1e-12 terms of the renormalization and the log are left out (the
    nucleus mass is at least 1/V, so they change nothing measurable).
    """
    _check_top_p_args(p, top_k, chunk_size)
    z, valid, lead = _flatten(logits, mask)
    V = z.shape[-1]
    K = V if top_k is None else min(top_k, V)
    chunk = chunk_size or default_chunk_size(V)
    return _TopPEntropy.apply(z, valid, float(p), K, bool(inclusive), chunk).reshape(lead)


@torch.no_grad()
def nucleus_size(logits: torch.Tensor, p: float = 0.8, top_k: int | None = None, inclusive: bool = False, *,
                 mask: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Number of tokens in the top-p nucleus used by :func:`top_p_entropy`. [..., V] -> long [...]."""
    _check_top_p_args(p, top_k, chunk_size)
    z, valid, lead = _flatten(logits, mask)
    V = z.shape[-1]
    K = V if top_k is None else min(top_k, V)
    chunk = chunk_size or default_chunk_size(V)
    out = []
    for s in range(0, z.shape[0], chunk):
        blk = _rows(z, valid, s, s + chunk, _compute_dtype(z.dtype))
        out.append(_nucleus_rows(blk, torch.logsumexp(blk, -1), float(p), K, bool(inclusive))[0])
    return torch.cat(out).reshape(lead) if out else torch.zeros(lead, dtype=torch.long)


# ------------------------------------------------------------------------------- predicted entropy change
@torch.no_grad()
def predicted_entropy_change(logits: torch.Tensor, token_ids: torch.Tensor, coef: torch.Tensor,
                             form: str = "exact", *, mask: torch.Tensor | None = None,
                             chunk_size: int | None = None) -> torch.Tensor:
    """First-order entropy change per position for the softmax step z <- z + eta * coef * (onehot(a) - pi),
    divided by eta (steer.md, last section). logits [..., V], token_ids [...], coef [...] -> [...].

    - form="exact": -coef * [pi_a (log pi_a + H) - sum_k pi_k^2 (log pi_k + H)]
    - form="steer": -coef * (1 - pi_a)^2 (log pi_a + H)   (STEER's closed form, arXiv 2510.10150)
    No gradient. Positions outside ``mask`` give 0.
    """
    if form not in ("exact", "steer"):
        raise ValueError(f"form must be one of ['exact', 'steer'], got {form!r}")
    check_int("chunk_size", chunk_size, lo=1, allow_none=True)
    z, valid, lead = _flatten(logits, mask)
    check_tensor("token_ids", token_ids)
    check_tensor("coef", coef)
    if tuple(token_ids.shape) != tuple(lead):
        raise ValueError(f"token_ids must have shape {list(lead)}, got {list(token_ids.shape)}")
    if tuple(coef.shape) != tuple(lead):
        raise ValueError(f"coef must have shape {list(lead)}, got {list(coef.shape)}")
    ids = token_ids.reshape(-1).long()
    V = z.shape[-1]
    ok = valid if valid is not None else torch.ones_like(ids, dtype=torch.bool)
    if bool(((ids < 0) | (ids >= V))[ok].any()):
        raise ValueError(f"token_ids must be in [0, {V}) at valid positions")
    ids = torch.where(ok, ids, torch.zeros_like(ids))
    cd = _compute_dtype(z.dtype)
    w = coef.reshape(-1).to(cd)
    if bool((~torch.isfinite(w))[ok].any()):
        raise ValueError("coef has non-finite values at valid positions")
    chunk = chunk_size or default_chunk_size(V)
    out = torch.zeros(z.shape[0], dtype=cd, device=z.device)
    for s in range(0, z.shape[0], chunk):
        e = s + chunk
        logp = torch.log_softmax(_rows(z, valid, s, e, cd), -1)
        p = logp.exp()
        plogp = torch.where(p > 0, p * logp, 0.0)
        h = -plogp.sum(-1)
        logp_a = logp.gather(1, ids[s:e, None]).squeeze(1)
        p_a = logp_a.exp()
        if form == "exact":
            second = (p * plogp).sum(-1) + (p * p).sum(-1) * h  # sum_k pi_k^2 (log pi_k + H)
            d = -w[s:e] * (p_a * (logp_a + h) - second)
        else:
            d = -w[s:e] * (1 - p_a) ** 2 * (logp_a + h)
        out[s:e] = d
    if valid is not None:
        out = torch.where(valid, out, torch.zeros_like(out))
    return out.reshape(lead)
