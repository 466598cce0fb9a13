"""TRL engine, AEPO's second generation (EntropyGRPOTrainer(method="aepo"), rlvr_entropy/trl.py:
``_second_generation``): the plan's prompts are generated again at the plan's temperature (spied on the model's
``generate`` and on a fake vLLM), scored, and the rows ``assemble`` picks replace the first main rows with advantage
1 and their own group statistics; old / reference log-probs of the kept rows are a recomputation at the training
temperature with the generation's weights, vLLM's importance ratio of the kept rows corrects the engine mismatch
only (not the temperature); H_prev moves with the measured NLL and the T / k switch follows it; the state
round-trips through a checkpoint; options the second generation cannot honour raise.

Two processes (identical plans and state on both ranks, kept samples crossing a rank boundary):
test_trl_multiproc.py."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from rlvr_entropy.trl import EntropyGRPOTrainer  # noqa: E402
from tests.engines.tiny_hf import digit_reward, make_dataset, make_model, make_tokenizer  # noqa: E402
from tests.engines.trl_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)

TRAIN_T = 0.9  # the training temperature: distinct from both plan temperatures (1.2 / 0.8) and from 1
G = 4
#: 4 prompts x 4 per generation; resample_divisor 2: the first 2 prompts again (8 temperature samples); at most 3 kept
AEPO = {"resample_divisor": 2, "reinforce_sample_num": 3}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=16, num_generations=G,
                max_completion_length=6, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                save_strategy="no", bf16=False, seed=0, generation_batch_size=16, temperature=TRAIN_T,
                disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    """A saved tiny model, so that beta > 0 can build TRL's reference model offline (from this path)."""
    d = tmp_path_factory.mktemp("tiny_qwen2_aepo")
    make_model(tok, seed=1).save_pretrained(str(d))
    return str(d)


def _trainer(tok, tmp_path, method_config=None, model=None, logits_free=True, **args):
    return EntropyGRPOTrainer(model=model or make_model(tok), reward_funcs=digit_reward, args=_args(tmp_path, **args),
                              train_dataset=make_dataset(), processing_class=tok, method="aepo",
                              method_config=AEPO if method_config is None else method_config,
                              logits_free=logits_free)


class Spy:
    """Records, per generation batch: the plan, assemble's inputs and output, the main batch and the batch after the
    surgery (cloned before TRL shuffles it), this rank's temperature samples and their rewards, and (``recompute``)
    what a test computes from the model at that moment."""

    def __init__(self, t, recompute=None):
        self.t, self.recompute = t, recompute
        self.plans, self.updates, self.batches, self.extra, self.extra_rewards, self.computed = [], [], [], [], [], []
        m = t.method
        plan, assemble, second, gen, rewards = (m.rollout_plan, m.assemble, t._second_generation,
                                                t._generate_single_turn, t._calculate_rewards)

        def rollout_plan(num_prompts):
            p = plan(num_prompts)
            self.plans.append(p)
            return p

        def spy_assemble(main, extra):
            u = assemble(main, extra)
            self.updates.append((main.clone(), extra.clone(), u))
            return u

        def second_generation(inputs, out):
            main = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
            self._in_second = True
            try:
                new = second(inputs, out)
            finally:
                self._in_second = False
            self.batches.append((main, {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in new.items()}))
            if self.recompute is not None:
                self.computed.append(self.recompute(t, new))
            return new

        def generate_single_turn(prompt_ids, images, mm, num_generations, **kw):
            c, lp = gen(prompt_ids, images, mm, num_generations, **kw)
            if getattr(self, "_in_second", False):
                self.extra.append((list(prompt_ids), list(c), lp))
            return c, lp

        def calculate_rewards(inputs, prompts, completions, completion_ids):
            r = rewards(inputs, prompts, completions, completion_ids)
            if getattr(self, "_in_second", False):
                self.extra_rewards.append(r.clone())
            return r

        m.rollout_plan, m.assemble = rollout_plan, spy_assemble
        t._second_generation, t._generate_single_turn, t._calculate_rewards = (second_generation,
                                                                               generate_single_turn, calculate_rewards)


def _strip(ids, mask):
    return [int(x) for x, m in zip(ids.tolist(), mask.tolist()) if m]


@torch.no_grad()
def _log_probs(model, out, rows, temperature):
    """Log-probs [rows, T] of the completion tokens from the model's ordinary forward at ``temperature`` (0 where the
    completion mask is 0): an independent recomputation."""
    ids = torch.cat([out["prompt_ids"][rows], out["completion_ids"][rows]], 1)
    am = torch.cat([out["prompt_mask"][rows], out["completion_mask"][rows]], 1)
    T = out["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits[:, -T - 1:-1].float() / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, out["completion_ids"][rows][..., None]).squeeze(-1)
    return torch.where(out["completion_mask"][rows].bool(), lp, 0.0)


# ---------------------------------------------------------------------------------- the second generation
def test_second_generation_runs_at_the_plans_temperature_and_replaces_rows(tok, tmp_path):
    t = _trainer(tok, tmp_path)
    temps = []
    generate = t.model.generate

    def spy_generate(*a, **kw):  # what reaches transformers' generate
        temps.append((kw["generation_config"].temperature, kw["input_ids"].size(0)))
        return generate(*a, **kw)

    t.model.generate = spy_generate
    spy = Spy(t)
    t.train()
    # two generation batches (one optimizer step each): main at the training temperature, 16 rows; then the first 2
    # prompts x 4 at the plan's temperature: T_high while H_prev = 0 <= 0.5, then T_low once H_prev ~ 3 > 0.5
    assert temps == [(TRAIN_T, 16), (1.2, 8), (TRAIN_T, 16), (0.8, 8)]
    assert t.generation_config.temperature == TRAIN_T == t.generation_kwargs["temperature"]  # restored
    assert [(p.temperature, p.num_prompts) for p in spy.plans] == [(1.2, 2), (0.8, 2)]
    # H_prev: 0 at the start, then the step's NLL estimate (token mean of -log pi of the update batch's tokens)
    assert spy.plans[0].entropy == 0.0
    est = [h["aepo/entropy_estimate"] for h in t.state.log_history if "aepo/entropy_estimate" in h]
    assert spy.plans[1].entropy == pytest.approx(est[0], rel=1e-5) and spy.plans[1].entropy > 0.5
    assert t.method.h_prev.value == spy.plans[1].entropy
    for g, ((main_adv, extra_adv, upd), (main, new), (xp, xc, _), xr) in enumerate(
            zip(spy.updates, spy.batches, spy.extra, spy.extra_rewards)):
        qualified = int((extra_adv > 0.05).sum())
        assert qualified > 0, "the test needs kept samples"
        assert upd.k == (min(3, qualified) if g == 0 else min(3, qualified) // 2)  # k halves with T_low
        k = upd.k
        torch.testing.assert_close(main_adv, main["advantages"])
        # the temperature prompts are the batch's first 2 prompts
        assert [xp[i] for i in (0, 4)] == [_strip(main["prompt_ids"][r], main["prompt_mask"][r]) for r in (0, 4)]
        assert len(xp) == len(xc) == 8
        # rows 0..k-1: the kept temperature samples, in order; rows k..: the main rows k.., unchanged
        for j, e in enumerate(upd.extra_rows.tolist()):
            assert _strip(new["prompt_ids"][j], new["prompt_mask"][j]) == xp[e]
            assert _strip(new["completion_ids"][j], new["completion_mask"][j]) == list(xc[e])
            assert extra_adv[e] > 0.05
        Lc = main["completion_ids"].size(1)
        assert torch.equal(new["completion_ids"][k:, :Lc], main["completion_ids"][k:])
        assert torch.equal(new["completion_mask"][k:, :Lc], main["completion_mask"][k:])
        assert not new["completion_mask"][k:, Lc:].any()
        # advantages: 1 for the kept samples, the main rows' own after them
        torch.testing.assert_close(new["advantages"], torch.cat([torch.ones(k), main["advantages"][k:]]))
        # group statistics follow the rows: a kept sample carries its temperature group's
        rx = (xr * t.reward_weights).nansum(1)
        for j, e in enumerate(upd.extra_rows.tolist()):
            grp = rx[e // G * G:(e // G + 1) * G]
            assert new["rewards"][j] == pytest.approx(float(rx[e]))
            assert new["group_reward"][j] == pytest.approx(float(grp.mean()))
            assert new["group_reward_std"][j] == pytest.approx(float(grp.std()))
        for f in ("rewards", "group_reward", "group_reward_std", "group_size"):
            assert torch.equal(new[f][k:], main[f][k:]), f
        assert int(new["num_items_in_batch"]) == int(new["completion_mask"].sum())
        assert "old_per_token_logps" not in new  # on-policy: the loss's own log-probs are the old ones
    logged = set().union(*[set(h) for h in t.state.log_history])
    assert {"aepo/second_generation/reward", "aepo/second_generation/qualified", "aepo/reinforce_samples"} <= logged


def test_kept_rows_are_padded_and_masked_as_trl_pads_and_masks(tok, tmp_path):
    """pad_to_multiple_of and mask_truncated_completions apply to the kept rows as TRL applies them to its own: widths
    stay multiples, a kept sample that hit max_completion_length without EOS gets an all-zero completion mask."""
    t = _trainer(tok, tmp_path, max_steps=1, pad_to_multiple_of=4, mask_truncated_completions=True,
                 max_completion_length=3)
    spy = Spy(t)
    t.train()
    (main, new), (_, _, upd), (_, xc, _) = spy.batches[0], spy.updates[0], spy.extra[0]
    assert upd.k > 0
    assert new["prompt_ids"].size(1) % 4 == 0 and new["completion_ids"].size(1) % 4 == 0
    eos = set(t.eos_token_ids) | {tok.pad_token_id}
    truncated = 0
    for j, e in enumerate(upd.extra_rows.tolist()):
        c = list(xc[e])
        assert new["completion_ids"][j, :len(c)].tolist() == c
        mask = new["completion_mask"][j]
        if c[-1] not in eos:
            truncated += 1
            assert not mask.any()
        else:
            assert mask.tolist() == [1] * len(c) + [0] * (mask.numel() - len(c))
    assert truncated > 0, "the test needs a truncated kept sample"
    assert int(new["num_items_in_batch"]) == int(new["completion_mask"].sum())


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_old_and_reference_log_probs_of_kept_rows_are_recomputed(beta, tok, tmp_path, model_dir):
    """Off-policy (num_iterations=2: TRL carries old_per_token_logps): the kept rows' old log-probs are the policy's
    at the training temperature with the weights of the generation (not at the sampling temperature); with beta the
    reference log-probs too. Checked at the second generation, after two optimizer steps (policy != reference)."""
    def recompute(t, out):
        rows = list(range(out["completion_ids"].size(0)))
        res = {"old": _log_probs(t.model, out, rows, TRAIN_T), "old_at_plan_t": _log_probs(t.model, out, rows, 1.2)}
        if t.ref_model is not None:
            res["ref"] = _log_probs(t.ref_model, out, rows, TRAIN_T)
        return res

    t = _trainer(tok, tmp_path, model=Qwen2ForCausalLM.from_pretrained(model_dir), num_iterations=2, max_steps=4,
                 beta=beta)
    spy = Spy(t, recompute)
    t.train()
    assert len(spy.batches) == 2
    for g, ((main, new), (_, _, upd), got) in enumerate(zip(spy.batches, spy.updates, spy.computed)):
        k, m = upd.k, new["completion_mask"].bool()
        assert k > 0
        old = new["old_per_token_logps"]
        assert not torch.isnan(old).any()
        torch.testing.assert_close(old[:k] * m[:k], got["old"][:k], atol=1e-5, rtol=1e-5)
        Lc = main["completion_ids"].size(1)
        torch.testing.assert_close(old[k:, :Lc], main["old_per_token_logps"][k:])  # the main rows keep theirs
        assert ((old[:k] * m[:k] - got["old_at_plan_t"][:k]).abs() > 1e-3).any()  # the check can tell T apart
        if beta:
            ref = new["ref_per_token_logps"]
            torch.testing.assert_close(ref[:k] * m[:k], got["ref"][:k], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ref[k:, :Lc], main["ref_per_token_logps"][k:])
            if g == 1:
                assert ((ref[:k] - old[:k]).abs() * m[:k] > 1e-4).any()  # the policy has moved from the reference
        else:
            assert "ref_per_token_logps" not in new


def test_kept_rows_get_reference_log_probs_for_a_method_that_reads_them_with_beta_zero(tok, tmp_path, model_dir):
    """beta=0 and a method that reads ``ref_log_prob`` (aepo with it added to its needs): TRL's reference is built and
    run for it (test_trl_reference.py), and the kept rows' reference log-probs are recomputed with it at the training
    temperature, the main rows keep theirs; no fixed KL term is added (the trainer's beta stays 0)."""
    from rlvr_entropy.trl import resolve_method

    def recompute(t, out):
        return {"ref": _log_probs(t.ref_model, out, list(range(out["completion_ids"].size(0))), TRAIN_T)}

    args = _args(tmp_path, max_steps=4, beta=0.0)
    method = resolve_method("aepo", AEPO, args)
    method.needs = (*method.needs, "ref_log_prob")
    t = EntropyGRPOTrainer(model=Qwen2ForCausalLM.from_pretrained(model_dir), reward_funcs=digit_reward, args=args,
                           train_dataset=make_dataset(), processing_class=tok, method=method)
    assert t.ref_model is not None and t.beta == 0.0
    seen = []
    compute = t.method.compute_loss
    t.method.compute_loss = lambda batch, **kw: seen.append(batch.ref_log_prob is not None) or compute(batch, **kw)
    spy = Spy(t, recompute)
    t.train()
    assert len(spy.batches) == 4 and seen and all(seen)  # one generation batch per optimizer step
    fresh = Qwen2ForCausalLM.from_pretrained(model_dir)
    for (main, new), (_, _, upd), got in zip(spy.batches, spy.updates, spy.computed):
        k, m = upd.k, new["completion_mask"].bool()
        assert k > 0
        ref = new["ref_per_token_logps"]
        assert not torch.isnan(ref).any()
        torch.testing.assert_close(ref[:k] * m[:k], got["ref"][:k], atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # the initial weights: the reference is frozen
            torch.testing.assert_close(ref[:k] * m[:k], _log_probs(fresh, new, list(range(k)), TRAIN_T), atol=1e-5,
                                       rtol=1e-5)
        Lc = main["completion_ids"].size(1)
        torch.testing.assert_close(ref[k:, :Lc], main["ref_per_token_logps"][k:])
    assert t.beta == 0.0 and not any("kl" in h for h in t.state.log_history)


class FakeVLLM:
    """Stands in for TRL's VLLMGeneration (vLLM is not installed here): samples with the trainer's model at
    ``self.temperature``, read at every call as VLLMGeneration reads it, and returns each sampled token's log-prob at
    that temperature (as vLLM's processed log-probs)."""

    def __init__(self, trainer, temperature, max_tokens):
        self.t, self.temperature, self.max_tokens = trainer, temperature, max_tokens
        self.calls: list[tuple[float, int]] = []
        self.gen = torch.Generator().manual_seed(0)

    def sync_weights(self):
        pass

    @torch.no_grad()
    def generate(self, prompts, images, num_generations, profiler=None):
        T = self.temperature
        self.calls.append((T, len(prompts)))
        eos = self.t.eos_token_ids
        completions, logprobs = [], []
        for p in prompts:
            ids, c, lps = list(p), [], []
            for _ in range(self.max_tokens):
                logits = self.t.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float() / T
                logp = torch.log_softmax(logits, -1)
                x = int(torch.multinomial(logp.exp(), 1, generator=self.gen))
                c.append(x)
                lps.append([float(logp[x])])
                ids.append(x)
                if x in eos:
                    break
            completions.append(c)
            logprobs.append(lps)
        return prompts, completions, logprobs, None


@pytest.mark.parametrize("mode, logits_free", [("token_truncate", True), ("sequence_mask", False)])
def test_vllm_path_sets_the_temperature_and_corrects_only_the_engine_mismatch(mode, logits_free, tok, tmp_path):
    """With vLLM (a fake: same model, so no engine mismatch) the plan's temperature reaches vLLM for the second
    generation only; the kept rows carry vLLM's sampling log-probs, and their importance ratio compares the trainer
    and vLLM at the sampling temperature (1 here), not the training temperature's log-probs with the sampling ones
    (which would undo the temperature). The trainer's log-probs at that temperature come from the tiled LM head or,
    with logits_free=False, from materialized logits."""
    t = _trainer(tok, tmp_path, max_steps=1, logits_free=logits_free)
    fake = FakeVLLM(t, TRAIN_T, max_tokens=6)
    t.use_vllm, t.vllm_generation, t._last_loaded_step = True, fake, -1
    t.vllm_importance_sampling_correction, t.vllm_importance_sampling_mode = True, mode
    spy = Spy(t)
    t.train()
    assert fake.calls == [(TRAIN_T, 16), (1.2, 8)] and fake.temperature == TRAIN_T
    (main, new), (_, _, upd), (_, xc, xlp) = spy.batches[0], spy.updates[0], spy.extra[0]
    k, m = upd.k, new["completion_mask"].bool()
    assert k > 0
    for j, e in enumerate(upd.extra_rows.tolist()):
        n = len(xc[e])
        torch.testing.assert_close(new["sampling_per_token_logps"][j, :n], torch.tensor(xlp[e]))
        assert not new["sampling_per_token_logps"][j, n:].any()
    ratio = new["importance_sampling_ratio"]
    assert ratio.shape[1] == (1 if mode.startswith("sequence") else new["completion_ids"].size(1))
    torch.testing.assert_close(ratio[:k], torch.ones_like(ratio[:k]), atol=1e-4, rtol=0)
    torch.testing.assert_close(ratio[k:], torch.ones_like(ratio[k:]), atol=1e-4, rtol=0)  # the main rows: also 1
    # the naive ratio (training-temperature old log-probs over the sampling ones) is far from 1 on the kept rows
    old = new["old_per_token_logps"]
    naive = ((old[:k] - new["sampling_per_token_logps"][:k]) * m[:k]).abs()
    assert (naive > 1e-2).any()


# ------------------------------------------------------------------------------------------- state
def test_state_round_trips_through_a_checkpoint(tok, tmp_path):
    """H_prev and the step's pending measurement are saved (rlvr_entropy_state.json) and restored: the resumed run's
    first plan uses the measurement of the last step before the checkpoint."""
    t1 = _trainer(tok, tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    t1.train()
    state = t1.method.state_dict()
    assert state["entropy"]["pending_count"] > 0 and state["entropy"]["value"] > 0.5
    ckpt = os.path.join(str(tmp_path), "checkpoint-2")
    saved = json.load(open(os.path.join(ckpt, "rlvr_entropy_state.json")))
    assert saved == {"method": "aepo", "state": state}
    t2 = _trainer(tok, tmp_path, model=make_model(tok, seed=4), max_steps=3)
    spy = Spy(t2)
    t2.train(resume_from_checkpoint=ckpt)
    e = state["entropy"]
    assert spy.plans[0].entropy == pytest.approx(e["pending_sum"] / e["pending_count"], rel=1e-12)
    assert t2.method.h_prev.closes == e["closes"] + 1


# ------------------------------------------------------------------------------------------- refusals
def test_options_the_second_generation_cannot_honour_raise(tok, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="generation_kwargs sets 'temperature'"):
        _trainer(tok, tmp_path, generation_kwargs={"temperature": 0.7})

    def rollout(prompts, trainer):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="rollout_func owns the sampling"):
        EntropyGRPOTrainer(model=make_model(tok), reward_funcs=digit_reward, args=_args(tmp_path),
                           train_dataset=make_dataset(), processing_class=tok, method="aepo", rollout_func=rollout)
    # the temperature samples must split evenly over the processes, as TRL splits every generation: 8 over 3 cannot
    t = _trainer(tok, tmp_path)
    monkeypatch.setattr(type(t.accelerator), "num_processes", property(lambda self: 3))
    with pytest.raises(ValueError, match="8 completions, which must split evenly over the 3 processes"):
        t._check_second_generation()
