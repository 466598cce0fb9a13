"""EntroPIC's proportional-integral controller (arXiv 2511.15248; official code yk7333/EntroPIC@2470730c,
dp_actor.py:138-146).

For each measured entropy H, with e = H - H_target (positive when entropy is too HIGH):

    alpha = clip(K_i * I + K_p * e, -1, 1)     (the integral BEFORE this measurement)
    I    <- I + e * weight                      (official weight: rows of the micro-batch / mini-batch size)

The output is clipped, the integral is not (no anti-windup, as in the official code; ``integral_max`` is an
option). Unlike the official actor, ``state_dict()`` holds I, so a resumed run keeps it.
"""
from __future__ import annotations

import math
from typing import Any


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


class EntroPICController:
    """I (``integral``), updated by :meth:`update`; :meth:`alpha` reads the output without changing anything."""

    def __init__(self, target: float, kp: float = 1.0, ki: float = 0.01, *, alpha_max: float = 1.0,
                 integral_max: float | None = None) -> None:
        self.target = _finite("target", target)
        self.kp = _finite("kp", kp)
        self.ki = _finite("ki", ki)
        self.alpha_max = _finite("alpha_max", alpha_max)
        if self.alpha_max < 0:
            raise ValueError(f"alpha_max must be >= 0, got {alpha_max!r}")
        self.integral_max = None if integral_max is None else _finite("integral_max", integral_max)
        if self.integral_max is not None and self.integral_max < 0:
            raise ValueError(f"integral_max must be >= 0 or None, got {integral_max!r}")
        self.integral = 0.0
        self.updates = 0
        self.last_alpha = 0.0
        self.last_entropy: float | None = None

    def alpha(self, entropy: float) -> float:
        """clip(K_i I + K_p (H - H_target), -alpha_max, alpha_max) with the integral as it stands (no update)."""
        e = _finite("entropy", entropy) - self.target
        a = self.integral * self.ki + e * self.kp  # the official order: I * K_i + (H - target) * K_p
        return min(max(a, -self.alpha_max), self.alpha_max)

    def update(self, entropy: float, weight: float = 1.0) -> float:
        """One official controller step: returns alpha (from the integral before this measurement), then adds
        (H - H_target) * weight to the integral. ``weight`` is rows / mini-batch size in the official actor."""
        w = _finite("weight", weight)
        if w < 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}")
        h = _finite("entropy", entropy)
        a = self.alpha(h)
        i = self.integral + (h - self.target) * w
        if self.integral_max is not None:
            i = min(max(i, -self.integral_max), self.integral_max)
        self.integral = i
        self.updates += 1
        self.last_alpha, self.last_entropy = a, h
        return a

    def state_dict(self) -> dict[str, Any]:
        return {"integral": self.integral, "updates": self.updates, "last_alpha": self.last_alpha,
                "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "integral" not in state:
            raise ValueError("EntroPIC controller state must hold 'integral'")
        self.integral = _finite("integral", state["integral"])
        self.updates = int(state.get("updates", 0))
        self.last_alpha = float(state.get("last_alpha", 0.0))
        le = state.get("last_entropy")
        self.last_entropy = None if le is None else float(le)
