"""Parity with verl 0.9.x's own policy losses (verl.trainer.ppo.core_algos), on the same tensors and seed:

- grpo with dual_clip=3 == compute_policy_loss_vanilla, for every verl aggregation mode;
- clip_cov == compute_policy_loss_clip_cov (same tokens dropped after the same torch.manual_seed, and the global
  RNG left in the same state);
- kl_cov == compute_policy_loss_kl_cov (same top-k, ties included);
- where verl's clip_cov / kl_cov overflow (log-ratio far from 0, verl#6478) ours stay finite.

Inputs keep |log r| < 20 so our log-ratio clamp is inactive. Skipped when verl is not installed.
"""
from __future__ import annotations

import pytest
import torch

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_actor = pytest.importorskip("verl.workers.config.actor")

import rlvr_entropy as re  # noqa: E402
from rlvr_entropy import TokenBatch  # noqa: E402

VERL_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def actor_config(clip_low=0.2, clip_high=0.28, **policy_loss):
    """A verl ActorConfig built like verl's trainer builds it (the dataclass, required fields set)."""
    return verl_actor.ActorConfig(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=1,
                                  clip_ratio=0.2, clip_ratio_low=clip_low, clip_ratio_high=clip_high,
                                  clip_ratio_c=3.0, policy_loss=verl_actor.PolicyLossConfig(**policy_loss))


def tensors(seed, B=6, T=9, spread=0.3, dtype=torch.float64):
    """log_prob, old_log_prob, token advantages [B, T], mask; the padding holds finite values (verl reads them)."""
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, T, generator=g, dtype=dtype) - 1.0)
    old = lp + spread * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, T, generator=g, dtype=dtype) * 2
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return lp, old, adv, mask


def run_both(ours, theirs, lp, old, adv, mask):
    """(our loss, verl's loss, our grad, verl's grad, our metrics, verl's metrics) on copies of log_prob."""
    a = lp.clone().requires_grad_(True)
    b = lp.clone().requires_grad_(True)
    out = ours(TokenBatch(log_prob=a, old_log_prob=old, advantages=adv, mask=mask))
    lt, mt = theirs(old, b, adv, mask.to(lp.dtype))
    (ga,) = torch.autograd.grad(out.loss, a)
    (gb,) = torch.autograd.grad(lt, b)
    return out.loss, lt, ga, gb, out.metrics, mt


def test_verl_registry_holds_the_functions_we_compare_with():
    assert verl_core.get_policy_loss_fn("vanilla") is verl_core.compute_policy_loss_vanilla
    assert verl_core.get_policy_loss_fn("clip_cov") is verl_core.compute_policy_loss_clip_cov
    assert verl_core.get_policy_loss_fn("kl_cov") is verl_core.compute_policy_loss_kl_cov


# --------------------------------------------------------------------------------------------------- vanilla
@pytest.mark.parametrize("mode", VERL_MODES + ["token-sum"])
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_with_dual_clip_3_equals_verl_vanilla(mode, seed):
    cfg = actor_config()
    ours = re.make_method("grpo", eps_low=0.2, eps_high=0.28, dual_clip=3.0, loss_agg_mode=mode)
    lp, old, adv, mask = tensors(seed, spread=0.6)
    adv[0, :] = -3.0
    old[0, :3] = lp[0, :3] - 2.0  # r = e^2 > 3 with A < 0: the dual clip bites
    lo, lt, ga, gb, mo, mt = run_both(
        lambda b: ours.compute_loss(b),
        lambda o, l, a, m: verl_core.compute_policy_loss_vanilla(o, l, a, m, mode, cfg), lp, old, adv, mask)
    # verl divides row sums by (count + 1e-8) in seq-mean-token-mean: a relative difference of ~1e-9
    tol = 1e-7 if mode == "seq-mean-token-mean" else 1e-12
    torch.testing.assert_close(lo, lt, rtol=tol, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=tol, atol=1e-12)
    # the regions exist and the metrics agree (verl's masked_mean divides by n + 1e-8)
    assert mo["grpo/clip_frac"] > 0 and mo["grpo/dual_clip_frac"] > 0
    assert float(mo["grpo/clip_frac"]) == pytest.approx(mt["actor/pg_clipfrac"], rel=1e-7)
    assert float(mo["grpo/dual_clip_frac"]) == pytest.approx(mt["actor/pg_clipfrac_lower"], rel=1e-7)
    assert float(mo["grpo/approx_kl"]) == pytest.approx(mt["actor/ppo_kl"], rel=1e-7)


# -------------------------------------------------------------------------------------------------- clip_cov
@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_cov_equals_verl(mode, seed):
    ratio = 0.05
    cfg = actor_config(loss_mode="clip_cov", clip_cov_ratio=ratio, clip_cov_lb=0.2, clip_cov_ub=5.0)
    ours = re.make_method("clip_cov", clip_cov_ratio=ratio, lb=0.2, ub=5.0, eps_low=0.2, eps_high=0.28,
                          loss_agg_mode=mode)
    lp, old, adv, mask = tensors(seed)

    def mine(b):
        torch.manual_seed(100 + seed)
        return ours.compute_loss(b)

    def theirs(o, l, a, m):
        torch.manual_seed(100 + seed)
        return verl_core.compute_policy_loss_clip_cov(o, l, a, m, mode, cfg)

    lo, lt, ga, gb, mo, mt = run_both(mine, theirs, lp, old, adv, mask)
    tol = 1e-7 if mode == "seq-mean-token-mean" else 1e-12
    torch.testing.assert_close(lo, lt, rtol=tol, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=tol, atol=1e-12)
    # more eligible tokens than selected ones (the draw matters), and PPO clipping is active (eligibility matters)
    n = int(mask.sum())
    assert float(mo["clip_cov/selected_frac"]) * n == pytest.approx(max(int(ratio * n), 1))
    assert mo["clip_cov/eligible_frac"] > mo["clip_cov/selected_frac"]
    assert mo["clip_cov/clip_frac"] > 0
    assert float(mo["clip_cov/selected_frac"]) == pytest.approx(mt["actor/pg_clipfrac"], rel=1e-7)
    assert float(mo["clip_cov/approx_kl"]) == pytest.approx(mt["actor/ppo_kl"], rel=1e-7)


def test_clip_cov_consumes_the_global_rng_like_verl_over_several_calls():
    """Three micro-batches in a row (one with nothing eligible): same losses, and the RNG ends in the same state."""
    cfg = actor_config(loss_mode="clip_cov", clip_cov_ratio=0.05, clip_cov_lb=0.2, clip_cov_ub=5.0)
    ours = re.make_method("clip_cov", clip_cov_ratio=0.05, lb=0.2, ub=5.0, eps_low=0.2, eps_high=0.28)
    batches = [tensors(s) for s in (3, 4, 5)]
    batches[1][2].zero_()  # A = 0 everywhere: every covariance is 0, nothing in (0.2, 5): randperm is not called
    torch.manual_seed(7)
    mine = [ours.compute_loss(TokenBatch(log_prob=lp, old_log_prob=o, advantages=a, mask=m)).loss
            for lp, o, a, m in batches]
    after_ours = torch.rand(3)
    torch.manual_seed(7)
    theirs = [verl_core.compute_policy_loss_clip_cov(o, lp, a, m.double(), "token-mean", cfg)[0]
              for lp, o, a, m in batches]
    after_theirs = torch.rand(3)
    for x, y in zip(mine, theirs):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    assert torch.equal(after_ours, after_theirs)


# --------------------------------------------------------------------------------------------------- kl_cov
@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_cov_equals_verl(mode, seed):
    ratio = 0.05
    cfg = actor_config(loss_mode="kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=0.7)
    ours = re.make_method("kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=0.7, loss_agg_mode=mode)
    lp, old, adv, mask = tensors(seed)
    lo, lt, ga, gb, mo, mt = run_both(
        lambda b: ours.compute_loss(b),
        lambda o, l, a, m: verl_core.compute_policy_loss_kl_cov(o, l, a, m, mode, cfg), lp, old, adv, mask)
    tol = 1e-7 if mode == "seq-mean-token-mean" else 1e-12
    torch.testing.assert_close(lo, lt, rtol=tol, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=tol, atol=1e-12)
    n = int(mask.sum())
    assert float(mo["kl_cov/selected_frac"]) * n == pytest.approx(max(int(ratio * n), 1))
    assert float(mo["kl_cov/abs_kl"]) == pytest.approx(mt["actor/ppo_kl"], rel=1e-7)


def test_kl_cov_ties_are_broken_like_verl():
    """GRPO-like inputs: one advantage per response and repeated log-probs, so many covariances are equal."""
    cfg = actor_config(loss_mode="kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=1.0)
    ours = re.make_method("kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=1.0)
    B, T = 8, 10
    g = torch.Generator().manual_seed(0)
    adv = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)[:, None].expand(B, T).contiguous()
    lp = torch.tensor([-0.5, -2.0], dtype=torch.float64)[torch.randint(0, 2, (B, T), generator=g)]
    old = lp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    lo, lt, ga, gb, _, _ = run_both(
        lambda b: ours.compute_loss(b),
        lambda o, l, a, m: verl_core.compute_policy_loss_kl_cov(o, l, a, m, "token-mean", cfg), lp, old, adv, mask)
    torch.testing.assert_close(lo, lt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


def test_kl_cov_with_verls_config_defaults():
    """verl's PolicyLossConfig defaults (kl_cov_ratio 2e-4, ppo_kl_coef 0.1) are ours with those two fields set."""
    cfg = actor_config(loss_mode="kl_cov")
    assert (cfg.policy_loss.kl_cov_ratio, cfg.policy_loss.ppo_kl_coef) == (2e-4, 0.1)
    ours = re.make_method("kl_cov", kl_cov_ratio=2e-4, ppo_kl_coef=0.1)
    lp, old, adv, mask = tensors(5, B=4, T=30)
    lo, lt, ga, gb, _, _ = run_both(
        lambda b: ours.compute_loss(b),
        lambda o, l, a, m: verl_core.compute_policy_loss_kl_cov(o, l, a, m, "token-mean", cfg), lp, old, adv, mask)
    torch.testing.assert_close(lo, lt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------- overflow
@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_ours_stays_finite_where_verl_overflows(name):
    """float32, one token with log r = 200: exp overflows in verl (no clamp, verl#6478); ours clamps at 20."""
    cfg = actor_config(loss_mode=name, clip_cov_ratio=0.05, kl_cov_ratio=0.05)
    lp, old, adv, mask = tensors(0, dtype=torch.float32)
    old[0, 0] = lp[0, 0] - 200.0
    adv[0, 0] = -1.0
    fn = verl_core.compute_policy_loss_clip_cov if name == "clip_cov" else verl_core.compute_policy_loss_kl_cov
    theirs = fn(old, lp, adv, mask.float(), "token-mean", cfg)[0]
    assert not torch.isfinite(theirs)
    leaf = lp.clone().requires_grad_(True)
    out = re.make_method(name).compute_loss(TokenBatch(log_prob=leaf, old_log_prob=old, advantages=adv, mask=mask))
    (g,) = torch.autograd.grad(out.loss, leaf)
    assert torch.isfinite(out.loss) and torch.isfinite(g).all()
