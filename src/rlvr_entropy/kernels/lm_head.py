"""Tiled LM head: per-position statistics of softmax((hidden @ W^T + b) / T) without [N, V] logits.

Every method that reads the full next-token distribution (SIREN's top-p entropy, Lp-Reg's min-p proxy, AEnt's
clamped entropy) and the entropy-change probe (the exact entropy-change terms) get what they need from this pass:

    hidden [N, H], weight [V, H], bias [V] | None, token_ids [N], temperature
        -> for each requested :class:`~rlvr_entropy.stats.Stat`: a tensor [N] (a pair for change_terms /
           proxy_log_mass), with gradient to hidden, weight and bias for the differentiable kinds.

Forward: row tiles of ``tile_size`` positions; each tile's logits [tile, V] are computed from hidden @ W^T (+ b),
divided by the temperature, and reduced in cache-sized blocks of rows by the block functions of
:mod:`rlvr_entropy.stats` (``_entropy_second_block``, ``_top_p_rows``, ``_clamped_rows``, ``_proxy_rows``), so
every statistic has the arithmetic of its unfused function on materialized logits (the min-p proxy mass
reuses the entropy block's exp(z - max): the same kept set, one pass instead of two logsumexps). Only per-position
scalars are kept. Backward: each tile's logits are recomputed, the gradient of every requested statistic is
accumulated block by block into the tile (log-prob and entropy densely, the top-p nucleus sparsely through
``stats._top_p_grad_rows``, the clamped entropy through ``stats._clamped_grad_rows``), and three GEMMs give the
gradients of hidden, weight and bias (accumulated in float32, or float64 for float64 inputs).

Memory beyond the inputs and the outputs: one [tile, V] tile, four [block, V] scratch blocks, O(N) saved scalars
per statistic and (backward) a float32 [V, H] weight gradient, whatever N is. The logits are computed in float32
(float64 for float64 inputs) from the given weights, autocast off, like TRL's ``cast_lm_head_to_fp32``: with bf16
weights the statistics are those of the exact float32 logits, not of bf16-rounded ones.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from rlvr_entropy import stats as st
from rlvr_entropy.core.validation import check_finite_where, check_float, check_int, check_tensor
from rlvr_entropy.stats import Stat

__all__ = ["lm_head_stats", "LMHeadSource", "lm_head_batch_fields", "requests_for", "default_tile_size"]

_TILE_ELEMENTS = 1 << 25  # 128 MiB of float32 per [tile, V] logits tile (220 rows at V = 151,936)
_WEIGHT_CHUNK = 1 << 24   # elements of a weight chunk converted to the compute dtype at once
_MIN_GEMM_ROWS = 16       # the hidden-state gradient GEMM runs on at least this many rows (zero padding)


def default_tile_size(vocab: int) -> int:
    """Rows per logits tile: about 32M logits (128 MiB of float32), at least 1."""
    return max(1, _TILE_ELEMENTS // max(vocab, 1))


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _weight_chunks(weight: torch.Tensor, cd: torch.dtype):
    """(s, e, weight[s:e] in cd): the whole weight when no conversion is needed, else chunks of ~16M elements."""
    V, H = weight.shape
    step = V if weight.dtype == cd else max(1, _WEIGHT_CHUNK // max(H, 1))
    for s in range(0, V, step):
        e = min(s + step, V)
        yield s, e, weight[s:e].to(cd)


def _tile_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float,
                 out: torch.Tensor) -> torch.Tensor:
    """out [r, V] = (h @ W^T + b) / T in out's dtype (h [r, H] already in it)."""
    for s, e, w in _weight_chunks(weight, out.dtype):
        o = out if e - s == out.shape[1] else out[:, s:e]
        if bias is None:
            torch.mm(h, w.t(), out=o)
        else:
            torch.addmm(bias[s:e], h, w.t(), out=o)
    if temperature != 1.0:
        out.div_(temperature)
    return out


class _Plan:
    """What one pass computes: the requested statistics in order and where their outputs go."""

    def __init__(self, requests: Sequence[Stat], vocab: int) -> None:
        self.requests = tuple(requests)
        self.vocab = vocab
        kinds = {r.kind for r in self.requests}
        self.ent = bool(kinds & {"log_prob", "entropy", "change_terms", "proxy_log_mass"})
        self.second = "change_terms" in kinds
        self.tops = [r for r in self.requests if r.kind == "top_p_entropy"]
        self.clamps = [r for r in self.requests if r.kind == "clamped_entropy"]
        self.proxies = [r for r in self.requests if r.kind == "proxy_log_mass"]

    def top_k(self, r: Stat) -> int:
        return self.vocab if r.top_k is None else min(r.top_k, self.vocab)

    def n_keep(self, r: Stat) -> int:
        return st.kept_count(self.vocab, r.fraction)


class _LMHeadStats(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None, ids long [N] -> the outputs of every request, each [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, plan, tile):  # noqa: C901 (one pass, many stats)
        ctx.set_materialize_grads(False)
        cd = _compute_dtype(hidden.dtype, weight.dtype)
        n, V = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        new = lambda dtype=cd, fill=0.0: torch.full((n,), fill, dtype=dtype, device=dev)  # noqa: E731
        lse, h_ent, neg_inf = new(), new(), torch.zeros(n, dtype=torch.bool, device=dev)
        second = new() if plan.second else None
        log_prob = new() if any(r.kind == "log_prob" for r in plan.requests) else None
        tops = [dict(h=new(), ls=new(), thr=new(), m=new(torch.long, 0), simple=new(torch.bool, 1), mx=new())
                for _ in plan.tops]
        clamps = [dict(h=new(), thr=new(), lse=new()) for _ in plan.clamps]
        proxies = [(new(), new()) for _ in plan.proxies]
        b = None if bias is None else bias.to(cd)
        R = min(tile, max(n, 1))
        c = min(st.default_chunk_size(V), R)
        zbuf = torch.empty(R, V, dtype=cd, device=dev)
        ybuf, ebuf, pbuf = (torch.empty(c, V, dtype=cd, device=dev) for _ in range(3))
        with torch.autocast(dev.type, enabled=False), torch.no_grad():
            for t0 in range(0, n, R):
                t1 = min(t0 + R, n)
                z = _tile_logits(hidden[t0:t1].to(cd), weight, b, temperature, zbuf[:t1 - t0])
                for s in range(0, t1 - t0, c):
                    e = min(s + c, t1 - t0)
                    blk, rows = z[s:e], slice(t0 + s, t0 + e)
                    if plan.ent:
                        if plan.second:
                            hh, mx, logs, ni, s2 = st._entropy_second_block(blk, ybuf, ebuf)
                            second[rows] = s2
                        else:
                            hh, mx, logs, ni = st._entropy_block(blk, ybuf, ebuf)
                        h_ent[rows], lse[rows], neg_inf[rows] = hh, mx + logs, ni
                        for r, (lz, lm) in zip(plan.proxies, proxies):  # reads exp(z - max) left in ebuf
                            lz[rows], lm[rows] = st._proxy_from_entropy_block(blk, ebuf, mx, logs, math.log(r.kappa))
                        if log_prob is not None:
                            log_prob[rows] = blk.gather(1, ids[rows, None]).squeeze(1) - lse[rows]
                    if plan.tops:
                        probs = st._softmax_into(blk, pbuf[:e - s])
                        for r, out in zip(plan.tops, tops):
                            res = st._top_p_rows(blk, probs, r.p, plan.top_k(r), r.inclusive)
                            for k, v in zip(("m", "thr", "simple", "h", "ls", "mx"), res):
                                out[k][rows] = v
                    for r, out in zip(plan.clamps, clamps):
                        out["h"][rows], out["thr"][rows], out["lse"][rows] = st._clamped_rows(blk, plan.n_keep(r))
        outputs: list[torch.Tensor] = []
        for r in plan.requests:
            if r.kind == "log_prob":
                outputs.append(log_prob)
            elif r.kind == "entropy":
                outputs.append(h_ent)
            elif r.kind == "change_terms":
                outputs += [h_ent.clone(), second]
            elif r.kind == "top_p_entropy":
                outputs.append(tops[plan.tops.index(r)]["h"])
            elif r.kind == "clamped_entropy":
                outputs.append(clamps[plan.clamps.index(r)]["h"])
            else:
                outputs += list(proxies[plan.proxies.index(r)])
        # the same tensor may be requested twice (e.g. entropy and change_terms): hand out distinct ones
        seen: set[int] = set()
        for i, x in enumerate(outputs):
            if id(x) in seen:
                outputs[i] = x.clone()
            seen.add(id(x))
        non_diff = [x for r, x in zip(_output_kinds(plan), outputs) if not r.differentiable]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)
        flat_tops = [t[k] for t in tops for k in ("h", "ls", "thr", "m", "simple", "mx")]
        flat_clamps = [t[k] for t in clamps for k in ("h", "thr", "lse")]
        ctx.save_for_backward(hidden, weight, bias, ids, lse, h_ent, neg_inf, *flat_tops, *flat_clamps)
        ctx.plan, ctx.tile, ctx.temperature = plan, tile, temperature
        return tuple(outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):  # noqa: C901
        plan = ctx.plan
        saved = ctx.saved_tensors
        hidden, weight, bias, ids, lse, h_ent, neg_inf = saved[:7]
        rest = saved[7:]
        tops = [dict(zip(("h", "ls", "thr", "m", "simple", "mx"), rest[6 * i:6 * i + 6])) for i in range(len(plan.tops))]
        rest = rest[6 * len(plan.tops):]
        clamps = [dict(zip(("h", "thr", "lse"), rest[3 * i:3 * i + 3])) for i in range(len(plan.clamps))]
        cd = lse.dtype
        n, V = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        # incoming gradient of each differentiable statistic ([n] in cd, or None when unused)
        g_lp = g_h = None
        g_top: list[torch.Tensor | None] = [None] * len(plan.tops)
        g_cl: list[torch.Tensor | None] = [None] * len(plan.clamps)

        def acc(cur, g):
            if g is None:
                return cur
            g = g.to(cd)
            return g if cur is None else cur + g

        for r, g in zip(_output_kinds(plan), grads):
            if r.kind == "log_prob":
                g_lp = acc(g_lp, g)
            elif r.kind == "entropy":
                g_h = acc(g_h, g)
            elif r.kind == "top_p_entropy":
                i = plan.tops.index(r)
                g_top[i] = acc(g_top[i], g)
            elif r.kind == "clamped_entropy":
                i = plan.clamps.index(r)
                g_cl[i] = acc(g_cl[i], g)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(n, hidden.shape[1], dtype=cd, device=dev) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=cd, device=dev) if need_w else None
        grad_b = torch.zeros(V, dtype=cd, device=dev) if need_b else None
        if all(g is None for g in (g_lp, g_h, *g_top, *g_cl)) or n == 0 or not (need_h or need_w or need_b):
            return _grads_out(grad_h, grad_w, grad_b, hidden, weight, bias)
        b = None if bias is None else bias.to(cd)
        R = min(ctx.tile, n)
        c = min(st.default_chunk_size(V), R)
        zbuf = torch.empty(max(R, min(_MIN_GEMM_ROWS, n)), V, dtype=cd, device=dev)
        gbuf, pbuf = (torch.empty(c, V, dtype=cd, device=dev) for _ in range(2))
        zero = torch.zeros((), dtype=cd, device=dev)
        dense = g_lp is not None or g_h is not None
        with torch.autocast(dev.type, enabled=False), torch.no_grad():
            for t0 in range(0, n, R):
                t1 = min(t0 + R, n)
                h_t = hidden[t0:t1].to(cd)
                z = _tile_logits(h_t, weight, b, ctx.temperature, zbuf[:t1 - t0])
                for s in range(0, t1 - t0, c):
                    e = min(s + c, t1 - t0)
                    blk, rows, r = z[s:e], slice(t0 + s, t0 + e), e - s
                    g = gbuf[:r]
                    if dense:  # -p (g_lp + g_h (log p + H)) + g_lp onehot(a)
                        torch.sub(blk, lse[rows, None], out=g)  # log p
                        p = torch.exp(g, out=pbuf[:r])
                        if g_h is not None:
                            g.add_(h_ent[rows, None]).mul_(g_h[rows, None])
                            if g_lp is not None:
                                g.add_(g_lp[rows, None])
                        else:
                            g.copy_(g_lp[rows, None].expand(r, V))
                        g.mul_(p).neg_()
                        bad = neg_inf[rows]
                        if bool(bad.any()):  # p = 0 at -inf logits: 0 * -inf -> the true gradient 0
                            i = bad.nonzero().squeeze(1)
                            g[i] = torch.where(p[i] > 0, g[i], zero)
                        if g_lp is not None:
                            g[torch.arange(r, device=dev), ids[rows]] += g_lp[rows]
                    else:
                        g.zero_()
                    for t, gt in zip(tops, g_top):
                        if gt is None:
                            continue
                        ri, ci, vals = st._top_p_grad_rows(blk, t["h"][rows], t["ls"][rows], t["thr"][rows],
                                                           t["m"][rows], t["simple"][rows], t["mx"][rows], gt[rows])
                        if ri is not None:
                            g.index_put_((ri, ci), vals, accumulate=True)
                        else:
                            g.add_(vals)
                        nan_rows = torch.isnan(t["h"][rows])
                        if bool(nan_rows.any()):
                            g[nan_rows] = math.nan
                    for r_, t, gc in zip(plan.clamps, clamps, g_cl):
                        if gc is not None:
                            g.add_(st._clamped_grad_rows(blk, t["thr"][rows], t["lse"][rows], t["h"][rows], gc[rows],
                                                         plan.n_keep(r_)))
                    blk.copy_(g)  # the tile now holds dL/dz for these rows
                if ctx.temperature != 1.0:
                    z.div_(ctx.temperature)  # dL/d(h W^T + b) = dL/dz / T
                # dL/dh = dz @ W over >= _MIN_GEMM_ROWS rows: MKL's float32 GEMM with a handful of rows and a
                # vocabulary-long reduction loses ~1e-3 relative on this kind of CPU (M = 1..11 measured; 12+ is
                # accurate), so a short last tile is padded with zero rows
                mr = max(t1 - t0, min(_MIN_GEMM_ROWS, zbuf.shape[0]))
                if mr > t1 - t0:
                    zbuf[t1 - t0:mr].zero_()
                zg = zbuf[:mr]
                for ws, we, w in _weight_chunks(weight, cd):
                    full = we - ws == V
                    if grad_h is not None:
                        part = torch.mm(zg if full else zg[:, ws:we], w)
                        grad_h[t0:t1] += part[:t1 - t0]
                    if grad_w is not None:
                        grad_w[ws:we].addmm_((z if full else z[:, ws:we]).t(), h_t)
                if grad_b is not None:
                    grad_b += z.sum(0)
        return _grads_out(grad_h, grad_w, grad_b, hidden, weight, bias)


def _grads_out(grad_h, grad_w, grad_b, hidden, weight, bias):
    return (None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None)


def _output_kinds(plan: _Plan) -> list[Stat]:
    """The request each output belongs to, in output order (a pair-valued request appears twice)."""
    return [r for r in plan.requests for _ in range(r.num_outputs)]


# --------------------------------------------------------------------------------------- validation
def _check_weight(weight: torch.Tensor, bias: torch.Tensor | None, hidden_size: int, device: torch.device) -> None:
    check_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden_size or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [V, H] with H = {hidden_size} (the hidden size), "
                         f"got {list(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating tensor, got {weight.dtype}")
    if weight.device != device:
        raise ValueError(f"weight must be on the hidden states' device {device}, got {weight.device}")
    with torch.no_grad():
        step = max(1, _WEIGHT_CHUNK // max(hidden_size, 1))
        for s in range(0, weight.shape[0], step):
            if not bool(torch.isfinite(weight[s:s + step]).all()):
                raise ValueError("weight has non-finite values")
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {list(bias.shape)}")
        if not bias.is_floating_point():
            raise ValueError(f"bias must be a floating tensor, got {bias.dtype}")
        if bias.device != device:
            raise ValueError(f"bias must be on the hidden states' device {device}, got {bias.device}")
        if bool((torch.isnan(bias) | (bias == math.inf)).any()):
            raise ValueError("bias has NaN or +inf values (-inf, a token masked out of the vocabulary, is fine)")


def _check_requests(requests: Iterable[Any]) -> tuple[Stat, ...]:
    out = []
    for r in requests:
        if not isinstance(r, Stat):
            raise ValueError(f"requests must be rlvr_entropy.stats.Stat values, got {type(r).__name__}")
        if r not in out:
            out.append(r)
    return tuple(out)


def _check_temperature(temperature: Any) -> float:
    check_float("temperature", temperature, lo=0.0, lo_open=True)
    if not math.isfinite(float(temperature)):
        raise ValueError(f"temperature must be finite, got {temperature!r}")
    return float(temperature)


def lm_head_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, token_ids: torch.Tensor,
                  requests: Iterable[Stat], *, temperature: float = 1.0, tile_size: int | None = None
                  ) -> dict[Stat, Any]:
    """Every requested statistic of softmax((hidden @ weight^T + bias) / temperature), in one tiled pass.

    hidden [N, H], weight [V, H], bias [V] or None, token_ids [N] (integers in [0, V): the sampled tokens, for
    ``Stat.log_prob()``). Returns {request: tensor [N]} (a pair of [N] tensors for change_terms and
    proxy_log_mass), in float32 (float64 when hidden or weight is float64); the differentiable kinds carry
    gradient to hidden, weight and bias. Each equals its unfused function of :mod:`rlvr_entropy.stats` applied to
    the materialized logits (:func:`rlvr_entropy.stats.compute_stat`). ``tile_size``: positions per logits tile
    (default :func:`default_tile_size`). All N rows are computed: compact padding away first (see
    :class:`LMHeadSource`, which does).
    """
    check_tensor("hidden", hidden)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [N, H], got {list(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating tensor, got {hidden.dtype}")
    check_finite_where("hidden", hidden, None)
    _check_weight(weight, bias, hidden.shape[1], hidden.device)
    return _run(hidden, weight, bias, _check_ids(token_ids, (hidden.shape[0],), weight.shape[0], None),
                _check_requests(requests), _check_temperature(temperature), _check_tile(tile_size, weight.shape[0]))


def _check_tile(tile_size: Any, vocab: int) -> int:
    check_int("tile_size", tile_size, lo=1, allow_none=True)
    return tile_size or default_tile_size(vocab)


def _check_ids(token_ids: Any, shape: tuple[int, ...], vocab: int, mask: torch.Tensor | None) -> torch.Tensor:
    check_tensor("token_ids", token_ids)
    if tuple(token_ids.shape) != tuple(shape):
        raise ValueError(f"token_ids must have shape {list(shape)}, got {list(token_ids.shape)}")
    if token_ids.is_floating_point() or token_ids.dtype == torch.bool or token_ids.is_complex():
        raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    ids = token_ids.long()
    bad = (ids < 0) | (ids >= vocab)
    if mask is not None:
        bad = bad & mask
        ids = torch.where(mask, ids, torch.zeros_like(ids))
    if bool(bad.any()):
        raise ValueError(f"token_ids must be in [0, {vocab}) at valid positions")
    return ids


def _run(hidden, weight, bias, ids, requests, temperature, tile) -> dict[Stat, Any]:
    if not requests:
        return {}
    plan = _Plan(requests, weight.shape[0])
    outs = _LMHeadStats.apply(hidden, weight, bias, ids.to(hidden.device), temperature, plan, tile)
    res: dict[Stat, Any] = {}
    i = 0
    for r in plan.requests:
        res[r] = outs[i] if r.num_outputs == 1 else (outs[i], outs[i + 1])
        i += r.num_outputs
    return res


# ------------------------------------------------------------------------------------------ source
class LMHeadSource:
    """The next-token distribution of a micro-batch as hidden states + LM head, for ``TokenBatch.lm_head``.

    hidden [B, T, H]: the last hidden states at the positions that predict the response tokens (what the LM head
    would turn into the logits of ``TokenBatch.logits``); weight [V, H] and bias [V] (or None): the LM head;
    temperature: the sampling temperature the logits are divided by (fold any logit scale of the model into it);
    token_ids [B, T]: the sampled tokens; mask bool [B, T] (None: all valid): only these positions are computed
    (padding costs nothing, may hold anything, NaN included, and gets zero gradient).

    Statistics are asked for with :meth:`get` (or the shortcuts ``log_prob()``, ``entropy()``, ...) and come back
    as [B, T] tensors, 0 at padding, cached: ``get`` of a statistic already computed returns the same tensor.
    :meth:`prefetch` computes several in ONE tiled pass (one recomputation in backward); an engine prefetches
    ``Stat.log_prob()``, ``Stat.entropy()`` and :func:`requests_for` (method) before building the batch, so the
    method's own requests are served from the cache. A statistic asked for later costs one more pass (counted in
    ``passes``).
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 token_ids: torch.Tensor, temperature: float = 1.0, mask: torch.Tensor | None = None,
                 tile_size: int | None = None) -> None:
        check_tensor("hidden", hidden)
        if hidden.dim() != 3:
            raise ValueError(f"hidden must have shape [B, T, H], got {list(hidden.shape)}")
        if not hidden.is_floating_point():
            raise ValueError(f"hidden must be a floating tensor, got {hidden.dtype}")
        B, T, H = hidden.shape
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=hidden.device)
        else:
            check_tensor("mask", mask)
            if tuple(mask.shape) != (B, T):
                raise ValueError(f"mask must have shape [B, T] = [{B}, {T}] (hidden without H), "
                                 f"got {list(mask.shape)}")
            if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("mask must be boolean or 0/1")
            mask = mask.to(device=hidden.device, dtype=torch.bool)
        check_finite_where("hidden", hidden, mask[..., None].expand(B, T, H))
        _check_weight(weight, bias, H, hidden.device)
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.mask = mask
        self.token_ids = _check_ids(token_ids.to(hidden.device) if isinstance(token_ids, torch.Tensor)
                                    else token_ids, (B, T), weight.shape[0], mask)
        self.temperature = _check_temperature(temperature)
        self.tile_size = _check_tile(tile_size, weight.shape[0])
        self._cache: dict[Stat, Any] = {}
        #: Tiled passes run so far (each has one recomputation in backward).
        self.passes = 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.hidden.shape[:2])  # type: ignore[return-value]

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def prefetch(self, *requests: Stat) -> "LMHeadSource":
        """Compute every request not yet cached, all in one tiled pass; returns self."""
        todo = [r for r in _check_requests(requests) if r not in self._cache]
        if not todo:
            return self
        B, T = self.shape
        m = self.mask
        full = bool(m.all())
        h = self.hidden.reshape(B * T, -1) if full else self.hidden[m]
        ids = self.token_ids.reshape(-1) if full else self.token_ids[m]
        outs = _run(h, self.weight, self.bias, ids, tuple(todo), self.temperature, self.tile_size)
        self.passes += 1

        def expand(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, T) if full else x.new_zeros(B, T).masked_scatter(m, x)

        for r, x in outs.items():
            self._cache[r] = tuple(map(expand, x)) if isinstance(x, tuple) else expand(x)
        return self

    def get(self, request: Stat) -> Any:
        """The statistic ``request`` at every position: [B, T] (a pair for change_terms / proxy_log_mass), 0 at
        padding; computed now (one pass) unless cached."""
        self.prefetch(request)
        return self._cache[request]

    def cached(self) -> tuple[Stat, ...]:
        return tuple(self._cache)

    # shortcuts
    def log_prob(self) -> torch.Tensor:
        return self.get(Stat.log_prob())

    def entropy(self) -> torch.Tensor:
        return self.get(Stat.entropy())

    def top_p_entropy(self, p: float = 0.8, top_k: int | None = None, inclusive: bool = False) -> torch.Tensor:
        return self.get(Stat.top_p_entropy(p, top_k, inclusive))

    def change_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get(Stat.change_terms())

    def proxy_log_mass(self, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get(Stat.proxy_log_mass(kappa))

    def clamped_entropy(self, fraction: float) -> torch.Tensor:
        return self.get(Stat.clamped_entropy(fraction))

    def __repr__(self) -> str:
        B, T = self.shape
        return (f"LMHeadSource(B={B}, T={T}, H={self.hidden.shape[-1]}, V={self.vocab_size}, "
                f"temperature={self.temperature}, cached={[r.kind for r in self._cache]})")


def requests_for(method: Any) -> tuple[Stat, ...]:
    """The statistics ``method`` reads from the distribution (its ``logits_requests()``; () when it has none)."""
    fn = getattr(method, "logits_requests", None)
    return tuple(fn()) if fn is not None else ()


def lm_head_batch_fields(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                         token_ids: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0,
                         requests: Iterable[Stat] = (), method: Any = None,
                         tile_size: int | None = None) -> dict[str, Any]:
    """What an engine puts into a :class:`~rlvr_entropy.core.batch.TokenBatch` instead of logits.

    One tiled pass computes log_prob [B, T], entropy [B, T] (both with gradient, 0 at padding) and every statistic
    in ``requests`` plus those of ``method`` (:func:`requests_for`); returns
    ``{"log_prob": ..., "entropy": ..., "lm_head": LMHeadSource}``, to be splatted into ``TokenBatch(...)`` with
    ``old_log_prob``, ``advantages``, ``mask`` and the rest. Arguments as :class:`LMHeadSource`.
    """
    src = LMHeadSource(hidden, weight, bias, token_ids=token_ids, temperature=temperature, mask=mask,
                       tile_size=tile_size)
    want = (Stat.log_prob(), Stat.entropy(), *tuple(requests), *(requests_for(method) if method is not None else ()))
    src.prefetch(*want)
    return {"log_prob": src.log_prob(), "entropy": src.entropy(), "lm_head": src}
