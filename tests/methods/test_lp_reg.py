"""lp_reg: hand-derived cases (proxy mass, penalty, selection rules), a reference of the official algorithm written
from the spec with plain loops over softmax probabilities and token ids, properties (gradient only through
log_prob, chunking, relation to grpo), and the global scope through a fake all-gather."""
from __future__ import annotations

import math

import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy import TokenBatch
from rlvr_entropy.methods.lp_reg import lp_reg_count, lp_reg_penalty, proxy_log_mass
from tests.helpers import batch_from, loss_and_grads, make_leaves
from tests.methods._world import FakeWorld

PROBS = [0.6, 0.3, 0.09, 0.01]


def batch_of(tokens, adv=-1.0, probs=PROBS, log_r=0.0):
    """One response; every position has the distribution ``probs``; ``tokens`` are the sampled ids."""
    T = len(tokens)
    logits = torch.tensor(probs, dtype=torch.float64).log().expand(1, T, len(probs)).contiguous()
    lp = torch.log(torch.tensor([[probs[i] for i in tokens]], dtype=torch.float64)).requires_grad_(True)
    return TokenBatch(log_prob=lp, old_log_prob=lp.detach() - log_r,
                      advantages=torch.tensor([adv], dtype=torch.float64), mask=torch.ones(1, T, dtype=torch.bool),
                      logits=logits)


def run(batch, **cfg):
    out = re.make_method("lp_reg", **cfg).compute_loss(batch)
    (g,) = torch.autograd.grad(out.loss, batch.log_prob)
    return out, g


# --------------------------------------------------------------------------------------------- hand-derived
def test_proxy_mass_by_hand():
    z = torch.tensor(PROBS, dtype=torch.float64).log()
    # kappa 0.1: keep pi >= 0.06 -> 0.6 + 0.3 + 0.09 = 0.99; kappa 0.4: keep >= 0.24 -> 0.9; kappa 0.02: >= 0.012
    for kappa, mass in ((0.1, 0.99), (0.4, 0.9), (0.02, 0.99)):
        log_z, log_max = proxy_log_mass(z, kappa)
        assert log_z.exp().item() == pytest.approx(mass, rel=1e-12)
        assert log_max.exp().item() == pytest.approx(0.6, rel=1e-12)
    # [..., V] shapes, masked positions skipped (NaN there does not leak; they get Z = 1, max pi = 1)
    zz = torch.stack([z, torch.full_like(z, float("nan"))])[None]             # [1, 2, V]
    log_z, log_max = proxy_log_mass(zz, 0.4, mask=torch.tensor([[True, False]]))
    assert log_z.shape == (1, 2) and log_z[0, 1].item() == 0.0 and log_max[0, 1].item() == 0.0
    assert log_z[0, 0].exp().item() == pytest.approx(0.9)


def test_count_by_hand():
    # k = max(1, int(rho n)); applied only when k >= min_tokens (2 in the official code); rho = 0 or n = 0: none
    assert [lp_reg_count(0.01, n) for n in (150, 199, 200, 450)] == [0, 0, 2, 4]
    assert lp_reg_count(0.01, 150, min_tokens=1) == 1
    assert lp_reg_count(0.0, 10_000) == 0 and lp_reg_count(0.5, 0) == 0


def test_penalty_by_hand():
    # sampled ids 2 (pi 0.09, kept by the proxy at kappa 0.1) and 3 (pi 0.01 < 0.06: dropped); A = -1, r = 1
    # rho = 1: k = 2 -> both are candidates; only token 0 has pi < pi_proxy = 0.09 / 0.99
    out, g = run(batch_of([2, 3]), kappa=0.1, rho=1.0, beta=1.0)
    rho = 1 / 0.99
    k3 = rho - 1 - math.log(rho)                                             # 5.0675e-5
    # token 0: -A r + k3 = 1 + k3; token 1: PPO, -A r = 1; token-mean over 2
    assert out.loss.item() == pytest.approx((2 + k3) / 2, rel=1e-12)
    # d/dlog pi: token 0: 1 + (1 - rho); token 1: 1
    torch.testing.assert_close(g, torch.tensor([[(1 + 1 - rho) / 2, 0.5]], dtype=torch.float64))
    m = out.metrics
    assert (m["lp_reg/candidate_frac"].item(), m["lp_reg/protected_frac"].item()) == (1.0, 0.5)
    assert m["lp_reg/kl_mean"].item() == pytest.approx(k3, rel=1e-9)
    assert m["lp_reg/proxy_mass"].item() == pytest.approx(0.99)


def test_penalty_function_by_hand():
    lp = torch.tensor([[math.log(0.09), -1.0]], dtype=torch.float64, requires_grad=True)
    log_proxy = torch.tensor([[math.log(0.09 / 0.5), -0.5]], dtype=torch.float64)
    protected = torch.tensor([[True, False]])
    k3 = lp_reg_penalty(lp, log_proxy, protected, kl_clamp=None)
    # log rho = log(1 / 0.5) = ln 2 -> rho - 1 - log rho = 1 - ln 2; unprotected: 0
    torch.testing.assert_close(k3, torch.tensor([[1 - math.log(2), 0.0]], dtype=torch.float64))
    (g,) = torch.autograd.grad(k3.sum(), lp)
    assert g[0].tolist() == pytest.approx([1 - 2.0, 0.0])                      # 1 - rho
    assert lp_reg_penalty(lp, log_proxy, protected, kl_clamp=0.1)[0, 0].item() == pytest.approx(0.1)


def test_small_batches_need_min_tokens():
    # ids 2 (0.09) and 1 (0.3), rho 0.5: k = max(1, int(1)) = 1 < 2: the official code regularizes nothing
    out, _ = run(batch_of([2, 1]), kappa=0.1, rho=0.5)
    assert out.metrics["lp_reg/candidate_frac"].item() == 0.0 and out.loss.item() == pytest.approx(1.0)
    # min_tokens = 1: the lowest-probability negative token (id 2, kept) is protected
    out, _ = run(batch_of([2, 1]), kappa=0.1, rho=0.5, min_tokens=1)
    assert out.metrics["lp_reg/protected_frac"].item() == 0.5
    # the lowest one is noise (id 3, dropped by the proxy): a candidate, but not protected
    out, _ = run(batch_of([3, 1]), kappa=0.1, rho=0.5, min_tokens=1)
    assert out.metrics["lp_reg/candidate_frac"].item() == 0.5 and out.metrics["lp_reg/protected_frac"].item() == 0


def test_positive_advantages_and_full_proxy_are_not_protected():
    out, _ = run(batch_of([2, 2], adv=1.0), kappa=0.1, rho=1.0)              # A > 0
    assert out.metrics["lp_reg/candidate_frac"].item() == 0.0
    out, _ = run(batch_of([2, 2], probs=[0.5, 0.3, 0.2]), kappa=0.1, rho=1.0)  # nothing dropped: Z = 1
    assert out.metrics["lp_reg/candidate_frac"].item() == 1.0 and out.metrics["lp_reg/protected_frac"].item() == 0


def test_protected_tokens_lose_the_ppo_clip_like_the_official_code():
    # r = 0.5 < 0.8 with A = -1: PPO clips (value 0.8, no gradient); protected tokens use -A r = 0.5 unclipped
    out, g = run(batch_of([2, 2], log_r=math.log(0.5)), kappa=0.1, rho=1.0)
    rho = 1 / 0.99
    k3 = rho - 1 - math.log(rho)
    assert out.loss.item() == pytest.approx(0.5 + k3, rel=1e-12)
    torch.testing.assert_close(g, torch.full((1, 2), (0.5 + 1 - rho) / 2, dtype=torch.float64))
    # beta = 0 is therefore not grpo off-policy (rho = 0 is the neutral setting)
    b0, _ = run(batch_of([2, 2], log_r=math.log(0.5)), kappa=0.1, rho=1.0, beta=0.0)
    n0, _ = run(batch_of([2, 2], log_r=math.log(0.5)), kappa=0.1, rho=0.0)
    assert b0.loss.item() == pytest.approx(0.5) and n0.loss.item() == pytest.approx(0.8)


def test_k3_is_clamped_at_10_like_the_official_code():
    # max logit 0, sampled token at 0.5 x max (kept), 2000 tokens at 0.019 x max (dropped at kappa 0.02):
    # Z = 1.5 / (1.5 + 38) = 0.038, log rho = 3.27, k3 = 1 / Z - 1 - log rho = 22.1 > 10
    probs = [1.0, 0.5] + [0.019] * 2000
    s = sum(probs)
    probs = [p / s for p in probs]
    z = 1.5 / 39.5
    k3 = 1 / z - 1 + math.log(z)
    out, g = run(batch_of([1, 1], probs=probs), rho=1.0)
    assert out.loss.item() == pytest.approx(1.0 + 10.0, rel=1e-9)           # PG 1 + clamped k3
    assert g[0].tolist() == pytest.approx([0.5, 0.5])                          # the clamp stops the gradient
    out, g = run(batch_of([1, 1], probs=probs), rho=1.0, kl_clamp=None)
    assert out.loss.item() == pytest.approx(1.0 + k3, rel=1e-9)
    assert g[0].tolist() == pytest.approx([(1 + 1 - 1 / z) / 2] * 2, rel=1e-9)


# ------------------------------------------------------------------------------------------ loop reference
def reference_lp_reg(leaves, tokens, kappa, rho, beta, eps=0.2, kl_clamp=10.0):
    """The official algorithm from the spec: probabilities by softmax, token ids, Python sorting and loops."""
    logits = leaves["logits"].detach()
    lp, old, msk = leaves["log_prob"], leaves["old_log_prob"], leaves["mask"]
    adv = leaves["advantages"]
    B, T = msk.shape
    valid = [(i, t) for i in range(B) for t in range(T) if msk[i, t]]
    neg = [v for v in valid if float(adv[v[0]]) < 0]
    k = max(1, int(rho * len(neg)))
    cand = set(sorted(neg, key=lambda v: float(lp[v].detach()))[:k]) if k >= 2 else set()
    total, protected = 0.0, 0
    for i, t in valid:
        p = torch.softmax(logits[i, t], -1)
        keep = p >= kappa * p.max()
        z = float((p * keep).sum())
        tok = int(tokens[i, t])
        log_proxy = math.log(float(p[tok]) / z) if keep[tok] else -math.inf
        a = adv[i]
        r = torch.exp(lp[i, t] - old[i, t])
        if (i, t) in cand and float(lp[i, t].detach()) < log_proxy:
            protected += 1
            log_rho = log_proxy - lp[i, t]
            k3 = torch.clamp(torch.exp(log_rho) - log_rho - 1, max=kl_clamp)
            total = total + (-a * r + beta * k3)
        else:
            total = total + torch.maximum(-a * r, -a * torch.clamp(r, 1 - eps, 1 + eps))
    return total / len(valid), protected


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_matches_loop_reference(seed):
    leaves, tokens = make_leaves(seed=seed, B=6, T=8, V=7, scale=1.5)
    out, grads = loss_and_grads(re.make_method("lp_reg", kappa=0.1, rho=0.3, beta=0.7), leaves)
    ref, n_protected = reference_lp_reg(leaves, tokens, 0.1, 0.3, 0.7)
    (g_ref,) = torch.autograd.grad(ref, leaves["log_prob"])
    assert n_protected >= 1
    assert out.metrics["lp_reg/protected_frac"].item() == pytest.approx(n_protected / int(leaves["mask"].sum()))
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["log_prob"], g_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(grads["logits"], torch.zeros_like(grads["logits"]))  # the proxy is detached


# ---------------------------------------------------------------------------------------------- properties
def test_on_policy_beta_zero_is_grpo_and_rho_zero_always_is():
    leaves, _ = make_leaves(seed=8, B=6, T=8, V=7, scale=1.5)
    on = dict(leaves, old_log_prob=leaves["log_prob"].detach())
    for lv, cfg in ((on, dict(beta=0.0, rho=0.3, kappa=0.1)), (leaves, dict(rho=0.0, kappa=0.1))):
        out, g = loss_and_grads(re.make_method("lp_reg", **cfg), lv)
        ref, gr = loss_and_grads(re.make_method("grpo"), lv)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g["log_prob"], gr["log_prob"], rtol=1e-12, atol=1e-14)
    out, _ = loss_and_grads(re.make_method("lp_reg", beta=0.0, rho=0.3, kappa=0.1), on)
    assert out.metrics["lp_reg/protected_frac"] > 0  # the comparison above was not vacuous


def test_chunking_and_half_precision_do_not_change_the_proxy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 3
    mask = torch.rand(3, 5, generator=g) > 0.3
    a = proxy_log_mass(logits, 0.02, mask=mask)
    b = proxy_log_mass(logits, 0.02, mask=mask, chunk_size=1)
    c = proxy_log_mass(logits.double(), 0.02, mask=mask)
    for x, y, w in zip(a, b, c):
        assert torch.equal(x, y) and not x.requires_grad
        torch.testing.assert_close(x.double(), w, rtol=1e-5, atol=1e-6)
    h = proxy_log_mass(logits.to(torch.bfloat16), 0.02, mask=mask)[0]
    assert h.dtype == torch.float32 and torch.isfinite(h).all()


def test_config_errors():
    for kw, field in ((dict(kappa=0.0), "kappa"), (dict(rho=1.5), "rho"), (dict(beta=-1.0), "beta"),
                      (dict(kl_clamp=0.0), "kl_clamp"), (dict(min_tokens=0), "min_tokens"),
                      (dict(scope="batch"), "scope")):
        with pytest.raises(ValueError, match=field):
            re.make_method("lp_reg", **kw)
    leaves, _ = make_leaves(seed=0)
    with pytest.raises(ValueError, match="logits"):
        re.make_method("lp_reg").compute_loss(batch_from(leaves, logits=None))


# --------------------------------------------------------------------------------------------- global scope
@pytest.mark.parametrize("ranges", [[(0, 4), (4, 8)], [(0, 3), (3, 5), (5, 8)]])
def test_global_scope_selects_what_the_concatenated_batch_selects(ranges):
    leaves, _ = make_leaves(seed=10, B=8, T=8, V=7, scale=1.5)
    if len(ranges) == 3:
        leaves["mask"][3:5] = False
    kw = dict(kappa=0.1, rho=0.2, loss_agg_mode="token-sum")
    full, g_full = loss_and_grads(re.make_method("lp_reg", **kw), leaves)
    world = FakeWorld(len(ranges))

    def rank_fn(r, scope):
        a, b = ranges[r]
        part = {k: (v[a:b] if isinstance(v, torch.Tensor) else v) for k, v in leaves.items()}
        part = {k: (v.detach().clone().requires_grad_(True) if k in ("log_prob", "logits", "entropy") else v)
                for k, v in part.items()}
        m = re.make_method("lp_reg", scope=scope, **kw)
        m.gather_fn = world.gather_fn(r)
        return loss_and_grads(m, part)

    outs = world.run([lambda r=r: rank_fn(r, "global") for r in range(len(ranges))])
    torch.testing.assert_close(sum(o.loss for o, _ in outs), full.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([g["log_prob"] for _, g in outs]), g_full["log_prob"], rtol=1e-12,
                               atol=1e-14)
    assert full.metrics["lp_reg/protected_frac"] > 0
    local = world.run([lambda r=r: rank_fn(r, "micro_batch") for r in range(len(ranges))])
    assert not torch.equal(torch.cat([g["log_prob"] for _, g in local]), g_full["log_prob"])


def test_half_precision_log_probs_and_logits():
    leaves, _ = make_leaves(seed=8, B=6, T=8, V=7, scale=1.5)
    half = dict(leaves)
    for k in ("log_prob", "logits"):
        half[k] = leaves[k].detach().to(torch.bfloat16).requires_grad_(True)
    half["old_log_prob"] = leaves["old_log_prob"].to(torch.bfloat16)
    out, g = loss_and_grads(re.make_method("lp_reg", kappa=0.1, rho=0.3), half)
    ref, _ = loss_and_grads(re.make_method("lp_reg", kappa=0.1, rho=0.3), leaves)
    assert out.metrics["lp_reg/protected_frac"] > 0 and torch.isfinite(g["log_prob"]).all()
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=2e-3)  # bf16: ~3 significant digits per token
