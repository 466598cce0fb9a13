"""AEPO: the selection rule, k and the T / k switch on H_prev by hand (aepo.md section 4 asks for exactly these
checks with small fakes), the replacement of the first k rows against a reference written from the trainer loop
(ray_trainer.py:786-808), H_prev's life cycle under the step protocol (token mean over the step, the official mean of
micro-batch means as an option, lag of one step, checkpoint), the neutral setting, validation."""
from __future__ import annotations

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.methods.aepo import (aepo_advantages, aepo_num_samples, aepo_select, aepo_temperature,
                                      aepo_update_rows)
from tests.helpers import loss_and_grads, make_leaves

F64 = torch.float64


# ------------------------------------------------------------------------- reference written from the spec
def ref_trainer_step(h_prev, main_adv, extra_adv, *, base=0.5, t_high=1.2, t_low=0.8, num=60, thr=0.05):
    """ray_trainer.py:786-808 on Python lists: (temperature, update rows as ("extra", i) / ("main", i), advantages)."""
    temperature = t_high if h_prev <= base else t_low
    kept = [i for i, a in enumerate(extra_adv) if a > thr]
    k = min(num, len(kept)) if h_prev <= base else min(num, len(kept)) // 2
    rows = [("extra", i) for i in kept[:k]] + [("main", i) for i in range(len(main_adv))][k:]
    advs = [1.0] * k + list(main_adv[k:])
    return temperature, rows, advs


# ----------------------------------------------------------------------------------------------- by hand
def test_temperature_and_sample_count_switch_together():
    assert aepo_temperature(0.0) == 1.2                 # the official start: H_prev = 0 -> T_high
    assert aepo_temperature(0.5) == 1.2                 # ties -> T_high (<=)
    assert aepo_temperature(0.5000001) == 0.8
    assert aepo_num_samples(0.3, kept=100) == 60        # min(60, kept)
    assert aepo_num_samples(0.3, kept=7) == 7
    assert aepo_num_samples(0.7, kept=100) == 30        # halved above the target
    assert aepo_num_samples(0.7, kept=7) == 3           # integer division
    assert aepo_num_samples(0.5, kept=7) == 7


def test_selection_is_strict_positive_and_ordered():
    a = torch.tensor([0.05, 0.051, -1.0, 2.0, 0.0, 0.3])
    assert aepo_select(a).tolist() == [1, 3, 5]
    a2 = torch.stack([a, torch.full_like(a, 9.0)], 1)   # [M, T]: read at token 0
    assert aepo_select(a2).tolist() == [1, 3, 5]
    assert aepo_select(a, threshold=-2.0).tolist() == [0, 1, 2, 3, 4, 5]
    assert aepo_select(torch.zeros(4)).numel() == 0


def test_the_first_k_main_rows_are_replaced_by_hand():
    main = torch.arange(10, dtype=F64) / 10
    extra = torch.tensor([0.0, 0.9, -0.5, 0.04, 0.7, 0.0, 0.6])      # kept: rows 1, 4, 6
    upd = aepo_update_rows(main, extra, entropy=0.2, reinforce_sample_num=2)
    assert upd.k == 2 and upd.extra_rows.tolist() == [1, 4] and upd.main_rows.tolist() == list(range(2, 10))
    torch.testing.assert_close(upd.advantages, torch.cat([torch.ones(2, dtype=F64), main[2:]]))
    assert upd.advantages.numel() == 10                                 # the batch size is unchanged
    above = aepo_update_rows(main, extra, entropy=0.9)                  # min(60, 3) // 2 = 1
    assert above.k == 1 and above.extra_rows.tolist() == [1] and above.main_rows.tolist() == list(range(1, 10))
    none = aepo_update_rows(main, torch.zeros(7), entropy=0.2)          # nothing qualifies: plain GRPO (no crash)
    assert none.k == 0 and none.main_rows.tolist() == list(range(10))
    torch.testing.assert_close(none.advantages, main)


def test_temperature_rollout_advantages_are_the_official_grpo_ones():
    """(R - mean) / (std + 1e-6) per group of n, torch.std (unbiased), as EasyR1's core_algos.py:138-175; an unscorable
    (NaN) reward is left out of its group and gets 0, a group with < 2 scored responses gets 0."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.25, 1.0])
    got = aepo_advantages(r, 4)
    g = r.view(-1, 4)
    want = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).reshape(-1)
    torch.testing.assert_close(got, want)
    assert got[4:8].abs().max() == 0  # an all-correct group: 0 / (0 + 1e-6)
    assert aepo_select(got).tolist() == [0, 3, 9, 11]  # correct answers of groups that are not all correct
    nan = float("nan")
    rn = torch.tensor([1.0, nan, 0.0, 0.0, nan, nan, nan, 1.0])
    got = aepo_advantages(rn, 4)
    s = torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(got[[0, 2, 3]], (s - s.mean()) / (s.std() + 1e-6))
    assert got[1] == 0 and got[4:].abs().max() == 0
    with pytest.raises(ValueError, match="multiple of group=4"):
        aepo_advantages(torch.zeros(6), 4)


@pytest.mark.parametrize("seed", range(5))
def test_update_rows_match_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    main = torch.randn(40, generator=g, dtype=F64)
    extra = torch.randn(int(torch.randint(0, 30, (1,), generator=g)), generator=g, dtype=F64)
    for h in (0.0, 0.5, 0.51, 2.0):
        for num in (0, 3, 60):
            t_ref, rows, advs = ref_trainer_step(h, main.tolist(), extra.tolist(), num=num)
            upd = aepo_update_rows(main, extra, entropy=h, reinforce_sample_num=num)
            got = [("extra", i) for i in upd.extra_rows.tolist()] + [("main", i) for i in upd.main_rows.tolist()]
            assert got == rows and upd.advantages.tolist() == pytest.approx(advs)
            assert aepo_temperature(h) == t_ref


# ------------------------------------------------------------------------------------------- the method
def _batch(nll, T=2, B=2, adv=1.0):
    """B rows of T valid tokens with log_prob = -nll (the NLL estimate), on-policy."""
    lp = torch.full((B, T), -float(nll), dtype=F64, requires_grad=True)
    return re.TokenBatch(log_prob=lp, old_log_prob=lp.detach(), advantages=torch.full((B,), adv, dtype=F64),
                         mask=torch.ones(B, T, dtype=torch.bool), entropy=torch.full((B, T), 2.0, dtype=F64))


def test_h_prev_life_cycle_one_step_of_lag():
    m = re.make_method("aepo")
    assert m.num_resampled(512) == 128 and m.num_resampled(7) == 1  # what the plan will say, state untouched
    assert m.h_prev.closes == 0 and re.make_method("aepo", reinforce_sample_num=0).num_resampled(512) == 0
    plan = m.rollout_plan(512)                      # step 1: H_prev = 0 -> T_high, the first 128 prompts again
    assert (plan.temperature, plan.num_prompts, plan.entropy) == (1.2, 128, 0.0)
    main = torch.zeros(20, dtype=F64)
    extra = torch.tensor([1.0] * 5 + [0.0] * 5, dtype=F64)
    assert m.assemble(main, extra).k == 5
    # the step's update: two micro-batches (NLL 0.9 on 4 tokens, 0.3 on 12 tokens), two optimizer steps
    out = m.compute_loss(_batch(0.9), step=1)
    assert out.metrics["aepo/h_prev"] == 0.0 and out.metrics["aepo/temperature"] == 1.2
    m.end_step()
    m.compute_loss(_batch(0.3, T=6), step=2)
    m.end_step()
    assert m.h_prev.value == 0.0                    # used one step later: not before the next plan
    plan = m.rollout_plan(512)
    assert plan.entropy == pytest.approx((0.9 * 4 + 0.3 * 12) / 16) == 0.45
    assert plan.temperature == 1.2                  # 0.45 <= 0.5
    m.compute_loss(_batch(0.8), step=3)
    m.end_step()
    plan = m.rollout_plan(512)
    assert plan.entropy == pytest.approx(0.8) and plan.temperature == 0.8
    assert m.assemble(main, extra).k == 2           # 5 // 2 above the target
    assert m.rollout_plan(512).entropy == pytest.approx(0.8)   # nothing new measured: unchanged


def test_micro_batch_average_is_the_official_mean_of_means():
    m = re.make_method("aepo", entropy_average="micro_batch")
    m.compute_loss(_batch(0.9), step=1)
    m.compute_loss(_batch(0.3, T=6), step=1)
    m.end_step()
    assert m.rollout_plan(8).entropy == pytest.approx((0.9 + 0.3) / 2, rel=1e-7)
    e = re.make_method("aepo", entropy_estimate="entropy")       # full-vocabulary entropy (option)
    e.compute_loss(_batch(0.9), step=1)
    e.end_step()
    assert e.rollout_plan(8).entropy == pytest.approx(2.0)


def test_loss_is_grpo_and_neutral_setting():
    leaves, _ = make_leaves(seed=5)
    out, g = loss_and_grads(re.make_method("aepo"), leaves)
    ref, gr = loss_and_grads(re.make_method("grpo", dual_clip=3.0), leaves)
    assert torch.equal(out.loss, ref.loss) and torch.equal(g["log_prob"], gr["log_prob"])
    m = re.make_method("aepo", **re.get_method_class("aepo").neutral_overrides())
    assert m.rollout_plan(512).num_prompts == 0
    assert m.assemble(torch.zeros(4), torch.ones(3)).k == 0


def test_state_round_trip_keeps_the_pending_measurement():
    m = re.make_method("aepo")
    m.rollout_plan(8)
    m.compute_loss(_batch(0.7), step=1)
    m.end_step()
    s = m.state_dict()
    assert s == {"entropy": {"value": 0.0, "pending_sum": pytest.approx(2.8), "pending_count": 4.0, "closes": 1}}
    m2 = re.make_method("aepo")
    m2.load_state_dict(s)
    assert m2.rollout_plan(8) == m.rollout_plan(8)
    assert m2.rollout_plan(8).temperature == 0.8


def test_validation_names_the_argument():
    for kw, name in [({"t_high": 0.0}, "t_high"), ({"reinforce_sample_num": -1}, "reinforce_sample_num"),
                     ({"resample_divisor": 0}, "resample_divisor"), ({"entropy_estimate": "x"}, "entropy_estimate"),
                     ({"entropy_average": "x"}, "entropy_average"), ({"target": float("nan")}, "target"),
                     ({"initial_entropy": float("inf")}, "initial_entropy")]:
        with pytest.raises(ValueError, match=name):
            re.make_method("aepo", **kw)
    with pytest.raises(ValueError, match="entropy"):
        aepo_temperature(float("nan"))
    with pytest.raises(ValueError, match="advantages"):
        aepo_select(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="main_advantages"):
        aepo_update_rows(torch.zeros(2, 2, 2), torch.zeros(3), entropy=0.1)
    with pytest.raises(ValueError, match="num_prompts"):
        re.make_method("aepo").rollout_plan(-1)


def test_testbed_runs_the_surgery(tmp_path, monkeypatch):
    """The lean loop asks for the plan, generates the extra samples at its temperature and trains on the assembled
    batch (a parity reward so that some temperature samples qualify)."""
    import json

    from rlvr_entropy.testbed.tasks import Task
    from rlvr_entropy.testbed.train import TrainConfig, train

    monkeypatch.setattr(Task, "verify", lambda self, p, r: len(r) % 2 == 0)
    monkeypatch.setenv("RLVR_ENTROPY_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(steps=3, width=32, layers=1, heads=2, mlp=64, warm_start_steps=0, prompts_per_step=8,
                      samples_per_prompt=4, eval_problems=4, eval_samples=2, eval_k=2, eval_every=3,
                      checkpoint_every=0)
    train("aepo", cfg, tmp_path / "run", method_overrides={"reinforce_sample_num": 3}, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    assert rows[0]["aepo/temperature"] == 1.2 and rows[0]["aepo/h_prev"] == 0.0
    assert any(r["aepo/reinforce_samples"] > 0 for r in rows)
    assert all(r["aepo/h_prev"] > 0 for r in rows[1:])          # measured on the previous step's update batch
