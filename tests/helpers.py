"""Shared test fixtures: random but consistent token batches."""
from __future__ import annotations

import torch

from rlvr_entropy import TokenBatch, stats


def make_leaves(B=4, T=7, V=13, seed=0, dtype=torch.float64, scale=2.0, mask=None, all_valid=False):
    """Leaf tensors for a batch: logits, log_prob, entropy... each its own leaf so gradients can be checked
    per field. log_prob is consistent with logits at creation (then detached into its own leaf)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * scale
    tokens = torch.multinomial(torch.softmax(logits.reshape(-1, V), -1), 1, generator=g).reshape(B, T)
    logp_all = torch.log_softmax(logits, -1)
    log_prob = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    old_log_prob = log_prob + 0.15 * torch.randn(B, T, generator=g, dtype=dtype)
    ent = stats.entropy(logits)
    old_ent = ent + 0.05 * torch.randn(B, T, generator=g, dtype=dtype).abs()
    rewards = (torch.rand(B, generator=g) < 0.5).to(dtype)
    rewards[0], rewards[1] = 1.0, 0.0
    adv = rewards - rewards.mean()
    if mask is None:
        if all_valid:
            mask = torch.ones(B, T, dtype=torch.bool)
        else:
            lengths = torch.randint(2, T + 1, (B,), generator=g)
            lengths[0] = T
            mask = torch.arange(T)[None, :] < lengths[:, None]
    leaves = dict(
        log_prob=log_prob.detach().clone().requires_grad_(True),
        old_log_prob=old_log_prob.detach(),
        advantages=adv.detach(),
        mask=mask,
        logits=logits.detach().clone().requires_grad_(True),
        entropy=ent.detach().clone().requires_grad_(True),
        old_entropy=old_ent.detach(),
        ref_log_prob=(log_prob + 0.1 * torch.randn(B, T, generator=g, dtype=dtype)).detach(),
        rewards=rewards,
        group_reward=rewards.clone(),  # each row its own group (thermostat's reach reads it)
    )
    return leaves, tokens


def batch_from(leaves, **drop_or_replace) -> TokenBatch:
    d = dict(leaves)
    for k, v in drop_or_replace.items():
        d[k] = v
    return TokenBatch(**d)


GRAD_FIELDS = ("log_prob", "logits", "entropy")


def loss_and_grads(method, leaves, step=None, seed=0):
    """Run ``method`` on a fresh batch from ``leaves``; return (loss, {field: grad or zeros})."""
    for f in GRAD_FIELDS:
        if leaves.get(f) is not None:
            leaves[f].grad = None
    torch.manual_seed(seed)
    out = method.compute_loss(batch_from(leaves), step=step)
    params = [leaves[f] for f in GRAD_FIELDS if leaves.get(f) is not None]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    res = {}
    for f, p, g in zip([f for f in GRAD_FIELDS if leaves.get(f) is not None], params, grads):
        res[f] = torch.zeros_like(p) if g is None else g
    return out, res


def pad_leaves(leaves, extra=3, fill=float("nan")):
    """Append ``extra`` padded positions to every per-token field, filled with ``fill`` (NaN by default)."""
    out = {}
    for k, v in leaves.items():
        if v is None or k in ("advantages", "rewards", "group_reward"):
            out[k] = v
            continue
        if k == "mask":
            out[k] = torch.cat([v, torch.zeros(v.shape[0], extra, dtype=torch.bool)], 1)
            continue
        shape = list(v.shape)
        shape[1] = extra
        pad = torch.full(shape, fill, dtype=v.dtype)
        t = torch.cat([v.detach(), pad], 1)
        out[k] = t.requires_grad_(v.requires_grad)
    if leaves["advantages"].dim() == 2:
        out["advantages"] = torch.cat([leaves["advantages"], torch.zeros(leaves["advantages"].shape[0], extra,
                                                                         dtype=leaves["advantages"].dtype)], 1)
    return out
