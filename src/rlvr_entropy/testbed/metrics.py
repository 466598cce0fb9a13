"""Evaluation metrics of the testbed (pure Python).

Local until ``rlvr_entropy.eval`` provides them; definitions:

* pass@k: the unbiased estimator of Chen et al. (arXiv 2107.03374), 1 - C(n - c, k) / C(n, k) for n samples of
  which c are correct, averaged over problems. Never "any correct in the first k".
* maj@k: plurality vote over the first k samples, ties broken by the earliest sample. For ``arith`` the vote is
  over final answers (the number after the last ``=``; no answer is a vote for "none") and the winner is correct
  when it equals the target: the usual majority vote. For Countdown every response claims the target (wrong ones
  fake the last step), so a vote over final answers is always "right" and says nothing; there the vote is over
  whole scratchpads and the winner is correct when the verifier accepts it: "is the policy's most frequent
  solution a valid one". It rises as the policy concentrates on one solution, so read it next to pass@k.
* distinct correct: number of different verified-correct response strings among the n samples of a problem,
  averaged over problems (a diversity measure: collapse drives it to 1 or 0).
"""
from __future__ import annotations

from collections import Counter
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_pass_at_k(correct: list[list[bool]], k: int) -> float:
    """Mean unbiased pass@k over problems; ``correct[i]`` holds the verdicts of problem i's samples."""
    return sum(pass_at_k(len(c), sum(c), k) for c in correct) / max(len(correct), 1)


def maj_at_k(answers: list, target, k: int) -> bool:
    """Plurality vote over ``answers[:k]`` (earliest wins ties); True when the winner equals ``target`` (a value,
    or a callable ``winner -> bool``). ``None`` answers vote for "no answer", which is never correct."""
    votes: Counter = Counter()
    first = {}
    for i, a in enumerate(answers[:k]):
        votes[a] += 1
        first.setdefault(a, i)
    if not votes:
        return False
    best = max(votes, key=lambda a: (votes[a], -first[a]))
    if best is None:
        return False
    return bool(target(best)) if callable(target) else best == target


def distinct_correct(responses: list[str], correct: list[bool]) -> int:
    return len({r for r, ok in zip(responses, correct) if ok})
