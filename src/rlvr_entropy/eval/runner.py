"""Sample n answers per problem from a Hugging Face model, grade them, write pass@k / avg@k / maj@k tables.

Answers are appended to ``<out>/<benchmark>.answers.jsonl`` as they are generated (one line per sample), so an
interrupted evaluation resumes where it stopped. Generation: transformers on CPU/GPU, or vLLM when asked and
installed.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from rlvr_entropy.eval.benchmarks import MathProblem, load_benchmark
from rlvr_entropy.eval.grading import extract_answer, math_equal
from rlvr_entropy.eval.metrics import maj_at_k, pass_at_k


def _prompt_text(tokenizer, messages: list) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def _ks(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def _generate_hf(model, tokenizer, prompt: str, num: int, temperature: float, top_p: float, max_new_tokens: int,
                 batch_size: int) -> list[str]:
    import torch

    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    outs: list[str] = []
    while len(outs) < num:
        b = min(batch_size, num - len(outs))
        with torch.no_grad():
            gen = model.generate(**{k: v.to(model.device) for k, v in enc.items()}, do_sample=temperature > 0,
                                 temperature=temperature if temperature > 0 else None, top_p=top_p,
                                 max_new_tokens=max_new_tokens, num_return_sequences=b,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                 else tokenizer.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        outs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outs


def evaluate(model, tokenizer, benchmarks: Sequence[str], n: int = 32, temperature: float = 0.6, top_p: float = 1.0,
             max_new_tokens: int = 1024, out_dir: str | Path = "eval_out", data_dir: str | Path | None = None,
             batch_size: int = 8, max_problems: int | None = None, use_vllm: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` on ``benchmarks`` (names or parquet paths). Returns {benchmark: table}; also writes
    ``results.json`` and ``results.md`` in ``out_dir``. With ``use_vllm``, ``model`` is a path for vllm.LLM."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llm = None
    if use_vllm:
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ValueError("use_vllm=True needs vllm installed") from None
        llm = LLM(model=str(model))
    results: dict[str, Any] = {}
    for bench in benchmarks:
        problems = load_benchmark(bench, data_dir, max_problems)
        name = Path(bench).stem if str(bench).endswith(".parquet") else bench
        path = out / f"{name}.answers.jsonl"
        done: dict[str, list[dict]] = defaultdict(list)
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # torn last line
                done[rec["id"]].append(rec)
        bar = None
        if progress:
            try:
                from tqdm import tqdm

                bar = tqdm(total=len(problems) * n, initial=sum(min(len(v), n) for v in done.values()),
                           desc=name, dynamic_ncols=True)
            except ImportError:
                bar = None
        with path.open("a") as f:
            for p in problems:
                need = n - len(done[p.id])
                if need <= 0:
                    continue
                prompt = _prompt_text(tokenizer, p.prompt)
                if llm is not None:
                    sp = SamplingParams(n=need, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
                    texts = [o.text for o in llm.generate([prompt], sp)[0].outputs]
                else:
                    texts = _generate_hf(model, tokenizer, prompt, need, temperature, top_p, max_new_tokens,
                                         batch_size)
                for t in texts:
                    ans = extract_answer(t)
                    rec = {"id": p.id, "response": t, "answer": ans, "correct": math_equal(ans, p.gold)}
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    done[p.id].append(rec)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        results[name] = table(problems, done, n)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    return results


def table(problems: list[MathProblem], done: dict[str, list[dict]], n: int) -> dict[str, Any]:
    """pass@k (unbiased), avg@n and maj@k (answers clustered with math_equal) averaged over problems."""
    ks = _ks(n)
    per = []
    for p in problems:
        recs = done[p.id][:n]
        c = sum(bool(r["correct"]) for r in recs)
        per.append((p, recs, c))
    tab: dict[str, Any] = {"problems": len(problems), "n": n}
    for k in ks:
        tab[f"pass@{k}"] = sum(pass_at_k(n, c, k) for _, _, c in per) / len(per)
        tab[f"maj@{k}"] = sum(maj_at_k([r["answer"] for r in recs], p.gold, k, equal=math_equal)
                              for p, recs, _ in per) / len(per)
    tab[f"avg@{n}"] = sum(c / n for _, _, c in per) / len(per)
    return tab


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for bench, tab in results.items():
        keys = [k for k in tab if k not in ("problems", "n")]
        lines += [f"## {bench} ({tab['problems']} problems, n = {tab['n']})", "",
                  "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                  "| " + " | ".join(f"{tab[k]:.4f}" for k in keys) + " |", ""]
    return "\n".join(lines)
