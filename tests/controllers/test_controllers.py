import math

import pytest

from rlvr_entropy.controllers import AdaptiveCoefficient, Anchor


def test_anchor_set_once_and_round_trip():
    a = Anchor()
    assert not a.is_set
    assert a.set_if_unset(0.5) == 0.5
    assert a.set_if_unset(0.9) == 0.5
    b = Anchor()
    b.load_state_dict(a.state_dict())
    assert b.value == 0.5
    with pytest.raises(ValueError):
        Anchor(math.nan)
    with pytest.raises(ValueError):
        b.load_state_dict({})


def test_adaptive_coefficient_trajectory_by_hand():
    c = AdaptiveCoefficient(target=0.2, delta=1e-3, coef_min=0.0, coef_max=2.5e-3)
    # below target: +1e-3 each step, capped at 2.5e-3
    assert [round(c.update(0.1), 6) for _ in range(3)] == [0.001, 0.002, 0.0025]
    assert c.active()
    # above target: -1e-3, floored at 0
    assert [round(c.update(0.3), 6) for _ in range(3)] == [0.0015, 0.0005, 0.0]
    assert not c.active()
    d = AdaptiveCoefficient(target=0.2, delta=1e-3, coef_min=0.0, coef_max=2.5e-3)
    d.load_state_dict(c.state_dict())
    assert d.state_dict() == c.state_dict()
