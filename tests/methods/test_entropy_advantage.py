"""entropy_advantage: hand cases, parity with a loop reference written from the formula, properties (detached
entropy, zero-advantage groups, sign preservation, neutral alpha = 0)."""
from __future__ import annotations

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.methods.entropy_advantage import entropy_bonus_term, shaped_advantages
from tests.helpers import batch_from, loss_and_grads, make_leaves


def ref_loss(leaves, *, alpha=0.4, kappa=2.0, mode="token-mean", eps=0.2, entropy_from_logits=False):
    """A' = A + min(alpha H, |A| / kappa) per token, PPO clipped surrogate, aggregation; one token at a time."""
    lp, old, adv, m = leaves["log_prob"], leaves["old_log_prob"], leaves["advantages"], leaves["mask"]
    B, T = m.shape
    rows = []
    for i in range(B):
        row = []
        for t in range(T):
            if not m[i, t]:
                continue
            a = float(adv[i] if adv.dim() == 1 else adv[i, t])
            if entropy_from_logits:
                p = torch.softmax(leaves["logits"][i, t].detach(), -1)
                h = float(-(p * p.log()).sum())
            else:
                h = float(leaves["entropy"][i, t].detach())
            a2 = a + min(alpha * h, abs(a) / kappa)
            r = torch.exp(lp[i, t] - old[i, t])
            row.append(torch.maximum(-a2 * r, -a2 * torch.clamp(r, 1 - eps, 1 + eps)))
        rows.append(row)
    if mode == "token-mean":
        flat = [x for r in rows for x in r]
        return sum(flat) / len(flat)
    rows = [r for r in rows if r]
    return sum(sum(r) / len(r) for r in rows) / len(rows)  # seq-mean-token-mean


# ------------------------------------------------------------------------------------------- hand-derived
def test_hand_shaped_advantages():
    a = torch.tensor([1.0, 1.0, -1.0, 0.0, -0.5])
    h = torch.tensor([0.5, 5.0, 0.5, 3.0, 2.0])
    # psi = min(0.4 H, |A| / 2) = [min(0.2, 0.5), min(2.0, 0.5), min(0.2, 0.5), min(1.2, 0), min(0.8, 0.25)]
    #     = [0.2, 0.5, 0.2, 0.0, 0.25]
    assert entropy_bonus_term(a, h, 0.4, 2.0).tolist() == pytest.approx([0.2, 0.5, 0.2, 0.0, 0.25])
    assert shaped_advantages(a, h, 0.4, 2.0).tolist() == pytest.approx([1.2, 1.5, -0.8, 0.0, -0.25])
    # kappa = 1 (the SIREN repository's baseline): cap |A| -> [0.2, 1.0, 0.2, 0.0, 0.5]
    assert shaped_advantages(a, h, 0.4, 1.0).tolist() == pytest.approx([1.2, 2.0, -0.8, 0.0, 0.0])


def test_hand_loss_and_gradient():
    # two tokens on-policy (r = 1), A = 1 for the response; H = [0.5, 5.0] -> A' = [1.2, 1.5]
    # token-mean L = -(1.2 + 1.5) / 2 = -1.35; dL/dlog_prob = -A' / 2 = [-0.6, -0.75]
    lp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    b = re.TokenBatch(log_prob=lp, old_log_prob=torch.zeros(1, 2, dtype=torch.float64),
                      advantages=torch.ones(1, dtype=torch.float64), mask=torch.ones(1, 2, dtype=torch.bool),
                      entropy=torch.tensor([[0.5, 5.0]], dtype=torch.float64))
    out = re.make_method("entropy_advantage").compute_loss(b)
    assert out.loss.item() == pytest.approx(-1.35, abs=1e-12)
    (g,) = torch.autograd.grad(out.loss, lp)
    assert g.tolist() == [[pytest.approx(-0.6), pytest.approx(-0.75)]]
    assert out.metrics["entropy_advantage/bonus_mean"].item() == pytest.approx(0.35)   # (0.2 + 0.5) / 2
    assert out.metrics["entropy_advantage/capped_frac"].item() == pytest.approx(0.5)   # the second token


# ------------------------------------------------------------------------------------- parity with reference
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("alpha,kappa", [(0.4, 2.0), (0.4, 1.0), (1.5, 3.0)])
def test_matches_reference(mode, alpha, kappa):
    leaves, _ = make_leaves(seed=1)
    out, grads = loss_and_grads(re.make_method("entropy_advantage", alpha=alpha, kappa=kappa, loss_agg_mode=mode),
                                leaves)
    ref = ref_loss(leaves, alpha=alpha, kappa=kappa, mode=mode)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-13)
    (g_ref,) = torch.autograd.grad(ref, leaves["log_prob"])
    torch.testing.assert_close(grads["log_prob"], g_ref, rtol=1e-10, atol=1e-14)
    assert grads["entropy"].abs().sum() == 0 and grads["logits"].abs().sum() == 0  # entropy is detached


def test_per_token_advantages_and_entropy_from_logits():
    leaves, _ = make_leaves(seed=2)
    g = torch.Generator().manual_seed(0)
    leaves["advantages"] = torch.randn(leaves["mask"].shape, generator=g, dtype=torch.float64)  # [B, T]
    out, grads = loss_and_grads(re.make_method("entropy_advantage"), dict(leaves, entropy=None))
    ref = ref_loss(leaves, entropy_from_logits=True)
    torch.testing.assert_close(out.loss, ref, rtol=1e-11, atol=1e-13)
    assert grads["logits"].abs().sum() == 0


# ------------------------------------------------------------------------------------------------ properties
def test_zero_advantage_groups_get_no_gradient_and_signs_are_kept():
    leaves, _ = make_leaves(seed=3)
    leaves["advantages"] = torch.tensor([0.0, 0.0, 0.7, -0.7], dtype=torch.float64)
    out, grads = loss_and_grads(re.make_method("entropy_advantage", alpha=10.0), leaves)
    assert grads["log_prob"][:2].abs().sum() == 0          # A = 0: bonus min(alpha H, 0) = 0
    assert grads["log_prob"][2:].abs().sum() > 0
    # kappa >= 1: A' = A + psi with 0 <= psi <= |A| / kappa, so a negative advantage stays <= 0
    a = torch.linspace(-2, 2, 41, dtype=torch.float64)
    h = torch.rand(41, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 10
    for kappa in (1.0, 2.0, 5.0):
        s = shaped_advantages(a, h, 0.4, kappa)
        assert (s[a < 0] <= 0).all() and (s[a > 0] > a[a > 0]).all() and (s[a == 0] == 0).all()
        assert ((s - a) <= a.abs() / kappa + 1e-15).all() and ((s - a) <= 0.4 * h + 1e-15).all()


def test_bonus_raises_the_push_on_high_entropy_tokens():
    # same advantage, two tokens: the higher-entropy one gets the larger |gradient| (until the cap)
    lp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    b = re.TokenBatch(log_prob=lp, old_log_prob=torch.zeros(1, 2, dtype=torch.float64),
                      advantages=torch.ones(1, dtype=torch.float64), mask=torch.ones(1, 2, dtype=torch.bool),
                      entropy=torch.tensor([[0.1, 1.0]], dtype=torch.float64))
    (g,) = torch.autograd.grad(re.make_method("entropy_advantage").compute_loss(b).loss, lp)
    assert g[0, 1].abs() > g[0, 0].abs()


def test_alpha_zero_is_grpo_and_config_errors():
    leaves, _ = make_leaves(seed=4)
    a, ga = loss_and_grads(re.make_method("entropy_advantage", alpha=0.0), leaves)
    b, gb = loss_and_grads(re.make_method("grpo"), leaves)
    assert torch.equal(a.loss, b.loss) and torch.equal(ga["log_prob"], gb["log_prob"])
    with pytest.raises(ValueError, match="kappa"):
        re.make_method("entropy_advantage", kappa=0.0)
    with pytest.raises(ValueError, match="alpha"):
        re.make_method("entropy_advantage", alpha=-0.1)
    with pytest.raises(ValueError, match="entropy"):
        re.make_method("entropy_advantage").compute_loss(batch_from(leaves, entropy=None, logits=None))
