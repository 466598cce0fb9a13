"""The level of an entropy floor, moved by the measured reach of the training batch (this library's thermostat).

Reach of a step: the share of its prompts whose group solved at least one sample (pass@G on the training
prompts, G the group size). RLVR's known failure is that this falls while pass@1 rises (the policy stops finding
the answers it used to find). The floor's level m (a share of the start entropy H0) follows

    ema <- beta ema + (1 - beta) reach          (ema starts at the first reach)
    ref  = mean reach of the first ``ref_steps`` steps
    m   <- clip(m + gain (ref - tol - ema), min_scale, 1)

so the floor descends while the reach holds (at a rate gain x tol per step when it is at its reference) and
rises when the reach falls more than ``tol`` below its reference: on a task where losing entropy costs no reach
the floor gets out of the way, on one where it does it holds entropy.
"""
from __future__ import annotations

import math
from typing import Any


class ReachFloor:
    """``m`` (starts at 1) and the reach statistics; ``update(reach)`` once per step returns the new m."""

    def __init__(self, tol: float, gain: float, ema: float = 0.9, ref_steps: int = 10,
                 min_scale: float = 0.3) -> None:
        for name, v, lo, hi in (("tol", tol, 0.0, 1.0), ("gain", gain, 0.0, math.inf), ("ema", ema, 0.0, 1.0),
                                ("min_scale", min_scale, 0.0, 1.0)):
            if not (isinstance(v, (int, float)) and math.isfinite(float(v)) and lo <= float(v) <= hi):
                raise ValueError(f"{name} must be a finite number in [{lo}, {hi}], got {v!r}")
        if not isinstance(ref_steps, int) or ref_steps < 1:
            raise ValueError(f"ref_steps must be an int >= 1, got {ref_steps!r}")
        self.tol, self.gain, self.beta = float(tol), float(gain), float(ema)
        self.ref_steps, self.min_scale = ref_steps, float(min_scale)
        self.m = 1.0
        self.ema: float | None = None
        self.ref_sum = 0.0
        self.steps = 0

    @property
    def ref(self) -> float | None:
        """Reference reach: the mean over the first ``ref_steps`` steps (so far)."""
        n = min(self.steps, self.ref_steps)
        return self.ref_sum / n if n else None

    def update(self, reach: float) -> float:
        r = float(reach)
        if not (math.isfinite(r) and 0.0 <= r <= 1.0):
            raise ValueError(f"reach must be a share in [0, 1], got {reach!r}")
        if self.steps < self.ref_steps:
            self.ref_sum += r
        self.steps += 1
        self.ema = r if self.ema is None else self.beta * self.ema + (1.0 - self.beta) * r
        self.m = min(max(self.m + self.gain * (self.ref - self.tol - self.ema), self.min_scale), 1.0)
        return self.m

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "ema": self.ema, "ref_sum": self.ref_sum, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m = float(state["m"])
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.ref_sum = float(state["ref_sum"])
        self.steps = int(state["steps"])
