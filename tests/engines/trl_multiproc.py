"""Two-process check of EntropyGRPOTrainer (torch.distributed + gloo, CPU), launched by test_trl_multiproc.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/engines/trl_multiproc.py OUT_DIR [options]

For each method (aepo: with its second generation, and a reward pattern that fixes how many temperature samples
qualify), every rank trains a tiny Qwen2 for 3 optimizer steps (2 micro-batches each) with evaluation in the
loop (eval_on_start, eval_steps=1) and a checkpoint at step 3, then resumes from it for one more step. Ranks see
different prompts (TRL's sampler) and, with --mask-rank R, rank R's whole second step is fully masked (as
mask_truncated_completions does to a batch of truncated completions) and emits one metric key the other rank does
not. Next to the trainer's method, a "shadow" copy of the method with a LocalCollective is fed the same training
batches: its state is what this rank alone would hold, and its step sums are this rank's share of the global ones.

Each rank writes OUT_DIR/<method>.rank<r>.json: controller states (at train begin, after each step, after each
evaluation, final, after resume), the shadow's states and step sums, per-micro-batch values of the statistics a
global scope makes common (steer's omega_max, forking_tokens' threshold) for the method and its shadow, and the
method metrics found in the main process's logs; for aepo also each generation's plan, k and kept rows, this rank's share
of the temperature samples and the rows it placed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "src"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig  # noqa: E402

import rlvr_entropy  # noqa: E402
from rlvr_entropy.core.batch import TokenBatch  # noqa: E402
from rlvr_entropy.trl import EntropyGRPOTrainer  # noqa: E402
from tests.engines.tiny_hf import digit_reward, make_dataset, make_model, make_tokenizer  # noqa: E402

METHODS = {
    "siren": {},
    # the thermostat's pull reads the reference's log-probs with beta=0 (TRL's reference, built for it: the model is
    # loaded from a folder, _model); a floor far above the tiny model's entropy makes u > 0 from the second step, so
    # the pull acts
    "thermostat": {"target": 10.0},
    "adaptive_entropy": {"target": 3.025, "delta": 1e-3, "coef_max": 0.01},
    "steer": {"scope": "global"},
    "forking_tokens": {},
    # begin_step (a collective) with each step's rollout; below the band (NSR) so that the step trains
    "entrocraft": {"lower": (5.0, 5.0), "upper": (6.0, 6.0), "total_steps": 4},
    # the second generation: every prompt of the 16-row generation batch again (resample_divisor 1: 16 samples, 8 per
    # rank); with three correct answers in every group of 4 (pattern_reward) 12 qualify, so k = 12 at the first step
    # (H_prev = 0: rows 0..7 of rank 0 and 0..3 of rank 1) and 12 // 2 = 6 after it (H_prev ~ 3 > 0.5)
    "aepo": {"resample_divisor": 1},
}
#: reward functions other than digit_reward
REWARDS = {"aepo": "pattern"}
#: per-micro-batch statistics a global scope makes identical across ranks
SHARED = {"steer": "steer/omega_max", "forking_tokens": "forking_tokens/threshold"}
BATCH_FIELDS = ("log_prob", "old_log_prob", "advantages", "mask", "logits", "entropy", "old_entropy", "ref_log_prob",
                "rewards", "group_reward")


def pattern_reward(completions, **kwargs):
    """1, 1, 1, 0 for every 4 consecutive completions of a call (every call here starts at a group boundary): a
    known number of qualifying temperature samples, whatever the tiny model writes."""
    return [0.0 if i % 4 == 3 else 1.0 for i in range(len(completions))]


def _attach_aepo(trainer, record):
    """Record, per generation batch: the plan, assemble's k and rows, this rank's share of the temperature samples
    (prompt and completion ids) and the rows this rank placed in its first positions."""
    rec = record["aepo"] = {"plans": [], "updates": [], "extra": [], "placed": []}
    m = trainer.method
    plan, assemble, second, gen, place = (m.rollout_plan, m.assemble, trainer._second_generation,
                                          trainer._generate_single_turn, trainer._place_rows)
    flag = {"on": False}

    def rollout_plan(num_prompts):
        p = plan(num_prompts)
        rec["plans"].append([p.temperature, p.num_prompts, p.entropy])
        return p

    def spy_assemble(main, extra):
        u = assemble(main, extra)
        rec["updates"].append({"k": u.k, "extra_rows": u.extra_rows.tolist()})
        return u

    def second_generation(inputs, out):
        flag["on"] = True
        try:
            return second(inputs, out)
        finally:
            flag["on"] = False

    def generate_single_turn(prompt_ids, *a, **kw):
        c, lp = gen(prompt_ids, *a, **kw)
        if flag["on"]:
            rec["extra"].append([[list(p), list(x)] for p, x in zip(prompt_ids, c)])
        return c, lp

    def place_rows(out, rows):
        rec["placed"].append([[list(p), list(x)] for p, x, _ in rows])
        return place(out, rows)

    m.rollout_plan, m.assemble = rollout_plan, spy_assemble
    trainer._second_generation, trainer._generate_single_turn, trainer._place_rows = (
        second_generation, generate_single_turn, place_rows)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def _state(method):
    return json.loads(json.dumps(_plain(method.state_dict())))


def _detached(batch: TokenBatch) -> TokenBatch:
    # the logits-free route carries the distribution as an LMHeadSource (the shadow reads it under no_grad)
    return TokenBatch(**{f: (None if getattr(batch, f) is None else getattr(batch, f).detach())
                         for f in BATCH_FIELDS}, lm_head=batch.lm_head)


class MaskingTrainer(EntropyGRPOTrainer):
    """Zeroes the completion mask of every completion of one generation on one rank."""

    mask_rank: int | None = None
    mask_generation = 1

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            gen = getattr(self, "_gen", 0)
            self._masked_now = gen == self.mask_generation and self.accelerator.process_index == self.mask_rank
            if self._masked_now:
                out["completion_mask"] = torch.zeros_like(out["completion_mask"])
            self._gen = gen + 1
        return out

    def _load_optimizer_and_scheduler(self, checkpoint):
        # transformers 5.10 maps the optimizer state to args.device, "cpu:<local_rank>" in a multi-process CPU run,
        # which torch.load cannot restore to; plain "cpu" is the same device
        load = torch.load

        def cpu_load(*a, map_location=None, **k):
            if isinstance(map_location, torch.device) and map_location.type == "cpu":
                map_location = "cpu"
            return load(*a, map_location=map_location, **k)

        torch.load = cpu_load
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            torch.load = load


class Recorder(TrainerCallback):
    def __init__(self, trainer):
        self.t = trainer
        self.begin = None
        self.steps: list = []
        self.evals: list = []

    def on_train_begin(self, args, state, control, **kw):
        self.begin = _state(self.t.method)

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(_state(self.t.method))

    def on_evaluate(self, args, state, control, **kw):
        self.evals.append(_state(self.t.method))


def _attach_shadow(trainer, name, cfg, record):
    """Spy on the trainer's method: feed the same training batches to a LocalCollective copy."""
    method = trainer.method
    shadow = rlvr_entropy.make_method(name, **cfg)
    shadow.config = method.config  # same PG settings as the trainer mapped
    shadow_end = shadow.end_step

    def end_step(**kw):
        sums = shadow_end(**kw)
        record["local_sums"].append(sums)
        return sums

    shadow.end_step = end_step
    inner = method.compute_loss

    def spy(batch, *, step=None, observe=True):
        out = inner(batch, step=step, observe=observe)
        if observe:
            record["ref_seen"].append(batch.ref_log_prob is not None)
            with torch.no_grad():
                s_out = shadow.compute_loss(_detached(batch), step=step, observe=True)
            if name in SHARED:
                record["shared"].append(float(out.metrics[SHARED[name]]))
                record["shadow_shared"].append(float(s_out.metrics[SHARED[name]]))
            if getattr(trainer, "_masked_now", False):
                record["masked_micro_batches"] += 1
                out.metrics["probe/only_on_masked_rank"] = torch.tensor(1.0)  # a key the other rank never emits
        return out

    method.compute_loss = spy
    return shadow


def _model(name, tok, seed, out_dir, rank):
    """The tiny model; for a method that reads the reference, loaded from a folder (TRL loads its reference from the
    model's path), one per rank and seed (the same weights on every rank)."""
    model = make_model(tok, seed=seed)
    if "ref_log_prob" not in rlvr_entropy.make_method(name, **METHODS[name]).needs:
        return model
    from transformers import Qwen2ForCausalLM

    d = os.path.join(out_dir, f"model.seed{seed}.rank{rank}")
    model.save_pretrained(d)
    return Qwen2ForCausalLM.from_pretrained(d)


def run(name, cfg, out_dir, mask_rank):
    tok = make_tokenizer()
    rank = int(os.environ.get("RANK", "0"))
    method = name
    odir = os.path.join(out_dir, name)
    common = dict(output_dir=odir, use_cpu=True, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  num_generations=4, max_completion_length=6, learning_rate=1e-2, logging_steps=1, report_to=[],
                  bf16=False, seed=0, temperature=1.0, disable_tqdm=True, per_device_eval_batch_size=4,
                  dataloader_num_workers=0)
    args = GRPOConfig(max_steps=3, save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=1,
                      eval_on_start=True, **common)
    MaskingTrainer.mask_rank = mask_rank
    reward = pattern_reward if REWARDS.get(name) == "pattern" else digit_reward
    t = MaskingTrainer(model=_model(name, tok, 0, out_dir, rank), reward_funcs=reward, args=args,
                       train_dataset=make_dataset(8), eval_dataset=make_dataset(2), processing_class=tok, method=method,
                       method_config=dict(cfg))
    record = {"local_sums": [], "shared": [], "shadow_shared": [], "masked_micro_batches": 0, "ref_seen": [],
              "has_ref_model": t.ref_model is not None, "beta": t.beta}
    shadow = _attach_shadow(t, name, cfg, record)
    if name == "aepo":
        _attach_aepo(t, record)
    rec = Recorder(t)
    t.add_callback(rec)
    t.train()
    shadow.end_step()  # close the shadow's last step (the trainer closed its own)
    logged = {}
    for h in t.state.log_history:
        for k, v in h.items():
            if k.startswith(f"{method}/") or k.startswith(f"eval_{method}/") or k.startswith("probe/"):
                logged.setdefault(k, []).append(v)
    ckpt = os.path.join(odir, "checkpoint-3")
    # resume from the checkpoint with a fresh model and method
    args2 = GRPOConfig(max_steps=4, save_strategy="no", **common)
    MaskingTrainer.mask_rank = None
    t2 = MaskingTrainer(model=_model(name, tok, 7, out_dir, rank), reward_funcs=reward, args=args2,
                        train_dataset=make_dataset(8), processing_class=tok, method=method, method_config=dict(cfg))
    rec2 = Recorder(t2)
    t2.add_callback(rec2)
    t2.train(resume_from_checkpoint=ckpt)
    result = {"method": method, "rank": rank, "world_size": t.accelerator.num_processes,
              "begin": rec.begin, "steps": rec.steps, "evals": rec.evals, "final": _state(t.method),
              "local_final": _state(shadow), "checkpoint": ckpt, "logged": logged,
              "trl_kl_logged": any("kl" in h for h in t.state.log_history),
              "resumed_begin": rec2.begin, "resumed_steps": rec2.steps, "resumed_final": _state(t2.method),
              **record}
    with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--mask-rank", type=int, default=None,
                   help="fully mask this rank's second step (and let it emit a metric key the other rank does not)")
    a = p.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    for name in a.methods.split(","):
        run(name, METHODS[name], a.out_dir, a.mask_rank)


if __name__ == "__main__":
    main()
