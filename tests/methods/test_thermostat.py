"""Thermostat: hand cases for the closed-form weights and the PI controller, parity of its prediction with
stats.predicted_entropy_change, and a closed-loop property on a tabular bandit."""
from __future__ import annotations

import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import stats
from rlvr_entropy.controllers.pi import EntropyPI
from rlvr_entropy.methods.thermostat import boost_weight, damping_weight, predicted_change, proportional_cut
from tests.helpers import batch_from, make_leaves


def _primed(name, cfg, batch):
    """A method whose controller has measured ``batch`` for one step (the thermostat acts from the next step)."""
    m = re.make_method(name, **cfg)
    m.compute_loss(batch.with_(log_prob=batch.log_prob.detach()))  # no step given: the call is a step
    return m


def _grad(logits, lp0, adv, mask, name, **cfg):
    """d loss / d log_prob and the metrics of one method on a batch at ratio 1 (log_prob = old_log_prob = lp0),
    in the step after one that measured the same batch."""
    lp = lp0.clone().requires_grad_(True)
    b = re.TokenBatch(log_prob=lp, old_log_prob=lp0, advantages=adv, mask=mask, logits=logits)
    out = _primed(name, cfg, b).compute_loss(b)
    out.loss.backward()
    return lp.grad, out.metrics


# the first default's rule (two-sided, one weight for the whole wrong-way set), for the tests of options built on it
TWO_SIDED_UNIFORM = {"floor": False, "allocation": "uniform"}


def _random_batch(seed, B=4, T=6, V=7):
    """float64 logits [B, T, V], sampled-token log-probs lp0 [B, T], advantages [B] (+, -, +, -), full mask."""
    torch.manual_seed(seed)
    logits = torch.randn(B, T, V, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    tok = torch.randint(V, (B, T))
    lp0 = torch.log_softmax(logits, -1).gather(-1, tok[..., None]).squeeze(-1)
    return logits, lp0, adv, torch.ones(B, T, dtype=torch.bool)


def test_damping_weight_hand_case():
    # d = [-3, -1, +2, 0]; S = mean|d| = 6/4 = 1.5; wrong (u > 0) = d < 0: sum |d| / 4 = 1.0
    d = torch.tensor([[-3.0, -1.0, 2.0, 0.0]])
    el = torch.ones_like(d, dtype=torch.bool)
    w, (lam,) = damping_weight(d, el, u=0.4, weight_min=0.0)
    # lambda = 1 - 0.4 * 1.5 / 1.0 = 0.4
    assert lam == pytest.approx(0.4)
    assert torch.allclose(w, torch.tensor([[0.4, 0.4, 1.0, 1.0]]))
    # the weighted mean change moved by u * S = 0.6: from -0.5 to +0.1
    assert (w * d).mean().item() == pytest.approx(d.mean().item() + 0.6)
    # u < 0: wrong = d > 0: sum 2 / 4 = 0.5; lambda = 1 - 0.2 * 1.5 / 0.5 = 0.4
    w, (lam,) = damping_weight(d, el, u=-0.2, weight_min=0.0)
    assert lam == pytest.approx(0.4) and torch.allclose(w, torch.tensor([[1.0, 1.0, 0.4, 1.0]]))
    # clipped at weight_min
    w, (lam,) = damping_weight(d, el, u=1.0, weight_min=0.3)
    assert lam == 0.3
    # u = 0, or nothing eligible -> all ones
    assert damping_weight(d, el, u=0.0, weight_min=0.0)[1] == (1.0,)
    assert damping_weight(d, torch.zeros_like(el), u=0.5, weight_min=0.0)[1] == (1.0,)
    # eligibility restricts the wrong-way set
    el2 = torch.tensor([[False, True, True, True]])
    w, (lam,) = damping_weight(d, el2, u=0.1, weight_min=0.0)
    assert w[0, 0] == 1.0 and w[0, 1] == pytest.approx(lam)


def test_boost_weight_hand_case():
    # d = [-3, -1, +2, 0]; S = 1.5; u = 0.4 asks for +0.6. Right-way (d > 0) = {+2}: R = 2 / 4 = 0.5.
    d = torch.tensor([[-3.0, -1.0, 2.0, 0.0]])
    el = torch.ones_like(d, dtype=torch.bool)
    # room enough: mu = 1 + 0.6 / 0.5 = 2.2, nothing left for damping
    mu, rest = boost_weight(d, el, u=0.4, weight_max=3.0)
    assert mu == pytest.approx(2.2) and rest == 0.0
    # capped at 2: the boost covers 0.5, the remaining 0.1 = (1/15) S goes to damping: lambda = 1 - 0.1 / 1.0 = 0.9
    mu, rest = boost_weight(d, el, u=0.4, weight_max=2.0)
    assert mu == 2.0 and rest == pytest.approx(1 / 15)
    _, (lam,) = damping_weight(d, el, u=rest, weight_min=0.0)
    assert lam == pytest.approx(0.9)
    w = torch.tensor([[lam, lam, mu, 1.0]])
    assert (w * d).mean().item() == pytest.approx(d.mean().item() + 0.6)
    # u < 0 boosts the entropy-lowering tokens: R = 4 / 4 = 1, need 0.2 * 1.5 = 0.3 -> mu = 1.3, sign kept in rest
    mu, rest = boost_weight(d, el, u=-0.2, weight_max=2.0)
    assert mu == pytest.approx(1.3) and rest == 0.0
    mu, rest = boost_weight(d, el, u=-1.0, weight_max=1.5)
    assert mu == 1.5 and rest == pytest.approx(-(1.5 - 0.5) / 1.5)
    # neutral: weight_max = 1, u = 0, nothing eligible
    assert boost_weight(d, el, u=0.4, weight_max=1.0) == (1.0, 0.4)
    assert boost_weight(d, el, u=0.0, weight_max=2.0) == (1.0, 0.0)
    assert boost_weight(d, torch.zeros_like(el), u=0.4, weight_max=2.0) == (1.0, 0.4)


def test_damping_weight_dampable_by_hand():
    # d = [-3, -1, +2, 0]; S = 1.5 over all four; u = 0.2 asks for 0.3. Only token 0 may be damped:
    # W = 3 / 4 -> lambda = 1 - 0.3 / 0.75 = 0.6, token 1 (also wrong-way) keeps 1
    d = torch.tensor([[-3.0, -1.0, 2.0, 0.0]])
    el = torch.ones_like(d, dtype=torch.bool)
    dampable = torch.tensor([[True, False, True, True]])
    w, (lam,) = damping_weight(d, el, u=0.2, weight_min=0.0, dampable=dampable)
    assert lam == pytest.approx(0.6)
    assert torch.allclose(w, torch.tensor([[0.6, 1.0, 1.0, 1.0]]))
    assert (w * d).mean().item() == pytest.approx(d.mean().item() + 0.3)
    # nothing dampable: all ones
    w, (lam,) = damping_weight(d, el, u=0.2, weight_min=0.0, dampable=torch.zeros_like(dampable))
    assert lam == 1.0 and bool((w == 1).all())


def test_protect_low_prob_never_damps_low_probability_tokens():
    torch.manual_seed(2)
    B, T, V = 6, 8, 7
    logits = torch.randn(B, T, V, dtype=torch.float64) * 2
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0], dtype=torch.float64)
    tok = torch.randint(V, (B, T))
    lp0 = torch.log_softmax(logits, -1).gather(-1, tok[..., None]).squeeze(-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    # the entropy-neutral test from the logits, independently of the method's sign trick
    p = torch.softmax(logits, -1)
    h = -(p * p.log()).sum(-1)
    bracket = lp0.exp() * (lp0 + h) - (p ** 2 * (p.log() + h[..., None])).sum(-1)
    low = bracket < 0
    assert low.any() and (~low).any()

    for target in (10.0, 0.01):  # entropy far below target (u > 0), then far above (u < 0)
        grads = {p: _grad(logits, lp0, adv, mask, "thermostat", target=target, kp=0.5, ki=0.0, protect=p,
                          **TWO_SIDED_UNIFORM)[0] for p in ("none", "low_prob")}
        g0, _ = _grad(logits, lp0, adv, mask, "grpo", eps_high=0.28)
        # low-probability tokens keep the full policy gradient; without protection some of them are damped
        assert torch.allclose(grads["low_prob"][low], g0[low])
        assert not torch.allclose(grads["none"][low], g0[low])
        assert (grads["low_prob"][~low].abs() < g0[~low].abs() - 1e-12).any()
    with pytest.raises(ValueError, match="protect"):
        re.make_method("thermostat", protect="rare")


def test_weight_max_boosts_right_way_tokens_in_the_loss():
    logits, lp0, adv, mask = _random_batch(1)
    B, T = mask.shape

    def run(**cfg):
        return _grad(logits, lp0, adv, mask, "thermostat", target=10.0, kp=0.05, ki=0.0, allocation="uniform", **cfg)

    g0, m0 = run()
    g, m = run(weight_max=4.0)
    d = predicted_change(logits, lp0, adv[:, None].expand(B, T), mask)
    up = d > 0  # entropy far below target: the entropy-raising tokens are the right-way ones
    assert m["thermostat/boost"] > 1.0 and m["thermostat/lambda"] == 1.0 and m0["thermostat/lambda"] < 1.0
    assert torch.allclose(g[up], m["thermostat/boost"] * g0[up] / 1.0)  # grpo gradient x mu (g0 is undamped there)
    assert torch.allclose(g[~up], g0[~up] / m0["thermostat/lambda"])  # wrong-way tokens keep weight 1
    assert m["thermostat/predicted_change_weighted"] == pytest.approx(m0["thermostat/predicted_change_weighted"])
    assert m["thermostat/boosted_frac"] == pytest.approx(up.double().mean().item())
    with pytest.raises(ValueError, match="weight_max"):
        re.make_method("thermostat", weight_max=0.5)


def test_damping_weight_priority_groups_by_hand():
    # d = [-3, -1, +2, 0], first = [False, True, False, False]; S = 1.5, N = 4.
    d = torch.tensor([[-3.0, -1.0, 2.0, 0.0]])
    el = torch.ones_like(d, dtype=torch.bool)
    first = torch.tensor([[False, True, False, False]])
    # u = 0.1: C = 0.15; first group W1 = 1/4 = 0.25 -> lambda1 = 1 - 0.15/0.25 = 0.4, the rest untouched
    w, lams = damping_weight(d, el, u=0.1, weight_min=0.0, first=first)
    assert lams == pytest.approx((0.4, 1.0))
    assert torch.allclose(w, torch.tensor([[1.0, 0.4, 1.0, 1.0]]))
    # u = 0.4: C = 0.6 > W1 = 0.25 -> lambda1 = 0 cancels 0.25; the rest (W2 = 3/4) cancels 0.35:
    # lambda2 = 1 - 0.35 / 0.75 = 8/15
    w, lams = damping_weight(d, el, u=0.4, weight_min=0.0, first=first)
    assert lams == pytest.approx((0.0, 8 / 15))
    assert torch.allclose(w, torch.tensor([[8 / 15, 0.0, 1.0, 1.0]]))
    # the total cancelled equals the one-group solution's
    w1, _ = damping_weight(d, el, u=0.4, weight_min=0.0)
    assert (w * d).sum().item() == pytest.approx((w1 * d).sum().item())
    # weight_min bounds the first group too: 0.5 cancels only 0.125 there
    w, lams = damping_weight(d, el, u=0.1, weight_min=0.5, first=first)
    assert lams == pytest.approx((0.5, 1 - 0.025 / 0.75))
    # an empty first group: everything from the rest, as without priority
    w, lams = damping_weight(d, el, u=0.4, weight_min=0.0, first=torch.zeros_like(first))
    assert lams == pytest.approx((1.0, 0.4))


def test_damp_first_negative_protects_positive_tokens():
    torch.manual_seed(0)
    B, T, V = 4, 6, 7
    logits = torch.randn(B, T, V, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    # positive rows sample their most likely token (reinforcing it lowers entropy), negative rows token 0
    tok = torch.where(adv[:, None] > 0, logits.argmax(-1), torch.zeros(B, T, dtype=torch.long))
    lp0 = torch.log_softmax(logits, -1).gather(-1, tok[..., None]).squeeze(-1)
    mask = torch.ones(B, T, dtype=torch.bool)

    def grad(name, **cfg):
        return _grad(logits, lp0, adv, mask, name, **cfg)

    g0, _ = grad("grpo", eps_high=0.28)
    # target far above: u > 0; a small gain so the negative-advantage wrong-way tokens can absorb it all
    g, met = grad("thermostat", target=10.0, damp_first="negative", kp=0.05, ki=0.0)
    assert met["thermostat/u"] > 0 and met["thermostat/lambda"] < 1.0 and met["thermostat/lambda_rest"] == 1.0
    pos = adv > 0
    assert torch.equal(g[pos], g0[pos])  # positive-advantage tokens untouched
    assert (g[~pos].abs() < g0[~pos].abs() - 1e-12).any()  # some negative-advantage tokens damped
    assert (g[~pos].abs() <= g0[~pos].abs() + 1e-15).all()
    # "positive" is the mirror image
    g, met = grad("thermostat", target=10.0, damp_first="positive", kp=0.05, ki=0.0)
    assert met["thermostat/lambda"] < 1.0 and met["thermostat/lambda_rest"] == 1.0
    assert torch.equal(g[~pos], g0[~pos]) and (g[pos].abs() < g0[pos].abs() - 1e-12).any()
    with pytest.raises(ValueError, match="damp_first"):
        re.make_method("thermostat", damp_first="sideways")


def test_damping_weight_efficient_allocation_by_hand():
    # d = [-3, -1, +2, 0] with coefficients 1: efficiency e = |d| = [3, 1, 2, 0]; S = 1.5, N = 4.
    d = torch.tensor([[-3.0, -1.0, 2.0, 0.0]], dtype=torch.float64)
    el = torch.ones_like(d, dtype=torch.bool)
    eff = d.abs()
    # u = 0.4 -> C = 0.6 from the wrong-way set {0, 1} (amounts |d| / 4 = [0.75, 0.25]): cuts c * e with
    # c (3 * 0.75 + 1 * 0.25) = 0.6 -> c = 0.24, cuts [0.72, 0.24], weights [0.28, 0.76]
    w, (lam,) = damping_weight(d, el, u=0.4, weight_min=0.0, efficiency=eff)
    assert torch.allclose(w, torch.tensor([[0.28, 0.76, 1.0, 1.0]], dtype=torch.float64))
    assert lam == pytest.approx(0.52)  # mean weight of the group
    assert (w * d).mean().item() == pytest.approx(d.mean().item() + 0.6)
    # u = 0.6 -> C = 0.9: token 0 saturates (cut 1 cancels 0.75), token 1 gives 0.15 / 0.25 = 0.6
    w, _ = damping_weight(d, el, u=0.6, weight_min=0.0, efficiency=eff)
    assert torch.allclose(w, torch.tensor([[0.0, 0.4, 1.0, 1.0]], dtype=torch.float64))
    # weight_min = 0.5 caps every cut at 0.5: 0.5 x 1.0 = 0.5 < 0.6, so all wrong-way tokens sit at 0.5
    w, _ = damping_weight(d, el, u=0.4, weight_min=0.5, efficiency=eff)
    assert torch.allclose(w, torch.tensor([[0.5, 0.5, 1.0, 1.0]], dtype=torch.float64))
    # equal efficiencies reduce to the uniform lambda
    w_eq, _ = damping_weight(d, el, u=0.4, weight_min=0.0, efficiency=torch.ones_like(d))
    w_un, _ = damping_weight(d, el, u=0.4, weight_min=0.0)
    assert torch.allclose(w_eq, w_un)
    # u < 0: the wrong-way set is {2}: C = 0.2 * 1.5 = 0.3 from amount 0.5 -> weight 0.4
    w, _ = damping_weight(d, el, u=-0.2, weight_min=0.0, efficiency=eff)
    assert torch.allclose(w, torch.tensor([[1.0, 1.0, 0.4, 1.0]], dtype=torch.float64))


def test_proportional_cut_matches_bisection_and_minimizes_the_weighted_square():
    gen = torch.Generator().manual_seed(0)
    for trial in range(100):
        m = int(torch.randint(1, 25, (), generator=gen))
        coef = torch.rand(m, generator=gen, dtype=torch.float64) + 0.1
        eff = torch.rand(m, generator=gen, dtype=torch.float64) * (torch.rand(m, generator=gen) > 0.2)
        amount = coef * eff  # |d_t| = |coef_t| e_t
        cap = float(torch.rand((), generator=gen)) * 0.9 + 0.1
        need = float(torch.rand((), generator=gen)) * cap * float(amount.sum()) * 1.2
        x = proportional_cut(amount, eff, need, cap)
        assert bool((x >= 0).all()) and bool((x <= cap + 1e-12).all())
        assert float((x * amount).sum()) == pytest.approx(min(need, cap * float(amount.sum())), abs=1e-10)
        if need >= cap * float(amount.sum()):
            continue
        lo, hi = 0.0, 1e6  # reference: bisection on c
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float((torch.clamp(mid * eff, max=cap) * amount).sum()) < need else (lo, mid)
        live = amount > 0
        torch.testing.assert_close(x[live], torch.clamp(hi * eff, max=cap)[live], rtol=0, atol=1e-8)
        # no other feasible cut with the same cancellation has a smaller sum |coef| x^2 (the uniform one included)
        uni = torch.full_like(x, need / float(amount.sum()))
        if float(uni.max()) <= cap:
            assert float((coef * x ** 2).sum()) <= float((coef * uni ** 2).sum()) + 1e-12
    assert torch.equal(proportional_cut(torch.ones(3), torch.ones(3), 0.0, 1.0), torch.zeros(3))


def test_efficient_allocation_in_the_loss_spares_near_deterministic_tokens():
    logits, lp0, adv, mask = _random_batch(3)
    B, T = mask.shape
    logits = logits.clone()
    logits[:, :2] *= 8.0  # the first two positions near-deterministic: tiny entropy change per unit coefficient
    lp0 = torch.log_softmax(logits, -1).gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1)

    def run(**cfg):
        return _grad(logits, lp0, adv, mask, "thermostat", target=10.0, kp=0.05, ki=0.0, **cfg)

    g0, _ = _grad(logits, lp0, adv, mask, "grpo", eps_high=0.28)
    g_un, m_un = run(allocation="uniform")
    g_ef, m_ef = run(allocation="efficient")
    # both cancel the same predicted amount
    assert m_ef["thermostat/predicted_change_weighted"] == pytest.approx(m_un["thermostat/predicted_change_weighted"])
    w_un, w_ef = g_un / g0, g_ef / g0
    d = predicted_change(logits, lp0, adv[:, None].expand(B, T), mask)
    wrong = d < 0
    det = torch.zeros_like(mask)
    det[:, :2] = True
    assert bool((wrong & det).any()) and bool((wrong & ~det).any())
    # near-deterministic wrong-way tokens keep (almost) their full gradient under "efficient", not under "uniform"
    assert bool((w_ef[wrong & det] > w_un[wrong & det]).all())
    assert bool((w_ef[~wrong] == 1).all()) and bool((w_ef <= 1 + 1e-12).all())
    # the weighted square of the cuts is smaller than the uniform one's
    cf = adv[:, None].expand(B, T).abs()
    assert float((cf * (1 - w_ef) ** 2).sum()) < float((cf * (1 - w_un) ** 2).sum())
    with pytest.raises(ValueError, match="allocation"):
        re.make_method("thermostat", allocation="greedy")


def test_pi_controller_by_hand():
    pi = EntropyPI(kp=2.0, ki=0.5, u_max=1.0, i_max=10.0)
    assert pi.target is None
    assert pi.update(1.0) == 0.0  # first measurement sets the target; error 0
    assert pi.target == 1.0
    # H = 0.8: e = 0.2, I = 0.2, u = 0.4 + 0.1 = 0.5
    assert pi.update(0.8) == pytest.approx(0.5)
    # H = 0.9: e = 0.1, I = 0.3, u = 0.2 + 0.15 = 0.35
    assert pi.update(0.9) == pytest.approx(0.35)
    # far above target: clipped at -1
    assert pi.update(5.0) == -1.0
    q = EntropyPI(kp=2.0, ki=0.5)
    q.load_state_dict(pi.state_dict())
    assert q.state_dict() == pi.state_dict() and q.target == 1.0
    r = EntropyPI(1.0, 0.0, target_scale=0.8, target_end_scale=0.4, schedule_steps=2)
    r.update(2.0)  # start measured: 2.0 -> target 1.6 now, 0.8 after 2 steps
    assert r.target == pytest.approx(0.8 * 2.0 * 0.5 + 0.4 * 2.0 * 0.5)
    r.update(2.0)
    assert r.target == pytest.approx(0.8)
    assert EntropyPI(1.0, 0.0, target=1.0, target_scale=0.5).target == 0.5
    s = EntropyPI(1.0, 0.0, target=2.0, target_end=1.0, schedule_steps=4)
    assert s.target == 2.0
    s.update(2.0)
    s.update(2.0)
    assert s.target == pytest.approx(1.5)


def test_pi_controller_floor_by_hand():
    pi = EntropyPI(kp=2.0, ki=0.5, target=1.0, floor=True)
    # above the floor: e = -0.5, u and I clipped at 0 (the two-sided controller would give -1 and I = -0.5)
    assert pi.update(1.5) == 0.0 and pi.integral == 0.0
    # below: e = 0.2, I = 0.2, u = 0.4 + 0.1 = 0.5 (no negative integral left over to delay the response)
    assert pi.update(0.8) == pytest.approx(0.5)
    two = EntropyPI(kp=2.0, ki=0.5, target=1.0)
    two.update(1.5)
    assert two.update(0.8) == pytest.approx(0.4 + 0.5 * (-0.5 + 0.2))


def test_floor_leaves_entropy_above_target_alone():
    logits, lp0, adv, mask = _random_batch(4)
    B, T = mask.shape
    g0, _ = _grad(logits, lp0, adv, mask, "thermostat", kp=0.0, ki=0.0)
    # target far below the entropy: the two-sided controller damps entropy-raising tokens, the floor does nothing
    g2, m2 = _grad(logits, lp0, adv, mask, "thermostat", target=0.01, floor=False)
    gf, mf = _grad(logits, lp0, adv, mask, "thermostat", target=0.01, floor=True)
    assert m2["thermostat/u"] < 0 and m2["thermostat/damped_frac"] > 0 and not torch.allclose(g2, g0)
    assert mf["thermostat/u"] == 0.0 and torch.equal(gf, g0)
    # far below the target both act alike
    gb, _ = _grad(logits, lp0, adv, mask, "thermostat", target=10.0, floor=True)
    gt, _ = _grad(logits, lp0, adv, mask, "thermostat", target=10.0, floor=False)
    assert torch.equal(gb, gt) and not torch.allclose(gb, g0)
    with pytest.raises(ValueError, match="floor"):
        re.make_method("thermostat", floor="yes")


def _grad_groups(logits, lp0, adv, mask, group_reward, **cfg):
    lp = lp0.clone().requires_grad_(True)
    b = re.TokenBatch(log_prob=lp, old_log_prob=lp0, advantages=adv, mask=mask, logits=logits,
                      group_reward=group_reward)
    out = _primed("thermostat", cfg, b).compute_loss(b)
    out.loss.backward()
    return lp.grad, out.metrics


def test_damp_only_solved_or_unsolved_problems():
    logits, lp0, adv, mask = _random_batch(21)
    mask[2, 4:] = False  # padding changes nothing below
    gr = torch.tensor([0.25, 0.25, 0.75, 0.75], dtype=torch.float64)  # rows 0-1 unsolved, rows 2-3 solved
    g0, _ = _grad_groups(logits, lp0, adv, mask, gr, kp=0.0, ki=0.0)
    low = {"target": 50.0, "kp": 1.0, "solved_at": 0.5}  # far below target: u = 1, as much damping as possible
    ga, ma = _grad_groups(logits, lp0, adv, mask, gr, **low)
    gs, ms = _grad_groups(logits, lp0, adv, mask, gr, damp_only="solved", **low)
    gu, mu = _grad_groups(logits, lp0, adv, mask, gr, damp_only="unsolved", **low)
    assert ms["thermostat/unsolved_frac"] == pytest.approx(12 / 22)
    # "all" is the rule without a split
    g_plain, _ = _grad(logits, lp0, adv, mask, "thermostat", target=50.0, kp=1.0)
    assert torch.equal(ga, g_plain)
    # each shield leaves the other rows' gradient exactly as GRPO's, and damps some of its own rows
    assert torch.equal(gs[:2], g0[:2]) and not torch.allclose(gs[2:][mask[2:]], g0[2:][mask[2:]])
    assert torch.equal(gu[2:], g0[2:]) and not torch.allclose(gu[:2], g0[:2])
    assert 0 < ms["thermostat/damped_frac"] and 0 < mu["thermostat/damped_frac"]
    assert ms["thermostat/damped_frac"] + mu["thermostat/damped_frac"] == pytest.approx(ma["thermostat/damped_frac"])
    # a split above every group rate makes every problem unsolved: the same as no split
    g_all, _ = _grad_groups(logits, lp0, adv, mask, gr, target=50.0, kp=1.0, solved_at=2.0, damp_only="unsolved")
    assert torch.equal(g_all, g_plain)


def test_control_only_unsolved_measures_the_unsolved_entropy():
    logits, lp0, adv, mask = _random_batch(22)
    gr = torch.tensor([0.0, 0.5, 1.0, 0.125], dtype=torch.float64)
    h = stats.entropy(logits)
    unsolved = torch.tensor([True, False, False, True])[:, None].expand_as(mask)
    g, met = _grad_groups(logits, lp0, adv, mask, gr, target=50.0, kp=1.0, solved_at=0.5, damp_only="unsolved",
                          control_only_unsolved=True)
    assert met["thermostat/entropy"] == pytest.approx(h[unsolved].mean().item())
    assert met["thermostat/eligible_frac"] == pytest.approx(0.5)
    g0, _ = _grad_groups(logits, lp0, adv, mask, gr, kp=0.0, ki=0.0)
    assert torch.equal(g[~unsolved], g0[~unsolved])


def test_difficulty_split_needs_group_reward_and_solved_at():
    logits, lp0, adv, mask = _random_batch(23)
    with pytest.raises(ValueError, match="group_reward"):
        _grad(logits, lp0, adv, mask, "thermostat", solved_at=0.5, damp_only="solved")
    with pytest.raises(ValueError, match="solved_at"):
        re.make_method("thermostat", damp_only="solved")
    with pytest.raises(ValueError, match="damp_only"):
        re.make_method("thermostat", solved_at=0.5, damp_only="easy")
    with pytest.raises(ValueError, match="control_only_unsolved"):
        re.make_method("thermostat", solved_at=0.5, control_only_unsolved=1)


def test_pi_anneal_segment_by_hand():
    # first ramp 1.0 -> 0.5 over 4 steps; from step 2 a second ramp from where it stands (0.75) to 0.1 over 2 steps
    pi = EntropyPI(1.0, 0.0, target=1.0, target_end_scale=0.5, schedule_steps=4, anneal_start=2, anneal_steps=2,
                   anneal_end_scale=0.1, floor=True, anneal_two_sided=True)
    seen = []
    for _ in range(6):
        seen.append(pi.target)
        pi.update(0.9)
    assert seen == pytest.approx([1.0, 0.875, 0.75, 0.425, 0.1, 0.1])
    # u is clamped at 0 (floor) before the annealing phase, negative inside it (entropy 0.9 above the target)
    pi = EntropyPI(1.0, 0.0, target=0.5, floor=True, anneal_start=1, anneal_steps=1, anneal_end_scale=0.5,
                   anneal_two_sided=True)
    assert not pi.annealing and pi.update(0.9) == 0.0
    assert pi.annealing
    assert pi.update(0.9) == pytest.approx((0.5 - 0.9) / 0.5)
    # without anneal_two_sided the floor stays
    pi = EntropyPI(1.0, 0.0, target=0.5, floor=True, anneal_start=0, anneal_end_scale=0.5)
    assert pi.update(0.9) == 0.0


def _grad_logits(logits, lp_tok, adv, mask, steps, **cfg):
    """d loss / d logits in the step after ``steps`` controller updates (ratio 1), and its metrics."""
    m = re.make_method("thermostat", **cfg)
    for k in range(steps + 1):
        z = logits.clone().requires_grad_(True)
        lp = torch.log_softmax(z, -1).gather(-1, lp_tok[..., None]).squeeze(-1)
        b = re.TokenBatch(log_prob=lp, old_log_prob=lp.detach(), advantages=adv, mask=mask, logits=z)
        out = m.compute_loss(b, step=k)
    out.loss.backward()
    return z.grad, out.metrics


def test_sharpen_adds_a_controlled_entropy_penalty_only_while_annealing():
    torch.manual_seed(31)
    B, T, V = 4, 6, 7
    logits = torch.randn(B, T, V, dtype=torch.float64)
    tok = torch.randint(V, (B, T))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[3, 4:] = False
    h = stats.entropy(logits)
    h_mean = h[mask].mean().item()
    # a fixed target well below the entropy: the annealing phase starts at the second step
    cfg = {"target": 0.5 * h_mean, "schedule_steps": None, "anneal_start": 1, "anneal_steps": 1,
           "anneal_end_scale": 1.0, "kp": 1.0, "ki": 0.0}
    g_pg, _ = _grad_logits(logits, tok, adv, mask, 2, kp=0.0, ki=0.0)
    g, met = _grad_logits(logits, tok, adv, mask, 2, sharpen=0.2, **cfg)
    u = (0.5 * h_mean - h_mean) / (0.5 * h_mean)  # = -1: saturated
    assert met["thermostat/u"] == pytest.approx(max(u, -1.0))
    beta = 0.2 * 1.0
    assert met["thermostat/sharpen"] == pytest.approx(beta) and met["thermostat/damped_frac"] == 0.0
    # the gradient is the plain policy gradient plus beta x the gradient of the token-mean entropy
    z = logits.clone().requires_grad_(True)
    (beta * stats.entropy(z)[mask].mean()).backward()
    torch.testing.assert_close(g, g_pg + z.grad, rtol=1e-9, atol=1e-12)
    assert torch.all(g[~mask] == 0)  # padding gets no gradient
    # before the annealing phase (one call) and with sharpen = 0 it is the plain policy gradient (floor)
    g1, m1 = _grad_logits(logits, tok, adv, mask, 1, sharpen=0.2, **cfg)
    g1_pg, _ = _grad_logits(logits, tok, adv, mask, 1, kp=0.0, ki=0.0)
    assert m1["thermostat/sharpen"] == 0.0 and torch.equal(g1, g1_pg)
    g0, m0 = _grad_logits(logits, tok, adv, mask, 2, sharpen=0.0, **cfg)
    assert m0["thermostat/u"] == 0.0 and torch.equal(g0, g_pg)
    with pytest.raises(ValueError, match="sharpen"):
        re.make_method("thermostat", sharpen=-0.1)
    with pytest.raises(ValueError, match="anneal_steps"):
        re.make_method("thermostat", anneal_steps=0)
    with pytest.raises(ValueError, match="anneal_end_scale"):
        re.make_method("thermostat", anneal_end_scale=0.0)


def test_prediction_equals_stats_exact_form():
    leaves, tokens = make_leaves(seed=11)
    coef = torch.randn(leaves["mask"].shape, dtype=torch.float64)
    m = leaves["mask"]
    lp_true = torch.log_softmax(leaves["logits"].detach(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    ours = predicted_change(leaves["logits"].detach(), lp_true, coef, m)
    ref = stats.predicted_entropy_change(leaves["logits"].detach(), tokens, coef, form="exact", mask=m)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_config_validation():
    with pytest.raises(ValueError, match="weight_min"):
        re.make_method("thermostat", weight_min=1.5)
    with pytest.raises(ValueError, match="restrict"):
        re.make_method("thermostat", restrict="all")
    with pytest.raises(ValueError, match="target_end"):
        re.make_method("thermostat", target_end=0.0)
    with pytest.raises(ValueError, match="schedule_steps"):
        re.make_method("thermostat", schedule_steps=0)
    with pytest.raises(ValueError, match="target_scale"):
        re.make_method("thermostat", target_scale=0.0)


def test_default_target_ramps_from_first_measurement_to_0_7_over_40_steps():
    leaves, _ = make_leaves(seed=13, B=3, T=6, V=9)
    m = re.make_method("thermostat")
    targets = [m.compute_loss(batch_from(leaves), step=k).metrics["thermostat/target"] for k in range(46)]
    h0 = m.pi.target_start
    assert math.isnan(targets[0])  # nothing measured before the first step
    # step k + 1 applies the update at the end of step k: it has moved k + 1 of the 40 ramp steps
    targets = targets[1:]
    assert targets[0] == pytest.approx(h0 * (1 - 0.3 / 40))
    assert targets[19] == pytest.approx(h0 * (1 - 0.3 * 20 / 40))
    assert targets[39:] == pytest.approx([0.7 * h0] * 6)
    c = m.config
    assert c.floor is True and c.allocation == "efficient" and c.schedule_steps == 40
    # target_end (absolute) takes precedence over the relative end; schedule_steps=None keeps the start value
    m = re.make_method("thermostat", target=2.0, target_end=1.0)
    for k in range(40):
        m.compute_loss(batch_from(leaves), step=k)
        m.end_step()
    assert m.pi.target == pytest.approx(1.0)
    m = re.make_method("thermostat", target=2.0, schedule_steps=None)
    for k in range(5):
        m.compute_loss(batch_from(leaves), step=k)
    assert m.pi.target == pytest.approx(2.0)


def test_restrict_to_siren_positions_damps_only_selected():
    leaves, _ = make_leaves(seed=12, B=4, T=10, V=9)
    # far below target: u = 1 (saturated) from the second step
    out = _primed("thermostat", dict(restrict="siren", target=50.0, kp=1.0), batch_from(leaves)).compute_loss(
        batch_from(leaves))
    assert out.metrics["thermostat/u"] == 1.0
    full = _primed("thermostat", dict(target=50.0, kp=1.0), batch_from(leaves)).compute_loss(batch_from(leaves))
    assert out.metrics["thermostat/damped_frac"] < full.metrics["thermostat/damped_frac"]


def test_restrict_peak_uses_the_full_entropy_peak_and_leaves_the_rest_alone():
    from rlvr_entropy.methods.siren import peak_entropy_mask

    torch.manual_seed(5)
    B, T, V = 4, 10, 9
    logits = torch.randn(B, T, V, dtype=torch.float64) * 1.5
    tok = torch.randint(V, (B, T))
    lp0 = torch.log_softmax(logits, -1).gather(-1, tok[..., None]).squeeze(-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    h = stats.entropy(logits)
    sel = peak_entropy_mask(h, mask, quantile=0.8)

    def grad(name, **cfg):
        return _grad(logits, lp0, adv, mask, name, **cfg)

    g, met = grad("thermostat", restrict="peak", target=50.0, kp=1.0)
    g0, _ = grad("thermostat", kp=0.0, ki=0.0)
    assert met["thermostat/eligible_frac"] == pytest.approx(sel[mask].double().mean().item())
    assert met["thermostat/entropy"] == pytest.approx(h[sel].mean().item())  # the controlled quantity
    assert torch.allclose(g[~sel], g0[~sel])  # positions outside the peak keep the policy gradient
    assert (g[sel] != g0[sel]).any()


def _bandit_run(method_name, steps=150, seed=0, **cfg):
    """Tabular softmax over S contexts x V answers, 3 correct answers per context, GRPO groups of G samples."""
    g = torch.Generator().manual_seed(seed)
    S, V, G = 16, 8, 16
    z = (torch.randn(S, V, generator=g) * 1.5).requires_grad_(True)
    correct = torch.zeros(S, V, dtype=torch.bool)
    for s in range(S):
        correct[s, torch.randperm(V, generator=g)[:3]] = True
    opt = torch.optim.Adam([z], lr=0.1)
    method = re.make_method(method_name, **cfg)
    ents, acc = [], 0.0
    for step in range(steps):
        with torch.no_grad():
            probs = torch.softmax(z, -1)
            acc = float((probs * correct).sum(-1).mean())
            a = torch.multinomial(probs.repeat_interleave(G, 0), 1, generator=g).squeeze(-1)  # [S*G]
            r = correct.repeat_interleave(G, 0).gather(1, a[:, None]).squeeze(-1).float()
            adv = (r.view(S, G) - r.view(S, G).mean(1, keepdim=True)).view(-1)
            old = torch.log_softmax(z, -1).repeat_interleave(G, 0).gather(1, a[:, None])  # [S*G, 1]
            ents.append(float(stats.entropy(z).mean()))
        logits = z.repeat_interleave(G, 0)[:, None, :]  # [S*G, 1, V]
        lp = torch.log_softmax(logits, -1).gather(-1, a[:, None, None]).squeeze(-1)
        batch = re.TokenBatch(log_prob=lp, old_log_prob=old, advantages=adv,
                              mask=torch.ones(S * G, 1, dtype=torch.bool), logits=logits)
        loss = method.compute_loss(batch, step=step).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ents, acc


def test_closed_loop_holds_entropy_where_grpo_collapses():
    """Three valid answers per context: the best policy spreads over them (entropy up to ln 3 = 1.10). Plain GRPO
    concentrates on fewer answers; the thermostat with target 1.0 settles there and still learns."""
    grpo, grpo_acc = _bandit_run("grpo")
    thermo, thermo_acc = _bandit_run("thermostat", target=1.0, schedule_steps=None, kp=4.0, ki=0.5)
    assert grpo[-1] < 0.6 and grpo_acc > 0.95
    tail = thermo[-30:]
    assert max(abs(h - 1.0) for h in tail) < 0.15, tail
    assert thermo_acc > 0.9
