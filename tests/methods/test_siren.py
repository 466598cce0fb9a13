"""SIREN: hand cases, the edge cases of siren.md, parity with a reference written from the spec, ablations."""
from __future__ import annotations

import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import stats
from rlvr_entropy.methods.siren import peak_entropy_mask, selected_entropy
from tests.helpers import batch_from, loss_and_grads, make_leaves


# ------------------------------------------------------------------ reference written from siren.md (loops)
def ref_top_p_entropy_row(z: torch.Tensor, p: float, K: int, inclusive: bool) -> torch.Tensor:
    pi = torch.softmax(z, -1)
    vals, _ = torch.sort(pi, descending=True)
    vals = vals[: min(K, z.numel())]
    c = torch.cumsum(vals, 0)
    m = int((c < p).sum())
    if inclusive and m < vals.numel():
        m += 1
    if m <= 1:
        return z.sum() * 0
    kept = vals[:m]
    q = kept / (kept.sum() + 1e-12)
    return -(q * torch.log(q + 1e-12)).sum()


def ref_quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ref_siren_reg(logits, mask, p, K, q, beta, anchor):
    B, T, _ = logits.shape
    rows = []
    for i in range(B):
        hs = {t: ref_top_p_entropy_row(logits[i, t], p, K, False) for t in range(T) if mask[i, t]}
        if not hs:
            rows.append(logits.sum() * 0)
            continue
        tau = ref_quantile([float(h.detach()) for h in hs.values()], q)
        sel = [h for h in hs.values() if float(h) > tau]
        rows.append(sum(sel) / len(sel) if sel else logits.sum() * 0)
    h_sel = sum(rows) / B
    return beta * (h_sel - anchor) ** 2, h_sel


# ------------------------------------------------------------------ peak mask and H_sel
def test_peak_mask_hand_case():
    # row 0 values 1..5: q0.8 with linear interpolation = 4.2 -> only 5 selected
    # row 1 all equal: nothing selected; row 2 one valid token: tau = itself -> nothing selected
    e = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 2.0, 2.0, 2.0, 2.0], [7.0, 0.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    sel = peak_entropy_mask(e, m)
    assert sel.tolist() == [[False] * 4 + [True], [False] * 5, [False] * 5]
    # H_sel = (5 + 0 + 0) / 3 rows
    assert selected_entropy(e, m).item() == pytest.approx(5 / 3)


def test_tau_zero_selects_every_positive_token_and_empty_rows():
    # 80% of the row is 0 -> tau = 0 -> every positive token selected
    e = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.5]])
    sel = peak_entropy_mask(e, torch.ones_like(e, dtype=torch.bool))
    assert sel[0].tolist() == [False] * 8 + [True, True]
    assert not peak_entropy_mask(e, torch.zeros_like(e, dtype=torch.bool)).any()
    assert selected_entropy(e, torch.zeros_like(e, dtype=torch.bool)).item() == 0.0


def test_ties_at_tau_not_selected():
    e = torch.tensor([[1.0, 3.0, 3.0, 3.0, 3.0]])  # q0.8 = 3 -> strict > selects none
    assert not peak_entropy_mask(e, torch.ones_like(e, dtype=torch.bool)).any()


def test_peak_mask_validation():
    with pytest.raises(ValueError, match="entropy"):
        peak_entropy_mask(torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        peak_entropy_mask(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="quantile"):
        peak_entropy_mask(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), quantile=1.5)
    bad = torch.zeros(2, 3)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="entropy"):
        peak_entropy_mask(bad, torch.ones(2, 3, dtype=torch.bool))


def test_peak_mask_matches_reference_quantile():
    g = torch.Generator().manual_seed(0)
    e = torch.rand(6, 11, generator=g, dtype=torch.float64)
    m = torch.rand(6, 11, generator=g) > 0.3
    m[:, 0] = True
    sel = peak_entropy_mask(e, m, 0.7)
    for i in range(6):
        vals = [float(e[i, t]) for t in range(11) if m[i, t]]
        tau = ref_quantile(vals, 0.7)
        assert sel[i].tolist() == [bool(m[i, t]) and float(e[i, t]) > tau for t in range(11)]


# ------------------------------------------------------------------ top-p entropy edge cases
def _H(*probs):
    q = torch.tensor(probs, dtype=torch.float64)
    q = q / q.sum()
    return float(-(q * q.log()).sum())


@pytest.mark.parametrize("probs,p,inclusive,expected", [
    ([0.9, 0.05, 0.05], 0.8, False, 0.0),                     # top-1 >= p: empty nucleus
    ([0.5, 0.2, 0.2, 0.1], 0.6, False, 0.0),                  # exactly one token below p
    ([0.5, 0.2, 0.2, 0.1], 0.6, True, _H(0.5, 0.2)),          # inclusive adds the crossing token
    ([0.4, 0.3, 0.2, 0.1], 0.8, False, _H(0.4, 0.3)),         # C = 0.4, 0.7, 0.9: crossing at 0.9 excluded
    ([0.25, 0.25, 0.25, 0.25], 0.99, False, _H(1, 1, 1)),     # 0.25, 0.5, 0.75 < 0.99
])
def test_top_p_entropy_hand_cases(probs, p, inclusive, expected):
    z = torch.tensor(probs, dtype=torch.float64).log()
    assert stats.top_p_entropy(z, p=p, inclusive=inclusive).item() == pytest.approx(expected, abs=1e-9)


def test_top_p_cumsum_exactly_p_is_excluded():
    # probabilities 0.5, 0.25, 0.25 are exact in binary: C = 0.5, 0.75, 1.0; p = 0.75 -> C_2 == p excluded
    z = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).log()
    assert stats.top_p_entropy(z, p=0.75).item() == 0.0  # one token (0.5) kept
    assert stats.top_p_entropy(z, p=0.75, inclusive=True).item() == pytest.approx(_H(0.5, 0.25))


def test_top_p_never_reaching_p_within_k_keeps_all_k():
    z = torch.zeros(10, dtype=torch.float64)  # uniform 0.1 each; top_k 4 -> C_4 = 0.4 < 0.8
    assert stats.top_p_entropy(z, p=0.8, top_k=4).item() == pytest.approx(math.log(4))
    assert stats.top_p_entropy(z, p=0.75, top_k=100).item() == pytest.approx(math.log(7))  # top_k clamped to V


def test_top_p_ties_at_boundary_value_is_well_defined():
    z = torch.tensor([0.4, 0.2, 0.2, 0.2], dtype=torch.float64).log()  # C = 0.4, 0.6, 0.8(=p?), 1.0
    ref = ref_top_p_entropy_row(z, 0.7, 10, False)
    assert stats.top_p_entropy(z, p=0.7).item() == pytest.approx(float(ref), abs=1e-9)


def test_top_p_entropy_matches_reference_values_and_grads():
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(30, 17, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    for p, K, inc in [(0.8, 10000, False), (0.5, 5, False), (0.95, 17, True)]:
        ours = stats.top_p_entropy(z, p=p, top_k=K, inclusive=inc, chunk_size=7)
        ref = torch.stack([ref_top_p_entropy_row(r, p, K, inc) for r in z])
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
        g1 = torch.autograd.grad(ours.sum(), z)[0]
        g2 = torch.autograd.grad(ref.sum(), z)[0]
        torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9)


def test_top_p_bf16_logits():
    z = (torch.randn(4, 50) * 3).to(torch.bfloat16).requires_grad_(True)
    h = stats.top_p_entropy(z)
    assert h.dtype == torch.float32
    ref = torch.stack([ref_top_p_entropy_row(r.float(), 0.8, 10000, False) for r in z.detach()])
    torch.testing.assert_close(h.detach(), ref, rtol=1e-4, atol=1e-4)
    h.sum().backward()
    assert z.grad.dtype == torch.bfloat16


def test_top_p_validation():
    with pytest.raises(ValueError, match="p must"):
        stats.top_p_entropy(torch.zeros(3), p=0.0)
    with pytest.raises(ValueError, match="p must"):
        stats.top_p_entropy(torch.zeros(3), p=1.2)
    with pytest.raises(ValueError, match="top_k"):
        stats.top_p_entropy(torch.zeros(3), top_k=0)


# ------------------------------------------------------------------ the method
def test_siren_loss_matches_reference_values_and_grads():
    leaves, _ = make_leaves(B=3, T=6, V=9, seed=3, scale=1.5)
    m = re.make_method("siren", anchor_value=0.3, beta=0.5, top_k=10000)
    out, grads = loss_and_grads(m, leaves)
    grpo = re.make_method("grpo", **m.config.pg_fields())
    base, gbase = loss_and_grads(grpo, leaves)
    logits = leaves["logits"]
    logits.grad = None
    reg, h_sel = ref_siren_reg(logits, leaves["mask"], 0.8, 10000, 0.8, 0.5, 0.3)
    torch.testing.assert_close(out.loss, base.loss + reg, rtol=1e-9, atol=1e-12)
    assert out.metrics["siren/selected_entropy"].item() == pytest.approx(float(h_sel), abs=1e-9)
    (g_ref,) = torch.autograd.grad(reg, logits)
    torch.testing.assert_close(grads["logits"], gbase["logits"] + g_ref, rtol=1e-7, atol=1e-10)
    assert g_ref.abs().sum() > 0


def test_anchor_set_once_from_first_batch_and_survives_resume():
    leaves, _ = make_leaves(seed=4)
    m = re.make_method("siren")
    out = m.compute_loss(batch_from(leaves), step=0)
    a = m.state_dict()["anchor"]["value"]
    assert a == pytest.approx(out.metrics["siren/selected_entropy"].item())
    assert out.metrics["siren/reg"].item() == 0.0  # at the anchor
    leaves2, _ = make_leaves(seed=5)
    out2 = m.compute_loss(batch_from(leaves2), step=1)
    assert m.state_dict()["anchor"]["value"] == a and out2.metrics["siren/reg"].item() > 0
    resumed = re.make_method("siren")
    resumed.load_state_dict(m.state_dict())
    assert resumed.compute_loss(batch_from(leaves2), step=1).loss.item() == pytest.approx(out2.loss.item())
    # resume without state: a fresh method measures a new anchor on its first batch
    fresh = re.make_method("siren")
    fresh.compute_loss(batch_from(leaves2), step=1)
    assert fresh.state_dict()["anchor"]["value"] != a


def test_prepare_measures_anchor_on_whole_batch():
    leaves, _ = make_leaves(seed=6, B=6)
    m = re.make_method("siren")
    v = m.prepare(batch_from(leaves))
    _, h_sel = ref_siren_reg(leaves["logits"].detach(), leaves["mask"], 0.8, 10000, 0.8, 1.0, 0.0)
    assert v == pytest.approx(float(h_sel), abs=1e-9)
    assert m.prepare(batch_from(make_leaves(seed=7)[0])) == v  # set once


def test_ablations():
    leaves, _ = make_leaves(seed=8)
    logits = leaves["logits"].detach()
    mask = leaves["mask"]
    base = re.make_method("grpo", **re.make_method("siren").config.pg_fields()).compute_loss(batch_from(leaves)).loss
    # no anchor: -beta * H_sel
    out = re.make_method("siren", use_anchor=False, beta=0.1).compute_loss(batch_from(leaves))
    h_sel = selected_entropy(stats.top_p_entropy(logits, mask=mask), mask)
    assert out.loss.item() == pytest.approx(base.item() - 0.1 * h_sel.item(), abs=1e-9)
    # no top-p: full entropy
    out = re.make_method("siren", use_anchor=False, use_top_p=False, beta=0.1).compute_loss(batch_from(leaves))
    h_sel = selected_entropy(stats.entropy(logits, mask=mask), mask)
    assert out.loss.item() == pytest.approx(base.item() - 0.1 * h_sel.item(), abs=1e-9)
    # no peak mask: seq-mean-token-mean of every valid top-p entropy
    out = re.make_method("siren", use_anchor=False, use_peak_mask=False, beta=0.1).compute_loss(batch_from(leaves))
    hp = stats.top_p_entropy(logits, mask=mask)
    rows = torch.where(mask, hp, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
    assert out.loss.item() == pytest.approx(base.item() - 0.1 * rows.mean().item(), abs=1e-9)


def test_config_errors():
    with pytest.raises(ValueError, match="top_p"):
        re.make_method("siren", top_p=0.0)
    with pytest.raises(ValueError, match="beta"):
        re.make_method("siren", beta=-1.0)
    with pytest.raises(ValueError, match="logits"):
        leaves, _ = make_leaves(seed=9)
        re.make_method("siren").compute_loss(batch_from(leaves, logits=None))
