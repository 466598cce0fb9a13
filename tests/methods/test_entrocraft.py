"""Entrocraft: the band rule by hand (each branch, ties at both bounds, first and last step, cosine, singleton group,
{0, 1} rewards, lower > upper), parity of entrocraft_advantages with a reference written from entrocraft.md, and the
method under the step protocol (begin_step decides the step with its own entropy on every rank, one step of lag
without it, the +-1 scores, grpo_source, state round trip, validation)."""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.methods.entrocraft import (band_branch, entrocraft_advantages, entropy_band,
                                             grpo_group_advantages)
from tests.helpers import loss_and_grads, make_leaves
from tests.methods._world import FakeWorld

F32, F64 = torch.float32, torch.float64


# ------------------------------------------------------------------------------ reference written from the spec
def ref_advantages(rewards, index, step, total, h, lower, upper, schedule="linear", eps=1e-6):
    """entrocraft.md sections 1 and 3: the band in Python floats, then RAFT++ / NSR / GRPO with a dict of groups
    (torch.mean / torch.std of each group's stacked scores, a group of one: mean 0, std 1)."""
    if schedule == "linear":
        lo = lower[0] + (lower[1] - lower[0]) * step / total
        hi = upper[0] + (upper[1] - upper[0]) * step / total
    else:
        p = 0.5 * (1 - math.cos(math.pi * step / total))
        lo, hi = lower[0] + (lower[1] - lower[0]) * p, upper[0] + (upper[1] - upper[0]) * p
    scores = rewards.clone()
    if h > hi:
        return torch.where(scores < 0, torch.zeros_like(scores), scores)
    if h < lo:
        return torch.where(scores > 0, torch.zeros_like(scores), scores)
    groups = defaultdict(list)
    for i in range(len(scores)):
        groups[index[i]].append(scores[i])
    stats = {}
    for k, v in groups.items():
        st = torch.stack(v)
        stats[k] = (torch.tensor(0.0), torch.tensor(1.0)) if len(v) == 1 else (torch.mean(st), torch.std(st))
    out = scores.clone()
    for i in range(len(scores)):
        m, s = stats[index[i]]
        out[i] = (scores[i] - m) / (s + eps)
    return out


R = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0], dtype=F32)
G = [0, 0, 0, 1, 1, 1]


def adv(h, step=50, total=100, **kw):
    return entrocraft_advantages(R, G, step=step, total_steps=total, entropy=h, lower=(0.6, 0.4),
                                 upper=(0.7, 0.5), **kw)


# ----------------------------------------------------------------------------------------------- by hand
def test_each_branch_by_hand():
    assert entropy_band(50, 100, (0.6, 0.4), (0.7, 0.5)) == pytest.approx((0.5, 0.6))
    assert adv(0.7).tolist() == [1, 0, 1, 1, 0, 0]              # H > u: RAFT++, only positive samples
    assert adv(0.4).tolist() == [0, -1, 0, 0, -1, -1]           # H < l: NSR, only negative samples
    a = adv(0.55)                                               # in the band: GRPO, std-normalized
    s0 = math.sqrt(((2 / 3) ** 2 * 2 + (4 / 3) ** 2) / 2)       # unbiased std of [1, -1, 1]
    assert a[0].item() == pytest.approx((1 - 1 / 3) / (s0 + 1e-6), rel=1e-6)
    assert a[3].item() == pytest.approx((1 + 1 / 3) / (s0 + 1e-6), rel=1e-6)
    assert a[:3].sum().item() == pytest.approx(0.0, abs=1e-6)


def test_ties_go_to_grpo_and_the_band_moves_linearly():
    lo, hi = entropy_band(37, 97, (0.6, 0.4), (0.7, 0.5))
    grpo = adv(0.55)
    for h in (lo, hi):
        out = entrocraft_advantages(R, G, step=37, total_steps=97, entropy=h, lower=(0.6, 0.4), upper=(0.7, 0.5))
        torch.testing.assert_close(out, grpo)
    assert entropy_band(1, 97, (0.6, 0.4), (0.7, 0.5)) == (0.6 + (0.4 - 0.6) * 1 / 97, 0.7 + (0.5 - 0.7) * 1 / 97)
    lo_s, hi_s = entropy_band(97, 97, (0.6, 0.4), (0.7, 0.5))
    assert lo_s == pytest.approx(0.4, abs=1e-15) and hi_s == pytest.approx(0.5, abs=1e-15)
    assert entropy_band(194, 97, (0.6, 0.4), (0.7, 0.5)) == pytest.approx((0.2, 0.3))   # not clamped (official)
    assert entropy_band(5, 10, (0.6, 0.4), (0.7, 0.5), "cosine") == pytest.approx((0.5, 0.6))
    assert entropy_band(2, 10, (0.6, 0.4), (0.7, 0.5), "cosine")[0] == pytest.approx(
        0.6 - 0.2 * 0.5 * (1 - math.cos(math.pi * 0.2)))
    assert entropy_band(9, 10, (0.6, 0.4), (0.7, 0.5), "constant") == (0.6, 0.7)
    assert band_branch(0.5, 0.6, 0.4) == "raft"      # l > u: "> u" is tested first
    assert band_branch(0.3, 0.6, 0.4) == "nsr"


def test_singleton_group_and_zero_one_rewards():
    r = torch.tensor([1.0, 0.0, 1.0], dtype=F32)
    out = entrocraft_advantages(r, [7, 7, 9], step=1, total_steps=10, entropy=0.6, lower=(0.5, 0.5),
                                upper=(0.7, 0.7))
    assert out[2].item() == pytest.approx(1.0 / (1.0 + 1e-6), rel=1e-7)    # group of one: mean 0, std 1
    assert out[0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6), rel=1e-6)
    # {0, 1} rewards: the NSR branch gives all zeros (the official fork scores +-1 for that reason)
    nsr = entrocraft_advantages(r, [7, 7, 9], step=1, total_steps=10, entropy=0.1, lower=(0.5, 0.5),
                                upper=(0.7, 0.7))
    assert nsr.tolist() == [0.0, 0.0, 0.0]
    # uid strings (verl) work as group ids
    s = entrocraft_advantages(r, ["a", "a", "b"], step=1, total_steps=10, entropy=0.6, lower=(0.5, 0.5),
                              upper=(0.7, 0.7))
    assert torch.equal(s, out)


# --------------------------------------------------------------------------------------- parity with the ref
@pytest.mark.parametrize("seed", range(6))
def test_advantages_match_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B = 24
    rewards = torch.where(torch.rand(B, generator=g) > 0.5, 1.0, -1.0) if seed % 2 == 0 else \
        (torch.rand(B, generator=g) > 0.5).float()
    index = torch.randint(0, 7, (B,), generator=g).tolist()
    total = 97
    for step in (1, 13, 50, 97):
        for schedule in ("linear", "cosine"):
            lo, hi = ref_band = entropy_band(step, total, (0.6, 0.4), (0.7, 0.5), schedule)
            for h in (lo - 0.01, lo, (lo + hi) / 2, hi, hi + 0.01):
                got = entrocraft_advantages(rewards, index, step=step, total_steps=total, entropy=h,
                                            lower=(0.6, 0.4), upper=(0.7, 0.5), schedule=schedule)
                ref = ref_advantages(rewards, index, step, total, h, (0.6, 0.4), (0.7, 0.5), schedule)
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
            assert ref_band == (lo, hi)
    torch.testing.assert_close(grpo_group_advantages(rewards, index),
                               ref_advantages(rewards, index, 1, 2, 0.5, (0.0, 0.0), (1.0, 1.0)))


# ------------------------------------------------------------------------------------------- the method
def _batch(h, rewards=(1.0, 0.0, 1.0, 0.0), adv=None, T=3):
    """On-policy rows of T valid tokens, old (rollout) entropy h everywhere, GRPO-like advantages."""
    r = torch.tensor(rewards, dtype=F64)
    B = len(rewards)
    a = r - r.mean() if adv is None else adv
    lp = torch.full((B, T), -0.5, dtype=F64, requires_grad=True)
    return re.TokenBatch(log_prob=lp, old_log_prob=lp.detach(), advantages=a, mask=torch.ones(B, T, dtype=torch.bool),
                         old_entropy=torch.full((B, T), h, dtype=F64), rewards=r,
                         group_reward=torch.full((B,), float(r.mean()), dtype=F64),
                         group_reward_std=torch.full((B,), float(r.std()), dtype=F64),
                         group_size=torch.full((B,), B))


def _m(**kw):
    return re.make_method("entrocraft", total_steps=10, lower=(0.6, 0.4), upper=(0.7, 0.5), **kw)


def test_begin_step_decides_the_step_with_its_own_entropy():
    m = _m()
    M = "entrocraft/"
    # s = 1: band (0.58, 0.68); H = 0.9 > u: RAFT++ on the +-1 scores -> A = [1, 0, 1, 0]
    b = _batch(0.9)
    assert m.begin_step(b) == pytest.approx(0.9)
    out = m.compute_loss(b, step=1)
    assert out.metrics[M + "branch"] == 1.0 and out.metrics[M + "step"] == 1.0
    assert out.metrics[M + "lower"] == pytest.approx(0.58) and out.metrics[M + "upper"] == pytest.approx(0.68)
    assert out.loss.item() == pytest.approx(-0.5, abs=1e-12)            # token-mean of -A, r = 1
    m.end_step()
    # s = 2: H = 0.1 < l: NSR -> A = [0, -1, 0, -1]
    b = _batch(0.1)
    m.begin_step(b)
    out = m.compute_loss(b, step=2)
    assert out.metrics[M + "branch"] == -1.0 and out.loss.item() == pytest.approx(0.5, abs=1e-12)
    m.end_step()
    # s = 3, H = 0.6 in (0.54, 0.64): GRPO = the batch's advantages
    b = _batch(0.6)
    m.begin_step(b)
    out = m.compute_loss(b, step=3)
    ref, _ = loss_and_grads(re.make_method("grpo", dual_clip=3.0), {**_fields(b)})
    assert out.metrics[M + "branch"] == 0.0 and out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-15)
    assert m.state_dict() == {"band": {"steps": 3, "entropy": pytest.approx(0.6)}}


def _fields(b):
    return {k: getattr(b, k) for k in ("log_prob", "old_log_prob", "advantages", "mask", "old_entropy", "rewards")}


def test_without_begin_step_the_previous_step_decides():
    m = _m()
    out = m.compute_loss(_batch(0.9), step=1)              # nothing measured yet: GRPO
    assert out.metrics["entrocraft/branch"] == 0.0 and math.isnan(out.metrics["entrocraft/measured_entropy"])
    m.compute_loss(_batch(0.1, T=1), step=1)               # the step's token mean: (12 * 0.9 + 4 * 0.1) / 16
    m.end_step()
    assert m.band.entropy == pytest.approx(0.7) and m.band.steps == 1
    out = m.compute_loss(_batch(0.1), step=2)              # s = 2: band (0.56, 0.66), H = 0.7 -> RAFT++
    assert out.metrics["entrocraft/branch"] == 1.0 and out.metrics["entrocraft/step"] == 2.0


def test_begin_step_is_one_collective_over_every_rank():
    world = FakeWorld(2)
    ranks = [_m() for _ in range(2)]
    for r, m in enumerate(ranks):
        m.gather_fn = world.gather_fn(r)
    hs = (0.9, 0.3)  # rank 0 alone would take RAFT++, rank 1 alone NSR; together H = 0.6: GRPO for both

    def run(r):
        b = _batch(hs[r])
        h = ranks[r].begin_step(b)
        out = ranks[r].compute_loss(b, step=1)
        ranks[r].end_step()
        return h, out.metrics["entrocraft/branch"], ranks[r].state_dict()

    (h0, b0, s0), (h1, b1, s1) = world.run([lambda r=r: run(r) for r in range(2)])
    assert h0 == h1 == pytest.approx(0.6) and b0 == b1 == 0.0 and s0 == s1


def test_scores_and_grpo_source():
    b = _batch(0.1, rewards=(1.0, 0.0, 0.0, 1.0))
    for thr, expect in [(0.5, 0.5), (None, 0.0)]:          # {0, 1} rewards: NSR is dead without the +-1 scores
        m = _m(reward_threshold=thr)
        m.begin_step(b)
        assert m.compute_loss(b, step=1).loss.item() == pytest.approx(expect, abs=1e-12)
    pm = _batch(0.1, rewards=(1.0, -1.0, -1.0, 1.0))       # +-1 rewards: the threshold is the identity
    m = _m()
    m.begin_step(pm)
    assert m.compute_loss(pm, step=1).loss.item() == pytest.approx(0.5, abs=1e-12)
    # grpo_source="rewards": the official estimator from the group statistics, whatever the batch's advantages
    g = _batch(0.6, adv=torch.zeros(4, dtype=F64))
    m = _m(grpo_source="rewards")
    m.begin_step(g)
    a = grpo_group_advantages(g.rewards, [0, 0, 0, 0])
    ref = -(a[:, None].expand(4, 3)).mean()
    assert m.compute_loss(g, step=1).loss.item() == pytest.approx(ref.item(), rel=1e-9)
    one = re.TokenBatch(log_prob=torch.zeros(1, 2, dtype=F64), old_log_prob=torch.zeros(1, 2, dtype=F64),
                        advantages=torch.zeros(1, dtype=F64), mask=torch.ones(1, 2, dtype=torch.bool),
                        old_entropy=torch.full((1, 2), 0.6, dtype=F64), rewards=torch.ones(1, dtype=F64),
                        group_reward=torch.ones(1, dtype=F64), group_reward_std=torch.zeros(1, dtype=F64),
                        group_size=torch.ones(1))
    m = _m(grpo_source="rewards")
    m.begin_step(one)
    assert m.compute_loss(one, step=1).loss.item() == pytest.approx(-1 / (1 + 1e-6), rel=1e-12)
    with pytest.raises(ValueError, match="group_reward"):
        _m(grpo_source="rewards").compute_loss(_batch(0.6).with_(group_reward=None))


def test_neutral_setting_and_state_round_trip():
    leaves, _ = make_leaves(seed=3)
    kw = re.get_method_class("entrocraft").neutral_overrides()
    m = re.make_method("entrocraft", **kw)
    for step in range(3):
        out, g = loss_and_grads(m, leaves, step=step)
        ref, gr = loss_and_grads(re.make_method("grpo", dual_clip=3.0), leaves)
        assert torch.equal(out.loss, ref.loss) and torch.equal(g["log_prob"], gr["log_prob"])
    m = _m()
    for step in range(1, 4):
        b = _batch(0.2 * step)
        m.begin_step(b)
        m.compute_loss(b, step=step)
        m.end_step()
    m2 = _m()
    m2.load_state_dict(m.state_dict())
    b = _batch(0.65)
    m.begin_step(b)
    m2.begin_step(b)
    assert m.compute_loss(b, step=4).metrics == m2.compute_loss(b, step=4).metrics


def test_validation_names_the_argument():
    for kw, name in [({"lower": (0.8, 0.4)}, "lower"), ({"upper": (0.7,)}, "upper"), ({"schedule": "exp"}, "schedule"),
                     ({"total_steps": 0}, "total_steps"), ({"grpo_source": "x"}, "grpo_source"),
                     ({"lower": (float("nan"), 0.4)}, "lower"), ({"reward_threshold": "a"}, "reward_threshold")]:
        with pytest.raises(ValueError, match=name):
            re.make_method("entrocraft", **kw)
    assert re.make_method("entrocraft", lower="0.5,0.3", upper="0.6,0.4").config.lower == (0.5, 0.3)
    with pytest.raises(ValueError, match="entropy"):
        adv(float("nan"))
    with pytest.raises(ValueError, match="rewards"):
        entrocraft_advantages(R[:, None], G, step=1, total_steps=2, entropy=0.5)
    with pytest.raises(ValueError, match="group_ids"):
        entrocraft_advantages(R, G[:-1], step=1, total_steps=2, entropy=0.5)
    with pytest.raises(ValueError, match="total_steps"):
        entrocraft_advantages(R, G, step=1, total_steps=0, entropy=0.5)
    with pytest.raises(ValueError, match="old_entropy"):
        _m().compute_loss(_batch(0.5).with_(old_entropy=None))


def test_testbed_decides_each_step_with_its_own_rollout_entropy(tmp_path, monkeypatch):
    import json

    from rlvr_entropy.testbed.train import TrainConfig, train

    monkeypatch.setenv("RLVR_ENTROPY_CACHE", str(tmp_path / "cache"))
    cfg = TrainConfig(steps=2, width=32, layers=1, heads=2, mlp=64, warm_start_steps=0, prompts_per_step=4,
                      samples_per_prompt=4, eval_problems=4, eval_samples=2, eval_k=2, eval_every=2,
                      checkpoint_every=0)
    train("entrocraft", cfg, tmp_path / "run", method_overrides={"total_steps": 2}, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    for step, r in enumerate(rows, start=1):
        assert r["entrocraft/step"] == step
        assert r["entrocraft/measured_entropy"] == pytest.approx(r["entropy"], rel=1e-5)  # same step, no lag
        assert r["entrocraft/branch"] == 1.0          # a random model's entropy (~3 nats) is far above the band
