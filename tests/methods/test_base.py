"""rlvr_entropy.methods.base: what engines pass to make_method (engine_length_overrides) and the step protocol's
rollout_end flag (the per-method checks are in test_harness.py)."""
from __future__ import annotations

import pytest

import rlvr_entropy as re
from rlvr_entropy.methods.base import engine_length_overrides


def test_seq_mean_token_sum_norm_takes_the_engine_length_with_a_note():
    over, note = engine_length_overrides("siren", {"beta": 0.01}, 48)
    assert over == {"beta": 0.01, "norm_length": 48}
    assert "siren" in note and "48" in note and "3072" in note
    m = re.make_method("siren", **over)
    assert m.config.norm_length == 48 and m.config.beta == 0.01


@pytest.mark.parametrize("name,overrides", [
    ("siren", {"norm_length": 3072}),                 # set by the user: kept
    ("grpo", {}),                                     # another aggregation: nothing to do
    ("grpo", {"loss_agg_mode": "token-mean"}),
])
def test_engine_length_leaves_other_settings_alone(name, overrides):
    assert engine_length_overrides(name, overrides, 48) == (overrides, None)


def test_engine_length_applies_to_any_method_set_to_seq_mean_token_sum_norm():
    over, note = engine_length_overrides("grpo", {"loss_agg_mode": "seq-mean-token-sum-norm", "norm_length": None},
                                         16)
    assert over["norm_length"] is None and note is None  # norm_length given explicitly (None: the padded length)
    over, note = engine_length_overrides("grpo", {"loss_agg_mode": "seq-mean-token-sum-norm"}, 16)
    assert over["norm_length"] == 16 and "grpo" in note


def test_engine_length_validates():
    with pytest.raises(ValueError, match="max_completion_length"):
        engine_length_overrides("siren", {}, 0)
    with pytest.raises(ValueError, match="unknown"):
        engine_length_overrides("nope", {}, 16)


def test_the_paper_length_shrinks_the_policy_gradient_of_short_completions():
    """Why engines set it: over 3072 tokens the PG gradient of 12-token completions is 3072/12 smaller than over
    the engine's 12; the penalty term is not scaled, so the method's balance would be off by that factor."""
    import torch

    from rlvr_entropy.core.aggregation import agg_loss

    x = torch.rand(4, 12, requires_grad=True)
    mask = torch.ones(4, 12, dtype=torch.bool)
    g_paper = torch.autograd.grad(agg_loss(x, mask, "seq-mean-token-sum-norm", 3072), x)[0]
    g_engine = torch.autograd.grad(agg_loss(x, mask, "seq-mean-token-sum-norm", 12), x)[0]
    torch.testing.assert_close(g_engine / g_paper, torch.full_like(x, 3072 / 12))
