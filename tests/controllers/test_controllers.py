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


def test_reach_floor_by_hand():
    from rlvr_entropy.controllers.reach import ReachFloor

    f = ReachFloor(tol=0.05, gain=0.5, ema=0.5, ref_steps=2, min_scale=0.6)
    # step 1: ref = 0.8, ema = 0.8: m = 1 + 0.5 (0.8 - 0.05 - 0.8) = 0.975
    assert f.update(0.8) == pytest.approx(0.975)
    # step 2: ref = (0.8 + 0.6) / 2 = 0.7, ema = 0.7: m = 0.975 + 0.5 (0.7 - 0.05 - 0.7) = 0.95
    assert f.update(0.6) == pytest.approx(0.95) and f.ref == pytest.approx(0.7)
    # step 3 (ref fixed): ema = 0.5 (0.7) + 0.5 (0.2) = 0.45: m = 0.95 + 0.5 (0.65 - 0.45) = 1.05 -> clipped at 1
    assert f.update(0.2) == 1.0 and f.ref == pytest.approx(0.7)
    # reach well above the reference: the floor descends to min_scale and stays there
    for _ in range(20):
        f.update(1.0)
    assert f.m == 0.6
    g = ReachFloor(tol=0.05, gain=0.5, ema=0.5, ref_steps=2, min_scale=0.6)
    g.load_state_dict(f.state_dict())
    assert g.state_dict() == f.state_dict() and g.update(0.3) == f.update(0.3)
    for bad in ({"tol": -0.1}, {"gain": float("nan")}, {"ema": 1.5}, {"min_scale": 2.0}, {"ref_steps": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ReachFloor(**{"tol": 0.05, "gain": 0.5, **bad})
    with pytest.raises(ValueError, match="reach"):
        f.update(1.5)
