"""adaptive_entropy: the controller's trajectory by hand (once per step from the whole step, one step of lag as
TRL; save/restore mid-run; evaluation leaves it alone), parity of a multi-step run with a reference written from
the spec, neutral setting, measurement over every rank."""
from __future__ import annotations

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.controllers import AdaptiveCoefficient
from tests.helpers import loss_and_grads, make_leaves


def _batch(h, T=2, adv=0.0):
    """One response of T tokens, on-policy, A = adv, constant entropy h (float) or given [1, T] tensor."""
    f64 = torch.float64
    ent = torch.full((1, T), h, dtype=f64) if isinstance(h, float) else h
    return re.TokenBatch(log_prob=torch.zeros(1, T, dtype=f64), old_log_prob=torch.zeros(1, T, dtype=f64),
                         advantages=torch.full((1,), adv, dtype=f64), mask=torch.ones(1, T, dtype=torch.bool),
                         entropy=ent)


def _m(**kw):
    return re.make_method("adaptive_entropy", target=0.2, delta=1e-3, coef_max=2.5e-3, **kw)


# ------------------------------------------------------------------------------------------- hand-derived
def test_controller_trajectory_by_hand():
    m = _m()
    M = "adaptive_entropy/"
    # (H measured in step k, coefficient applied in step k (from steps < k), active, loss = -c * H when active;
    # A = 0 so the PG term is 0). The update at the end of step k uses H_k: one step of lag, as TRL.
    script = [
        (0.1, 0.0, False, 0.0),                  # no measurement yet: no bonus; end: c = 0.001 (0.1 < 0.2)
        (0.1, 0.001, True, -0.001 * 0.1),        # end: c = 0.002
        (0.1, 0.002, True, -0.002 * 0.1),        # end: c = 0.0025 (capped at coef_max)
        (0.15, 0.0025, True, -0.0025 * 0.15),    # end: c = 0.0025
        (0.5, 0.0025, True, -0.0025 * 0.5),      # the gate is from H = 0.15; end: c = 0.0015, gate off
        (0.2, 0.0015, False, 0.0),               # end: H == target counts as "not below" (strict <): 0.0005
        (0.3, 0.0005, False, 0.0),               # end: floored at coef_min = 0
        (0.3, 0.0, False, 0.0),
        (0.05, 0.0, False, 0.0),                 # end: c = 0.001, gate on
        (0.05, 0.001, True, -0.001 * 0.05),
    ]
    for step, (h, coef, active, loss) in enumerate(script):
        out = m.compute_loss(_batch(h), step=step)
        assert out.metrics[M + "coefficient"] == pytest.approx(coef, abs=1e-15), step
        assert out.metrics[M + "active"] == float(active), step
        assert out.metrics[M + "applied_coefficient"] == (pytest.approx(coef, abs=1e-15) if active else 0.0)
        assert out.metrics[M + "target"] == 0.2
        assert out.loss.item() == pytest.approx(loss, abs=1e-12), step
        sums = m.end_step()
        assert sums == {"entropy_sum": pytest.approx(2 * h), "tokens": 2.0}
        assert m.ctrl.last_entropy == pytest.approx(h)
    assert m.ctrl.steps == len(script)


def test_the_step_is_measured_over_all_its_micro_batches():
    m = _m()
    # step 0: three micro-batches (2 tokens each); nothing changes until end_step
    for h in (0.1, 0.9, 0.05):
        out = m.compute_loss(_batch(h), step=0)
        assert out.metrics["adaptive_entropy/coefficient"] == 0.0 and m.ctrl.steps == 0
    m.end_step()
    assert m.ctrl.last_entropy == pytest.approx((0.1 + 0.9 + 0.05) / 3) and m.ctrl.steps == 1
    assert m.ctrl.coef == 0.0  # 0.35 >= 0.2: c - delta, floored
    # a new step value closes the previous step when the engine did not call end_step
    m.compute_loss(_batch(0.1), step=1)
    m.compute_loss(_batch(0.1, T=4), step=1)
    out = m.compute_loss(_batch(0.1), step=2)
    assert m.ctrl.steps == 2 and m.ctrl.last_entropy == pytest.approx(0.1)
    assert out.metrics["adaptive_entropy/coefficient"] == pytest.approx(0.001)
    assert out.loss.item() == pytest.approx(-0.001 * 0.1, abs=1e-12)


def test_evaluation_never_changes_the_controller():
    m = _m()
    m.compute_loss(_batch(0.1), step=0)
    m.end_step()
    state = m.state_dict()
    for h in (0.9, 0.01):  # eval batches: the loss uses the state, the state stays
        out = m.compute_loss(_batch(h), step=5, observe=False)
        assert out.loss.item() == pytest.approx(-0.001 * h, abs=1e-12)
    assert m.end_step() == {"entropy_sum": 0.0, "tokens": 0.0}  # nothing was observed
    assert m.state_dict() == state


def test_step_none_updates_every_call():
    m = re.make_method("adaptive_entropy", delta=1e-3)
    for _ in range(3):
        out = m.compute_loss(_batch(0.1))
    assert out.metrics["adaptive_entropy/coefficient"] == pytest.approx(0.002)  # applied: two updates before
    assert m.ctrl.coef == pytest.approx(0.003)


def test_save_and_restore_mid_run():
    m = _m()
    for step, h in enumerate([0.1, 0.1, 0.5]):                # c: 0.001, 0.002, 0.001; last gate off
        m.compute_loss(_batch(h), step=step)
        m.end_step()
    state = m.state_dict()
    assert state == {"coef": {"coef": pytest.approx(0.001), "last_entropy": pytest.approx(0.5), "steps": 3}}
    m2 = _m()
    m2.load_state_dict(state)
    assert m2.state_dict() == state
    # the restored method continues the trajectory exactly: step 3 applies 0.001 with the gate off (H = 0.5),
    # measures (0.1 + 0.7) / 2 = 0.4 -> c 0; step 4 measures 0.1 -> c 0.001; step 5 applies it
    for step, h in [(3, 0.1), (3, 0.7), (4, 0.1), (5, 0.1)]:
        a, b = m.compute_loss(_batch(h), step=step), m2.compute_loss(_batch(h), step=step)
        assert a.loss.item() == b.loss.item()
        assert a.metrics == b.metrics
    assert m.ctrl.coef == pytest.approx(0.001) and m2.ctrl.steps == 5
    assert b.loss.item() == pytest.approx(-0.001 * 0.1, abs=1e-12)
    with pytest.raises(ValueError, match="unknown controller"):
        m2.load_state_dict({"anchor": {}})


def test_empty_step_leaves_controller_unchanged():
    m = _m()
    empty = re.TokenBatch(log_prob=torch.zeros(1, 2), old_log_prob=torch.zeros(1, 2), advantages=torch.zeros(1),
                          mask=torch.zeros(1, 2, dtype=torch.bool), entropy=torch.full((1, 2), float("nan")))
    out = m.compute_loss(empty, step=0)
    m.end_step()
    assert out.loss.item() == 0.0 and m.ctrl.steps == 0 and m.ctrl.coef == 0.0
    assert m.ctrl.last_entropy is None


# ------------------------------------------------------------------------------------- parity with reference
def ref_run(batches, *, target, delta, cmin, cmax, c0=0.0, mode="token-mean"):
    """The spec, one token at a time: L = agg(PPO l_t) - c 1[H < target] agg(H_t) with c and H from the steps
    before; at the end of each step H = mean of the step's valid entropies (all its micro-batches) and
    c <- clip(c +- delta). Returns the losses."""
    c, h_meas, losses = c0, None, []
    pending: list[float] = []
    last_step = batches[0][0]
    for step, lv in batches:
        if step != last_step:  # end of the previous step
            if pending:
                h_meas = sum(pending) / len(pending)
                c = min(max(c + delta if h_meas < target else c - delta, cmin), cmax)
            pending, last_step = [], step
        lp, old, adv, m, ent = lv["log_prob"], lv["old_log_prob"], lv["advantages"], lv["mask"], lv["entropy"]
        B, T = m.shape
        pending += [float(ent[i, t].detach()) for i in range(B) for t in range(T) if m[i, t]]
        pg_rows, h_rows = [], []
        for i in range(B):
            ls, hs = [], []
            for t in range(T):
                if m[i, t]:
                    r = torch.exp(lp[i, t] - old[i, t])
                    ls.append(torch.maximum(-adv[i] * r, -adv[i] * torch.clamp(r, 0.8, 1.2)))
                    hs.append(ent[i, t])
            if ls:
                pg_rows.append(ls)
                h_rows.append(hs)
        if mode == "token-mean":
            n = sum(len(r) for r in pg_rows)
            pg = sum(sum(r) for r in pg_rows) / n
            hh = sum(sum(r) for r in h_rows) / n
        else:  # seq-mean-token-mean
            pg = sum(sum(r) / len(r) for r in pg_rows) / len(pg_rows)
            hh = sum(sum(r) / len(r) for r in h_rows) / len(h_rows)
        coef = c if (h_meas is not None and h_meas < target) else 0.0
        losses.append(pg - coef * hh)
    return losses


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_multi_step_run_matches_reference(mode):
    # entropies scaled around the target so the gate switches on and off; several micro-batches per step
    schedule = [(0, 0.5), (0, 2.0), (1, 0.5), (2, 0.6), (2, 0.1), (3, 3.0), (4, 0.8), (5, 0.4), (6, 0.4),
                (7, 4.0), (8, 1.0)]
    batches = []
    for k, (step, scale) in enumerate(schedule):
        lv, _ = make_leaves(seed=20 + k)
        lv["entropy"] = (lv["entropy"].detach() * scale * 0.1).requires_grad_(True)
        batches.append((step, lv))
    kw = dict(target=0.2, delta=2e-3, cmin=0.0, cmax=5e-3)
    ref = ref_run(batches, mode=mode, **kw)
    m = re.make_method("adaptive_entropy", target=0.2, delta=2e-3, coef_max=5e-3, loss_agg_mode=mode)
    actives = []
    for (step, lv), r in zip(batches, ref):
        out, grads = loss_and_grads(m, lv, step=step)
        torch.testing.assert_close(out.loss, r, rtol=1e-12, atol=1e-14)
        g_ref = torch.autograd.grad(r, [lv["log_prob"], lv["entropy"]])
        torch.testing.assert_close(grads["log_prob"], g_ref[0], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(grads["entropy"], g_ref[1], rtol=1e-10, atol=1e-14)
        actives.append(out.metrics["adaptive_entropy/active"])
    assert 0.0 in actives and 1.0 in actives  # both regimes were exercised


def test_neutral_is_exactly_grpo_even_below_target():
    # entropies far below the target: the default method adds a bonus, coef_max = 0 gives grpo exactly
    leaves, _ = make_leaves(seed=7)
    leaves["entropy"] = (leaves["entropy"].detach() * 0.01).requires_grad_(True)
    base, gb = loss_and_grads(re.make_method("grpo"), leaves, step=0)
    m0 = re.make_method("adaptive_entropy", **re.get_method_class("adaptive_entropy").neutral_overrides())
    default = re.make_method("adaptive_entropy")
    for step in range(3):
        a, ga = loss_and_grads(m0, leaves, step=step)
        assert torch.equal(a.loss, base.loss)
        for f in ga:
            assert torch.equal(ga[f], gb[f]), f
        assert a.metrics["adaptive_entropy/coefficient"] == 0.0
        d, _ = loss_and_grads(default, leaves, step=step)
        if step:  # the bonus is on from the second step: c = 1e-4 step
            assert d.loss.item() < base.loss.item()
        else:
            assert torch.equal(d.loss, base.loss)


def test_entropy_from_logits_when_missing():
    leaves, _ = make_leaves(seed=8)
    low = (leaves["logits"].detach() * 8).requires_grad_(True)  # peaked: token-mean entropy below 0.2
    lv = dict(leaves, logits=low, entropy=None)
    m = re.make_method("adaptive_entropy", coef_init=0.004)
    loss_and_grads(m, lv, step=0)
    out, grads = loss_and_grads(m, lv, step=1)
    assert out.metrics["adaptive_entropy/active"] == 1.0
    assert grads["logits"].abs().sum() > 0  # the bonus differentiates the entropy computed from logits


def test_global_measurement_over_ranks():
    from tests.methods._world import FakeWorld

    leaves, _ = make_leaves(seed=9, B=4)
    h = (leaves["entropy"].detach() * 0.1)
    msk = leaves["mask"]
    halves = [slice(0, 2), slice(2, 4), slice(4, 4)]  # rank 2 has no response at all
    world = FakeWorld(3)
    methods = [re.make_method("adaptive_entropy") for _ in halves]
    for r, m in enumerate(methods):
        m.gather_fn = world.gather_fn(r)

    def rank(r):
        s = halves[r]
        b = re.TokenBatch(log_prob=leaves["log_prob"][s].detach(), old_log_prob=leaves["old_log_prob"][s],
                          advantages=leaves["advantages"][s], mask=msk[s], entropy=h[s])
        methods[r].compute_loss(b, step=0)
        return methods[r].end_step()

    sums = world.run([lambda r=r: rank(r) for r in range(3)])
    whole = float(h[msk].double().mean())
    for r, m in enumerate(methods):
        assert m.ctrl.last_entropy == pytest.approx(whole, rel=1e-12)
        assert m.state_dict() == methods[0].state_dict() and sums[r] == sums[0]
    assert world.calls == [1, 1, 1]  # one collective per step, also on the rank without data


def test_controller_and_config_errors():
    with pytest.raises(ValueError, match="coef_min"):
        re.make_method("adaptive_entropy", coef_min=0.1, coef_max=0.01)
    with pytest.raises(ValueError, match="delta"):
        re.make_method("adaptive_entropy", delta=-1.0)
    with pytest.raises(ValueError, match="coef_init"):
        re.make_method("adaptive_entropy", coef_init=0.01)       # above coef_max = 0.005
    with pytest.raises(ValueError, match="target"):
        re.make_method("adaptive_entropy", target=-0.1)
    c = AdaptiveCoefficient(0.2, 1e-3, 0.0, 1e-2)
    with pytest.raises(ValueError, match="finite"):
        c.update(float("nan"))
    with pytest.raises(ValueError, match="coef_min"):
        AdaptiveCoefficient(0.2, 1e-3, 0.1, 0.0)
    assert not c.active() and c.steps == 0
