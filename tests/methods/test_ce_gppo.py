import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import TokenBatch


def _grad(r, a, **cfg):
    lp = torch.log(torch.tensor([[r]], dtype=torch.float64)).requires_grad_(True)
    b = TokenBatch(log_prob=lp, old_log_prob=torch.zeros(1, 1, dtype=torch.float64),
                   advantages=torch.tensor([a], dtype=torch.float64), mask=torch.ones(1, 1, dtype=torch.bool))
    out = re.make_method("ce_gppo", **cfg).compute_loss(b)
    (g,) = torch.autograd.grad(out.loss, lp)
    return out.loss.item(), g.item()


@pytest.mark.parametrize("r,a,loss,grad", [
    # paper: A < 0, r < 1 - eps: gradient -b1 (1 - eps) A = -0.5 * 0.8 * -1 = 0.4 ; value -(1-eps) A = 0.8
    (0.5, -1.0, 0.8, 0.4),
    # A > 0, r > 1 + eps: gradient -b2 (1 + eps) A = -1 * 1.2 * 2 = -2.4 ; value -(1+eps) A = -2.4
    (1.5, 2.0, -2.4, -2.4),
    # inside: l = -r A, gradient -r A
    (1.1, 1.0, -1.1, -1.1),
    # A > 0, small r: PPO does not clip: -r A
    (0.5, 1.0, -0.5, -0.5),
])
def test_regions_by_hand(r, a, loss, grad):
    l, g = _grad(r, a, b1=0.5, b2=1.0)
    assert l == pytest.approx(loss) and g == pytest.approx(grad)


def test_reference_from_paper_formula_gradients():
    g = torch.Generator().manual_seed(0)
    lp = (torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    adv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    b = TokenBatch(log_prob=lp, old_log_prob=torch.zeros(4, 6, dtype=torch.float64), advantages=adv,
                   mask=torch.ones(4, 6, dtype=torch.bool))
    out = re.make_method("ce_gppo", b1=0.75, b2=1.0).compute_loss(b)
    (g1,) = torch.autograd.grad(out.loss, lp)
    # paper's loss, written token by token
    terms = []
    for i in range(4):
        for t in range(6):
            r = torch.exp(lp[i, t])
            A = adv[i, t]
            if A < 0 and r < 0.8:
                terms.append(-0.75 * 0.8 * (r / r.detach()) * A)
            elif A > 0 and r > 1.2:
                terms.append(-1.0 * 1.2 * (r / r.detach()) * A)
            else:
                terms.append(-r * A)
    ref = torch.stack(terms).mean()
    (g2,) = torch.autograd.grad(ref, lp)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)
