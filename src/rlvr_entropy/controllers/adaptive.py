"""Skywork-OR1's adaptive entropy coefficient (arXiv 2505.22312, section 3.2.4).

Each step: c <- clip(c + delta if H < H_target else c - delta, c_min, c_max). The bonus is applied only while
H < H_target (the caller asks :meth:`active`).
"""
from __future__ import annotations

from typing import Any


class AdaptiveCoefficient:
    def __init__(self, target: float, delta: float, coef_min: float, coef_max: float, coef_init: float = 0.0):
        self.target = float(target)
        self.delta = float(delta)
        self.coef_min = float(coef_min)
        self.coef_max = float(coef_max)
        self.coef = min(max(float(coef_init), self.coef_min), self.coef_max)
        self.last_entropy: float | None = None
        self.steps = 0

    def update(self, entropy: float) -> float:
        """One controller step given the measured entropy; returns the new coefficient."""
        h = float(entropy)
        self.last_entropy = h
        c = self.coef + self.delta if h < self.target else self.coef - self.delta
        self.coef = min(max(c, self.coef_min), self.coef_max)
        self.steps += 1
        return self.coef

    def active(self) -> bool:
        return self.last_entropy is not None and self.last_entropy < self.target

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "last_entropy": self.last_entropy, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])
        self.last_entropy = None if state.get("last_entropy") is None else float(state["last_entropy"])
        self.steps = int(state.get("steps", 0))
