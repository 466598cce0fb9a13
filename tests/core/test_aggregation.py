import pytest
import torch

from rlvr_entropy.core.aggregation import AGG_MODES, agg_loss, masked_mean, masked_sum

L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0], [7.0, 8.0, 9.0]])
M = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])


def test_hand_values():
    # valid: row0 1,2,3 ; row1 4,5 ; row2 none
    assert agg_loss(L, M, "token-mean").item() == pytest.approx(15 / 5)
    assert agg_loss(L, M, "token-sum").item() == pytest.approx(15)
    # row means 2 and 4.5 over 2 non-empty rows
    assert agg_loss(L, M, "seq-mean-token-mean").item() == pytest.approx((2 + 4.5) / 2)
    # row sums 6 and 9
    assert agg_loss(L, M, "seq-mean-token-sum").item() == pytest.approx(7.5)
    assert agg_loss(L, M, "seq-mean-token-sum-norm").item() == pytest.approx(7.5 / 3)
    assert agg_loss(L, M, "seq-mean-token-sum-norm", norm_length=10).item() == pytest.approx(0.75)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_all_masked_is_exact_zero_with_zero_grad(mode):
    x = torch.randn(2, 3, requires_grad=True)
    out = agg_loss(x, torch.zeros(2, 3, dtype=torch.bool), mode)
    assert out.item() == 0.0
    (g,) = torch.autograd.grad(out, x)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_nan_at_padding_never_leaks(mode):
    x = L.clone()
    x[~M] = float("nan")
    x.requires_grad_(True)
    out = agg_loss(x, M, mode, norm_length=3)
    assert torch.isfinite(out)
    (g,) = torch.autograd.grad(out, x)
    assert torch.isfinite(g).all() and torch.equal(g[~M], torch.zeros_like(g[~M]))


def test_bad_mode_names_argument():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        agg_loss(L, M, "mean")


def test_masked_mean_and_sum():
    assert masked_sum(L, M).item() == 15
    assert torch.equal(masked_mean(L, M, dim=-1), torch.tensor([2.0, 4.5, 0.0]))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_matches_verl_agg_loss(mode):
    verl_core = pytest.importorskip("verl.trainer.ppo.core_algos")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    m = torch.rand(5, 7, generator=g) > 0.3
    m[0] = True
    ours = agg_loss(x, m, mode)
    theirs = verl_core.agg_loss(x, m.float(), mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
