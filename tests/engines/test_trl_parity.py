"""Method grpo under EntropyGRPOTrainer reproduces trl.GRPOTrainer's own loss and gradient, option by option.

- per micro-batch, for every loss_type we map (grpo, bnpo, dr_grpo, dapo, luspo) x every case below: loss value and
  gradient of all parameters;
- end to end: a few optimizer steps of both trainers from the same initial model give the same parameters;
- adaptive_entropy follows TRL's own use_adaptive_entropy controller step for step;
- the MoE router aux loss and the multimodal forward inputs are those TRL uses.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import Qwen2ForCausalLM, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import rlvr_entropy  # noqa: E402
from rlvr_entropy.trl import LOSS_TYPES, EntropyGRPOTrainer, trl_pg_settings  # noqa: E402
from tests.engines.tiny_hf import digit_reward, make_dataset, make_model, make_tokenizer  # noqa: E402
from tests.engines.trl_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)

B, P, T = 4, 3, 6
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-7
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=T, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                save_strategy="no", bf16=False, seed=0, generation_batch_size=8, temperature=1.0, disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    """A saved tiny model, so that beta > 0 can build TRL's reference model offline (from this path)."""
    d = tmp_path_factory.mktemp("tiny_qwen2")
    make_model(tok, seed=1).save_pretrained(str(d))
    return str(d)


def _load(model_dir):
    return Qwen2ForCausalLM.from_pretrained(model_dir)


# -------------------------------------------------------------------------------------- per micro-batch parity
#: name -> (GRPOConfig overrides, input options)
CASES = {
    "on-policy": ({}, dict(old=False, empty=False, ga=1)),
    "empty row, GA=2": ({}, dict(old=False, empty=True, ga=2)),
    "off-policy old logps, GA=2": ({}, dict(old=True, empty=True, ga=2)),
    "epsilon_high=0.28 (GRPOConfig only)": ({"epsilon_high": 0.28}, dict(old=True, empty=False, ga=2)),
    "beta=0.1, use_bias_correction_kl": ({"beta": 0.1, "use_bias_correction_kl": True},
                                         dict(old=True, empty=True, ga=2, ref=True)),
    "beta=0.1, no bias correction": ({"beta": 0.1, "use_bias_correction_kl": False},
                                     dict(old=True, empty=True, ga=2, ref=True)),
    "delta=1.5": ({"delta": 1.5, "epsilon_high": 0.28}, dict(old=True, empty=False, ga=2)),
    "off_policy_mask_threshold=0.05": ({"off_policy_mask_threshold": 0.05}, dict(old=True, empty=True, ga=2)),
    "advantages [B, T]": ({}, dict(old=True, empty=True, ga=2, adv2d=True)),
}


def _inputs(tok, model, *, old, empty, ga, ref=False, adv2d=False):
    g = torch.Generator().manual_seed(0)
    V = len(tok)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    completion_ids = torch.randint(3, V, (B, T), generator=g)
    lengths = torch.tensor([6, 4, 0 if empty else 2, 5])
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    adv = torch.tensor([1.0, -0.5, 0.9, -1.3])
    if adv2d:
        adv = adv[:, None] * (1.0 + 0.5 * torch.rand(B, T, generator=g))
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones(B, P, dtype=torch.long),
              "completion_ids": completion_ids, "completion_mask": completion_mask, "advantages": adv,
              "old_per_token_logps": None,
              # the generation batch of both accumulation steps, every process (TRL's "dapo" normalizer)
              "num_items_in_batch": completion_mask.sum().float() * ga + 3.0}
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        lp = torch.log_softmax(model(input_ids=ids).logits[:, P - 1:-1].float(), -1)
        lp = lp.gather(-1, completion_ids[..., None]).squeeze(-1)
    if old:  # a policy a few updates behind (num_iterations > 1); row 3 (A < 0) drifts down
        shift = torch.tensor([0.0, 0.0, 0.0, -0.6])[:, None]
        old_lp = lp + 0.5 * torch.randn(lp.shape, generator=g) + shift
        old_lp[0, 0] = lp[0, 0] - torch.log(torch.tensor(1.24))  # A > 0, r = 1.24: clipped at 0.2, not at 0.28
        old_lp[3, 0] = lp[3, 0] - torch.log(torch.tensor(2.0))   # A < 0, r = 2: above delta = 1.5
        old_lp[1] = lp[1] + 0.25  # A < 0, mean KL 0.19 > 0.05: off_policy_mask_threshold drops the row ...
        old_lp[1, 1] = lp[1, 1]   # ... which has an unclipped token (r = 1)
        inputs["old_per_token_logps"] = old_lp
    if ref:
        inputs["ref_per_token_logps"] = lp + 0.3 * torch.randn(lp.shape, generator=g)
    return inputs


def _loss_and_grad(trainer, model, inputs, ga):
    trainer.current_gradient_accumulation_steps = ga
    model.train()
    model.zero_grad()
    loss = trainer._compute_loss(model, dict(inputs))
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grad


def _parity(tok, model_dir, tmp_path, loss_type, case, method="grpo"):
    over, opts = CASES[case]
    model = _load(model_dir)
    args = _args(tmp_path, loss_type=loss_type, **over)
    theirs = GRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=make_dataset(),
                         processing_class=tok)
    ours = EntropyGRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=make_dataset(),
                              processing_class=tok, method=method)
    inputs = _inputs(tok, model, **opts)
    l_ref, g_ref = _loss_and_grad(theirs, model, inputs, opts["ga"])
    l_our, g_our = _loss_and_grad(ours, model, inputs, opts["ga"])
    return inputs, (l_ref, g_ref), (l_our, g_our)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_grpo_matches_trl_loss_and_gradient(loss_type, case, tok, model_dir, tmp_path):
    inputs, (l_ref, g_ref), (l_our, g_our) = _parity(tok, model_dir, tmp_path, loss_type, case)
    assert abs(l_ref.item()) > 1e-4 and g_ref.abs().max() > 1e-4  # a non-trivial loss and gradient
    dl, dg = (l_our - l_ref).abs().item(), (g_our - g_ref).abs().max().item()
    print(f"PARITY {loss_type:8s} | {case:38s} | loss {dl:.2e} | grad {dg:.2e} (max |g| {g_ref.abs().max():.2e})")
    torch.testing.assert_close(l_our, l_ref, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    torch.testing.assert_close(g_our, g_ref, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_the_cases_exercise_their_option(tok, model_dir):
    """Each case's inputs reach the regime its option changes (and test_each_option_changes_trls_gradient checks
    that TRL's gradient does change)."""
    model = _load(model_dir)
    inp = _inputs(tok, model, **CASES["off_policy_mask_threshold=0.05"][1])
    with torch.no_grad():
        ids = torch.cat([inp["prompt_ids"], inp["completion_ids"]], 1)
        lp = torch.log_softmax(model(input_ids=ids).logits[:, P - 1:-1], -1)
        lp = lp.gather(-1, inp["completion_ids"][..., None]).squeeze(-1)
    r = torch.exp(lp - inp["old_per_token_logps"])
    m = inp["completion_mask"].bool()
    a = inp["advantages"][:, None].expand_as(r)
    assert bool((m & (a > 0) & (r > 1.2) & (r < 1.28)).any()), "epsilon_high 0.28 vs 0.2 must matter"
    assert bool((m & (a < 0) & (r > 1.5)).any()), "delta=1.5 must bind for some A < 0 token"
    keep = GRPOTrainer.get_off_policy_mask(a[:, :1], lp, inp["old_per_token_logps"], m.float(), 0.05)
    assert keep.flatten().tolist() == [1, 0, 1, 1], "the threshold must drop row 1 (A < 0) only"
    assert bool((m[1] & (r[1] > 0.8)).any()), "row 1 must have an unclipped token (else dropping it is moot)"


def _trl_grad(tok, model_dir, tmp_path, over, opts):
    model = _load(model_dir)
    t = GRPOTrainer(model=model, reward_funcs=digit_reward, args=_args(tmp_path, loss_type="dapo", **over),
                    train_dataset=make_dataset(), processing_class=tok)
    return _loss_and_grad(t, model, _inputs(tok, model, **opts), opts["ga"])[1]


@pytest.mark.parametrize("case,without", [
    ("epsilon_high=0.28 (GRPOConfig only)", {}),
    ("delta=1.5", {"epsilon_high": 0.28}),
    ("off_policy_mask_threshold=0.05", {}),
    ("beta=0.1, use_bias_correction_kl", {"beta": 0.1, "use_bias_correction_kl": False}),
])
def test_each_option_changes_trls_gradient(case, without, tok, model_dir, tmp_path):
    """On the same inputs, TRL's own gradient with the option differs from its gradient without it: the parity of
    that case is not vacuous."""
    over, opts = CASES[case]
    g_with = _trl_grad(tok, model_dir, tmp_path, over, opts)
    g_without = _trl_grad(tok, model_dir, tmp_path, without, opts)
    assert (g_with - g_without).abs().max() > 1e-4


def test_logits_path_matches_trl(tok, model_dir, tmp_path):
    """A method that needs logits scores with the ordinary forward: with grpo's loss it still equals TRL."""
    model = _load(model_dir)
    args = _args(tmp_path, loss_type="grpo", beta=0.1, temperature=0.7)
    method = rlvr_entropy.make_method("grpo", **{k: v for k, (v, _) in trl_pg_settings(args).items()})
    method.needs = ("logits",)  # take the full-logits path
    theirs = GRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=make_dataset(),
                         processing_class=tok)
    ours = EntropyGRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=make_dataset(),
                              processing_class=tok, method=method)
    inputs = _inputs(tok, model, old=True, empty=True, ga=2, ref=True)
    l_ref, g_ref = _loss_and_grad(theirs, model, inputs, 2)
    l_our, g_our = _loss_and_grad(ours, model, inputs, 2)
    torch.testing.assert_close(l_our, l_ref, rtol=LOSS_RTOL, atol=1e-6)
    torch.testing.assert_close(g_our, g_ref, rtol=GRAD_RTOL, atol=1e-6)


# -------------------------------------------------------------------------------------- end to end
def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_training_matches_trl(loss_type, tok, model_dir, tmp_path):
    """3 optimizer steps, 2 micro-batches each, every generation used twice (num_iterations=2: TRL computes old
    log-probs), truncated completions masked (some micro-batches fully masked), epsilon_high and beta set."""
    kw = dict(loss_type=loss_type, gradient_accumulation_steps=2, num_iterations=2, epsilon_high=0.28, beta=0.05,
              mask_truncated_completions=True, max_completion_length=8, max_steps=3, learning_rate=0.3,
              optim="sgd")  # SGD: the parameters move linearly in the gradient (Adam's first steps hide its scale)
    runs = []
    for cls in (GRPOTrainer, EntropyGRPOTrainer):
        model = _load(model_dir)
        t = cls(model=model, reward_funcs=digit_reward, args=_args(tmp_path / cls.__name__, **kw),
                train_dataset=make_dataset(), processing_class=tok)
        t.train()
        runs.append((_params(model), t.state.log_history))
    (p_ref, h_ref), (p_our, h_our) = runs
    assert (p_ref - _params(_load(model_dir))).abs().max() > 1e-2  # training moved the parameters
    torch.testing.assert_close(p_our, p_ref, rtol=0, atol=1e-6)
    assert [h.get("reward") for h in h_our] == [h.get("reward") for h in h_ref]  # the same completions


class _CoefRecorder(TrainerCallback):
    def __init__(self, read):
        self.read, self.seen = read, []

    def on_step_end(self, args, state, control, **kw):
        self.seen.append(self.read())


def test_adaptive_entropy_follows_trl_controller(tok, model_dir, tmp_path):
    """Same loss (bnpo: TRL's bonus is a token mean / accumulation, as ours under bnpo), same controller step:
    the coefficient and the measured entropy agree at every optimizer step, and so do the parameters."""
    # a strong bonus, so that the entropy falls below the target, and the bonus brings it back over it
    target, delta, cmax, steps = 2.95, 0.5, 2.0, 8
    common = dict(loss_type="bnpo", gradient_accumulation_steps=2, max_steps=steps, learning_rate=3e-2,
                  max_completion_length=8)
    model = _load(model_dir)
    theirs = GRPOTrainer(model=model, reward_funcs=digit_reward, processing_class=tok, train_dataset=make_dataset(),
                         args=_args(tmp_path / "trl", use_adaptive_entropy=True, entropy_coef=0.0,
                                    entropy_coef_min=0.0, entropy_coef_max=cmax, entropy_coef_delta=delta,
                                    entropy_target=target, **common))
    rec_t = _CoefRecorder(lambda: (theirs.entropy_coef, theirs._last_world_entropy))
    theirs.add_callback(rec_t)
    theirs.train()
    p_ref = _params(model)
    model = _load(model_dir)
    ours = EntropyGRPOTrainer(model=model, reward_funcs=digit_reward, processing_class=tok,
                              train_dataset=make_dataset(), args=_args(tmp_path / "ours", **common),
                              method="adaptive_entropy",
                              method_config={"target": target, "delta": delta, "coef_min": 0.0, "coef_max": cmax})
    rec_o = _CoefRecorder(lambda: (ours.method.ctrl.coef, ours.method.ctrl.last_entropy))
    ours.add_callback(rec_o)
    ours.train()
    coefs_t, ents_t = zip(*rec_t.seen)
    coefs_o, ents_o = zip(*rec_o.seen)
    assert len(coefs_o) == steps
    moves = [b - a for a, b in zip((0.0,) + coefs_t, coefs_t)]
    assert any(m > 0 for m in moves) and any(m < 0 for m in moves), coefs_t  # the controller went both ways
    assert min(abs(h - target) for h in ents_t) > 1e-3  # no tie (TRL compares with <=, ours with <)
    assert coefs_o == pytest.approx(coefs_t, abs=1e-12)
    assert ents_o == pytest.approx(ents_t, abs=1e-6)
    torch.testing.assert_close(_params(model), p_ref, rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------- MoE and multimodal
def _moe(tok, seed=0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                         shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, output_router_logits=True,
                         router_aux_loss_coef=0.5, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    return Qwen2MoeForCausalLM(cfg)


@pytest.mark.parametrize("path", ["fused", "logits"])
def test_moe_aux_loss_is_added_as_trl_does(path, tok, tmp_path):
    model = _moe(tok)
    args = _args(tmp_path, loss_type="dapo")
    theirs = GRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=make_dataset(),
                         processing_class=tok)
    assert theirs.aux_loss_enabled and theirs.router_aux_loss_coef == 0.5
    method = rlvr_entropy.make_method("grpo")
    if path == "logits":
        method.needs = ("logits",)
    ours = EntropyGRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=make_dataset(),
                              processing_class=tok, method=method)
    inputs = _inputs(tok, model, old=True, empty=True, ga=2)
    l_ref, g_ref = _loss_and_grad(theirs, model, inputs, 2)
    l_our, g_our = _loss_and_grad(ours, model, inputs, 2)
    torch.testing.assert_close(l_our, l_ref, rtol=LOSS_RTOL, atol=1e-6)
    torch.testing.assert_close(g_our, g_ref, rtol=GRAD_RTOL, atol=1e-6)
    theirs.aux_loss_enabled = False  # what TRL's loss would be without the aux term: it must differ
    l_noaux, _ = _loss_and_grad(theirs, model, inputs, 2)
    assert abs(l_ref.item() - l_noaux.item()) > 1e-2
    assert ours._metric_sums["train"].sums["aux_loss"][1] == 1.0  # logged once (this micro-batch)


MM = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes", "token_type_ids",
      "mm_token_type_ids", "image_position_ids")


def _mm_inputs(kind):
    """Fake multimodal inputs of the shapes TRL's processors give (2 images for 4 rows)."""
    if kind == "qwen_vl":  # patch rows + grid per image
        return {"pixel_values": torch.randn(6 + 4, 8), "image_grid_thw": torch.tensor([[1, 2, 3], [1, 2, 2]]),
                "num_images": [1, 0, 1, 0]}
    if kind == "llava":  # one image tensor per image, sizes, token types
        return {"pixel_values": torch.randn(2, 3, 4, 4), "image_sizes": torch.tensor([[4, 4], [4, 4]]),
                "num_images": [1, 1, 0, 0], "token_type_ids": torch.zeros(B, P + T, dtype=torch.long)}
    if kind == "idefics":  # per-row pixel values + attention mask
        return {"pixel_values": torch.randn(B, 1, 3, 4, 4), "pixel_attention_mask": torch.ones(B, 1, 4, 4),
                "num_images": [1, 1, 1, 1]}
    if kind == "lfm2":  # tile-indexed
        return {"pixel_values": torch.randn(3, 16, 8), "pixel_attention_mask": torch.ones(3, 16),
                "spatial_shapes": torch.tensor([[4, 4]] * 3), "num_tiles": [2, 0, 1, 0], "num_images": [1, 0, 1, 0]}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["qwen_vl", "llava", "idefics", "lfm2"])
def test_multimodal_inputs_reach_every_forward(kind, tok, tmp_path):
    """The same multimodal tensors TRL passes to its forward reach ours, on the fused and on the logits path."""
    model = make_model(tok)
    args = _args(tmp_path)
    theirs = GRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=make_dataset(),
                         processing_class=tok)
    siren = EntropyGRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=make_dataset(),
                               processing_class=tok, method="siren", method_config={"anchor_value": 1.0})
    grpo = EntropyGRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=make_dataset(),
                              processing_class=tok, method="grpo")
    seen: list = []
    inner = model.forward

    def recording_forward(*a, **kw):  # a text model: record the multimodal inputs, then drop them
        seen.append({k: kw.pop(k) for k in MM if k in kw})
        return inner(*a, **kw)

    model.forward = recording_forward
    inputs = {**_inputs(tok, make_model(tok), old=False, empty=False, ga=1), **_mm_inputs(kind)}
    calls = []
    for t in (theirs, grpo, siren):
        _loss_and_grad(t, model, inputs, 1)  # the logits-free route checks the LM head once, on its first call
        seen.clear()
        _loss_and_grad(t, model, inputs, 1)
        assert len(seen) == 1
        calls.append(seen[0])
    ref = calls[0]
    assert ref, "TRL passed no multimodal input: the case tests nothing"
    for got in calls[1:]:
        assert sorted(got) == sorted(ref)
        for k in ref:
            assert torch.equal(got[k], ref[k]), k
