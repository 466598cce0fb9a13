"""The testbed through the TRL engine: the same tasks, verifier, warm-started model and evaluation as the lean loop,
trained by :class:`rlvr_entropy.trl.EntropyGRPOTrainer` (so the path real models take runs on the same problems).

Mapping of the testbed's config onto TRL: one testbed step = one generation batch of ``prompts_per_step`` prompts x
``samples_per_prompt`` samples, used for ``minibatches`` optimizer steps (TRL's ``steps_per_generation``); constant
learning rate, no KL (beta = 0), advantages scaled by the group std when ``adv_std_norm``. Evaluations, metrics.jsonl
rows (one per testbed step, plus eval/* keys every ``eval_every`` steps) and the report are the lean loop's.

Deviations from the lean loop: no checkpoint/resume here (TRL's own ``resume_from_checkpoint`` is available through
the trainer), and TRL samples with ``transformers`` generation (slower on this tiny model): the model is the lean
loop's warm start converted to ``transformers.Qwen2ForCausalLM`` (:meth:`TinyQwen2.to_hf`, same weights).

A method that reads the reference policy (``"ref_log_prob" in method.needs``: the thermostat's pull) gets TRL's own
reference, which TRL loads again from the model's path: the warm start is saved to ``<out>/trl/warm_start`` (a
Hugging Face model directory) and trained from there, so the reference is the warm start (the lean loop's
reference too).

Logging: TRL's own per-log printing (raw dicts) is switched off; the run prints the testbed's progress line and
``report_to`` (``tensorboard``, ``wandb``) goes to TRL's integrations (TensorBoard logs in ``<out>/tb``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rlvr_entropy.testbed.tasks import get_task
from rlvr_entropy.testbed.tokenizer import CharTokenizer
from rlvr_entropy.testbed.train import TrainConfig, _jsonable, eval_problems, evaluate, initial_model


def _from_saved(model, path: Path):
    """``model`` saved to ``path`` and loaded back (the same weights, float32), so that its config holds the path
    TRL loads a reference from (``config._name_or_path``); its generation config and train/eval mode are kept."""
    from transformers import Qwen2ForCausalLM

    model.save_pretrained(str(path))
    loaded = Qwen2ForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    loaded.generation_config = model.generation_config
    return loaded.train(model.training)


def train_trl(method_name: str, cfg: TrainConfig, out_dir: str | os.PathLike, method_overrides: dict | None = None,
              progress: bool = True, use_cache: bool = True, threads: int | None = 1,
              diagnostics_every: int | None = None, report_to: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """One testbed run through the TRL engine; writes ``metrics.jsonl`` and ``config.json`` in ``out_dir``
    (and ``trl/entropy_change.jsonl`` when ``diagnostics_every`` is set: see ``EntropyGRPOTrainer``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOConfig

    from rlvr_entropy.testbed.progress import Progress
    from rlvr_entropy.testbed.provenance import provenance
    from rlvr_entropy.testbed.train import REPORT_TO

    from rlvr_entropy.trl import TRL_OWNED, EntropyGRPOTrainer, resolve_method

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        method_overrides = dict(method_overrides or {})
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        task = get_task(cfg.task)
        tok = CharTokenizer()
        hf_tok = tok.to_hf()
        t_start = time.time()
        model = initial_model(cfg, task, tok, progress=progress, use_cache=use_cache).to_hf()
        model.generation_config.eos_token_id = tok.eos_id
        model.generation_config.pad_token_id = tok.pad_id
        model.generation_config.bos_token_id = tok.bos_id
        setup_s = time.time() - t_start
        evals = eval_problems(task, cfg.eval_problems)
        problems = task.sample("train", cfg.prompts_per_step * cfg.steps, seed=f"{cfg.seed}-trl")
        by_prompt = {p.prompt: p for p in problems}
        data = Dataset.from_dict({"prompt": [p.prompt for p in problems]})

        def reward(prompts, completions, completion_ids, **_):
            return [float(tok.eos_id in ids and task.verify(by_prompt[p], c))
                    for p, c, ids in zip(prompts, completions, completion_ids)]

        n = cfg.prompts_per_step * cfg.samples_per_prompt
        bad = [r for r in report_to if r not in REPORT_TO]
        if bad:
            raise ValueError(f"report_to: unknown sink(s) {bad}; available: {', '.join(REPORT_TO)}")
        if "tensorboard" in report_to:
            os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tb"))
        # the method's own PG settings (clip, dual clip, loss type), expressed as GRPOConfig; a
        # seq-mean-token-sum-norm length is this engine's max completion length (logged), not the paper's 3072
        from rlvr_entropy.methods.base import engine_length_overrides
        from rlvr_entropy.trl import grpo_config_kwargs

        effective, note = engine_length_overrides(method_name, dict(method_overrides or {}), task.max_response_len)
        pg_kwargs = grpo_config_kwargs(method_name, effective)
        pg_kwargs["max_completion_length"] = task.max_response_len
        if note:
            print(note, file=sys.stderr, flush=True)
        args = GRPOConfig(
            **pg_kwargs,
            output_dir=str(out / "trl"), use_cpu=True, report_to=list(report_to), save_strategy="no", logging_steps=1,
            seed=cfg.seed, bf16=False, per_device_train_batch_size=n // cfg.minibatches,
            num_generations=cfg.samples_per_prompt, steps_per_generation=cfg.minibatches,
            gradient_accumulation_steps=1, max_steps=cfg.steps * cfg.minibatches, learning_rate=cfg.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else 1e9, temperature=cfg.temperature, beta=0.0,
            scale_rewards="group" if cfg.adv_std_norm else "none",
            num_iterations=cfg.epochs, disable_tqdm=True, shuffle_dataset=False,
        )
        method = resolve_method(method_name, {k: v for k, v in effective.items() if k not in TRL_OWNED}, args)
        if "ref_log_prob" in method.needs:
            # TRL builds the reference by loading the model's path again: give the warm start one
            model = _from_saved(model, out / "trl" / "warm_start")
        trainer = EntropyGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                                     processing_class=hf_tok, method=method, diagnostics_every=diagnostics_every)
        (out / "config.json").write_text(json.dumps({"method": method_name, "method_overrides": method_overrides,
                                                     "train": asdict(cfg), "engine": "trl",
                                                     "report_to": list(report_to),
                                                     "provenance": provenance(torch.get_num_threads())}, indent=2))
        f = (out / "metrics.jsonl").open("w")
        t_loop = time.time()
        state: dict[str, Any] = {"last_eval": {}, "acc": {}, "cnt": {}, "t0": time.time()}

        def write(rec):
            f.write(json.dumps({k: _jsonable(v) for k, v in rec.items()}) + "\n")
            f.flush()

        def do_eval(step):
            model.eval()
            try:
                return evaluate(model, task, tok, evals, cfg.eval_samples, cfg.eval_k, cfg.temperature,
                                seed=cfg.seed * 100_003 + step)
            finally:
                model.train()

        state["last_eval"] = do_eval(0)
        write({"step": 0, "wall_s": 0.0, "setup_s": setup_s, **state["last_eval"]})

        class _Log(TrainerCallback):
            def on_log(self, a, s, control, logs=None, **kw):
                logs = logs or {}
                if "train_runtime" in logs:  # the closing summary, not a step
                    return
                for k, v in logs.items():  # each key averaged over the optimizer steps that logged it
                    if isinstance(v, (int, float)) and k not in ("epoch", "learning_rate", "num_tokens"):
                        state["acc"][k] = state["acc"].get(k, 0.0) + float(v)
                        state["cnt"][k] = state["cnt"].get(k, 0) + 1
                if s.global_step % cfg.minibatches == 0 and s.global_step > 0:
                    step = s.global_step // cfg.minibatches
                    rec = {"step": step, **{k: v / state["cnt"][k] for k, v in state["acc"].items()}}
                    if step % cfg.eval_every == 0 or step == cfg.steps:
                        state["last_eval"] = do_eval(step)
                        rec.update(state["last_eval"])
                    rec["step_s"] = time.time() - state["t0"]
                    rec["wall_s"] = time.time() - t_loop
                    write(rec)
                    state.update(acc={}, cnt={}, t0=time.time())
                    if state["bar"] is not None:
                        state["bar"].update(step)

        bar = Progress(cfg.steps, f"{method_name} seed {cfg.seed} (trl)") if progress else None
        state["bar"] = bar
        trainer.remove_callback(PrinterCallback)  # raw log dicts on stdout
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_Log())
        try:
            trainer.train()
        finally:
            f.close()
            if bar is not None:
                bar.close()
        return {**state["last_eval"], "wall_s": time.time() - t_loop, "steps": cfg.steps}
    finally:
        torch.set_num_threads(old_threads)
