"""2 gloo ranks: the tiled LM head on an FSDP2-sharded model, as the verl plugin feeds it (the harness of
tests/engines/test_fsdp_lm_head.py).

``fully_shard`` on each decoder layer and on the root with ``reshard_after_forward=True`` (verl's FSDP2 engine), a
tiny Qwen2 with tied embeddings. Each rank: a forward that records the backbone's hidden state
(``capture_backbone_hidden``); the model's own logits give one term of the loss (their gradient reaches the tied
weight through FSDP's reduce-scatter), an :class:`LMHeadSource` on ``hooks._gathered(lm_head.weight)`` (the weight is
a DTensor shard once the root's forward is over) gives the others (top-p entropy, log-prob, change terms: their
gradient reaches the weight through the gather's backward). Rank 0 writes every parameter's full gradient to
``OUT`` (torch.save); the test compares it with one process's gradient of the mean of both ranks' losses.

    torchrun --nproc_per_node 2 tests/engines/fsdp_lm_head_run.py OUT
"""
from __future__ import annotations

import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def rank_data(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(3, 21, (3, 7), generator=g)  # different data per rank


def rank_loss(model, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from rlvr_entropy.kernels import LMHeadSource
    from rlvr_entropy.kernels.hf import capture_backbone_hidden
    from rlvr_entropy.stats import Stat

    with capture_backbone_hidden(model) as seen:
        logits = model(input_ids=ids).logits
    hidden = seen["hidden"]
    w = weight() if callable(weight) else weight  # after the forward, as the verl loss reads it
    src = LMHeadSource(hidden[:, :-1], w, None, token_ids=ids[:, 1:], temperature=0.8)
    src.prefetch(Stat.log_prob(), Stat.top_p_entropy(0.8), Stat.change_terms())
    a, b = src.change_terms()
    return (0.1 * logits.float().logsumexp(-1).mean() + src.log_prob().mean() + src.top_p_entropy(0.8).mean()
            + 0.5 * (a * b).mean())


def make_model():
    from tests.engines.tiny_hf import make_model as mk, make_tokenizer

    return mk(make_tokenizer(), hidden=32, layers=2, seed=3).float()


def main() -> int:
    from torch.distributed.fsdp import fully_shard

    from rlvr_entropy.verl.hooks import _gathered

    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = torch.distributed.get_rank()
    torch.set_num_threads(1)
    model = make_model()
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    loss = rank_loss(model, rank_data(rank), lambda: _gathered(model.lm_head.weight))
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    kinds = type(model.lm_head.weight).__name__
    if rank == 0:
        torch.save({"grads": grads, "weight_kind": kinds}, sys.argv[1])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
