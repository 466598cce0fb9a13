"""Sampling metrics (pure Python, plus torch for entropy statistics)."""
from __future__ import annotations

from typing import Callable, Hashable, Sequence


def _check_nck(n: int, c: int, k: int) -> None:
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as the
    numerically stable product 1 - prod_{i=n-c+1}^{n} (1 - k / i)."""
    _check_nck(n, c, k)
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(correct: Sequence[bool], k: int | None = None) -> float:
    """Mean accuracy over the first k samples (all when k is None): avg@k."""
    xs = list(correct) if k is None else list(correct)[:k]
    if k is not None and (k < 1 or k > len(correct)):
        raise ValueError(f"k must be in [1, {len(correct)}], got {k}")
    if not xs:
        raise ValueError("correct is empty")
    return sum(bool(x) for x in xs) / len(xs)


def _default_equal(a: str, b: str) -> bool:
    return str(a).strip() == str(b).strip()


def maj_at_k(answers: Sequence[str | None], gold: str, k: int,
             equal: Callable[[str, str], bool] = _default_equal) -> float:
    """maj@k: 1.0 if the plurality answer among the first k is correct, else 0.0.

    Answers are clustered by ``equal`` (each answer joins the first cluster whose representative it equals; the
    representative is the cluster's first answer). None answers cast no vote. Tie rule: among clusters with the
    most votes, the one whose first answer came earliest wins. No vote at all gives 0.0.
    """
    if k < 1 or k > len(answers):
        raise ValueError(f"k must be in [1, {len(answers)}], got {k}")
    clusters: list[list] = []  # [representative, votes, first index]
    for i, a in enumerate(answers[:k]):
        if a is None:
            continue
        for cl in clusters:
            if equal(a, cl[0]):
                cl[1] += 1
                break
        else:
            clusters.append([a, 1, i])
    if not clusters:
        return 0.0
    best = max(clusters, key=lambda cl: (cl[1], -cl[2]))
    return 1.0 if equal(best[0], gold) else 0.0


def distinct_correct(answers: Sequence[Hashable | None], correct: Sequence[bool],
                     equal: Callable | None = None) -> int:
    """Number of equivalence clusters among the correct answers (exact match when ``equal`` is None)."""
    reps: list = []
    for a, ok in zip(answers, correct):
        if not ok or a is None:
            continue
        if equal is None:
            if a not in reps:
                reps.append(a)
        elif not any(equal(a, r) for r in reps):
            reps.append(a)
    return len(reps)


def distinct_n(responses: Sequence[str | Sequence], n: int = 2) -> float:
    """distinct-n: unique n-grams / total n-grams over all responses (strings split on whitespace)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total, seen = 0, set()
    for r in responses:
        toks = r.split() if isinstance(r, str) else list(r)
        for i in range(len(toks) - n + 1):
            seen.add(tuple(toks[i:i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def entropy_stats(entropy, mask, high: float = 1.0, percentiles=(10, 50, 90)) -> dict[str, float]:
    """Token-entropy statistics over valid positions: mean, percentiles, share above ``high`` nats.
    entropy [B, T] (tensor), mask bool [B, T]."""
    import torch

    v = entropy.detach()[mask.bool()].double()
    if v.numel() == 0:
        return {"entropy/mean": float("nan"), **{f"entropy/p{p}": float("nan") for p in percentiles},
                "entropy/high_frac": float("nan")}
    q = torch.quantile(v, torch.tensor([p / 100 for p in percentiles], dtype=torch.float64))
    return {"entropy/mean": float(v.mean()), **{f"entropy/p{p}": float(x) for p, x in zip(percentiles, q)},
            "entropy/high_frac": float((v > high).double().mean())}


def pass_at_k_table(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> dict[int, float]:
    """Mean unbiased pass@k over problems given (n, c) per problem, for every k <= min n."""
    out = {}
    for k in ks:
        vals = [pass_at_k(n, c, k) for n, c in counts if k <= n]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out
