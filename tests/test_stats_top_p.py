"""stats.top_p_entropy against siren.md section 1, read literally.

The reference below is written from the spec, one position at a time: softmax over the full vocabulary, a stable
descending sort (ties by vocabulary index), the top K, C_j = cumulative sum, m = #{j : C_j < p} (plus the crossing
token when inclusive), q = pi_S / (sum pi_S + 1e-12), H = -sum q log(q + 1e-12), and 0 for an empty or one-token
set. Gradients come from autograd through that loop. The fast nucleus search itself (its stages) is covered by
tests/test_stats_fastpath.py; this file covers the edge cases of the spec.
"""
from __future__ import annotations

import math

import pytest
import torch

from rlvr_entropy import stats


# ----------------------------------------------------------------------------------- reference from the spec
def ref_top_p_entropy_row(z: torch.Tensor, p: float, K: int | None, inclusive: bool) -> torch.Tensor:
    """z [V] (float64 for gradients) -> 0-dim H_p, differentiable."""
    pi = torch.softmax(z, -1)
    vals, _ = torch.sort(pi, descending=True, stable=True)
    vals = vals[: min(K or z.numel(), z.numel())]
    c = torch.cumsum(vals, 0)
    m = int((c < p).sum())
    if inclusive and m < vals.numel():
        m += 1
    if m <= 1:
        return z.sum() * 0
    kept = vals[:m]
    q = kept / (kept.sum() + 1e-12)
    return -(q * torch.log(q + 1e-12)).sum()


def ref_top_p_entropy(z: torch.Tensor, p: float, K: int | None, inclusive: bool) -> torch.Tensor:
    """z [N, V] -> [N], one row at a time."""
    return torch.stack([ref_top_p_entropy_row(r, p, K, inclusive) for r in z])


def ref_nucleus_size(z: torch.Tensor, p: float, K: int | None, inclusive: bool) -> int:
    vals = torch.sort(torch.softmax(z.double(), -1), descending=True, stable=True).values[: min(K or z.numel(),
                                                                                               z.numel())]
    m = int((torch.cumsum(vals, 0) < p).sum())
    return m + 1 if inclusive and m < vals.numel() else m


def H(*weights: float) -> float:
    """Entropy of the normalized weights (hand values in the tests)."""
    s = sum(weights)
    return -sum(w / s * math.log(w / s) for w in weights)


def logits_of(*probs: float) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


# --------------------------------------------------------------------------------------- hand-derived edge cases
@pytest.mark.parametrize("probs,p,inclusive,expected", [
    # top-1 >= p: C_1 = 0.9 >= 0.8, empty nucleus -> 0 (inclusive: one token -> 0)
    ((0.9, 0.05, 0.05), 0.8, False, 0.0),
    ((0.9, 0.05, 0.05), 0.8, True, 0.0),
    # exactly one token below p: C = 0.5, 0.7 -> m = 1 -> 0; inclusive adds the crossing 0.2: H(0.5, 0.2) = 0.598270
    ((0.5, 0.2, 0.2, 0.1), 0.6, False, 0.0),
    ((0.5, 0.2, 0.2, 0.1), 0.6, True, 0.598270),
    # C = 0.4, 0.7, 0.9 with p = 0.8: keep {0.4, 0.3}: H(4/7, 3/7) = 0.682908; inclusive adds 0.2: H(.4,.3,.2)
    ((0.4, 0.3, 0.2, 0.1), 0.8, False, 0.682908),
    ((0.4, 0.3, 0.2, 0.1), 0.8, True, H(0.4, 0.3, 0.2)),
    # uniform 0.25 with p = 0.99: C = 0.25, 0.5, 0.75 < 0.99 -> ln 3 = 1.098612; inclusive: all 4 -> ln 4
    ((0.25, 0.25, 0.25, 0.25), 0.99, False, 1.098612),
    ((0.25, 0.25, 0.25, 0.25), 0.99, True, math.log(4)),
    # a single-token vocabulary: top-1 = 1 >= p -> 0
    ((1.0,), 0.8, False, 0.0),
    ((1.0,), 0.8, True, 0.0),
])
def test_hand_cases(probs, p, inclusive, expected):
    z = logits_of(*probs)
    assert stats.top_p_entropy(z, p=p, inclusive=inclusive).item() == pytest.approx(expected, abs=1e-6)
    assert stats.top_p_entropy(z, p=p, inclusive=inclusive).item() == pytest.approx(
        float(ref_top_p_entropy_row(z, p, None, inclusive)), abs=1e-9)


def test_cumulative_sum_exactly_p_is_excluded():
    # 0.5, 0.25, 0.25 are exact in binary: C = 0.5, 0.75, 1.0. With p = 0.75, C_2 == p: exclusive keeps one token
    # (H = 0), inclusive keeps {0.5, 0.25}: H(2/3, 1/3) = 0.636514. With p = 0.5, C_1 == p: nothing / one token.
    z = logits_of(0.5, 0.25, 0.25)
    assert float(torch.softmax(z, -1).cumsum(0)[1]) == 0.75  # the premise of the case
    assert stats.top_p_entropy(z, p=0.75).item() == 0.0
    assert stats.top_p_entropy(z, p=0.75, inclusive=True).item() == pytest.approx(0.636514, abs=1e-6)
    assert int(stats.nucleus_size(z, p=0.75)) == 1 and int(stats.nucleus_size(z, p=0.75, inclusive=True)) == 2
    assert int(stats.nucleus_size(z, p=0.5)) == 0 and int(stats.nucleus_size(z, p=0.5, inclusive=True)) == 1
    assert stats.top_p_entropy(z, p=0.5, inclusive=True).item() == 0.0


def test_never_reaching_p_within_k_keeps_all_k():
    z = torch.zeros(10, dtype=torch.float64)  # uniform 0.1: with top_k = 4, C_4 = 0.4 < 0.8 -> all 4 kept, ln 4
    assert stats.top_p_entropy(z, p=0.8, top_k=4).item() == pytest.approx(math.log(4), abs=1e-12)
    assert stats.top_p_entropy(z, p=0.8, top_k=4, inclusive=True).item() == pytest.approx(math.log(4), abs=1e-12)
    assert int(stats.nucleus_size(z, p=0.8, top_k=4, inclusive=True)) == 4  # no crossing token to add
    # non-uniform: 0.4, 0.3, 0.2, 0.1 with top_k = 2: C_2 = 0.7 < 0.8 -> {0.4, 0.3}: H(4/7, 3/7) = 0.682908
    z = logits_of(0.1, 0.4, 0.2, 0.3)
    assert stats.top_p_entropy(z, p=0.8, top_k=2).item() == pytest.approx(0.682908, abs=1e-6)


def test_top_k_is_clamped_to_vocabulary():
    # p = 0.75 on uniform 0.1 x 10: C = 0.1 .. 0.7 < 0.75 -> 7 kept -> ln 7, for any top_k >= 8
    z = torch.zeros(10, dtype=torch.float64)
    for k in (8, 10, 11, 10_000, None):
        assert stats.top_p_entropy(z, p=0.75, top_k=k).item() == pytest.approx(math.log(7), abs=1e-12)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 9, generator=g, dtype=torch.float64) * 2
    a = stats.top_p_entropy(z, p=0.9, top_k=9)
    for k in (10, 10_000, None):
        assert torch.equal(stats.top_p_entropy(z, p=0.9, top_k=k), a)


def test_ties_at_the_nucleus_boundary():
    # probs 0.4, 0.2, 0.2, 0.2 and p = 0.7: C = 0.4, 0.6, 0.8 -> m = 2: 0.4 and ONE of the three tied 0.2s.
    # Value: H(2/3, 1/3) = 0.636514 whichever is kept. Gradient -q (log q + H) on the kept pair:
    # dz_0 = -(2/3)(ln(2/3) + 0.636514) = -0.154033, the kept 0.2: +0.154033, the other tied ones 0.
    # Tie rule (documented): the lowest vocabulary index, the same as a stable descending sort.
    for probs, kept_tie in (((0.4, 0.2, 0.2, 0.2), 1), ((0.2, 0.2, 0.4, 0.2), 0), ((0.2, 0.2, 0.2, 0.4), 0)):
        z = logits_of(*probs).requires_grad_(True)
        h = stats.top_p_entropy(z, p=0.7)
        assert h.item() == pytest.approx(0.636514, abs=1e-6)
        (g,) = torch.autograd.grad(h, z)
        top = probs.index(0.4)
        assert g[top].item() == pytest.approx(-0.154033, abs=1e-6)
        assert g[kept_tie].item() == pytest.approx(0.154033, abs=1e-6)
        others = [i for i in range(4) if i not in (top, kept_tie)]
        assert g[others].abs().max().item() == 0.0
        z2 = z.detach().clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(ref_top_p_entropy_row(z2, 0.7, None, False), z2)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_empty_or_one_token_nucleus_has_zero_gradient():
    z = torch.stack([logits_of(0.9, 0.05, 0.05), logits_of(0.5, 0.3, 0.2)]).requires_grad_(True)  # m = 0, m = 1
    h = stats.top_p_entropy(z, p=0.6)
    (g,) = torch.autograd.grad(h.sum(), z)
    assert h.tolist() == [0.0, 0.0]
    assert torch.equal(g, torch.zeros_like(g))


def test_masked_out_vocabulary_entries():
    # -inf logits have probability 0: 0.5, 0.3, 0.2, 0, 0 with p = 0.9 -> C = 0.5, 0.8, 1.0 -> {0.5, 0.3}
    z = torch.tensor([math.log(0.5), -math.inf, math.log(0.3), math.log(0.2), -math.inf], dtype=torch.float64)
    assert stats.top_p_entropy(z, p=0.9).item() == pytest.approx(H(0.5, 0.3), abs=1e-12)
    # three finite entries (1/3 each) and top_k = 2: C = 1/3, 2/3 < 0.8 -> both kept -> ln 2; -inf entries get
    # no gradient and no NaN
    z2 = torch.tensor([0.0, -math.inf, 0.0, 0.0, -math.inf], dtype=torch.float64).requires_grad_(True)
    h = stats.top_p_entropy(z2, p=0.8, top_k=2)
    (g,) = torch.autograd.grad(h, z2)
    assert h.item() == pytest.approx(math.log(2), abs=1e-12)
    assert g[[1, 4]].abs().max().item() == 0.0
    assert torch.isfinite(g).all()


# -------------------------------------------------------------------------------------------- parity, random
@pytest.mark.parametrize("p,K,inclusive,scale", [
    (0.8, 10_000, False, 2.0),   # SIREN's defaults
    (0.8, 10_000, True, 2.0),
    (0.5, 5, False, 1.0),        # top_k binds for flat rows
    (0.95, 17, True, 0.5),       # near-uniform rows, K = V
    (0.3, None, False, 4.0),     # peaked rows: many empty nuclei
    (0.99, 3, True, 3.0),
])
def test_values_and_gradients_match_reference(p, K, inclusive, scale):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(40, 17, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    w = torch.randn(40, generator=g, dtype=torch.float64)
    ours = stats.top_p_entropy(z, p=p, top_k=K, inclusive=inclusive, chunk_size=7)
    ref = ref_top_p_entropy(z, p, K, inclusive)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    g1 = torch.autograd.grad((ours * w).sum(), z)[0]
    g2 = torch.autograd.grad((ref * w).sum(), z)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9)
    sizes = stats.nucleus_size(z.detach(), p=p, top_k=K, inclusive=inclusive)
    assert sizes.tolist() == [ref_nucleus_size(r, p, K, inclusive) for r in z.detach()]


def test_inclusive_adds_exactly_the_crossing_token():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(200, 30, generator=g, dtype=torch.float64) * 2
    for K in (30, 6):
        exc = stats.nucleus_size(z, p=0.8, top_k=K)
        inc = stats.nucleus_size(z, p=0.8, top_k=K, inclusive=True)
        assert torch.equal(inc, torch.where(exc < K, exc + 1, exc))
        assert bool((exc == K).any()) == (K == 6)  # K = 6 has rows that never reach p
    # inclusive is the textbook nucleus: its mass is >= p unless capped by K
    vals = torch.sort(torch.softmax(z, -1), descending=True).values
    inc = stats.nucleus_size(z, p=0.8, inclusive=True)
    mass = torch.stack([vals[i, : int(inc[i])].sum() for i in range(200)])
    assert bool((mass >= 0.8).all())


def test_chunk_size_does_not_change_results():
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(3, 11, 23, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    mask = torch.rand(3, 11, generator=g) > 0.3
    w = torch.randn(3, 11, generator=g, dtype=torch.float64)
    base = None
    for chunk in (None, 1, 2, 5, 33, 1000):
        h = stats.top_p_entropy(z, p=0.8, top_k=10, mask=mask, chunk_size=chunk)
        (gr,) = torch.autograd.grad((h * w).sum(), z)
        if base is None:
            base = (h.detach(), gr)
            continue
        torch.testing.assert_close(h.detach(), base[0], rtol=0, atol=1e-13)
        torch.testing.assert_close(gr, base[1], rtol=0, atol=1e-13)


def test_leading_dims_and_mask_with_nan_rows():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 5, 13, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    zn = z.clone()
    zn[~mask] = float("nan")
    zn[0, 3, 2] = float("inf")
    x = zn.clone().requires_grad_(True)
    h = stats.top_p_entropy(x, p=0.8, mask=mask)
    assert h.shape == (3, 5)
    assert torch.isfinite(h).all()  # masked rows hold the value of all-zero logits, not NaN
    (gr,) = torch.autograd.grad(torch.where(mask, h, 0.0).sum(), x)
    assert torch.isfinite(gr).all()
    assert torch.equal(gr[~mask], torch.zeros_like(gr[~mask]))
    x2 = z.clone().requires_grad_(True)
    ref = ref_top_p_entropy(x2[mask], 0.8, None, False)
    torch.testing.assert_close(h[mask], ref, rtol=1e-9, atol=1e-9)
    (g_ref,) = torch.autograd.grad(ref.sum(), x2)
    torch.testing.assert_close(gr[mask], g_ref[mask], rtol=1e-7, atol=1e-9)
    # masking must not change the valid rows' values
    torch.testing.assert_close(h[mask], stats.top_p_entropy(z, p=0.8)[mask], rtol=0, atol=0)


def test_all_masked_gives_zero_gradient():
    z = torch.full((2, 4, 9), float("nan"), dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    h = stats.top_p_entropy(z, mask=mask)
    (gr,) = torch.autograd.grad(torch.where(mask, h, 0.0).sum(), z)
    assert torch.equal(gr, torch.zeros_like(gr))


def test_bf16_and_float32_logits():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(16, 50, generator=g) * 3
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        x = base.to(dtype).requires_grad_(True)
        h = stats.top_p_entropy(x)
        assert h.dtype == torch.float32
        x64 = x.detach().double().requires_grad_(True)  # the same (rounded) logits, exact arithmetic
        ref = ref_top_p_entropy(x64, 0.8, 10_000, False)
        torch.testing.assert_close(h.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        (gr,) = torch.autograd.grad(h.sum(), x)
        (g_ref,) = torch.autograd.grad(ref.sum(), x64)
        assert gr.dtype == dtype
        torch.testing.assert_close(gr.double(), g_ref, rtol=tol, atol=tol)


def test_validation():
    with pytest.raises(ValueError, match="p must"):
        stats.top_p_entropy(torch.zeros(3), p=0.0)
    with pytest.raises(ValueError, match="p must"):
        stats.top_p_entropy(torch.zeros(3), p=1.2)
    with pytest.raises(ValueError, match="top_k"):
        stats.top_p_entropy(torch.zeros(3), top_k=0)
    with pytest.raises(ValueError, match="chunk_size"):
        stats.top_p_entropy(torch.zeros(3), chunk_size=0)
    with pytest.raises(ValueError, match="logits"):
        stats.top_p_entropy(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        stats.top_p_entropy(torch.zeros(2, 3, 4), mask=torch.ones(2, 2, dtype=torch.bool))
