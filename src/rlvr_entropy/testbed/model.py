"""The testbed's tiny decoder (a transformers Qwen2ForCausalLM built from a config, nothing from a hub) and
KV-cached batched sampling.

Default: width 128, 4 layers, 4 heads, MLP 384, tied embeddings: ~0.8M parameters for a ~22-token vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelConfig:
    """Size of the tiny decoder."""

    width: int = 128
    """Hidden size."""
    layers: int = 4
    """Number of transformer blocks."""
    heads: int = 4
    """Attention heads (no grouped-query sharing)."""
    mlp: int = 384
    """MLP intermediate size."""
    max_len: int = 64
    """Maximum sequence length (prompt + response)."""


def build_model(vocab_size: int, cfg: ModelConfig = ModelConfig(), seed: int = 0, pad_id: int = 0, eos_id: int = 1,
                bos_id: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if cfg.width % cfg.heads:
        raise ValueError(f"width ({cfg.width}) must be divisible by heads ({cfg.heads})")
    hf_cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=cfg.max_len, pad_token_id=pad_id, eos_token_id=eos_id,
                         bos_token_id=bos_id, tie_word_embeddings=True, attn_implementation="sdpa")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(hf_cfg)
    return model


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Samples:
    tokens: torch.Tensor  # [N, T] response ids, pad after EOS
    mask: torch.Tensor  # [N, T] bool, True on response tokens including EOS
    log_prob: torch.Tensor  # [N, T] log-prob of each sampled token under the sampling policy (0 at padding)
    entropy: torch.Tensor  # [N, T] entropy of the sampling distribution (0 at padding)


@torch.no_grad()
def sample(model, prompts: torch.Tensor, max_new_tokens: int, eos_id: int, pad_id: int = 0, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> Samples:
    """Sample one response per row of ``prompts`` [N, P] (same length, no padding) with a KV cache."""
    from transformers import DynamicCache

    was_training = model.training
    model.eval()
    N = prompts.shape[0]
    cache = DynamicCache()
    out = model(input_ids=prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
    toks, lps, ents = [], [], []
    done = torch.zeros(N, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float() / temperature  # [N, V]
        logp = torch.log_softmax(logits, -1)
        nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # [N]
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        toks.append(nxt)
        lps.append(logp.gather(1, nxt[:, None]).squeeze(1))
        ents.append(-(logp.exp() * logp).sum(-1))
        done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
    model.train(was_training)
    tokens = torch.stack(toks, 1)
    # mask: positions up to and including the first EOS (everything when no EOS was sampled)
    is_eos = tokens == eos_id
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long() == 0
    mask = before
    zero = torch.zeros(())
    return Samples(tokens, mask, torch.where(mask, torch.stack(lps, 1), zero), torch.where(mask, torch.stack(ents, 1), zero))
