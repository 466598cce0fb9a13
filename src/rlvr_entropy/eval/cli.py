"""``rlvr-entropy eval``: sample, grade and tabulate a model on math benchmarks."""
from __future__ import annotations

import argparse


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local path or Hugging Face model name")
    p.add_argument("--benchmarks", default="aime24,math500", help="comma-separated names or .parquet paths")
    p.add_argument("--n", type=int, default=32, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--data-dir", default=None, help="folder of the verl parquet files (default: $RLVR_ENTROPY_DATA "
                                                     "or data/math)")
    p.add_argument("--out", default="eval_out")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-problems", type=int, default=None)
    p.add_argument("--vllm", action="store_true", help="generate with vLLM (must be installed)")


def run_eval(args) -> int:
    from rlvr_entropy.eval.runner import evaluate

    if args.vllm:
        model, tok = args.model, None
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        model.eval()
    res = evaluate(model, tok, [b.strip() for b in args.benchmarks.split(",") if b.strip()], n=args.n,
                   temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                   out_dir=args.out, data_dir=args.data_dir, batch_size=args.batch_size,
                   max_problems=args.max_problems, use_vllm=args.vllm)
    from rlvr_entropy.eval.runner import markdown

    print(markdown(res))
    return 0
