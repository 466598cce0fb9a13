"""TRL engine, reference log-probs for a method that reads them (``"ref_log_prob" in method.needs``: the thermostat's
pull toward the reference), rlvr_entropy/trl.py ``EntropyGRPOTrainer._reference_for_method``.

With ``beta=0`` GRPOTrainer builds no reference; EntropyGRPOTrainer has TRL build, prepare and run its own anyway and
keeps the user's beta for the loss. Checked here on one process with a tiny Qwen2 (saved to a folder: TRL loads its
reference from the model's path; nothing is downloaded):

* the ref log-probs the method sees are the initial weights' at the training temperature (an independent forward of
  the saved model), computed once per generation batch, and differ from the policy's once it has moved;
* no fixed KL term with beta=0 (the loss equals grpo's plus the method's own pull, exactly), both terms with beta != 0;
* a method that does not read the reference builds none; a model without a path is refused with a clear error;
  ``sync_ref_model`` keeps syncing the reference; with PEFT the reference is the model with its adapters disabled.

The AEPO second generation's kept rows: test_trl_aepo.py; two processes: test_trl_multiproc.py (thermostat).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from rlvr_entropy.methods.thermostat import pull_term  # noqa: E402
from rlvr_entropy.core.aggregation import agg_loss  # noqa: E402
from rlvr_entropy.trl import EntropyGRPOTrainer  # noqa: E402
from tests.engines.tiny_hf import digit_reward, make_dataset, make_model, make_tokenizer  # noqa: E402
from tests.engines.trl_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)

TRAIN_T = 0.7  # the training temperature: the reference must be scored at it, not at 1
#: the pull acts from the second step on: a floor far above the tiny model's entropy (~3 nats) makes u > 0
PULL = {"target": 10.0, "reach_tol": None, "pull_coef": 0.5}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=6, max_steps=3, learning_rate=5e-2, logging_steps=1, report_to=[],
                save_strategy="no", bf16=False, seed=0, generation_batch_size=8, temperature=TRAIN_T,
                disable_tqdm=True, beta=0.0)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    """A saved tiny model: TRL builds its reference by loading the policy's path again."""
    d = tmp_path_factory.mktemp("tiny_qwen2_ref")
    make_model(tok, seed=4).save_pretrained(str(d))
    return str(d)


def _trainer(tok, tmp_path, model, method="thermostat", method_config=None, **args):
    return EntropyGRPOTrainer(model=model, reward_funcs=digit_reward, args=_args(tmp_path, **args),
                              train_dataset=make_dataset(), processing_class=tok, method=method,
                              method_config=PULL if method_config is None and method == "thermostat" else method_config)


@torch.no_grad()
def _log_probs(model, inputs, temperature):
    """Log-probs [B, T] of the completion tokens from the model's ordinary forward at ``temperature`` (0 where the
    completion mask is 0): an independent computation."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits[:, -T - 1:-1].float() / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)
    return torch.where(inputs["completion_mask"].bool(), lp, 0.0)


def _spy(t):
    """Record, per training micro-batch: the trainer's inputs and what the method saw (ref_log_prob, log_prob, mask)."""
    seen = []
    loss, method_loss = t._compute_loss, t.method.compute_loss

    def compute_loss(model, inputs):
        seen.append({"inputs": {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                                for k, v in inputs.items()}, "step": t.state.global_step})
        return loss(model, inputs)

    def spy_method(batch, **kw):
        rec = seen[-1]
        rec["ref"] = None if batch.ref_log_prob is None else batch.clean(batch.ref_log_prob).detach().clone()
        rec["log_prob"] = batch.clean(batch.log_prob).detach().clone()
        rec["mask"] = batch.mask.clone()
        return method_loss(batch, **kw)

    t._compute_loss, t.method.compute_loss = compute_loss, spy_method
    return seen


def test_the_method_reads_the_initial_policys_log_probs_with_beta_zero(tok, tmp_path, model_dir):
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    t = _trainer(tok, tmp_path, model)
    assert t.beta == 0.0 and t.args.beta == 0.0  # the user's, after TRL's __init__ saw a nonzero one
    assert t.ref_model is not None and t.ref_model is not t.model
    initial = {k: v.detach().clone() for k, v in t.ref_model.named_parameters()}
    seen = _spy(t)
    gens, ref_forwards = [], []
    generate, ref_forward = t._generate_and_score_completions, t.ref_model.forward
    t._generate_and_score_completions = lambda inputs: gens.append(1) or generate(inputs)
    t.ref_model.forward = lambda *a, **k: ref_forwards.append(1) or ref_forward(*a, **k)
    t.train()
    assert t.beta == 0.0
    # 3 steps on 2 generation batches of 8 rows (steps_per_generation 2); TRL scores 4 rows per reference forward
    assert len(seen) == 3 and len(gens) == 2 and len(ref_forwards) == 2 * 2
    fresh = Qwen2ForCausalLM.from_pretrained(model_dir)  # the initial weights, independently
    for rec in seen:
        assert rec["ref"] is not None
        expect = _log_probs(fresh, rec["inputs"], TRAIN_T)
        torch.testing.assert_close(rec["ref"], expect, atol=2e-5, rtol=1e-5)
        assert ((rec["ref"] - _log_probs(fresh, rec["inputs"], 1.0)).abs() > 1e-3).any()  # the test tells T apart
    last = seen[-1]  # after two optimizer steps the policy has moved away from the reference
    assert ((last["ref"] - last["log_prob"]).abs()[last["mask"]] > 1e-3).any()
    assert not all(torch.equal(initial[k], v) for k, v in t.model.named_parameters())
    assert all(torch.equal(initial[k], v) for k, v in t.ref_model.named_parameters())  # frozen
    logged = [h for h in t.state.log_history if "thermostat/kl" in h]
    assert logged and logged[-1]["thermostat/pull_coef"] > 0 and logged[-1]["thermostat/kl"] > 0  # the pull acted
    assert not any("kl" in h for h in t.state.log_history)  # TRL's fixed-KL metric: no such term


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
            # a reference away from the policy: every k3 term is nonzero
            "ref_per_token_logps": -2.0 - torch.rand(B, T, generator=g),
            "num_items_in_batch": completion_mask.sum().float()}


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_no_fixed_kl_term_with_beta_zero_and_both_terms_with_beta(beta, tok, tmp_path, model_dir):
    """The loss of the thermostat (u forced to 0.6) minus grpo's on the same inputs (the same reference in them)
    is exactly the method's pull u x pull_coef x k3 (TRL's beta x KL adds to both, or to neither): with beta=0 the
    only pull is the method's; with beta=0.1 TRL's fixed term acts too (it is the difference with beta=0)."""
    losses = {}
    for name, b in (("thermostat", beta), ("grpo", beta), ("thermostat", 0.0)):
        if (name, b) in losses:
            continue
        model = Qwen2ForCausalLM.from_pretrained(model_dir)
        t = _trainer(tok, tmp_path, model, name, beta=b)
        assert t.beta == b
        if name == "thermostat":
            t.method.pi.u = 0.6
        t.model.eval()  # evaluation mode: the controllers are not touched, the loss is the same
        inputs = _inputs(tok)
        losses[name, b] = t._compute_loss(model, inputs).detach()
        lp = _log_probs(model, inputs, TRAIN_T)
    mask = inputs["completion_mask"].bool()
    n = mask.sum()
    pull = 0.6 * PULL["pull_coef"] * agg_loss(pull_term(lp, inputs["ref_per_token_logps"], mask), mask, "token-mean")
    # TRL's dapo normalization of one eval micro-batch: token sum / num_items_in_batch, i.e. the token mean here
    torch.testing.assert_close(losses["thermostat", beta] - losses["grpo", beta], pull, atol=1e-5, rtol=1e-4)
    assert float(pull) > 1e-2
    if beta:
        ref = inputs["ref_per_token_logps"]
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        fixed = beta * torch.where(mask, kl, 0.0).sum() / n  # use_bias_correction_kl: ratio 1 on-policy
        torch.testing.assert_close(losses["thermostat", beta] - losses["thermostat", 0.0], fixed, atol=1e-5,
                                   rtol=1e-4)
        assert float(fixed) > 1e-2


def test_methods_that_do_not_read_the_reference_build_none(tok, tmp_path, model_dir):
    """No reference model (memory) for grpo (nor siren, which reads logits), even from a path; the thermostat builds
    one, with its defaults too; a model without a path cannot give TRL its reference: a clear error (grpo built from
    a config is fine)."""
    for name in ("grpo", "siren"):
        t = _trainer(tok, tmp_path, Qwen2ForCausalLM.from_pretrained(model_dir), name)
        assert "ref_log_prob" not in t.method.needs and t.ref_model is None and not t._ref_for_method
    t = _trainer(tok, tmp_path, make_model(tok), "grpo")  # built from a config: fine without a reference
    assert t.ref_model is None
    for cfg in (None, {}):  # the test's PULL, and the thermostat's defaults
        with pytest.raises(ValueError, match=r"ref_log_prob.*_name_or_path.*save_pretrained"):
            _trainer(tok, tmp_path, make_model(tok), "thermostat", cfg)
        t = _trainer(tok, tmp_path, Qwen2ForCausalLM.from_pretrained(model_dir), "thermostat", cfg)
        assert t.method.needs == ("ref_log_prob",) and t.ref_model is not None and t._ref_for_method
    # the model's own path also works (TRL loads the policy and its reference from it)
    t = _trainer(tok, tmp_path, model_dir)
    assert t.ref_model is not None and t.beta == 0.0


def test_sync_ref_model_keeps_syncing_the_reference(tok, tmp_path, model_dir):
    """TRL's SyncRefModelCallback is installed for the reference (TRL refuses sync_ref_model with beta=0 otherwise):
    with mixup alpha 1 every step, the reference is the policy after each step."""
    t = _trainer(tok, tmp_path, Qwen2ForCausalLM.from_pretrained(model_dir), max_steps=2, sync_ref_model=True,
                 ref_model_sync_steps=1, ref_model_mixup_alpha=1.0)
    initial = {k: v.detach().clone() for k, v in t.ref_model.named_parameters()}
    t.train()
    assert t.beta == 0.0
    policy = dict(t.model.named_parameters())
    assert all(torch.equal(policy[k], v) for k, v in t.ref_model.named_parameters())
    assert not all(torch.equal(initial[k], v) for k, v in t.ref_model.named_parameters())
    with pytest.raises(ValueError, match="sync_ref_model=True"):  # TRL's own refusal, for a method without a pull
        _trainer(tok, tmp_path, Qwen2ForCausalLM.from_pretrained(model_dir), "grpo", sync_ref_model=True)


def test_peft_reference_is_the_model_with_its_adapters_disabled(tok, tmp_path):
    """A LoRA adapter (no path needed): no reference copy; the method sees the base model's log-probs (adapters off),
    which differ from the policy's once the adapter has trained. sync_ref_model with PEFT: TRL's refusal."""
    peft = pytest.importorskip("peft")
    model = make_model(tok, seed=5)
    base = copy.deepcopy(model)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    t = EntropyGRPOTrainer(model=model, reward_funcs=digit_reward, args=_args(tmp_path, max_steps=3),
                           train_dataset=make_dataset(), processing_class=tok, method="thermostat", method_config=PULL,
                           peft_config=lora)
    assert t.ref_model is None and t.beta == 0.0
    seen = _spy(t)
    t.train()
    assert len(seen) == 3
    for rec in seen:
        torch.testing.assert_close(rec["ref"], _log_probs(base, rec["inputs"], TRAIN_T), atol=2e-5, rtol=1e-5)
    last = seen[-1]
    assert ((last["ref"] - last["log_prob"]).abs()[last["mask"]] > 1e-4).any()
    with pytest.raises(NotImplementedError, match="sync_ref_model"):
        EntropyGRPOTrainer(model=make_model(tok), reward_funcs=digit_reward,
                           args=_args(tmp_path, sync_ref_model=True), train_dataset=make_dataset(),
                           processing_class=tok, method="thermostat", method_config=PULL, peft_config=lora)
