"""kl_cov: hand-derived cases, a loop reference written from the spec (methods.md "Covariance"; arXiv 2505.22617),
properties (top-k by covariance, no RNG, relation to grpo, dual clip), and the global scope through a fake
all-gather. Parity with verl's own compute_policy_loss_kl_cov is in test_verl_parity.py."""
from __future__ import annotations

import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import TokenBatch
from rlvr_entropy.methods.kl_cov import kl_cov_count, kl_cov_select, kl_cov_token_loss
from tests.methods._world import FakeWorld


def rand_batch(seed, B=6, T=10, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(B, T, generator=g, dtype=torch.float64) - 1.0
    old = lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    return lp, old, adv, mask


def loss_grad(method, lp, old, adv, mask):
    leaf = lp.clone().requires_grad_(True)
    out = method.compute_loss(TokenBatch(log_prob=leaf, old_log_prob=old, advantages=adv, mask=mask))
    (g,) = torch.autograd.grad(out.loss, leaf)
    return out, g


# --------------------------------------------------------------------------------------------- hand-derived
def test_loss_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    old = torch.tensor([[-1.5, -2.0, -3.0]], dtype=torch.float64)
    adv = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    # mean A = 1/3, mean log pi = -2: cov = [5/3 * 1, -1/3 * 0, -4/3 * -1] = [1.667, 0, 1.333]
    # k = max(1, int(3 * 0.34)) = 1 -> token 0 (log r = 0.5) gets + 2 |log r|
    out, g = loss_grad(re.make_method("kl_cov", kl_cov_ratio=0.34, ppo_kl_coef=2.0), lp, old, adv, mask)
    e = math.exp(0.5)
    # l = [-2 e^0.5 + 2 * 0.5, 0, -(-1) * 1] -> mean (2 - 2 e^0.5) / 3 = -0.43248...
    assert out.loss.item() == pytest.approx((2 - 2 * e) / 3, rel=1e-12)
    # dl/dlog pi: token 0 (-2 e^0.5 + 2) / 3, token 1 0 (A = 0), token 2 r / 3 = 1 / 3 (no clipping in KL-Cov)
    torch.testing.assert_close(g, torch.tensor([[(2 - 2 * e) / 3, 0.0, 1 / 3]], dtype=torch.float64))
    assert out.metrics["kl_cov/selected_frac"].item() == pytest.approx(1 / 3)
    assert out.metrics["kl_cov/abs_kl"].item() == pytest.approx(0.5 / 3)
    assert out.metrics["kl_cov/selected_abs_kl"].item() == pytest.approx(0.5)
    assert out.metrics["kl_cov/selected_cov_mean"].item() == pytest.approx(5 / 3)


def test_count_and_select_by_hand():
    # max(1, int(ratio * N)), 0 without valid token; 2e-3 * 1000 = 2, 2e-3 * 499 = 0.998 -> 1
    assert (kl_cov_count(2e-3, 1000), kl_cov_count(2e-3, 499), kl_cov_count(2e-3, 0)) == (2, 1, 0)
    cov = torch.tensor([[0.1, 3.0, 9.0], [2.0, 5.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # valid covariances 0.1, 3, 2, 5, 0 (9 is padding): top 2 = 5 and 3
    assert kl_cov_select(cov, mask, 2).tolist() == [[False, True, False], [False, True, False]]
    assert kl_cov_select(cov, mask, 0).sum() == 0


def test_token_loss_by_hand():
    ratio = torch.tensor([[2.0, 4.0, 0.5]])
    log_ratio = ratio.log()
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    sel = torch.tensor([[True, False, True]])
    # [-1 * 2 + 0.5 * ln 2, 4, 0.5 + 0.5 * ln 2]; dual clip 3 bounds token 1 (A < 0, r = 4) at 3
    out = kl_cov_token_loss(ratio, log_ratio, adv, sel, 0.5, 3.0)
    torch.testing.assert_close(out, torch.tensor([[-2 + 0.5 * math.log(2), 3.0, 0.5 + 0.5 * math.log(2)]]))
    assert kl_cov_token_loss(ratio, log_ratio, adv, sel, 0.5)[0, 1].item() == 4.0


# ------------------------------------------------------------------------------------------ loop reference
def reference_kl_cov(lp, old, adv, mask, ratio, beta):
    B, T = mask.shape
    valid = [(i, t) for i in range(B) for t in range(T) if mask[i, t]]
    n = len(valid)
    mean_a = sum(float(adv[i, t]) for i, t in valid) / n
    mean_lp = sum(float(lp[i, t].detach()) for i, t in valid) / n
    cov = {v: (float(adv[v]) - mean_a) * (float(lp[v].detach()) - mean_lp) for v in valid}
    top = set(sorted(valid, key=lambda v: -cov[v])[: max(1, int(ratio * n))])
    total = 0.0
    for v in valid:
        log_r = lp[v] - old[v]
        lt = -adv[v] * torch.exp(log_r)
        total = total + (lt + beta * log_r.abs() if v in top else lt)
    return total / n


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_loop_reference(seed):
    lp, old, adv, mask = rand_batch(seed)
    out, g = loss_grad(re.make_method("kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=0.8), lp, old, adv, mask)
    leaf = lp.clone().requires_grad_(True)
    ref = reference_kl_cov(leaf, old, adv, mask, 0.1, 0.8)
    (gr,) = torch.autograd.grad(ref, leaf)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- properties
def test_penalty_lands_on_the_top_k_covariance_tokens():
    lp, old, adv, mask = rand_batch(4, B=8, T=12)
    out, g = loss_grad(re.make_method("kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=0.5), lp, old, adv, mask)
    _, g0 = loss_grad(re.make_method("kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=0.0), lp, old, adv, mask)
    n = int(mask.sum())
    k = max(1, int(0.1 * n))
    diff = g - g0
    hit = diff != 0
    assert int(hit.sum()) == k
    # the difference is beta sign(log r) / N (token-mean) ...
    torch.testing.assert_close(diff[hit], 0.5 * torch.sign(lp - old)[hit] / n, rtol=1e-12, atol=1e-15)
    # ... on the tokens of largest covariance
    a, l_ = adv[mask], lp[mask]
    cov = torch.zeros_like(lp)
    cov[mask] = (a - a.mean()) * (l_ - l_.mean())
    assert cov[hit].min() > cov[mask & ~hit].max()


def test_no_clipping_and_relation_to_grpo():
    lp, old, adv, mask = rand_batch(5, spread=0.6)
    out0, g0 = loss_grad(re.make_method("kl_cov", ppo_kl_coef=0.0), lp, old, adv, mask)
    r = torch.exp(lp - old)
    ref = torch.where(mask, -adv * r, 0.0).sum() / mask.sum()
    torch.testing.assert_close(out0.loss, ref, rtol=1e-12, atol=1e-12)
    grpo, _ = loss_grad(re.make_method("grpo"), lp, old, adv, mask)
    assert grpo.metrics["grpo/clip_frac"] > 0 and not torch.allclose(out0.loss, grpo.loss)
    # where PPO clips nothing (r within [0.8, 1.2]) and beta = 0, KL-Cov is grpo
    close = lp + 0.05 * torch.tanh(old - lp)
    a, ga = loss_grad(re.make_method("kl_cov", ppo_kl_coef=0.0), lp, close, adv, mask)
    b, gb = loss_grad(re.make_method("grpo"), lp, close, adv, mask)
    assert b.metrics["grpo/clip_frac"] == 0
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


def test_selection_is_deterministic_and_uses_no_rng():
    lp, old, adv, mask = rand_batch(6)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a, ga = loss_grad(re.make_method("kl_cov", kl_cov_ratio=0.1), lp, old, adv, mask)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(99)
    b, gb = loss_grad(re.make_method("kl_cov", kl_cov_ratio=0.1), lp, old, adv, mask)
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)


def test_dual_clip_bounds_negative_advantage_tokens():
    lp, old, adv, mask = rand_batch(7)
    old = lp - math.log(3.0)  # r = 3
    out, g = loss_grad(re.make_method("kl_cov", ppo_kl_coef=0.0, dual_clip=2.0), lp, old, adv, mask)
    neg = mask & (adv < 0)
    assert torch.equal(g[neg], torch.zeros_like(g[neg]))                  # bounded at -c A: no gradient
    torch.testing.assert_close(g[mask & (adv > 0)], (-adv * 3.0 / mask.sum())[mask & (adv > 0)])
    assert out.metrics["kl_cov/dual_clip_frac"].item() == pytest.approx((neg.sum() / mask.sum()).item())


def test_half_precision_inputs_run():
    lp, old, adv, mask = rand_batch(8)
    out = re.make_method("kl_cov", kl_cov_ratio=0.1).compute_loss(
        TokenBatch(log_prob=lp.to(torch.bfloat16).requires_grad_(True), old_log_prob=old.to(torch.bfloat16),
                   advantages=adv.float(), mask=mask))
    assert torch.isfinite(out.loss) and out.metrics["kl_cov/selected_frac"] > 0


def test_config_errors():
    for kw, field in ((dict(kl_cov_ratio=0.0), "kl_cov_ratio"), (dict(kl_cov_ratio=1.5), "kl_cov_ratio"),
                      (dict(ppo_kl_coef=-1.0), "ppo_kl_coef"), (dict(scope="batch"), "scope")):
        with pytest.raises(ValueError, match=field):
            re.make_method("kl_cov", **kw)


# --------------------------------------------------------------------------------------------- global scope
def grpo_like_batch():
    """One advantage per response, log-probs from a small set: many equal covariances (ties at the top-k)."""
    B, T = 9, 8
    g = torch.Generator().manual_seed(1)
    adv = torch.tensor([1.0, -1.0, 0.5] * 3, dtype=torch.float64)[:, None].expand(B, T).contiguous()
    lp = torch.tensor([-0.25, -2.0, -1.0], dtype=torch.float64)[torch.randint(0, 3, (B, T), generator=g)]
    old = lp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    return lp, old, adv, mask


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("ranges", [[(0, 4), (4, 9)], [(0, 3), (3, 5), (5, 9)]])
def test_global_scope_selects_what_the_concatenated_batch_selects(ranges, ties):
    lp, old, adv, mask = grpo_like_batch() if ties else rand_batch(9, B=9, T=8)
    if len(ranges) == 3:
        mask[3:5] = False  # a rank without valid tokens still takes part in every gather
    kw = dict(kl_cov_ratio=0.15, ppo_kl_coef=0.7, loss_agg_mode="token-sum")
    full, g_full = loss_grad(re.make_method("kl_cov", **kw), lp, old, adv, mask)
    world = FakeWorld(len(ranges))

    def rank_fn(r, scope):
        a, b = ranges[r]
        m = re.make_method("kl_cov", scope=scope, **kw)
        m.gather_fn = world.gather_fn(r)
        return loss_grad(m, lp[a:b], old[a:b], adv[a:b], mask[a:b])

    outs = world.run([lambda r=r: rank_fn(r, "global") for r in range(len(ranges))])
    torch.testing.assert_close(sum(o.loss for o, _ in outs), full.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([g for _, g in outs]), g_full, rtol=1e-12, atol=1e-12)
    assert world.calls == [2] * len(ranges)  # one gather of the sums, one of the covariances, on every rank
    local = world.run([lambda r=r: rank_fn(r, "micro_batch") for r in range(len(ranges))])
    assert not torch.equal(torch.cat([g for _, g in local]), g_full)


def test_gradcheck_with_penalized_tokens():
    lp, old, adv, mask = rand_batch(10, B=3, T=5)
    m = re.make_method("kl_cov", kl_cov_ratio=0.3, dual_clip=3.0)

    def f(x):
        return m.compute_loss(TokenBatch(log_prob=x, old_log_prob=old, advantages=adv, mask=mask))

    x = lp.clone().requires_grad_(True)
    assert f(x).metrics["kl_cov/selected_frac"] > 0
    assert torch.autograd.gradcheck(lambda y: f(y).loss, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
