"""Token selection over one micro-batch or over every rank, shared by clip_cov, kl_cov and lp_reg.

The "global" scope needs only ``Method.gather_fn``: an all-gather that returns the concatenation, in rank order, of
the 1-D tensor every rank passes (``torch.distributed.all_gather`` + ``torch.cat``; the tensors of different ranks
may have different lengths, as for forking_tokens). A rank finds its own block in the gathered result through a
random 52-bit nonce drawn from the operating system (``secrets``: the torch RNG is not touched), so no rank id has
to be passed in; two ranks drawing the same nonce (probability ~ R^2 / 2^53) raise an error instead of selecting
wrongly. These functions are collectives: every rank must call them the same number of times, in the same order,
whatever its number of valid tokens.

Selections are exact: with the global scope the ranks together select exactly the tokens that the same rule would
select on the concatenation of their micro-batches (rank order, then row-major order inside a micro-batch), ties
and random draws included, so the result does not depend on how a batch is split across ranks.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from rlvr_entropy.methods.base import GatherFn


@dataclass(frozen=True)
class World:
    """This rank's place among the ranks reached by ``gather_fn``."""

    gather_fn: GatherFn
    rank: int
    rows: torch.Tensor  # [R, m] float64: the row every rank passed to :func:`gather_rows`, in rank order

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])


@torch.no_grad()
def gather_rows(gather_fn: GatherFn, row: torch.Tensor) -> World:
    """All-gather a small 1-D ``row`` [m] (cast to float64) from every rank and find this rank's position.

    Returns a :class:`World` whose ``rows`` [R, m] holds every rank's row in rank order. float64 holds integers up
    to 2^53 exactly, so counts can travel in the row.
    """
    row = row.detach().reshape(-1).to(torch.float64)
    nonce = float(secrets.randbits(52))
    local = torch.cat([row, torch.full((1,), nonce, dtype=torch.float64, device=row.device)])
    allv = gather_fn(local)
    m = local.numel()
    if not isinstance(allv, torch.Tensor) or allv.dim() != 1 or allv.numel() % m != 0 or allv.numel() == 0:
        raise ValueError("gather_fn must return the 1-D concatenation of the tensors of every rank "
                         f"(got {type(allv).__name__} of shape {list(getattr(allv, 'shape', []))} for inputs of {m})")
    table = allv.to(torch.float64).reshape(-1, m)
    hits = (table[:, -1] == nonce).nonzero().reshape(-1)
    if hits.numel() != 1:
        raise ValueError("gather_fn: this rank's tensor was found "
                         f"{hits.numel()} times in the gathered result (expected once); is it an all-gather?")
    return World(gather_fn=gather_fn, rank=int(hits[0]), rows=table[:, :-1])


@torch.no_grad()
def gather_count(world: World, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Every rank's count [R] (one all-gather of a single number)."""
    counts = world.gather_fn(torch.full((1,), float(n), dtype=torch.float64, device=device)).reshape(-1)
    if counts.numel() != world.size:
        raise ValueError(f"gather_fn returned {counts.numel()} counts for {world.size} ranks")
    return counts


def _segment(world: World, counts: torch.Tensor) -> tuple[int, int]:
    """(offset, total) of this rank's block, given every rank's count [R]."""
    c = [int(x) for x in counts.tolist()]
    return sum(c[:world.rank]), sum(c)


@torch.no_grad()
def select_topk(values: torch.Tensor, k: int, *, largest: bool = True, world: World | None = None,
                counts: torch.Tensor | None = None) -> torch.Tensor:
    """bool [n]: which of the local candidates ``values`` [n] are among the k largest (smallest when
    ``largest=False``) of the scope: this call's candidates, or every rank's when ``world`` is given (then
    ``counts`` [R] holds every rank's number of candidates, gathered here when None, and ``values`` are gathered
    once).

    ``torch.topk`` runs on CPU, on the concatenation in rank order, so ties are broken the same way on every rank
    and the same way as verl (which selects on CPU). ``k`` is clamped to the number of candidates; k <= 0 selects
    nothing.
    """
    n = values.numel()
    out = torch.zeros(n, dtype=torch.bool, device=values.device)
    vals = values.detach().reshape(-1)
    if world is not None:
        if counts is None:
            counts = gather_count(world, n, values.device)
        offset, total = _segment(world, counts)
        allv = world.gather_fn(vals)  # a collective: called even when this rank has no candidate
        if allv.numel() != total:
            raise ValueError(f"gather_fn returned {allv.numel()} values, the ranks announced {total}")
        vals = allv
    else:
        offset, total = 0, n
    kk = min(int(k), total)
    if kk <= 0:
        return out
    idx = torch.topk(vals.cpu(), kk, largest=largest).indices
    mine = idx[(idx >= offset) & (idx < offset + n)] - offset
    out[mine.to(out.device)] = True
    return out


@torch.no_grad()
def select_random(n: int, k: int, *, generator: torch.Generator | None = None, world: World | None = None,
                  counts: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """bool [n]: a uniformly random subset of k of the scope's candidates, restricted to this rank's n.

    Candidates are numbered in rank order (``counts`` [R] with a ``world``, gathered here when None; else only
    this call's n);
    ``torch.randperm(total, generator=generator)[:k]`` picks them, exactly as verl's Clip-Cov does with the global
    RNG (``generator=None``). ``randperm`` is only called when there is a candidate, so the global RNG advances
    exactly as in verl. With a world every rank must pass a generator in the same state.
    """
    out = torch.zeros(n, dtype=torch.bool, device=device)
    if world is not None:
        if generator is None:
            raise ValueError("select_random: a world needs a generator in the same state on every rank")
        if counts is None:
            counts = gather_count(world, n, device)
        offset, total = _segment(world, counts)
    else:
        offset, total = 0, n
    if total == 0:
        return out
    perm = torch.randperm(total) if generator is None else torch.randperm(total, generator=generator)
    idx = perm[: min(int(k), total)]
    mine = idx[(idx >= offset) & (idx < offset + n)] - offset
    out[mine.to(out.device)] = True
    return out
