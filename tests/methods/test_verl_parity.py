"""Our grpo, clip_cov and kl_cov against verl 0.9.1's own policy losses on the same tensors and seed."""
from __future__ import annotations

import pytest
import torch

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos")

import rlvr_entropy as re  # noqa: E402
from rlvr_entropy import TokenBatch  # noqa: E402


def _actor_config(**policy_loss):
    from verl.workers.config.actor import ActorConfig, PolicyLossConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2, clip_ratio_low=0.2,
                       clip_ratio_high=0.28, clip_ratio_c=3.0, policy_loss=PolicyLossConfig(**policy_loss))


def _tensors(seed, B=6, T=9, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, T, generator=g) - 1.0).double()
    old = lp + spread * torch.randn(B, T, generator=g).double()
    adv = torch.randn(B, T, generator=g).double() * 2
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return lp, old, adv, mask


def _both(ours_fn, theirs_fn, lp, old, adv, mask):
    a = lp.clone().requires_grad_(True)
    b = lp.clone().requires_grad_(True)
    lo = ours_fn(TokenBatch(log_prob=a, old_log_prob=old, advantages=adv, mask=mask))
    lt = theirs_fn(old, b, adv, mask.double())
    (ga,) = torch.autograd.grad(lo, a)
    (gb,) = torch.autograd.grad(lt, b)
    return lo, lt, ga, gb


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_equals_verl_vanilla(mode, seed):
    cfg = _actor_config()
    ours = re.make_method("grpo", eps_low=0.2, eps_high=0.28, dual_clip=3.0, loss_agg_mode=mode)
    lp, old, adv, mask = _tensors(seed, spread=0.6)
    adv[0, :] = -3.0  # make dual-clip bite somewhere
    old[0, :3] = lp[0, :3] - 2.0
    lo, lt, ga, gb = _both(lambda b: ours.compute_loss(b).loss,
                           lambda o, l, a, m: verl_core.compute_policy_loss_vanilla(o, l, a, m, mode, cfg)[0],
                           lp, old, adv, mask)
    # verl divides row sums by (count + 1e-8) in seq-mean-token-mean: a relative difference of ~1e-9
    tol = 1e-7 if mode == "seq-mean-token-mean" else 1e-10
    torch.testing.assert_close(lo, lt, rtol=tol, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=tol, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_cov_equals_verl(seed):
    ratio = 0.05
    cfg = _actor_config(loss_mode="clip_cov", clip_cov_ratio=ratio, clip_cov_lb=0.2, clip_cov_ub=5.0)
    ours = re.make_method("clip_cov", ratio=ratio, lb=0.2, ub=5.0, eps_low=0.2, eps_high=0.28)
    lp, old, adv, mask = _tensors(seed)

    def mine(b):
        torch.manual_seed(100 + seed)
        out = ours.compute_loss(b)
        assert out.metrics["clip_cov/selected_frac"] > 0
        return out.loss

    def theirs(o, l, a, m):
        torch.manual_seed(100 + seed)
        return verl_core.compute_policy_loss_clip_cov(o, l, a, m, "token-mean", cfg)[0]

    lo, lt, ga, gb = _both(mine, theirs, lp, old, adv, mask)
    torch.testing.assert_close(lo, lt, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_cov_equals_verl(seed):
    ratio = 0.05
    cfg = _actor_config(loss_mode="kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=0.7)
    ours = re.make_method("kl_cov", ratio=ratio, beta=0.7)
    lp, old, adv, mask = _tensors(seed)
    lo, lt, ga, gb = _both(lambda b: ours.compute_loss(b).loss,
                           lambda o, l, a, m: verl_core.compute_policy_loss_kl_cov(o, l, a, m, "token-mean", cfg)[0],
                           lp, old, adv, mask)
    torch.testing.assert_close(lo, lt, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def test_ours_stays_finite_where_verl_clip_cov_overflows():
    cfg = _actor_config(loss_mode="clip_cov", clip_cov_ratio=0.05)
    lp, old, adv, mask = _tensors(0)
    lp = lp.float()
    old = old.float()
    adv = adv.float()
    old[0, 0] = lp[0, 0] - 200.0  # log-ratio 200: exp overflows in float32
    adv[0, 0] = -1.0
    theirs = verl_core.compute_policy_loss_clip_cov(old, lp, adv, mask.float(), "token-mean", cfg)[0]
    ours = re.make_method("clip_cov", ratio=0.05).compute_loss(
        TokenBatch(log_prob=lp, old_log_prob=old, advantages=adv, mask=mask)).loss
    assert not torch.isfinite(theirs) and torch.isfinite(ours)
