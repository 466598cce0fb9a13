"""Synthetic verifiable tasks with several valid solution paths, one verifier each (reward == evaluation).

Every task is character level and shares one alphabet (see ``tokenizer.py``); prompts of one task share a length,
so a batch of prompts needs no padding.

``countdown3`` / ``countdown4``
    Prompt ``"3 5 7>022:"``: the numbers (1..9) then ``>`` and the target padded to 3 digits then ``:``.
    Response: a scratchpad of steps ``"3*5=15,15+7=22"`` (then EOS). Each step ``x op y=z`` combines two
    *available* values (a prompt number not used yet, or an earlier step's result not used yet) with one of
    ``+ - * /``; ``z`` must be the right value and a positive integer (``-`` needs x > y, ``/`` exact division).
    Every prompt number is used exactly once (n - 1 steps for n numbers) and the last value equals the target.
    The verifier checks every step's arithmetic: most wrong answers of a trained model fake the last step.

``arith``
    Prompt ``"7*8+6*3>"``: four operands 2..9 joined by ``+`` or ``*`` (fixed length 8; three steps, one more
    than countdown3, so a longer chain of reasoning). The expression is a sum of products. Response: steps
    ``x op y=z``; a ``*`` step multiplies two factors of the same product term (any two, in either order), a
    ``+`` step adds two terms that are already single numbers. The response is
    correct when every step is legal and right and one number, the expression's value, is left. Several valid
    paths: the order of independent reductions and of the operands, e.g. ``"7*8=56,6*3=18,56+18=74"`` and
    ``"3*6=18,8*7=56,18+56=74"``. (``Task.version`` 2; version 1 had three 2-digit operands, and the 0.86M
    model never learned their 2-by-4-digit products: pass@1 0 after its warm start.)

A problem is a ``Problem(prompt, numbers, target, task)``. Generation is deterministic from a seed. Train and
held-out evaluation splits are disjoint by construction: a problem's split is a hash of its canonical key
(``split_of``), and each generator only yields problems of its split.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

__all__ = ["Problem", "Task", "get_task", "TASKS", "parse_steps", "EVAL_FRACTION"]

EVAL_FRACTION = 0.1  # share of the problem space reserved for held-out evaluation


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    numbers: tuple[int, ...]
    target: int
    ops: tuple[str, ...] = ()  # arith only: the operators between numbers

    @property
    def key(self) -> str:
        return f"{self.task}|{self.prompt}"


def _apply(x: int, op: str, y: int) -> int | None:
    """Countdown arithmetic on positive integers; None when the result is not a positive integer."""
    if op == "+":
        return x + y
    if op == "*":
        return x * y
    if op == "-":
        return x - y if x > y else None
    if op == "/":
        return x // y if y != 0 and x % y == 0 else None
    return None


def parse_steps(response: str) -> list[tuple[int, str, int, int]] | None:
    """``"3*5=15,15+7=22"`` -> [(3, '*', 5, 15), (15, '+', 7, 22)]; None when malformed (no leading zeros)."""
    if not response:
        return None
    steps = []
    for part in response.split(","):
        if part.count("=") != 1:
            return None
        lhs, rhs = part.split("=")
        op_pos = [i for i, c in enumerate(lhs) if c in "+-*/"]
        if len(op_pos) != 1:
            return None
        i = op_pos[0]
        a, b = lhs[:i], lhs[i + 1:]
        nums = (a, b, rhs)
        if any(not s.isdigit() or (len(s) > 1 and s[0] == "0") for s in nums):
            return None
        steps.append((int(a), lhs[i], int(b), int(rhs)))
    return steps


def final_answer(response: str) -> str | None:
    """The value the response claims (after the last ``=``), or None when there is none."""
    if "=" not in response:
        return None
    ans = response.rsplit("=", 1)[1]
    return ans if ans.isdigit() else None


# ------------------------------------------------------------------------------------------- countdown
def countdown_verify(problem: Problem, response: str) -> bool:
    steps = parse_steps(response)
    if steps is None or len(steps) != len(problem.numbers) - 1:
        return False
    pool = list(problem.numbers)
    for x, op, y, z in steps:
        for v in (x, y):
            if v not in pool:
                return False
            pool.remove(v)
        if _apply(x, op, y) != z:
            return False
        pool.append(z)
    return len(pool) == 1 and pool[0] == problem.target


def countdown_solutions(numbers: tuple[int, ...]) -> dict[int, list[str]]:
    """Every valid scratchpad for these numbers, grouped by final value. Ordered pairs and both orders of
    independent steps count as different solutions (they are different strings a model can write)."""
    return {k: list(v) for k, v in _countdown_solutions(tuple(numbers)).items()}


@lru_cache(maxsize=4096)
def _countdown_solutions(numbers: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
    out: dict[int, list[str]] = {}

    def rec(pool: list[int], steps: list[str]) -> None:
        if len(pool) == 1:
            out.setdefault(pool[0], []).append(",".join(steps))
            return
        seen = set()
        for i in range(len(pool)):
            for j in range(len(pool)):
                if i == j:
                    continue
                x, y = pool[i], pool[j]
                for op in "+-*/":
                    z = _apply(x, op, y)
                    if z is None:
                        continue
                    s = f"{x}{op}{y}={z}"
                    if s in seen:  # equal numbers in the pool give the same step string
                        continue
                    seen.add(s)
                    rest = [pool[k] for k in range(len(pool)) if k not in (i, j)]
                    rec(rest + [z], steps + [s])

    rec(list(numbers), [])
    return {k: tuple(dict.fromkeys(v)) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- arith
ARITH_OPERANDS = 4  # operands 2..9 per arith prompt


def _arith_terms(numbers: tuple[int, ...], ops: tuple[str, ...]) -> list[list[int]]:
    terms = [[numbers[0]]]
    for op, n in zip(ops, numbers[1:]):
        if op == "*":
            terms[-1].append(n)
        else:
            terms.append([n])
    return terms


def _arith_value(numbers, ops) -> int:
    v = 0
    for t in _arith_terms(numbers, ops):
        p = 1
        for f in t:
            p *= f
        v += p
    return v


def arith_verify(problem: Problem, response: str) -> bool:
    steps = parse_steps(response)
    if steps is None:
        return False
    terms = [list(t) for t in _arith_terms(problem.numbers, problem.ops)]
    for x, op, y, z in steps:
        if op == "*":
            if x * y != z:
                return False
            for t in terms:
                tt = list(t)
                if x in tt:
                    tt.remove(x)
                    if y in tt:
                        tt.remove(y)
                        t[:] = tt + [z]
                        break
            else:
                return False
        elif op == "+":
            if x + y != z:
                return False
            singles = [t[0] for t in terms if len(t) == 1]
            if x not in singles:
                return False
            singles.remove(x)
            if y not in singles:
                return False
            terms.remove([x])
            terms.remove([y])
            terms.append([z])
        else:
            return False
    return len(terms) == 1 and terms[0] == [problem.target]


def arith_solutions(numbers: tuple[int, ...], ops: tuple[str, ...]) -> list[str]:
    """Every valid scratchpad of an arith problem (ordered operands and every legal reduction order)."""
    return list(_arith_solutions(tuple(numbers), tuple(ops)))


@lru_cache(maxsize=4096)
def _arith_solutions(numbers, ops) -> tuple[str, ...]:
    out: list[str] = []

    def rec(terms: list[list[int]], steps: list[str]) -> None:
        if len(terms) == 1 and len(terms[0]) == 1:
            out.append(",".join(steps))
            return
        seen = set()
        for ti, t in enumerate(terms):  # multiply two factors of one term
            for i in range(len(t)):
                for j in range(len(t)):
                    if i == j:
                        continue
                    s = f"{t[i]}*{t[j]}={t[i] * t[j]}"
                    if (ti, s) in seen:
                        continue
                    seen.add((ti, s))
                    nt = [t[k] for k in range(len(t)) if k not in (i, j)] + [t[i] * t[j]]
                    rec(terms[:ti] + [nt] + terms[ti + 1:], steps + [s])
        singles = [k for k, t in enumerate(terms) if len(t) == 1]
        for i in singles:  # add two finished terms
            for j in singles:
                if i == j:
                    continue
                x, y = terms[i][0], terms[j][0]
                s = f"{x}+{y}={x + y}"
                if ("+", s) in seen:
                    continue
                seen.add(("+", s))
                rest = [terms[k] for k in range(len(terms)) if k not in (i, j)]
                rec(rest + [[x + y]], steps + [s])

    rec([list(t) for t in _arith_terms(numbers, ops)], [])
    return tuple(dict.fromkeys(out))


@lru_cache(maxsize=4096)
def _solution_targets(numbers: tuple[int, ...]) -> tuple[int, ...]:
    """The final value of every valid scratchpad of ``numbers`` that fits the 3-digit prompt (one entry per
    solution, so a uniform choice weighs targets by their number of solutions)."""
    return tuple(t for t, ss in _countdown_solutions(numbers).items() for _ in ss if t <= 999)


# ------------------------------------------------------------------------------------------------ tasks
def split_of(key: str) -> str:
    """'eval' for a fixed ~EVAL_FRACTION of problem keys (stable across runs and machines), else 'train'."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "eval" if (h % 10_000) < EVAL_FRACTION * 10_000 else "train"


class Task:
    """A task family: problem generator, verifier (the reward and the evaluation), solution enumerator."""

    def __init__(self, name: str, n_numbers: int = 3) -> None:
        self.name = name
        self.n_numbers = n_numbers
        self.kind = "arith" if name == "arith" else "countdown"
        self.max_response_len = 16 if (self.kind == "countdown" and n_numbers == 3) else 32
        #: bumped when the generator changes which problems a task draws (part of the warm-start cache key)
        self.version = 2 if self.kind == "arith" else 1

    # one problem from an rng (split not checked)
    def _draw(self, rng: random.Random) -> Problem:
        if self.kind == "countdown":
            while True:
                nums = tuple(rng.randint(1, 9) for _ in range(self.n_numbers))
                # target of a uniformly drawn solution: problems with several paths are favoured, as in the
                # usual Countdown generators that build the target from a random expression
                targets = _solution_targets(nums)
                if not targets:
                    continue
                target = rng.choice(targets)
                prompt = " ".join(map(str, nums)) + f">{target:03d}:"
                return Problem(self.name, prompt, nums, target)
        nums = tuple(rng.randint(2, 9) for _ in range(ARITH_OPERANDS))
        ops = tuple(rng.choice("+*") for _ in range(ARITH_OPERANDS - 1))
        prompt = "".join(f"{n}{op}" for n, op in zip(nums, ops + (">",)))
        return Problem(self.name, prompt, nums, _arith_value(nums, ops), ops)

    def problems(self, split: str, seed: int) -> Iterator[Problem]:
        """Endless deterministic stream of problems of ``split`` ('train' or 'eval')."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        while True:
            p = self._draw(rng)
            if split_of(p.key) == split:
                yield p

    def sample(self, split: str, n: int, seed: int, unique: bool = False) -> list[Problem]:
        out, seen = [], set()
        for p in self.problems(split, seed):
            if unique and p.key in seen:
                continue
            seen.add(p.key)
            out.append(p)
            if len(out) == n:
                return out
        raise AssertionError("unreachable")

    def verify(self, problem: Problem, response: str) -> bool:
        """The one verifier: reward 1.0 iff this returns True; evaluation uses it too."""
        if self.kind == "countdown":
            return countdown_verify(problem, response)
        return arith_verify(problem, response)

    def reward(self, problem: Problem, response: str) -> float:
        return 1.0 if self.verify(problem, response) else 0.0

    def solutions(self, problem: Problem) -> list[str]:
        """All valid responses (without EOS)."""
        if self.kind == "countdown":
            return list(_countdown_solutions(problem.numbers).get(problem.target, ()))
        return arith_solutions(problem.numbers, problem.ops)

    @property
    def prompt_len(self) -> int:
        return len(self._draw(random.Random(0)).prompt)


TASKS = {"countdown3": lambda: Task("countdown3", 3), "countdown4": lambda: Task("countdown4", 4),
         "arith": lambda: Task("arith")}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name]()
