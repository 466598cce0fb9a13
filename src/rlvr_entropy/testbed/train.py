"""The lean GRPO loop of the CPU testbed (cleanrl-sized), its warm start and its evaluation.

One step: sample ``prompts_per_step`` train problems x ``samples_per_prompt`` responses at temperature T with the
KV cache; reward each with the task's verifier; GRPO advantages (reward - group mean, optionally / group std);
then ``epochs`` passes over ``minibatches`` minibatches, each building a :class:`rlvr_entropy.TokenBatch`
(log_prob, logits [B, T, V] and entropy with gradient from the current model; old_log_prob and old_entropy from the
rollout policy; rewards) and calling ``method.compute_loss(batch, step=step)``; AdamW with gradient clipping.

Every ``eval_every`` steps (and at steps 0 and the last): held-out problems x ``eval_samples`` samples, pass@1,
unbiased pass@k, maj@k, distinct correct solutions, token entropy. Every step appends one JSON line to
``metrics.jsonl`` (flushed). Checkpoints (model, optimizer, method state, RNG, step; ~10 MB, written to a temporary
file then renamed, so a kill never leaves a torn one) every ``checkpoint_every`` steps (default 5) and at the end;
rerunning the same command continues from the last one and says so (``resuming ... from step N``), and the resumed
run ends with the metrics of an uninterrupted one (the RNG states travel in the checkpoint).

Speed (profiled; see docs/testbed.md): the model is :class:`~rlvr_entropy.testbed.model.TinyQwen2`, which computes
each GRPO group's shared prompt once in sampling and in the loss and samples with a preallocated KV cache; the
step-0 evaluation is cached with the warm start (every method of a seed shares it). Each record carries the step's
time split (``gen_s``, ``update_s``, ``eval_s``, ``ckpt_s``).

Deviations from the prototype in /work/shared/TESTBED.md: the old log-probs are the sampling pass's (same
weights, no dropout, so equal up to float rounding) instead of a second forward.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlvr_entropy.testbed.metrics import distinct_correct, maj_at_k, mean_pass_at_k, pass_at_k
from rlvr_entropy.testbed.model import ModelConfig, Samples, TinyQwen2, build_model, response_logits, sample
from rlvr_entropy.testbed.tasks import Problem, Task, final_answer, get_task
from rlvr_entropy.testbed.optim import AdamW
from rlvr_entropy.testbed.progress import Progress
from rlvr_entropy.testbed.provenance import provenance
from rlvr_entropy.testbed.tokenizer import CharTokenizer

WARM_START_VERSION = 1  # bump when the warm-start recipe changes (part of the cache key)
EVAL_VERSION = 1  # bump when evaluate() or the sampler changes what it returns (key of the cached step-0 evaluation)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a testbed run needs besides the method (defaults from /work/shared/TESTBED.md)."""

    task: str = "countdown3"
    """Task name: countdown3, countdown4 or arith."""
    seed: int = 0
    """Seed of the RL run (problem draws, sampling, evaluation samples)."""
    steps: int = 120
    """Number of RL steps (plain GRPO's held-out entropy is ~50% of its start at step 120 with lr 1e-4)."""
    prompts_per_step: int = 32
    """Prompts per rollout."""
    samples_per_prompt: int = 8
    """Responses per prompt (the GRPO group size G)."""
    minibatches: int = 2
    """Optimizer steps per epoch over the rollout."""
    epochs: int = 1
    """Passes over the rollout."""
    lr: float = 1e-4
    """AdamW learning rate of the RL phase (constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    temperature: float = 1.0
    """Sampling temperature; logits are divided by it in the loss too."""
    adv_std_norm: bool = True
    """Divide advantages by the group's reward std (GRPO); False gives Dr. GRPO's unscaled advantages."""
    eval_every: int = 15
    """Evaluate every this many steps (and at steps 0 and the last)."""
    eval_problems: int = 128
    """Held-out problems per evaluation."""
    eval_samples: int = 8
    """Samples per held-out problem (n of the unbiased pass@k)."""
    eval_k: int = 8
    """k of pass@k and maj@k (<= eval_samples)."""
    checkpoint_every: int = 5
    """Checkpoint every this many steps (and at the end); 0: only at the end. A checkpoint costs ~30 ms, so the
    default 5 loses at most 4 steps to a kill for ~1% of the run time."""
    width: int = 128
    """Model width."""
    layers: int = 4
    """Model layers."""
    heads: int = 4
    """Attention heads."""
    mlp: int = 384
    """MLP size."""
    warm_start_steps: int = 600
    """Supervised warm-start steps on uniformly drawn valid solutions (0: start from random weights)."""
    warm_start_batch: int = 128
    """Warm-start batch size."""
    warm_start_lr: float = 2e-3
    """Warm-start peak learning rate (cosine to 0)."""
    warm_start_seed: int = 0
    """Seed of the warm start (shared by every RL seed so runs start from the same policy)."""

    def __post_init__(self) -> None:
        """Every field checked on construction; errors name the field and the allowed range (one line)."""
        if not isinstance(self.task, str):
            raise ValueError(f"task must be a task name, got {self.task!r}")
        get_task(self.task)
        for fld in dataclasses.fields(self):
            v = getattr(self, fld.name)
            if fld.type in ("int", int) and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{fld.name} must be an integer, got {v!r}")
            if fld.type in ("float", float) and (isinstance(v, bool) or not isinstance(v, (int, float))
                                                 or not math.isfinite(v)):
                raise ValueError(f"{fld.name} must be a finite number, got {v!r}")
            if fld.type in ("bool", bool) and not isinstance(v, bool):
                raise ValueError(f"{fld.name} must be true or false, got {v!r}")
        for name in ("seed", "warm_start_steps", "warm_start_seed", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "minibatches", "epochs", "eval_every",
                     "eval_problems", "eval_samples", "eval_k", "width", "layers", "heads", "mlp",
                     "warm_start_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "temperature", "warm_start_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 disables), got {getattr(self, name)}")
        if self.eval_k > self.eval_samples:
            raise ValueError(f"eval_k ({self.eval_k}) must be <= eval_samples ({self.eval_samples})")
        if (self.prompts_per_step * self.samples_per_prompt) % self.minibatches:
            raise ValueError(f"minibatches ({self.minibatches}) must divide prompts_per_step * samples_per_prompt "
                             f"({self.prompts_per_step * self.samples_per_prompt})")
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")
        if self.width // self.heads % 2:
            raise ValueError(f"width / heads ({self.width // self.heads}) must be even (rotary embedding)")

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(width=self.width, layers=self.layers, heads=self.heads, mlp=self.mlp)


def parse_value(text: str, like: Any) -> Any:
    """Parse a CLI ``key=value`` string into the type of ``like`` (the field default)."""
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if text.lower() == "none":
        return None
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if like is None:
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text
    return text


# --------------------------------------------------------------------------------------------- helpers
def cache_dir() -> Path:
    return Path(os.environ.get("RLVR_ENTROPY_CACHE", Path.home() / ".cache" / "rlvr-entropy"))


def _encode_prompts(tok: CharTokenizer, problems: list[Problem]) -> torch.Tensor:
    return torch.tensor([tok.encode(p.prompt) for p in problems], dtype=torch.long)


def _response_logits(model, prompts: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits [N, T, V] predicting each response token (prompt [N, P] + response [N, T], right padding); rows that
    share a prompt share its forward (see :func:`rlvr_entropy.testbed.model.response_logits`)."""
    return response_logits(model, prompts, tokens, temperature)


def _live_log_prob(model, prompts: torch.Tensor, tokens: torch.Tensor, old_log_prob: torch.Tensor,
                   live: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor | bool]:
    """log_prob [b, T] of a minibatch for a method whose zero-advantage rows are inert
    (``Method.zero_advantage_rows_inert``): the policy's at the ``live`` rows (bool [b]), ``old_log_prob`` (a
    constant) at the others, whose forward is skipped. Returns (log_prob, live), live False when no row is live."""
    if not bool(live.any()):
        return old_log_prob, False
    rows = live.nonzero().squeeze(1)
    tk = tokens[rows]
    logits = _response_logits(model, prompts[rows], tk, temperature)  # [live, T, V]
    lp = torch.log_softmax(logits, -1).gather(-1, tk[..., None]).squeeze(-1)
    return old_log_prob.index_put((rows,), lp), live


# ------------------------------------------------------------------------------------------ warm start
def warm_start_key(cfg: TrainConfig, vocab_size: int) -> str:
    recipe = {"v": WARM_START_VERSION, "task": cfg.task, "model": asdict(cfg.model), "vocab": vocab_size,
              "steps": cfg.warm_start_steps, "batch": cfg.warm_start_batch, "lr": cfg.warm_start_lr,
              "seed": cfg.warm_start_seed}
    version = get_task(cfg.task).version
    if version != 1:  # tasks still at their first generator keep the keys of the shipped warm starts
        recipe["task_version"] = version
    blob = json.dumps(recipe, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_start(model, task: Task, tok: CharTokenizer, cfg: TrainConfig, progress: bool = False) -> dict:
    """Supervised training on solutions drawn uniformly from all valid ones (cosine lr). Returns stats."""
    rng = random.Random(f"warm/{cfg.warm_start_seed}")
    gen = task.problems("train", seed=cfg.warm_start_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warm_start_lr, weight_decay=0.0)
    n = cfg.warm_start_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, n) / n)))
    model.train()
    bar = Progress(n, "warm start") if progress else None
    loss_v = float("nan")
    t0 = time.time()
    with torch.random.fork_rng():
        torch.manual_seed(cfg.warm_start_seed)
        for _ in range(n):
            probs = [next(gen) for _ in range(cfg.warm_start_batch)]
            resp = [tok.encode(rng.choice(task.solutions(p)), eos=True) for p in probs]
            T = max(map(len, resp))
            tokens = torch.tensor([r + [tok.pad_id] * (T - len(r)) for r in resp])
            mask = torch.tensor([[i < len(r) for i in range(T)] for r in resp])
            logits = _response_logits(model, _encode_prompts(tok, probs), tokens, 1.0)
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                                                    reduction="none").view_as(mask.float())
            loss = (nll * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_v = float(loss.detach())
            if bar is not None:
                bar.update(bar.done + 1, loss=f"{loss_v:.3f}")
    if bar is not None:
        bar.close()
    return {"warm_start_loss": loss_v, "warm_start_s": time.time() - t0}


def _save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _random_init(cfg: TrainConfig, tok: CharTokenizer, use_cache: bool) -> TinyQwen2:
    """The seeded random initialization (``transformers``' own, see :func:`build_model`), cached by model size and
    seed so that later runs need not import ``transformers``."""
    blob = json.dumps({"model": asdict(cfg.model), "vocab": tok.vocab_size, "seed": cfg.warm_start_seed,
                       "ids": [tok.pad_id, tok.eos_id, tok.bos_id]}, sort_keys=True)
    path = cache_dir() / "init" / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.pt"
    model = TinyQwen2(tok.vocab_size, cfg.model, pad_id=tok.pad_id, eos_id=tok.eos_id, bos_id=tok.bos_id)
    if use_cache and path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model
    model = build_model(tok.vocab_size, cfg.model, seed=cfg.warm_start_seed, pad_id=tok.pad_id, eos_id=tok.eos_id,
                        bos_id=tok.bos_id)
    if use_cache:
        _save_atomic(model.state_dict(), path)
    return model


def initial_model(cfg: TrainConfig, task: Task, tok: CharTokenizer, progress: bool = False,
                  use_cache: bool = True) -> TinyQwen2:
    """The warm-started model for ``cfg`` (a :class:`TinyQwen2`; ``.to_hf()`` gives the ``transformers`` model):
    loaded from the cache (``$RLVR_ENTROPY_CACHE`` or ``~/.cache/rlvr-entropy``, file named by a hash of the recipe)
    or from ``testbed/assets/`` when a copy is shipped there, else trained with :func:`warm_start` and cached."""
    if cfg.warm_start_steps == 0:
        return _random_init(cfg, tok, use_cache)
    name = f"{cfg.task}-{warm_start_key(cfg, tok.vocab_size)}.pt"
    path = cache_dir() / "warm_start" / name
    shipped = Path(__file__).parent / "assets" / name  # optional copy shipped with the package (same recipe)
    for p in ((path, shipped) if use_cache else ()):
        if p.exists():
            model = TinyQwen2(tok.vocab_size, cfg.model, pad_id=tok.pad_id, eos_id=tok.eos_id, bos_id=tok.bos_id)
            model.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
            return model
    model = _random_init(cfg, tok, use_cache)
    warm_start(model, task, tok, cfg, progress=progress)
    if use_cache:
        _save_atomic(model.state_dict(), path)
    return model


def warm_start_eval(cfg: TrainConfig, task: Task, tok: CharTokenizer, model, use_cache: bool = True) -> dict:
    """The step-0 evaluation of ``cfg`` (the warm start, before any RL): the same for every method of a seed, so it
    is cached next to the warm start, keyed by the recipe, the evaluation settings and the seed."""
    blob = json.dumps({"v": EVAL_VERSION, "warm": warm_start_key(cfg, tok.vocab_size), "task": cfg.task,
                       "n": cfg.eval_problems, "samples": cfg.eval_samples, "k": cfg.eval_k, "T": cfg.temperature,
                       "seed": cfg.seed}, sort_keys=True)
    path = cache_dir() / "eval0" / f"{cfg.task}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"
    if use_cache and path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    res = evaluate(model, task, tok, eval_problems(task, cfg.eval_problems), cfg.eval_samples, cfg.eval_k,
                   cfg.temperature, seed=cfg.seed * 100_003)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, path)
    return res


# ------------------------------------------------------------------------------------------ evaluation
def eval_problems(task: Task, n: int) -> list[Problem]:
    """The fixed held-out set (independent of the run seed so every run is scored on the same problems)."""
    return task.sample("eval", n, seed=0, unique=True)


@torch.no_grad()
def evaluate(model, task: Task, tok: CharTokenizer, problems: list[Problem], n: int, k: int, temperature: float,
             seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    prompts = _encode_prompts(tok, problems).repeat_interleave(n, 0)
    s = sample(model, prompts, task.max_response_len, tok.eos_id, tok.pad_id, temperature, gen)
    texts, ok = _score(task, tok, problems, s.tokens, n)
    correct = [ok[i * n:(i + 1) * n] for i in range(len(problems))]
    resp = [texts[i * n:(i + 1) * n] for i in range(len(problems))]
    out = {"eval/pass@1": mean_pass_at_k(correct, 1), "eval/pass@k": mean_pass_at_k(correct, k), "eval/k": k}
    for name, kk in (("pass@1", 1), ("pass@k", k)):  # standard error over problems (the sampling noise of one run)
        per = [pass_at_k(len(c), sum(c), kk) for c in correct]
        mu = sum(per) / len(per)
        out[f"eval/{name}_se"] = (math.sqrt(sum((x - mu) ** 2 for x in per) / (len(per) - 1) / len(per))
                                  if len(per) > 1 else float("nan"))
    kk = 1
    while kk <= n:
        out[f"eval/pass@{kk}"] = mean_pass_at_k(correct, kk)
        kk *= 2
    out[f"eval/pass@{n}"] = mean_pass_at_k(correct, n)
    if task.kind == "countdown":  # vote over whole scratchpads (see metrics.py)
        maj = [maj_at_k(rs, lambda r, p=p: task.verify(p, r), k) for rs, p in zip(resp, problems)]
    else:
        maj = [maj_at_k([final_answer(r) if r is not None else None for r in rs], str(p.target), k)
               for rs, p in zip(resp, problems)]
    out["eval/maj@k"] = sum(maj) / len(maj)
    out["eval/distinct_correct"] = sum(distinct_correct([r or "" for r in rs], c)
                                       for rs, c in zip(resp, correct)) / len(problems)
    m = s.mask
    out["eval/entropy"] = float(s.entropy.sum() / m.sum().clamp(min=1))
    out["eval/response_len"] = float(m.sum(1).float().mean())
    return out


def _score(task: Task, tok: CharTokenizer, problems: list[Problem], tokens: torch.Tensor, n: int):
    """Decoded responses (None when no EOS was produced) and verifier verdicts, row by row (each distinct
    response of a problem verified once: a sharpened policy repeats itself)."""
    has_eos = (tokens == tok.eos_id).any(1).tolist()
    texts, ok = [], []
    seen: dict[tuple[int, str], bool] = {}
    for i, row in enumerate(tokens.tolist()):
        if not has_eos[i]:
            texts.append(None)
            ok.append(False)
            continue
        t = tok.decode(row)
        texts.append(t)
        key = (i // n, t)
        if key not in seen:
            seen[key] = task.verify(problems[i // n], t)
        ok.append(seen[key])
    return texts, ok


# ------------------------------------------------------------------------------------------ the loop
def grpo_advantages(rewards: torch.Tensor, group: int, std_norm: bool, eps: float = 1e-6) -> torch.Tensor:
    """rewards [N] in groups of ``group`` consecutive responses -> advantages [N]: (r - mean_g) [/ (std_g + eps)]
    with the unbiased std, as in verl's GRPO."""
    r = rewards.view(-1, group)
    a = r - r.mean(1, keepdim=True)
    if std_norm:
        a = a / (r.std(1, keepdim=True) + eps)
    return a.reshape(-1)


class _Reporters:
    """``report_to`` sinks for a run's per-step records: ``tensorboard`` (``<out>/tb``, needs the tensorboard
    package) and ``wandb`` (a run named after the output directory, resumed with it; ``WANDB_MODE=offline`` works
    without an account). Scalars only; each sink gets the record's step."""

    def __init__(self, names, out: Path, run_name: str, config: dict) -> None:
        self.sinks: list = []
        for name in names or ():
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ValueError("report_to tensorboard needs the tensorboard package: pip install tensorboard"
                                     ) from None
                w = SummaryWriter(log_dir=str(out / "tb"))
                self.sinks.append(("tensorboard", w))
            elif name == "wandb":
                try:
                    import wandb
                except ImportError:
                    raise ValueError("report_to wandb needs the wandb package: pip install wandb") from None
                rid = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]
                r = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlvr-entropy"), name=run_name, id=rid,
                               resume="allow", dir=str(out), config=config, reinit=True)
                self.sinks.append(("wandb", r))
            else:
                raise ValueError(f"report_to: unknown sink {name!r}; available: {', '.join(REPORT_TO)}")

    def log(self, rec: dict) -> None:
        scalars = {k: float(v) for k, v in rec.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                for k, v in scalars.items():
                    sink.add_scalar(k, v, rec["step"])
            else:
                sink.log(scalars, step=int(rec["step"]))

    def close(self) -> None:
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                sink.close()
            else:
                sink.finish()
        self.sinks = []


REPORT_TO = ("tensorboard", "wandb")


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().mean()) if v.numel() else float("nan")
    return v


def _prepare_method(method, batch) -> None:
    """Let a method measure something on the whole first rollout (e.g. SIREN's entropy anchor), when it offers
    a hook for it; otherwise its first ``compute_loss`` call does so itself."""
    for name in ("prepare", "set_anchor_from_batch", "set_anchor_from"):
        hook = getattr(method, name, None)
        if callable(hook):
            hook(batch)
            return


def _group_stats(rewards: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(group mean, unbiased group std (0 for a group of one), group size), each [N], for groups of ``group``
    consecutive responses."""
    r = rewards.view(-1, group)
    std = r.std(1) if group > 1 else torch.zeros(r.shape[0], dtype=r.dtype)
    rep = lambda x: x.repeat_interleave(group)  # noqa: E731
    return rep(r.mean(1)), rep(std), torch.full_like(rewards, float(group))


def _extra_rollout(method, model, task, tok, problems, prompts, s, rewards, adv, cfg, gen):
    """For methods with ``rollout_plan`` / ``assemble`` (AEPO): generate the plan's first prompts again at its
    temperature, score them with GRPO advantages in their own groups, and return the update rollout (prompts,
    samples, rewards, advantages, group mean / std / size) whose first k rows are the method's selected samples
    (advantage 1) followed by the main rows k..; their old log-probs and entropies are recomputed at the training
    temperature (same weights)."""
    from rlvr_entropy.stats import entropy as entropy_fn

    G = cfg.samples_per_prompt
    plan = method.rollout_plan(len(problems))
    sub = problems[:plan.num_prompts]
    xp = _encode_prompts(tok, sub).repeat_interleave(G, 0) if sub else prompts[:0]
    if sub:
        sx = sample(model, xp, task.max_response_len, tok.eos_id, tok.pad_id, plan.temperature, gen)
        rx = torch.tensor(_score(task, tok, sub, sx.tokens, G)[1], dtype=torch.float32)
    else:
        sx, rx = Samples(s.tokens[:0], s.mask[:0], s.log_prob[:0], s.entropy[:0]), rewards[:0]
    upd = method.assemble(adv, grpo_advantages(rx, G, True) if sub else adv[:0])
    e, keep = upd.extra_rows, upd.main_rows
    mx, lpx, hx = sx.mask[e], sx.log_prob[e], sx.entropy[e]
    if e.numel():
        with torch.no_grad():
            lg = _response_logits(model, xp[e], sx.tokens[e], cfg.temperature)
            lpx = torch.where(mx, torch.log_softmax(lg, -1).gather(-1, sx.tokens[e][..., None]).squeeze(-1), 0.0)
            hx = torch.where(mx, entropy_fn(lg, mask=mx), 0.0)
    T = max(s.tokens.shape[1], sx.tokens.shape[1])
    cat = lambda a, b, fill: torch.cat([torch.nn.functional.pad(x, (0, T - x.shape[1]), value=fill)  # noqa: E731
                                        for x in (a, b)])
    samples = Samples(cat(sx.tokens[e], s.tokens[keep], tok.pad_id), cat(mx, s.mask[keep], False),
                      cat(lpx, s.log_prob[keep], 0.0), cat(hx, s.entropy[keep], 0.0))
    stats = [torch.cat([a[e], b[keep]]) for a, b in zip(_group_stats(rx, G) if sub else (rx, rx, rx),
                                                         _group_stats(rewards, G))]
    return (torch.cat([xp[e], prompts[keep]]), samples, torch.cat([rx[e], rewards[keep]]),
            upd.advantages.to(adv.dtype), *stats)


def train(method_name: str, cfg: TrainConfig, out_dir: str | os.PathLike, method_overrides: dict | None = None,
          resume: bool = True, progress: bool = True, use_cache: bool = True, threads: int | None = 1,
          report_to: tuple[str, ...] | list[str] = (), log=None) -> dict[str, Any]:
    """Run (or resume) one testbed run; writes ``metrics.jsonl``, ``config.json`` and ``ckpt.pt`` in ``out_dir``.
    Returns the last evaluation's metrics plus ``wall_s``, ``steps`` and ``resumed_from`` (0: a fresh start).

    ``resume``: continue from ``out_dir/ckpt.pt`` when there is one (a checkpoint of another method or
    configuration raises ``ValueError``; ``"if_same"`` starts over instead); False starts over. One line says which happened (``log``, default: print
    to stderr). ``report_to``: also send every step's scalars to ``"tensorboard"`` and/or ``"wandb"``.

    ``threads``: torch intra-op threads during the run (None: leave torch's setting). The default 1 is deliberate:
    on a shared 2-core machine two threads per process make each step ~30x slower as soon as another process
    competes for the cores (measured: generation 0.27 s -> 8.6 s), while one thread loses < 2x when idle."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    closers: list = []  # what _train opened (metrics file, report_to sinks), closed however it ends
    try:
        return _train(method_name, cfg, out_dir, method_overrides, resume, progress, use_cache, tuple(report_to),
                      log or (lambda msg: print(msg, file=sys.stderr, flush=True)), closers)
    finally:
        for close in reversed(closers):
            close()
        torch.set_num_threads(old)


# settings that do not change a run's trajectory: a checkpoint written under other values resumes
_RESUME_FREE = ("steps", "checkpoint_every")


def _train(method_name, cfg, out_dir, method_overrides, resume, progress, use_cache, report_to, log, closers):
    from rlvr_entropy import TokenBatch, make_method
    from rlvr_entropy.methods.base import engine_length_overrides
    from rlvr_entropy.stats import entropy as entropy_fn

    method_overrides = dict(method_overrides or {})
    task = get_task(cfg.task)
    # seq-mean-token-sum-norm divides by this engine's max completion length, not the paper's 3072 (logged)
    effective, note = engine_length_overrides(method_name, method_overrides, task.max_response_len)
    method = make_method(method_name, **effective)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = CharTokenizer()
    t_start = time.time()
    model = initial_model(cfg, task, tok, progress=progress, use_cache=use_cache)
    setup_s = time.time() - t_start
    opt = AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)  # torch.optim's numbers, faster
    gen = torch.Generator().manual_seed(cfg.seed)
    evals = eval_problems(task, cfg.eval_problems)
    G = cfg.samples_per_prompt
    ref_model = None
    if "ref_log_prob" in getattr(method, "needs", ()):  # a frozen copy of the starting policy
        import copy

        ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    ckpt_path = out / "ckpt.pt"
    metrics_path = out / "metrics.jsonl"
    start = 0
    wall_before = 0.0
    last_eval: dict[str, Any] = {}
    if resume and ckpt_path.exists():
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a checkpoint from a killed older version, a full disk, ...
            raise ValueError(f"{ckpt_path} cannot be read ({type(e).__name__}: {e}); delete it or start over "
                             "(--no-resume / resume=False)") from None
        if ck["method"] != method_name and resume == "if_same":
            log(f"{out} holds a checkpoint of method {ck['method']!r}: starting over from step 0")
            return _train(method_name, cfg, out_dir, method_overrides, False, progress, use_cache, report_to, log,
                          closers)
        if ck["method"] != method_name:
            raise ValueError(f"{out} holds a checkpoint of method {ck['method']!r}, not {method_name!r}; "
                             "use another --out or delete it")
        mine = {k: v for k, v in asdict(cfg).items() if k not in _RESUME_FREE}
        theirs = {k: v for k, v in ck.get("config", {}).items() if k not in _RESUME_FREE}
        if mine != theirs or ck.get("method_overrides", method_overrides) != method_overrides:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if resume == "if_same":
                log(f"{out} holds a checkpoint of a different configuration (differs in "
                    f"{diff or ['method overrides']}): starting over from step 0")
                return _train(method_name, cfg, out_dir, method_overrides, False, progress, use_cache, report_to,
                              log, closers)
            raise ValueError(f"{out} holds a checkpoint of a different configuration (differs in "
                             f"{diff or ['method overrides']}); resume with the same settings, or start over "
                             "(--no-resume / resume=False) or use another output directory")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        method.load_state_dict(ck["method_state"])
        gen.set_state(ck["rng"])
        torch.set_rng_state(ck["torch_rng"])
        start = int(ck["step"])
        wall_before = float(ck.get("wall_s", 0.0))
        last_eval = ck.get("last_eval", {})
        kept, dropped = [], 0
        if metrics_path.exists():  # drop lines written after the checkpoint
            for line in metrics_path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start:
                        kept.append(line)
                    else:
                        dropped += 1
                except json.JSONDecodeError:
                    dropped += 1
                    break  # a torn last line
        metrics_path.write_text("".join(x + "\n" for x in kept))
        if start >= cfg.steps:
            log(f"{out}: already trained to step {start} (checkpoint); nothing to do")
        else:
            log(f"resuming {out} from step {start} (checkpoint; {dropped} later step record(s) dropped, "
                f"{cfg.steps - start} step(s) to go)")
    else:
        if ckpt_path.exists():
            log(f"{out}: starting over from step 0 (resume off; the old checkpoint is replaced)")
            ckpt_path.unlink()
        elif metrics_path.exists() and metrics_path.stat().st_size:
            log(f"{out}: no checkpoint, starting over from step 0 (the old metrics.jsonl is replaced)")
        else:
            log(f"{out}: starting at step 0 ({method_name}, seed {cfg.seed}, {cfg.steps} steps)")
        metrics_path.write_text("")
    if note:
        log(note)
    (out / "config.json").write_text(json.dumps({"method": method_name, "method_overrides": method_overrides,
                                                 "method_config": _jsonable_config(method.config),
                                                 "train": asdict(cfg), "engine": "lean",
                                                 "report_to": list(report_to),
                                                 "provenance": provenance(torch.get_num_threads())}, indent=2))
    reporters = _Reporters(report_to, out, f"{method_name}-s{cfg.seed}",
                           {"method": method_name, **method_overrides, **asdict(cfg)})
    closers.append(reporters.close)
    f = metrics_path.open("a")
    closers.append(f.close)
    t_loop = time.time()

    def wall() -> float:
        return wall_before + time.time() - t_loop

    def write(rec: dict) -> None:
        rec = {k: _jsonable(v) for k, v in rec.items()}
        f.write(json.dumps(rec) + "\n")
        f.flush()
        reporters.log(rec)

    def save(step: int) -> float:
        t = time.time()
        _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "method": method_name,
                      "method_state": method.state_dict(), "rng": gen.get_state(),
                      "torch_rng": torch.get_rng_state(), "step": step, "wall_s": wall(), "last_eval": last_eval,
                      "config": asdict(cfg), "method_overrides": method_overrides}, ckpt_path)
        return time.time() - t

    def do_eval(step: int) -> dict:
        return evaluate(model, task, tok, evals, cfg.eval_samples, cfg.eval_k, cfg.temperature,
                        seed=cfg.seed * 100_003 + step)

    if start == 0:
        t = time.time()
        last_eval = warm_start_eval(cfg, task, tok, model, use_cache=use_cache)
        write({"step": 0, "wall_s": wall(), "setup_s": setup_s, "eval_s": time.time() - t, **last_eval})
    bar = Progress(cfg.steps, f"{method_name} seed {cfg.seed}", initial=start) if progress else None
    ckpt_s = 0.0
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.time()
        problems = task.sample("train", cfg.prompts_per_step, seed=f"{cfg.seed}-{step}")
        prompts = _encode_prompts(tok, problems).repeat_interleave(G, 0)  # [N, P]
        s = sample(model, prompts, task.max_response_len, tok.eos_id, tok.pad_id, cfg.temperature, gen)
        _, ok = _score(task, tok, problems, s.tokens, G)
        rewards = torch.tensor(ok, dtype=torch.float32)  # [N]
        adv = grpo_advantages(rewards, G, cfg.adv_std_norm)  # [N]
        group_reward = rewards.view(-1, G).mean(1).repeat_interleave(G)  # [N] success rate of each group
        _, group_std, group_size = _group_stats(rewards, G)
        rollout = rewards, s  # what the step's record reports
        if callable(getattr(method, "rollout_plan", None)):  # AEPO: the update batch gets extra samples
            prompts, s, rewards, adv, group_reward, group_std, group_size = _extra_rollout(
                method, model, task, tok, problems, prompts, s, rewards, adv, cfg, gen)
        t_gen = time.time() - t0
        t_upd = time.time()
        if step == 1 and start == 0:
            with torch.no_grad():
                lg = _response_logits(model, prompts, s.tokens, cfg.temperature)
                _prepare_method(method, TokenBatch(log_prob=s.log_prob, old_log_prob=s.log_prob, advantages=adv,
                                                   mask=s.mask, logits=lg, entropy=entropy_fn(lg, mask=s.mask),
                                                   old_entropy=s.entropy, rewards=rewards,
                                                   group_reward=group_reward, group_reward_std=group_std,
                                                   group_size=group_size))
        if callable(getattr(method, "begin_step", None)):  # entrocraft: the step decides with its own entropy
            method.begin_step(TokenBatch(log_prob=s.log_prob, old_log_prob=s.log_prob, advantages=adv, mask=s.mask,
                                         old_entropy=s.entropy, rewards=rewards, group_reward=group_reward,
                                         group_reward_std=group_std, group_size=group_size))
        N = prompts.shape[0]
        mb = N // cfg.minibatches
        # rows with zero advantage (groups all right or all wrong) are inert for some methods: skip their forward
        lean = method.zero_advantage_rows_inert and ref_model is None and adv.dim() == 1
        agg: dict[str, float] = {}
        n_mb = 0
        for _ in range(cfg.epochs):
            perm = torch.randperm(N, generator=gen)
            for i in range(cfg.minibatches):
                idx = perm[i * mb:(i + 1) * mb]
                tk, m = s.tokens[idx], s.mask[idx]
                T = int(m.sum(1).max())  # trim the all-padding tail
                tk, m = tk[:, :T], m[:, :T]
                if lean:
                    logp, live = _live_log_prob(model, prompts[idx], tk, s.log_prob[idx, :T], adv[idx] != 0,
                                                cfg.temperature)
                    logits = entropy = None
                else:
                    logits = _response_logits(model, prompts[idx], tk, cfg.temperature)  # [b, T, V]
                    logp = torch.log_softmax(logits, -1).gather(-1, tk[..., None]).squeeze(-1)  # [b, T]
                    entropy, live = entropy_fn(logits, mask=m), True
                ref = None
                if ref_model is not None:
                    with torch.no_grad():
                        ref = torch.log_softmax(_response_logits(ref_model, prompts[idx], tk, cfg.temperature),
                                                -1).gather(-1, tk[..., None]).squeeze(-1)
                batch = TokenBatch(log_prob=logp, old_log_prob=s.log_prob[idx, :T], advantages=adv[idx], mask=m,
                                   logits=logits, entropy=entropy,
                                   old_entropy=s.entropy[idx, :T], ref_log_prob=ref, rewards=rewards[idx],
                                   group_reward=group_reward[idx], group_reward_std=group_std[idx],
                                   group_size=group_size[idx])
                lo = method.compute_loss(batch, step=step)
                opt.zero_grad(set_to_none=True)
                if live is False:  # every row inert: the gradient is exactly 0, and the optimizer still steps
                    for p in model.parameters():
                        p.grad = torch.zeros_like(p)
                else:
                    lo.loss.backward()
                gn = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                      else torch.zeros(()))
                opt.step()
                for k, v in {"loss": lo.loss.detach(), "grad_norm": gn, **lo.metrics}.items():
                    agg[k] = agg.get(k, 0.0) + float(_jsonable(v))
                n_mb += 1
        method.end_step()  # controllers update from the whole rollout step (every minibatch)
        rewards, s = rollout
        valid_h = s.entropy[s.mask].float()
        pct = (torch.quantile(valid_h, torch.tensor([0.1, 0.5, 0.9, 0.99])).tolist() if valid_h.numel()
               else [float("nan")] * 4)
        rec = {"step": step, "reward": float(rewards.mean()),
               "entropy": float(s.entropy.sum() / s.mask.sum().clamp(min=1)),
               "entropy/p10": pct[0], "entropy/p50": pct[1], "entropy/p90": pct[2], "entropy/p99": pct[3],
               "entropy/frac_above_0.1": float((valid_h > 0.1).float().mean()) if valid_h.numel() else float("nan"),
               "response_len": float(s.mask.sum(1).float().mean()),
               **{k: v / n_mb for k, v in agg.items()}, "gen_s": t_gen, "update_s": time.time() - t_upd}
        rec["step_s"] = time.time() - t0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            t = time.time()
            last_eval = do_eval(step)
            rec.update(last_eval)
            rec["eval_s"] = time.time() - t
        if ckpt_s:  # the checkpoint written after the previous record
            rec["ckpt_s"], ckpt_s = ckpt_s, 0.0
        rec["wall_s"] = wall()
        write(rec)  # before the checkpoint: a kill in between re-runs this step, it never loses its record
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
            ckpt_s = save(step)
        if bar is not None:
            bar.update(step, H=f"{rec['entropy']:.3f}", R=f"{rec['reward']:.2f}")
    if bar is not None:
        bar.close()
    if start >= cfg.steps and not ckpt_path.exists():
        save(start)
    return {**last_eval, "wall_s": wall(), "steps": cfg.steps, "resumed_from": start}


def _jsonable_config(c) -> dict:
    out = {}
    for fld in dataclasses.fields(c):
        v = getattr(c, fld.name)
        out[fld.name] = v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v)
    return out
