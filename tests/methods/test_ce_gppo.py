"""ce_gppo: gradients per region by hand, the paper's / official loss written out token by token (gradients equal,
values differ by the documented constant), and properties (value = grpo's, linear in beta, metrics)."""
from __future__ import annotations

import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import TokenBatch
from rlvr_entropy.methods.ce_gppo import ce_gppo_regions, ce_gppo_token_loss


def one_token(r, a, **cfg):
    lp = torch.tensor([[math.log(r)]], dtype=torch.float64, requires_grad=True)
    b = TokenBatch(log_prob=lp, old_log_prob=torch.zeros(1, 1, dtype=torch.float64),
                   advantages=torch.tensor([a], dtype=torch.float64), mask=torch.ones(1, 1, dtype=torch.bool))
    out = re.make_method("ce_gppo", **cfg).compute_loss(b)
    (g,) = torch.autograd.grad(out.loss, lp)
    return out.loss.item(), g.item()


@pytest.mark.parametrize("r,a,beta1,value,grad", [
    # A < 0, r < 1 - eps (NA&LP): value -(1 - eps) A = 0.8; gradient -beta1 (1 - eps) A = 0.5 * 0.8 = 0.4 (PPO: 0)
    (0.5, -1.0, 0.5, 0.8, 0.4),
    # same token with beta1 = 0.75: gradient 0.75 * 0.8 = 0.6, value unchanged
    (0.5, -1.0, 0.75, 0.8, 0.6),
    # A > 0, r > 1 + eps (PA&LP): value -(1 + eps) A = -2.4; gradient -beta2 (1 + eps) A = -1 * 1.2 * 2 = -2.4
    (1.5, 2.0, 0.5, -2.4, -2.4),
    # inside the clip range: l = -r A, gradient -r A
    (1.1, 1.0, 0.5, -1.1, -1.1),
    (0.9, -2.0, 0.5, 1.8, 1.8),
    # A > 0 with a small ratio and A < 0 with a large one: PPO does not clip them, neither does CE-GPPO
    (0.5, 1.0, 0.5, -0.5, -0.5),
    (1.5, -1.0, 0.5, 1.5, 1.5),
    # A < 0 and r = 4 > c = 3 (default dual clip): value -c A = 3, no gradient
    (4.0, -1.0, 0.5, 3.0, 0.0),
])
def test_regions_by_hand(r, a, beta1, value, grad):
    v, g = one_token(r, a, beta1=beta1, beta2=1.0)
    assert v == pytest.approx(value, rel=1e-12) and g == pytest.approx(grad, rel=1e-12, abs=1e-15)


def test_dual_clip_can_be_switched_off():
    v, g = one_token(4.0, -1.0, dual_clip=None)
    assert (v, g) == (pytest.approx(4.0), pytest.approx(4.0))  # -r A, gradient -r A


def test_eps_high_and_regions_by_hand():
    ratio = torch.tensor([[0.7, 0.9, 1.25, 1.35, 0.7, 1.35]])
    adv = torch.tensor([[-1.0, -1.0, 1.0, 1.0, 1.0, -1.0]])
    low, high = ce_gppo_regions(ratio, adv, 0.2, 0.28)
    # low: A < 0 and r < 0.8 -> token 0; high: A > 0 and r > 1.28 -> token 3
    assert low.tolist() == [[True, False, False, False, False, False]]
    assert high.tolist() == [[False, False, False, True, False, False]]


# ---------------------------------------------------------------------------------------- paper's formula
def paper_token_loss(r, a, eps_low, eps_high, beta1, beta2, c):
    """arXiv 2509.20712 / the official compute_gppo_loss_general_beta, one token at a time (r with gradient)."""
    rv = float(r.detach())
    if float(a) < 0 and rv < 1 - eps_low:
        lt = -beta1 * (1 - eps_low) * (r / r.detach()) * a
    elif float(a) > 0 and rv > 1 + eps_high:
        lt = -beta2 * (1 + eps_high) * (r / r.detach()) * a
    else:
        lt = -r * a
    if float(a) < 0 and c is not None:
        lt = torch.minimum(lt, -a * c)
    return lt


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("beta1,beta2", [(0.5, 1.0), (0.75, 1.0), (0.3, 0.6)])
def test_gradients_equal_the_papers_loss(mode, beta1, beta2):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    lp = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6).requires_grad_(True)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    old = torch.zeros(B, T, dtype=torch.float64)
    eps_low, eps_high = 0.2, 0.28
    out = re.make_method("ce_gppo", beta1=beta1, beta2=beta2, eps_high=eps_high, loss_agg_mode=mode).compute_loss(
        TokenBatch(log_prob=lp, old_log_prob=old, advantages=adv, mask=mask))
    (g_ours,) = torch.autograd.grad(out.loss, lp)
    rows, gap_rows = [], []
    for i in range(B):
        row, gap = [], []
        for t in range(T):
            if not mask[i, t]:
                continue
            r, a = torch.exp(lp[i, t]), adv[i, t]
            row.append(paper_token_loss(r, a, eps_low, eps_high, beta1, beta2, 3.0))
            # ours reports PPO's value: the paper's value + (1 - beta) times the clipped value
            if float(a) < 0 and float(r.detach()) < 1 - eps_low:
                gap.append(-(1 - beta1) * (1 - eps_low) * float(a))
            elif float(a) > 0 and float(r.detach()) > 1 + eps_high:
                gap.append(-(1 - beta2) * (1 + eps_high) * float(a))
            else:
                gap.append(0.0)
        rows.append(row)
        gap_rows.append(gap)
    if mode == "token-mean":
        paper = sum(x for row in rows for x in row) / int(mask.sum())
        gap = sum(x for row in gap_rows for x in row) / int(mask.sum())
    else:
        paper = sum(sum(row) / len(row) for row in rows) / B
        gap = sum(sum(row) / len(row) for row in gap_rows) / B
    (g_paper,) = torch.autograd.grad(paper, lp)
    torch.testing.assert_close(g_ours, g_paper, rtol=1e-12, atol=1e-14)
    assert gap != 0.0  # both regions occur in this batch, so the values differ ...
    assert out.loss.item() == pytest.approx(paper.item() + gap, rel=1e-12, abs=1e-14)  # ... by the constant
    assert out.metrics["ce_gppo/low_frac"] > 0 and out.metrics["ce_gppo/high_frac"] > 0


# ---------------------------------------------------------------------------------------------- properties
def random_batch(seed, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(6, 9, generator=g, dtype=torch.float64) - 1
    old = lp + spread * torch.randn(6, 9, generator=g, dtype=torch.float64)
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=g) > 0.2
    mask[:, 0] = True
    return lp, old, adv, mask


def grads(name, lp, old, adv, mask, **cfg):
    leaf = lp.clone().requires_grad_(True)
    out = re.make_method(name, **cfg).compute_loss(TokenBatch(log_prob=leaf, old_log_prob=old, advantages=adv,
                                                              mask=mask))
    (g,) = torch.autograd.grad(out.loss, leaf)
    return out, g


@pytest.mark.parametrize("seed", [0, 1])
def test_value_is_grpos_and_gradient_is_linear_in_beta(seed):
    lp, old, adv, mask = random_batch(seed)
    base, g0 = grads("grpo", lp, old, adv, mask, dual_clip=3.0)
    o1, g1 = grads("ce_gppo", lp, old, adv, mask, beta1=1.0, beta2=1.0)
    oh, gh = grads("ce_gppo", lp, old, adv, mask, beta1=0.5, beta2=0.25)
    assert o1.loss.item() == base.loss.item() == oh.loss.item()                 # the value never changes
    low = (adv[:, None] < 0) & (torch.exp(lp - old) < 0.8) & mask
    high = (adv[:, None] > 0) & (torch.exp(lp - old) > 1.2) & mask
    inside = mask & ~low & ~high
    assert low.any() and high.any()
    assert torch.equal(g1[inside], g0[inside]) and torch.equal(gh[inside], g0[inside])
    assert torch.equal(g0[low | high], torch.zeros_like(g0[low | high]))       # PPO: no gradient there
    torch.testing.assert_close(gh[low], 0.5 * g1[low], rtol=1e-12, atol=0)
    torch.testing.assert_close(gh[high], 0.25 * g1[high], rtol=1e-12, atol=0)
    # beta1 = beta2 = 0 (the neutral setting) is grpo, value and gradient, on a batch with both regions
    oz, gz = grads("ce_gppo", lp, old, adv, mask, beta1=0.0, beta2=0.0)
    assert oz.loss.item() == base.loss.item() and torch.equal(gz, g0)
    # low_frac + high_frac is PPO's clip fraction
    assert (oh.metrics["ce_gppo/low_frac"] + oh.metrics["ce_gppo/high_frac"]).item() == pytest.approx(
        oh.metrics["ce_gppo/clip_frac"].item())


def test_token_loss_function_matches_method():
    lp, old, adv, mask = random_batch(2)
    r = torch.exp(lp - old)
    a = torch.where(mask, adv[:, None].expand_as(lp), 0.0)
    lm = ce_gppo_token_loss(r, a, eps_low=0.2, eps_high=0.2, beta1=0.5, beta2=1.0, dual_clip=3.0)
    out = re.make_method("ce_gppo").compute_loss(TokenBatch(log_prob=lp, old_log_prob=old, advantages=adv, mask=mask))
    torch.testing.assert_close(out.loss, torch.where(mask, lm, 0.0).sum() / mask.sum(), rtol=1e-12, atol=1e-14)


def test_config_errors_and_defaults():
    c = re.make_method("ce_gppo").config
    assert (c.beta1, c.beta2, c.eps_low, c.eps_high, c.dual_clip) == (0.5, 1.0, 0.2, 0.2, 3.0)
    for kw, field in ((dict(beta1=-0.1), "beta1"), (dict(beta2=float("nan")), "beta2"), (dict(dual_clip=0.5),
                                                                                          "dual_clip")):
        with pytest.raises(ValueError, match=field):
            re.make_method("ce_gppo", **kw)
