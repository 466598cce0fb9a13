"""Evaluation: unbiased pass@k, avg@k, maj@k with equivalence clustering, math answer checking (math-verify),
diversity and entropy statistics, and a benchmark runner for real models.

Importing this package is light: math_verify, pyarrow and transformers are imported inside the functions that
need them.
"""
from rlvr_entropy.eval.grading import clean_answer, extract_answer, math_equal
from rlvr_entropy.eval.metrics import (avg_at_k, distinct_correct, distinct_n, entropy_stats, maj_at_k, pass_at_k,
                                       pass_at_k_table)

__all__ = ["pass_at_k", "avg_at_k", "maj_at_k", "math_equal", "extract_answer", "clean_answer", "distinct_correct",
           "distinct_n", "entropy_stats", "pass_at_k_table"]
