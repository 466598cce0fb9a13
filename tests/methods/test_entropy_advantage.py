import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.core.surrogate import ppo_token_loss
from rlvr_entropy.methods.entropy_advantage import shaped_advantages
from tests.helpers import batch_from, loss_and_grads, make_leaves


def test_hand_cases():
    a = torch.tensor([1.0, 1.0, -1.0, 0.0])
    h = torch.tensor([0.5, 5.0, 0.5, 3.0])
    # min(0.4 H, |A| / 2): [0.2, 0.5, 0.2, 0.0]
    assert shaped_advantages(a, h, 0.4, 2.0).tolist() == pytest.approx([1.2, 1.5, -0.8, 0.0])


def test_matches_reference_loss_and_entropy_gets_no_gradient():
    leaves, _ = make_leaves(seed=1)
    out, grads = loss_and_grads(re.make_method("entropy_advantage"), leaves)
    msk = leaves["mask"]
    adv = torch.where(msk, leaves["advantages"][:, None].expand(msk.shape), 0.0)
    h = leaves["entropy"].detach()
    shaped = torch.where(msk, adv + torch.minimum(0.4 * h, adv.abs() / 2), 0.0)
    t = ppo_token_loss(torch.where(msk, leaves["log_prob"], 0.0), torch.where(msk, leaves["old_log_prob"], 0.0),
                       shaped, eps_low=0.2, eps_high=0.2)
    ref = torch.where(msk, t.loss, 0.0).sum() / msk.sum()
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    assert grads["entropy"].abs().sum() == 0


def test_config_errors():
    with pytest.raises(ValueError, match="kappa"):
        re.make_method("entropy_advantage", kappa=0.0)
