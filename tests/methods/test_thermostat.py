"""Thermostat: hand cases for the pull toward the reference (k3 and its gradient), the PI controller and the
reach-gated floor; parity of the pull with TRL's and verl's k3 and with the forward KL's gradient; a closed-loop
property on a tabular bandit."""
from __future__ import annotations

import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import stats
from rlvr_entropy.controllers.pi import EntropyPI
from rlvr_entropy.methods.thermostat import pull_term
from tests.helpers import batch_from, make_leaves


def _random_batch(seed, B=4, T=6, V=7):
    """float64 logits [B, T, V], sampled-token log-probs lp0 [B, T], advantages [B] (+, -, +, -), full mask, and
    reference log-probs [B, T] of the same tokens under other logits."""
    torch.manual_seed(seed)
    logits = torch.randn(B, T, V, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    tok = torch.randint(V, (B, T))
    lp0 = torch.log_softmax(logits, -1).gather(-1, tok[..., None]).squeeze(-1)
    ref = torch.log_softmax(logits + torch.randn(B, T, V, dtype=torch.float64), -1).gather(-1, tok[..., None])
    return logits, lp0, adv, torch.ones(B, T, dtype=torch.bool), ref.squeeze(-1)


def test_pi_controller_by_hand():
    pi = EntropyPI(kp=2.0, ki=0.5, u_max=1.0, i_max=10.0)
    assert pi.target is None
    assert pi.update(1.0) == 0.0  # first measurement sets the target; error 0
    assert pi.target == 1.0
    # H = 0.8: e = 0.2, I = 0.2, u = 0.4 + 0.1 = 0.5
    assert pi.update(0.8) == pytest.approx(0.5)
    # H = 0.9: e = 0.1, I = 0.3, u = 0.2 + 0.15 = 0.35
    assert pi.update(0.9) == pytest.approx(0.35)
    # far above target: clipped at -1
    assert pi.update(5.0) == -1.0
    q = EntropyPI(kp=2.0, ki=0.5)
    q.load_state_dict(pi.state_dict())
    assert q.state_dict() == pi.state_dict() and q.target == 1.0
    r = EntropyPI(1.0, 0.0, target_scale=0.8, target_end_scale=0.4, schedule_steps=2)
    r.update(2.0)  # start measured: 2.0 -> target 1.6 now, 0.8 after 2 steps
    assert r.target == pytest.approx(0.8 * 2.0 * 0.5 + 0.4 * 2.0 * 0.5)
    r.update(2.0)
    assert r.target == pytest.approx(0.8)
    assert EntropyPI(1.0, 0.0, target=1.0, target_scale=0.5).target == 0.5
    s = EntropyPI(1.0, 0.0, target=2.0, target_end=1.0, schedule_steps=4)
    assert s.target == 2.0
    s.update(2.0)
    s.update(2.0)
    assert s.target == pytest.approx(1.5)


def test_pi_controller_floor_by_hand():
    pi = EntropyPI(kp=2.0, ki=0.5, target=1.0, floor=True)
    # above the floor: e = -0.5, u and I clipped at 0 (the two-sided controller would give -1 and I = -0.5)
    assert pi.update(1.5) == 0.0 and pi.integral == 0.0
    # below: e = 0.2, I = 0.2, u = 0.4 + 0.1 = 0.5 (no negative integral left over to delay the response)
    assert pi.update(0.8) == pytest.approx(0.5)
    two = EntropyPI(kp=2.0, ki=0.5, target=1.0)
    two.update(1.5)
    assert two.update(0.8) == pytest.approx(0.4 + 0.5 * (-0.5 + 0.2))


def test_config_validation():
    with pytest.raises(ValueError, match="pull_coef"):
        re.make_method("thermostat", pull_coef=-1.0)
    with pytest.raises(ValueError, match="reach_tol"):
        re.make_method("thermostat", reach_tol=1.5)
    with pytest.raises(ValueError, match="reach_min_scale"):
        re.make_method("thermostat", reach_min_scale=-0.1)
    with pytest.raises(ValueError, match="target_end"):
        re.make_method("thermostat", target_end=0.0)
    with pytest.raises(ValueError, match="schedule_steps"):
        re.make_method("thermostat", schedule_steps=0)
    for gone in ("restrict", "allocation", "floor", "damp_first", "protect", "weight_max", "solved_at", "sharpen",
                 "anneal_start", "renormalize", "target_scale", "actuator", "weight_min"):  # lost on the design seeds
        with pytest.raises(ValueError, match=gone):
            re.make_method("thermostat", **{gone: 1})


def test_fixed_schedule_ramps_from_first_measurement_to_0_7_over_40_steps():
    """reach_tol=None (engines without group statistics): the floor ramps to 0.7 x H0 over 40 steps."""
    leaves, _ = make_leaves(seed=13, B=3, T=6, V=9)
    m = re.make_method("thermostat", reach_tol=None)
    targets = [m.compute_loss(batch_from(leaves), step=k).metrics["thermostat/target"] for k in range(46)]
    h0 = m.pi.target_start
    assert math.isnan(targets[0])  # nothing measured before the first step
    # step k + 1 applies the update at the end of step k: it has moved k + 1 of the 40 ramp steps
    targets = targets[1:]
    assert targets[0] == pytest.approx(h0 * (1 - 0.3 / 40))
    assert targets[19] == pytest.approx(h0 * (1 - 0.3 * 20 / 40))
    assert targets[39:] == pytest.approx([0.7 * h0] * 6)
    c = m.config
    assert c.schedule_steps == 40 and m.pi.floor is True
    assert re.make_method("thermostat").config.reach_tol == 0.03  # the default is the reach-gated floor
    # target_end (absolute) takes precedence over the relative end; schedule_steps=None keeps the start value
    m = re.make_method("thermostat", target=2.0, target_end=1.0, reach_tol=None)
    for k in range(40):
        m.compute_loss(batch_from(leaves), step=k)
        m.end_step()
    assert m.pi.target == pytest.approx(1.0)
    m = re.make_method("thermostat", target=2.0, schedule_steps=None, reach_tol=None)
    for k in range(5):
        m.compute_loss(batch_from(leaves), step=k)
    assert m.pi.target == pytest.approx(2.0)


def _bandit_run(method_name, steps=150, seed=0, out=None, **cfg):
    """Tabular softmax over S contexts x V answers, 3 correct answers per context, GRPO groups of G samples; the
    reference of the pull is the starting policy. ``out`` (a dict) receives the final and starting probabilities
    and the correct-answer mask [S, V]."""
    g = torch.Generator().manual_seed(seed)
    S, V, G = 16, 8, 16
    z = (torch.randn(S, V, generator=g) * 1.5).requires_grad_(True)
    correct = torch.zeros(S, V, dtype=torch.bool)
    for s in range(S):
        correct[s, torch.randperm(V, generator=g)[:3]] = True
    ref_logp = torch.log_softmax(z.detach().clone(), -1)  # the reference: the starting policy
    opt = torch.optim.Adam([z], lr=0.1)
    method = re.make_method(method_name, **cfg)
    ents, acc = [], 0.0
    for step in range(steps):
        with torch.no_grad():
            probs = torch.softmax(z, -1)
            acc = float((probs * correct).sum(-1).mean())
            a = torch.multinomial(probs.repeat_interleave(G, 0), 1, generator=g).squeeze(-1)  # [S*G]
            r = correct.repeat_interleave(G, 0).gather(1, a[:, None]).squeeze(-1).float()
            adv = (r.view(S, G) - r.view(S, G).mean(1, keepdim=True)).view(-1)
            old = torch.log_softmax(z, -1).repeat_interleave(G, 0).gather(1, a[:, None])  # [S*G, 1]
            ents.append(float(stats.entropy(z).mean()))
        logits = z.repeat_interleave(G, 0)[:, None, :]  # [S*G, 1, V]
        lp = torch.log_softmax(logits, -1).gather(-1, a[:, None, None]).squeeze(-1)
        batch = re.TokenBatch(log_prob=lp, old_log_prob=old, advantages=adv,
                              mask=torch.ones(S * G, 1, dtype=torch.bool), logits=logits,
                              ref_log_prob=ref_logp.repeat_interleave(G, 0).gather(1, a[:, None]))
        loss = method.compute_loss(batch, step=step).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    if out is not None:
        out.update(probs=torch.softmax(z.detach(), -1), start=ref_logp.exp(), correct=correct)
    return ents, acc


def test_closed_loop_holds_entropy_where_grpo_collapses():
    """Three valid answers per context: the best policy spreads over them (entropy up to ln 3 = 1.10). Plain GRPO
    concentrates on fewer answers; the thermostat with target 1.0 settles there and still learns."""
    g, t = {}, {}
    grpo, grpo_acc = _bandit_run("grpo", out=g)
    thermo, thermo_acc = _bandit_run("thermostat", target=1.0, schedule_steps=None, kp=4.0, ki=0.5, reach_tol=None,
                                     out=t)
    assert grpo[-1] < 0.6 and grpo_acc > 0.95
    tail = thermo[-30:]
    assert max(abs(h - 1.0) for h in tail) < 0.15, tail
    assert thermo_acc > 0.9
    # reach: of the correct answers the start gave >= 5%, GRPO leaves some below 5% (the mass went to the others);
    # the pull toward the start keeps every one of them at >= 5%
    kept = g["correct"] & (g["start"] >= 0.05)
    lost_grpo, lost_thermo = int((kept & (g["probs"] < 0.05)).sum()), int((kept & (t["probs"] < 0.05)).sum())
    assert lost_grpo >= 3 and lost_thermo == 0, (lost_grpo, lost_thermo)


def test_reach_gated_floor_follows_the_batch_reach():
    """reach_tol: the floor's level is ReachFloor's m x H0, from the share of rows whose group solved a sample
    (group_reward > 0), measured over the step; a training call needs group_reward, an evaluation call does not."""
    from rlvr_entropy.controllers.reach import ReachFloor

    logits, lp0, adv, mask, ref_lp = _random_batch(6)
    cfg = dict(reach_tol=0.05, reach_gain=0.5, reach_min_scale=0.5)
    m = re.make_method("thermostat", **cfg)
    ref = ReachFloor(0.05, 0.5, min_scale=0.5)
    bare = re.TokenBatch(log_prob=lp0, old_log_prob=lp0, advantages=adv, mask=mask, logits=logits,
                         ref_log_prob=ref_lp)
    with pytest.raises(ValueError, match="group_reward"):
        m.compute_loss(bare)
    m = re.make_method("thermostat", **cfg)
    m.compute_loss(bare, observe=False)  # the reach feeds only the controller: evaluation needs none
    signed = re.TokenBatch(log_prob=lp0, old_log_prob=lp0, advantages=adv, mask=mask, logits=logits,
                           ref_log_prob=ref_lp,
                           group_reward=torch.tensor([1.0, -1.0, 0.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="group_reward.*-1.0"):  # +-1 rewards would count every group as solved
        re.make_method("thermostat", **cfg).compute_loss(signed)
    assert m.state_dict() == re.make_method("thermostat", **cfg).state_dict()
    h0 = None
    for step, solved in enumerate([[1, 1, 1, 1], [1, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]]):
        gr = torch.tensor(solved, dtype=torch.float64) * 0.25
        for half in (slice(0, 2), slice(2, 4)):  # two micro-batches per step
            b = re.TokenBatch(log_prob=lp0[half], old_log_prob=lp0[half], advantages=adv[half], mask=mask[half],
                              logits=logits[half], ref_log_prob=ref_lp[half], group_reward=gr[half])
            m.compute_loss(b, step=step)
        m.end_step()
        scale = ref.update(sum(solved) / 4)
        h0 = h0 or m.pi.target_start
        assert m.reach.m == pytest.approx(scale) and m.pi.target == pytest.approx(scale * h0)
    n = re.make_method("thermostat", **cfg)
    n.load_state_dict(m.state_dict())
    assert n.pi.target == pytest.approx(m.pi.target) and n.state_dict() == m.state_dict()


# ------------------------------------------------------------------------------------------- the pull
def test_pull_term_by_hand():
    ln2 = math.log(2.0)
    # delta = ref - log_prob = [0, ln 2, -ln 2, pad]: k3 = [0, 2 - ln 2 - 1, 0.5 + ln 2 - 1, 0]
    lp = torch.tensor([[-1.0, -1.0 - ln2, -1.0 + ln2, 5.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.full((1, 4), -1.0, dtype=torch.float64)
    ref[0, 3] = float("nan")  # padding may hold anything
    mask = torch.tensor([[True, True, True, False]])
    k3 = pull_term(lp, torch.where(mask, ref, 0.0), mask)
    torch.testing.assert_close(k3, torch.tensor([[0.0, 1.0 - ln2, ln2 - 0.5, 0.0]], dtype=torch.float64))
    k3.sum().backward()
    # d k3 / d log_prob = 1 - exp(delta): [0, -1, 0.5], none at padding
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -1.0, 0.5, 0.0]], dtype=torch.float64))
    # the clamp keeps exp finite: delta = 1000 is read as 20
    big = pull_term(torch.tensor([[-1000.0]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
                    torch.ones(1, 1, dtype=torch.bool))
    assert float(big) == pytest.approx(math.exp(20.0) - 21.0)


def test_pull_gradient_is_the_forward_kl_gradient_in_expectation():
    """Over a token drawn from pi, E[d k3 / d z] = pi - pi_ref = d KL(pi_ref || pi) / d z (z: the logits), by exact
    enumeration; the reverse KL's gradient is different (the pull keeps the reference's modes)."""
    torch.manual_seed(3)
    V = 6
    z = torch.randn(V, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(V, dtype=torch.float64), -1)
    logp = torch.log_softmax(z, -1)
    pi = logp.exp().detach()
    exp_grad = torch.zeros(V, dtype=torch.float64)
    for a in range(V):
        k3 = pull_term(logp[a].view(1, 1), ref[a].view(1, 1), torch.ones(1, 1, dtype=torch.bool))
        (g,) = torch.autograd.grad(k3.sum(), z, retain_graph=True)
        exp_grad += pi[a] * g
    torch.testing.assert_close(exp_grad, pi - ref.exp(), rtol=1e-10, atol=1e-12)
    fkl = (ref.exp() * (ref - logp)).sum()
    torch.testing.assert_close(torch.autograd.grad(fkl, z, retain_graph=True)[0], exp_grad, rtol=1e-10, atol=1e-12)
    rkl = (pi * 0 + logp.exp() * (logp - ref)).sum()
    assert not torch.allclose(torch.autograd.grad(rkl, z)[0], exp_grad, atol=1e-3)


def test_pull_term_equals_trl_and_verl_k3():
    """TRL's GRPOTrainer KL term and verl's kl_penalty "low_var_kl" are the same k3 (verl also clamps the value at
    +-10, inactive here)."""
    leaves, _ = make_leaves(seed=21)
    lp, ref, mask = leaves["log_prob"].detach(), leaves["ref_log_prob"], leaves["mask"]
    ours = pull_term(lp, ref, mask)
    trl_kl = torch.exp(ref - lp) - (ref - lp) - 1  # trl/trainer/grpo_trainer.py, _compute_loss (beta != 0)
    torch.testing.assert_close(ours, torch.where(mask, trl_kl, 0.0), rtol=1e-12, atol=1e-12)
    verl = pytest.importorskip("verl.trainer.ppo.core_algos")
    torch.testing.assert_close(ours, torch.where(mask, verl.kl_penalty(lp, ref, "low_var_kl"), 0.0), rtol=1e-12,
                               atol=1e-12)


def _pull_method(**cfg):
    return re.make_method("thermostat", reach_tol=None, **cfg)


def test_pull_loss_is_grpo_plus_u_times_coef_times_k3():
    """Below the floor: loss = agg(PPO loss) + u x pull_coef x agg(k3); at u = 0 (first step, or entropy above the
    floor) it is grpo's loss exactly, and neutral gains (kp = ki = 0) keep it there; without ref_log_prob it raises."""
    leaves, _ = make_leaves(seed=22)
    b = batch_from(leaves)
    pg = dict(eps_high=0.28)
    grpo = re.make_method("grpo", **pg).compute_loss(b).loss
    m = _pull_method(target=10.0, kp=0.5, ki=0.1, pull_coef=0.4)  # a floor far above: u > 0 from step 2
    first = m.compute_loss(b, step=0)
    assert float(first.loss.detach()) == pytest.approx(float(grpo.detach()), rel=1e-12)
    assert first.metrics["thermostat/pull_coef"] == 0.0
    m.end_step()
    u = m.pi.u
    assert 0 < u < 1
    out = m.compute_loss(b, step=1)
    k3 = re.core.aggregation.masked_mean(pull_term(b.clean(b.log_prob), b.clean(b.ref_log_prob), b.mask), b.mask)
    assert float(out.loss.detach()) == pytest.approx(float(grpo.detach()) + u * 0.4 * float(k3), rel=1e-10)
    assert out.metrics["thermostat/pull_coef"] == pytest.approx(u * 0.4)
    assert float(out.metrics["thermostat/kl"]) == pytest.approx(float(k3), rel=1e-10)
    n = _pull_method(target=10.0, kp=0.0, ki=0.0)
    for k in range(3):
        assert float(n.compute_loss(b, step=k).loss) == pytest.approx(float(grpo), rel=1e-12)
    with pytest.raises(ValueError, match="ref_log_prob"):
        _pull_method().compute_loss(batch_from(leaves, ref_log_prob=None))
    assert re.make_method("thermostat").needs == ("ref_log_prob",)  # and no logits: the entropy is enough


def test_pull_reads_no_logits_and_masked_tokens_get_no_gradient():
    leaves, _ = make_leaves(seed=23)
    m = _pull_method(target=10.0, kp=1.0)
    m.compute_loss(batch_from(leaves, logits=None), step=0)
    m.end_step()
    leaves["log_prob"].grad = None
    out = m.compute_loss(batch_from(leaves, logits=None), step=1)
    out.loss.backward()
    g = leaves["log_prob"].grad
    assert bool((g[~leaves["mask"]] == 0).all()) and bool((g[leaves["mask"]] != 0).any())
