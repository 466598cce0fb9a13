import itertools
import math

import pytest
import torch

from rlvr_entropy.eval import (avg_at_k, distinct_correct, distinct_n, entropy_stats, extract_answer, maj_at_k,
                               math_equal, pass_at_k)


def test_pass_at_k_hand_cases():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(4, 1, 4) == 1.0  # n - c < k


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration_of_subsets(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_errors_name_argument():
    with pytest.raises(ValueError, match="k must"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="c must"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="n must"):
        pass_at_k(0, 0, 1)


def test_avg_at_k():
    assert avg_at_k([True, False, True, True]) == 0.75
    assert avg_at_k([True, False, True, True], k=2) == 0.5


def test_maj_at_k_clustering_and_tie_rule():
    eq = math_equal
    # "1/2" and "0.5" are one cluster (2 votes) beating "3" (1 vote)
    assert maj_at_k(["1/2", "3", "0.5"], "\\frac{1}{2}", 3, equal=eq) == 1.0
    # tie 1-1: the cluster seen first ("3") wins
    assert maj_at_k(["3", "4"], "4", 2) == 0.0
    assert maj_at_k(["4", "3"], "4", 2) == 1.0
    # None answers cast no vote; only k first answers count
    assert maj_at_k([None, None, "4"], "4", 3) == 1.0
    assert maj_at_k(["3", "4", "4"], "4", 1) == 0.0
    assert maj_at_k([None], "4", 1) == 0.0


def test_diversity():
    assert distinct_correct(["a", "a", "b", "c"], [True, True, True, False]) == 2
    assert distinct_correct(["1/2", "0.5"], [True, True], equal=math_equal) == 1
    assert distinct_n(["a b c", "a b d"], n=2) == pytest.approx(3 / 4)
    assert distinct_n(["a"], n=2) == 0.0


def test_entropy_stats():
    h = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 9.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    s = entropy_stats(h, m, high=2.5)
    assert s["entropy/mean"] == pytest.approx(2.0)
    assert s["entropy/p50"] == pytest.approx(2.0)
    assert s["entropy/high_frac"] == pytest.approx(0.4)


@pytest.mark.parametrize("text,expected", [
    ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}"),
    ("work...\nAnswer: 42", "42"),
    ("Answer: $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("I think it's 1,024 or so.", "1024"),
    ("no numbers here", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_math_equal():
    assert math_equal("\\frac{1}{2}", "0.5")
    assert math_equal("2\\sqrt{3}", "\\sqrt{12}")
    assert not math_equal("3", "4")
    assert not math_equal(None, "4")


@pytest.mark.parametrize("text,expected", [
    ("Answer: 5\n so \\boxed{6}", "6"),                                    # boxed beats "Answer:"
    ("Answer: 12\nmore\nAnswer: 17", "17"),                                # last "Answer:" line
    ("nested \\boxed{\\sqrt{\\frac{a}{b}}} done", "\\sqrt{\\frac{a}{b}}"),
    ("so $x = 3$ and finally $\\frac{1}{3}$ holds", "\\frac{1}{3}"),       # last inline math span
    ("the set \\([-2, 7]\\) wins", "[-2, 7]"),
    ("about 4.5e33 photons", "4.5e33"),                                    # scientific notation kept
    ("value is -2.5", "-2.5"),
])
def test_extract_answer_fallback_order(text, expected):
    assert extract_answer(text) == expected


def test_maj_at_k_tie_broken_by_earliest_first_occurrence():
    # "b" and "a" both have 2 votes; "b" appears first -> "b" is the majority
    assert maj_at_k(["b", "a", "a", "b"], "b", k=4) == 1.0
    assert maj_at_k(["b", "a", "a", "b"], "a", k=4) == 0.0
    assert maj_at_k(["a", "b", "b", "a"], "a", k=4) == 1.0
    # None never votes; only the first k answers vote
    assert maj_at_k([None, None, None, "4", "3", "3"], "4", k=5) == 1.0
    assert maj_at_k([None, None, None, "4", "3", "3"], "3", k=6) == 1.0
