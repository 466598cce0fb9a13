"""TRL engine: EntropyGRPOTrainer trains offline with a tiny Qwen2 for every method, matches GRPOTrainer's own
loss for method grpo, and checkpoints controller state."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import rlvr_entropy  # noqa: E402
from rlvr_entropy.trl import EntropyGRPOTrainer, resolve_method  # noqa: E402
from tests.engines.tiny_hf import digit_reward, make_dataset, make_model, make_tokenizer  # noqa: E402


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=6, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                save_strategy="no", bf16=False, seed=0, generation_batch_size=8, temperature=1.0)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.mark.parametrize("name", rlvr_entropy.available_methods())
def test_two_step_train_every_method(name, tok, tmp_path):
    model = make_model(tok)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = {"anchor_value": 1.0} if name == "siren" else None  # a non-trivial anchor so the penalty acts
    t = EntropyGRPOTrainer(model=model, reward_funcs=digit_reward, args=_args(tmp_path), train_dataset=make_dataset(),
                           processing_class=tok, method=name, method_config=cfg)
    t.train()
    changed = sum(not torch.equal(before[k], v) for k, v in model.named_parameters())
    assert changed > 0, "parameters must change"
    logged = set().union(*[set(h) for h in t.state.log_history])
    assert any(k.startswith(f"{name}/") for k in logged), sorted(logged)
    assert "entropy" in logged


def _inputs(tok, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, P, T = 4, 3, 5
    V = len(tok)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    completion_ids = torch.randint(3, V, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[2, 1:] = 0
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.8, -1.3]),
        "old_per_token_logps": None,
        "num_items_in_batch": completion_mask.sum().float(),
    }


@pytest.mark.parametrize("loss_type,agg", [("dapo", "token-mean"), ("grpo", "seq-mean-token-mean")])
def test_grpo_reproduces_trl_loss(loss_type, agg, tok, tmp_path):
    model = make_model(tok, seed=1)
    args = _args(tmp_path, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=0.0)
    ours = EntropyGRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=make_dataset(),
                              processing_class=tok, method="grpo",
                              method_config={"eps_low": 0.2, "eps_high": 0.28, "loss_agg_mode": agg})
    theirs = GRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=make_dataset(),
                         processing_class=tok)
    inputs = _inputs(tok)
    # Off-policy old log-probs so that the ratio and the clipping are exercised.
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        logits = model(input_ids=ids).logits[:, inputs["prompt_ids"].size(1) - 1:-1]
        lp = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
    inputs["old_per_token_logps"] = lp + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(3))
    for t in (ours, theirs):
        t.current_gradient_accumulation_steps = 2
        t.model.train()
    results = []
    for t in (ours, theirs):
        model.zero_grad()
        loss = t._compute_loss(model, dict(inputs))
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
        results.append((loss.detach(), grads))
    (l1, g1), (l2, g2) = results
    assert abs(l2.item()) > 1e-4
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-7)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_full_logits_path_matches_fused_log_probs(tok, tmp_path):
    """Methods needing logits take log-probs from the ordinary forward: they must equal TRL's fused ones."""
    model = make_model(tok, seed=2)
    t = EntropyGRPOTrainer(model=model, reward_funcs=digit_reward, args=_args(tmp_path, temperature=0.7),
                           train_dataset=make_dataset(), processing_class=tok, method="grpo")
    inputs = _inputs(tok)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].size(1)
    with torch.no_grad():
        fused, ent, _ = t._get_per_token_logps_and_entropies(model, ids, am, T, compute_entropy=True)
        logits = t._full_logits(model, ids, am, T)
        ours = torch.log_softmax(logits.float(), -1).gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
        our_ent = rlvr_entropy.stats.entropy(logits)
    m = inputs["completion_mask"].bool()
    torch.testing.assert_close(ours[m], fused[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_ent[m], ent[m], rtol=1e-4, atol=1e-5)


def test_resume_restores_siren_anchor(tok, tmp_path):
    args = _args(tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    t1 = EntropyGRPOTrainer(model=make_model(tok), reward_funcs=digit_reward, args=args, train_dataset=make_dataset(),
                            processing_class=tok, method="siren")
    t1.train()
    anchor = t1.method.state_dict()["anchor"]["value"]
    assert anchor is not None
    ckpt = os.path.join(str(tmp_path), "checkpoint-2")
    assert os.path.exists(os.path.join(ckpt, "rlvr_entropy_state.json"))
    t2 = EntropyGRPOTrainer(model=make_model(tok, seed=5), reward_funcs=digit_reward,
                            args=_args(tmp_path, save_strategy="no", max_steps=3), train_dataset=make_dataset(),
                            processing_class=tok, method="siren")
    assert t2.method.state_dict()["anchor"]["value"] is None
    t2.train(resume_from_checkpoint=ckpt)
    assert t2.method.state_dict()["anchor"]["value"] == pytest.approx(anchor, rel=0, abs=0)


def test_group_reward_reaches_the_method(tok, tmp_path):
    """Each completion carries its group's mean reward (thermostat's difficulty split reads it)."""
    t = EntropyGRPOTrainer(model=make_model(tok), reward_funcs=digit_reward, args=_args(tmp_path, max_steps=2),
                           train_dataset=make_dataset(), processing_class=tok, method="thermostat",
                           method_config={"solved_at": 0.5, "damp_only": "solved"})
    seen = []
    inner = t.method.compute_loss

    def spy(batch, step=None):
        seen.append((batch.rewards.detach().clone(), batch.group_reward.detach().clone()))
        return inner(batch, step=step)

    t.method.compute_loss = spy
    t.train()
    rewards = torch.cat([r for r, _ in seen])
    group = torch.cat([g for _, g in seen])
    assert len(rewards) == 8  # one generation batch (2 prompts x 4 completions) over 2 steps of 4
    # a group mean repeated over its members sums to the rewards' sum, whatever the shuffling
    torch.testing.assert_close(group.sum(), rewards.sum())
    # each group's mean is carried by its 4 members: every distinct value appears a multiple of 4 times, and is
    # the mean of 4 of the rewards
    values, counts = torch.unique(group, return_counts=True)
    assert all(int(c) % 4 == 0 for c in counts)
    means = torch.combinations(rewards, 4).mean(1)
    assert all(bool((means - v).abs().min() < 1e-6) for v in values)
    logged = set().union(*[set(h) for h in t.state.log_history])
    assert "thermostat/unsolved_frac" in logged


def test_bad_method_and_conflicting_trl_options(tok, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        resolve_method("nope")
    with pytest.raises(ValueError, match="method_config"):
        resolve_method(rlvr_entropy.make_method("grpo"), {"eps_low": 0.1})
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        EntropyGRPOTrainer(model=make_model(tok), reward_funcs=digit_reward,
                           args=_args(tmp_path, top_entropy_quantile=0.2), train_dataset=make_dataset(),
                           processing_class=tok, method="grpo")


def test_entropy_change_diagnostics_logged(tok, tmp_path):
    t = EntropyGRPOTrainer(model=make_model(tok), reward_funcs=digit_reward,
                           args=_args(tmp_path, max_steps=2, learning_rate=1e-3), train_dataset=make_dataset(),
                           processing_class=tok, method="grpo", diagnostics_every=1)
    t.train()
    assert len(t.entropy_change_records) == 2
    rec = t.entropy_change_records[0]
    assert rec.measured.numel() > 0
    logged = set().union(*[set(h) for h in t.state.log_history])
    assert "entropy_change/exact/pearson" in logged and "entropy_change/steer/spearman" in logged
    lines = open(os.path.join(str(tmp_path), "entropy_change.jsonl")).read().splitlines()
    assert len(lines) == 2
    with pytest.raises(ValueError, match="diagnostics_every"):
        EntropyGRPOTrainer(model=make_model(tok), reward_funcs=digit_reward, args=_args(tmp_path),
                           train_dataset=make_dataset(), processing_class=tok, diagnostics_every=0)
