"""The state of a step-scheduled entropy band (Entrocraft, arXiv 2604.26326): the step counter and the batch
entropy the current step decides with."""
from __future__ import annotations

import math
from typing import Any


class BandState:
    """``steps``: rollout steps counted so far (the schedule's s for the step in progress once it has begun);
    ``entropy``: the measured batch entropy the next decision uses (None before any measurement)."""

    def __init__(self) -> None:
        self.steps = 0
        self.entropy: float | None = None

    def begin(self, entropy: float | None) -> None:
        """Count one step and, when measured, record its entropy."""
        if entropy is not None:
            h = float(entropy)
            if not math.isfinite(h):
                raise ValueError(f"measured entropy must be finite, got {entropy!r}")
            self.entropy = h
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "entropy": self.entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "steps" not in state:
            raise ValueError("band state must hold 'steps'")
        self.steps = int(state["steps"])
        self.entropy = None if state.get("entropy") is None else float(state["entropy"])
