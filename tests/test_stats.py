"""stats.entropy and stats.predicted_entropy_change: hand cases, an independent float64 reference, gradcheck,
chunk-size invariance, mask handling and argument validation. (top_p_entropy / nucleus_size are covered by
tests/test_stats_top_p.py and, for the fast nucleus search, tests/test_stats_fastpath.py.)"""
from __future__ import annotations

import math

import pytest
import torch

from rlvr_entropy import stats


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def ref_entropy(z: torch.Tensor) -> torch.Tensor:
    """H = -sum p log p in float64 by plain loops over positions (0 log 0 = 0)."""
    flat = z.double().reshape(-1, z.shape[-1])
    out = []
    for row in flat:
        p = torch.softmax(row, -1)
        out.append(-sum(float(pi) * math.log(float(pi)) for pi in p if pi > 0))
    return torch.tensor(out, dtype=torch.float64).reshape(z.shape[:-1])


# ------------------------------------------------------------------------------------------------ entropy
def test_entropy_hand_cases():
    z = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],                         # uniform over 4: log 4 = 1.386294
        [0.0, math.log(3.0), -math.inf, -math.inf],   # p = (1/4, 3/4): 0.25 ln 4 + 0.75 ln(4/3) = 0.562335
        [5.0, -math.inf, -math.inf, -math.inf],       # one token: 0
        [0.0, 0.0, -math.log(2.0), -math.inf],        # p = (.4, .4, .2): -(2 * .4 ln .4 + .2 ln .2) = 1.054920
    ])
    h = stats.entropy(z)
    expect = torch.tensor([math.log(4), 0.25 * math.log(4) + 0.75 * math.log(4 / 3), 0.0,
                           -(0.8 * math.log(0.4) + 0.2 * math.log(0.2))])
    torch.testing.assert_close(h, expect, rtol=0, atol=2e-6)
    # a common offset changes nothing (float64: 1000 + z is exact enough to show it)
    z64 = z.double()
    torch.testing.assert_close(stats.entropy(z64 + 1000.0), stats.entropy(z64), rtol=0, atol=1e-10)


def test_entropy_matches_reference_across_shapes_scales_and_offsets():
    g = _gen(0)
    for shape, scale, offset in [((3, 5, 17), 1.0, 0.0), ((40, 300), 6.0, 0.0), ((2, 2, 1000), 0.2, 30.0),
                                 ((7, 64), 3.0, -500.0), ((1, 1), 1.0, 0.0)]:
        z = torch.randn(*shape, generator=g) * scale + offset
        torch.testing.assert_close(stats.entropy(z).double(), ref_entropy(z), rtol=1e-5, atol=1e-5)
        z64 = z.double()
        torch.testing.assert_close(stats.entropy(z64), ref_entropy(z64), rtol=1e-12, atol=1e-12)


def test_entropy_gradient_matches_autograd_of_the_plain_formula():
    g = _gen(1)
    z = torch.randn(6, 9, 50, generator=g, dtype=torch.float64) * 3
    z[0, 0, :10] = -math.inf  # masked-out vocabulary entries: zero gradient there, finite elsewhere
    w = torch.randn(6, 9, generator=g, dtype=torch.float64)
    x = z.clone().requires_grad_(True)
    (stats.entropy(x, chunk_size=4) * w).sum().backward()
    y = z.clone().requires_grad_(True)
    lp = torch.log_softmax(y, -1)
    h = -(lp.exp() * torch.where(lp > -math.inf, lp, torch.zeros((), dtype=torch.float64))).sum(-1)
    (h * w).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    assert (x.grad[0, 0, :10] == 0).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_entropy_gradcheck(chunk_size):
    z = (torch.randn(5, 11, generator=_gen(2), dtype=torch.float64) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: stats.entropy(x, chunk_size=chunk_size), (z,))
    mask = torch.tensor([True, False, True, True, False])
    assert torch.autograd.gradcheck(lambda x: stats.entropy(x, mask=mask, chunk_size=chunk_size), (z,))


def test_entropy_chunk_size_invariance():
    z = torch.randn(37, 211, generator=_gen(3)) * 4
    ref = stats.entropy(z, chunk_size=1000)
    for c in (1, 2, 5, 36, 37):
        torch.testing.assert_close(stats.entropy(z, chunk_size=c), ref, rtol=1e-6, atol=1e-6)
    x1 = z.clone().requires_grad_(True)
    x2 = z.clone().requires_grad_(True)
    stats.entropy(x1, chunk_size=4).sum().backward()
    stats.entropy(x2, chunk_size=1000).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)


def test_entropy_mask_nan_padding_and_zero_gradient():
    g = _gen(4)
    z = torch.randn(4, 6, 30, generator=g) * 2
    mask = torch.rand(4, 6, generator=g) < 0.6
    mask[0] = False  # an all-masked row of positions
    zn = torch.where(mask[..., None], z, torch.tensor(math.nan))
    x = zn.clone().requires_grad_(True)
    h = stats.entropy(x, mask=mask)
    (h * torch.randn(4, 6, generator=g)).sum().backward()
    torch.testing.assert_close(h[mask], stats.entropy(z)[mask], rtol=1e-6, atol=1e-6)
    # masked positions are treated as all-zero logits (uniform: log V) and get exactly zero gradient
    torch.testing.assert_close(h[~mask], torch.full_like(h[~mask], math.log(30)), rtol=0, atol=1e-6)
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    # all positions masked: still finite, zero gradient
    x2 = zn.clone().requires_grad_(True)
    stats.entropy(x2, mask=torch.zeros(4, 6, dtype=torch.bool)).sum().backward()
    assert (x2.grad == 0).all()


def test_entropy_non_finite_valid_position_gives_nan_only_there():
    z = torch.randn(3, 8, generator=_gen(5))
    z[1, 2] = math.nan
    h = stats.entropy(z)
    assert torch.isnan(h[1]) and torch.isfinite(h[[0, 2]]).all()
    z[1] = -math.inf  # all -inf: no distribution
    assert torch.isnan(stats.entropy(z)[1])


def test_entropy_dtypes():
    z = torch.randn(4, 50, generator=_gen(6)) * 3
    zb = z.to(torch.bfloat16).requires_grad_(True)
    h = stats.entropy(zb)
    h.sum().backward()
    assert h.dtype == torch.float32 and zb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h.double(), ref_entropy(zb.detach().float()), rtol=1e-5, atol=1e-5)
    assert stats.entropy(z.double()).dtype == torch.float64


def test_entropy_validation_errors_name_the_argument():
    with pytest.raises(ValueError, match="logits"):
        stats.entropy([[0.0, 1.0]])
    with pytest.raises(ValueError, match="logits"):
        stats.entropy(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        stats.entropy(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="mask"):
        stats.entropy(torch.zeros(3, 4), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        stats.entropy(torch.zeros(3, 4), chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        stats.entropy(torch.zeros(3, 4), chunk_size=2.0)


# --------------------------------------------------------------------------------- predicted_entropy_change
def ref_change(z, a, c, form):
    """Per position, float64 loops: the formulas of steer.md written out term by term."""
    out = []
    for zi, ai, ci in zip(z.double().reshape(-1, z.shape[-1]), a.reshape(-1), c.double().reshape(-1)):
        p = torch.softmax(zi, -1).tolist()
        H = -sum(pk * math.log(pk) for pk in p if pk > 0)
        pa = p[int(ai)]
        if form == "exact":
            second = sum(pk * pk * (math.log(pk) + H) for pk in p if pk > 0)
            out.append(-float(ci) * (pa * (math.log(pa) + H) - second))
        else:
            out.append(-float(ci) * (1 - pa) ** 2 * (math.log(pa) + H))
    return torch.tensor(out, dtype=torch.float64).reshape(a.shape)


def test_predicted_change_hand_case():
    # p = (1/4, 3/4), H = 0.562335; a = 1: log p_a + H = -0.287682 + 0.562335 = 0.274653
    # exact: -[0.75 * 0.274653 - (1/16 * (-1.386294 + 0.562335) + 9/16 * 0.274653)] = -(0.205990 - 0.102997)
    #      = -0.102995 ; steer: -(1/4)^2 * 0.274653 = -0.017166
    z = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    a = torch.tensor([1])
    c = torch.tensor([1.0], dtype=torch.float64)
    H = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    t = math.log(0.75) + H
    exact = -(0.75 * t - (0.0625 * (math.log(0.25) + H) + 0.5625 * t))
    assert stats.predicted_entropy_change(z, a, c, form="exact").item() == pytest.approx(exact, abs=1e-12)
    assert exact == pytest.approx(-0.102995, abs=1e-6)
    steer = stats.predicted_entropy_change(z, a, c, form="steer").item()
    assert steer == pytest.approx(-0.0625 * t, abs=1e-12) and steer == pytest.approx(-0.017166, abs=1e-6)
    # uniform logits: log p_a + H = 0 for every a, and the second term vanishes: no change either way
    u = torch.zeros(1, 5, dtype=torch.float64)
    for form in ("exact", "steer"):
        assert stats.predicted_entropy_change(u, torch.tensor([3]), c, form=form).item() == pytest.approx(0, abs=1e-15)


@pytest.mark.parametrize("form", ["exact", "steer"])
def test_predicted_change_matches_reference(form):
    g = _gen(7)
    z = torch.randn(3, 5, 40, generator=g) * 3
    a = torch.randint(0, 40, (3, 5), generator=g)
    c = torch.randn(3, 5, generator=g)
    torch.testing.assert_close(stats.predicted_entropy_change(z, a, c, form=form).double(),
                               ref_change(z, a, c, form), rtol=1e-4, atol=1e-6)


def test_exact_form_is_the_first_order_entropy_change_of_the_softmax_step():
    """Finite differences: H(z + eta c (onehot(a) - pi)) - H(z) = eta * prediction + O(eta^2)."""
    g = _gen(8)
    z = torch.randn(20, 30, generator=g, dtype=torch.float64) * 2
    a = torch.randint(0, 30, (20,), generator=g)
    c = torch.randn(20, generator=g, dtype=torch.float64)
    eta = 1e-6
    pi = torch.softmax(z, -1)
    step = c[:, None] * (torch.nn.functional.one_hot(a, 30).double() - pi)
    measured = (ref_entropy(z + eta * step) - ref_entropy(z)) / eta
    torch.testing.assert_close(stats.predicted_entropy_change(z, a, c, form="exact"), measured, rtol=1e-4, atol=1e-6)


def test_predicted_change_chunks_mask_and_no_grad():
    g = _gen(9)
    z = torch.randn(33, 70, generator=g) * 2
    a = torch.randint(0, 70, (33,), generator=g)
    c = torch.randn(33, generator=g)
    ref = stats.predicted_entropy_change(z, a, c, chunk_size=1000)
    for cs in (1, 4, 32):
        torch.testing.assert_close(stats.predicted_entropy_change(z, a, c, chunk_size=cs), ref, rtol=1e-6, atol=1e-7)
    mask = torch.rand(33, generator=g) < 0.5
    zn = torch.where(mask[:, None], z, torch.tensor(math.nan))
    bad_a = torch.where(mask, a, torch.full_like(a, -5))  # out-of-range ids are fine where masked
    bad_c = torch.where(mask, c, torch.tensor(math.inf))
    out = stats.predicted_entropy_change(zn, bad_a, bad_c, mask=mask)
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(out[mask], ref[mask], rtol=1e-6, atol=1e-7)
    assert not stats.predicted_entropy_change(z.requires_grad_(True), a, c).requires_grad


def test_entropy_change_terms_by_definition():
    g = _gen(11)
    z = (torch.randn(3, 4, 9, generator=g) * 2).double()
    pi = torch.softmax(z, -1)
    h_ref = -(pi * pi.log()).sum(-1)
    second_ref = (pi * pi * (pi.log() + h_ref[..., None])).sum(-1)
    mask = torch.rand(3, 4, generator=g) < 0.6
    zn = torch.where(mask[..., None], z, torch.tensor(math.nan, dtype=torch.float64))
    for cs in (None, 1, 5):
        h, second = stats.entropy_change_terms(zn, mask, chunk_size=cs)
        torch.testing.assert_close(h[mask], h_ref[mask], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(second[mask], second_ref[mask], rtol=1e-12, atol=1e-12)
        assert (h[~mask] == 0).all() and (second[~mask] == 0).all()


def test_predicted_change_validation_errors_name_the_argument():
    z, a, c = torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
    with pytest.raises(ValueError, match="form"):
        stats.predicted_entropy_change(z, a, c, form="linear")
    with pytest.raises(ValueError, match="token_ids"):
        stats.predicted_entropy_change(z, a[:, :2], c)
    with pytest.raises(ValueError, match="token_ids"):
        stats.predicted_entropy_change(z, torch.full_like(a, 5), c)
    with pytest.raises(ValueError, match="coef"):
        stats.predicted_entropy_change(z, a, c[:1])
    with pytest.raises(ValueError, match="coef"):
        stats.predicted_entropy_change(z, a, torch.full_like(c, math.nan))
    with pytest.raises(ValueError, match="mask"):
        stats.predicted_entropy_change(z, a, c, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        stats.predicted_entropy_change(z, a, c, chunk_size=0)
    with pytest.raises(ValueError, match="logits"):
        stats.predicted_entropy_change(z.long(), a, c)
