"""Benchmark runner: sample n answers per problem with transformers (batched ``generate`` on any torch device) or
vLLM, grade them with extract_answer + math_equal (the same grading and the same files for both backends), write
answers as JSONL as they come (resumable), then pass@k / avg@k / maj@k tables as JSON and markdown.

Settings resolve in one place (``resolve_settings``): the backend (``auto`` picks vLLM when it is installed and a
CUDA device runs, else transformers; asking for ``vllm`` without it raises), the device (``auto``: cuda, then mps,
then cpu), the dtype (``auto``: bfloat16 on CUDA when supported, float16 on other accelerators, float32 on CPU),
and sizes: without an accelerator the defaults are CPU-sized (``CPU_DEFAULTS``) and a line says so.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from rlvr_entropy.eval.benchmarks import load_benchmark
from rlvr_entropy.eval.grading import extract_answer, math_equal
from rlvr_entropy.eval.metrics import avg_at_k, maj_at_k, pass_at_k

#: Defaults when an accelerator runs (the usual avg@32 protocol) and when only a CPU does: n, max_new_tokens,
#: batch_size (sequences per transformers ``generate`` call).
ACCELERATOR_DEFAULTS = {"n": 32, "max_new_tokens": 1024, "batch_size": 64}
CPU_DEFAULTS = {"n": 4, "max_new_tokens": 256, "batch_size": 8}
BACKENDS = ("auto", "transformers", "vllm")
DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
#: Problems per vLLM ``generate`` call is ``VLLM_SEQUENCES // n`` (vLLM batches internally; the chunk only sets
#: how often answers are written, for resuming).
VLLM_SEQUENCES = 4096


class EvalSettingsError(ValueError):
    """A setting that cannot run here (an unknown name, a device that is absent, vLLM asked for but missing); the
    message says what to use instead."""


def vllm_available() -> bool:
    """Whether vLLM can be imported (checked without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def resolve_device(device: str | None = None) -> str:
    """``None``/``"auto"``: ``cuda`` when available, then ``mps``, else ``cpu``. An explicit device is checked:
    asking for CUDA without it raises an EvalSettingsError that says so."""
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise EvalSettingsError(f"device {device!r} is not a torch device name ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalSettingsError(f"device {device!r} was asked for but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EvalSettingsError(f"device {device!r} was asked for but MPS is not available; use --device cpu or auto")
    return str(dev)


def resolve_dtype(dtype: str | None, device: str) -> str:
    """A dtype name for ``device``: ``auto`` gives bfloat16 on CUDA when supported (else float16), float16 on
    other accelerators, float32 on CPU. Allowed names: the keys of ``DTYPES``."""
    key = "auto" if dtype is None else str(dtype).replace("torch.", "")
    if key not in DTYPES:
        raise EvalSettingsError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if DTYPES[key] is not None:
        return DTYPES[key]
    if device.startswith("cuda"):
        import torch
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32" if device == "cpu" else "float16"


def select_backend(backend: str | None, device: str, model=None) -> str:
    """``transformers`` or ``vllm``. ``auto``: vLLM when it is installed, the device is CUDA and ``model`` is a
    path or name (vLLM loads its own copy), else transformers. ``vllm`` without vLLM installed raises a
    EvalSettingsError that says how to get it or what to use instead."""
    b = (backend or "auto").lower()
    if b in ("hf", "huggingface"):
        b = "transformers"
    if b not in BACKENDS:
        raise EvalSettingsError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    is_path = model is None or isinstance(model, (str, os.PathLike))
    if b == "vllm":
        if not vllm_available():
            raise EvalSettingsError("backend 'vllm' was asked for but vLLM is not installed: `pip install vllm` on a "
                               "machine with a GPU, or use --backend transformers (any torch device)")
        if not is_path:
            raise EvalSettingsError("backend 'vllm' needs a model path or name (vLLM loads the model itself), "
                             "not a loaded model object")
        return "vllm"
    if b == "auto" and vllm_available() and device.startswith("cuda") and is_path:
        return "vllm"
    return "transformers"


@dataclass
class EvalSettings:
    """What an evaluation runs with, after defaults: backend, device, dtype, n (samples per problem),
    max_new_tokens, batch_size (sequences per transformers generate call), cpu_defaults (whether the CPU-sized
    defaults filled in any unset size)."""
    backend: str
    device: str
    dtype: str
    n: int
    max_new_tokens: int
    batch_size: int
    cpu_defaults: bool = False

    def describe(self) -> str:
        return (f"backend={self.backend} device={self.device} dtype={self.dtype} n={self.n} "
                f"max_new_tokens={self.max_new_tokens} batch_size={self.batch_size}")


def resolve_settings(model=None, backend: str | None = "auto", device: str | None = None, dtype: str | None = None,
                     n: int | None = None, max_new_tokens: int | None = None,
                     batch_size: int | None = None) -> EvalSettings:
    """Fill in the backend, device, dtype and the sizes left as None (``CPU_DEFAULTS`` when the device is a CPU,
    ``ACCELERATOR_DEFAULTS`` otherwise). A loaded model without an explicit device keeps its own device."""
    if device in (None, "", "auto") and model is not None and not isinstance(model, (str, os.PathLike)) \
            and hasattr(model, "device"):
        dev = str(model.device)
    else:
        dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dtype in (None, "auto") and model is not None and hasattr(model, "dtype") \
            and not isinstance(model, (str, os.PathLike)):
        dt = str(model.dtype).replace("torch.", "")
    be = select_backend(backend, dev, model)
    cpu = dev == "cpu" and be == "transformers"
    defaults = CPU_DEFAULTS if cpu else ACCELERATOR_DEFAULTS
    used = cpu and None in (n, max_new_tokens, batch_size)
    vals = {"n": n, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    for k, v in vals.items():
        if v is None:
            vals[k] = defaults[k]
        elif int(v) < 1:
            raise EvalSettingsError(f"{k} must be >= 1, got {v}")
    return EvalSettings(backend=be, device=dev, dtype=dt, cpu_defaults=used, **{k: int(v) for k, v in vals.items()})


def _ks(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def _load_done(path: Path, n: int) -> dict[str, list[dict]]:
    """Records already in the JSONL, grouped by problem id (a problem is complete with >= n samples)."""
    done: dict[str, list[dict]] = {}
    if path.exists():
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a half-written last line from an interrupted run
                    continue
                done.setdefault(rec["id"], []).append(rec)
    return done


def _stop_ids(model, tokenizer) -> tuple[list[int] | int | None, int | None]:
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return eos, pad


def generate_hf(model, tokenizer, prompts: list[str], n: int, temperature: float, top_p: float,
                max_new_tokens: int, batch_size: int) -> list[list[tuple[str, bool, int]]]:
    """n samples per prompt with ``model.generate``: the prompt copies are generated ``batch_size`` sequences at a
    time (left padding), on the model's device. Returns, per prompt, n (text, truncated, new tokens) triples;
    ``truncated`` means the sample hit max_new_tokens before an end-of-sequence token."""
    import torch

    tokenizer.padding_side = "left"
    eos, pad = _stop_ids(model, tokenizer)
    eos_set = set(eos if isinstance(eos, list) else [eos]) - {None}
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    results: list[tuple[str, bool, int]] = []
    do_sample = temperature > 0
    kw = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    for s in range(0, len(flat), max(1, batch_size)):
        chunk = [p for _, p in flat[s:s + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, **kw)
        gen = gen[:, enc["input_ids"].shape[1]:].cpu()  # (b, T_new)
        for row in gen.tolist():
            stop = next((j for j, t in enumerate(row) if t in eos_set), None)
            body = row if stop is None else row[:stop]
            results.append((tokenizer.decode(body, skip_special_tokens=True), stop is None, len(body)))
    return [results[i * n:(i + 1) * n] for i in range(len(prompts))]


class _VLLMGenerator:
    """One vLLM engine for the whole evaluation (vLLM is optional: imported here)."""

    def __init__(self, model_path: str, dtype: str, seed: int | None):
        from vllm import LLM  # optional dependency

        self.llm = LLM(model=str(model_path), dtype=dtype, seed=seed or 0)

    def __call__(self, prompts, n, temperature, top_p, max_new_tokens):
        from vllm import SamplingParams

        res = self.llm.generate(prompts, SamplingParams(n=n, temperature=temperature, top_p=top_p,
                                                        max_tokens=max_new_tokens))
        return [[(o.text, o.finish_reason == "length", len(o.token_ids)) for o in r.outputs] for r in res]


def summarize(records: dict[str, list[dict]], n: int) -> dict:
    """Table for one benchmark: mean pass@k, avg@k, maj@k (math_equal clustering) for k = 1, 2, 4, ... <= n."""
    probs = [recs[:n] for recs in records.values() if len(recs) >= n]
    table: dict = {"problems": len(probs), "n": n, "pass@k": {}, "avg@k": {}, "maj@k": {}}
    if not probs:
        return table
    for k in _ks(n):
        table["pass@k"][str(k)] = sum(pass_at_k(n, sum(r["correct"] for r in rs), k) for rs in probs) / len(probs)
        table["avg@k"][str(k)] = sum(avg_at_k([r["correct"] for r in rs], k) for rs in probs) / len(probs)
        table["maj@k"][str(k)] = sum(maj_at_k([r["answer"] for r in rs], rs[0]["gold"], k, equal=math_equal)
                                     for rs in probs) / len(probs)
    return table


def to_markdown(tables: dict[str, dict]) -> str:
    lines = []
    for bench, t in tables.items():
        lines += [f"## {bench} ({t['problems']} problems, n={t['n']})", "", "| k | pass@k | avg@k | maj@k |",
                  "|---|---|---|---|"]
        for k in t["pass@k"]:
            lines.append(f"| {k} | {t['pass@k'][k]:.4f} | {t['avg@k'][k]:.4f} | {t['maj@k'][k]:.4f} |")
        lines.append("")
    return "\n".join(lines)


def _resolve_model_name(model):
    """``"smollm2"`` (when no such local path exists) is the packaged real model (rlvr_entropy.models)."""
    if isinstance(model, str) and model.lower() in ("smollm2", "smollm2-135m-instruct") and not Path(model).exists():
        from rlvr_entropy.models import smollm2_dir
        return str(smollm2_dir())
    return model


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate(model, tokenizer, benchmarks, n: int | None = None, temperature: float = 0.6, top_p: float = 1.0,
             max_new_tokens: int | None = None, out_dir: str | os.PathLike = "eval_out", data_dir=None,
             limit: int | None = None, batch_size: int | None = None, backend: str = "auto",
             device: str | None = None, dtype: str | None = None, use_vllm: bool = False, seed: int | None = 0,
             progress: bool = True, log: Callable[[str], None] | None = _log_stderr) -> dict[str, dict]:
    """Sample ``n`` answers per problem of each benchmark, grade them, and write

    - ``out_dir/<bench>.answers.jsonl``: one record per sample {id, sample, response, answer, gold, correct,
      truncated}, appended as generated; problems already complete (>= n records) are skipped on a re-run
      (resumable);
    - ``out_dir/results.json`` and ``out_dir/results.md``: per-benchmark pass@k / avg@k / maj@k tables;
    - ``out_dir/settings.json``: the resolved settings (backend, device, dtype, sizes) and generation speed.

    ``model``: a transformers causal LM, or a path/name string (loaded with AutoModelForCausalLM in ``dtype`` on
    ``device``; ``"smollm2"`` is the packaged real model); ``tokenizer``: its tokenizer (loaded from ``model``
    when None). ``benchmarks``: names or parquet paths (comma string or list). ``n``, ``max_new_tokens``,
    ``batch_size``: None takes the device's defaults (``CPU_DEFAULTS`` on CPU). ``backend``: ``auto``,
    ``transformers`` or ``vllm`` (``use_vllm=True`` is the old spelling of ``backend="vllm"``). ``log``: where the
    settings line goes (stderr by default; None is silent). Returns the tables.
    """
    from tqdm.auto import tqdm

    if isinstance(benchmarks, str):
        benchmarks = [b for b in benchmarks.split(",") if b]
    model = _resolve_model_name(model)
    st = resolve_settings(model, "vllm" if use_vllm else backend, device, dtype, n, max_new_tokens, batch_size)
    log = log or (lambda msg: None)
    if st.cpu_defaults:
        log(f"rlvr-entropy eval: no accelerator in use: CPU-sized defaults n={CPU_DEFAULTS['n']}, "
            f"max_new_tokens={CPU_DEFAULTS['max_new_tokens']}, batch_size={CPU_DEFAULTS['batch_size']} fill the "
            f"unset sizes (--n/--max-new-tokens/--batch-size change them)")
    log(f"rlvr-entropy eval: {st.describe()}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = model if isinstance(model, (str, os.PathLike)) else None
    if st.backend == "vllm":
        generator = _VLLMGenerator(str(model_path), st.dtype, seed)
    if tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    if st.backend == "transformers":
        import torch
        if model_path is not None:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, st.dtype))
            model.to(st.device)
        elif device not in (None, "", "auto") or dtype not in (None, "auto"):
            model.to(device=st.device, dtype=getattr(torch, st.dtype))
        model.eval()
    if seed is not None:
        import torch
        torch.manual_seed(seed)
    n = st.n
    tables, n_seq, n_tok, t_gen = {}, 0, 0, 0.0
    for bench in benchmarks:
        problems = load_benchmark(bench, data_dir=data_dir, limit=limit)
        name = Path(bench).stem if str(bench).endswith(".parquet") else bench
        path = out / f"{name}.answers.jsonl"
        done = _load_done(path, n)
        partial = [k for k, v in done.items() if len(v) < n]
        if partial:  # an interrupted problem is regenerated from scratch: drop its records from the file
            for k in partial:
                del done[k]
            with open(path, "w") as f:
                for recs in done.values():
                    for r in recs:
                        f.write(json.dumps(r) + "\n")
        todo = [p for p in problems if p.id not in done]
        bar = tqdm(total=len(todo), desc=name, disable=not progress)
        step = max(1, (VLLM_SEQUENCES if st.backend == "vllm" else st.batch_size) // n)
        for s in range(0, len(todo), step):
            chunk = todo[s:s + step]
            prompts = [tokenizer.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True)
                       for p in chunk]
            t0 = time.perf_counter()
            if st.backend == "vllm":
                samples = generator(prompts, n, temperature, top_p, st.max_new_tokens)
            else:
                samples = generate_hf(model, tokenizer, prompts, n, temperature, top_p, st.max_new_tokens,
                                      st.batch_size)
            t_gen += time.perf_counter() - t0
            with open(path, "a") as f:
                for p, resp in zip(chunk, samples):
                    recs = []
                    for j, (t, truncated, ntok) in enumerate(resp):
                        ans = extract_answer(t)
                        recs.append({"id": p.id, "sample": j, "response": t, "answer": ans, "gold": p.ground_truth,
                                     "correct": bool(math_equal(ans, p.ground_truth)), "truncated": truncated})
                        f.write(json.dumps(recs[-1]) + "\n")
                        n_seq, n_tok = n_seq + 1, n_tok + ntok
                    done[p.id] = recs
                f.flush()
            bar.update(len(chunk))
        bar.close()
        ids = {p.id for p in problems}
        tables[name] = summarize({k: v for k, v in done.items() if k in ids}, n)
    if n_seq:
        log(f"rlvr-entropy eval: generated {n_seq} samples, {n_tok} tokens in {t_gen:.1f} s "
            f"({n_tok / max(t_gen, 1e-9):.1f} tokens/s)")
    (out / "settings.json").write_text(json.dumps({**asdict(st), "temperature": temperature, "top_p": top_p,
                                                   "seed": seed, "generated_samples": n_seq,
                                                   "generated_tokens": n_tok, "generate_seconds": round(t_gen, 3)},
                                                  indent=2))
    (out / "results.json").write_text(json.dumps(tables, indent=2))
    (out / "results.md").write_text(to_markdown(tables))
    return tables
