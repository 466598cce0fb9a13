"""CLI pieces for ``rlvr-entropy eval`` (wired into the main parser by rlvr_entropy/cli.py)."""
from __future__ import annotations

import argparse


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``eval`` options to ``parser``."""
    parser.add_argument("--model", required=True, help="local path or hub name of a causal LM")
    parser.add_argument("--benchmarks", default="aime24,math500", help="comma-separated names or parquet paths")
    parser.add_argument("--n", type=int, default=32, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--data-dir", default=None, help="folder with the verl parquet files")
    parser.add_argument("--out", default="eval_out", help="output folder (JSONL answers, results.json/.md)")
    parser.add_argument("--limit", type=int, default=None, help="first N distinct problems per benchmark")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate() call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm", action="store_true", help="generate with vLLM (must be installed)")
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """Run the evaluation described by parsed ``args``; prints the markdown tables. Returns an exit code."""
    from rlvr_entropy.eval.runner import evaluate, to_markdown

    tables = evaluate(args.model, None, args.benchmarks, n=args.n, temperature=args.temperature, top_p=args.top_p,
                      max_new_tokens=args.max_new_tokens, out_dir=args.out, data_dir=args.data_dir,
                      limit=args.limit, batch_size=args.batch_size, use_vllm=args.vllm, seed=args.seed)
    print(to_markdown(tables))
    return 0
