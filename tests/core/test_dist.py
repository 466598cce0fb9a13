"""core.dist: the collectives engines hand to methods. Local and function-backed by hand; TorchCollective on two
real processes (gloo), with controllers reaching bit-identical state from different data."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import rlvr_entropy as re
from rlvr_entropy.core.dist import FnCollective, LocalCollective, TorchCollective, default_collective


def test_local_collective_is_the_identity():
    c = LocalCollective()
    x = torch.tensor([1.0, 2.0, 3.0])
    assert c.world_size == 1 and not c.is_distributed
    assert torch.equal(c.all_gather(x), x)
    out = c.all_reduce_sum(x)
    assert out.dtype == torch.float64 and torch.equal(out, x.double())
    with pytest.raises(ValueError, match="1-D"):
        c.all_gather(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="torch.Tensor"):
        c.all_reduce_sum([1.0])


def test_fn_collective_sums_in_rank_order_and_checks_lengths():
    others = [torch.tensor([1.0, 10.0], dtype=torch.float64), torch.tensor([2.0, 20.0], dtype=torch.float64)]
    calls = []

    def gather(x):
        calls.append(x.numel())
        return torch.cat([others[0], x.to(torch.float64), others[1]])

    c = FnCollective(gather)
    assert c.is_distributed
    out = c.all_reduce_sum(torch.tensor([0.5, 0.25]))
    assert out.tolist() == [3.5, 30.25] and calls == [2]  # one gather, no probe
    bad = FnCollective(lambda x: torch.cat([x, torch.zeros(1)]))
    with pytest.raises(ValueError, match="same length"):
        bad.all_reduce_sum(torch.zeros(2))
    with pytest.raises(ValueError, match="callable"):
        FnCollective(3)
    with pytest.raises(ValueError, match="world_size"):
        FnCollective(gather, world_size=0)
    assert FnCollective(gather, world_size=3).world_size == 3


def test_method_collective_setters():
    m = re.make_method("siren")
    assert isinstance(m.dist, LocalCollective) and m.gather_fn is None
    m.gather_fn = lambda x: x
    assert isinstance(m.dist, FnCollective) and m.gather_fn is not None
    assert m.set_collective(None) is m and isinstance(m.dist, LocalCollective)
    with pytest.raises(ValueError, match="Collective"):
        m.set_collective(lambda x: x)
    assert isinstance(default_collective(), LocalCollective)
    with pytest.raises(ValueError, match="initialized"):
        TorchCollective()


def _rank_batch(rank: int, step: int) -> re.TokenBatch:
    """Rank-specific data: different sizes and entropies on each rank (rank 1 has a fully masked response)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    B, T, V = (2, 5, 7) if rank == 0 else (3, 4, 7)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * (1.0 + rank)
    tok = torch.randint(V, (B, T), generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, tok[..., None]).squeeze(-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    if rank == 1:
        mask[2] = False
    # each response's group mean reward (thermostat's reach): which groups solved something differs by rank
    group_reward = torch.rand(B, generator=g, dtype=torch.float64) * (torch.rand(B, generator=g) < 0.6)
    ref = lp + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)  # the reference (thermostat's pull)
    return re.TokenBatch(log_prob=lp, old_log_prob=lp, advantages=torch.randn(B, generator=g, dtype=torch.float64),
                         mask=mask, logits=logits, group_reward=group_reward, ref_log_prob=ref)


_NAMES = ("siren", "thermostat", "adaptive_entropy", "forking_tokens", "kl_cov")


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        c = TorchCollective()
        assert default_collective().world_size == world
        gathered = c.all_gather(torch.arange(rank + 1, dtype=torch.float32) + 10 * rank)  # lengths 1 and 2
        reduced = c.all_reduce_sum(torch.tensor([0.1 * (rank + 1), 1e-17 * rank, 3.0], dtype=torch.float64))
        empty = c.all_gather(torch.zeros(0 if rank == 0 else 2))
        states = {}
        for name in _NAMES:
            m = re.make_method(name, scope="global") if name == "kl_cov" else re.make_method(name)
            m.set_collective(c)
            for step in range(3):
                m.compute_loss(_rank_batch(rank, step), step=step)
                m.end_step()
            states[name] = m.state_dict()
        torch.save({"gathered": gathered, "reduced": reduced, "empty": empty, "states": states},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_torch_collective_on_two_gloo_processes():
    with tempfile.TemporaryDirectory() as d:
        init = "file://" + os.path.join(d, "store")
        mp.start_processes(_worker, args=(2, init, d), nprocs=2, join=True, start_method="spawn")
        r0, r1 = (torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(2))
    for r in (r0, r1):
        assert r["gathered"].tolist() == [0.0, 10.0, 11.0]
        assert r["empty"].numel() == 2
    assert torch.equal(r0["reduced"], r1["reduced"])  # bit-identical on every rank
    assert r0["reduced"].tolist() == [0.1 + 0.2, 1e-17, 6.0]
    assert r0["states"] == r1["states"]
    # the reduction is real: one process fed both ranks' data as two micro-batches reaches the same state, and a
    # rank alone does not
    for name in ("siren", "thermostat", "adaptive_entropy"):
        both, alone = re.make_method(name), re.make_method(name)
        for step in range(3):
            for rank in (0, 1):
                both.compute_loss(_rank_batch(rank, step), step=step)
            both.end_step()
            alone.compute_loss(_rank_batch(0, step), step=step)
            alone.end_step()
        assert both.state_dict() == r0["states"][name], name
        assert alone.state_dict() != r0["states"][name], name
