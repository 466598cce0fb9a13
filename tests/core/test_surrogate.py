import pytest
import torch

from rlvr_entropy.core.surrogate import ppo_token_loss


def _one(r, a, **kw):
    lp = torch.log(torch.tensor([[r]], dtype=torch.float64)).requires_grad_(True)
    t = ppo_token_loss(lp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([[a]], dtype=torch.float64),
                       eps_low=0.2, eps_high=0.28, **kw)
    (g,) = torch.autograd.grad(t.loss.sum(), lp)
    return t, t.loss.item(), g.item()


@pytest.mark.parametrize("r,a,loss,grad_wrt_logp,clipped", [
    (1.1, 1.0, -1.1, -1.1, False),      # inside: l = -A r, dl/dlogp = -A r
    (1.5, 1.0, -1.28, 0.0, True),       # A > 0, r > 1 + eps_high: clipped at -A (1.28)
    (0.5, 1.0, -0.5, -0.5, False),      # A > 0, r small: unclipped (max picks -A r)
    (0.5, -1.0, 0.8, 0.0, True),        # A < 0, r < 1 - eps_low: clipped at -A (0.8)
    (1.5, -1.0, 1.5, 1.5, False),       # A < 0, r large: unclipped
])
def test_hand_cases(r, a, loss, grad_wrt_logp, clipped):
    t, l, g = _one(r, a)
    assert l == pytest.approx(loss)
    assert g == pytest.approx(grad_wrt_logp)
    assert bool(t.clipped) is clipped
    assert t.coef(torch.tensor([[a]], dtype=torch.float64)).item() == pytest.approx(0.0 if clipped else a * r)


def test_dual_clip():
    t, l, g = _one(5.0, -1.0, dual_clip=3.0)
    assert l == pytest.approx(3.0) and g == 0.0 and bool(t.dual_clipped)
    t, l, g = _one(2.0, -1.0, dual_clip=3.0)
    assert l == pytest.approx(2.0) and g == pytest.approx(2.0) and not bool(t.dual_clipped)
    t, l, g = _one(5.0, 1.0, dual_clip=3.0)  # dual-clip never applies to A > 0
    assert l == pytest.approx(-1.28) and not bool(t.dual_clipped)


def test_log_ratio_clamp_keeps_exp_finite():
    lp = torch.tensor([[500.0]])
    t = ppo_token_loss(lp, torch.zeros(1, 1), torch.tensor([[-1.0]]), eps_low=0.2, eps_high=0.2)
    assert torch.isfinite(t.loss).all() and t.ratio.item() == pytest.approx(torch.exp(torch.tensor(20.0)).item())
