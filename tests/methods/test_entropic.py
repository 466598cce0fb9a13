"""EntroPIC: the loss and the controller by hand (entropic.md sections 1-2 and its edge cases: the tie at log 0.95,
no confident token, the unclipped ratio, verl@4424616d's aggregations, IS weights), parity of the public loss and of
an official micro-batch loop with a reference written from the spec, and the method under the step protocol
(per-micro-batch proportional term, one rank-invariant integral update per step, state round trip, options)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.methods.entropic import EntroPICController, confident_mask, entropic_policy_loss
from tests.helpers import batch_from, loss_and_grads, make_leaves
from tests.methods._world import FakeWorld

F64 = torch.float64
LOG095 = float(torch.log(torch.tensor(0.95)))  # float32 log, as the official code


# ------------------------------------------------------------------------------ reference written from the spec
def ref_agg(vals, mask, mode):
    """verl@4424616d agg_loss one number at a time (entropic.md section 4): token-mean / (n + 1e-8); seq modes drop
    empty rows (+ 1e-8 in the means); seq-mean-token-sum-norm = sum of row sums / padded T."""
    B, T = len(vals), len(vals[0])
    if mode == "token-mean":
        s = sum(vals[i][t] for i in range(B) for t in range(T) if mask[i][t])
        return s / (sum(mask[i][t] for i in range(B) for t in range(T)) + 1e-8)
    rows = []
    for i in range(B):
        n = sum(mask[i])
        s = sum(vals[i][t] for t in range(T) if mask[i][t])
        rows.append((s / (n + 1e-8) if mode == "seq-mean-token-mean" else s, n > 0))
    if mode == "seq-mean-token-sum-norm":
        return sum(s for s, _ in rows) / T
    kept = [s for s, ok in rows if ok]
    return sum(kept) / (len(kept) + 1e-8)


def ref_entropic_loss(lp, old, adv, mask, alpha, *, tau=0.95, eps_low=0.2, eps_high=0.2, c=3.0,
                      mode="token-mean", isw=None):
    """compute_policy_loss_entropic from entropic.md section 2, token by token, in Python floats."""
    B, T = len(lp), len(lp[0])
    thr = float(torch.log(torch.tensor(tau)))
    pg, adj, conf = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)], [[False] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            a = adv[i][t]
            r = math.exp(min(max(lp[i][t] - old[i][t], -20.0), 20.0))
            l = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
            if a < 0:
                l = min(l, -c * a)
            pg[i][t] = l * (isw[i][t] if isw is not None else 1.0)
            adj[i][t] = -r * abs(a)
            conf[i][t] = bool(mask[i][t]) and lp[i][t] > thr
    return ref_agg(pg, mask, mode) + alpha * ref_agg(adj, conf, mode)


class RefController:
    """dp_actor.py:138-146 as written: alpha from I_{k-1}, then I += e * rows / mini_batch."""

    def __init__(self, target, kp=1.0, ki=0.01):
        self.t, self.kp, self.ki, self.I = target, kp, ki, 0.0

    def step(self, h, rows=1, mini_batch=1):
        a = float(np.clip(self.I * self.ki + (h - self.t) * self.kp, -1.0, 1.0))
        self.I += (h - self.t) * rows / mini_batch
        return a


def tensors(seed, B=5, T=6, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=F64) ** 2 * 0.6          # many above log 0.95
    old = lp + spread * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[0] = True
    return lp, old, adv, mask


def L(x):
    return x.tolist()


# ----------------------------------------------------------------------------------------------- by hand
def test_loss_and_gradient_by_hand():
    # on-policy, token-mean; confident tokens (0,0) p=.99 and (1,0) p=.97
    lp = torch.log(torch.tensor([[0.99, 0.5], [0.97, 0.2]], dtype=F64)).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss = entropic_policy_loss(lp, lp.detach(), adv, mask, alpha=0.5)
    # L_PG = mean(-A) = 0; L_adj = mean over the 2 confident tokens of -|A| = -1; loss = 0.5 * -1
    assert loss.item() == pytest.approx(-0.5, abs=1e-7)
    (g,) = torch.autograd.grad(loss, lp)
    # dL_PG = -A r / 4; dL_adj = -alpha |A| r / 2 on confident tokens: the confident negative token gets 0
    torch.testing.assert_close(g, torch.tensor([[-0.5, -0.25], [0.0, 0.25]], dtype=F64), atol=1e-7, rtol=0)


def test_alpha_sign_sharpens_or_flattens():
    lp = torch.log(torch.tensor([[0.99, 0.5]], dtype=F64)).requires_grad_(True)
    for alpha, expect in [(0.5, -0.5 - 0.5), (-0.5, -0.5 + 0.5), (0.0, -0.5)]:  # -A / N - alpha |A| / N_M
        (g,) = torch.autograd.grad(entropic_policy_loss(lp, lp.detach(), torch.tensor([1.0], dtype=F64),
                                                        torch.ones(1, 2, dtype=torch.bool), alpha=alpha), lp)
        assert g[0, 0].item() == pytest.approx(expect, abs=1e-7)   # confident token: pushed harder / less
        assert g[0, 1].item() == pytest.approx(-0.5, abs=1e-7)     # not confident: L_PG only (-A / N)


def test_tie_at_log_095_is_excluded_and_current_log_prob_decides():
    thr = torch.tensor(LOG095, dtype=torch.float32)
    above = torch.nextafter(thr, torch.tensor(0.0))
    lp = torch.stack([thr, above, torch.tensor(-1.0)]).view(1, 3)
    m = confident_mask(lp, torch.ones(1, 3, dtype=torch.bool))
    assert m.tolist() == [[False, True, False]]
    assert LOG095 == pytest.approx(-0.0512933060, abs=1e-9)
    # on-policy, A = 1: L_PG = -1, L_adj = -1 (only the token above the tie); the old log-prob does not move the
    # mask: off-policy by e^5 the PG term clips at 1.2 and the confident token's unclipped ratio is e^5
    ones = torch.ones(1, 3, dtype=torch.bool)
    assert entropic_policy_loss(lp, lp, torch.ones(1), ones, alpha=1.0).item() == pytest.approx(-2.0, rel=1e-6)
    off = entropic_policy_loss(lp, lp - 5.0, torch.ones(1), ones, alpha=1.0)
    assert off.item() == pytest.approx(-1.2 - math.exp(5.0), rel=1e-6)
    assert confident_mask(lp, torch.tensor([[True, False, True]])).tolist() == [[False, False, False]]


def test_no_confident_token_gives_exactly_the_pg_loss():
    lp, old, adv, mask = tensors(1)
    lp = lp - 1.0  # every p < 0.95
    base = entropic_policy_loss(lp, old, adv, mask, alpha=0.0)
    for alpha in (1.0, -1.0, 0.37):
        assert torch.equal(entropic_policy_loss(lp, old, adv, mask, alpha=alpha), base)


def test_unclipped_ratio_lets_one_stale_token_dominate():
    # off-policy: one confident token with log-ratio 21 -> clamped to 20, r = e^20, not clipped in L_adj
    lp = torch.tensor([[-0.01, -2.0]], dtype=F64)
    old = torch.tensor([[-21.01, -2.0]], dtype=F64)
    adv = torch.tensor([[1.0, 1.0]], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = entropic_policy_loss(lp, old, adv, mask, alpha=1.0)
    # L_PG = mean(-A clip(r)) = (-1.2 - 1) / 2; L_adj = -e^20 (one confident token)
    assert loss.item() == pytest.approx(-1.1 - math.exp(20.0) / (1 + 1e-8), rel=1e-12)  # verl: / (n + 1e-8)
    assert loss.item() < -4.8e8
    # the method's option clips the ratio in L_adj
    m = re.make_method("entropic", adjust_ratio="clipped", kp=0.0, ki=0.0, alpha_max=1.0)
    m2 = re.make_method("entropic", adjust_ratio="clipped", target=-1.0)  # alpha = clip(1 * (0 + 1)) = 1
    b = re.TokenBatch(log_prob=lp, old_log_prob=old, advantages=adv, mask=mask, entropy=torch.zeros(1, 2, dtype=F64))
    assert m.compute_loss(b).loss.item() == pytest.approx(-1.1, rel=1e-12)
    assert m2.compute_loss(b).loss.item() == pytest.approx(-1.1 - 1.2, rel=1e-12)


def test_verl_4424616d_aggregations_by_hand():
    # rows: [c0 c1 pad], [pad pad pad] (empty), [c2 pad pad]; on-policy, A = 1: per-token PG loss -1, adj -1
    lp = torch.full((3, 3), -0.01, dtype=F64)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    adv = torch.ones(3, dtype=F64)
    exp = {  # L_PG + 1 * L_adj, both with the same mode
        "token-mean": 2 * (-3 / (3 + 1e-8)),
        "seq-mean-token-mean": 2 * ((-2 / (2 + 1e-8) - 1 / (1 + 1e-8)) / (2 + 1e-8)),
        "seq-mean-token-sum": 2 * ((-2 - 1) / (2 + 1e-8)),
        "seq-mean-token-sum-norm": 2 * ((-2 - 1) / 3),   # row sums summed, / padded T (no row mean)
    }
    for mode, value in exp.items():
        got = entropic_policy_loss(lp, lp, adv, mask, alpha=1.0, loss_agg_mode=mode)
        assert got.item() == pytest.approx(value, rel=1e-12), mode
    with pytest.raises(ValueError, match="loss_agg_mode"):
        entropic_policy_loss(lp, lp, adv, mask, alpha=1.0, loss_agg_mode="token-sum")


def test_is_weights_apply_to_the_pg_term_only_and_dual_clip():
    lp = torch.tensor([[-0.01, -1.0]], dtype=F64)
    old = torch.tensor([[-0.01, -3.0]], dtype=F64)      # second token r = e^2 > 3 with A < 0: dual clip
    adv = torch.tensor([[1.0, -1.0]], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = torch.tensor([[0.5, 2.0]], dtype=F64)
    loss = entropic_policy_loss(lp, old, adv, mask, alpha=0.25, is_weights=w)
    pg = (0.5 * -1.0 + 2.0 * 3.0) / 2               # token 2: min(max(e^2, 1.2), 3) = 3
    adj = -1.0                                      # only token 1 is confident, no weight
    assert loss.item() == pytest.approx(pg + 0.25 * adj, rel=1e-7)
    no_dual = entropic_policy_loss(lp, old, adv, mask, alpha=0.0, dual_clip=None)
    assert no_dual.item() == pytest.approx((-1.0 + math.exp(2.0)) / 2, rel=1e-7)


def test_controller_by_hand():
    c = EntroPICController(0.1, kp=1.0, ki=0.01)
    assert c.update(0.3) == pytest.approx(0.2) and c.integral == pytest.approx(0.2)          # P only at first
    assert c.update(0.3) == pytest.approx(0.2 + 0.01 * 0.2) and c.integral == pytest.approx(0.4)
    assert c.update(0.05) == pytest.approx(0.004 - 0.05) and c.integral == pytest.approx(0.35)
    assert c.update(3.0) == 1.0 and c.integral == pytest.approx(3.25)                          # output clipped
    assert c.update(0.1, weight=0.25) == pytest.approx(0.0325) and c.integral == pytest.approx(3.25)
    c.update(0.5, weight=0.5)
    assert c.integral == pytest.approx(3.45)
    # no anti-windup: after a long stretch above, alpha stays positive below the target for a while
    w = EntroPICController(0.1)
    for _ in range(50):
        w.update(0.5)                                  # I = 20
    assert w.alpha(0.0) == pytest.approx(0.2 - 0.1)    # still sharpening with entropy below the target
    a = EntroPICController(0.1, integral_max=1.0)
    for _ in range(50):
        a.update(0.5)
    assert a.integral == 1.0 and a.alpha(0.0) == pytest.approx(0.01 - 0.1)
    p_only = EntroPICController(0.1, ki=0.0)
    for h in (0.9, 0.9):
        assert p_only.update(h) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="entropy"):
        c.update(float("nan"))
    with pytest.raises(ValueError, match="weight"):
        c.update(0.1, weight=-1.0)
    s = c.state_dict()
    c2 = EntroPICController(0.1)
    c2.load_state_dict(s)
    assert c2.state_dict() == s and c2.alpha(0.2) == c.alpha(0.2)


# --------------------------------------------------------------------------------------- parity with the ref
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_public_loss_matches_the_reference(mode, seed):
    lp, old, adv, mask = tensors(seed)
    mask[2] = False  # a fully masked row
    isw = (torch.rand(lp.shape, generator=torch.Generator().manual_seed(seed)) + 0.5).to(F64) if seed == 2 else None
    alpha = [0.3, -0.7, 1.0][seed]
    kw = dict(eps_low=0.2, eps_high=0.28 if seed == 1 else 0.2)
    x = lp.clone().requires_grad_(True)
    got = entropic_policy_loss(x, old, adv, mask, alpha=alpha, loss_agg_mode=mode, is_weights=isw, **kw)
    ref = ref_entropic_loss(L(lp), L(old), L(adv), L(mask), alpha, mode=mode, isw=None if isw is None else L(isw),
                            **kw)
    assert got.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    # gradient: central differences of the reference (the masks are constants away from ties)
    (g,) = torch.autograd.grad(got, x)
    h = 1e-6
    for i, t in [(0, 0), (0, 3), (1, 2), (4, 5)]:
        if not mask[i, t]:
            assert g[i, t] == 0
            continue
        up, dn = lp.clone(), lp.clone()
        up[i, t] += h
        dn[i, t] -= h
        f = lambda z: ref_entropic_loss(L(z), L(old), L(adv), L(mask), alpha, mode=mode,  # noqa: E731
                                        isw=None if isw is None else L(isw), **kw)
        assert g[i, t].item() == pytest.approx((f(up) - f(dn)) / (2 * h), rel=1e-5, abs=1e-7)


def test_method_one_micro_batch_per_step_equals_the_official_loop():
    """The official actor loop (alpha from I_{k-1} and this micro-batch's H_k, then I += e_k), micro-batch by
    micro-batch, against the method with one micro-batch per optimizer step."""
    ref = RefController(0.1)
    m = re.make_method("entropic", target=0.1)
    for k in range(6):
        lp, old, adv, mask = tensors(10 + k)
        ent = torch.rand(lp.shape, generator=torch.Generator().manual_seed(k), dtype=F64) * (0.05 + 0.1 * k)
        h = float((ent * mask).sum() / mask.sum())
        alpha = ref.step(h)
        out = m.compute_loss(re.TokenBatch(log_prob=lp, old_log_prob=old, advantages=adv, mask=mask, entropy=ent),
                             step=k)
        m.end_step()
        assert out.metrics["entropic/alpha"] == pytest.approx(alpha, rel=1e-12, abs=1e-15)
        expect = ref_entropic_loss(L(lp), L(old), L(adv), L(mask), alpha)
        assert out.loss.item() == pytest.approx(expect, rel=1e-7)
        assert m.ctrl.integral == pytest.approx(ref.I, rel=1e-12, abs=1e-15)


def test_step_integral_equals_the_official_weighted_sum_for_equal_micro_batches():
    """Four micro-batches of equal rows and tokens in one optimizer step: the official I gains
    sum_k e_k rows_k / mini_batch; the method gains the step's token-mean error: the same number. Within the step
    each micro-batch's alpha uses its own H_k (P term) and the integral from before the step."""
    ref = RefController(0.1)
    m = re.make_method("entropic", target=0.1)
    for step in range(3):
        i_before = m.ctrl.integral
        for k in range(4):
            lp, old, adv, _ = tensors(100 + 4 * step + k, B=2, T=5)
            mask = torch.ones(2, 5, dtype=torch.bool)
            ent = torch.full((2, 5), 0.05 * (k + 1) + 0.1 * step, dtype=F64)
            h = float(ent.mean())
            ref_alpha = ref.step(h, rows=2, mini_batch=8)
            out = m.compute_loss(re.TokenBatch(log_prob=lp, old_log_prob=old, advantages=adv, mask=mask,
                                               entropy=ent), step=step)
            mine = float(np.clip(i_before * 0.01 + (h - 0.1), -1, 1))
            assert out.metrics["entropic/alpha"] == pytest.approx(mine, rel=1e-12)
            assert abs(mine - ref_alpha) <= 0.01 * 0.3 + 1e-12       # the documented within-step lag
        m.end_step()
        assert m.ctrl.integral == pytest.approx(ref.I, rel=1e-12)
    assert m.ctrl.updates == 3


# -------------------------------------------------------------------------------------------- properties
def test_public_loss_padding_changes_nothing_and_masked_tokens_get_no_gradient():
    lp, old, adv, mask = tensors(3)
    x = lp.clone().requires_grad_(True)
    a = entropic_policy_loss(x, old, adv, mask, alpha=0.4)
    (ga,) = torch.autograd.grad(a, x)
    assert torch.equal(ga[~mask], torch.zeros_like(ga[~mask]))
    pad = lambda z, v: torch.cat([torch.where(mask, z, torch.full_like(z, v)), torch.full((5, 2), v, dtype=F64)], 1)  # noqa: E731
    y = pad(lp, float("nan")).requires_grad_(True)
    mp = torch.cat([mask, torch.zeros(5, 2, dtype=torch.bool)], 1)
    b = entropic_policy_loss(y, pad(old, float("nan")), pad(adv, float("nan")), mp, alpha=0.4)
    (gb,) = torch.autograd.grad(b, y)
    assert b.item() == pytest.approx(a.item(), rel=1e-12)
    torch.testing.assert_close(gb[:, :6], ga, rtol=1e-12, atol=1e-15)
    assert torch.equal(gb[:, 6:], torch.zeros(5, 2, dtype=F64))


def test_neutral_setting_equals_grpo_with_dual_clip_3():
    leaves, _ = make_leaves(seed=11)
    out, g = loss_and_grads(re.make_method("entropic", kp=0.0, ki=0.0), leaves)
    ref, gr = loss_and_grads(re.make_method("grpo", dual_clip=3.0), leaves)
    assert torch.equal(out.loss, ref.loss) and torch.equal(g["log_prob"], gr["log_prob"])


def test_fold_option_is_the_per_token_reweighting():
    # fold: L_adj normalized by N, so on-policy the confident tokens' loss is -(1 + alpha sign A) A / N
    lp = torch.log(torch.tensor([[0.99, 0.5], [0.97, 0.2]], dtype=F64)).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    b = re.TokenBatch(log_prob=lp, old_log_prob=lp.detach(), advantages=adv, mask=torch.ones(2, 2, dtype=torch.bool),
                      entropy=torch.full((2, 2), 0.6, dtype=F64))
    m = re.make_method("entropic", fold=True, target=0.1, kp=1.0, ki=0.0)        # alpha = 0.5
    out = m.compute_loss(b)
    w = torch.tensor([[1.5, 1.0], [0.5, 1.0]], dtype=F64)
    A = adv[:, None].expand(2, 2)
    assert out.loss.item() == pytest.approx(float((-(w * A)).mean()), abs=1e-12) == -0.25
    (g,) = torch.autograd.grad(out.loss, lp)
    torch.testing.assert_close(g, -(w * A) / 4, atol=1e-12, rtol=0)


def test_method_state_is_rank_invariant_and_saved():
    world = FakeWorld(2)
    ranks = [re.make_method("entropic") for _ in range(2)]
    for r, m in enumerate(ranks):
        m.gather_fn = world.gather_fn(r)
    data = [make_leaves(seed=60 + k, B=4)[0] for k in range(3)]

    def run(r):
        for step, lv in enumerate(data):
            part = {k: (v[2 * r:2 * r + 2].detach() if isinstance(v, torch.Tensor) and v.dim() >= 1 else v)
                    for k, v in lv.items()}
            ranks[r].compute_loss(batch_from(part), step=step)
            ranks[r].end_step()
        return ranks[r].state_dict()

    s0, s1 = world.run([lambda r=r: run(r) for r in range(2)])
    assert s0 == s1 and s0["pi"]["updates"] == 3 and s0["pi"]["integral"] != 0.0
    one = re.make_method("entropic")
    for step, lv in enumerate(data):
        one.compute_loss(batch_from(lv), step=step)
        one.end_step()
    assert one.state_dict()["pi"]["integral"] == pytest.approx(s0["pi"]["integral"], rel=1e-12)
    restored = re.make_method("entropic")
    restored.load_state_dict(s0)
    assert restored.ctrl.integral == s0["pi"]["integral"]


def test_empty_micro_batch_measures_nothing():
    m = re.make_method("entropic")
    b = re.TokenBatch(log_prob=torch.zeros(1, 2), old_log_prob=torch.zeros(1, 2), advantages=torch.ones(1),
                      mask=torch.zeros(1, 2, dtype=torch.bool), entropy=torch.zeros(1, 2))
    out = m.compute_loss(b, step=0)
    m.end_step()
    assert out.loss.item() == 0.0 and m.ctrl.updates == 0 and math.isnan(out.metrics["entropic/entropy"])


def test_validation_names_the_argument():
    lp, old, adv, mask = tensors(4)
    with pytest.raises(ValueError, match="old_log_prob"):
        entropic_policy_loss(lp, old[:, :-1], adv, mask, alpha=0.1)
    bad = lp.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="log_prob"):
        entropic_policy_loss(bad, old, adv, mask, alpha=0.1)
    with pytest.raises(ValueError, match="alpha"):
        entropic_policy_loss(lp, old, adv, mask, alpha=float("nan"))
    with pytest.raises(ValueError, match="high_prob_threshold"):
        entropic_policy_loss(lp, old, adv, mask, alpha=0.1, high_prob_threshold=1.0)
    with pytest.raises(ValueError, match="is_weights"):
        entropic_policy_loss(lp, old, adv, mask, alpha=0.1, is_weights=torch.ones(2, 2))
    with pytest.raises(ValueError, match="dual_clip"):
        entropic_policy_loss(lp, old, adv, mask, alpha=0.1, dual_clip=1.0)
    assert torch.isfinite(entropic_policy_loss(lp, old, adv, mask, alpha=np.float64(0.2)))
    for kw, name in [({"kp": float("nan")}, "kp"), ({"ki": float("inf")}, "ki"), ({"alpha_max": -1.0}, "alpha_max"),
                     ({"adjust_ratio": "x"}, "adjust_ratio"), ({"high_prob_threshold": 0.0}, "high_prob_threshold"),
                     ({"fold": 1}, "fold"), ({"integral_max": -1.0}, "integral_max")]:
        with pytest.raises(ValueError, match=name):
            re.make_method("entropic", **kw)
