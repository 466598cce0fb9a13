"""Benchmark: one loss + backward of siren, entropy_bonus (AEnt's clamped entropy) and lp_reg fed by the tiled
LM-head source (rlvr_entropy.kernels) against TRL 1.16's own GRPO path (trl/kernels/chunked_logprob.py:
ChunkedLogProbFunction, log-probs + entropy from a tiled, recomputed LM head, then the grpo loss).

    python benchmarks/bench_lm_head_trl.py [--sizes 2048,8192,16384] [--methods siren,entropy_bonus,lp_reg]
                                           [--rounds 2] [--hidden 64] [--json PATH] [--quick]

Per N (response tokens of the micro-batch, B x T with T = 1024) and implementation, in a fresh subprocess
(alternating order, ``--rounds`` rounds, medians): the wall time and peak extra resident memory (see
bench_lm_head.py) of one call from the last hidden states [B, T, H] to the gradients of hidden and LM-head weight:

* ``trl``: ChunkedLogProbFunction.apply(hidden, W, None, ids, T, 32768 (TRL's chunk), outputs=("entropy",)) ->
  TokenBatch(log_prob, entropy) -> grpo loss (equal to TRL's "grpo" loss, tests/engines) -> backward;
* ``ours-<method>``: kernels.lm_head_batch_fields(hidden, W, None, token_ids=ids, method=m) -> TokenBatch ->
  m.compute_loss -> backward (one tiled pass serves log_prob, entropy and the method's statistics);
* ``ours-grpo``: the same with grpo (our log-prob/entropy kernel alone, for reference).

Methods: the ones that read the distribution beyond log-prob and entropy: siren with anchor_value=1.0 (the penalty
and its top-p gradient are active), entropy_bonus with clamp_fraction=0.5 (AEnt's clamped entropy, the example of
docs/methods/entropy_bonus.md) and lp_reg with its defaults. (The thermostat, measured here before, reads only
ref_log_prob and the entropy: TRL's fused route, like grpo.) Same inputs as bench_lm_head.py (V = 151,936, H = 64,
float32, LLM-like logits, tokens sampled from the model). Targets (issue #14): memory <= 1.25x TRL's, flat in N past
the tile; time <= 1.5x TRL's.

``--route trainer`` measures the same through the engines instead: one ``_compute_loss`` + backward of TRL 1.16's
own ``GRPOTrainer`` (``loss_type="grpo"``, its fused LM head: log-probs and entropy from ChunkedLogProbFunction)
against ``EntropyGRPOTrainer`` (``logits_free=True``, the default) with each method, on a one-layer Qwen2 with
V = 151,936 and hidden size H (its LM head set LLM-like, as above), completions of T tokens after a 4-token prompt.
The model forward and backward are in both.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.engines.tiny_hf (--route trainer)
from bench_lm_head import llm_like_inputs, measure, med, side_by_side  # noqa: E402

HERE = Path(__file__).resolve()
T_RESP = 1024
CONFIGS = {"siren": {"anchor_value": 1.0}, "entropy_bonus": {"clamp_fraction": 0.5}, "lp_reg": {}, "grpo": {}}


def trainer_worker(args: dict) -> dict:
    """One _compute_loss + backward through TRL's GRPOTrainer (impl "trl") or EntropyGRPOTrainer (impl
    "ours-<method>")."""
    import math

    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from rlvr_entropy.trl import EntropyGRPOTrainer
    from tests.engines.tiny_hf import digit_reward, make_dataset, make_tokenizer

    N, H, V, impl = args["N"], args["hidden"], args["vocab"], args["impl"]
    T = min(T_RESP, N // 2)  # at least 2 completions: one GRPO group
    B = N // T
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T + 8,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # LLM-like logits: a Zipf-shaped direction plus small noise
        g = torch.Generator().manual_seed(1)
        W = model.lm_head.weight
        W[:, 0] = -torch.log1p(torch.randperm(V, generator=g).float()) * 2.0
        W[:, 1:] = torch.randn(V, H - 1, generator=g) * (0.6 / math.sqrt(H - 1))
    gen = 2 if B % 2 == 0 else B
    targs = GRPOConfig(output_dir=args["out"], use_cpu=True, per_device_train_batch_size=B, num_generations=gen,
                       generation_batch_size=B, max_completion_length=T, report_to=[], save_strategy="no", bf16=False,
                       loss_type="grpo", disable_tqdm=True, beta=0.0)
    common = dict(model=model, reward_funcs=digit_reward, args=targs, train_dataset=make_dataset(),
                  processing_class=tok)
    if impl == "trl":
        t = GRPOTrainer(**common)
    else:
        name = impl.split("-", 1)[1]
        t = EntropyGRPOTrainer(**common, method=name, method_config=CONFIGS[name])
    t.current_gradient_accumulation_steps = 1  # set by Trainer.train; here the loss is called directly
    g = torch.Generator().manual_seed(2)

    def inputs(b, t_len):
        mask = torch.ones(b, t_len, dtype=torch.long)
        return {"prompt_ids": torch.randint(3, 20, (b, 4), generator=g), "prompt_mask": torch.ones(b, 4, dtype=torch.long),
                "completion_ids": torch.randint(0, V, (b, t_len), generator=g), "completion_mask": mask,
                "advantages": torch.linspace(-1, 1, b) if b > 1 else torch.ones(1), "old_per_token_logps": None,
                "num_items_in_batch": mask.sum().float()}

    def call(x):
        model.zero_grad(set_to_none=True)
        loss = t._compute_loss(model, x)
        loss.backward()
        return float(loss)

    call(inputs(1, 16))  # warm-up
    x = inputs(B, T)
    seconds, extra, loss, cpu = measure(lambda: call(x))
    return {"impl": impl, "N": N, "seconds": seconds, "cpu_seconds": cpu, "extra_bytes": extra, "loss": loss}


def worker(args: dict) -> dict:
    if args.get("route") == "trainer":
        return trainer_worker(args)
    import rlvr_entropy as re
    from rlvr_entropy import kernels

    N, H, V, impl = args["N"], args["hidden"], args["vocab"], args["impl"]
    if impl == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    def call(h, W, ids):
        B = h.shape[0] // min(T_RESP, h.shape[0])
        hb, ib = h.view(B, -1, H), ids.view(B, -1)
        mask = torch.ones(ib.shape, dtype=torch.bool)
        adv = torch.linspace(-1, 1, B) if B > 1 else torch.ones(1)
        if impl == "trl":
            lp, ent, *_ = ChunkedLogProbFunction.apply(h, W, None, ids, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                                       ("entropy",))
            fields = {"log_prob": lp.view(B, -1), "entropy": ent.view(B, -1)}
            m = re.make_method("grpo")
        else:
            name = impl.split("-", 1)[1]
            m = re.make_method(name, **CONFIGS[name])
            fields = kernels.lm_head_batch_fields(hb, W, None, token_ids=ib, mask=mask, method=m)
        old = fields["log_prob"].detach() + 0.05
        batch = re.TokenBatch(old_log_prob=old, old_entropy=fields["entropy"].detach(), advantages=adv, mask=mask,
                              **fields)
        out = m.compute_loss(batch)
        out.loss.backward()
        return float(out.loss)

    h0, W0, ids0 = llm_like_inputs(64, H, V, seed=1)
    call(h0, W0, ids0)  # warm-up
    del h0, W0, ids0
    h, W, ids = llm_like_inputs(N, H, V)
    seconds, extra, loss, cpu = measure(lambda: call(h, W, ids))
    return {"impl": impl, "N": N, "seconds": seconds, "cpu_seconds": cpu, "extra_bytes": extra, "loss": loss}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="2048,8192,16384")
    ap.add_argument("--methods", default="siren,entropy_bonus,lp_reg")
    ap.add_argument("--no-grpo", action="store_true", help="skip the ours-grpo reference")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--route", choices=["core", "trainer"], default="core",
                    help="core: method.compute_loss from hidden states; trainer: _compute_loss of the two trainers")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="smoke mode: V=16384, N=256/1024, 1 round")
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    if a.quick:
        a.sizes, a.vocab, a.rounds = "256,1024", 16_384, 1
    sizes = [int(x) for x in a.sizes.split(",")]
    methods = [m for m in a.methods.split(",") if m]
    impls = ["trl"] + [f"ours-{m}" for m in methods] + ([] if a.no_grpo else ["ours-grpo"])
    what = "through the trainers' _compute_loss" if a.route == "trainer" else "from hidden states"
    print(f"one loss + backward {what}, V={a.vocab}, H={a.hidden}, float32, T={T_RESP}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        res = side_by_side(HERE, impls, sizes, a.rounds, {"hidden": a.hidden, "vocab": a.vocab, "route": a.route,
                                                          "out": out})
    rows = []
    print(f"\n{'N':>6} {'impl':>18} {'seconds':>8} {'CPU s':>8} {'peak GiB':>9} {'time/trl':>9} {'CPU/trl':>8} "
          f"{'mem/trl':>8}")
    for n in sizes:
        base = res[("trl", n)]
        t_trl, c_trl, m_trl = med(base, "seconds"), med(base, "cpu_seconds"), med(base, "extra_bytes")
        for impl in impls:
            r = res[(impl, n)]
            row = {"N": n, "impl": impl, "seconds": med(r, "seconds"), "cpu_seconds": med(r, "cpu_seconds"),
                   "extra_bytes": med(r, "extra_bytes"), "runs": r}
            row.update(time_ratio=row["seconds"] / t_trl, cpu_ratio=row["cpu_seconds"] / c_trl,
                       mem_ratio=row["extra_bytes"] / m_trl)
            rows.append(row)
            print(f"{n:6d} {impl:>18} {row['seconds']:8.2f} {row['cpu_seconds']:8.2f} "
                  f"{row['extra_bytes'] / 2**30:9.3f} {row['time_ratio']:9.2f} {row['cpu_ratio']:8.2f} "
                  f"{row['mem_ratio']:8.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"config": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
