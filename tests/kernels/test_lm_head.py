"""rlvr_entropy.kernels: the tiled LM-head pass equals the unfused statistics on materialized logits."""
from __future__ import annotations

import math

import pytest
import torch

from rlvr_entropy import TokenBatch, kernels, stats
from rlvr_entropy.kernels import LMHeadSource, Stat, lm_head_stats

ALL = (Stat.log_prob(), Stat.entropy(), Stat.top_p_entropy(0.8, 6), Stat.top_p_entropy(0.5, None, True),
       Stat.change_terms(), Stat.proxy_log_mass(0.1), Stat.clamped_entropy(0.3))
GRAD = [r for r in ALL if r.differentiable]


def _inputs(N=11, H=4, V=19, dtype=torch.float64, seed=0, scale=1.5, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)
    W = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    b = (0.3 * torch.randn(V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True) if bias else None
    ids = torch.randint(0, V, (N,), generator=g)
    return h, W, b, ids


def _logits(h, W, b, temp):
    z = h @ W.T
    return (z if b is None else z + b) / temp


def _weighted(outs, reqs, wts):
    return sum((w * outs[r]).sum() for r, w in zip(reqs, wts))


@pytest.mark.parametrize("tile,temp,bias", [(3, 0.7, True), (100, 1.0, False), (1, 1.3, True)])
def test_values_and_gradients_equal_unfused_float64(tile, temp, bias):
    h, W, b, ids = _inputs(bias=bias)
    out = lm_head_stats(h, W, b, ids, ALL, temperature=temp, tile_size=tile)
    z = _logits(h, W, b, temp)
    for r in ALL:
        ref = stats.compute_stat(z, r, token_ids=ids)
        got = out[r]
        for x, y in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
            assert x.dtype == torch.float64 and x.shape == (11,)
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=r.kind)
    wts = torch.randn(len(GRAD), 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = tuple(p for p in (h, W, b) if p is not None)
    got = torch.autograd.grad(_weighted(out, GRAD, wts), params)
    ref = torch.autograd.grad(_weighted({r: stats.compute_stat(z, r, token_ids=ids) for r in GRAD}, GRAD, wts),
                              params)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    h, W, b, ids = _inputs(N=5, H=2, V=11, seed=3)
    wts = torch.randn(len(GRAD), 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def f(h, W, b):
        return _weighted(lm_head_stats(h, W, b, ids, GRAD, temperature=0.9, tile_size=2), GRAD, wts)

    assert torch.autograd.gradcheck(f, (h, W, b), eps=1e-6, atol=1e-6, rtol=1e-4)


def _zipf_inputs(N, H, V, seed):
    """Logits -s log(rank) + noise through a rank feature: nuclei of a few to hundreds of tokens, like an LLM."""
    g = torch.Generator().manual_seed(seed)
    W = torch.empty(V, H)
    W[:, 0] = -torch.log1p(torch.randperm(V, generator=g).float())
    W[:, 1:] = torch.randn(V, H - 1, generator=g) * (0.6 / math.sqrt(H - 1))
    h = torch.randn(N, H, generator=g)
    h[:, 0] = 1.1 + 1.4 * torch.rand(N, generator=g)
    return h.requires_grad_(True), W.requires_grad_(True), torch.randint(0, V, (N,), generator=g)


def test_float32_real_vocabulary():
    """V = 151,936, float32, a few rows: values and gradients agree with the unfused functions on the
    materialized logits (the nucleus and the sampled-token terms included)."""
    V, H, N = 151_936, 16, 24
    h, W, ids = _zipf_inputs(N, H, V, seed=5)
    with torch.no_grad():
        ids[:8] = (h[:8] @ W.T).argmax(-1)  # some likely tokens too
    reqs = (Stat.log_prob(), Stat.entropy(), Stat.top_p_entropy(0.8, 10000), Stat.change_terms(),
            Stat.proxy_log_mass(0.02))
    out = lm_head_stats(h, W, None, ids, reqs, temperature=1.0, tile_size=10)
    z = h @ W.T
    n_sizes = stats.nucleus_size(z.detach(), 0.8, 10000)
    assert int(n_sizes.max()) > 20 and int(n_sizes.min()) <= 3  # a realistic mix of nucleus sizes
    for r in reqs:
        ref = stats.compute_stat(z, r, token_ids=ids)
        got = out[r]
        for x, y in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
            assert x.dtype == torch.float32
            torch.testing.assert_close(x, y, rtol=1e-4, atol=2e-5, msg=r.kind)
    grad_reqs = reqs[:3]
    wts = torch.randn(3, N, generator=torch.Generator().manual_seed(0))
    got = torch.autograd.grad(_weighted(out, grad_reqs, wts), (h, W))
    ref = torch.autograd.grad(_weighted({r: stats.compute_stat(z, r, token_ids=ids) for r in grad_reqs},
                                        grad_reqs, wts), (h, W))
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5 * float(y.abs().max()))


def test_nothing_of_size_n_times_v_is_saved():
    N, H, V = 64, 3, 97
    h, W, b, ids = _inputs(N=N, H=H, V=V)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_head_stats(h, W, b, ids, ALL, tile_size=8)
    assert max(sizes) <= max(N * H, V * H)  # the inputs themselves, and per-position scalars


def test_bf16_inputs_give_float32_values_and_input_dtype_gradients():
    h, W, b, ids = _inputs(dtype=torch.bfloat16)
    out = lm_head_stats(h, W, b, ids, (Stat.log_prob(), Stat.top_p_entropy(0.8)), tile_size=4)
    z = _logits(h.detach().float(), W.detach().float(), b.detach().float(), 1.0)  # float32 logits of bf16 weights
    torch.testing.assert_close(out[Stat.log_prob()], stats.compute_stat(z, Stat.log_prob(), token_ids=ids))
    assert out[Stat.log_prob()].dtype == torch.float32
    gh, gw, gb = torch.autograd.grad(out[Stat.log_prob()].sum() + out[Stat.top_p_entropy(0.8)].sum(), (h, W, b))
    assert (gh.dtype, gw.dtype, gb.dtype) == (torch.bfloat16,) * 3
    assert torch.isfinite(gw.float()).all() and float(gw.float().abs().sum()) > 0


def test_source_masks_caches_and_counts_passes():
    B, T, H, V = 3, 5, 4, 17
    g = torch.Generator().manual_seed(4)
    hid = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None] < torch.tensor([5, 2, 0])[:, None]
    hid[~mask] = float("nan")  # padding may hold anything
    hid.requires_grad_(True)
    W = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[~mask] = -5  # never read at padding
    src = LMHeadSource(hid, W, token_ids=ids, mask=mask, temperature=0.8, tile_size=2)
    src.prefetch(Stat.log_prob(), Stat.entropy(), Stat.top_p_entropy(0.9, 4))
    assert src.passes == 1 and src.entropy() is src.get(Stat.entropy())
    lp = src.log_prob()
    assert lp.shape == (B, T) and torch.equal(lp[~mask], torch.zeros_like(lp[~mask]))
    z = torch.where(mask[..., None], hid, 0.0) @ W.T / 0.8
    torch.testing.assert_close(lp, stats.compute_stat(z, Stat.log_prob(), mask=mask, token_ids=ids.clamp(min=0)))
    h2, s2 = src.change_terms()  # not prefetched: one more pass
    assert src.passes == 2
    torch.testing.assert_close(s2, stats.entropy_change_terms(z, mask)[1])
    gh, = torch.autograd.grad((lp + src.top_p_entropy(0.9, 4)).sum(), (hid,))
    assert torch.equal(gh[~mask], torch.zeros_like(gh[~mask])) and torch.isfinite(gh).all()
    empty = LMHeadSource(hid, W, token_ids=ids, mask=torch.zeros(B, T, dtype=torch.bool))
    e = empty.entropy()
    assert torch.equal(e, torch.zeros(B, T, dtype=torch.float64))
    gh, gw = torch.autograd.grad(e.sum(), (hid, W), allow_unused=True)
    assert gh is None or torch.equal(gh, torch.zeros_like(gh))


def test_validation_names_the_argument():
    h, W, b, ids = _inputs()
    with pytest.raises(ValueError, match="hidden"):
        lm_head_stats(h[0], W, b, ids, ALL)
    bad = h.detach().clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="hidden"):
        lm_head_stats(bad, W, b, ids, ALL)
    with pytest.raises(ValueError, match="weight"):
        lm_head_stats(h, W[:, :2], b, ids, ALL)
    wn = W.detach().clone()
    wn[3, 0] = float("inf")
    with pytest.raises(ValueError, match="weight"):
        lm_head_stats(h, wn, b, ids, ALL)
    with pytest.raises(ValueError, match="bias"):
        lm_head_stats(h, W, b[:-1], ids, ALL)
    with pytest.raises(ValueError, match="bias"):
        lm_head_stats(h, W, torch.full_like(b, float("nan")), ids, ALL)
    with pytest.raises(ValueError, match="token_ids"):
        lm_head_stats(h, W, b, ids + 19, ALL)
    with pytest.raises(ValueError, match="token_ids"):
        lm_head_stats(h, W, b, ids.float(), ALL)
    with pytest.raises(ValueError, match="temperature"):
        lm_head_stats(h, W, b, ids, ALL, temperature=0.0)
    with pytest.raises(ValueError, match="tile_size"):
        lm_head_stats(h, W, b, ids, ALL, tile_size=0)
    with pytest.raises(ValueError, match="requests"):
        lm_head_stats(h, W, b, ids, ["entropy"])
    with pytest.raises(ValueError, match="kind"):
        Stat("varentropy")
    with pytest.raises(ValueError, match="p"):
        Stat.top_p_entropy(1.5)
    with pytest.raises(ValueError, match="kappa"):
        Stat("entropy", kappa=0.1)
    with pytest.raises(ValueError, match="mask"):
        LMHeadSource(h[None], W, token_ids=ids[None], mask=torch.ones(2, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_ids"):
        LMHeadSource(h[None], W, token_ids=ids[None, :5])
    # -inf in the bias (a token removed from the vocabulary) is fine
    b2 = b.detach().clone()
    b2[0] = -math.inf
    out = lm_head_stats(h, W, b2, ids.clamp(min=1), (Stat.entropy(), Stat.change_terms()))
    assert torch.isfinite(out[Stat.entropy()]).all() and torch.isfinite(out[Stat.change_terms()][1]).all()


def _batch_parts(B=2, T=3, H=3, V=11):
    g = torch.Generator().manual_seed(9)
    hid = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    return hid, W, ids


def test_token_batch_contract():
    hid, W, ids = _batch_parts()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    f = kernels.lm_head_batch_fields(hid, W, None, token_ids=ids, mask=mask,
                                     requests=(Stat.top_p_entropy(0.7),))
    base = dict(old_log_prob=f["log_prob"].detach(), advantages=torch.tensor([1.0, -1.0]), mask=mask)
    b = TokenBatch(**f, **base)
    assert b.has_distribution and b.require("logits", "siren") is None  # the need is met by lm_head
    assert b.stat(Stat.top_p_entropy(0.7), "x") is b.stat(Stat.top_p_entropy(0.7), "x")
    assert f["lm_head"].passes == 1
    nb = TokenBatch(log_prob=f["log_prob"], lm_head=f["lm_head"], **base)  # no entropy field: served by lm_head
    torch.testing.assert_close(nb.current_entropy("x"), f["entropy"])
    assert b.with_(advantages=torch.ones(2)).lm_head is f["lm_head"]
    with pytest.raises(ValueError, match="lm_head"):
        TokenBatch(**{**f, "lm_head": "not a source"}, **base)
    with pytest.raises(ValueError, match="outside lm_head.mask"):
        TokenBatch(**f, **{**base, "mask": torch.ones(2, 3, dtype=torch.bool)})
    src4 = LMHeadSource(torch.randn(2, 4, 3, dtype=torch.float64), W, token_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="lm_head must cover"):
        TokenBatch(**{**f, "lm_head": src4}, **base)
    with pytest.raises(ValueError, match="lm_head"):
        TokenBatch(log_prob=f["log_prob"], **base).stat(Stat.entropy(), "siren")
    # logits, when given too, win (methods behave exactly as with logits alone)
    logits = torch.zeros(2, 3, 11, dtype=torch.float64)
    both = TokenBatch(**f, logits=logits, **base)
    torch.testing.assert_close(both.stat(Stat.top_p_entropy(0.7), "x"),
                               stats.compute_stat(logits, Stat.top_p_entropy(0.7), mask=mask))


def test_requests_for_methods():
    import rlvr_entropy as re

    assert kernels.requests_for(re.make_method("grpo")) == ()
    assert kernels.requests_for(re.make_method("siren")) == (Stat.top_p_entropy(0.8, 10000, False),)
    assert kernels.requests_for(re.make_method("siren", use_top_p=False)) == (Stat.entropy(),)
    # the thermostat reads ref_log_prob and the entropy (which every source gives), nothing more of the distribution
    assert kernels.requests_for(re.make_method("thermostat")) == ()
    assert kernels.requests_for(re.make_method("lp_reg", kappa=0.05)) == (Stat.proxy_log_mass(0.05),)
    assert kernels.requests_for(re.make_method("entropy_bonus")) == ()
    assert kernels.requests_for(re.make_method("entropy_bonus", clamp_fraction=0.2)) == (Stat.clamped_entropy(0.2),)


def test_probe_reads_a_source_like_logits():
    from rlvr_entropy.diagnostics import EntropyChangeProbe

    hid, W, ids = _batch_parts(B=3, T=4, V=13)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    coef = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    adv = torch.sign(coef)
    logits = hid @ W.T / 0.9
    hid2 = hid.detach() + 0.05
    records = []
    for route in ("logits", "lm_head"):
        probe = EntropyChangeProbe()
        if route == "logits":
            probe.before(logits, ids, coef, mask, adv)
            records.append(probe.after(hid2 @ W.T / 0.9))
        else:
            probe.before(LMHeadSource(hid, W, token_ids=ids, mask=mask, temperature=0.9), ids, coef, mask, adv)
            records.append(probe.after(LMHeadSource(hid2, W, token_ids=ids, mask=mask, temperature=0.9)))
    a, b = records
    torch.testing.assert_close(b.measured, a.measured)
    for f in a.predicted:
        torch.testing.assert_close(b.predicted[f], a.predicted[f])
    assert torch.equal(a.quadrant, b.quadrant)
    with pytest.raises(ValueError, match="token_ids"):
        EntropyChangeProbe().before(LMHeadSource(hid, W, token_ids=ids, mask=mask), (ids + 1) % 13, coef, mask, adv)
