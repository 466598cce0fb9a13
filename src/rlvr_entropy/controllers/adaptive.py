"""Skywork-OR1's adaptive entropy coefficient (arXiv 2505.22312, section 3.2.4).

Each step, given the measured entropy H:

    c <- clip(c + delta if H < H_target else c - delta, c_min, c_max)

and the bonus is applied only while H < H_target (the caller asks :meth:`active`). Skywork-OR1's
``EntController`` (verl/trainer/ppo/core_algos.py, as reproduced in derived code; the original file was not read)
uses the same strict ``<`` for the step direction and the gate; TRL 1.16 (``use_adaptive_entropy``) uses ``<=``
for both, which differs only when H equals the target exactly.
"""
from __future__ import annotations

import math
from typing import Any


class AdaptiveCoefficient:
    """c_k, updated once per step by :meth:`update`; ``state_dict()`` holds everything that changes."""

    def __init__(self, target: float, delta: float, coef_min: float, coef_max: float, coef_init: float = 0.0):
        self.target = float(target)
        self.delta = float(delta)
        self.coef_min = float(coef_min)
        self.coef_max = float(coef_max)
        if not (math.isfinite(self.delta) and self.delta >= 0):
            raise ValueError(f"delta must be finite and >= 0, got {delta!r}")
        if not self.coef_min <= self.coef_max:
            raise ValueError(f"coef_min ({coef_min}) must be <= coef_max ({coef_max})")
        self.coef = min(max(float(coef_init), self.coef_min), self.coef_max)
        self.last_entropy: float | None = None
        self.steps = 0

    def update(self, entropy: float) -> float:
        """One controller step given the measured entropy; returns the new coefficient."""
        h = float(entropy)
        if not math.isfinite(h):
            raise ValueError(f"measured entropy must be finite, got {entropy!r}")
        self.last_entropy = h
        c = self.coef + self.delta if h < self.target else self.coef - self.delta
        self.coef = min(max(c, self.coef_min), self.coef_max)
        self.steps += 1
        return self.coef

    def active(self) -> bool:
        """True while the last measured entropy is below the target (False before the first measurement)."""
        return self.last_entropy is not None and self.last_entropy < self.target

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "last_entropy": self.last_entropy, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "coef" not in state:
            raise ValueError("adaptive coefficient state must hold 'coef'")
        self.coef = float(state["coef"])
        self.last_entropy = None if state.get("last_entropy") is None else float(state["last_entropy"])
        self.steps = int(state.get("steps", 0))
