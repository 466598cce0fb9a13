"""A fixed target measured once (SIREN's self-anchor, arXiv 2509.25133 section 4)."""
from __future__ import annotations

import math
from typing import Any


class Anchor:
    """Holds a float that is set once (the first measurement, or an explicit value) and then kept.

    Unlike the official SIREN code, the value is part of ``state_dict()`` so a resumed run keeps its anchor.
    """

    def __init__(self, value: float | None = None) -> None:
        self.value: float | None = None
        if value is not None:
            self.set(value)

    @property
    def is_set(self) -> bool:
        return self.value is not None

    def set(self, value: float) -> None:
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"anchor value must be finite, got {value!r}")
        self.value = v

    def set_if_unset(self, value: float) -> float:
        if self.value is None:
            self.set(value)
        return self.value  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "value" not in state:
            raise ValueError("anchor state must hold 'value'")
        self.value = None if state["value"] is None else float(state["value"])
