import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import TokenBatch
from rlvr_entropy.methods.lp_reg import proxy_log_mass
from tests.helpers import batch_from, loss_and_grads, make_leaves


def test_proxy_mass_hand_case():
    # probs [0.6, 0.3, 0.09, 0.01]; kappa 0.1 -> keep pi >= 0.06: first three, Z = 0.99
    z = torch.tensor([0.6, 0.3, 0.09, 0.01], dtype=torch.float64).log()
    log_z, log_max = proxy_log_mass(z, 0.1)
    assert log_z.exp().item() == pytest.approx(0.99)
    assert log_max.exp().item() == pytest.approx(0.6)


def test_penalty_on_protected_token_by_hand():
    # one position, V = 4 as above; sampled token 2 (pi 0.09, kept), A < 0, rho = 1 -> protected
    z = torch.tensor([[[0.6, 0.3, 0.09, 0.01]]], dtype=torch.float64).log()
    lp = torch.tensor([[math.log(0.09)]], dtype=torch.float64, requires_grad=True)
    b = TokenBatch(log_prob=lp, old_log_prob=lp.detach(), advantages=torch.tensor([-1.0], dtype=torch.float64),
                   mask=torch.ones(1, 1, dtype=torch.bool), logits=z)
    out = re.make_method("lp_reg", kappa=0.1, rho=1.0, beta=1.0).compute_loss(b)
    rho = 1 / 0.99
    k3 = rho - 1 - math.log(rho)
    # PG part at r = 1, A = -1: l = 1
    assert out.loss.item() == pytest.approx(1.0 + k3)
    (g,) = torch.autograd.grad(out.loss, lp)
    # d/dlogp: PG -A r = 1 ; k3: 1 - rho
    assert g.item() == pytest.approx(1.0 + (1 - rho))
    assert out.metrics["lp_reg/protected_frac"].item() == 1.0


def test_filtered_or_positive_tokens_are_not_protected():
    z = torch.tensor([[[0.6, 0.3, 0.09, 0.01]]], dtype=torch.float64).log()
    for tok_p, adv in ((0.01, -1.0), (0.09, 1.0)):  # below kappa * max (not in the proxy), or A > 0
        lp = torch.tensor([[math.log(tok_p)]], dtype=torch.float64)
        b = TokenBatch(log_prob=lp, old_log_prob=lp, advantages=torch.tensor([adv], dtype=torch.float64),
                       mask=torch.ones(1, 1, dtype=torch.bool), logits=z)
        out = re.make_method("lp_reg", kappa=0.1, rho=1.0).compute_loss(b)
        assert out.metrics["lp_reg/protected_frac"].item() == 0.0


def test_bottom_quantile_selection_reference():
    leaves, tokens = make_leaves(seed=3, B=6, T=8, V=7, scale=1.0)
    m = re.make_method("lp_reg", kappa=0.05, rho=0.3)
    out = m.compute_loss(batch_from(leaves))
    msk = leaves["mask"]
    lp = leaves["log_prob"].detach()
    adv = leaves["advantages"][:, None].expand(msk.shape)
    neg = msk & (adv < 0)
    thr = torch.quantile(lp[neg], 0.3)
    logits = leaves["logits"].detach()
    probs = torch.softmax(logits, -1)
    keep_tok = probs >= 0.05 * probs.max(-1, keepdim=True).values
    kept = torch.log(probs.max(-1).values) + math.log(0.05) <= lp
    z_mass = (probs * keep_tok).sum(-1)
    expected = neg & (lp <= thr) & kept & (z_mass < 1)
    assert out.metrics["lp_reg/protected_frac"].item() == pytest.approx(
        (expected.sum() / msk.sum()).item())
