"""clip_cov: hand-derived cases, a loop reference written from the spec (methods.md "Covariance"; arXiv 2505.22617),
properties (exact count, gradient elsewhere untouched, seeding, resume), and the global scope through a fake
all-gather. Parity with verl's own compute_policy_loss_clip_cov is in test_verl_parity.py."""
from __future__ import annotations

import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import TokenBatch
from rlvr_entropy.methods.clip_cov import (clip_cov_count, clip_cov_eligible, clip_cov_select, covariance_sums,
                                           token_covariance)
from tests.methods._world import FakeWorld


def rand_batch(seed, B=6, T=10, spread=0.3, adv_scale=2.0, token_adv=True):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, T, generator=g, dtype=torch.float64) - 1.0)
    old = lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * adv_scale if token_adv else \
        torch.randn(B, generator=g, dtype=torch.float64) * adv_scale
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    return lp, old, adv, mask


def loss_grad(method, lp, old, adv, mask, step=None):
    leaf = lp.clone().requires_grad_(True)
    out = method.compute_loss(TokenBatch(log_prob=leaf, old_log_prob=old, advantages=adv, mask=mask), step=step)
    (g,) = torch.autograd.grad(out.loss, leaf)
    return out, g


# --------------------------------------------------------------------------------------------- hand-derived
def test_token_covariance_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -3.0, float("nan")]])
    a = torch.tensor([[1.0, 0.0, -1.0, float("nan")]])
    m = torch.tensor([[True, True, True, False]])
    # means over the 3 valid tokens: A 0, log pi -2 -> cov = [1 * 1, 0 * 0, -1 * -1] = [1, 0, 1]; padding 0
    assert token_covariance(lp, a, m).tolist() == [[1.0, 0.0, 1.0, 0.0]]
    # [B] advantages broadcast over the row; means given explicitly replace the batch means
    lp2 = torch.tensor([[0.0, -2.0], [-1.0, -1.0]])
    m2 = torch.ones(2, 2, dtype=torch.bool)
    # A per token [[2, 2], [0, 0]]: mean A 1, mean log pi -1 -> [[1 * 1, 1 * -1], [-1 * 0, -1 * 0]]
    assert token_covariance(lp2, torch.tensor([2.0, 0.0]), m2).tolist() == [[1.0, -1.0], [0.0, 0.0]]
    # means (0, 0): cov = A * log pi
    assert token_covariance(lp2, torch.tensor([2.0, 0.0]), m2, means=(0.0, 0.0)).tolist() == [[0.0, -4.0],
                                                                                               [0.0, 0.0]]
    # the sums the global scope gathers: [sum A, sum log pi, N] over valid tokens
    assert covariance_sums(lp, a, m).tolist() == [0.0, -6.0, 3.0]


def test_eligibility_and_count_by_hand():
    cov = torch.tensor([[0.5, 1.0, 1.5, 4.9, 5.0, 3.0, 2.0]])
    clipped = torch.tensor([[False, False, False, False, False, True, False]])
    mask = torch.tensor([[True, True, True, True, True, True, False]])
    # open window (1, 5): 0.5 below, 1.0 and 5.0 on the bounds, 3.0 clipped by PPO, 2.0 padding
    assert clip_cov_eligible(cov, mask, clipped, 1.0, 5.0).tolist() == [[False, False, True, True, False, False,
                                                                         False]]
    # max(1, int(ratio * N)): 2e-4 * 4999 = 0.9998 -> 1; 2e-4 * 15000 = 3; always at least 1
    assert (clip_cov_count(2e-4, 4999), clip_cov_count(2e-4, 15000), clip_cov_count(2e-4, 0)) == (1, 3, 1)


def test_loss_by_hand_one_eligible_token():
    # r = 1 everywhere; A = [3, 0, 0, -1] (mean 0.5), log pi = [0, -1, -2, -3] (mean -1.5)
    # cov = [2.5 * 1.5, -0.5 * 0.5, -0.5 * -0.5, -1.5 * -1.5] = [3.75, -0.25, 0.25, 2.25]: only token 0 in (3, 5)
    lp = torch.tensor([[0.0, -1.0, -2.0, -3.0]], dtype=torch.float64)
    adv = torch.tensor([[3.0, 0.0, 0.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    out, g = loss_grad(re.make_method("clip_cov", lb=3.0, ub=5.0), lp, lp, adv, mask)
    # token 0 detached; l = -A r on the rest: (0 + 0 + 1) / 4 valid tokens (the denominator is unchanged)
    assert out.loss.item() == pytest.approx(0.25)
    assert g.tolist() == [[0.0, 0.0, 0.0, 0.25]]
    assert out.metrics["clip_cov/selected_frac"].item() == 0.25
    assert out.metrics["clip_cov/eligible_frac"].item() == 0.25
    assert out.metrics["clip_cov/cov_mean"].item() == pytest.approx((3.75 - 0.25 + 0.25 + 2.25) / 4)
    assert out.metrics["clip_cov/selected_cov_mean"].item() == pytest.approx(3.75)
    # grpo on the same batch: (-3 + 0 + 0 + 1) / 4, token 0 keeps its gradient -A r / 4 = -0.75
    ref, gr = loss_grad(re.make_method("grpo"), lp, lp, adv, mask)
    assert ref.loss.item() == pytest.approx(-0.5) and gr.tolist() == [[-0.75, 0.0, 0.0, 0.25]]


# ------------------------------------------------------------------------------------------ loop reference
def reference_clip_cov(lp, old, adv, mask, ratio, lb, ub, eps_low, eps_high):
    """The spec with plain loops; draws with torch.randperm from the global RNG (seed it before calling)."""
    B, T = mask.shape
    valid = [(i, t) for i in range(B) for t in range(T) if mask[i, t]]
    n = len(valid)
    mean_a = sum(float(adv[i, t]) for i, t in valid) / n
    mean_lp = sum(float(lp[i, t].detach()) for i, t in valid) / n
    token_loss, eligible = {}, []
    for i, t in valid:
        r = torch.exp(lp[i, t] - old[i, t])
        l1 = -adv[i, t] * r
        l2 = -adv[i, t] * torch.clamp(r, 1 - eps_low, 1 + eps_high)
        token_loss[(i, t)] = torch.maximum(l1, l2)
        cov = (float(adv[i, t]) - mean_a) * (float(lp[i, t].detach()) - mean_lp)
        if not float(l2.detach()) > float(l1.detach()) and lb < cov < ub:
            eligible.append((i, t))
    chosen = set()
    if eligible:
        perm = torch.randperm(len(eligible))
        chosen = {eligible[j] for j in perm[: max(1, int(ratio * n))].tolist()}
    return sum(token_loss[v] for v in valid if v not in chosen) / n, chosen


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_loop_reference(seed):
    lp, old, adv, mask = rand_batch(seed)
    m = re.make_method("clip_cov", clip_cov_ratio=0.05, lb=0.3, ub=4.0, eps_high=0.28)
    torch.manual_seed(seed)
    out, g = loss_grad(m, lp, old, adv, mask)
    leaf = lp.clone().requires_grad_(True)
    torch.manual_seed(seed)
    ref, chosen = reference_clip_cov(leaf, old, adv, mask, 0.05, 0.3, 4.0, 0.2, 0.28)
    (gr,) = torch.autograd.grad(ref, leaf)
    assert len(chosen) == max(1, int(0.05 * int(mask.sum())))
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("seed", [0, 5])
def test_exactly_k_eligible_tokens_lose_their_gradient_and_nothing_else_changes(seed):
    lp, old, adv, mask = rand_batch(seed, B=8, T=12)
    m = re.make_method("clip_cov", clip_cov_ratio=0.1, lb=-100.0, ub=100.0, seed=3)
    out, g = loss_grad(m, lp, old, adv, mask)
    _, g_ref = loss_grad(re.make_method("grpo"), lp, old, adv, mask)
    n = int(mask.sum())
    k = max(1, int(0.1 * n))
    changed = g != g_ref
    assert int(changed.sum()) == k                                   # the selected tokens ...
    assert torch.equal(g[changed], torch.zeros(k, dtype=g.dtype))    # ... and only they lose their gradient
    assert out.metrics["clip_cov/selected_frac"].item() == pytest.approx(k / n)
    # with the window wide open every unclipped valid token is eligible
    assert out.metrics["clip_cov/eligible_frac"].item() == pytest.approx(
        1 - out.metrics["clip_cov/clip_frac"].item())


def test_fewer_eligible_than_k_drops_them_all():
    lp, old, adv, mask = rand_batch(1)
    m = re.make_method("clip_cov", clip_cov_ratio=0.9, lb=-100.0, ub=100.0, seed=0)
    out, _ = loss_grad(m, lp, old, adv, mask)
    assert out.metrics["clip_cov/selected_frac"].item() == out.metrics["clip_cov/eligible_frac"].item() > 0


def test_seeded_generator_step_and_micro_batch_semantics():
    lp, old, adv, mask = rand_batch(2, B=8, T=12)
    kw = dict(clip_cov_ratio=0.05, lb=-100.0, ub=100.0, seed=7)

    def sel(m, step):
        _, g = loss_grad(m, lp, old, adv, mask, step=step)
        return g == 0

    a = re.make_method("clip_cov", **kw)
    run = [sel(a, s) for s in (0, 0, 1, 1, 2)]  # two micro-batches in steps 0 and 1, one in step 2
    # a fresh method replays the same draws; the global RNG does not matter
    b = re.make_method("clip_cov", **kw)
    torch.manual_seed(123)
    assert all(torch.equal(x, sel(b, s)) for x, s in zip(run, (0, 0, 1, 1, 2)))
    # resuming at step 2 (nothing saved) draws what the uninterrupted run drew
    assert torch.equal(sel(re.make_method("clip_cov", **kw), 2), run[4])
    # micro-batches of a step and different steps use different draws (on this batch)
    assert not torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])
    # another seed, another draw
    assert not torch.equal(sel(re.make_method("clip_cov", **{**kw, "seed": 8}), 0), run[0])


def test_global_rng_follows_manual_seed_and_int_seed_leaves_it_alone():
    lp, old, adv, mask = rand_batch(3)
    kw = dict(clip_cov_ratio=0.1, lb=-100.0, ub=100.0)
    torch.manual_seed(0)
    x, _ = loss_grad(re.make_method("clip_cov", **kw), lp, old, adv, mask)
    torch.manual_seed(0)
    y, _ = loss_grad(re.make_method("clip_cov", **kw), lp, old, adv, mask)
    assert torch.equal(x.loss, y.loss)
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    loss_grad(re.make_method("clip_cov", seed=1, **kw), lp, old, adv, mask)
    assert torch.equal(torch.rand(2), expected)


def test_dual_clipped_tokens_are_not_eligible():
    lp, old, adv, mask = rand_batch(4)
    old = lp - math.log(3.0)  # r = 3: A > 0 tokens are PPO-clipped, A < 0 tokens only by a dual clip c < 3
    kw = dict(clip_cov_ratio=0.2, lb=-100.0, ub=100.0, seed=0)
    out, g = loss_grad(re.make_method("clip_cov", dual_clip=2.0, **kw), lp, old, adv, mask)
    assert out.metrics["clip_cov/eligible_frac"].item() == 0.0
    ref, gr = loss_grad(re.make_method("grpo", dual_clip=2.0), lp, old, adv, mask)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, gr, rtol=1e-12, atol=1e-12)
    out2, _ = loss_grad(re.make_method("clip_cov", **kw), lp, old, adv, mask)  # no dual clip: they are eligible
    assert out2.metrics["clip_cov/selected_frac"].item() > 0


def test_config_errors():
    for kw, field in ((dict(clip_cov_ratio=0.0), "clip_cov_ratio"), (dict(lb=6.0), "lb"),
                      (dict(scope="batch"), "scope"), (dict(seed=1.5), "seed"), (dict(ub=float("nan")), "ub")):
        with pytest.raises(ValueError, match=field):
            re.make_method("clip_cov", **kw)


# --------------------------------------------------------------------------------------------- global scope
SPLITS = {"two ranks": [(0, 4), (4, 9)], "three ranks, one empty": [(0, 3), (3, 5), (5, 9)]}


@pytest.mark.parametrize("split", list(SPLITS))
def test_global_scope_selects_what_the_concatenated_batch_selects(split):
    ranges = SPLITS[split]
    lp, old, adv, mask = rand_batch(6, B=9, T=10)
    if split.endswith("empty"):
        mask[3:5] = False  # rank 1 holds no valid token but still takes part in every gather
    kw = dict(clip_cov_ratio=0.1, lb=0.2, ub=5.0, seed=11, loss_agg_mode="token-sum")
    full, g_full = loss_grad(re.make_method("clip_cov", **kw), lp, old, adv, mask, step=4)
    world = FakeWorld(len(ranges))

    def rank_fn(r, scope):
        a, b = ranges[r]
        m = re.make_method("clip_cov", scope=scope, **kw)
        m.gather_fn = world.gather_fn(r)
        return loss_grad(m, lp[a:b], old[a:b], adv[a:b], mask[a:b], step=4)

    outs = world.run([lambda r=r: rank_fn(r, "global") for r in range(len(ranges))])
    torch.testing.assert_close(sum(o.loss for o, _ in outs), full.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([g for _, g in outs]), g_full, rtol=1e-12, atol=1e-12)
    assert full.metrics["clip_cov/eligible_frac"] > full.metrics["clip_cov/selected_frac"] > 0
    # the micro-batch scope (gather_fn unused) selects differently on this split
    local = world.run([lambda r=r: rank_fn(r, "micro_batch") for r in range(len(ranges))])
    assert not torch.equal(torch.cat([g for _, g in local]), g_full)


def test_global_scope_with_global_rng_selects_exactly_k_over_all_ranks():
    lp, old, adv, mask = rand_batch(7, B=8, T=10)
    kw = dict(clip_cov_ratio=0.1, lb=-100.0, ub=100.0, scope="global")
    world = FakeWorld(2)

    def rank_fn(r):
        m = re.make_method("clip_cov", **kw)
        m.gather_fn = world.gather_fn(r)
        sl = slice(4 * r, 4 * r + 4)
        out, _ = loss_grad(m, lp[sl], old[sl], adv[sl], mask[sl])
        return out.metrics["clip_cov/selected_frac"].item() * int(mask[sl].sum())

    picked = world.run([lambda r=r: rank_fn(r) for r in range(2)])
    assert round(sum(picked)) == max(1, int(0.1 * int(mask.sum())))


def test_global_scope_without_gather_fn_is_the_micro_batch_scope():
    lp, old, adv, mask = rand_batch(8)
    a, ga = loss_grad(re.make_method("clip_cov", clip_cov_ratio=0.1, lb=0.2, seed=2, scope="global"),
                      lp, old, adv, mask, step=0)
    b, gb = loss_grad(re.make_method("clip_cov", clip_cov_ratio=0.1, lb=0.2, seed=2), lp, old, adv, mask, step=0)
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)


def test_select_helper_draws_from_the_eligible_set_in_row_major_order():
    eligible = torch.tensor([[False, True, True], [True, False, True]])
    torch.manual_seed(0)
    perm = torch.randperm(4)[:2].tolist()
    cells = [(0, 1), (0, 2), (1, 0), (1, 2)]
    torch.manual_seed(0)
    sel = clip_cov_select(eligible, 2)
    assert {tuple(x) for x in sel.nonzero().tolist()} == {cells[j] for j in perm}


def test_gradcheck_with_detached_tokens():
    lp, old, adv, mask = rand_batch(9, B=3, T=5)
    m = re.make_method("clip_cov", clip_cov_ratio=0.3, lb=-100.0, ub=100.0)

    def f(x):
        torch.manual_seed(0)
        return m.compute_loss(TokenBatch(log_prob=x, old_log_prob=old, advantages=adv, mask=mask))

    x = lp.clone().requires_grad_(True)
    assert f(x).metrics["clip_cov/selected_frac"] > 0
    assert torch.autograd.gradcheck(lambda y: f(y).loss, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
