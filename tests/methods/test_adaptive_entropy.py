"""adaptive_entropy: the controller's trajectory by hand (once per step, save/restore mid-run), parity of a
multi-step run with a reference written from the spec, neutral setting, global measurement through gather_fn."""
from __future__ import annotations

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.controllers import AdaptiveCoefficient
from rlvr_entropy.methods.adaptive_entropy import measure_entropy
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
    # (step, H, coefficient after the update, active, loss = -c * H when active, A = 0 so the PG term is 0)
    script = [
        (0, 0.1, 0.001, True, -0.001 * 0.1),     # H < 0.2: c = 0 + 0.001, bonus on
        (1, 0.1, 0.002, True, -0.002 * 0.1),
        (2, 0.1, 0.0025, True, -0.0025 * 0.1),   # capped at coef_max = 0.0025
        (3, 0.15, 0.0025, True, -0.0025 * 0.15),
        (4, 0.5, 0.0015, False, 0.0),            # H >= 0.2: c - 0.001, bonus off
        (5, 0.2, 0.0005, False, 0.0),            # H == target counts as "not below" (strict <)
        (6, 0.3, 0.0, False, 0.0),               # floored at coef_min = 0
        (7, 0.3, 0.0, False, 0.0),
        (8, 0.05, 0.001, True, -0.001 * 0.05),
    ]
    for step, h, coef, active, loss in script:
        out = m.compute_loss(_batch(h), step=step)
        assert out.metrics[M + "coefficient"] == pytest.approx(coef, abs=1e-15), step
        assert out.metrics[M + "active"] == float(active), step
        assert out.metrics[M + "applied_coefficient"] == (pytest.approx(coef, abs=1e-15) if active else 0.0)
        assert out.metrics[M + "target"] == 0.2 and out.metrics[M + "measured_entropy"] == pytest.approx(h)
        assert out.loss.item() == pytest.approx(loss, abs=1e-12), step
    assert m.ctrl.steps == len(script)


def test_several_calls_with_the_same_step_update_once():
    m = _m()
    out = m.compute_loss(_batch(0.1), step=0)                 # c = 0.001, measured 0.1
    # more micro-batches of step 0, one of them far above target: no further update, gate unchanged
    for h in (0.1, 0.9, 0.1):
        out = m.compute_loss(_batch(h), step=0)
        assert out.metrics["adaptive_entropy/coefficient"] == pytest.approx(0.001)
        assert out.metrics["adaptive_entropy/active"] == 1.0
        assert out.loss.item() == pytest.approx(-0.001 * h, abs=1e-12)  # the bonus acts on this micro-batch's H
    assert m.ctrl.steps == 1
    out = m.compute_loss(_batch(0.1), step=1)
    assert out.metrics["adaptive_entropy/coefficient"] == pytest.approx(0.002) and m.ctrl.steps == 2


def test_step_none_updates_every_call():
    m = re.make_method("adaptive_entropy", delta=1e-3)
    for _ in range(3):
        out = m.compute_loss(_batch(0.1))
    assert out.metrics["adaptive_entropy/coefficient"] == pytest.approx(0.003)


def test_save_and_restore_mid_run():
    m = _m()
    for step, h in enumerate([0.1, 0.1, 0.5]):                # c: 0.001, 0.002, 0.001; last gate off
        m.compute_loss(_batch(h), step=step)
    state = m.state_dict()
    assert state == {"coef": {"coef": pytest.approx(0.001), "last_entropy": pytest.approx(0.5), "steps": 3}}
    m2 = _m()
    m2.load_state_dict(state)
    assert m2.state_dict() == state
    # the restored method continues the trajectory exactly: c 0.001 -> 0.002 (step 3, H = 0.1; the second
    # micro-batch of step 3 does not update) -> 0.001 (step 4, H = 0.4, gate off) -> 0.002 (step 5)
    for step, h in [(3, 0.1), (3, 0.7), (4, 0.4), (5, 0.1)]:
        a, b = m.compute_loss(_batch(h), step=step), m2.compute_loss(_batch(h), step=step)
        assert a.loss.item() == b.loss.item()
        assert a.metrics == b.metrics
    assert m.ctrl.coef == pytest.approx(0.002) and m2.ctrl.steps == 6
    assert b.loss.item() == pytest.approx(-0.002 * 0.1, abs=1e-12)
    with pytest.raises(ValueError, match="unknown controller"):
        m2.load_state_dict({"anchor": {}})


def test_empty_first_batch_leaves_controller_unchanged():
    m = _m()
    empty = re.TokenBatch(log_prob=torch.zeros(1, 2), old_log_prob=torch.zeros(1, 2), advantages=torch.zeros(1),
                          mask=torch.zeros(1, 2, dtype=torch.bool), entropy=torch.full((1, 2), float("nan")))
    out = m.compute_loss(empty, step=0)
    assert out.loss.item() == 0.0 and m.ctrl.steps == 0 and m.ctrl.coef == 0.0
    assert "adaptive_entropy/measured_entropy" not in out.metrics


# ------------------------------------------------------------------------------------- parity with reference
def ref_run(batches, *, target, delta, cmin, cmax, c0=0.0, mode="token-mean"):
    """The spec, one token at a time: per new step H = mean of valid entropies, c <- clip(c +- delta), then
    L = agg(PPO l_t) - c 1[H < target] agg(H_t). Returns the losses."""
    c, h_meas, last_step, losses = c0, None, object(), []
    for step, lv in batches:
        lp, old, adv, m, ent = lv["log_prob"], lv["old_log_prob"], lv["advantages"], lv["mask"], lv["entropy"]
        B, T = m.shape
        if step is None or step != last_step:
            vals = [float(ent[i, t].detach()) for i in range(B) for t in range(T) if m[i, t]]
            if vals:
                h_meas = sum(vals) / len(vals)
                c = min(max(c + delta if h_meas < target else c - delta, cmin), cmax)
        last_step = step
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
    # entropies scaled around the target so the gate switches on and off; two micro-batches per step
    schedule = [(0, 0.5), (0, 2.0), (1, 0.5), (2, 0.6), (2, 0.1), (3, 3.0), (4, 0.8), (5, 0.4)]
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
        assert a.metrics["adaptive_entropy/active"] == 1.0 and a.metrics["adaptive_entropy/coefficient"] == 0.0
        d, _ = loss_and_grads(default, leaves, step=step)
        assert d.loss.item() < base.loss.item()  # the bonus is on: c = 1e-4 (step + 1)


def test_entropy_from_logits_when_missing():
    leaves, _ = make_leaves(seed=8)
    low = (leaves["logits"].detach() * 8).requires_grad_(True)  # peaked: token-mean entropy below 0.2
    lv = dict(leaves, logits=low, entropy=None)
    out, grads = loss_and_grads(re.make_method("adaptive_entropy", coef_init=0.004), lv, step=0)
    assert out.metrics["adaptive_entropy/active"] == 1.0
    assert grads["logits"].abs().sum() > 0  # the bonus differentiates the entropy computed from logits


def test_global_measurement_through_gather_fn():
    leaves, _ = make_leaves(seed=9, B=4)
    h = (leaves["entropy"].detach() * 0.1)
    msk = leaves["mask"]
    halves = [slice(0, 2), slice(2, 4)]
    # rank 0 and rank 1 each see half the batch; the all-gather concatenates [sum, count] of both
    local = [torch.stack([torch.where(msk[s], h[s], 0).sum().double(), msk[s].sum().double()]) for s in halves]
    whole = measure_entropy(h, msk)
    assert whole == pytest.approx(float(h[msk].mean()), rel=1e-12)
    for r, s in enumerate(halves):
        def gather(x, r=r):
            return torch.cat([local[k] if k != r else x for k in range(2)])
        assert measure_entropy(h[s], msk[s], gather) == pytest.approx(whole, rel=1e-12)
        m = re.make_method("adaptive_entropy")
        m.gather_fn = gather
        m.compute_loss(re.TokenBatch(log_prob=leaves["log_prob"][s], old_log_prob=leaves["old_log_prob"][s],
                                     advantages=leaves["advantages"][s], mask=msk[s], entropy=h[s]), step=0)
        assert m.ctrl.last_entropy == pytest.approx(whole, rel=1e-12)
    # a rank with no valid token still calls the gather (a collective) and uses the others' tokens
    calls = []

    def gather_empty(x):
        calls.append(x)
        return torch.cat([x, local[0], local[1]])
    assert measure_entropy(h[:0], msk[:0], gather_empty) == pytest.approx(whole, rel=1e-12) and len(calls) == 1


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
