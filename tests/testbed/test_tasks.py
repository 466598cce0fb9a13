"""Verifiers (hand cases), enumerators against brute force, determinism, split disjointness, tokenizer."""
import itertools

import pytest

from rlvr_entropy.testbed.tasks import Problem, get_task, parse_steps, split_of
from rlvr_entropy.testbed.tokenizer import CharTokenizer

CD3 = get_task("countdown3")
P = Problem("countdown3", "3 5 7>022:", (3, 5, 7), 22)


@pytest.mark.parametrize("resp,ok", [
    ("3*5=15,15+7=22", True),
    ("5*3=15,7+15=22", True),          # operand order is free
    ("3*5=15,15+7=21", False),         # wrong target
    ("3*5=16,16+6=22", False),         # wrong arithmetic in the first step
    ("3*5=15,15+7=23", False),
    ("3*5=15,15+15=30", False),        # reuses an intermediate
    ("3*3=9,9+13=22", False),          # reuses a prompt number, uses a number that does not exist
    ("3*5=15,15*7=22", False),         # fake last step: claims the target with wrong arithmetic
    ("3*5=15", False),                 # not every number used
    ("3*5=15,15+7=22,22-0=22", False),  # too many steps
    ("3*5=15,15+07=22", False),        # leading zero
    ("", False), ("3*5=15,", False), ("3*5==15,15+7=22", False), ("35=15,15+7=22", False),
])
def test_countdown_verifier_hand_cases(resp, ok):
    assert CD3.verify(P, resp) is ok


def test_countdown_subtraction_division_rules():
    p = Problem("countdown3", "8 2 3>001:", (8, 2, 3), 1)
    assert CD3.verify(p, "8/2=4,4-3=1")
    assert not CD3.verify(p, "2/8=0,3-2=1")   # inexact division
    q = Problem("countdown3", "2 5 3>000:", (2, 5, 3), 0)
    assert not CD3.verify(q, "2+3=5,5-5=0")    # results must be positive


def _brute_countdown(nums, target):
    """Independent brute force: every sequence of (pick two available values, op) of n-1 steps."""
    sols = set()

    def ops(x, y):
        yield "+", x + y
        yield "*", x * y
        if x - y > 0:
            yield "-", x - y
        if y and x % y == 0:
            yield "/", x // y

    def rec(pool, steps):
        if len(pool) == 1:
            if pool[0] == target:
                sols.add(",".join(steps))
            return
        for i, j in itertools.permutations(range(len(pool)), 2):
            for op, z in ops(pool[i], pool[j]):
                rest = [v for k, v in enumerate(pool) if k not in (i, j)]
                rec(rest + [z], steps + [f"{pool[i]}{op}{pool[j]}={z}"])

    rec(list(nums), [])
    return sols


@pytest.mark.parametrize("name", ["countdown3", "countdown4"])
def test_countdown_enumerator_matches_brute_force(name):
    t = get_task(name)
    for p in t.sample("train", 6 if name == "countdown4" else 25, seed=3):
        sols = t.solutions(p)
        assert len(sols) == len(set(sols))
        assert set(sols) == _brute_countdown(p.numbers, p.target)
        assert all(t.verify(p, s) for s in sols)


def test_arith_verifier_and_enumerator():
    t = get_task("arith")
    p = Problem("arith", "47+38*25>", (47, 38, 25), 997, ("+", "*"))
    assert t.verify(p, "38*25=950,47+950=997")
    assert t.verify(p, "25*38=950,950+47=997")
    assert not t.verify(p, "47+38=85,85*25=2125")   # ignores precedence
    assert not t.verify(p, "38*25=950,47+950=998")  # wrong sum
    assert not t.verify(p, "38*25=950")             # unfinished
    assert not t.verify(p, "47+25=72,72+950=1022")  # 25 is bound to a product
    # a*b+c: 2 orders of the product x 2 orders of the sum
    assert sorted(t.solutions(p)) == sorted(["38*25=950,47+950=997", "38*25=950,950+47=997",
                                             "25*38=950,47+950=997", "25*38=950,950+47=997"])
    q = Problem("arith", "11+12+13>", (11, 12, 13), 36, ("+", "+"))
    assert len(t.solutions(q)) == 12  # 6 ordered first pairs x 2 orders of the last addition
    for p2 in t.sample("train", 30, seed=1):
        sols = t.solutions(p2)
        assert sols and all(t.verify(p2, s) for s in sols)
        assert all(parse_steps(s)[-1][3] == p2.target for s in sols)


def test_arith_prompts_state_the_whole_expression():
    """Version 2 of arith: four operands 2..9 joined by + or *; the prompt is the whole expression (its value, read
    with Python's precedence, is the target), every valid scratchpad has three steps and fits the response length."""
    import re

    from rlvr_entropy.testbed.tasks import ARITH_OPERANDS

    t = get_task("arith")
    assert t.version == 2 and ARITH_OPERANDS == 4
    for p in t.sample("train", 200, seed=2):
        expr = p.prompt[:-1]
        assert p.prompt.endswith(">") and re.fullmatch(r"[2-9]([+*][2-9]){3}", expr), p.prompt
        assert tuple(int(c) for c in expr[::2]) == p.numbers and tuple(expr[1::2]) == p.ops
        assert eval(expr) == p.target  # noqa: S307 - digits and + * only (checked above)
        sols = t.solutions(p)
        assert sols and all(len(parse_steps(x)) == 3 for x in sols)
        assert max(map(len, sols)) + 1 <= t.max_response_len  # + EOS


@pytest.mark.parametrize("name", ["countdown3", "countdown4", "arith"])
def test_generation_deterministic_and_splits_disjoint(name):
    t = get_task(name)
    a = t.sample("train", 50, seed=7)
    assert a == t.sample("train", 50, seed=7)
    assert a != t.sample("train", 50, seed=8)
    ev = t.sample("eval", 50, seed=0, unique=True)
    assert len({p.key for p in ev}) == 50
    assert not {p.key for p in a} & {p.key for p in ev}
    assert all(split_of(p.key) == "eval" for p in ev) and all(split_of(p.key) == "train" for p in a)
    assert len({len(p.prompt) for p in a + ev}) == 1  # prompts share a length
    for p in a[:10]:
        assert t.solutions(p), p


def test_tokenizer_round_trip_and_hf():
    tok = CharTokenizer()
    s = "3 5 7>022:3*5=15,15+7=22"
    ids = tok.encode(s, eos=True)
    assert ids[-1] == tok.eos_id and tok.decode(ids) == s
    assert tok.decode(ids + [5, 6]) == s  # stops at EOS
    with pytest.raises(ValueError, match="alphabet"):
        tok.encode("x")
    hf = tok.to_hf()
    assert hf(s)["input_ids"] == tok.encode(s)
    assert hf.decode(tok.encode(s)) == s
    assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
