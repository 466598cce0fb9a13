"""One harness over every registered method: a new method is covered automatically.

Per-method behaviour (hand-derived cases, parity with a reference written from the spec) lives in
tests/methods/test_<name>.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.methods.base import PGConfig
from tests.helpers import GRAD_FIELDS, batch_from, loss_and_grads, make_leaves, pad_leaves

METHODS = re.available_methods()


def fresh(name, **kw):
    return re.make_method(name, **kw)


@pytest.fixture(params=METHODS)
def name(request):
    return request.param


def test_registry_lists_all_required_methods():
    required = {"grpo", "entropy_bonus", "adaptive_entropy", "clip_cov", "kl_cov", "forking_tokens",
                "entropy_advantage", "w_reinforce", "ce_gppo", "lp_reg", "siren", "steer"}
    assert required <= set(METHODS)


def test_unknown_method_and_key_raise(name):
    with pytest.raises(ValueError, match="unknown method"):
        re.make_method("no_such_method")
    with pytest.raises(ValueError, match="not_a_key"):
        re.make_method(name, not_a_key=1)


def test_config_is_frozen_dataclass_with_pg_fields(name):
    cls = re.get_method_class(name)
    assert dataclasses.is_dataclass(cls.Config) and issubclass(cls.Config, PGConfig)
    cfg = cls.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.eps_low = 0.3  # type: ignore[misc]
    with pytest.raises(ValueError, match="eps_low"):
        re.make_method(name, eps_low=-0.1)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        re.make_method(name, loss_agg_mode="mean")


def test_default_loss_finite_and_metrics_prefixed(name):
    leaves, _ = make_leaves(seed=1)
    out, grads = loss_and_grads(fresh(name), leaves)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.metrics, "every method logs something"
    for k, v in out.metrics.items():
        assert k.startswith(f"{name}/"), k
        if isinstance(v, torch.Tensor):
            assert not v.requires_grad
            assert torch.isfinite(v).all(), k
    assert any(g.abs().sum() > 0 for g in grads.values()), "some gradient must flow"


def test_all_masked_batch_gives_exact_zero(name):
    leaves, _ = make_leaves(seed=2)
    leaves["mask"] = torch.zeros_like(leaves["mask"])
    out, grads = loss_and_grads(fresh(name), leaves)
    assert out.loss.item() == 0.0
    for f, g in grads.items():
        assert torch.equal(g, torch.zeros_like(g)), f


def test_padding_changes_nothing(name):
    cls = re.get_method_class(name)
    kw = {}
    if cls.Config().loss_agg_mode == "seq-mean-token-sum-norm" and cls.Config().norm_length is None:
        kw["norm_length"] = 16
    leaves, _ = make_leaves(seed=3)
    out, grads = loss_and_grads(fresh(name, **kw), leaves)
    padded = pad_leaves(leaves, extra=3)
    out_p, grads_p = loss_and_grads(fresh(name, **kw), padded)
    torch.testing.assert_close(out_p.loss, out.loss, rtol=1e-10, atol=1e-12)
    T = leaves["log_prob"].shape[1]
    for f in grads:
        torch.testing.assert_close(grads_p[f][:, :T], grads[f], rtol=1e-9, atol=1e-12)
        assert torch.equal(grads_p[f][:, T:], torch.zeros_like(grads_p[f][:, T:])), f


def test_masked_tokens_get_no_gradient(name):
    leaves, _ = make_leaves(seed=4)
    out, grads = loss_and_grads(fresh(name), leaves)
    m = leaves["mask"]
    for f, g in grads.items():
        gm = g[~m]
        assert torch.equal(gm, torch.zeros_like(gm)), f


def test_nan_at_valid_position_raises(name):
    leaves, _ = make_leaves(seed=5)
    lp = leaves["log_prob"].detach().clone()
    lp[0, 0] = float("nan")
    with pytest.raises(ValueError, match="log_prob"):
        batch_from(leaves, log_prob=lp)
    with pytest.raises(ValueError, match="old_log_prob"):
        batch_from(leaves, old_log_prob=leaves["old_log_prob"][:, :-1])


def test_neutral_settings_equal_grpo(name):
    cls = re.get_method_class(name)
    neutral = cls.neutral_overrides()
    if neutral is None:
        pytest.skip(f"{name} has no setting that reduces to grpo (tested in its own module)")
    m = fresh(name, **neutral)
    base = re.make_method("grpo", **m.config.pg_fields())
    leaves, _ = make_leaves(seed=6)
    out, grads = loss_and_grads(m, leaves)
    ref, grads_ref = loss_and_grads(base, leaves)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    for f in grads:
        torch.testing.assert_close(grads[f], grads_ref[f], rtol=1e-10, atol=1e-12)


def test_gradcheck_float64(name):
    leaves, _ = make_leaves(B=3, T=4, V=5, seed=7)
    cls = re.get_method_class(name)
    if not cls.smooth_in_inputs:
        pytest.skip(f"{name} applies stop-gradient weights computed from its inputs (checked in its own tests)")
    fields = [f for f in GRAD_FIELDS if f in ("log_prob",) + tuple(cls.needs)]
    if "logits" not in fields:
        fields.append("entropy")
    fields = [f for f in fields if f not in cls.detached_inputs]
    inputs = tuple(leaves[f] for f in fields)
    m = fresh(name)
    m.compute_loss(batch_from(leaves))  # first call sets any anchor, so later calls see a fixed target

    def f(*xs):
        torch.manual_seed(0)
        return m.compute_loss(batch_from(leaves, **dict(zip(fields, xs))), step=0).loss

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_state_dict_round_trip(name):
    leaves, _ = make_leaves(seed=8)
    m = fresh(name)
    for step in range(3):
        loss_and_grads(m, leaves, step=step)
    state = m.state_dict()
    m2 = fresh(name)
    m2.load_state_dict(state)
    assert m2.state_dict() == state
    a, _ = loss_and_grads(m, leaves, step=3)
    b, _ = loss_and_grads(m2, leaves, step=3)
    torch.testing.assert_close(a.loss, b.loss)


def test_deterministic(name):
    leaves, _ = make_leaves(seed=9)
    a, ga = loss_and_grads(fresh(name), leaves)
    b, gb = loss_and_grads(fresh(name), leaves)
    assert torch.equal(a.loss, b.loss)
    for f in ga:
        assert torch.equal(ga[f], gb[f])


def test_bf16_logits_and_float32_inputs(name):
    leaves, _ = make_leaves(seed=10, dtype=torch.float32)
    leaves["logits"] = leaves["logits"].detach().to(torch.bfloat16).requires_grad_(True)
    out, grads = loss_and_grads(fresh(name), leaves)
    assert torch.isfinite(out.loss)
    assert grads["logits"].dtype == torch.bfloat16


def _rows(leaves, lo, hi):
    B = leaves["mask"].shape[0]
    return {k: (x[lo:hi].detach() if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == B else x)
            for k, x in leaves.items()}


def _steps(seed, n=3):
    return [make_leaves(seed=seed + k, B=4)[0] for k in range(n)]


def test_evaluation_never_changes_state(name):
    m = fresh(name)
    for step, lv in enumerate(_steps(30)):
        m.compute_loss(batch_from(lv), step=step)
        m.end_step()
    state = m.state_dict()
    for lv in _steps(40):
        m.compute_loss(batch_from(lv), step=99, observe=False)
    m.end_step()
    assert m.state_dict() == state


def test_state_is_split_and_rank_invariant(name):
    """Two ranks with different data, one process with the same data in two micro-batches per step, and one
    micro-batch per step: every controller ends in the same state (bit-identical across ranks)."""
    from tests.methods._world import FakeWorld

    data = _steps(50)
    one = fresh(name)
    two = fresh(name)
    for step, lv in enumerate(data):
        one.compute_loss(batch_from(_rows(lv, 0, 4)), step=step)
        one.end_step()
        for lo, hi in ((0, 1), (1, 4)):
            two.compute_loss(batch_from(_rows(lv, lo, hi)), step=step)
        two.end_step()
    world = FakeWorld(2)
    ranks = [fresh(name) for _ in range(2)]
    for r, m in enumerate(ranks):
        m.gather_fn = world.gather_fn(r)

    def run(r):
        lo, hi = ((0, 1), (1, 4))[r]
        for step, lv in enumerate(data):
            ranks[r].compute_loss(batch_from(_rows(lv, lo, hi)), step=step)
            ranks[r].end_step()
        return ranks[r].state_dict()

    s0, s1 = world.run([lambda r=r: run(r) for r in range(2)])
    assert s0 == s1
    if not ranks[0].observes:
        return
    assert s0 == two.state_dict()  # the ranks' sums add in the same order as two micro-batches on one process

    def close(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, float) and isinstance(b, float):
            return a == pytest.approx(b, rel=1e-9, abs=1e-12)
        return a == b

    assert close(one.state_dict(), s0)
    solo = fresh(name)  # one rank alone measures something else: the reduction is real
    for step, lv in enumerate(data):
        solo.compute_loss(batch_from(_rows(lv, 0, 1)), step=step)
        solo.end_step()
    assert solo.state_dict() != s0


def test_rollout_end_flag(name):
    """A rollout trained in two optimizer steps (end_step(rollout_end=False), then True). A method that measures
    per step ends exactly as when each step is a rollout; one that measures per rollout (SIREN's anchor) ends as
    one step over the whole rollout."""
    data = _steps(51)
    flagged, plain, merged = fresh(name), fresh(name), fresh(name)
    for step, lv in enumerate(data):
        for k, (lo, hi) in enumerate(((0, 1), (1, 4))):
            flagged.compute_loss(batch_from(_rows(lv, lo, hi)), step=2 * step + k)
            flagged.end_step(rollout_end=k == 1)
            plain.compute_loss(batch_from(_rows(lv, lo, hi)), step=2 * step + k)
            plain.end_step()
            merged.compute_loss(batch_from(_rows(lv, lo, hi)), step=step)
        merged.end_step()
        if flagged.observes_per == "step":
            assert flagged.state_dict() == plain.state_dict(), step
        else:
            assert flagged.observes_per == "rollout"
            if step == 0:
                assert flagged.state_dict() == merged.state_dict() != plain.state_dict()


# ------------------------------------------------------------------ logits-free route (rlvr_entropy.kernels)
def _logits_route_cases():
    """Every method that reads the distribution (instance-level ``needs``), with its defaults, plus settings that
    exercise each statistic's gradient or the controller (siren's anchor and ablation, Lp-Reg's term on a small
    batch, AEnt clamping), and methods that read only the entropy (the thermostat with its PI away from 0, so its
    pull toward ref_log_prob acts on the source's log-probs)."""
    cases = [(n, {}) for n in METHODS if "logits" in fresh(n).needs]
    cases += [("siren", {"anchor_value": 1.0}), ("siren", {"use_top_p": False, "anchor_value": 1.0, "top_k": 5}),
              ("thermostat", {"target": 5.0, "reach_tol": None}),
              ("lp_reg", {"rho": 0.5, "min_tokens": 1, "kappa": 0.2}),
              ("entropy_bonus", {"clamp_fraction": 0.3}), ("entropy_bonus", {}), ("grpo", {}), ("steer", {})]
    return [pytest.param(n, kw, id=f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}")
            for n, kw in cases if n in METHODS]


@pytest.mark.parametrize("name,config", _logits_route_cases())
def test_lm_head_route_equals_logits_route(name, config):
    """The same loss, metrics and gradients (to hidden states, LM-head weight and bias) whether the method reads
    materialized logits [B, T, V] or a TokenBatch.lm_head source (tiled, no logits); the source serves every
    statistic from the engine's one prefetched pass."""
    from rlvr_entropy import kernels, stats

    B, T, H, V, temp = 4, 6, 5, 23, 0.7
    g = torch.Generator().manual_seed(11)
    hid = (torch.randn(B, T, H, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    W = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_(True)
    bias = (0.5 * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_(True)
    mask = torch.arange(T)[None, :] < torch.tensor([T, 4, 2, 5])[:, None]
    with torch.no_grad():
        ids = torch.multinomial(torch.softmax((hid @ W.T + bias) / temp, -1).reshape(-1, V), 1,
                                generator=g).reshape(B, T)
    hid_nan = hid.detach().clone()
    hid_nan[~mask] = float("nan")  # padding may hold anything
    hid_nan.requires_grad_(True)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    common = dict(advantages=rewards - rewards.mean(), mask=mask, rewards=rewards,
                  group_reward=torch.tensor([0.5, 0.5, 0.25, 0.25], dtype=torch.float64))

    def run(route):
        m = fresh(name, **config)
        x = hid_nan if route == "lm_head" else hid
        for p in (x, W, bias):
            p.grad = None
        if route == "logits":
            logits = (torch.where(mask[..., None], x, 0.0) @ W.T + bias) / temp
            lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
            ent = stats.entropy(logits, mask=mask)
            fields = dict(log_prob=lp, entropy=ent, logits=logits)
        else:
            fields = kernels.lm_head_batch_fields(x, W, bias, token_ids=ids, mask=mask, temperature=temp,
                                                  method=m, tile_size=5)
        old = fields["log_prob"].detach() + 0.1 * torch.sin(torch.arange(B * T, dtype=torch.float64)).view(B, T)
        batch = re.TokenBatch(old_log_prob=old, old_entropy=fields["entropy"].detach() + 0.01,
                              ref_log_prob=old - 0.05, **fields, **common)
        for step in range(2):  # the second step sees the controllers' state (anchor, PI output) set by the first
            out = m.compute_loss(batch, step=step)
        m.end_step()
        grads = torch.autograd.grad(out.loss, (x, W, bias))
        passes = fields["lm_head"].passes if route == "lm_head" else None
        return out, grads, passes

    (a, ga, _), (b, gb, passes) = run("logits"), run("lm_head")
    assert passes == 1, "every statistic the method reads was served from the engine's one prefetched pass"
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-10, atol=1e-12)
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        torch.testing.assert_close(torch.as_tensor(b.metrics[k], dtype=torch.float64),
                                   torch.as_tensor(a.metrics[k], dtype=torch.float64), rtol=1e-9, atol=1e-12,
                                   equal_nan=True, msg=k)
    for nm, x, y in zip(("hidden", "weight", "bias"), gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-11, msg=nm)
    assert torch.equal(gb[0][~mask], torch.zeros_like(gb[0][~mask]))  # no gradient reaches padding
    assert any(float(x.abs().sum()) > 0 for x in gb)


def _zero_advantage_rows_violation(name: str, seed: int = 50) -> str | None:
    """Why ``name`` is not inert on rows with zero advantage (None when it is): the loss, the live rows'
    gradients and the state after the step, with the full batch vs with the dead rows' log_prob replaced by
    old_log_prob and no logits / entropy (what the testbed passes to a method claiming inertness)."""
    leaves, _ = make_leaves(B=6, seed=seed)
    leaves["advantages"] = torch.tensor([0.9, -0.6, 0.0, 0.4, 0.0, -0.7], dtype=torch.float64)
    dead = leaves["advantages"] == 0
    a, b = fresh(name), fresh(name)
    out_a, grads_a = loss_and_grads(a, leaves, step=0)
    a.end_step()
    lp = torch.where(dead[:, None], leaves["old_log_prob"], leaves["log_prob"].detach()).requires_grad_(True)
    lean = {**leaves, "log_prob": lp, "logits": None, "entropy": None}
    try:
        out_b, grads_b = loss_and_grads(b, lean, step=0)
    except ValueError as e:  # it needs what a lean batch does not carry
        return f"needs more than a lean batch: {e}"
    b.end_step()
    if not torch.allclose(out_a.loss, out_b.loss, rtol=1e-12, atol=1e-14):
        return f"loss {float(out_a.loss.detach())} != {float(out_b.loss.detach())}"
    for f, g in grads_a.items():
        if not torch.equal(g[dead], torch.zeros_like(g[dead])):
            return f"dead rows get a gradient through {f}"
    if not torch.allclose(grads_a["log_prob"][~dead], grads_b["log_prob"][~dead], rtol=1e-12, atol=1e-14):
        return "the live rows' gradient changes"
    if a.state_dict() != b.state_dict():
        return "the state after the step changes"
    return None


def test_zero_advantage_rows_inert_claims_hold(name):
    cls = re.get_method_class(name)
    if not cls.zero_advantage_rows_inert:
        pytest.skip(f"{name} makes no claim")
    for seed in (50, 51, 52):
        assert _zero_advantage_rows_violation(name, seed) is None


@pytest.mark.parametrize("other", ["siren", "entropy_bonus", "thermostat", "w_reinforce"])
def test_zero_advantage_rows_check_catches_methods_that_are_not_inert(other):
    assert not re.get_method_class(other).zero_advantage_rows_inert
    assert _zero_advantage_rows_violation(other) is not None
