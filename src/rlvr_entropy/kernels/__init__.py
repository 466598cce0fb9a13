"""Kernels: logits statistics computed from hidden states and the LM head in tiles, never as [N, V] logits.

* :func:`lm_head_stats`: the functional core (hidden [N, H], weight [V, H], bias, token ids, temperature ->
  the requested :class:`~rlvr_entropy.stats.Stat` values [N], with a recomputing backward);
* :class:`LMHeadSource`: a micro-batch's distribution for ``TokenBatch.lm_head`` (masking, caching, one pass per
  request set), and :func:`lm_head_batch_fields`, what an engine passes to ``TokenBatch`` instead of logits;
* :func:`requests_for`: the statistics a method reads;
* :mod:`rlvr_entropy.kernels.hf`: hidden states and LM head of a Hugging Face causal LM (imports no engine).

Torch only. See docs/kernels.md.
"""
from rlvr_entropy.kernels.lm_head import (LMHeadSource, default_tile_size, lm_head_batch_fields, lm_head_stats,
                                          requests_for)
from rlvr_entropy.stats import Stat

__all__ = ["LMHeadSource", "Stat", "default_tile_size", "lm_head_batch_fields", "lm_head_stats", "requests_for"]
