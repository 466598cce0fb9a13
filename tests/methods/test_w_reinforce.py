import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.methods.w_reinforce import w_reinforce_advantages
from tests.helpers import batch_from, loss_and_grads, make_leaves


def test_hand_advantages():
    r = torch.tensor([1.0, 0.0, 1.0])
    assert w_reinforce_advantages(r, 0.1).tolist() == pytest.approx([0.1, -1.0, 0.1])
    assert w_reinforce_advantages(r, 0.1, psr_only=True).tolist() == pytest.approx([0.1, 0.0, 0.1])


def test_lambda_one_equals_grpo_with_2r_minus_1():
    leaves, _ = make_leaves(seed=1)
    out, g = loss_and_grads(re.make_method("w_reinforce", lam=1.0), leaves)
    leaves2 = dict(leaves)
    leaves2["advantages"] = 2 * leaves["rewards"] - 1
    ref, gr = loss_and_grads(re.make_method("grpo"), leaves2)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g["log_prob"], gr["log_prob"], rtol=1e-12, atol=1e-12)


def test_nsr_only_gives_no_gradient_to_correct_responses():
    leaves, _ = make_leaves(seed=2)
    _, g = loss_and_grads(re.make_method("w_reinforce", lam=0.0), leaves)
    correct = leaves["rewards"] > 0.5
    assert g["log_prob"][correct].abs().sum() == 0
    assert g["log_prob"][~correct].abs().sum() > 0


def test_needs_rewards():
    leaves, _ = make_leaves(seed=3)
    with pytest.raises(ValueError, match="rewards"):
        re.make_method("w_reinforce").compute_loss(batch_from(leaves, rewards=None))
