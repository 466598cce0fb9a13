"""SIREN: hand cases, the edge cases of siren.md, parity with a reference written from the spec (values and
gradients of the full loss), the anchor's life cycle, ablations.

The top-p entropy's own edge cases (top-1 >= p, C == p, never reaching p within K, ties at the nucleus boundary,
bf16, masks with NaN rows) are in tests/test_stats_top_p.py; its reference loop is reused here.
"""
from __future__ import annotations

import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.methods.siren import SirenConfig, peak_entropy_mask, row_quantile, selected_entropy
from tests.helpers import batch_from, loss_and_grads, make_leaves
from tests.test_stats_top_p import ref_top_p_entropy_row


# --------------------------------------------------------------------------- reference written from siren.md
def ref_quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile by hand: position q (n - 1) in the sorted values."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ref_full_entropy_row(z: torch.Tensor) -> torch.Tensor:
    pi = torch.softmax(z, -1)
    return -(pi * torch.log_softmax(z, -1)).sum()


def ref_selected_entropy(logits, mask, *, p=0.8, K=10000, inclusive=False, q=0.8, use_top_p=True,
                         use_peak_mask=True):
    """H_sel: per row, H_p of the valid positions, tau = hand quantile, strict >, row mean, then / B."""
    B, T, _ = logits.shape
    total = logits.sum() * 0
    for i in range(B):
        hs = [(ref_top_p_entropy_row(logits[i, t], p, K, inclusive) if use_top_p
               else ref_full_entropy_row(logits[i, t])) for t in range(T) if mask[i, t]]
        if not hs:
            continue  # empty row: contributes 0, counts in B
        if use_peak_mask:
            tau = ref_quantile([float(h.detach()) for h in hs], q)
            hs = [h for h in hs if float(h.detach()) > tau]
        if hs:
            total = total + sum(hs) / len(hs)
    return total / B


def ref_pg_loss(log_prob, old_log_prob, adv, mask, *, eps_low=0.2, eps_high=0.2, dual_clip=3.0, norm_length=3072):
    """PPO clip + dual-clip, seq-mean-token-sum-norm (siren.md section 5), one token at a time."""
    B, T = log_prob.shape
    rows = []
    for i in range(B):
        terms = []
        for t in range(T):
            if not mask[i, t]:
                continue
            a = float(adv[i])
            r = torch.exp(log_prob[i, t] - old_log_prob[i, t])
            lt = torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps_low, 1 + eps_high))
            if a < 0:
                lt = torch.minimum(lt, torch.tensor(-dual_clip * a, dtype=lt.dtype))
            terms.append(lt)
        if terms:
            rows.append(sum(terms))
    return sum(rows) / len(rows) / norm_length if rows else log_prob.sum() * 0


def ref_siren_loss(leaves, *, beta=0.005, anchor=None, use_anchor=True, **sel_kw):
    h_sel = ref_selected_entropy(leaves["logits"], leaves["mask"], **sel_kw)
    pg = ref_pg_loss(leaves["log_prob"], leaves["old_log_prob"], leaves["advantages"], leaves["mask"])
    reg = beta * (h_sel - anchor) ** 2 if use_anchor else -beta * h_sel
    return pg + reg, h_sel


# ------------------------------------------------------------------------------------------- hand-derived
def _hand_batch():
    """Row 0: five positions with V = 5 (numbers below), row 1: padding only (NaN logits). A = 0, so L_PG = 0."""
    probs = [
        [0.5, 0.2, 0.2, 0.05, 0.05],    # C = .5, .7, .9 -> {.5, .2}: H(5/7, 2/7) = 0.598270
        [0.4, 0.3, 0.2, 0.05, 0.05],    # C = .4, .7, .9 -> {.4, .3}: H(4/7, 3/7) = 0.682908
        [0.3, 0.25, 0.2, 0.15, 0.1],    # C = .3, .55, .75, .9 -> {.3, .25, .2}: H(.4, 1/3, 4/15) = 1.085189
        [0.9, 0.04, 0.03, 0.02, 0.01],  # top-1 >= p -> 0
        [0.85, 0.05, 0.04, 0.03, 0.03],  # top-1 >= p -> 0
    ]
    logits = torch.full((2, 5, 5), float("nan"), dtype=torch.float64)
    logits[0] = torch.tensor(probs, dtype=torch.float64).log()
    mask = torch.tensor([[True] * 5, [False] * 5])
    lp = torch.zeros(2, 5, dtype=torch.float64)
    return dict(log_prob=lp.clone().requires_grad_(True), old_log_prob=lp,
                advantages=torch.zeros(2, dtype=torch.float64), mask=mask, logits=logits.requires_grad_(True))


def test_hand_derived_loss_and_gradient():
    # Row 0 values sorted: 0, 0, 0.598270, 0.682908, 1.085189; q = 0.8 -> position 3.2 ->
    # tau = 0.682908 + 0.2 (1.085189 - 0.682908) = 0.763364: only position 2 is selected.
    # H_sel = (1.085189 + 0 for the empty row 1) / 2 = 0.542594.
    # beta = 0.5, A = 0.3: reg = 0.5 (0.242594)^2 = 0.029426.
    # d reg / d logits[0, 2] = 2 beta (H_sel - A) (1/B) dH_p/dz = 0.121297 * (-q_v (log q_v + H_p)) on the nucleus:
    #   v0: 0.121297 * -0.4 (ln 0.4 + 1.085189) = -0.008195; v1: +0.000543; v2: +0.007652; v3, v4: 0.
    leaves = _hand_batch()
    m = re.make_method("siren", beta=0.5, anchor_value=0.3)
    out, grads = loss_and_grads(m, leaves)
    assert out.loss.item() == pytest.approx(0.029426, abs=1e-6)
    assert out.metrics["siren/selected_entropy"].item() == pytest.approx(0.542594, abs=1e-6)
    assert out.metrics["siren/reg"].item() == pytest.approx(0.029426, abs=1e-6)
    assert out.metrics["siren/selected_frac"].item() == pytest.approx(1 / 5)
    assert out.metrics["siren/top_p_entropy"].item() == pytest.approx((0.598270 + 0.682908 + 1.085189) / 5,
                                                                      abs=1e-6)
    expected = torch.zeros(2, 5, 5, dtype=torch.float64)
    expected[0, 2, :3] = torch.tensor([-0.008195, 0.000543, 0.007652], dtype=torch.float64)
    torch.testing.assert_close(grads["logits"], expected, rtol=0, atol=2e-6)
    assert torch.equal(grads["log_prob"], torch.zeros_like(grads["log_prob"]))  # A = 0


def test_peak_mask_hand_case():
    # row 0 values 1..5: q 0.8 -> position 3.2 -> tau = 4 + 0.2 = 4.2 -> only 5 selected
    # row 1 all equal: tau = 2, strict > selects nothing; row 2 one valid token: tau = itself -> nothing
    # row 3 no valid token: nothing
    e = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 2.0, 2.0, 2.0, 2.0], [7.0, 9.0, 9.0, 9.0, 9.0],
                      [3.0, 1.0, 2.0, 5.0, 4.0]])
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]).bool()
    sel = peak_entropy_mask(e, m)
    assert sel.tolist() == [[False] * 4 + [True], [False] * 5, [False] * 5, [False] * 5]
    # H_sel = (5 + 0 + 0 + 0) / 4 rows (rows with no selection count in B)
    assert selected_entropy(e, m).item() == pytest.approx(5 / 4)
    # quantile 0.5 on 1..5: tau = 3 -> {4, 5}; row mean 4.5
    assert peak_entropy_mask(e, m, 0.5)[0].tolist() == [False, False, False, True, True]
    assert selected_entropy(e, m, 0.5).item() == pytest.approx(4.5 / 4)


def test_tau_zero_selects_every_positive_token():
    # >= 80% of the row is 0 -> tau = 0 -> every positive token selected (values 0.3 and 0.5 -> mean 0.4)
    e = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.5]])
    full = torch.ones_like(e, dtype=torch.bool)
    assert peak_entropy_mask(e, full)[0].tolist() == [False] * 8 + [True, True]
    assert selected_entropy(e, full).item() == pytest.approx(0.4)
    # 9 zeros and one positive: still only the positive one
    e2 = torch.tensor([[0.0] * 9 + [0.7]])
    assert peak_entropy_mask(e2, full)[0].tolist() == [False] * 9 + [True]


def test_ties_at_tau_are_not_selected():
    e = torch.tensor([[1.0, 3.0, 3.0, 3.0, 3.0], [1.0, 2.0, 3.0, 3.0, 4.0]])
    # row 0: q 0.8 = 3 -> none above; row 1: position 3.2 between 3 and 4 -> tau = 3.2 -> only 4
    sel = peak_entropy_mask(e, torch.ones_like(e, dtype=torch.bool))
    assert sel.tolist() == [[False] * 5, [False, False, False, False, True]]
    # exactly at tau by interpolation weight 0: values 0, 1, 2, 3, 4, 5 at q = 0.6 -> position 3 -> tau = 3
    e = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    assert peak_entropy_mask(e, torch.ones_like(e, dtype=torch.bool), 0.6).tolist() == [[True, True] + [False] * 4]


def test_empty_rows_and_all_masked():
    e = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    none = torch.zeros(3, 4, dtype=torch.bool)
    assert not peak_entropy_mask(e, none).any()
    h = selected_entropy(e, none)
    assert h.item() == 0.0
    (g,) = torch.autograd.grad(h, e)
    assert torch.equal(g, torch.zeros_like(g))
    assert selected_entropy(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool)).item() == 0.0


def test_padding_nan_is_ignored_and_gradient_of_selected_entropy():
    # row 0: 1..5 -> {5}; row 1: values 2, 8, 6 (+ NaN padding): position 1.6 -> tau = 6 + 0.6 * 2 = 7.2 -> {8}
    e = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 8.0, 6.0, float("nan"), float("nan")]],
                     dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    h = selected_entropy(e, m)
    assert h.item() == pytest.approx((5 + 8) / 2)
    (g,) = torch.autograd.grad(h, e)
    # dH_sel / de = 1 / (B * #selected in the row) at selected positions, 0 elsewhere (NaN padding included)
    assert g.tolist() == [[0, 0, 0, 0, 0.5], [0, 0.5, 0, 0, 0]]


def test_peak_mask_matches_reference_quantile_and_nanquantile():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        e = torch.rand(40, 23, generator=g, dtype=torch.float64).to(dtype)
        e[:5] = (e[:5] * 4).round()  # many ties
        m = torch.rand(40, 23, generator=g) > 0.3
        m[6] = False
        m[7] = False
        m[7, 3] = True
        for q in (0.0, 0.3, 0.7, 0.8, 1.0):
            sel = peak_entropy_mask(e, m, q)
            tau = row_quantile(e, m, q)
            nq = torch.nanquantile(torch.where(m, e, float("nan")), q, dim=-1)
            assert torch.equal(torch.isnan(tau), torch.isnan(nq)) and torch.equal(tau[~tau.isnan()], nq[~nq.isnan()])
            for i in range(40):
                vals = [float(e[i, t]) for t in range(23) if m[i, t]]
                if not vals:
                    assert not sel[i].any()
                    continue
                t_ref = ref_quantile(vals, q)
                expect = [bool(m[i, t]) and float(e[i, t]) > t_ref for t in range(23)]
                if sel[i].tolist() != expect:  # allowed only where a value is within rounding of tau
                    diff = [t for t in range(23) if sel[i, t].item() != expect[t]]
                    assert all(abs(float(e[i, t]) - t_ref) < 1e-6 for t in diff)
        assert not peak_entropy_mask(e, m, 1.0).any()  # nothing is above the maximum


def test_peak_mask_validation():
    with pytest.raises(ValueError, match="entropy"):
        peak_entropy_mask(torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        peak_entropy_mask(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="quantile"):
        peak_entropy_mask(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), quantile=1.5)
    bad = torch.zeros(2, 3)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="entropy"):
        peak_entropy_mask(bad, torch.ones(2, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------ parity with reference
@pytest.mark.parametrize("kw", [
    dict(),
    dict(inclusive=True),
    dict(top_k=3),
    dict(top_p=0.6, quantile=0.5),
    dict(use_anchor=False),
    dict(use_top_p=False),
    dict(use_peak_mask=False),
    dict(use_anchor=False, use_top_p=False, use_peak_mask=False),
])
def test_full_loss_matches_reference_values_and_gradients(kw):
    leaves, _ = make_leaves(B=4, T=6, V=9, seed=3, scale=1.5)
    leaves["mask"][3] = False  # an empty row counts in B
    m = re.make_method("siren", beta=0.5, anchor_value=0.3, **kw)
    out, grads = loss_and_grads(m, leaves)
    for f in ("log_prob", "logits"):
        leaves[f].grad = None
    ref, h_sel = ref_siren_loss(leaves, beta=0.5, anchor=0.3, use_anchor=kw.get("use_anchor", True),
                                p=kw.get("top_p", 0.8), K=kw.get("top_k", 10000), inclusive=kw.get("inclusive", False),
                                q=kw.get("quantile", 0.8), use_top_p=kw.get("use_top_p", True),
                                use_peak_mask=kw.get("use_peak_mask", True))
    torch.testing.assert_close(out.loss, ref, rtol=1e-9, atol=1e-12)
    assert out.metrics["siren/selected_entropy"].item() == pytest.approx(float(h_sel.detach()), abs=1e-9)
    g_lp, g_lg = torch.autograd.grad(ref, [leaves["log_prob"], leaves["logits"]])
    torch.testing.assert_close(grads["log_prob"], g_lp, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads["logits"], g_lg, rtol=1e-7, atol=1e-10)
    assert g_lg.abs().sum() > 0


def test_default_pg_part_is_official_runs():
    leaves, _ = make_leaves(seed=11, scale=1.0)
    leaves["old_log_prob"] = leaves["old_log_prob"] + 0.5 * torch.randn(leaves["old_log_prob"].shape,
                                                                        generator=torch.Generator().manual_seed(0),
                                                                        dtype=torch.float64)  # clip and dual-clip
    out, grads = loss_and_grads(re.make_method("siren", beta=0.0), leaves)
    ref = ref_pg_loss(leaves["log_prob"], leaves["old_log_prob"], leaves["advantages"], leaves["mask"])
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-13)
    assert out.metrics["siren/clip_frac"] > 0


# --------------------------------------------------------------------------------------------- the anchor
def _rows_with_tokens(leaves):
    """The same leaves without the responses that have no valid token (the anchor does not count them)."""
    keep = leaves["mask"].any(-1)
    return {k: (x[keep] if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == keep.numel() else x)
            for k, x in leaves.items()}


def test_anchor_measured_by_the_first_step_and_survives_resume():
    leaves, _ = make_leaves(seed=4)
    m = re.make_method("siren")
    out, grads = loss_and_grads(m, leaves, step=0)
    assert not m.anchor.is_set and math.isnan(out.metrics["siren/anchor"])
    assert out.metrics["siren/reg"].item() == 0.0  # the first step measures: no penalty, no gradient from it
    base, gbase = loss_and_grads(re.make_method("grpo", **m.config.pg_fields()), leaves)
    torch.testing.assert_close(grads["logits"], gbase["logits"], rtol=0, atol=0)
    m.end_step()
    a = m.state_dict()["anchor"]["value"]
    h_sel = ref_selected_entropy(_rows_with_tokens(leaves)["logits"].detach(), _rows_with_tokens(leaves)["mask"])
    assert a == pytest.approx(float(h_sel), abs=1e-9)
    leaves2, _ = make_leaves(seed=5)
    out2 = m.compute_loss(batch_from(leaves2), step=1)
    assert out2.metrics["siren/anchor"] == a and out2.metrics["siren/reg"].item() > 0
    m.end_step()
    assert m.state_dict()["anchor"]["value"] == a  # set once
    # resume with state: the same anchor and the same loss
    resumed = re.make_method("siren")
    resumed.load_state_dict(m.state_dict())
    assert resumed.compute_loss(batch_from(leaves2), step=1).loss.item() == pytest.approx(out2.loss.item(), rel=1e-12)
    # resume without anchor (a fresh method, no state): it measures a new anchor on its first step
    fresh = re.make_method("siren")
    fresh.compute_loss(batch_from(leaves2), step=1)
    fresh.end_step()
    assert fresh.state_dict()["anchor"]["value"] != a


def test_anchor_does_not_depend_on_the_micro_batch_split():
    leaves, _ = make_leaves(seed=14, B=6)
    whole = re.make_method("siren")
    whole.compute_loss(batch_from(leaves), step=0)
    whole.end_step()
    prepared = re.make_method("siren")
    prepared.prepare(batch_from(leaves))
    for cuts in ([2, 4], [1, 5], [3]):
        m = re.make_method("siren")
        bounds = [0, *cuts, 6]
        for lo, hi in zip(bounds, bounds[1:]):
            part = {k: (x[lo:hi] if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 6 else x)
                    for k, x in leaves.items()}
            out = m.compute_loss(batch_from(part), step=0)
            assert out.metrics["siren/reg"].item() == 0.0
        m.end_step()
        assert m.anchor.value == pytest.approx(whole.anchor.value, rel=1e-12, abs=1e-15), cuts
    assert prepared.anchor.value == pytest.approx(whole.anchor.value, rel=1e-12, abs=1e-15)


def test_anchor_spans_every_optimizer_step_of_the_first_rollout():
    """A rollout trained in several optimizer steps (TRL's steps_per_generation > accumulation, verl's mini-batches):
    the anchor is the mean over the whole rollout, set only at the step that completes it; those steps carry no
    penalty; a per-step controller is not affected by the flag."""
    leaves, _ = make_leaves(seed=17, B=6)
    whole = re.make_method("siren")
    whole.prepare(batch_from(leaves))
    m = re.make_method("siren")
    for step, (lo, hi) in enumerate([(0, 2), (2, 3), (3, 6)]):
        part = {k: (x[lo:hi] if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 6 else x)
                for k, x in leaves.items()}
        out = m.compute_loss(batch_from(part), step=step)
        assert out.metrics["siren/reg"].item() == 0.0 and not m.anchor.is_set, step
        m.end_step(rollout_end=hi == 6)
    assert m.anchor.value == pytest.approx(whole.anchor.value, rel=1e-12)
    # closing each step as a rollout of its own measures the first part only: a different anchor
    first = re.make_method("siren")
    first.compute_loss(batch_from({k: (x[:2] if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 6
                                       else x) for k, x in leaves.items()}), step=0)
    first.end_step()
    assert first.anchor.value != pytest.approx(whole.anchor.value, rel=1e-6)
    with pytest.raises(ValueError, match="rollout_end"):
        m.end_step(rollout_end=1)


def test_anchor_over_ranks_is_the_same_on_every_rank():
    from tests.methods._world import FakeWorld

    leaves, _ = make_leaves(seed=15, B=6)
    whole = re.make_method("siren")
    whole.prepare(batch_from(leaves))
    parts = [slice(0, 1), slice(1, 6)]
    world = FakeWorld(2)
    methods = [re.make_method("siren") for _ in parts]
    for r, m in enumerate(methods):
        m.gather_fn = world.gather_fn(r)

    def rank(r, how):
        part = {k: (x[parts[r]] if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 6 else x)
                for k, x in leaves.items()}
        if how == "prepare":
            return methods[r].prepare(batch_from(part))
        methods[r].compute_loss(batch_from(part), step=0)
        methods[r].end_step()
        return methods[r].anchor.value

    for how in ("prepare", "step"):
        for m in methods:
            m.anchor.value = None
        values = world.run([lambda r=r: rank(r, how) for r in range(2)])
        assert values[0] == values[1] == pytest.approx(whole.anchor.value, rel=1e-12), how


def test_evaluation_does_not_measure_the_anchor():
    leaves, _ = make_leaves(seed=16)
    m = re.make_method("siren")
    m.compute_loss(batch_from(leaves), step=0, observe=False)
    m.end_step()
    assert not m.anchor.is_set


def test_all_masked_first_batch_does_not_set_the_anchor():
    leaves, _ = make_leaves(seed=12)
    empty = dict(leaves, mask=torch.zeros_like(leaves["mask"]))
    m = re.make_method("siren")
    out = m.compute_loss(batch_from(empty), step=0)
    m.end_step()
    assert out.loss.item() == 0.0 and not m.anchor.is_set and math.isnan(out.metrics["siren/anchor"])
    assert m.prepare(batch_from(empty)) is None
    m.compute_loss(batch_from(leaves), step=1)
    m.end_step()
    assert m.anchor.is_set


def test_prepare_measures_anchor_on_whole_batch():
    leaves, _ = make_leaves(seed=6, B=6)
    m = re.make_method("siren")
    v = m.prepare(batch_from(leaves))
    h_sel = ref_selected_entropy(leaves["logits"].detach(), leaves["mask"])
    assert v == pytest.approx(float(h_sel.detach()), abs=1e-9)
    assert m.prepare(batch_from(make_leaves(seed=7)[0])) == v  # set once
    # micro-batches then see the whole batch's anchor (the regularizer depends on the split: each micro-batch
    # uses its own H_sel)
    half = {k: (x[:3] if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 6 else x)
            for k, x in leaves.items()}
    out = m.compute_loss(batch_from(half), step=0)
    h_half = ref_selected_entropy(half["logits"].detach(), half["mask"])
    assert out.metrics["siren/anchor"] == v
    assert out.metrics["siren/reg"].item() == pytest.approx(0.005 * (float(h_half) - v) ** 2, rel=1e-9)
    # no-ops: given anchor, use_anchor=False
    assert re.make_method("siren", anchor_value=1.25).prepare(batch_from(leaves)) == 1.25
    assert re.make_method("siren", use_anchor=False).prepare(batch_from(leaves)) is None


def test_loaded_unset_anchor_is_measured_again():
    m = re.make_method("siren", anchor_value=2.0)
    m.load_state_dict({"anchor": {"value": None}})
    leaves, _ = make_leaves(seed=13)
    out = m.compute_loss(batch_from(leaves))  # no step: the call is a step
    rows = _rows_with_tokens(leaves)
    assert out.metrics["siren/reg"].item() == 0.0
    assert m.anchor.value == pytest.approx(float(ref_selected_entropy(rows["logits"].detach(), rows["mask"])),
                                           abs=1e-9)


# --------------------------------------------------------------------------------------------- other checks
def test_bf16_logits_close_to_float32():
    leaves, _ = make_leaves(seed=10, dtype=torch.float32, V=40)
    out32, g32 = loss_and_grads(re.make_method("siren", beta=0.5, anchor_value=0.2), leaves)
    leaves["logits"] = leaves["logits"].detach().to(torch.bfloat16).requires_grad_(True)
    out16, g16 = loss_and_grads(re.make_method("siren", beta=0.5, anchor_value=0.2), leaves)
    assert g16["logits"].dtype == torch.bfloat16 and torch.isfinite(g16["logits"].float()).all()
    assert out16.loss.item() == pytest.approx(out32.loss.item(), abs=2e-2)


def test_config_defaults_and_errors():
    c = SirenConfig()
    assert (c.beta, c.top_p, c.top_k, c.inclusive, c.quantile, c.anchor_value) == (0.005, 0.8, 10000, False, 0.8,
                                                                                    None)
    assert (c.eps_low, c.eps_high, c.dual_clip, c.loss_agg_mode, c.norm_length) == (
        0.2, 0.2, 3.0, "seq-mean-token-sum-norm", 3072)
    assert (c.use_anchor, c.use_top_p, c.use_peak_mask) == (True, True, True)
    for bad, field in ((dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(beta=-1.0), "beta"),
                       (dict(top_k=0), "top_k"), (dict(quantile=1.2), "quantile"),
                       (dict(anchor_value=float("nan")), "anchor_value"), (dict(use_anchor=1), "use_anchor")):
        with pytest.raises(ValueError, match=field):
            re.make_method("siren", **bad)
    leaves, _ = make_leaves(seed=9)
    with pytest.raises(ValueError, match="logits"):
        re.make_method("siren").compute_loss(batch_from(leaves, logits=None))
