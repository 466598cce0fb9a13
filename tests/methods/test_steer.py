"""STEER: hand-derived weights, a reference from steer.md (loops), the reweighted loss, and the known weakness of
the closed form."""
from __future__ import annotations

import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import stats
from rlvr_entropy.core.surrogate import ppo_token_loss
from rlvr_entropy.methods.steer import steer_token_weights
from tests.helpers import batch_from, loss_and_grads, make_leaves


def ref_weights(log_prob, old_log_prob, adv, ent, mask, w_min, w_max, mapping, k):
    B, T = log_prob.shape
    ms = {}
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            pi = min(max(math.exp(float(log_prob[i, t])), 1e-8), 1 - 1e-8)
            po = min(max(math.exp(float(old_log_prob[i, t])), 1e-8), 1.0)
            a = float(adv[i]) if adv.dim() == 1 else float(adv[i, t])
            m = abs((a / po) * pi * (1 - pi) ** k * (math.log(pi) + float(ent[i, t])))
            ms[(i, t)] = m if math.isfinite(m) else 0.0
    out = torch.zeros(B, T, dtype=torch.float64)
    if not ms:
        return out
    M, mn = max(ms.values()), min(ms.values())
    for (i, t), m in ms.items():
        if mapping == "exp":
            c = -math.log(w_min) / max(M, 0.02)
            out[i, t] = min(max(math.exp(-c * m), w_min), 1.0)
        else:
            out[i, t] = (w_min + w_max) / 2 if M == mn else min(max(w_max - (m - mn) * (w_max - w_min) / (M - mn),
                                                                    w_min), w_max)
    return out


def test_hand_derived_weights():
    # Two tokens, on-policy (pi = pi_old), H = 1, k = 2, A = 1:
    # token 0: pi = 0.5: m = 1 * 0.5 * 0.25 * |ln 0.5 + 1| / 0.5 = 0.25 * 0.30685 = 0.076713
    # token 1: pi = 0.1: m = 1 * 0.81 * |ln 0.1 + 1| = 0.81 * 1.302585 = 1.055094  (= M)
    lp = torch.tensor([[math.log(0.5), math.log(0.1)]], dtype=torch.float64)
    ent = torch.ones(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = steer_token_weights(lp, lp, torch.tensor([1.0], dtype=torch.float64), ent, mask)
    c = -math.log(0.8) / 1.055094
    assert w[0, 1].item() == pytest.approx(0.8, abs=1e-6)          # the largest m gets w_min
    assert w[0, 0].item() == pytest.approx(math.exp(-c * 0.076713), abs=1e-5)
    # linear with 0.8 / 1.2: the smallest m gets 1.2, the largest 0.8
    w = steer_token_weights(lp, lp, torch.tensor([1.0], dtype=torch.float64), ent, mask, weight_min=0.8,
                            weight_max=1.2, mapping="linear")
    assert w.tolist() == [[pytest.approx(1.2), pytest.approx(0.8)]]
    # exponent 1: m_1 = 0.9 * 1.302585 = 1.172327 still the max
    w = steer_token_weights(lp, lp, torch.tensor([1.0], dtype=torch.float64), ent, mask, exponent=1)
    assert w[0, 1].item() == pytest.approx(0.8)


def test_floor_midpoint_padding_nonfinite():
    lp = torch.full((1, 3), math.log(0.5), dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    ent = torch.full((1, 3), -math.log(0.5), dtype=torch.float64)  # log pi + H = 0 -> m = 0
    # all m = 0 < 0.02 floor: exp(0) = 1
    w = steer_token_weights(lp, lp, torch.tensor([1.0], dtype=torch.float64), ent, mask)
    assert w.tolist() == [[1.0, 1.0, 0.0]]
    # linear with M == m_min: midpoint
    w = steer_token_weights(lp, lp, torch.tensor([1.0], dtype=torch.float64), ent, mask, weight_min=0.8,
                            weight_max=1.2, mapping="linear")
    assert w.tolist() == [[pytest.approx(1.0), pytest.approx(1.0), 0.0]]
    # small M (below 0.02): c uses the floor, so the weights stay close to 1
    ent2 = ent + 0.01
    w = steer_token_weights(lp, lp, torch.tensor([1.0], dtype=torch.float64), ent2, mask)
    m = 0.5 * 0.25 * 0.01 / 0.5
    assert w[0, 0].item() == pytest.approx(math.exp(math.log(0.8) / 0.02 * m))
    assert steer_token_weights(lp, lp, torch.tensor([1.0], dtype=torch.float64), ent,
                               torch.zeros(1, 3, dtype=torch.bool)).abs().sum() == 0


def test_matches_reference_random():
    for seed in range(4):
        leaves, _ = make_leaves(seed=seed, B=5, T=8)
        lp, old, adv, ent, m = (leaves["log_prob"].detach(), leaves["old_log_prob"], leaves["advantages"],
                                leaves["old_entropy"], leaves["mask"])
        for mapping, wmin, wmax, k in [("exp", 0.8, 1.0, 2), ("exp", 0.5, 1.0, 1), ("linear", 0.8, 1.2, 2)]:
            ours = steer_token_weights(torch.where(m, lp, 0.0), torch.where(m, old, 0.0), adv, torch.where(m, ent, 0.0),
                                       m, weight_min=wmin, weight_max=wmax, mapping=mapping, exponent=k)
            ref = ref_weights(lp, old, adv, ent, m, wmin, wmax, mapping, k)
            torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


def test_loss_is_weighted_token_mean_and_gradient():
    leaves, _ = make_leaves(seed=3)
    m = re.make_method("steer")
    out, grads = loss_and_grads(m, leaves)
    msk = leaves["mask"]
    lp = torch.where(msk, leaves["log_prob"], 0.0)
    old = torch.where(msk, leaves["old_log_prob"], 0.0)
    adv = torch.where(msk, leaves["advantages"][:, None].expand_as(lp), 0.0)
    w = ref_weights(lp.detach(), old, leaves["advantages"], leaves["old_entropy"], msk, 0.8, 1.0, "exp", 2)
    t = ppo_token_loss(lp, old, adv, eps_low=0.2, eps_high=0.28, dual_clip=10.0)
    ref = torch.where(msk, w * t.loss, 0.0).sum() / msk.sum()
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(ref, leaves["log_prob"])
    torch.testing.assert_close(grads["log_prob"], g, rtol=1e-9, atol=1e-12)
    assert 0.8 - 1e-9 <= out.metrics["steer/weight_min"].item() < 1.0


def test_falls_back_to_current_entropy():
    leaves, _ = make_leaves(seed=4)
    a = re.make_method("steer").compute_loss(batch_from(leaves, old_entropy=None))
    b = re.make_method("steer").compute_loss(batch_from(leaves, old_entropy=leaves["entropy"].detach()))
    torch.testing.assert_close(a.loss, b.loss)


def test_global_scope_gather_fn():
    leaves, _ = make_leaves(seed=5, B=4)
    args = [leaves["log_prob"].detach(), leaves["old_log_prob"], leaves["advantages"], leaves["old_entropy"]]
    msk = leaves["mask"]
    clean = [torch.where(msk, a, 0.0) if a.dim() == 2 else a for a in args]
    full = steer_token_weights(*clean, msk)
    # two "ranks": each half sees the other half's extremes through gather_fn
    halves = []
    for sl in (slice(0, 2), slice(2, 4)):
        other = slice(2, 4) if sl.start == 0 else slice(0, 2)
        from rlvr_entropy.methods.steer import steer_magnitude

        om = steer_magnitude(*[c[other] for c in clean], msk[other], 2)
        ext = {"max": om[msk[other]].max(), "min": om[msk[other]].min()}

        calls = []

        def gather2(x, ext=ext, calls=calls):  # first call gathers the max, second the min
            calls.append(1)
            return torch.stack([x[0], ext["max"] if len(calls) == 1 else ext["min"]])

        halves.append(steer_token_weights(*[c[sl] for c in clean], msk[sl], gather_fn=gather2))
    torch.testing.assert_close(torch.cat(halves), full, rtol=1e-12, atol=1e-12)


def test_validation():
    z = torch.zeros(1, 2)
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="weight_min"):
        steer_token_weights(z, z, torch.zeros(1), z, m, weight_min=0.9, weight_max=0.8)
    with pytest.raises(ValueError, match="mapping"):
        steer_token_weights(z, z, torch.zeros(1), z, m, mapping="log")
    with pytest.raises(ValueError, match="exponent"):
        steer_token_weights(z, z, torch.zeros(1), z, m, exponent=3)
    with pytest.raises(ValueError, match="entropy"):
        steer_token_weights(z, z, torch.zeros(1), torch.zeros(1, 3), m)
    with pytest.raises(ValueError, match="weight_min"):
        re.make_method("steer", weight_min=1.1)


def test_closed_form_tracks_true_change_worse_than_exact():
    """steer.md, last section: on random softmax steps, the exact first-order form correlates > 0.99 with the true
    entropy change, STEER's (1 - pi)^2 form much less."""
    from rlvr_entropy.diagnostics import pearson

    g = torch.Generator().manual_seed(0)
    N, V, eta = 2000, 30, 1e-3
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 1.5
    a = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(-1)
    w = torch.randn(N, generator=g, dtype=torch.float64)
    pi = torch.softmax(z, -1)
    z2 = z + eta * w[:, None] * (torch.nn.functional.one_hot(a, V) - pi)
    true = stats.entropy(z2) - stats.entropy(z)
    exact = stats.predicted_entropy_change(z, a, w, form="exact")
    steer = stats.predicted_entropy_change(z, a, w, form="steer")
    r_exact, r_steer = pearson(exact, true), pearson(steer, true)
    assert r_exact > 0.99
    assert r_steer < 0.9 and r_steer < r_exact - 0.1
