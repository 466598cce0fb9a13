import pytest
import torch

import rlvr_entropy as re


def _batch(h):
    return re.TokenBatch(log_prob=torch.zeros(1, 2), old_log_prob=torch.zeros(1, 2), advantages=torch.zeros(1),
                         mask=torch.ones(1, 2, dtype=torch.bool), entropy=torch.full((1, 2), h))


def test_controller_trajectory_and_once_per_step():
    m = re.make_method("adaptive_entropy", target=0.2, delta=1e-3, coef_max=2.5e-3)
    # step 0: H = 0.1 < 0.2: c = 0.001, active -> loss = -0.001 * 0.1
    out = m.compute_loss(_batch(0.1), step=0)
    assert out.metrics["adaptive_entropy/coef"] == pytest.approx(0.001)
    assert out.loss.item() == pytest.approx(-0.0001)
    # same step again (second micro-batch): no further update
    out = m.compute_loss(_batch(0.1), step=0)
    assert out.metrics["adaptive_entropy/coef"] == pytest.approx(0.001)
    for s, expect in [(1, 0.002), (2, 0.0025), (3, 0.0025)]:
        out = m.compute_loss(_batch(0.1), step=s)
        assert out.metrics["adaptive_entropy/coef"] == pytest.approx(expect)
    # above target: coefficient decreases and the bonus is off
    out = m.compute_loss(_batch(0.5), step=4)
    assert out.metrics["adaptive_entropy/coef"] == pytest.approx(0.0015)
    assert out.metrics["adaptive_entropy/applied_coef"] == 0.0 and out.loss.item() == 0.0
    # save / restore mid-run
    m2 = re.make_method("adaptive_entropy", target=0.2, delta=1e-3, coef_max=2.5e-3)
    m2.load_state_dict(m.state_dict())
    a = m.compute_loss(_batch(0.1), step=5)
    b = m2.compute_loss(_batch(0.1), step=5)
    assert a.loss.item() == b.loss.item() and a.metrics["adaptive_entropy/coef"] == pytest.approx(0.0025)


def test_step_none_updates_every_call():
    m = re.make_method("adaptive_entropy", delta=1e-3)
    for i in range(3):
        out = m.compute_loss(_batch(0.1))
    assert out.metrics["adaptive_entropy/coef"] == pytest.approx(0.003)


def test_config_errors():
    with pytest.raises(ValueError, match="coef_min"):
        re.make_method("adaptive_entropy", coef_min=0.1, coef_max=0.01)
    with pytest.raises(ValueError, match="delta"):
        re.make_method("adaptive_entropy", delta=-1.0)
