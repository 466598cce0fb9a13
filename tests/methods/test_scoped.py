"""methods/_scoped.py: the rank-aware selections behind the "global" scopes of clip_cov, kl_cov and lp_reg."""
from __future__ import annotations

import pytest
import torch

from rlvr_entropy.methods._scoped import gather_rows, select_random, select_topk
from tests.methods._world import FakeWorld


def test_topk_by_hand_local():
    v = torch.tensor([0.3, 2.0, -1.0, 2.0, 0.5])
    assert select_topk(v, 2).tolist() == [False, True, False, True, False]
    assert select_topk(v, 2, largest=False).tolist() == [True, False, True, False, False]
    assert select_topk(v, 9).all() and not select_topk(v, 0).any()
    assert select_topk(torch.zeros(0), 3).numel() == 0


def test_random_local_equals_randperm_prefix():
    torch.manual_seed(3)
    perm = torch.randperm(6)[:2]
    torch.manual_seed(3)
    sel = select_random(6, 2)
    assert sel.nonzero().reshape(-1).sort().values.tolist() == perm.sort().values.tolist()
    before = torch.random.get_rng_state()
    assert not select_random(0, 2).any()  # nothing to draw from: the RNG is not touched
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_over_three_ranks_equals_topk_of_the_concatenation(largest):
    parts = [torch.tensor([0.5, 3.0, 1.0]), torch.tensor([]), torch.tensor([3.0, 2.0, -1.0, 0.0])]
    whole = torch.cat(parts)
    expected = select_topk(whole, 3, largest=largest)
    world = FakeWorld(3)

    def rank(r):
        w = gather_rows(world.gather_fn(r), torch.tensor([float(r)]))
        assert w.rank == r and w.size == 3 and w.rows[:, 0].tolist() == [0.0, 1.0, 2.0]
        return select_topk(parts[r], 3, largest=largest, world=w)

    got = world.run([lambda r=r: rank(r) for r in range(3)])
    assert torch.equal(torch.cat(got), expected)


def test_random_over_two_ranks_equals_the_draw_on_the_concatenation():
    world = FakeWorld(2)
    sizes = [5, 7]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(42)
    expected = select_random(12, 4, generator=g)

    def rank(r):
        w = gather_rows(world.gather_fn(r), torch.zeros(1))
        return select_random(sizes[r], 4, generator=torch.Generator().manual_seed(42), world=w)

    got = world.run([lambda r=r: rank(r) for r in range(2)])
    assert torch.equal(torch.cat(got), expected) and int(expected.sum()) == 4


def test_bad_gather_fn_raises():
    with pytest.raises(ValueError, match="found 2 times"):
        gather_rows(lambda x: torch.cat([x, x]), torch.zeros(2))
    with pytest.raises(ValueError, match="1-D concatenation"):
        gather_rows(lambda x: x[:-1], torch.zeros(2))
    w = gather_rows(lambda x: x, torch.zeros(1))  # a single rank: the identity is a valid all-gather
    assert w.rank == 0 and w.size == 1
    with pytest.raises(ValueError, match="generator"):
        select_random(3, 1, world=w)
