"""forking_tokens: hand cases, parity with TRL 1.16's own get_high_entropy_mask and with TRL's loss formula
(written out here), a loop reference for both scopes, the sort-based quantile against torch.quantile, and the
global scope through gather_fn."""
from __future__ import annotations

import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.methods.forking_tokens import (entropy_threshold, high_entropy_mask, linear_quantile,
                                                 row_linear_quantile)
from tests.helpers import batch_from, loss_and_grads, make_leaves


def ref_quantile(xs, q):
    """Linear-interpolation quantile by hand: position q (n - 1) in the sorted values."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ref_keep(h, m, q, scope):
    """bool [B, T] by hand: valid and H >= tau (tau over the batch or over the row)."""
    B, T = m.shape
    keep = torch.zeros(B, T, dtype=torch.bool)
    if scope == "batch":
        vals = [float(h[i, t]) for i in range(B) for t in range(T) if m[i, t]]
        if not vals:
            return keep
        taus = [ref_quantile(vals, q)] * B
    else:
        taus = [ref_quantile([float(h[i, t]) for t in range(T) if m[i, t]], q) if m[i].any() else None
                for i in range(B)]
    for i in range(B):
        for t in range(T):
            keep[i, t] = bool(m[i, t]) and float(h[i, t]) >= taus[i] - 1e-12
    return keep


def ref_loss(leaves, keep, mode="token-mean", eps=0.2):
    """sum over kept tokens of the PPO token loss, divided like the aggregation over ALL valid tokens."""
    lp, old, adv, m = leaves["log_prob"], leaves["old_log_prob"], leaves["advantages"], leaves["mask"]
    B, T = m.shape
    rows = []
    for i in range(B):
        row = []
        for t in range(T):
            if not m[i, t]:
                continue
            r = torch.exp(lp[i, t] - old[i, t])
            lt = torch.maximum(-adv[i] * r, -adv[i] * torch.clamp(r, 1 - eps, 1 + eps))
            row.append(lt if keep[i, t] else lt * 0)
        rows.append(row)
    if mode == "token-mean":
        flat = [x for r in rows for x in r]
        return sum(flat) / len(flat)
    rows = [r for r in rows if r]
    return sum(sum(r) / len(r) for r in rows) / len(rows)


# ------------------------------------------------------------------------------------------- hand-derived
def test_hand_masks_both_scopes():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    m = torch.ones(2, 4, dtype=torch.bool)
    # batch: q0.75 of 1..8: position 0.75 * 7 = 5.25 -> 6 + 0.25 * (7 - 6) = 6.25 -> keep 7, 8
    assert entropy_threshold(h, m, 0.75).item() == pytest.approx(6.25)
    assert high_entropy_mask(h, m, 0.75).tolist() == [[False] * 4, [False, False, True, True]]
    # response: row 1..4: position 2.25 -> 3.25 -> keep 4; row 5..8 -> 7.25 -> keep 8
    assert entropy_threshold(h, m, 0.75, "response").tolist() == pytest.approx([3.25, 7.25])
    assert high_entropy_mask(h, m, 0.75, "response").tolist() == [[False, False, False, True],
                                                                 [False, False, False, True]]
    # nothing valid: nothing kept (and a NaN threshold, never compared True)
    assert high_entropy_mask(h, torch.zeros_like(m), 0.75).sum() == 0
    assert high_entropy_mask(h, torch.zeros_like(m), 0.75, "response").sum() == 0


def test_hand_ties_are_kept_and_padding_is_ignored():
    # valid H = [1, 2, 2, 2] (the NaN is padding): q0.5 -> position 1.5 -> 2 + 0.5 * (2 - 2) = 2; ties at tau kept
    h = torch.tensor([[1.0, 2.0, 2.0, 2.0, float("nan")]])
    m = torch.tensor([[True, True, True, True, False]])
    assert high_entropy_mask(h, m, 0.5).tolist() == [[False, True, True, True, False]]
    # q = 1: tau = max -> only the maxima; q = 0: tau = min -> every valid token
    assert high_entropy_mask(h, m, 1.0).tolist() == [[False, True, True, True, False]]
    assert high_entropy_mask(h, m, 0.0).tolist() == [[True, True, True, True, False]]


def test_hand_loss_keeps_all_token_denominator():
    # 4 valid tokens on-policy (r = 1), A = 1, H = [0.1, 0.2, 0.3, 0.9]; q0.8 -> position 2.4 -> 0.3 + 0.4 * 0.6
    # = 0.54 -> only the last token kept. token-mean L = -1 / 4 (not -1 / 1); gradient -1/4 there, 0 elsewhere.
    lp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    b = re.TokenBatch(log_prob=lp, old_log_prob=torch.zeros(1, 4, dtype=torch.float64),
                      advantages=torch.ones(1, dtype=torch.float64), mask=torch.ones(1, 4, dtype=torch.bool),
                      entropy=torch.tensor([[0.1, 0.2, 0.3, 0.9]], dtype=torch.float64))
    out = re.make_method("forking_tokens").compute_loss(b)
    assert out.loss.item() == pytest.approx(-0.25, abs=1e-15)
    (g,) = torch.autograd.grad(out.loss, lp)
    assert g.tolist() == [[0.0, 0.0, 0.0, -0.25]]
    assert out.metrics["forking_tokens/threshold"].item() == pytest.approx(0.54)
    assert out.metrics["forking_tokens/kept_frac"].item() == pytest.approx(0.25)


# ------------------------------------------------------------------------------------- quantile arithmetic
def test_sort_quantile_equals_torch_quantile():
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.float64):
        for trial in range(300):
            n = int(torch.randint(1, 200, (1,), generator=g))
            v = torch.rand(n, generator=g, dtype=dt) * 5
            if trial % 3 == 0:
                v = torch.round(v * 2) / 2  # many ties
            q = [0.0, 0.2, 0.5, 0.8, 1.0][trial % 5] if trial % 2 else float(torch.rand(1, generator=g))
            assert torch.equal(linear_quantile(v, q), torch.quantile(v, q))
            B = 1 + trial % 4
            x = torch.rand(B, n, generator=g, dtype=dt)
            msk = torch.rand(B, n, generator=g) > 0.3
            ours = row_linear_quantile(x, msk, q)
            theirs = torch.nanquantile(torch.where(msk, x, torch.full_like(x, float("nan"))), q, dim=-1)
            assert torch.equal(ours.isnan(), theirs.isnan())
            assert torch.equal(ours[~ours.isnan()], theirs[~theirs.isnan()])


def test_no_size_limit():
    # torch.quantile refuses more than 2^24 values; a gathered batch can have more
    v = torch.arange(2 ** 24 + 11, dtype=torch.float32).flip(0)
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(v, 0.8)
    n = v.numel()
    assert linear_quantile(v, 0.5).item() == pytest.approx((n - 1) / 2)


# ------------------------------------------------------------------------------------------ TRL 1.16 parity
def _trl_mask():
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    class _Acc:  # a single process: pad_across_processes and gather are the identity
        def gather(self, x):
            return x

        def pad_across_processes(self, x, dim=0, pad_index=0):
            return x

    class _Fake:
        accelerator = _Acc()

    def call(h, m, threshold):
        try:
            return GRPOTrainer.get_high_entropy_mask(_Fake(), h, m, threshold)
        except Exception as e:  # pragma: no cover - TRL internals changed
            pytest.skip(f"TRL's get_high_entropy_mask is not callable standalone: {e}")
    return call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_trl_get_high_entropy_mask(dtype):
    trl_mask = _trl_mask()
    g = torch.Generator().manual_seed(0)
    n_differ = [0]
    for trial in range(40):
        B, T = 1 + trial % 5, 1 + (trial * 7) % 13
        h32 = torch.rand(B, T, generator=g) * 3
        if trial % 4 == 0:
            h32 = torch.round(h32 * 2) / 2  # ties, also at tau
        h = h32.to(dtype)  # float64 values representable in float32 (TRL rounds to float32 before the quantile)
        m = torch.rand(B, T, generator=g) > 0.3
        for top in (0.2, 0.5, 1.0 / 3.0, 0.05):  # TRL's top_entropy_quantile; its threshold is 1 - top
            theirs = trl_mask(h, m.long(), 1 - top).bool()
            ours = high_entropy_mask(h, m, 1 - top)
            if dtype != torch.float64:
                assert torch.equal(ours, theirs), (trial, top)
            else:
                # TRL rounds float64 entropies to float32 for the quantile: the masks may differ only at tokens
                # within float32 rounding of tau (documented deviation); count that it happens at most there
                tau = entropy_threshold(h, m, 1 - top)
                differ = ours ^ theirs
                near = (h - tau).abs() <= 1e-6 * max(1.0, abs(float(tau)))
                assert not (differ & ~near).any(), (trial, top)
                n_differ[0] += int(differ.sum())
    if dtype == torch.float64:
        assert n_differ[0] < 10  # rare: only when tau lands on a token


def test_loss_matches_trl_formula():
    # TRL: per_token_loss = ppo_loss * entropy_mask, then "bnpo": (per_token_loss * mask).sum() / mask.sum(),
    # "grpo": ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    trl_mask = _trl_mask()
    leaves, _ = make_leaves(seed=11, dtype=torch.float32)
    msk = leaves["mask"]
    lp, old, adv = leaves["log_prob"], leaves["old_log_prob"], leaves["advantages"][:, None]
    ent = leaves["entropy"].detach()
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 0.8, 1.2)
    ptl = -torch.min(coef_1 * adv, coef_2 * adv) * trl_mask(ent, msk.long(), 0.8)
    bnpo = (ptl * msk).sum() / msk.sum().clamp(min=1.0)
    grpo = ((ptl * msk).sum(-1) / msk.sum(-1).clamp(min=1.0)).mean()  # every row non-empty in make_leaves
    for mode, theirs in (("token-mean", bnpo), ("seq-mean-token-mean", grpo)):
        out, grads = loss_and_grads(re.make_method("forking_tokens", loss_agg_mode=mode), leaves)
        torch.testing.assert_close(out.loss, theirs, rtol=1e-6, atol=1e-7)
        (g_ref,) = torch.autograd.grad(theirs, lp, retain_graph=True)
        torch.testing.assert_close(grads["log_prob"], g_ref, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------- parity with reference
@pytest.mark.parametrize("scope", ["batch", "response"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("q", [0.8, 0.5, 1.0])
def test_matches_reference(scope, mode, q):
    leaves, _ = make_leaves(seed=2)
    out, grads = loss_and_grads(re.make_method("forking_tokens", quantile=q, scope=scope, loss_agg_mode=mode), leaves)
    keep = ref_keep(leaves["entropy"].detach(), leaves["mask"], q, scope)
    assert torch.equal(high_entropy_mask(leaves["entropy"], leaves["mask"], q, scope), keep)
    ref = ref_loss(leaves, keep, mode)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-13)
    (g_ref,) = torch.autograd.grad(ref, leaves["log_prob"])
    torch.testing.assert_close(grads["log_prob"], g_ref, rtol=1e-10, atol=1e-14)
    dropped = leaves["mask"] & ~keep
    assert dropped.any() or q == 0.0
    assert torch.equal(grads["log_prob"][dropped], torch.zeros_like(grads["log_prob"][dropped]))
    assert grads["entropy"].abs().sum() == 0 and grads["logits"].abs().sum() == 0  # selection is detached


def test_response_scope_keeps_tokens_in_every_response():
    # per response, each non-empty row keeps at least its maximum; per batch a low-entropy row can lose all
    h = torch.tensor([[0.1, 0.2, 0.3], [2.0, 3.0, 4.0]])
    m = torch.ones(2, 3, dtype=torch.bool)
    assert high_entropy_mask(h, m, 0.8, "batch")[0].sum() == 0
    assert (high_entropy_mask(h, m, 0.8, "response").sum(-1) >= 1).all()


def test_entropy_from_logits_and_metrics():
    leaves, _ = make_leaves(seed=3)
    a = re.make_method("forking_tokens").compute_loss(batch_from(leaves, entropy=None))
    b = re.make_method("forking_tokens").compute_loss(batch_from(leaves))
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-13)
    kept = b.metrics["forking_tokens/kept_frac"].item()
    n = int(leaves["mask"].sum())
    assert kept == pytest.approx(math.ceil(0.2 * (n - 1) + 1e-9) / n, abs=1.5 / n)  # about the top 20%


# ----------------------------------------------------------------------------------------------- global scope
def test_global_scope_through_gather():
    leaves, _ = make_leaves(seed=4, B=4)
    h = leaves["entropy"].detach()
    msk = leaves["mask"]
    full = high_entropy_mask(h, msk, 0.8)
    halves = []
    for sl, other in ((slice(0, 2), slice(2, 4)), (slice(2, 4), slice(0, 2))):
        def gather(x, other=other):  # all-gather of this rank's valid entropies with the other rank's
            return torch.cat([x, h[other][msk[other]].to(x.dtype)])
        halves.append(high_entropy_mask(h[sl], msk[sl], 0.8, "batch", gather))
        m = re.make_method("forking_tokens")
        m.gather_fn = gather
        out = m.compute_loss(re.TokenBatch(log_prob=leaves["log_prob"][sl], old_log_prob=leaves["old_log_prob"][sl],
                                           advantages=leaves["advantages"][sl], mask=msk[sl], entropy=h[sl]))
        assert out.metrics["forking_tokens/threshold"].item() == pytest.approx(
            entropy_threshold(h, msk, 0.8).item(), rel=1e-12)
    assert torch.equal(torch.cat(halves), full)
    # without gather_fn each half uses its own quantile: a different selection on this batch
    local = torch.cat([high_entropy_mask(h[s], msk[s], 0.8) for s in (slice(0, 2), slice(2, 4))])
    assert not torch.equal(local, full)


def test_config_errors():
    with pytest.raises(ValueError, match="quantile"):
        re.make_method("forking_tokens", quantile=1.2)
    with pytest.raises(ValueError, match="scope"):
        re.make_method("forking_tokens", scope="global")
    with pytest.raises(ValueError, match="scope"):
        high_entropy_mask(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), 0.8, "rows")
