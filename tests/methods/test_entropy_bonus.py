import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import stats
from rlvr_entropy.methods.entropy_bonus import clamped_entropy
from tests.helpers import batch_from, loss_and_grads, make_leaves


def test_hand_case_bonus_value():
    # one token, r = 1, A = 0: PG loss 0; entropy 0.7 -> loss = -coef * 0.7
    b = re.TokenBatch(log_prob=torch.zeros(1, 1), old_log_prob=torch.zeros(1, 1), advantages=torch.zeros(1),
                      mask=torch.ones(1, 1, dtype=torch.bool), entropy=torch.tensor([[0.7]]))
    out = re.make_method("entropy_bonus", coef=0.01).compute_loss(b)
    assert out.loss.item() == pytest.approx(-0.007)


def test_matches_reference_and_gradient_on_entropy():
    leaves, _ = make_leaves(seed=1)
    m = re.make_method("entropy_bonus", coef=0.05, loss_agg_mode="seq-mean-token-mean")
    out, grads = loss_and_grads(m, leaves)
    base, gb = loss_and_grads(re.make_method("grpo", loss_agg_mode="seq-mean-token-mean"), leaves)
    msk = leaves["mask"]
    h = leaves["entropy"]
    rows = [h[i][msk[i]].mean() for i in range(h.shape[0])]
    ref = base.loss - 0.05 * sum(rows) / len(rows)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    # d loss / d H_it = -coef / (B * n_i) at valid tokens
    n = msk.sum(-1, keepdim=True).double()
    expected = torch.where(msk, -0.05 / (h.shape[0] * n), torch.zeros_like(h))
    torch.testing.assert_close(grads["entropy"], expected, rtol=1e-10, atol=1e-14)


def test_entropy_from_logits_when_missing():
    leaves, _ = make_leaves(seed=2)
    a = re.make_method("entropy_bonus", coef=0.1).compute_loss(batch_from(leaves, entropy=None)).loss
    b = re.make_method("entropy_bonus", coef=0.1).compute_loss(batch_from(leaves)).loss
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def ref_clamped(z, frac):
    V = z.shape[-1]
    n = max(1, math.ceil((1 - frac) * V))
    out = []
    for row in z.reshape(-1, V):
        v, _ = torch.topk(row, n)
        q = torch.softmax(v, -1)
        out.append(-(q * torch.log(q)).sum())
    return torch.stack(out).reshape(z.shape[:-1])


def test_clamped_entropy_hand_and_reference():
    # 4 tokens, drop 50% lowest: keep the 2 largest -> log 2 if they are equal
    z = torch.tensor([0.0, 0.0, -5.0, -6.0], dtype=torch.float64)
    assert clamped_entropy(z, 0.5).item() == pytest.approx(math.log(2))
    assert clamped_entropy(z, 0.0).item() == pytest.approx(stats.entropy(z).item())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 13, generator=g, dtype=torch.float64).requires_grad_(True)
    ours = clamped_entropy(x, 0.3, chunk_size=4)
    ref = ref_clamped(x, 0.3)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(ours.sum(), x)[0]
    g2 = torch.autograd.grad(ref.sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: clamped_entropy(t, 0.3), (x,))
    with pytest.raises(ValueError, match="clamp_fraction"):
        clamped_entropy(x, 1.0)


def test_aent_option_uses_logits():
    leaves, _ = make_leaves(seed=3)
    out = re.make_method("entropy_bonus", coef=0.1, clamp_fraction=0.5).compute_loss(batch_from(leaves))
    msk = leaves["mask"]
    h = ref_clamped(leaves["logits"].detach(), 0.5)
    base = re.make_method("grpo").compute_loss(batch_from(leaves)).loss
    assert out.loss.item() == pytest.approx(base.item() - 0.1 * h[msk].mean().item(), abs=1e-9)
    with pytest.raises(ValueError, match="logits"):
        re.make_method("entropy_bonus", clamp_fraction=0.5).compute_loss(batch_from(leaves, logits=None))
