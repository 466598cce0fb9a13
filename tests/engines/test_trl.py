"""TRL engine: EntropyGRPOTrainer trains offline with a tiny Qwen2 for every method, maps or refuses every GRPOConfig
loss option, follows the step protocol (one controller update per optimizer step, none in evaluation), reduces
metrics over ranks without per-key collectives, and checkpoints controller state.

Parity with GRPOTrainer's own loss: test_trl_parity.py; two processes: test_trl_multiproc.py."""
from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig  # noqa: E402

import rlvr_entropy  # noqa: E402
from rlvr_entropy.core.dist import FnCollective, LocalCollective  # noqa: E402
from rlvr_entropy.trl import (EntropyGRPOTrainer, MetricSums, check_advantage_options, grpo_config_kwargs,  # noqa: E402
                              resolve_method)
from tests.engines.tiny_hf import digit_reward, make_dataset, make_model, make_tokenizer  # noqa: E402
from tests.engines.trl_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[2]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=6, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                save_strategy="no", bf16=False, seed=0, generation_batch_size=8, temperature=1.0, disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _trainer(tok, tmp_path, method="grpo", method_config=None, model=None, **args):
    return EntropyGRPOTrainer(model=model or make_model(tok), reward_funcs=digit_reward, args=_args(tmp_path, **args),
                              train_dataset=make_dataset(), processing_class=tok, method=method,
                              method_config=method_config)


def _saved_model(tok, tmp_path, seed=0):
    """A tiny model loaded from a folder: TRL builds the reference of a method that reads ref_log_prob (the
    thermostat's pull) by loading the model's path again (test_trl_reference.py)."""
    from transformers import Qwen2ForCausalLM

    d = tmp_path / f"saved_model_{seed}"
    make_model(tok, seed=seed).save_pretrained(str(d))
    return Qwen2ForCausalLM.from_pretrained(str(d))


@pytest.mark.parametrize("name", rlvr_entropy.available_methods())
def test_two_step_train_every_method(name, tok, tmp_path):
    reads_ref = "ref_log_prob" in rlvr_entropy.make_method(name).needs  # the thermostat: TRL's reference, beta=0
    model = _saved_model(tok, tmp_path) if reads_ref else make_model(tok)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = {"siren": {"anchor_value": 1.0},  # a non-trivial anchor so the penalty acts
           # the tiny model's entropy (~3) is above the default band: RAFT++ with no reward > 0.5 is all zero;
           # below this band it is NSR, which moves the parameters
           "entrocraft": {"lower": (5.0, 5.0), "upper": (6.0, 6.0), "total_steps": 2},
           # 2 prompts per generation batch: the first 1 again at the plan's temperature (test_trl_aepo.py)
           "aepo": {"resample_divisor": 2, "reinforce_sample_num": 2}}.get(name)
    t = _trainer(tok, tmp_path, name, cfg, model=model)
    assert isinstance(t.method.dist, LocalCollective)
    assert (t.ref_model is not None) is reads_ref and t.beta == 0.0  # a reference only for a method that reads it
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
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[2, 1:] = 0
    return {"prompt_ids": torch.randint(3, V, (B, P), generator=g), "prompt_mask": torch.ones(B, P, dtype=torch.long),
            "completion_ids": torch.randint(3, V, (B, T), generator=g), "completion_mask": completion_mask,
            "advantages": torch.tensor([1.0, -0.5, 0.8, -1.3]), "old_per_token_logps": None,
            "group_reward": torch.tensor([0.5, 0.25, 0.5, 0.25]),  # as _generate_and_score_completions adds it
            "num_items_in_batch": completion_mask.sum().float()}


def test_full_logits_path_matches_fused_log_probs(tok, tmp_path):
    """Methods needing logits take log-probs from the ordinary forward: they must equal TRL's fused ones."""
    model = make_model(tok, seed=2)
    t = _trainer(tok, tmp_path, model=model, temperature=0.7)
    inputs = _inputs(tok)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].size(1)
    with torch.no_grad():
        fused, ent, _ = t._get_per_token_logps_and_entropies(model, ids, am, T, compute_entropy=True)
        logits, aux = t._full_logits(model, ids, am, T)
        ours = torch.log_softmax(logits.float(), -1).gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
        our_ent = rlvr_entropy.stats.entropy(logits)
    assert aux is None
    m = inputs["completion_mask"].bool()
    torch.testing.assert_close(ours[m], fused[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_ent[m], ent[m], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,cfg", [("siren", {"anchor_value": 1.0}),
                                      ("siren", {"use_top_p": False, "anchor_value": 1.0, "top_k": 5}),
                                      ("lp_reg", {"rho": 0.5, "min_tokens": 1}), ("entropy_bonus",
                                                                                   {"clamp_fraction": 0.3})])
def test_logits_free_route_equals_materialized_logits(name, cfg, tok, tmp_path, monkeypatch):
    """Methods that read the distribution get it from hidden states + LM head in tiles (no [B, T, V] logits; the
    materialized route is never called): the same loss and gradients as with logits_free=False."""
    out = {}
    for free in (True, False):
        model = make_model(tok, seed=2)
        t = EntropyGRPOTrainer(model=model, reward_funcs=digit_reward, args=_args(tmp_path, temperature=0.7),
                               train_dataset=make_dataset(), processing_class=tok, method=name, method_config=cfg,
                               logits_free=free)
        calls = []
        full = t._full_logits
        monkeypatch.setattr(t, "_full_logits", lambda *a, **k: calls.append(1) or full(*a, **k))
        t.current_gradient_accumulation_steps = 1  # set by Trainer.train; here the loss is called directly
        loss = t._compute_loss(model, _inputs(tok, seed=3))
        loss.backward()
        assert (not calls) is free
        out[free] = (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-7)
    assert out[True][1].keys() == out[False][1].keys()
    for k in out[True][1]:
        torch.testing.assert_close(out[True][1][k], out[False][1][k], rtol=1e-4, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="logits_free"):
        EntropyGRPOTrainer(model=make_model(tok), reward_funcs=digit_reward, args=_args(tmp_path),
                           train_dataset=make_dataset(), processing_class=tok, method=name, logits_free=1)


# ------------------------------------------------------------------------------------ GRPOConfig mapping
def test_aggregation_from_grpo_config_is_logged(tok, tmp_path, caplog):
    """SIREN's paper aggregation is seq-mean-token-sum-norm over 3072 tokens; under TRL the length is the engine's
    max_completion_length (loss_type="dr_grpo") and a line says so; a method whose aggregation GRPOConfig does not
    change logs nothing."""
    import logging

    from rlvr_entropy.trl import aggregation_note

    with caplog.at_level(logging.WARNING, logger="rlvr_entropy.trl"):
        t = _trainer(tok, tmp_path, "siren", loss_type="dr_grpo")
    assert t.method.config.norm_length == 6  # max_completion_length
    lines = [r.getMessage() for r in caplog.records if r.name == "rlvr_entropy.trl"]
    assert len(lines) == 1 and "over 6 tokens" in lines[0] and "max_completion_length=6" in lines[0] \
        and "3072" in lines[0]
    assert aggregation_note(t.method, t.args) == lines[0]
    g = _trainer(tok, tmp_path, "grpo", loss_type="dapo")
    assert aggregation_note(g.method, g.args) is None  # grpo's paper default is token-mean = dapo
    d = _trainer(tok, tmp_path, "siren", loss_type="dapo")
    assert "token-mean" in aggregation_note(d.method, d.args)


def test_grpo_config_owns_the_pg_settings(tok, tmp_path):
    # steer's paper PG part (eps_high 0.28, dual clip 10) gives way to GRPOConfig's
    t = _trainer(tok, tmp_path, "steer")
    c = t.method.config
    assert (c.eps_low, c.eps_high, c.dual_clip, c.loss_agg_mode) == (0.2, 0.2, None, "token-mean")
    t = _trainer(tok, tmp_path, "steer", epsilon=0.1, epsilon_high=0.28, delta=10.0, loss_type="dr_grpo",
                 max_completion_length=7)
    c = t.method.config
    assert (c.eps_low, c.eps_high, c.dual_clip, c.loss_agg_mode, c.norm_length) == (
        0.1, 0.28, 10.0, "seq-mean-token-sum-norm", 7)
    # the same value in method_config is accepted
    t = _trainer(tok, tmp_path, "grpo", {"eps_high": 0.28, "loss_agg_mode": "seq-mean-token-mean"},
                 epsilon_high=0.28, loss_type="grpo")
    assert t.method.config.eps_high == 0.28


@pytest.mark.parametrize("method_config,args,match", [
    ({"eps_high": 0.28}, {}, r"method_config\['eps_high'\]=0.28 conflicts with GRPOConfig.epsilon \(epsilon_high"),
    ({"eps_low": 0.1}, {"epsilon": 0.2}, r"eps_low.*GRPOConfig.epsilon"),
    ({"dual_clip": 3.0}, {}, r"dual_clip.*GRPOConfig.delta"),
    ({"loss_agg_mode": "seq-mean-token-sum-norm"}, {"loss_type": "dapo"}, r"loss_agg_mode.*loss_type='dapo'"),
    ({"norm_length": 3072}, {"loss_type": "dr_grpo", "max_completion_length": 6}, r"norm_length.*max_completion"),
    ({}, {"loss_type": "cispo"}, r"loss_type='cispo'"),
    ({}, {"loss_type": "sapo"}, r"loss_type='sapo'"),
    ({}, {"loss_type": "vespo"}, r"loss_type='vespo'"),
    ({}, {"delta": 1.1, "epsilon_high": 0.28}, r"GRPOConfig.delta=1.1"),
    ({}, {"epsilon": 1.5}, r"eps_low"),
    ({}, {"importance_sampling_level": "sequence", "loss_type": "grpo"}, r"importance_sampling_level"),
    ({}, {"entropy_coef": 0.01}, r"entropy_coef"),
    ({}, {"use_adaptive_entropy": True}, r"use_adaptive_entropy"),
    ({}, {"top_entropy_quantile": 0.2}, r"top_entropy_quantile"),
])
def test_unmappable_or_conflicting_options_raise(method_config, args, match, tok, tmp_path):
    with pytest.raises(ValueError, match=match):
        _trainer(tok, tmp_path, "grpo", method_config, **args)


def test_advantage_options_with_methods_that_ignore_the_advantages(tok, tmp_path):
    """w_reinforce / entrocraft build their advantages from rewards: TRL's options that act through the advantages
    would be lost, so they raise."""
    for name in ("w_reinforce", "entrocraft"):
        with pytest.raises(ValueError, match="off_policy_mask_threshold cannot be combined"):
            _trainer(tok, tmp_path, name, off_policy_mask_threshold=0.5)
        with pytest.raises(ValueError, match="vllm_importance_sampling_correction cannot be combined"):
            check_advantage_options(rlvr_entropy.make_method(name), off_policy_mask_threshold=None,
                                    vllm_is_correction=True)
    check_advantage_options(rlvr_entropy.make_method("grpo"), off_policy_mask_threshold=0.5, vllm_is_correction=True)


@pytest.mark.parametrize("name", rlvr_entropy.available_methods())
def test_grpo_config_kwargs_give_a_method_its_own_pg_settings(name, tmp_path):
    """grpo_config_kwargs is the inverse of the mapping: GRPOConfig built from it gives back the paper defaults."""
    kw = grpo_config_kwargs(name)
    args = _args(tmp_path, **{"max_completion_length": 6, **kw})
    m, ref = resolve_method(name, None, args), rlvr_entropy.make_method(name)
    for f in ("eps_low", "eps_high", "dual_clip", "loss_agg_mode", "norm_length"):
        assert getattr(m.config, f) == getattr(ref.config, f), f


def test_grpo_config_kwargs_refuses_what_grpo_config_cannot_express():
    for cfg, match in [({"loss_agg_mode": "token-sum"}, "token-sum"),
                       ({"loss_agg_mode": "seq-mean-token-sum-norm", "norm_length": None}, "norm_length=None"),
                       ({"dual_clip": 1.1}, "dual_clip")]:
        with pytest.raises(ValueError, match=match):
            grpo_config_kwargs("grpo", cfg)
    assert grpo_config_kwargs("siren")["loss_type"] == "dr_grpo"


def test_method_instances_and_names(tok, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        resolve_method("nope")
    with pytest.raises(ValueError, match="unknown method"):
        _trainer(tok, tmp_path, "nope")
    with pytest.raises(ValueError, match="method_config"):
        resolve_method(rlvr_entropy.make_method("grpo"), {"eps_low": 0.1})
    # an instance keeps its config; it must agree with GRPOConfig's PG settings
    with pytest.raises(ValueError, match=r"method.config.eps_high=0.28 vs GRPOConfig.epsilon"):
        _trainer(tok, tmp_path, rlvr_entropy.make_method("grpo", eps_high=0.28))
    m = rlvr_entropy.make_method("grpo", eps_high=0.28)
    assert _trainer(tok, tmp_path, m, epsilon_high=0.28).method is m


# ------------------------------------------------------------------------------------ step protocol
class _States(TrainerCallback):
    def __init__(self, trainer):
        self.t, self.steps, self.evals = trainer, [], []

    def on_train_begin(self, args, state, control, **kw):
        self.begin = json.dumps(self.t.method.state_dict())

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(json.dumps(self.t.method.state_dict()))

    def on_evaluate(self, args, state, control, **kw):
        self.evals.append(json.dumps(self.t.method.state_dict()))


def test_one_update_per_optimizer_step_none_in_evaluation(tok, tmp_path):
    """3 steps of 2 micro-batches with evaluation at start and after every step: the controller updates 3 times,
    from each step's whole batch, and evaluation leaves it as it was."""
    t = EntropyGRPOTrainer(model=make_model(tok), reward_funcs=digit_reward, processing_class=tok,
                           train_dataset=make_dataset(), eval_dataset=make_dataset(2), method="adaptive_entropy",
                           method_config={"target": 3.1, "delta": 1e-3},
                           args=_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, eval_strategy="steps",
                                      eval_steps=1, eval_on_start=True, per_device_eval_batch_size=4))
    sums = []
    inner = t.method.end_step
    t.method.end_step = lambda **kw: sums.append(inner(**kw)) or sums[-1]
    rec = _States(t)
    t.add_callback(rec)
    t.train()
    assert t.method.ctrl.steps == 3 and len(sums) == 3
    assert t.method.ctrl.coef == pytest.approx(3e-3)  # H < 3.1 at every step: +delta each
    assert rec.evals == [rec.begin] + rec.steps  # evaluation never changed the state
    assert [json.loads(s)["coef"]["steps"] for s in rec.steps] == [1, 2, 3]  # updated at on_step_end
    # each step measured both of its micro-batches (8 completions of up to 6 tokens)
    assert all(8 < s["tokens"] <= 48 for s in sums)
    logged = set().union(*[set(h) for h in t.state.log_history])
    assert {"eval_adaptive_entropy/coefficient", "eval_entropy", "adaptive_entropy/coefficient"} <= logged


@pytest.mark.parametrize("spg,flags", [(4, [False, True, False, True]), (2, [True] * 4), (1, [True] * 4)])
def test_siren_anchor_spans_the_whole_first_generation_batch(spg, flags, tok, tmp_path):
    """steps_per_generation=4 with gradient accumulation 2: one generation batch (16 completions) is trained in 2
    optimizer steps; SIREN's anchor is measured over both (no penalty in either), set at the second. With
    steps_per_generation <= accumulation every step completes a rollout."""
    t = _trainer(tok, tmp_path, "siren", max_steps=4, gradient_accumulation_steps=2 if spg > 1 else 1,
                 steps_per_generation=spg, generation_batch_size=None)
    calls, regs = [], []
    inner, loss = t.method.end_step, t.method.compute_loss

    def spy_end(**kw):
        out = inner(**kw)
        calls.append((kw["rollout_end"], out, t.method.anchor.value))
        return out

    def spy_loss(batch, **kw):
        out = loss(batch, **kw)
        regs.append(float(out.metrics["siren/reg"]))
        return out

    t.method.end_step, t.method.compute_loss = spy_end, spy_loss
    t.train()
    assert [c[0] for c in calls] == flags
    first = flags.index(True)
    assert all(c[2] is None for c in calls[:first]) and calls[first][2] is not None
    sums = calls[first][1]
    ga = 2 if spg > 1 else 1
    assert sums["responses"] == 4 * ga * (first + 1)  # every micro-batch of the first generation batch
    assert calls[first][2] == pytest.approx(sums["h_sel_sum"] / sums["responses"], rel=1e-12)
    assert regs[:ga * (first + 1)] == [0.0] * (ga * (first + 1))  # no penalty while the anchor is measured
    assert all(c[2] == calls[first][2] for c in calls[first:])  # measured once


def test_begin_step_gets_each_optimizer_steps_whole_rollout(tok, tmp_path):
    """entrocraft decides each step with its own rollout entropy: begin_step runs once per optimizer step, before
    the step's losses, with the step's 2 micro-batches (8 completions), never in evaluation."""
    t = EntropyGRPOTrainer(model=make_model(tok), reward_funcs=digit_reward, processing_class=tok,
                           train_dataset=make_dataset(), eval_dataset=make_dataset(2), method="entrocraft",
                           method_config={"total_steps": 3},
                           args=_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, eval_strategy="steps",
                                      eval_steps=1, per_device_eval_batch_size=4))
    order, measured = [], []
    begin, loss = t.method.begin_step, t.method.compute_loss

    def spy_begin(batch):
        order.append(("begin", batch.mask.size(0)))
        h = begin(batch)
        measured.append((h, float((batch.old_entropy * batch.mask).sum() / batch.mask.sum())))
        return h

    def spy_loss(batch, **kw):
        order.append(("loss" if kw["observe"] else "eval", batch.mask.size(0)))
        return loss(batch, **kw)

    t.method.begin_step, t.method.compute_loss = spy_begin, spy_loss
    t.train()
    train = [o for o in order if o[0] != "eval"]
    assert train == [("begin", 8), ("loss", 4), ("loss", 4)] * 3
    assert sum(o[0] == "eval" for o in order) == 6  # 3 evaluations of 2 batches
    assert all(h == pytest.approx(m, rel=1e-6) for h, m in measured)
    assert t.method.state_dict()["band"] == {"steps": 3, "entropy": measured[-1][0]}
    with pytest.raises(ValueError, match="steps_per_generation"):
        _trainer(tok, tmp_path, "entrocraft", gradient_accumulation_steps=2, steps_per_generation=3,
                 generation_batch_size=None)


def _threads_collective(n):
    """n in-process "ranks" (threads) whose all-gather meets at a barrier: FnCollective per rank."""
    slots, barrier = [None] * n, threading.Barrier(n)

    def make(rank):
        def gather(x):
            slots[rank] = x.clone()
            barrier.wait()
            out = torch.cat(slots)
            barrier.wait()
            return out
        return FnCollective(gather, world_size=n)
    return [make(r) for r in range(n)]


def test_metric_reduction_over_ranks_with_different_keys():
    """Rank 0 emits {a, b}, rank 1 {b, c} (say its micro-batch was fully masked): both get the same means over the
    union of keys, with two collectives whatever the keys."""
    colls = _threads_collective(2)
    calls = [0, 0]
    out = [None, None]
    data = [{"a": [(1.0, 1.0), (3.0, 1.0)], "b": [(2.0, 1.0)], "e": [(3.0, 10.0)]},
            {"b": [(4.0, 1.0)], "c": [(float("nan"), 1.0)], "e": [(1.0, 30.0), (5.0, 0.0)]}]

    def rank(r):
        s = MetricSums()
        for k, vals in data[r].items():
            for v, w in vals:
                s.add(k, torch.tensor(v), weight=w)
        inner = colls[r].all_gather

        def counted(x):
            calls[r] += 1
            return inner(x)
        colls[r].all_gather = counted
        out[r] = s.reduce(colls[r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert out[0] is not None and out[1] is not None
    assert calls == [2, 2]
    assert sorted(out[0]) == ["a", "b", "c", "e"]
    assert out[0]["a"] == 2.0 and out[0]["b"] == 3.0 and out[0]["e"] == pytest.approx(1.5)  # (30 + 30) / 40
    assert out[0]["c"] != out[0]["c"]  # NaN: no rank had a finite value
    assert json.dumps(out[0]) == json.dumps(out[1])


# ------------------------------------------------------------------------------------ checkpoints
def test_resume_restores_siren_anchor(tok, tmp_path):
    t1 = _trainer(tok, tmp_path, "siren", save_strategy="steps", save_steps=1, max_steps=2)
    t1.train()
    anchor = t1.method.state_dict()["anchor"]["value"]
    assert anchor is not None
    ckpt = os.path.join(str(tmp_path), "checkpoint-2")
    saved = json.load(open(os.path.join(ckpt, "rlvr_entropy_state.json")))
    assert saved == {"method": "siren", "state": {"anchor": {"value": anchor}}}
    t2 = _trainer(tok, tmp_path, "siren", model=make_model(tok, seed=5), max_steps=3)
    assert t2.method.state_dict()["anchor"]["value"] is None
    t2.train(resume_from_checkpoint=ckpt)
    assert t2.method.state_dict()["anchor"]["value"] == anchor
    # a checkpoint without the state cannot restore a method with controllers
    os.remove(os.path.join(ckpt, "rlvr_entropy_state.json"))
    t3 = _trainer(tok, tmp_path, "siren", max_steps=3)
    with pytest.raises(ValueError, match="has no rlvr_entropy_state.json"):
        t3.train(resume_from_checkpoint=ckpt)


def test_save_refuses_state_that_differs_across_ranks(tok, tmp_path):
    t = _trainer(tok, tmp_path, "siren")
    t.collective = FnCollective(lambda x: torch.cat([x, x]), world_size=2)
    t._check_same_state(t._controller_payload())  # same digest on both "ranks": fine
    t.collective = FnCollective(lambda x: torch.cat([x, x + 1]), world_size=2)
    with pytest.raises(RuntimeError, match="differs across ranks"):
        t._check_same_state(t._controller_payload())


# ------------------------------------------------------------------------------------ inputs and diagnostics
def test_group_reward_reaches_the_method(tok, tmp_path):
    """Each completion carries its group's mean reward (thermostat's reach-gated floor reads it), std and size."""
    t = _trainer(tok, tmp_path, "thermostat", {}, model=_saved_model(tok, tmp_path))  # its pull: TRL's reference
    seen = []
    inner = t.method.compute_loss

    def spy(batch, **kw):
        seen.append((batch.rewards.detach().clone(), batch.group_reward.detach().clone(),
                     batch.group_reward_std.detach().clone(), batch.group_size.clone()))
        return inner(batch, **kw)

    t.method.compute_loss = spy
    t.train()
    rewards = torch.cat([s[0] for s in seen])
    group = torch.cat([s[1] for s in seen])
    std = torch.cat([s[2] for s in seen])
    assert torch.equal(torch.cat([s[3] for s in seen]), torch.full((8,), 4))
    # the group std goes with the group mean: the (unbiased) std of the 4 rewards whose mean it is
    combos = torch.combinations(rewards, 4)
    for m, sd in zip(group.tolist(), std.tolist()):
        i = int((combos.mean(1) - m).abs().argmin())
        assert sd == pytest.approx(float(combos[i].std()), abs=1e-6)
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
    assert "thermostat/floor_scale" in logged and t.method.reach.steps > 0


def test_entropy_change_diagnostics_logged(tok, tmp_path):
    t = EntropyGRPOTrainer(model=make_model(tok), reward_funcs=digit_reward, args=_args(tmp_path, learning_rate=1e-3),
                           train_dataset=make_dataset(), processing_class=tok, method="grpo", diagnostics_every=1)
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


def test_docs_example_runs(monkeypatch, tmp_path):
    """The offline ```python example of docs/engines/trl.md runs as written."""
    text = (ROOT / "docs" / "engines" / "trl.md").read_text()
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M) if "Qwen/" not in b]
    assert blocks, "docs/engines/trl.md must hold a runnable example"
    monkeypatch.chdir(ROOT)
    for code in blocks:
        exec(compile(code, "<docs/engines/trl.md>", "exec"), {"__name__": "__example__"})
