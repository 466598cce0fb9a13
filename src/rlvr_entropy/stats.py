"""Logits statistics, chunked over positions: entropy, SIREN's top-p entropy, predicted entropy change.

Every function takes logits [..., V] (temperature already applied) and returns [...]. Work is done on blocks of
``chunk_size`` positions, so at most a few block x V temporaries exist at once beyond the input (and, in the
backward pass, the gradient), whatever the number of positions: the custom autograd functions save only the
logits and per-position scalars and recompute what they need block by block. The default block is small
(about 8 MiB of float32): a block that stays in the CPU cache makes each pass over it cheaper than a pass over
[N, V] (the chunked entropy is about 3x faster than the plain [N, V] expression on a 2-core CPU).
Half-precision logits are processed in float32; outputs are float32 then (float64 stays float64) and gradients
come back in the logits' dtype.

An optional ``mask`` [...] (bool) marks the positions that matter: the others are treated as all-zero logits, so
NaN or inf there never leaks into a result or a gradient (their value is that of all-zero logits, their gradient
is exactly zero). A valid position whose softmax is undefined (NaN or +inf logits, or all -inf) gives NaN, as the
plain formula would; -inf logits (tokens masked out of the vocabulary) are fine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlvr_entropy.core.validation import check_float, check_int, check_tensor

__all__ = ["entropy", "top_p_entropy", "predicted_entropy_change", "nucleus_size", "default_chunk_size",
           "entropy_change_terms", "predicted_entropy_change_from_terms", "clamped_entropy", "kept_count",
           "proxy_log_mass", "Stat", "STAT_KINDS", "compute_stat"]

_CHUNK_ELEMENTS = 1 << 21  # ~8 MiB of float32 per [chunk, V] temporary (a block stays in cache)


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
    """Block z[s:e] in dtype cd with the rows outside ``valid`` replaced by zeros. [e - s, V]."""
    blk = z[s:e].to(cd)
    if valid is not None:
        blk = torch.where(valid[s:e, None], blk, torch.zeros((), dtype=cd, device=blk.device))
    return blk


def _blocks(z: torch.Tensor, valid: torch.Tensor | None, chunk: int, cd: torch.dtype):
    """Yield (s, e, rows, blk): blk [r, V] in dtype cd holds the valid rows of z[s:e]; rows = their offsets in the
    block (None when all rows are valid, then blk is z[s:e] itself when no cast is needed)."""
    n = z.shape[0]
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        if valid is None or bool(valid[s:e].all()):
            yield s, e, None, z[s:e].to(cd).contiguous()
        else:
            rows = valid[s:e].nonzero().squeeze(1)
            if rows.numel() > 0:
                yield s, e, rows, z[s:e].index_select(0, rows).to(cd).contiguous()


def _fill_rows(dst: torch.Tensor, s: int, e: int, rows: torch.Tensor | None, src: torch.Tensor) -> None:
    if rows is None:
        dst[s:e] = src
    else:
        dst[s:e].index_copy_(0, rows, src.to(dst.dtype))


# ------------------------------------------------------------------------------------------------ entropy
def _entropy_block(blk: torch.Tensor, ybuf: torch.Tensor, ebuf: torch.Tensor):
    """Entropy of each row of blk [r, V] -> (H [r], max [r], log S [r], bool [r] rows holding -inf logits).

    H = log S - sum_v e_v y_v / S with y = z - max z, e = exp(y), S = sum e: a few passes over a cached block,
    all in the two scratch blocks ybuf, ebuf. A row with -inf logits gives 0 * -inf = NaN in the dot product;
    such rows are recomputed with the safe form.
    """
    r = blk.shape[0]
    y, e = ybuf[:r], ebuf[:r]
    mx = blk.amax(-1, keepdim=True)
    torch.sub(blk, mx, out=y)
    torch.exp(y, out=e)
    ssum = e.sum(-1)
    logs = ssum.log()
    h = logs - torch.mul(y, e, out=y).sum(-1) / ssum
    mx = mx.squeeze(1)
    neg_inf_rows = torch.isnan(h) & torch.isfinite(mx + logs)
    if bool(neg_inf_rows.any()):
        i = neg_inf_rows.nonzero().squeeze(1)
        ei = e[i]
        yi = blk[i] - mx[i, None]
        dot = torch.where(ei > 0, ei * yi, torch.zeros((), dtype=y.dtype, device=y.device)).sum(-1)
        h[i] = logs[i] - dot / ssum[i]
    return h, mx, logs, neg_inf_rows


def _entropy_second_block(blk: torch.Tensor, ybuf: torch.Tensor, ebuf: torch.Tensor):
    """:func:`_entropy_block` plus second = sum_v pi_v^2 (log pi_v + H) per row -> (H, max, log S, neg_inf_rows,
    second), each [r]: the terms of the exact first-order entropy change (see :func:`entropy_change_terms`).

    Reuses what _entropy_block leaves in the scratch blocks (e = exp(y) in ebuf, e y in ybuf): with
    log pi + H = y - <e, y> / S = y - (log S - H), second = (sum e^2 y - (log S - H) sum e^2) / S^2 (two more passes
    over the cached block instead of a second log-softmax). Rows holding -inf logits use the safe form.
    """
    r = blk.shape[0]
    h, mx, logs, neg_inf = _entropy_block(blk, ybuf, ebuf)
    e, ye = ebuf[:r], ybuf[:r]
    r2 = torch.mul(ye, e, out=ye).sum(-1)         # sum e^2 y
    q2 = torch.mul(e, e, out=ye).sum(-1)          # sum e^2
    second = (r2 - (logs - h) * q2) / torch.exp(2 * logs)
    if bool(neg_inf.any()):
        i = neg_inf.nonzero().squeeze(1)
        ei = e[i]
        yi = blk[i] - mx[i, None]
        zero = torch.zeros((), dtype=e.dtype, device=e.device)
        r2i = torch.where(ei > 0, ei * ei * yi, zero).sum(-1)
        second[i] = (r2i - (logs[i] - h[i]) * (ei * ei).sum(-1)) / torch.exp(2 * logs[i])
    return h, mx, logs, neg_inf, second


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, valid, chunk):  # z [N, V]
        cd = _compute_dtype(z.dtype)
        n, V = z.shape
        h = torch.empty(n, dtype=cd, device=z.device)
        mx = torch.zeros(n, dtype=cd, device=z.device)
        logs = torch.zeros(n, dtype=cd, device=z.device)
        neg_inf = torch.zeros(n, dtype=torch.bool, device=z.device)
        if valid is not None and not bool(valid.all()):
            # Masked positions are all-zero logits: uniform entropy log V; the gradient there is zero anyway.
            h.fill_(math.log(V))
        c = min(chunk, max(n, 1))
        ybuf = torch.empty(c, V, dtype=cd, device=z.device)
        ebuf = torch.empty(c, V, dtype=cd, device=z.device)
        for s, e, rows, blk in _blocks(z, valid, chunk, cd):
            for dst, src in zip((h, mx, logs, neg_inf), _entropy_block(blk, ybuf, ebuf)):
                _fill_rows(dst, s, e, rows, src)
        ctx.save_for_backward(z, valid if valid is not None else torch.empty(0), mx, logs, h, neg_inf)
        ctx.chunk = chunk
        ctx.has_valid = valid is not None
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        # dH/dz_v = -p_v (log p_v + H)
        z, valid, mx, logs, h, neg_inf = ctx.saved_tensors
        valid = valid if ctx.has_valid else None
        cd = h.dtype
        n, V = z.shape
        gh = gh.to(cd)
        partial = valid is not None and not bool(valid.all())
        grad = torch.zeros_like(z) if partial else torch.empty_like(z)
        direct = cd == z.dtype and not partial  # write each block straight into grad
        c = min(ctx.chunk, max(n, 1))
        gbuf = None if direct else torch.empty(c, V, dtype=cd, device=z.device)
        pbuf = torch.empty(c, V, dtype=cd, device=z.device)
        zero = torch.zeros((), dtype=cd, device=z.device)
        for s, e, rows, blk in _blocks(z, valid, ctx.chunk, cd):
            r = blk.shape[0]
            sel = slice(s, e) if rows is None else rows + s
            g = grad[s:e] if direct else gbuf[:r]
            torch.sub(blk, mx[sel, None], out=g).sub_(logs[sel, None])  # log p = (z - max) - log S
            p = torch.exp(g, out=pbuf[:r])
            g.add_(h[sel, None]).mul_(p).mul_(-gh[sel, None])
            bad = neg_inf[sel]
            if bool(bad.any()):  # p = 0 at -inf logits: 0 * -inf -> the true gradient 0
                i = bad.nonzero().squeeze(1)
                g[i] = torch.where(p[i] > 0, g[i], zero)
            if not direct:
                _fill_rows(grad, s, e, rows, g)
        return grad, None, None


def entropy(logits: torch.Tensor, *, mask: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) in nats. logits [..., V] -> [...]; differentiable; chunked over positions.

    Forward per block: max, y = z - max, e = exp(y), H = log sum e - <e, y> / sum e (no [N, V] log-softmax);
    backward: dH/dz = -p (log p + H), recomputed block by block. Positions outside ``mask`` give log V (all-zero
    logits) and zero gradient.
    """
    z, valid, lead = _flatten(logits, mask)
    check_int("chunk_size", chunk_size, lo=1, allow_none=True)
    chunk = chunk_size or default_chunk_size(z.shape[-1])
    return _Entropy.apply(z, valid, chunk).reshape(lead)


# ------------------------------------------------------------------------------------------ top-p entropy
_K0 = 64          # stage 1: exact top-k0 for every row whose nucleus may fit in it
_GROUP = 64       # stage 1 searches the k0 groups of _GROUP logits with the largest maxima
_STRIDE = 16      # stage 2 samples every _STRIDE-th logit to place the candidate threshold
_FLAT_TOL = 1e-4  # top-K probability mass this far below p: the cumulative sum never reaches p
_RANK_FACTOR = 1.5  # stage 2 threshold at this multiple of the estimated crossing rank (plus a noise margin)


def _softmax_into(blk: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """torch.softmax(blk, -1) written into the scratch block buf (the same numbers, no allocation)."""
    try:
        return torch._softmax(blk, -1, False, out=buf)
    except (AttributeError, TypeError, RuntimeError):  # private overload missing: allocate instead
        return torch.softmax(blk, -1)


def _topk_sorted(blk: torch.Tensor, k: int):
    """Exact k largest logits of each row of blk [r, V], descending, and their positions -> ([r, k], long [r, k]).

    For a long row only the k groups of _GROUP consecutive logits with the largest maxima (plus the short tail
    group, if any) are searched: every logit above the k-th largest group maximum lies in one of them, and they
    hold at least k logits >= it, so the top-k multiset is the row's. One max pass and a small top-k replace a
    top-k over V.
    """
    r, V = blk.shape
    nb = V // _GROUP
    if nb < 2 * k:
        return torch.topk(blk, k, dim=-1, sorted=True)
    gm = blk[:, :nb * _GROUP].unflatten(1, (nb, _GROUP)).amax(-1)  # [r, nb]
    gi = torch.topk(gm, k, dim=-1, sorted=False).indices
    idx = (gi[:, :, None] * _GROUP + torch.arange(_GROUP, device=blk.device)).reshape(r, -1)
    if V % _GROUP:
        idx = torch.cat([idx, torch.arange(nb * _GROUP, V, device=blk.device).expand(r, -1)], 1)
    v, j = torch.topk(blk.gather(1, idx), k, dim=-1, sorted=True)
    return v, idx.gather(1, j)


def _decide(sv: torch.Tensor, sp: torch.Tensor, avail: torch.Tensor, p: float, K: int, inclusive: bool,
            closed: bool):
    """Nucleus size from a sorted prefix of each row.

    sv [r, w]: the ``avail`` [r] largest logits of each row in descending order (padding after them is ignored),
    sp [r, w]: their softmax probabilities. ``closed`` says the prefix holds every logit >= its last value (a
    threshold set) rather than exactly ``avail`` of them (a top-k). Returns m [r] (nucleus size), thr [r] (the
    m-th largest logit), simple [r] (the row has exactly m logits >= thr, so no tie at the boundary needs
    breaking), ok [r] (the prefix decided the row: C reached p inside it, or it covers the top K).
    """
    r, w = sv.shape
    wk = min(w, K)
    cum = torch.cumsum(sp[:, :wk], -1)  # C_j, j = 1..wk
    lim = avail.clamp(max=wk)
    below = ((cum < p) & (torch.arange(wk, device=sv.device) < lim[:, None])).sum(-1)  # #{j : C_j < p}
    reached = below < lim
    ok = reached | (avail >= K)
    m = torch.where(reached, below + 1, below) if inclusive else below
    thr = sv.gather(1, (m - 1).clamp(min=0)[:, None]).squeeze(1)
    nxt = sv.gather(1, m.clamp(max=w - 1)[:, None]).squeeze(1)  # the (m+1)-th largest when m < avail
    simple = torch.where(m < avail, nxt < thr, torch.full_like(reached, closed)) | (m == 0)
    return m, thr, simple, ok


def _prefix_entropy(sv: torch.Tensor, m: torch.Tensor, shift: torch.Tensor):
    """Entropy of the softmax of the first m [r] entries of each row of sv [r, w] -> (H [r], ls [r]).

    ls = logsumexp of those entries minus ``shift`` [r] (the row maximum: shifting first keeps log q accurate
    for large logits). m <= 1 gives H = 0; the order of the entries does not matter.
    """
    w = int(m.max()) if m.numel() else 0
    r = sv.shape[0]
    if w == 0:
        z = torch.zeros(r, dtype=sv.dtype, device=sv.device)
        return z, torch.full_like(z, -math.inf)
    v = sv[:, :w] - shift[:, None]
    ninf = torch.tensor(-math.inf, dtype=sv.dtype, device=sv.device)
    v = torch.where(torch.arange(w, device=sv.device) < m[:, None], v, ninf)
    ls = torch.logsumexp(v, -1)
    logq = v - ls[:, None]
    q = logq.exp()
    h = -torch.where(q > 0, q * logq, torch.zeros((), dtype=sv.dtype, device=sv.device)).sum(-1)
    return torch.where(m > 1, h, torch.zeros_like(h)), ls


def _sample_rank(K: int) -> int:
    """Rank in the strided sample whose value lies below the K-th largest logit with high probability."""
    return math.ceil(K / _STRIDE + 4 * math.sqrt(K / _STRIDE) + 4)


def _candidates(b: torch.Tensor, pb: torch.Tensor, c0: torch.Tensor, v0: torch.Tensor, p: float, K: int):
    """Candidate logits of each row of b [t, V] -> (P [t, C], cnt [t], good [t], probs_of).

    pb [t, V]: softmax probabilities of b; c0 [t], v0 [t]: probability mass and smallest value of an exactly
    known top set (0 and +inf when none). A threshold L is read off the sample b[:, ::_STRIDE]: c0 plus _STRIDE x
    the sample's descending cumulative probability estimates C at rank _STRIDE x (sample rank); L is the sample
    value at 1.5x the estimated crossing rank plus a noise margin, or at rank _sample_rank(K) if the estimate
    never reaches p. Row i of P holds the cnt[i] logits >= L (all of them, ties included: they are exactly the
    cnt[i] largest logits of the row), unordered and padded with -inf; probs_of(rows) returns the matching
    [len(rows), C] probabilities (0 in the padding), built only when asked for. good[i] is False (and cnt[i] = 0)
    when the wanted rank lies past half the sample (too many candidates to be worth it) or the sample has too few
    finite logits.
    """
    t, V = b.shape
    dev, cd = b.device, b.dtype
    smp = b[:, ::_STRIDE]
    ak_full = _sample_rank(K)
    ak = min(ak_full, max(smp.shape[1] // 2, 1))  # thresholds past half the sample are not worth it
    if bool((v0 < math.inf).any()):  # the known top set is counted exactly in c0
        smp = torch.where(smp < v0[:, None], smp, torch.tensor(-math.inf, dtype=cd, device=dev))
    st, sj = torch.topk(smp, ak, dim=-1, sorted=True)  # [t, ak]
    spr = torch.where(st > -math.inf, pb[:, ::_STRIDE].gather(1, sj), torch.zeros((), dtype=cd, device=dev))
    est = c0[:, None] + _STRIDE * torch.cumsum(spr, -1)
    a_p = (est < p).sum(-1)  # estimated crossing, in sample ranks
    need = torch.where(a_p < ak, (_RANK_FACTOR * a_p + 4 * a_p.to(cd).sqrt() + 8).ceil().long(),
                       torch.full_like(a_p, ak_full))
    a_l = need.clamp(max=ak)
    L = st.gather(1, (a_l - 1)[:, None]).squeeze(1)
    # not good: the wanted rank is past the sampled top (a flat row with a huge K) or the sample has too few
    # finite logits (L = -inf); those rows go to the exact fallback
    good = torch.isfinite(L) & (need <= ak)
    L = torch.where(good, L, torch.full_like(L, math.inf))
    flat_i = (b >= L[:, None]).view(-1).nonzero().squeeze(1)  # candidate positions, row-major
    nnz = flat_i.numel()
    cnt = torch.diff(torch.searchsorted(flat_i, torch.arange(t + 1, device=dev) * V))
    C = max(int(cnt.max()), 1)
    # the j-th candidate of row i goes to P.view(-1)[i * C + j]
    pos = torch.arange(nnz, device=dev) + torch.repeat_interleave(
        torch.arange(t, device=dev) * C - (torch.cumsum(cnt, 0) - cnt), cnt, output_size=nnz)
    P = torch.full((t * C,), -math.inf, dtype=cd, device=dev).scatter_(0, pos, b.view(-1)[flat_i]).view(t, C)

    def probs_of(rows: torch.Tensor) -> torch.Tensor:
        Pp = torch.zeros((t * C,), dtype=cd, device=dev).scatter_(0, pos, pb.reshape(-1)[flat_i])
        return Pp.view(t, C)[rows]

    return P, cnt, good, probs_of


def _flat_top_k(P: torch.Tensor, pmax: torch.Tensor, p: float, K: int):
    """Rows of P [f, C] holding (at least) the K largest logits of their row -> (flat [f], u [f, K]).

    pmax [f]: the largest softmax probability of each row (= 1 / sum exp(z - max z)).
    u: the top K of each row, unordered (a selection, not a sort). flat: their total probability,
    sum exp(u - max u) * pmax, is below p - _FLAT_TOL, so the sorted cumulative sum C_K < p and every C_j < p (C
    is non-decreasing): all K are kept. The tolerance covers rounding (a relative 1e-6 at most here).
    """
    u = torch.topk(P, K, dim=-1, sorted=False).values
    return (u - u.amax(-1, keepdim=True)).exp().sum(-1) * pmax < p - _FLAT_TOL, u


def _nucleus_block(blk: torch.Tensor, probs: torch.Tensor, pmax: torch.Tensor, p: float, K: int, inclusive: bool):
    """Nucleus of every row of blk [r, V] (finite softmax) -> (m, thr, simple, h, ls, mx), each [r].

    probs [r, V]: torch.softmax(blk, -1), the probabilities whose sorted cumulative sum C decides (as in the
    official code); pmax [r]: their row maxima. Output: nucleus size m, the m-th largest logit thr, simple (no tie
    at thr to break), the entropy h of the renormalized nucleus, ls = logsumexp(nucleus logits - mx) and the row
    maxima mx of the logits (read off the small matrices, no pass over blk).
    Exact (the same m and kept values as sorting the whole row), but sorts only what it must:
      1. Rows whose largest probability is at least p / 64 (C_j <= j * max prob, so only those can reach p within
         64 tokens) take an exact top-64 (found among the 64 groups of 64 logits with the largest maxima); a row
         whose cumulative sum reaches p there is done. This is the LLM-like case.
      2. Each remaining row gets a candidate threshold L from a strided sample (every 16th logit): the sample's
         top, scaled by 16 and added to the exactly known top-64 mass, estimates the cumulative-sum curve; L is
         the sample value whose rank passes the estimated crossing (or the K-th largest logit) with a margin for
         sampling noise. The candidates {z >= L} (ties included) are compacted into a small [r, C] matrix; they
         are exactly the C largest logits of the row. A row with >= K candidates holds its top K: a top-K
         selection (no sort) of the candidates gives them, and when their total probability is below
         p - 1e-4 the cumulative sum never reaches p, so all K are kept without sorting (flat rows). Otherwise
         the candidates are sorted and the cumulative sum decides; a row it cannot decide (fewer than K
         candidates and p not reached: the sample misled the estimate) goes to stage 3.
      3. Exact sorted top-K of the full row.
    """
    r, V = blk.shape
    dev, cd = blk.device, blk.dtype
    m = torch.zeros(r, dtype=torch.long, device=dev)
    thr = torch.full((r,), math.inf, dtype=cd, device=dev)
    simple = torch.ones(r, dtype=torch.bool, device=dev)
    h = torch.zeros(r, dtype=cd, device=dev)
    ls = torch.full((r,), -math.inf, dtype=cd, device=dev)
    mx = torch.zeros(r, dtype=cd, device=dev)

    def record(rows, mm, tt, ss, vals):  # vals [len(rows), w]: the row's top values (they include its maximum)
        sh = vals.amax(-1)
        hh, ll = _prefix_entropy(vals, mm, sh)
        m[rows], thr[rows], simple[rows], h[rows], ls[rows], mx[rows] = mm, tt, ss, hh, ll, sh

    def take(t, rows):
        return t if rows.numel() == r else t.index_select(0, rows)

    k0 = min(K, _K0)
    todo = torch.arange(r, device=dev)
    c0 = torch.zeros(r, dtype=cd, device=dev)              # exact probability mass of the known top k0
    v0 = torch.full((r,), math.inf, dtype=cd, device=dev)  # k0-th largest logit (inf: stage 1 skipped)

    # Stage 1: exact top-k0.
    s1 = todo if K <= k0 else (pmax * (k0 * (1 + 1e-4)) >= p).nonzero().squeeze(1)
    if s1.numel():
        vals, idx = _topk_sorted(take(blk, s1), k0)
        sp = take(probs, s1).gather(1, idx)
        avail = torch.full((s1.numel(),), k0, dtype=torch.long, device=dev)
        mm, tt, ss, ok = _decide(vals, sp, avail, p, K, inclusive, closed=(k0 == V))
        if bool(ok.all()):
            record(s1, mm, tt, ss, vals)
        else:
            okr, bad = ok.nonzero().squeeze(1), (~ok).nonzero().squeeze(1)
            record(s1[okr], mm[okr], tt[okr], ss[okr], vals[okr])
            rb = s1[bad]
            c0[rb] = sp[bad].sum(-1)
            v0[rb] = vals[bad, -1]
        left = torch.ones(r, dtype=torch.bool, device=dev)
        left[s1[ok]] = False
        todo = left.nonzero().squeeze(1)
    if todo.numel() == 0:
        return m, thr, simple, h, ls, mx

    # Stage 2: candidates above a sampled threshold.
    fallback = []
    if V >= 16 * _STRIDE:
        P, cnt, good, probs_of = _candidates(take(blk, todo), take(probs, todo), c0[todo], v0[todo], p, K)
        fallback.append(todo[~good])
        rest = good & (cnt < K)
        full = (good & (cnt >= K)).nonzero().squeeze(1)
        if full.numel():
            flat, u = _flat_top_k(P[full], pmax[todo[full]], p, K)
            fl = flat.nonzero().squeeze(1)
            if fl.numel():  # C_K < p: all K kept, no order needed
                uf, tt = u[fl], u[fl].amin(-1)
                ss = (P[full[fl]] >= tt[:, None]).sum(-1) == K  # the candidates hold every logit >= tt
                record(todo[full[fl]], torch.full((fl.numel(),), K, dtype=torch.long, device=dev), tt, ss, uf)
            rest[full[~flat]] = True
        qi = rest.nonzero().squeeze(1)
        if qi.numel():
            w = int(cnt[qi].max())
            sv, si = torch.sort(P[qi, :w], dim=-1, descending=True)
            sv, si = sv[:, :K + 1], si[:, :K + 1]
            rows = todo[qi]
            mm, tt, ss, ok = _decide(sv, probs_of(qi).gather(1, si), cnt[qi], p, K, inclusive, closed=True)
            okr = ok.nonzero().squeeze(1)
            record(rows[okr], mm[okr], tt[okr], ss[okr], sv[okr])
            fallback.append(rows[~ok])
    else:
        fallback.append(todo)

    # Stage 3: exact sorted top-K of the full row.
    fb = torch.cat(fallback)
    if fb.numel():
        vals, idx = torch.topk(take(blk, fb), K, dim=-1, sorted=True)
        avail = torch.full((fb.numel(),), K, dtype=torch.long, device=dev)
        mm, tt, ss, _ = _decide(vals, take(probs, fb).gather(1, idx), avail, p, K, inclusive, closed=(K == V))
        record(fb, mm, tt, ss, vals)
    return m, thr, simple, h, ls, mx


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


def _top_p_forward(z, valid, p, K, inclusive, chunk):
    """Per-position (h, m, thr, simple, ls, mx) for z [N, V] (see _nucleus_block; mx: row maxima); invalid rows
    get the values of all-zero logits."""
    cd = _compute_dtype(z.dtype)
    n, V = z.shape
    dev = z.device
    h = torch.zeros(n, dtype=cd, device=dev)
    ls = torch.full((n,), -math.inf, dtype=cd, device=dev)
    thr = torch.full((n,), math.inf, dtype=cd, device=dev)
    m = torch.zeros(n, dtype=torch.long, device=dev)
    simple = torch.ones(n, dtype=torch.bool, device=dev)
    mxs = torch.zeros(n, dtype=cd, device=dev)
    buf = torch.empty(min(chunk, max(n, 1)), V, dtype=cd, device=dev)
    if valid is not None and not bool(valid.all()):
        zero = torch.zeros(1, V, dtype=cd, device=dev)
        pz = _softmax_into(zero, buf[:1])
        m0, _, _, h0, _, _ = _nucleus_block(zero, pz, pz.amax(-1), p, K, inclusive)
        h.fill_(float(h0[0]))
        m.fill_(int(m0[0]))  # thr stays +inf there: nothing kept in the backward, the gradient is zero
    for s, e, rows, blk in _blocks(z, valid, chunk, cd):
        mb, tb, sb, hb, lb, xb = _top_p_rows(blk, _softmax_into(blk, buf[:blk.shape[0]]), p, K, inclusive)
        for dst, src in ((h, hb), (ls, lb), (thr, tb), (m, mb), (simple, sb), (mxs, xb)):
            _fill_rows(dst, s, e, rows, src)
    return h, m, thr, simple, ls, mxs


def _top_p_rows(blk: torch.Tensor, probs: torch.Tensor, p: float, K: int, inclusive: bool):
    """Nucleus of every row of blk [r, V] (any logits) -> (m, thr, simple, h, ls, mx), each [r] (see
    _nucleus_block). probs [r, V]: torch.softmax(blk, -1). Rows whose softmax is undefined (NaN or +inf logits, or
    all -inf) get NaN (h, thr, ls, mx), m = 0 and simple = True: NaN out, NaN gradient."""
    pmax = probs.amax(-1)
    fin = torch.isfinite(pmax)
    if bool(fin.all()):
        return _nucleus_block(blk, probs, pmax, p, K, inclusive)
    fi = fin.nonzero().squeeze(1)
    nan = torch.full_like(pmax, math.nan)
    mb, tb, sb = torch.zeros_like(pmax, dtype=torch.long), nan.clone(), torch.ones_like(fin)
    hb, lb, xb = nan.clone(), nan.clone(), nan.clone()
    if fi.numel():
        part = _nucleus_block(blk[fi], probs[fi], pmax[fi], p, K, inclusive)
        for dst, src in zip((mb, tb, sb, hb, lb, xb), part):
            dst[fi] = src
    return mb, tb, sb, hb, lb, xb


def _top_p_grad_rows(blk: torch.Tensor, h: torch.Tensor, ls: torch.Tensor, thr: torch.Tensor, m: torch.Tensor,
                     simple: torch.Tensor, mx: torch.Tensor, gh: torch.Tensor):
    """Gradient of sum_i gh_i H_p,i with respect to blk [r, V], from the forward's per-row values (each [r]).

    dH/dz_v = -q_v (log q_v + H) on the nucleus, 0 elsewhere (the nucleus is a constant set), recomputed as
    {z >= the m-th largest logit} (ties broken by index only in rows holding more ties than needed). Returns
    (ri, ci, vals): the nonzero entries, when the nucleus is sparse (at most 1/8 of the block), else
    (None, None, dense [r, V]). Rows with a NaN forward value are not special-cased here (the caller sets them)."""
    cd = blk.dtype
    # Rows with m <= 1 have H = 0 identically; a -inf threshold keeps every finite logit (q = 0 for the rest).
    thr_b = torch.where(m > 1, thr, torch.full_like(thr, math.inf))
    thr_b = torch.where(thr_b == -math.inf, torch.full_like(thr_b, torch.finfo(cd).min), thr_b)
    simple = simple | (m <= 1) | (thr == -math.inf)
    kept_count = torch.where(thr_b < math.inf, m, torch.zeros_like(m))
    keep = blk >= thr_b[:, None]
    hard = ~simple
    if bool(hard.any()):
        i = hard.nonzero().squeeze(1)
        keep[i] = _kept(blk[i], thr[i], m[i])
    if int(kept_count.sum()) * 8 <= keep.numel():  # sparse nucleus: work on the kept entries only
        ri, ci = keep.nonzero().unbind(1)
        y = (blk[ri, ci] - mx[ri]) - ls[ri]  # log q
        return ri, ci, -(gh[ri] * y.exp()) * (y + h[ri])
    # wide nucleus (e.g. top_k=None): dense block arithmetic
    y = (blk - mx[:, None]).sub_(ls[:, None])  # log q (<= 0 off the nucleus too)
    g = y.exp().mul_(y.add_(h[:, None])).mul_(-gh[:, None])
    return None, None, torch.where(keep, g, torch.zeros((), dtype=cd, device=blk.device))


class _TopPEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, valid, p, K, inclusive, chunk):
        h, m, thr, simple, ls, mx = _top_p_forward(z, valid, p, K, inclusive, chunk)
        ctx.save_for_backward(z, valid if valid is not None else torch.empty(0), h, ls, thr, m, simple, mx)
        ctx.chunk, ctx.has_valid = chunk, valid is not None
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        # dH/dz_v = -q_v (log q_v + H) on the nucleus, 0 elsewhere (the nucleus is a constant set).
        z, valid, h, ls, thr, m, simple, mx = ctx.saved_tensors
        valid = valid if ctx.has_valid else None
        cd = h.dtype
        gh = gh.to(cd)
        grad = torch.zeros_like(z)
        nan_rows = torch.isnan(h)
        for s, e, rows, blk in _blocks(z, valid, ctx.chunk, cd):
            sel = slice(s, e) if rows is None else rows + s
            ri, ci, g = _top_p_grad_rows(blk, h[sel], ls[sel], thr[sel], m[sel], simple[sel], mx[sel], gh[sel])
            if ri is not None:
                gr = ri if rows is None else rows[ri]
                grad[s:e][gr, ci] = g.to(z.dtype)
            else:
                _fill_rows(grad, s, e, rows, g.to(z.dtype))
            bad = nan_rows[sel]
            if bool(bad.any()):
                bi = bad.nonzero().squeeze(1)
                grad[s:e][bi if rows is None else rows[bi]] = math.nan
        return grad, None, None, None, None, None


def _check_top_p_args(p, top_k, chunk_size):
    check_float("p", p, lo=0.0, hi=1.0, lo_open=True)
    check_int("top_k", top_k, lo=1, allow_none=True)
    check_int("chunk_size", chunk_size, lo=1, allow_none=True)


def top_p_entropy(logits: torch.Tensor, p: float = 0.8, top_k: int | None = None, inclusive: bool = False, *,
                  mask: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy of the renormalized top-p nucleus of softmax(logits) (SIREN, arXiv 2509.25133, section 3.1).

    logits [..., V] -> [...], differentiable. The logits are sorted descending (only the ``top_k`` largest are
    considered; None = all V; ties by vocabulary index), C_j is the cumulative sum of their probabilities
    pi = torch.softmax(logits) over the FULL vocabulary (the same float32 numbers as the official code, so the
    cut agrees with it bit for bit), and the nucleus is the first m tokens with m = #{j : C_j < p} ("exclusive",
    the official SIREN code) or that plus the crossing token ("inclusive", the textbook nucleus). If C never
    reaches p within top_k, all top_k are kept. The entropy of q = pi restricted to the nucleus and renormalized
    is returned; an empty or one-token nucleus gives 0 with zero gradient. The nucleus itself is a constant (no
    gradient flows through the choice of tokens); ties at the boundary are broken by vocabulary index, which
    leaves the value unchanged.

    Algorithm (exact: the same m and kept set as a full sort; details in ``_nucleus_block``). Per block of
    ``chunk_size`` positions: row max and softmax (into a reused scratch block), then
      1. rows whose largest probability is >= p / 64 (only those can reach p within 64 tokens) take an exact
         top-64, searched in the 64 groups of 64 logits with the largest maxima; a row whose C reaches p there
         is done (the LLM-like case: about one softmax pass and one max pass in all);
      2. the other rows get a candidate threshold L from a strided sample (every 16th logit), placed past the
         estimated crossing (or the estimated K-th largest logit) with a margin; the candidates {z >= L} are
         compacted into a small [rows, C] matrix (they are exactly the C largest logits). A row holding >= K
         candidates whose top-K probability mass is below p - 1e-4 keeps its top K, found by a selection, with
         no sort (the flat case); otherwise the candidates are sorted and C decides;
      3. a row the candidates cannot decide (a misleading sample: checked, never assumed) falls back to an
         exact sorted top-K of the full row.
    The entropy is computed from the kept values alone. The backward recomputes the kept set per block as
    {z >= the m-th largest logit} (ties broken by index only in rows that have more ties than needed) and
    writes -q (log q + H) * grad into a zero gradient, touching only the kept entries when the nucleus is
    sparse. Memory: a few [chunk_size, V] blocks beyond the input (and the gradient), whatever N is.
    Non-finite rows: see the module docstring (NaN out).

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
    return _top_p_forward(z, valid, float(p), K, bool(inclusive), chunk)[1].reshape(lead)


# ------------------------------------------------------------------------------- predicted entropy change
@torch.no_grad()
def _change_terms(z: torch.Tensor, valid: torch.Tensor | None, chunk_size: int | None = None):
    """Flattened logits z [N, V] (rows outside ``valid`` read as zeros) -> (H, sum_k pi_k^2 (log pi_k + H),
    logsumexp), each [N] in the compute dtype; chunked over rows, no gradient. The terms of the exact first-order
    entropy change (steer.md, last section), shared by predicted_entropy_change and entropy_change_terms (the
    entropy-change probe)."""
    cd = _compute_dtype(z.dtype)
    chunk = chunk_size or default_chunk_size(z.shape[-1])
    h = torch.zeros(z.shape[0], dtype=cd, device=z.device)
    second = torch.zeros_like(h)
    lse = torch.zeros_like(h)
    for s in range(0, z.shape[0], chunk):
        e = s + chunk
        rows = _rows(z, valid, s, e, cd)
        lse[s:e] = torch.logsumexp(rows, -1)
        logp = rows - lse[s:e, None]
        p = logp.exp()
        plogp = torch.where(p > 0, p * logp, 0.0)
        h[s:e] = -plogp.sum(-1)
        second[s:e] = (p * plogp).sum(-1) + (p * p).sum(-1) * h[s:e]
    return h, second, lse


def entropy_change_terms(logits: torch.Tensor, mask: torch.Tensor | None = None,
                         chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, sum_k pi_k^2 (log pi_k + H)) per position, [...] each, from logits [..., V]; no gradient, chunked.

    With them the exact first-order entropy change of a token with log-probability lp and coefficient w is
    -w [exp(lp) (lp + H) - second] (what predicted_entropy_change(form="exact") returns). Positions outside
    ``mask`` give 0.
    """
    check_int("chunk_size", chunk_size, lo=1, allow_none=True)
    z, valid, lead = _flatten(logits, mask)
    h, second, _ = _change_terms(z, valid, chunk_size)
    if valid is not None:
        h = torch.where(valid, h, torch.zeros_like(h))
        second = torch.where(valid, second, torch.zeros_like(second))
    return h.reshape(lead), second.reshape(lead)


def _change_from_terms(logp_a, h, second, w, form):
    p_a = logp_a.exp()
    if form == "exact":
        return -w * (p_a * (logp_a + h) - second)
    return -w * (1 - p_a) ** 2 * (logp_a + h)


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
    w = coef.reshape(-1).to(_compute_dtype(z.dtype))
    if bool((~torch.isfinite(w))[ok].any()):
        raise ValueError("coef has non-finite values at valid positions")
    h, second, lse = _change_terms(z, valid, chunk_size)
    z_a = z.gather(1, ids[:, None]).squeeze(1).to(h.dtype)  # [N]: no copy of the logits
    logp_a = torch.where(ok, z_a, torch.zeros_like(z_a)) - lse  # invalid rows read as zeros, like _rows
    out = _change_from_terms(logp_a, h, second, w, form)
    if valid is not None:
        out = torch.where(valid, out, torch.zeros_like(out))
    return out.reshape(lead)


def predicted_entropy_change_from_terms(log_prob: torch.Tensor, entropy: torch.Tensor, second: torch.Tensor,
                                        coef: torch.Tensor, form: str = "exact", *,
                                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`predicted_entropy_change` from per-position terms instead of logits: log_prob (log pi_a of the
    sampled token), entropy (H) and second (sum_k pi_k^2 (log pi_k + H), see :func:`entropy_change_terms`), coef,
    all [...] -> [...]. The same formula; what an engine uses when the terms come from a tiled LM-head pass
    (:mod:`rlvr_entropy.kernels`). No gradient; positions outside ``mask`` give 0 (NaN there never leaks)."""
    if form not in ("exact", "steer"):
        raise ValueError(f"form must be one of ['exact', 'steer'], got {form!r}")
    for name, x in (("log_prob", log_prob), ("entropy", entropy), ("second", second), ("coef", coef)):
        check_tensor(name, x)
        if tuple(x.shape) != tuple(log_prob.shape):
            raise ValueError(f"{name} must have shape {list(log_prob.shape)} (that of log_prob), got {list(x.shape)}")
    with torch.no_grad():
        cd = _compute_dtype(torch.promote_types(log_prob.dtype, entropy.dtype))
        ok = torch.ones_like(log_prob, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        if mask is not None and tuple(mask.shape) != tuple(log_prob.shape):
            raise ValueError(f"mask must have shape {list(log_prob.shape)}, got {list(mask.shape)}")
        zero = torch.zeros((), dtype=cd, device=log_prob.device)
        lp, h, s2, w = (torch.where(ok, x.detach().to(cd), zero) for x in (log_prob, entropy, second, coef))
        if bool((~torch.isfinite(torch.stack([lp, h, s2, w])))[:, ok].any()):
            raise ValueError("log_prob, entropy, second and coef must be finite at valid positions")
        return torch.where(ok, _change_from_terms(lp, h, s2, w, form), zero)


# ------------------------------------------------------------------------ clamped entropy (AEnt)
def kept_count(vocab: int, clamp_fraction: float) -> int:
    """Number of logits AEnt keeps per position: V - floor(clamp_fraction * V), at least 1."""
    n_drop = math.floor(clamp_fraction * vocab + 1e-9)  # 1e-9: 0.3 * 10 must drop 3, not 2
    return max(1, vocab - n_drop)


def _kept_top(blk: torch.Tensor, thr: torch.Tensor, n_keep: int) -> torch.Tensor:
    """bool [c, V]: the n_keep largest logits of each row of blk [c, V], given thr [c] = the n_keep-th largest.

    {z >= thr} is the kept set unless more than one logit equals thr at the boundary; only those rows go through
    the index tie rule of ``_kept`` (the first tied entries in vocabulary order are kept)."""
    keep = blk >= thr[:, None]
    over = keep.sum(-1) > n_keep
    if bool(over.any()):
        i = over.nonzero().squeeze(1)
        keep[i] = _kept(blk[i], thr[i], torch.full_like(i, n_keep))
    return keep


def _clamped_rows(blk: torch.Tensor, n_keep: int):
    """Clamped entropy of every row of blk [c, V] -> (H, thr, lse), each [c]: thr the n_keep-th largest logit
    (kthvalue), lse the logsumexp of the kept set. With y = z - max z and e = exp(y) on the kept set, S = sum e:
    H = log S - sum e y / S."""
    V = blk.shape[-1]
    t = torch.kthvalue(blk, V - n_keep + 1, dim=-1).values                 # [c] n_keep-th largest
    keep = _kept_top(blk, t, n_keep)                                       # bool [c, V]
    mx = blk.amax(-1)                                                      # [c] (always kept)
    y = blk - mx[:, None]                                                  # [c, V]
    ex = torch.exp(y).masked_fill_(~keep, 0)                               # e on the kept set, else 0
    y.masked_fill_(ex == 0, 0)                                             # no 0 * -inf below
    ssum = ex.sum(-1)                                                      # [c]
    logs = ssum.log()
    return logs - ex.mul_(y).sum(-1) / ssum, t, mx + logs


def _clamped_grad_rows(blk: torch.Tensor, thr: torch.Tensor, lse: torch.Tensor, h: torch.Tensor, gh: torch.Tensor,
                       n_keep: int) -> torch.Tensor:
    """Gradient of sum_i gh_i H_i (clamped entropy) with respect to blk [c, V]: -q (log q + H) gh on the kept set,
    0 elsewhere (exactly 0, never 0 * -inf), recomputed from the forward's thr, lse, H [c]."""
    keep = _kept_top(blk, thr, n_keep)
    g = blk - lse[:, None]                                                 # log q on the kept set
    q = torch.exp(g).masked_fill_(~keep, 0)
    g.add_(h[:, None]).masked_fill_(q == 0, 0)
    return g.mul_(q).mul_(-gh[:, None])                                    # -q (log q + H) * dL/dH


class _ClampedEntropy(torch.autograd.Function):
    """Entropy of the softmax restricted to the n_keep largest logits of each row of z [N, V].

    Forward, per block of ``chunk`` rows: :func:`_clamped_rows`. Saved: z and three [N] vectors (threshold,
    logsumexp of the kept set, H). The backward recomputes the kept set block by block and writes
    dH/dz_v = -q_v (log q_v + H) on it (:func:`_clamped_grad_rows`), so no [N, V] temporary exists.
    """

    @staticmethod
    def forward(ctx, z, valid, n_keep, chunk):
        cd = _compute_dtype(z.dtype)
        N, V = z.shape
        h = torch.zeros(N, dtype=cd, device=z.device)
        thr = torch.zeros(N, dtype=cd, device=z.device)
        lse = torch.zeros(N, dtype=cd, device=z.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            h[s:e], thr[s:e], lse[s:e] = _clamped_rows(_rows(z, valid, s, e, cd), n_keep)
        ctx.save_for_backward(z, valid if valid is not None else torch.empty(0, dtype=torch.bool), h, thr, lse)
        ctx.n_keep, ctx.chunk, ctx.has_valid = n_keep, chunk, valid is not None
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        z, valid, h, thr, lse = ctx.saved_tensors
        valid = valid if ctx.has_valid else None
        cd = h.dtype
        gh = gh.to(cd)
        N = z.shape[0]
        grad = torch.empty_like(z)
        for s in range(0, N, ctx.chunk):
            e = min(s + ctx.chunk, N)
            g = _clamped_grad_rows(_rows(z, valid, s, e, cd), thr[s:e], lse[s:e], h[s:e], gh[s:e], ctx.n_keep)
            if valid is not None:
                g.masked_fill_(~valid[s:e, None], 0)
            grad[s:e] = g.to(z.dtype)
        return grad, None, None, None


def clamped_entropy(logits: torch.Tensor, clamp_fraction: float, *, mask: torch.Tensor | None = None,
                    chunk_size: int | None = None) -> torch.Tensor:
    """AEnt's clamped entropy (arXiv 2509.03493). logits [..., V] -> [...], differentiable, chunked over positions.

    Drops the floor(clamp_fraction * V) lowest logits of each position (ties broken by vocabulary index), takes the
    softmax of the rest and returns its entropy in nats. ``clamp_fraction = 0`` is :func:`entropy`.
    Positions outside ``mask`` (optional bool [...]) are treated as all-zero logits and get zero gradient (NaN there
    never leaks). Half-precision logits are computed in float32 (output float32, gradient in the logits' dtype).
    """
    check_float("clamp_fraction", clamp_fraction, lo=0.0, hi=1.0, hi_open=True)
    check_int("chunk_size", chunk_size, lo=1, allow_none=True)
    if clamp_fraction == 0:
        return entropy(logits, mask=mask, chunk_size=chunk_size)
    z, valid, lead = _flatten(logits, mask)
    V = z.shape[-1]
    chunk = chunk_size or default_chunk_size(V)
    return _ClampedEntropy.apply(z, valid, kept_count(V, clamp_fraction), chunk).reshape(lead)


# ------------------------------------------------------------------------ min-p proxy mass (Lp-Reg)
def _proxy_rows(blk: torch.Tensor, log_kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log Z, log max pi) of every row of blk [c, V]: Z the mass of the tokens with pi >= kappa * max pi."""
    lse = torch.logsumexp(blk, -1)                                       # [c]
    mx = blk.amax(-1)                                                    # [c]
    kept = blk.masked_fill(blk < (mx + log_kappa)[:, None], -math.inf)   # pi >= kappa * max pi
    return torch.logsumexp(kept, -1) - lse, mx - lse


def _proxy_from_entropy_block(blk: torch.Tensor, ebuf: torch.Tensor, mx: torch.Tensor, logs: torch.Tensor,
                              log_kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_proxy_rows` from what :func:`_entropy_block` left: e = exp(z - max) in ebuf, the row maxima mx and
    log S = log sum e. The kept set is the same comparison z >= max + log kappa; Z = (sum of e over it) / S, so
    one compare-and-sum pass replaces two logsumexps."""
    e = ebuf[:blk.shape[0]]
    kept = torch.where(blk >= (mx + log_kappa)[:, None], e, torch.zeros((), dtype=e.dtype, device=e.device))
    return kept.sum(-1).log() - logs, -logs


@torch.no_grad()
def proxy_log_mass(logits: torch.Tensor, kappa: float, *, mask: torch.Tensor | None = None,
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log Z, log max pi), two [...] tensors, from logits [..., V]; no gradient; chunked over positions.

    Z = sum of pi(v) over the tokens with pi(v) >= kappa * max pi (Lp-Reg's min-p proxy: its kept mass, <= 1);
    max pi is the largest probability. Positions outside ``mask`` [...] (bool) are skipped and get 0 (Z = 1,
    max pi = 1); NaN there never leaks. Computed in float32 (float64 for float64 logits), ``chunk_size`` positions
    at a time (default ``default_chunk_size(V)``), so only a few [chunk, V] temporaries exist at once.
    """
    check_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {list(logits.shape)}")
    check_float("kappa", kappa, lo=0.0, hi=1.0, lo_open=True)
    check_int("chunk_size", chunk_size, lo=1, allow_none=True)
    lead = logits.shape[:-1]
    V = logits.shape[-1]
    z = logits.detach().reshape(-1, V)
    cd = torch.float64 if z.dtype == torch.float64 else torch.float32
    log_z = torch.zeros(z.shape[0], dtype=cd, device=z.device)
    log_max = torch.zeros(z.shape[0], dtype=cd, device=z.device)
    if mask is None:
        rows = torch.arange(z.shape[0], device=z.device)
    else:
        check_tensor("mask", mask)
        if tuple(mask.shape) != tuple(lead):
            raise ValueError(f"mask must have shape {list(lead)} (logits without V), got {list(mask.shape)}")
        rows = mask.reshape(-1).nonzero().reshape(-1)
    chunk = chunk_size or default_chunk_size(V)
    log_kappa = math.log(kappa)
    for s in range(0, rows.numel(), chunk):
        idx = rows[s:s + chunk]
        log_z[idx], log_max[idx] = _proxy_rows(z.index_select(0, idx).to(cd), log_kappa)
    return log_z.reshape(lead), log_max.reshape(lead)


# ----------------------------------------------------------------------------- statistic requests
STAT_KINDS = ("log_prob", "entropy", "top_p_entropy", "change_terms", "proxy_log_mass", "clamped_entropy")
_DIFFERENTIABLE = ("log_prob", "entropy", "top_p_entropy", "clamped_entropy")
_PARAMS = {"top_p_entropy": ("p", "top_k", "inclusive"), "proxy_log_mass": ("kappa",),
           "clamped_entropy": ("fraction",)}


@dataclass(frozen=True)
class Stat:
    """One per-position statistic of the next-token distribution, as a hashable request.

    Methods ask a :class:`~rlvr_entropy.core.batch.TokenBatch` for statistics with these (``batch.stat(...)``); the
    batch serves them from materialized logits (:func:`compute_stat`) or from a tiled LM-head pass over hidden
    states (:class:`rlvr_entropy.kernels.LMHeadSource`), which computes every statistic an engine requests at once.

    ========================================= ======== ======================================================
    request                                   gradient value per position ([B, T] each; 0 at padding)
    ========================================= ======== ======================================================
    ``Stat.log_prob()``                       yes      log pi(a) of the sampled token (needs token ids)
    ``Stat.entropy()``                        yes      :func:`entropy`
    ``Stat.top_p_entropy(p, top_k, incl.)``   yes      :func:`top_p_entropy` (SIREN)
    ``Stat.change_terms()``                   no       (H, sum_k pi_k^2 (log pi_k + H)): :func:`entropy_change_terms`
    ``Stat.proxy_log_mass(kappa)``            no       (log Z, log max pi): :func:`proxy_log_mass` (Lp-Reg)
    ``Stat.clamped_entropy(fraction)``        yes      :func:`clamped_entropy` (AEnt)
    ========================================= ======== ======================================================
    """

    kind: str
    p: float | None = None
    top_k: int | None = None
    inclusive: bool = False
    kappa: float | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in STAT_KINDS:
            raise ValueError(f"kind must be one of {list(STAT_KINDS)}, got {self.kind!r}")
        wanted = _PARAMS.get(self.kind, ())
        for name in ("p", "top_k", "kappa", "fraction"):
            if name not in wanted and getattr(self, name) is not None:
                raise ValueError(f"{name} is not a parameter of Stat kind {self.kind!r}")
        if self.kind != "top_p_entropy" and self.inclusive:
            raise ValueError(f"inclusive is not a parameter of Stat kind {self.kind!r}")
        if self.kind == "top_p_entropy":
            _check_top_p_args(self.p, self.top_k, None)
            if not isinstance(self.inclusive, bool):
                raise ValueError(f"inclusive must be a bool, got {self.inclusive!r}")
        if self.kind == "proxy_log_mass":
            check_float("kappa", self.kappa, lo=0.0, hi=1.0, lo_open=True)
        if self.kind == "clamped_entropy":
            check_float("fraction", self.fraction, lo=0.0, hi=1.0, hi_open=True)

    @property
    def differentiable(self) -> bool:
        return self.kind in _DIFFERENTIABLE

    @property
    def num_outputs(self) -> int:
        return 2 if self.kind in ("change_terms", "proxy_log_mass") else 1

    @classmethod
    def log_prob(cls) -> "Stat":
        return cls("log_prob")

    @classmethod
    def entropy(cls) -> "Stat":
        return cls("entropy")

    @classmethod
    def top_p_entropy(cls, p: float = 0.8, top_k: int | None = None, inclusive: bool = False) -> "Stat":
        check_float("p", p, lo=0.0, hi=1.0, lo_open=True)
        return cls("top_p_entropy", p=float(p), top_k=top_k, inclusive=inclusive)

    @classmethod
    def change_terms(cls) -> "Stat":
        return cls("change_terms")

    @classmethod
    def proxy_log_mass(cls, kappa: float) -> "Stat":
        check_float("kappa", kappa, lo=0.0, hi=1.0, lo_open=True)
        return cls("proxy_log_mass", kappa=float(kappa))

    @classmethod
    def clamped_entropy(cls, fraction: float) -> "Stat":
        check_float("fraction", fraction, lo=0.0, hi=1.0, hi_open=True)
        return cls("clamped_entropy", fraction=float(fraction))


def compute_stat(logits: torch.Tensor, stat: Stat, *, mask: torch.Tensor | None = None,
                 token_ids: torch.Tensor | None = None):
    """``stat`` from materialized logits [..., V] (temperature applied): a tensor [...] (a pair for change_terms and
    proxy_log_mass), 0 outside ``mask``. Exactly the functions of this module (the reference the tiled LM-head
    route of :mod:`rlvr_entropy.kernels` is tested against). ``token_ids`` [...] is needed for ``log_prob``."""
    if not isinstance(stat, Stat):
        raise ValueError(f"stat must be a rlvr_entropy.stats.Stat, got {type(stat).__name__}")

    def clean(x: torch.Tensor) -> torch.Tensor:
        return x if mask is None else torch.where(mask.to(torch.bool), x, torch.zeros((), dtype=x.dtype,
                                                                                      device=x.device))

    k = stat.kind
    if k == "log_prob":
        if token_ids is None:
            raise ValueError("token_ids is needed for Stat.log_prob() from logits")
        check_tensor("token_ids", token_ids)
        if tuple(token_ids.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"token_ids must have shape {list(logits.shape[:-1])}, got {list(token_ids.shape)}")
        z = logits.to(_compute_dtype(logits.dtype))
        ids = clean(token_ids.long()) if mask is not None else token_ids.long()
        return clean(z.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(z, -1))
    if k == "entropy":
        return clean(entropy(logits, mask=mask))
    if k == "top_p_entropy":
        return clean(top_p_entropy(logits, p=stat.p, top_k=stat.top_k, inclusive=stat.inclusive, mask=mask))
    if k == "change_terms":
        return entropy_change_terms(logits, mask)
    if k == "proxy_log_mass":
        return proxy_log_mass(logits, stat.kappa, mask=mask)
    return clean(clamped_entropy(logits, stat.fraction, mask=mask))
