"""Benchmark runner: sample n answers per problem with transformers (or vLLM behind ``use_vllm``), grade with
extract_answer + math_equal, write answers as JSONL as they come (resumable), then pass@k / avg@k / maj@k tables
as JSON and markdown."""
from __future__ import annotations

import json
import os
from pathlib import Path

from rlvr_entropy.eval.benchmarks import load_benchmark
from rlvr_entropy.eval.grading import extract_answer, math_equal
from rlvr_entropy.eval.metrics import avg_at_k, maj_at_k, pass_at_k


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


def _generate_hf(model, tokenizer, prompts: list[str], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, batch_size: int) -> list[list[str]]:
    import torch

    out: list[list[str]] = []
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    for start in range(0, len(prompts), max(1, batch_size)):
        chunk = prompts[start:start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        do_sample = temperature > 0
        kw = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, num_return_sequences=n,
                  pad_token_id=tokenizer.pad_token_id)
        if do_sample:
            kw.update(temperature=temperature, top_p=top_p)
        with torch.no_grad():
            gen = model.generate(**enc.to(model.device), **kw)
        gen = gen[:, enc["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
        for i in range(len(chunk)):
            out.append(texts[i * n:(i + 1) * n])
    return out


def _generate_vllm(model_path: str, prompts: list[str], n: int, temperature: float, top_p: float,
                   max_new_tokens: int) -> list[list[str]]:
    from vllm import LLM, SamplingParams  # optional dependency

    llm = LLM(model=model_path)
    res = llm.generate(prompts, SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens))
    return [[o.text for o in r.outputs] for r in res]


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


def evaluate(model, tokenizer, benchmarks, n: int = 4, temperature: float = 0.6, top_p: float = 1.0,
             max_new_tokens: int = 1024, out_dir: str | os.PathLike = "eval_out", data_dir=None,
             limit: int | None = None, batch_size: int = 8, use_vllm: bool = False, seed: int | None = 0,
             progress: bool = True) -> dict[str, dict]:
    """Sample ``n`` answers per problem of each benchmark, grade them, and write

    - ``out_dir/<bench>.answers.jsonl``: one record per sample {id, sample, response, answer, gold, correct},
      appended as generated; problems already complete (>= n records) are skipped on a re-run (resumable);
    - ``out_dir/results.json`` and ``out_dir/results.md``: per-benchmark pass@k / avg@k / maj@k tables.

    ``model``: a transformers causal LM (or a path/name string, loaded with AutoModelForCausalLM); ``tokenizer``:
    its tokenizer (loaded from ``model`` when None). ``benchmarks``: names or parquet paths (comma string or list).
    ``use_vllm``: generate with vLLM (requires vllm and a model path). Returns the tables.
    """
    from tqdm.auto import tqdm

    if isinstance(benchmarks, str):
        benchmarks = [b for b in benchmarks.split(",") if b]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = model if isinstance(model, (str, os.PathLike)) else None
    if not use_vllm and model_path is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path)
    if not use_vllm:
        model.eval()
    if seed is not None:
        import torch
        torch.manual_seed(seed)
    tables = {}
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
        step = len(todo) if use_vllm else max(1, batch_size)
        for s in range(0, len(todo), max(1, step)):
            chunk = todo[s:s + step]
            if use_vllm:
                tok = tokenizer
                if tok is None:
                    from transformers import AutoTokenizer
                    tok = AutoTokenizer.from_pretrained(model_path)
                prompts = [tok.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True)
                           for p in chunk]
                texts = _generate_vllm(str(model_path), prompts, n, temperature, top_p, max_new_tokens)
            else:
                prompts = [tokenizer.apply_chat_template(p.prompt, tokenize=False, add_generation_prompt=True)
                           for p in chunk]
                texts = _generate_hf(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, batch_size)
            with open(path, "a") as f:
                for p, resp in zip(chunk, texts):
                    recs = []
                    for j, t in enumerate(resp):
                        ans = extract_answer(t)
                        recs.append({"id": p.id, "sample": j, "response": t, "answer": ans,
                                     "gold": p.ground_truth, "correct": bool(math_equal(ans, p.ground_truth))})
                        f.write(json.dumps(recs[-1]) + "\n")
                    done[p.id] = recs
                f.flush()
            bar.update(len(chunk))
        bar.close()
        ids = {p.id for p in problems}
        tables[name] = summarize({k: v for k, v in done.items() if k in ids}, n)
    (out / "results.json").write_text(json.dumps(tables, indent=2))
    (out / "results.md").write_text(to_markdown(tables))
    return tables
