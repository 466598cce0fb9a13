"""w_reinforce: hand cases, the relation to grpo (lambda = 1 is grpo on advantages 2 r - 1), PSR / NSR switches,
parity with a loop reference (REINFORCE on-policy, clipped surrogate off-policy)."""
from __future__ import annotations

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.methods.w_reinforce import w_reinforce_advantages
from tests.helpers import batch_from, loss_and_grads, make_leaves


def ref_loss(leaves, *, lam=0.1, threshold=0.5, pos=None, neg=-1.0, mode="token-mean", eps=0.2):
    """A_i = +lam (or pos) if reward > threshold else neg; PPO token loss; aggregation; one token at a time."""
    lp, old, m, rw = leaves["log_prob"], leaves["old_log_prob"], leaves["mask"], leaves["rewards"]
    B, T = m.shape
    rows = []
    for i in range(B):
        a = (lam if pos is None else pos) if float(rw[i]) > threshold else neg
        row = []
        for t in range(T):
            if m[i, t]:
                r = torch.exp(lp[i, t] - old[i, t])
                row.append(torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps, 1 + eps)))
        rows.append(row)
    if mode == "token-mean":
        flat = [x for r in rows for x in r]
        return sum(flat) / len(flat)
    rows = [r for r in rows if r]
    return sum(sum(r) / len(r) for r in rows) / len(rows)


# ------------------------------------------------------------------------------------------- hand-derived
def test_hand_advantages():
    r = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.7])
    # reward > 0.5 is correct: [c, i, c, i (0.5 is not > 0.5), c]
    assert w_reinforce_advantages(r, 0.1).tolist() == pytest.approx([0.1, -1.0, 0.1, -1.0, 0.1])
    assert w_reinforce_advantages(r, 0.1, nsr_only=True).tolist() == pytest.approx([0.0, -1.0, 0.0, -1.0, 0.0])
    assert w_reinforce_advantages(r, 0.1, psr_only=True).tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0, 1.0])
    assert w_reinforce_advantages(r, 0.3, threshold=0.6).tolist() == pytest.approx([0.3, -1.0, 0.3, -1.0, 0.3])
    with pytest.raises(ValueError, match="psr_only"):
        w_reinforce_advantages(r, psr_only=True, nsr_only=True)


def test_hand_loss_and_gradient():
    # two one-token responses on-policy (r = 1): correct (A = 0.1) and incorrect (A = -1).
    # token-mean L = (-0.1 + 1) / 2 = 0.45; dL/dlog_prob = -A / 2 = [-0.05, 0.5] (REINFORCE)
    lp = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
    b = re.TokenBatch(log_prob=lp, old_log_prob=torch.zeros(2, 1, dtype=torch.float64),
                      advantages=torch.tensor([5.0, 5.0], dtype=torch.float64),  # ignored
                      mask=torch.ones(2, 1, dtype=torch.bool), rewards=torch.tensor([1.0, 0.0], dtype=torch.float64))
    out = re.make_method("w_reinforce").compute_loss(b)
    assert out.loss.item() == pytest.approx(0.45, abs=1e-15)
    (g,) = torch.autograd.grad(out.loss, lp)
    assert g[:, 0].tolist() == [pytest.approx(-0.05), pytest.approx(0.5)]
    assert out.metrics["w_reinforce/correct_frac"].item() == 0.5
    assert out.metrics["w_reinforce/adv_mean"].item() == pytest.approx(-0.45)


# --------------------------------------------------------------------------------------- relation to grpo
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_lambda_one_equals_grpo_with_2r_minus_1(mode):
    leaves, _ = make_leaves(seed=1)
    out, g = loss_and_grads(re.make_method("w_reinforce", lam=1.0, loss_agg_mode=mode), leaves)
    leaves2 = dict(leaves, advantages=2 * leaves["rewards"] - 1)
    ref, gr = loss_and_grads(re.make_method("grpo", loss_agg_mode=mode), leaves2)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(g["log_prob"], gr["log_prob"], rtol=0, atol=0)
    assert re.get_method_class("w_reinforce").neutral_overrides() is None


def test_batch_advantages_are_ignored():
    leaves, _ = make_leaves(seed=2)
    a = re.make_method("w_reinforce").compute_loss(batch_from(leaves)).loss
    b = re.make_method("w_reinforce").compute_loss(batch_from(leaves, advantages=-7 * leaves["advantages"])).loss
    assert torch.equal(a, b)


def test_nsr_only_gives_no_gradient_on_correct_responses_and_psr_only_none_on_incorrect():
    leaves, _ = make_leaves(seed=2)
    leaves["old_log_prob"] = leaves["log_prob"].detach().clone()  # on-policy: no token is clipped
    correct = leaves["rewards"] > 0.5
    assert correct.any() and (~correct).any()
    for kw in ({"nsr_only": True}, {"lam": 0.0}):
        _, g = loss_and_grads(re.make_method("w_reinforce", **kw), leaves)
        assert g["log_prob"][correct].abs().sum() == 0
        assert g["log_prob"][~correct[:, None] & leaves["mask"]].abs().min() > 0
    _, g = loss_and_grads(re.make_method("w_reinforce", psr_only=True), leaves)
    assert g["log_prob"][~correct].abs().sum() == 0
    assert g["log_prob"][correct[:, None] & leaves["mask"]].abs().min() > 0
    # lam = 0 and nsr_only are the same objective
    a, _ = loss_and_grads(re.make_method("w_reinforce", lam=0.0), leaves)
    b, _ = loss_and_grads(re.make_method("w_reinforce", nsr_only=True, lam=0.5), leaves)
    assert torch.equal(a.loss, b.loss)


# ------------------------------------------------------------------------------------- parity with reference
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("kw,ref_kw", [({}, {}), ({"lam": 0.3}, {"lam": 0.3}), ({"psr_only": True}, {"pos": 1.0,
                                       "neg": 0.0}), ({"nsr_only": True}, {"pos": 0.0})])
def test_matches_reference(mode, kw, ref_kw):
    leaves, _ = make_leaves(seed=3)
    out, grads = loss_and_grads(re.make_method("w_reinforce", loss_agg_mode=mode, **kw), leaves)
    ref = ref_loss(leaves, mode=mode, **ref_kw)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-13)
    (g_ref,) = torch.autograd.grad(ref, leaves["log_prob"])
    torch.testing.assert_close(grads["log_prob"], g_ref, rtol=1e-10, atol=1e-14)


def test_on_policy_gradient_is_reinforce():
    # on-policy (old = current): ratio 1, nothing clipped, dL/dlog_prob_it = -A_i / N with token-mean
    leaves, _ = make_leaves(seed=4)
    leaves["old_log_prob"] = leaves["log_prob"].detach().clone()
    _, grads = loss_and_grads(re.make_method("w_reinforce"), leaves)
    msk = leaves["mask"]
    f64 = torch.float64
    a = torch.where(leaves["rewards"] > 0.5, torch.tensor(0.1, dtype=f64), torch.tensor(-1.0, dtype=f64))
    expected = torch.where(msk, -a[:, None] / int(msk.sum()), torch.zeros_like(leaves["log_prob"]))
    torch.testing.assert_close(grads["log_prob"], expected, rtol=1e-14, atol=1e-16)


def test_needs_rewards_and_config_errors():
    leaves, _ = make_leaves(seed=5)
    with pytest.raises(ValueError, match="rewards"):
        re.make_method("w_reinforce").compute_loss(batch_from(leaves, rewards=None))
    with pytest.raises(ValueError, match="psr_only"):
        re.make_method("w_reinforce", psr_only=True, nsr_only=True)
    with pytest.raises(ValueError, match="lam"):
        re.make_method("w_reinforce", lam=-0.1)
    with pytest.raises(ValueError, match="nsr_only"):
        re.make_method("w_reinforce", nsr_only=1)
