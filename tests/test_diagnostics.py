import math

import pytest
import torch

from rlvr_entropy import diagnostics as D
from rlvr_entropy import stats


def test_pearson_spearman_hand_cases():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert D.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert D.pearson(x, -x) == pytest.approx(-1.0)
    # y = x^3 is monotone: Spearman 1, Pearson < 1
    assert D.spearman(x, x ** 3) == pytest.approx(1.0)
    assert D.pearson(x, x ** 3) < 0.99
    # ties: ranks of [1, 1, 2] are [0.5, 0.5, 2]
    assert torch.equal(D._ranks(torch.tensor([1.0, 1.0, 2.0])), torch.tensor([0.5, 0.5, 2.0], dtype=torch.float64))
    assert math.isnan(D.pearson(torch.ones(3), x[:3]))
    with pytest.raises(ValueError, match="same number"):
        D.pearson(x, x[:2])


def test_quadrants_follow_steer_sign_rule():
    # H = 1: high probability means log pi > -1
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    logp = torch.tensor([-0.5, -2.0, -0.5, -2.0])
    h = torch.ones(4)
    assert D.quadrant_of(adv, logp, h).tolist() == [0, 1, 2, 3]


def test_probe_on_a_real_softmax_step_exact_beats_steer():
    """Tabular softmax, one SGD step on the surrogate sum_t w_t log pi(a_t): measured vs predicted."""
    g = torch.Generator().manual_seed(0)
    N, V, eta = 400, 20, 1e-3
    z = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    a = torch.multinomial(torch.softmax(z.detach(), -1), 1, generator=g).squeeze(-1)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    coef = adv.clone()
    probe = D.EntropyChangeProbe()
    mask = torch.ones(1, N, dtype=torch.bool)
    probe.before(z[None], a[None], coef[None], mask, adv[None], step=3)
    obj = (coef * torch.log_softmax(z, -1).gather(-1, a[:, None]).squeeze(-1)).sum()
    (grad,) = torch.autograd.grad(obj, z)
    rec = probe.after((z + eta * grad).detach()[None])
    assert rec.step == 3 and rec.measured.shape == (N,)
    assert rec.report["exact/pearson"] > 0.99
    assert rec.report["steer/pearson"] < rec.report["exact/pearson"] - 0.1
    assert sum(rec.report[f"count/{q}"] for q in D.QUADRANTS) == N
    # the exact prediction times eta matches the measured change in scale too
    pred = rec.predicted["exact"] * eta
    assert torch.allclose(pred, rec.measured, rtol=0.05, atol=1e-5)
    js = rec.to_json(max_points=50)
    assert len(js["measured"]) == 50 and len(js["predicted_exact"]) == 50


def test_probe_requires_before():
    with pytest.raises(RuntimeError):
        D.EntropyChangeProbe().after(torch.zeros(1, 1, 3))
