"""entropy_bonus: hand cases, parity with a loop reference written from the formula (plain and AEnt clamped
entropy, values and gradients), and properties of the chunked clamped-entropy kernel."""
from __future__ import annotations

import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import stats
from rlvr_entropy.methods.entropy_bonus import clamped_entropy, kept_count
from tests.helpers import batch_from, loss_and_grads, make_leaves

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# ------------------------------------------------------------------------ references written from the formula
def ref_token_loss(lp, old, a, eps_low=0.2, eps_high=0.2):
    """PPO clipped surrogate of one token (scalars)."""
    r = torch.exp(lp - old)
    return torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps_low, 1 + eps_high))


def ref_agg(values, mask, mode, norm_length=None):
    """values: [B][T] nested lists of 0-dim tensors; aggregation by hand."""
    B, T = mask.shape
    rows = [[values[i][t] for t in range(T) if mask[i, t]] for i in range(B)]
    flat = [v for r in rows for v in r]
    zero = torch.zeros((), dtype=torch.float64)
    if mode == "token-mean":
        return sum(flat, zero) / max(len(flat), 1)
    if mode == "token-sum":
        return sum(flat, zero)
    nonempty = [r for r in rows if r]
    if mode == "seq-mean-token-mean":
        per = [sum(r, zero) / len(r) for r in nonempty]
    else:
        per = [sum(r, zero) for r in nonempty]
    out = sum(per, zero) / max(len(per), 1)
    if mode == "seq-mean-token-sum-norm":
        out = out / (norm_length if norm_length is not None else T)
    return out


def ref_full_entropy(z):
    """Entropy of softmax(z) for one position z [V]."""
    p = torch.softmax(z, -1)
    return -(p * torch.log_softmax(z, -1)).sum()


def ref_clamped_entropy(z, frac):
    """AEnt clamped entropy of one position z [V]: keep the V - floor(frac V) largest logits (ties: lowest index
    first, via a stable descending sort), renormalize, entropy."""
    V = z.shape[-1]
    n_keep = max(1, V - math.floor(frac * V + 1e-9))
    idx = torch.sort(z.detach(), descending=True, stable=True).indices[:n_keep]
    kept = z[idx]
    q = torch.softmax(kept, -1)
    logq = torch.log_softmax(kept, -1)
    return -torch.where(q > 0, q * logq, torch.zeros_like(q)).sum()


def ref_loss(leaves, *, coef, mode="token-mean", clamp=0.0, use_logits_entropy=False, norm_length=None):
    """L = agg(l_t) - coef * agg(H_t), one token at a time."""
    lp, old, adv, m = leaves["log_prob"], leaves["old_log_prob"], leaves["advantages"], leaves["mask"]
    B, T = m.shape
    zero = torch.zeros((), dtype=torch.float64)
    pg = [[ref_token_loss(lp[i, t], old[i, t], adv[i]) if m[i, t] else zero for t in range(T)] for i in range(B)]
    ent = []
    for i in range(B):
        row = []
        for t in range(T):
            if not m[i, t]:
                row.append(zero)
            elif clamp > 0:
                row.append(ref_clamped_entropy(leaves["logits"][i, t], clamp))
            elif use_logits_entropy:
                row.append(ref_full_entropy(leaves["logits"][i, t]))
            else:
                row.append(leaves["entropy"][i, t])
        ent.append(row)
    return ref_agg(pg, m, mode, norm_length) - coef * ref_agg(ent, m, mode, norm_length)


def _grads(loss, leaves, fields=("log_prob", "entropy", "logits")):
    gs = torch.autograd.grad(loss, [leaves[f] for f in fields], allow_unused=True)
    return {f: torch.zeros_like(leaves[f]) if g is None else g for f, g in zip(fields, gs)}


# ------------------------------------------------------------------------------------------- hand-derived
def _one_row_batch(entropy, adv=0.0, mask=None):
    T = entropy.shape[-1]
    B = entropy.shape[0]
    return re.TokenBatch(log_prob=torch.zeros(B, T), old_log_prob=torch.zeros(B, T),
                         advantages=torch.full((B,), adv),
                         mask=torch.ones(B, T, dtype=torch.bool) if mask is None else mask, entropy=entropy)


def test_hand_bonus_value():
    # one token, r = 1, A = 0: PG loss 0; H = 0.7 -> L = -0.01 * 0.7 = -0.007
    out = re.make_method("entropy_bonus", coef=0.01).compute_loss(_one_row_batch(torch.tensor([[0.7]])))
    assert out.loss.item() == pytest.approx(-0.007, abs=1e-9)
    # A = 1, r = 1: l = -1; H = 0.5, coef 0.01 -> L = -1 - 0.005 = -1.005
    out = re.make_method("entropy_bonus", coef=0.01).compute_loss(_one_row_batch(torch.tensor([[0.5]]), adv=1.0))
    assert out.loss.item() == pytest.approx(-1.005, abs=1e-7)
    assert out.metrics["entropy_bonus/bonus"].item() == pytest.approx(0.005, abs=1e-9)
    assert out.metrics["entropy_bonus/pg_loss"].item() == pytest.approx(-1.0)


def test_hand_entropy_term_follows_loss_agg_mode():
    # row 0: H = [0.6, 0.2] (mean 0.4), row 1: H = [1.0, pad]; A = 0 so L = -coef * agg(H)
    h = torch.tensor([[0.6, 0.2], [1.0, float("nan")]])
    m = torch.tensor([[True, True], [True, False]])
    b = _one_row_batch(h, mask=m)
    # token-mean: (0.6 + 0.2 + 1.0) / 3 = 0.6;  seq-mean-token-mean: (0.4 + 1.0) / 2 = 0.7
    # seq-mean-token-sum: (0.8 + 1.0) / 2 = 0.9;  token-sum: 1.8;  seq-mean-token-sum-norm (L = 3): 0.9 / 3 = 0.3
    expect = {"token-mean": 0.6, "seq-mean-token-mean": 0.7, "seq-mean-token-sum": 0.9, "token-sum": 1.8,
              "seq-mean-token-sum-norm": 0.3}
    for mode, h_agg in expect.items():
        out = re.make_method("entropy_bonus", coef=0.1, loss_agg_mode=mode, norm_length=3).compute_loss(b)
        assert out.loss.item() == pytest.approx(-0.1 * h_agg, abs=1e-7), mode


def test_hand_clamped_entropy():
    # 4 tokens, drop floor(0.5 * 4) = 2 lowest: keep [0, 0] -> log 2
    z = torch.tensor([0.0, 0.0, -5.0, -6.0], dtype=torch.float64)
    assert clamped_entropy(z, 0.5).item() == pytest.approx(math.log(2), abs=1e-12)
    # drop floor(0.25 * 4) = 1 lowest (-2): q = softmax([1, 0, -1]) = [0.66524, 0.24473, 0.09003],
    # H = -sum q log q = 0.832396 (exp: e + 1 + 1/e = 4.086161)
    z = torch.tensor([1.0, -2.0, 0.0, -1.0], dtype=torch.float64)
    assert clamped_entropy(z, 0.25).item() == pytest.approx(0.8323955818399389, abs=1e-12)
    # drop 3 of 4: a single token left -> 0
    assert clamped_entropy(z, 0.75).item() == 0.0
    # drop nothing (floor(0.2 * 4) = 0): the full entropy
    assert clamped_entropy(z, 0.2).item() == pytest.approx(stats.entropy(z).item(), abs=1e-12)


def test_kept_count_rounding():
    assert kept_count(10, 0.3) == 7      # 0.3 * 10 = 3.0000000000000004 -> drop 3
    assert kept_count(100, 0.29) == 71   # 0.29 * 100 = 28.999999999999996 -> drop 29, not 28
    assert kept_count(13, 0.5) == 7      # floor(6.5) = 6 dropped
    assert kept_count(4, 0.99) == 1      # floor(3.96) = 3 dropped
    assert kept_count(1, 0.9) == 1       # never below one token


# ------------------------------------------------------------------------------------- parity with reference
@pytest.mark.parametrize("mode", AGG_MODES)
def test_matches_reference_with_given_entropy(mode):
    leaves, _ = make_leaves(seed=1)
    m = re.make_method("entropy_bonus", coef=0.05, loss_agg_mode=mode, norm_length=11)
    out = m.compute_loss(batch_from(leaves))
    ref = ref_loss(leaves, coef=0.05, mode=mode, norm_length=11)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    g, gr = _grads(out.loss, leaves), _grads(ref, leaves)
    for f in g:
        torch.testing.assert_close(g[f], gr[f], rtol=1e-10, atol=1e-13)


def test_gradient_on_entropy_by_hand():
    # seq-mean-token-mean: d L / d H_it = -coef / (B * n_i) at valid tokens, 0 elsewhere
    leaves, _ = make_leaves(seed=2)
    out, grads = loss_and_grads(re.make_method("entropy_bonus", coef=0.05, loss_agg_mode="seq-mean-token-mean"),
                                leaves)
    msk = leaves["mask"]
    n = msk.sum(-1, keepdim=True).double()
    expected = torch.where(msk, -0.05 / (msk.shape[0] * n), torch.zeros_like(n))
    torch.testing.assert_close(grads["entropy"], expected, rtol=1e-12, atol=1e-15)
    # token-mean: -coef / N everywhere valid
    out, grads = loss_and_grads(re.make_method("entropy_bonus", coef=0.05), leaves)
    expected = torch.where(msk, torch.full_like(n, -0.05 / int(msk.sum())), torch.zeros_like(n))
    torch.testing.assert_close(grads["entropy"], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_matches_reference_with_entropy_from_logits(mode):
    leaves, _ = make_leaves(seed=3)
    out = re.make_method("entropy_bonus", coef=0.2, loss_agg_mode=mode).compute_loss(
        batch_from(leaves, entropy=None))
    ref = ref_loss(leaves, coef=0.2, mode=mode, use_logits_entropy=True)
    torch.testing.assert_close(out.loss, ref, rtol=1e-11, atol=1e-12)
    g, gr = _grads(out.loss, leaves, ("log_prob", "logits")), _grads(ref, leaves, ("log_prob", "logits"))
    for f in g:
        torch.testing.assert_close(g[f], gr[f], rtol=1e-9, atol=1e-12)
    assert g["logits"].abs().sum() > 0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("frac", [0.3, 0.5, 0.9])
def test_aent_matches_reference(mode, frac):
    leaves, _ = make_leaves(seed=4)
    m = re.make_method("entropy_bonus", coef=0.1, clamp_fraction=frac, loss_agg_mode=mode)
    assert m.needs == ("logits",) and re.make_method("entropy_bonus").needs == ()
    out = m.compute_loss(batch_from(leaves))
    ref = ref_loss(leaves, coef=0.1, mode=mode, clamp=frac)
    torch.testing.assert_close(out.loss, ref, rtol=1e-11, atol=1e-12)
    g, gr = _grads(out.loss, leaves), _grads(ref, leaves)
    for f in g:
        torch.testing.assert_close(g[f], gr[f], rtol=1e-9, atol=1e-12)
    assert g["entropy"].abs().sum() == 0  # the clamped entropy is computed from logits, not the given entropy
    with pytest.raises(ValueError, match="logits"):
        m.compute_loss(batch_from(leaves, logits=None))


# --------------------------------------------------------------------------------- clamped-entropy kernel
@pytest.mark.parametrize("chunk", [1, 4, None])
@pytest.mark.parametrize("frac", [0.1, 0.3, 0.7])
def test_clamped_entropy_values_and_gradients_match_reference(chunk, frac):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 13, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    # ties straddling the kept/dropped boundary: 4 kept (frac 0.7) cuts through the 0.5s of row (0, 0); 10 and 12
    # kept (frac 0.3, 0.1) cut through the -4s of row (0, 1)
    x.data[0, 0] = torch.tensor([0.5, 3, 0.5, 2, 0.5, 1, 0.5, -1, -2, -3, -4, -5, -6], dtype=torch.float64)
    x.data[0, 1] = torch.tensor([5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -4, -4, -4], dtype=torch.float64)
    ours = clamped_entropy(x, frac, chunk_size=chunk)
    ref = torch.stack([ref_clamped_entropy(row, frac) for row in x.reshape(-1, 13)]).reshape(3, 5)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    g1 = torch.autograd.grad((ours * w).sum(), x)[0]
    g2 = torch.autograd.grad((ref * w).sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-13)


def test_clamped_entropy_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: clamped_entropy(t, 0.4, chunk_size=2), (x,))


def test_clamped_entropy_mask_nan_rows_and_invariances():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 11, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    xn = x.clone()
    xn[~mask] = float("nan")
    xn.requires_grad_(True)
    h = clamped_entropy(xn, 0.5, mask=mask, chunk_size=3)
    assert torch.isfinite(h).all()
    ref = clamped_entropy(x, 0.5)
    torch.testing.assert_close(h[mask], ref[mask], rtol=0, atol=0)
    (gx,) = torch.autograd.grad(h[mask].sum(), xn)
    assert torch.equal(gx[~mask], torch.zeros_like(gx[~mask])) and torch.isfinite(gx).all()
    # shift invariance (softmax): value and gradient unchanged by adding a constant per position
    xs = x.clone().requires_grad_(True)
    xt = (x + 7.0).requires_grad_(True)
    ha, hb = clamped_entropy(xs, 0.3), clamped_entropy(xt, 0.3)
    torch.testing.assert_close(ha, hb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ha.sum(), xs)[0], torch.autograd.grad(hb.sum(), xt)[0],
                               rtol=1e-10, atol=1e-12)
    # vocabulary permutation leaves the value unchanged
    perm = torch.randperm(11, generator=g)
    torch.testing.assert_close(clamped_entropy(x[..., perm], 0.3), clamped_entropy(x, 0.3), rtol=1e-12, atol=1e-12)


def test_clamped_entropy_drops_exactly_the_tail():
    # 4 plausible logits and 4 implausible ones: dropping half equals the entropy of the 4 plausible ones, and the
    # dropped logits get exactly zero gradient
    head = torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    z = torch.cat([head, torch.tensor([-8.0, -9.0, -10.0, -11.0], dtype=torch.float64)]).requires_grad_(True)
    h = clamped_entropy(z, 0.5)
    torch.testing.assert_close(h, ref_full_entropy(head), rtol=1e-12, atol=1e-12)
    (gz,) = torch.autograd.grad(h, z)
    assert torch.equal(gz[4:], torch.zeros(4, dtype=torch.float64)) and gz[:4].abs().sum() > 0
    # the full entropy is larger here (the tail adds mass spread over 4 more tokens)
    assert stats.entropy(z).item() > h.item()


def test_clamped_entropy_neg_inf_logits_give_finite_gradient():
    z = torch.tensor([[1.0, 0.0, -math.inf, -math.inf, -1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    # drop floor(0.5 * 6) = 3: the two -inf and -2 -> softmax([1, 0, -1]) (the hand value above)
    h = clamped_entropy(z, 0.5)
    assert h.item() == pytest.approx(0.8323955818399389, abs=1e-12)
    # drop 1 (one -inf, ties by index): the other -inf stays in the kept set with q = 0 and gradient exactly 0
    h2 = clamped_entropy(z, 1 / 6 + 1e-6)
    (g2,) = torch.autograd.grad(h2.sum(), z)
    assert torch.isfinite(g2).all() and g2[0, 2] == 0 and g2[0, 3] == 0


def test_clamped_entropy_bf16_and_saves_no_vocab_sized_intermediate():
    g = torch.Generator().manual_seed(3)
    x32 = torch.randn(4, 6, 50, generator=g)
    xb = x32.to(torch.bfloat16).requires_grad_(True)
    hb = clamped_entropy(xb, 0.5, chunk_size=5)
    assert hb.dtype == torch.float32
    ref = clamped_entropy(xb.detach().float(), 0.5)
    torch.testing.assert_close(hb, ref, rtol=0, atol=0)  # bf16 is upcast exactly, then float32 arithmetic
    (gb,) = torch.autograd.grad(hb.sum(), xb)
    assert gb.dtype == torch.bfloat16 and torch.isfinite(gb.float()).all()
    # autograd keeps only the logits and per-position vectors (never an [N, V] intermediate)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(40, 50, generator=g, dtype=torch.float64).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        clamped_entropy(x, 0.5, chunk_size=8)
    big = [t for t in saved if t.numel() > x.shape[0]]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


# ------------------------------------------------------------------------------------------------ config
def test_config_errors_and_neutral_with_aent():
    with pytest.raises(ValueError, match="coef"):
        re.make_method("entropy_bonus", coef=-1e-3)
    with pytest.raises(ValueError, match="clamp_fraction"):
        re.make_method("entropy_bonus", clamp_fraction=1.0)
    with pytest.raises(ValueError, match="clamp_fraction"):
        clamped_entropy(torch.zeros(3), -0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        clamped_entropy(torch.zeros(3), 0.5, chunk_size=0)
    # coef = 0 is grpo also with the AEnt option on (the clamped entropy is computed but weighted by 0)
    leaves, _ = make_leaves(seed=5)
    a, ga = loss_and_grads(re.make_method("entropy_bonus", coef=0.0, clamp_fraction=0.5), leaves)
    b, gb = loss_and_grads(re.make_method("grpo"), leaves)
    assert torch.equal(a.loss, b.loss)
    for f in ga:
        torch.testing.assert_close(ga[f], gb[f], rtol=0, atol=0)
