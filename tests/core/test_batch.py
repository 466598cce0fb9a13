import pytest
import torch

from rlvr_entropy import TokenBatch


def _ok(**kw):
    d = dict(log_prob=torch.zeros(2, 3), old_log_prob=torch.zeros(2, 3), advantages=torch.zeros(2),
             mask=torch.ones(2, 3, dtype=torch.bool))
    d.update(kw)
    return TokenBatch(**d)


def test_valid_batch_and_helpers():
    b = _ok(advantages=torch.tensor([1.0, -2.0]), mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert b.mask.dtype == torch.bool and b.num_tokens == 3 and b.shape == (2, 3)
    assert torch.equal(b.token_advantages(), torch.tensor([[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0]]))


@pytest.mark.parametrize("field,value,match", [
    ("log_prob", torch.zeros(2, 3, 1), "log_prob"),
    ("log_prob", torch.zeros(2, 3, dtype=torch.long), "log_prob"),
    ("old_log_prob", torch.zeros(3, 2), "old_log_prob"),
    ("advantages", torch.zeros(3), "advantages"),
    ("advantages", torch.zeros(2, 4), "advantages"),
    ("mask", torch.ones(2, 2, dtype=torch.bool), "mask"),
    ("mask", torch.full((2, 3), 2), "mask"),
    ("logits", torch.zeros(2, 4, 5), "logits"),
    ("logits", torch.zeros(2, 3), "logits"),
    ("entropy", torch.zeros(2), "entropy"),
    ("old_entropy", torch.zeros(2, 4), "old_entropy"),
    ("ref_log_prob", torch.zeros(1, 3), "ref_log_prob"),
    ("rewards", torch.zeros(3), "rewards"),
    ("group_reward", torch.zeros(2, 1), "group_reward"),
    ("log_prob", [[0.0] * 3] * 2, "log_prob"),
])
def test_bad_shapes_and_types_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        _ok(**{field: value})


@pytest.mark.parametrize("field", ["log_prob", "old_log_prob", "entropy", "old_entropy", "ref_log_prob"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_at_valid_position_raises_but_padding_is_free(field, bad):
    x = torch.zeros(2, 3)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=field):
        _ok(**{field: x})
    _ok(**{field: x}, mask=torch.tensor([[1, 1, 1], [1, 1, 0]]).bool())  # padded: fine


def test_non_finite_advantages_logits_rewards():
    with pytest.raises(ValueError, match="advantages"):
        _ok(advantages=torch.tensor([0.0, float("nan")]))
    # a [B] advantage of a fully padded row is never read
    _ok(advantages=torch.tensor([0.0, float("nan")]), mask=torch.tensor([[1, 1, 1], [0, 0, 0]]).bool())
    lg = torch.zeros(2, 3, 4)
    lg[0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        _ok(logits=lg)
    with pytest.raises(ValueError, match="rewards"):
        _ok(rewards=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="group_reward"):
        _ok(group_reward=torch.tensor([0.5, float("inf")]))
    b = _ok(group_reward=torch.tensor([0.25, 0.75]))
    assert torch.equal(b.with_(advantages=torch.ones(2)).group_reward, b.group_reward)  # with_ keeps it


def test_current_entropy_from_logits_and_require():
    lg = torch.zeros(2, 3, 4)
    b = _ok(logits=lg)
    torch.testing.assert_close(b.current_entropy("x"), torch.full((2, 3), torch.log(torch.tensor(4.0)).item()))
    with pytest.raises(ValueError, match="needs TokenBatch.entropy or TokenBatch.logits"):
        _ok().current_entropy("x")
    with pytest.raises(ValueError, match="rewards"):
        _ok().require("rewards", "w_reinforce")
