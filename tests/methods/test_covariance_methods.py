"""clip_cov and kl_cov: hand cases and scope properties (parity with verl in test_verl_parity.py)."""
import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import TokenBatch
from rlvr_entropy.methods._cov import token_covariance


def test_covariance_hand_case():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    a = torch.tensor([[1.0, 0.0, -1.0]])
    m = torch.ones(1, 3, dtype=torch.bool)
    # means: A 0, log pi -2 -> cov = [1*1, 0, -1*-1] = [1, 0, 1]
    assert token_covariance(lp, a, m).tolist() == [[1.0, 0.0, 1.0]]


def _batch(seed, B=6, T=10):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, T, generator=g) - 1).double().requires_grad_(True)
    old = lp.detach() + 0.1 * torch.randn(B, T, generator=g).double()
    adv = torch.randn(B, generator=g).double() * 3
    mask = torch.rand(B, T, generator=g) > 0.2
    return TokenBatch(log_prob=lp, old_log_prob=old, advantages=adv, mask=mask)


def test_clip_cov_zeroes_exactly_the_selected_number_of_tokens():
    b = _batch(0)
    m = re.make_method("clip_cov", ratio=0.1, lb=0.0, ub=100.0, seed=3)
    out = m.compute_loss(b)
    n = b.num_tokens
    assert out.metrics["clip_cov/selected_frac"].item() == pytest.approx(max(int(0.1 * n), 1) / n)
    (g,) = torch.autograd.grad(out.loss, b.log_prob)
    zero_grad = (g == 0) & b.mask
    assert int(zero_grad.sum()) >= max(int(0.1 * n), 1)


def test_clip_cov_seeded_is_reproducible_and_global_rng_follows_manual_seed():
    b = _batch(1)
    a1 = re.make_method("clip_cov", ratio=0.2, lb=0.0, seed=5).compute_loss(b).loss
    a2 = re.make_method("clip_cov", ratio=0.2, lb=0.0, seed=5).compute_loss(b).loss
    assert a1.item() == a2.item()
    torch.manual_seed(0)
    x = re.make_method("clip_cov", ratio=0.2, lb=0.0).compute_loss(b).loss
    torch.manual_seed(0)
    y = re.make_method("clip_cov", ratio=0.2, lb=0.0).compute_loss(b).loss
    assert x.item() == y.item()


def test_kl_cov_hand_case():
    # 3 tokens, ratio 0.34 -> k = 1: the largest covariance token (index 0 or 2, cov 1) gets + beta |log r|
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0, -3.0]])
    adv = torch.tensor([[1.0, 0.0, -1.0]])
    b = TokenBatch(log_prob=lp, old_log_prob=old, advantages=adv, mask=torch.ones(1, 3, dtype=torch.bool))
    out = re.make_method("kl_cov", ratio=0.34, beta=2.0).compute_loss(b)
    r0 = torch.exp(torch.tensor(0.5))
    # token 0 (first of the tie in topk order on CPU): -1 * r0 + 2 * 0.5; token 1: 0; token 2: +1 * 1
    expected = ((-r0 + 1.0) + 0.0 + 1.0) / 3
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_kl_cov_beta_zero_is_unclipped_surrogate():
    b = _batch(2)
    out = re.make_method("kl_cov", beta=0.0).compute_loss(b).loss
    adv = b.token_advantages()
    r = torch.exp(b.clean(b.log_prob) - b.clean(b.old_log_prob))
    ref = torch.where(b.mask, -adv * r, 0.0).sum() / b.mask.sum()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_global_scope_over_two_microbatches_equals_one_batch(name):
    """With a gather_fn that sees both halves, selection on each half equals selection on the whole batch."""
    b = _batch(4, B=8)
    cfg = dict(ratio=0.1, scope="global")
    if name == "clip_cov":
        cfg.update(lb=-100.0, ub=100.0, seed=1)
    whole = re.make_method(name, **cfg)
    # fake two ranks: each half's gather concatenates its own values with the other half's
    halves = [slice(0, 4), slice(4, 8)]
    sub = [TokenBatch(log_prob=b.log_prob[s], old_log_prob=b.old_log_prob[s], advantages=b.advantages[s],
                      mask=b.mask[s]) for s in halves]
    if name == "kl_cov":
        from rlvr_entropy.methods._cov import token_covariance as tc

        full_cov = tc(b.clean(b.log_prob), b.token_advantages(), b.mask)
        sel_whole = whole.select(b, full_cov)
        sels = []
        for i, s in enumerate(halves):
            m = re.make_method(name, **cfg)
            o = halves[1 - i]
            m.gather_fn = lambda x, o=o: torch.cat([x, full_cov[o][b.mask[o]].to(x.dtype)])
            sels.append(m.select(sub[i], full_cov[s]))
        assert torch.equal(torch.cat(sels), sel_whole)
    else:
        # covariance means over both halves through gather
        cov_w = token_covariance(b.clean(b.log_prob), b.token_advantages(), b.mask)
        for i, s in enumerate(halves):
            o = halves[1 - i]
            other_sums = torch.stack([torch.where(b.mask[o], b.token_advantages()[o], 0.0).sum(),
                                      torch.where(b.mask[o], b.clean(b.log_prob)[o], 0.0).sum().detach(),
                                      b.mask[o].sum().double()])
            cov_h = token_covariance(sub[i].clean(sub[i].log_prob), sub[i].token_advantages(), sub[i].mask,
                                     gather_fn=lambda x, os=other_sums: torch.cat([x, os.to(x.dtype)]))
            torch.testing.assert_close(cov_h, cov_w[s])
