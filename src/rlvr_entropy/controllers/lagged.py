"""A measured value used one step later (AEPO's H_prev, arXiv 2510.08141): measurements accumulate as (sum, count)
until :meth:`LaggedValue.close` turns them into the value the next decision reads."""
from __future__ import annotations

import math
from typing import Any


class LaggedValue:
    """``value`` (starts at ``initial``) and the pending (sum, count) since the last :meth:`close`."""

    def __init__(self, initial: float = 0.0) -> None:
        v = float(initial)
        if not math.isfinite(v):
            raise ValueError(f"initial value must be finite, got {initial!r}")
        self.value = v
        self.pending_sum = 0.0
        self.pending_count = 0.0
        self.closes = 0

    def add(self, total: float, count: float) -> None:
        self.pending_sum += float(total)
        self.pending_count += float(count)

    def close(self) -> float:
        """value := pending_sum / pending_count when something was measured (else unchanged); clears the pending
        sums and returns the value."""
        if self.pending_count > 0:
            v = self.pending_sum / self.pending_count
            if not math.isfinite(v):
                raise ValueError(f"measured value must be finite, got {v!r}")
            self.value = v
        self.pending_sum = self.pending_count = 0.0
        self.closes += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "pending_sum": self.pending_sum, "pending_count": self.pending_count,
                "closes": self.closes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "value" not in state:
            raise ValueError("lagged value state must hold 'value'")
        self.value = float(state["value"])
        self.pending_sum = float(state.get("pending_sum", 0.0))
        self.pending_count = float(state.get("pending_count", 0.0))
        self.closes = int(state.get("closes", 0))
