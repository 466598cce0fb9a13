"""Exactness of the fast nucleus search in stats.top_p_entropy / stats.nucleus_size.

The fast path (exact top-64 from group maxima, sampled candidate threshold + compaction, top-K selection without
a sort for flat rows, exact top-K fallback) must give the same nucleus as the straightforward definition: sort
the logits descending (ties by vocabulary index), C_j = cumulative sum of the torch.softmax probabilities of the
top K in that order, keep the first #{j : C_j < p} (exclusive) or that plus the crossing token (inclusive), all K
when C never reaches p. The reference below does exactly that with a full stable sort, and the entropy and its
gradient are recomputed in float64 from the reference's kept set.
"""
from __future__ import annotations

import math

import pytest
import torch

from rlvr_entropy import stats


# ------------------------------------------------------------------------------------------------ reference
def ref_nucleus(z: torch.Tensor, p: float, K: int, inclusive: bool):
    """z [N, V] float32 -> (m [N], kept bool [N, V]) by a full stable sort."""
    N, V = z.shape
    sv, si = torch.sort(z, stable=True, dim=-1, descending=True)
    sv, si = sv[:, :K], si[:, :K]
    cum = torch.cumsum(torch.softmax(z, -1).gather(1, si), -1)
    below = (cum < p).sum(-1)
    if inclusive:
        m = torch.where(below < K, below + 1, below)
    else:
        m = below
    kept = torch.zeros(N, V, dtype=torch.bool)
    for i in range(N):
        kept[i, si[i, : int(m[i])]] = True
    return m, kept


def ref_entropy(z64: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax over the kept logits, float64, differentiable; 0 for <= 1 kept token."""
    big_neg = torch.tensor(-1e300, dtype=torch.float64)
    zk = torch.where(kept & torch.isfinite(z64), z64, big_neg)
    logq = zk - torch.logsumexp(zk, -1, keepdim=True)
    q = logq.exp()
    h = -torch.where(kept, q * logq, torch.zeros((), dtype=torch.float64)).sum(-1)
    return torch.where(kept.sum(-1) > 1, h, torch.zeros_like(h))


def check_against_reference(z, p, K, inclusive, chunk_size=None):
    """Assert nucleus size, value and gradient (including its exact zero pattern) equal the reference."""
    V = z.shape[-1]
    m_ref, kept = ref_nucleus(z, p, min(K or V, V), inclusive)
    m = stats.nucleus_size(z, p, K, inclusive, chunk_size=chunk_size)
    assert torch.equal(m, m_ref), (m.tolist(), m_ref.tolist())

    w = torch.randn(z.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = z.clone().requires_grad_(True)
    h = stats.top_p_entropy(x, p, K, inclusive, chunk_size=chunk_size)
    (h.double() * w).sum().backward()
    x64 = z.double().clone().requires_grad_(True)
    h_ref = ref_entropy(x64, kept)
    (h_ref * w).sum().backward()
    torch.testing.assert_close(h.double(), h_ref.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-3, atol=1e-5)  # float32 at |z| ~ 1000
    # the gradient lives exactly on the kept tokens: zero outside, nonzero inside wherever the reference's is not
    # tiny (q (log q + H) can round to zero for a kept token whose log q is within an ulp of -H)
    nz = x.grad != 0
    assert not (nz & ~kept).any()
    assert not (kept & (x64.grad.abs() > 1e-9) & ~nz).any()


# ------------------------------------------------------------------------------------------------ row kinds
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def row_kinds(V: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    rank = torch.empty(V)
    rank[torch.randperm(V, generator=g)] = torch.arange(1, V + 1, dtype=torch.float32)
    rows = {
        "flat": torch.randn(V, generator=g),                      # nucleus never reached within K
        "very_flat": 0.3 * torch.randn(V, generator=g),
        "mid": 2.5 * torch.randn(V, generator=g),                 # nucleus of hundreds to thousands
        "gauss4": 4.0 * torch.randn(V, generator=g),
        "peaked": 8.0 * torch.randn(V, generator=g),              # nucleus of a few tokens
        "zipf": -1.3 * rank.log() + 0.2 * torch.randn(V, generator=g),
        "spike": torch.randn(V, generator=g) + torch.where(torch.arange(V) == V // 3, 14.0, 0.0),  # top-1 >= p
        "ties": (3.0 * torch.randn(V, generator=g)).round(),      # many ties at the boundary
        "ties_flat": (torch.randn(V, generator=g) * 2).round() / 2,
        "uniform": torch.zeros(V),
        "shifted": 1000.0 + 2.0 * torch.randn(V, generator=g),    # large offset
        # the strided sample sees only the large values: it overestimates the mass and misplaces the threshold
        "sample_trap": torch.where(torch.arange(V) % stats._STRIDE == 0, 2.0, 0.0) + 0.01 * torch.randn(V, generator=g),
        # only a few hundred finite logits (a top-k filtered distribution)
        "few_finite": torch.where(torch.rand(V, generator=g) < 0.02, torch.randn(V, generator=g),
                                  torch.tensor(-math.inf)),
    }
    return rows


def mixed_batch(V: int, seed: int = 0, copies: int = 2) -> torch.Tensor:
    rows = list(row_kinds(V, seed).values())
    z = torch.stack(rows * copies)
    return z[torch.randperm(z.shape[0], generator=_gen(seed + 7))]


class StageSpy:
    """Counts rows through each stage of stats._nucleus_block (wrapping its helpers)."""

    def __init__(self, monkeypatch, V):
        self.V = V
        self.counts = {"stage1": 0, "candidates": 0, "flat": 0, "sorted": 0, "fallback": 0}
        decide, cand, flat = stats._decide, stats._candidates, stats._flat_top_k

        def spy_decide(sv, avail, lse, p, K, inclusive, closed):
            # stage 1: top-min(K, _K0) (not closed); stage 2: sorted candidates (closed, only run when K < V);
            # stage 3: exact top-K of the full row (width K; closed only when K == V)
            if K <= stats._K0 or (not closed and sv.shape[1] < K):
                key = "stage1"
            elif closed and K < self.V:
                key = "sorted"
            else:
                key = "fallback"
            self.counts[key] += sv.shape[0]
            return decide(sv, avail, lse, p, K, inclusive, closed)

        def spy_cand(b, *a):
            self.counts["candidates"] += b.shape[0]
            return cand(b, *a)

        def spy_flat(*a):
            out = flat(*a)
            self.counts["flat"] += int(out[0].sum())
            return out

        monkeypatch.setattr(stats, "_decide", spy_decide)
        monkeypatch.setattr(stats, "_candidates", spy_cand)
        monkeypatch.setattr(stats, "_flat_top_k", spy_flat)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("inclusive", [False, True])
@pytest.mark.parametrize("K", [1, 7, 64, 300, 1500, None])
def test_matches_sort_reference_default_constants(K, inclusive):
    z = mixed_batch(20000, seed=K or 0)
    for p in (0.8, 0.4, 0.97):
        check_against_reference(z, p, K, inclusive, chunk_size=5)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunk_boundaries_do_not_matter(chunk_size):
    z = mixed_batch(8000, seed=3, copies=3)
    check_against_reference(z, 0.8, 500, False, chunk_size=chunk_size)
    check_against_reference(z, 0.8, 500, True, chunk_size=chunk_size)


@pytest.mark.parametrize("inclusive", [False, True])
def test_every_stage_is_exercised_and_exact(monkeypatch, inclusive):
    """Small constants so every stage runs on a small vocabulary; the result must not depend on them."""
    monkeypatch.setattr(stats, "_K0", 8)
    monkeypatch.setattr(stats, "_GROUP", 8)
    monkeypatch.setattr(stats, "_STRIDE", 4)
    V = 3000
    spy = StageSpy(monkeypatch, V)
    z = mixed_batch(V, seed=11, copies=3)
    for K in (5, 40, 150, 400, None):
        for p in (0.8, 0.5, 0.95):
            check_against_reference(z, p, K, inclusive, chunk_size=4)
    c = spy.counts
    assert c["stage1"] > 0 and c["candidates"] > 0 and c["flat"] > 0 and c["sorted"] > 0 and c["fallback"] > 0, c


def test_flat_rows_skip_the_sort(monkeypatch):
    """Random-normal rows at the benchmark's p and top_k: C never reaches p within top_k, all top_k are kept by the
    selection path (no sort, no full-row top-k)."""
    spy = StageSpy(monkeypatch, 151936)
    z = torch.randn(6, 151936, generator=_gen(5))
    check_against_reference(z, 0.8, 10000, False, chunk_size=4)
    # two forward passes (nucleus_size, top_p_entropy) of 6 rows
    assert spy.counts["flat"] == 12 and spy.counts["fallback"] == 0 and spy.counts["sorted"] == 0, spy.counts


def test_peaked_rows_need_only_stage_one(monkeypatch):
    spy = StageSpy(monkeypatch, 151936)
    z = 8.0 * torch.randn(6, 151936, generator=_gen(6))
    check_against_reference(z, 0.8, 10000, False)
    assert spy.counts["stage1"] == 12 and spy.counts["candidates"] == 0, spy.counts


def test_sample_trap_falls_back_and_stays_exact(monkeypatch):
    V = 40000
    spy = StageSpy(monkeypatch, V)
    g = _gen(8)
    z = torch.where(torch.arange(V) % stats._STRIDE == 0, 2.0, 0.0) + 0.01 * torch.randn(4, V, generator=g)
    check_against_reference(z, 0.8, 2000, False)
    check_against_reference(z, 0.9, None, True)
    assert spy.counts["candidates"] > 0


def test_ties_straddling_the_boundary_are_broken_by_index():
    # 30 equal logits at the top with 1/40 of the mass each: the nucleus of 0.8 ends inside the tie block
    V = 20000
    z = torch.full((2, V), -30.0)
    z[0, torch.arange(0, 30 * 97, 97)] = 0.0
    z[1, torch.randperm(V, generator=_gen(9))[:30]] = 0.0
    z[:, 5] = -1.0  # some mass outside the ties
    for inclusive in (False, True):
        check_against_reference(z, 0.5, None, inclusive)
        check_against_reference(z, 0.5, 12, inclusive)


def test_masked_rows_and_nan_padding():
    V = 5000
    z = mixed_batch(V, seed=2)
    mask = torch.rand(z.shape[0], generator=_gen(3)) < 0.6
    zn = torch.where(mask[:, None], z, torch.tensor(math.nan))
    x = zn.clone().requires_grad_(True)
    h = stats.top_p_entropy(x, 0.8, 400, mask=mask, chunk_size=3)
    h.sum().backward()
    h_valid = stats.top_p_entropy(z[mask], 0.8, 400)
    torch.testing.assert_close(h[mask], h_valid, rtol=1e-6, atol=1e-6)  # row grouping changes summation order
    h_zero = stats.top_p_entropy(torch.zeros(1, V), 0.8, 400)
    assert torch.equal(h[~mask], h_zero.expand(int((~mask).sum())))
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    m = stats.nucleus_size(zn, 0.8, 400, mask=mask)
    assert torch.equal(m[mask], stats.nucleus_size(z[mask], 0.8, 400))


def test_non_finite_valid_row_gives_nan_without_touching_neighbours():
    z = mixed_batch(3000, seed=4)
    bad = z.clone()
    bad[2, 10] = math.nan
    bad[5, 0] = math.inf
    bad[7] = -math.inf
    x = bad.clone().requires_grad_(True)
    h = stats.top_p_entropy(x, 0.8, 100, chunk_size=4)
    h.sum().backward()
    good = torch.ones(z.shape[0], dtype=torch.bool)
    good[[2, 5, 7]] = False
    assert torch.isnan(h[~good]).all()
    torch.testing.assert_close(h[good], stats.top_p_entropy(z[good], 0.8, 100), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(x.grad[good]).all()


def test_float64_and_bfloat16():
    z = mixed_batch(4000, seed=12)
    z64 = z.double()
    m64 = stats.nucleus_size(z64, 0.8, 300)
    si = torch.sort(z64, dim=-1, descending=True).indices[:, :300]
    assert torch.equal(m64, (torch.cumsum(torch.softmax(z64, -1).gather(1, si), -1) < 0.8).sum(-1))
    zb = z.to(torch.bfloat16)
    x = zb.clone().requires_grad_(True)
    h = stats.top_p_entropy(x, 0.8, 300)
    h.sum().backward()
    assert h.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h, stats.top_p_entropy(zb.float(), 0.8, 300), rtol=0, atol=0)


def official_cutoff(z: torch.Tensor, p: float, k: int) -> torch.Tensor:
    """The official SIREN cutoff (verl dp_actor): softmax probabilities gathered at topk(logits) indices, their
    cumsum, searchsorted(p) -> #{j : C_j < p}."""
    probs = torch.softmax(z, -1)
    cum = torch.cumsum(probs.gather(1, torch.topk(z, k).indices), -1)
    return torch.searchsorted(cum, torch.full_like(cum, p)).amax(-1)


def test_exclusive_nucleus_equals_the_official_cutoff_bit_for_bit():
    z = mixed_batch(6000, seed=21)
    z = z[torch.isfinite(z).all(-1)]  # the official code has no -inf handling to compare with
    for p, k in ((0.8, 1000), (0.5, 64), (0.95, 3000), (0.8, 6000)):
        assert torch.equal(stats.nucleus_size(z, p, k), official_cutoff(z, p, k))
    # C_j exactly equal to p in float32: 5 equal logits give probabilities 0.2f, C_2 = 0.4f = float32(0.4),
    # so the second token crosses and is excluded (m = 1), included when inclusive (m = 2)
    u = torch.zeros(1, 5)
    assert stats.nucleus_size(u, 0.4, None).item() == official_cutoff(u, 0.4, 5).item() == 1
    assert stats.nucleus_size(u, 0.4, None, inclusive=True).item() == 2
    # probabilities (0.5, 0.3, 0.2): whatever float32 makes of C_2 vs 0.8, the official code decides the same
    h = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert stats.nucleus_size(h, 0.8, None).item() == official_cutoff(h, 0.8, 3).item()
