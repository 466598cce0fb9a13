import pytest
import torch

import rlvr_entropy as re
from rlvr_entropy.methods.forking_tokens import high_entropy_mask
from tests.helpers import batch_from, loss_and_grads, make_leaves


def test_hand_case_batch_and_response_scope():
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    m = torch.ones(2, 4, dtype=torch.bool)
    # batch q0.75 of 1..8 = 6.25 -> keep 7, 8
    assert high_entropy_mask(h, m, 0.75).tolist() == [[False] * 4, [False, False, True, True]]
    # per response: q0.75 of row 1..4 = 3.25 -> keep 4 ; row 5..8 = 7.25 -> keep 8
    assert high_entropy_mask(h, m, 0.75, "response").tolist() == [[False, False, False, True],
                                                                 [False, False, False, True]]
    assert high_entropy_mask(h, torch.zeros_like(m), 0.75).sum() == 0


def test_matches_trl_get_high_entropy_mask():
    trl = pytest.importorskip("trl")
    from trl import GRPOTrainer

    g = torch.Generator().manual_seed(0)
    h = torch.rand(5, 9, generator=g)
    m = torch.rand(5, 9, generator=g) > 0.3

    class _Acc:
        def gather(self, x):
            return x

        def pad_across_processes(self, x, dim=0, pad_index=0):
            return x

    class _Fake:
        accelerator = _Acc()

    try:
        theirs = GRPOTrainer.get_high_entropy_mask(_Fake(), h, m.long(), 0.8)
    except Exception as e:  # pragma: no cover - TRL internals changed
        pytest.skip(f"TRL's get_high_entropy_mask is not callable standalone: {e}")
    ours = high_entropy_mask(h, m, 0.8)
    assert torch.equal(ours, theirs.bool() & m)


def test_loss_keeps_all_token_denominator():
    leaves, _ = make_leaves(seed=2)
    m = re.make_method("forking_tokens", quantile=0.5)
    out, grads = loss_and_grads(m, leaves)
    msk = leaves["mask"]
    keep = high_entropy_mask(leaves["entropy"].detach(), msk, 0.5)
    base = re.make_method("grpo")
    lp = leaves["log_prob"]
    from rlvr_entropy.core.surrogate import ppo_token_loss

    adv = torch.where(msk, leaves["advantages"][:, None].expand(msk.shape), 0.0)
    t = ppo_token_loss(torch.where(msk, lp, 0.0), torch.where(msk, leaves["old_log_prob"], 0.0), adv,
                       eps_low=0.2, eps_high=0.2)
    ref = torch.where(keep, t.loss, 0.0).sum() / msk.sum()
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(grads["log_prob"][msk & ~keep], torch.zeros_like(grads["log_prob"][msk & ~keep]))


def test_global_scope_through_gather():
    leaves, _ = make_leaves(seed=3, B=4)
    h = leaves["entropy"].detach()
    msk = leaves["mask"]
    full = high_entropy_mask(h, msk, 0.8)
    halves = []
    for sl, other in ((slice(0, 2), slice(2, 4)), (slice(2, 4), slice(0, 2))):
        def gather(x, other=other):
            return torch.cat([x, h[other][msk[other]].to(x.dtype)])
        halves.append(high_entropy_mask(h[sl], msk[sl], 0.8, "batch", gather))
    assert torch.equal(torch.cat(halves), full)
