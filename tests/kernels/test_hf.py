"""rlvr_entropy.kernels.hf: hidden states + LM head of a Hugging Face causal LM give the model's own logits."""
from __future__ import annotations

import pytest
import torch

from rlvr_entropy import stats
from rlvr_entropy.stats import Stat

transformers = pytest.importorskip("transformers")

from rlvr_entropy.kernels import hf  # noqa: E402

_TINY = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1)


def _model(name, **kw):
    cfg = getattr(transformers, f"{name}Config")(**_TINY, **kw)
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(cfg)


@pytest.mark.parametrize("name,kw", [("Llama", {}), ("Granite", {"logits_scaling": 4.0})])
def test_source_equals_the_models_logits(name, kw):
    m = _model(name, **kw)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, :2] = 0  # left padding of the prompt
    k, temp = 5, 0.7
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    comp = ids[:, -k:]
    src = hf.causal_lm_source(m, ids, am, logits_to_keep=k, token_ids=comp, mask=mask, temperature=temp)
    reqs = (Stat.log_prob(), Stat.entropy(), Stat.top_p_entropy(0.8, 20))
    src.prefetch(*reqs)
    ours = sum(src.get(r).sum() for r in reqs)
    params = [p for p in m.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    logits = m(input_ids=ids, attention_mask=am, logits_to_keep=k + 1).logits[:, :-1] / temp  # TRL's _full_logits
    ref = sum(stats.compute_stat(logits, r, mask=mask, token_ids=comp).sum() for r in reqs)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ours, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert m.get_output_embeddings().forward.__func__ is torch.nn.Linear.forward  # the recorder is gone
    # the backbone's output, captured during an ordinary forward, is the same hidden state (verl's fused path)
    hf.check_lm_head(m, backbone=True)
    with hf.capture_backbone_hidden(m) as seen:
        m(input_ids=ids, attention_mask=am)
    torch.testing.assert_close(seen["hidden"][:, -(k + 1):-1], src.hidden)


def test_soft_capping_and_unknown_post_processing_raise():
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**_TINY, head_dim=8))
    with pytest.raises(ValueError, match="soft-caps"):
        hf.lm_head_params(gemma)

    class Doubled(transformers.LlamaForCausalLM):
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits * 2  # a post-processing lm_head_params does not know about
            return out

    m = Doubled(transformers.LlamaConfig(**_TINY))
    with pytest.raises(ValueError, match="post-processes"):
        hf.check_lm_head(m)
    hf.check_lm_head(_model("Llama"))  # a plain model passes

    rescaled = _model("Llama")  # rescales hidden states between its backbone and its head
    rescaled.lm_head.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
    hf.check_lm_head(rescaled)  # the recorder sees the head's real input
    with pytest.raises(ValueError, match="backbone"):
        hf.check_lm_head(rescaled, backbone=True)
    with pytest.raises(ValueError, match="logits_to_keep"):
        hf.causal_lm_hidden(m, torch.zeros(1, 3, dtype=torch.long), None, 0)
    with pytest.raises(ValueError, match="causal LM"):
        hf.lm_head_params(torch.nn.Linear(2, 3))


def test_peft_lora_model_is_unwrapped_to_its_backbone_and_head():
    """A LoRA-wrapped model (what verl and TRL train with peft): the backbone hidden state recorded during its
    forward, times the head, gives its logits, and the LoRA weights get the source's gradient."""
    peft = pytest.importorskip("peft")
    m = peft.get_peft_model(_model("Llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    hf.check_lm_head(m, backbone=True)
    with hf.capture_backbone_hidden(m) as seen:
        logits = m(input_ids=ids).logits
    w, b, scale = hf.lm_head_params(m)
    torch.testing.assert_close(seen["hidden"] @ w.t(), logits, rtol=1e-5, atol=1e-5)
    src = hf.causal_lm_source(m, ids, None, logits_to_keep=3, token_ids=ids[:, -3:], mask=None)
    src.top_p_entropy(0.8).sum().backward()
    lora = [p for n, p in m.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora)
