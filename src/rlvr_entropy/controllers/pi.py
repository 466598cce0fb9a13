"""A discrete PI controller on the relative entropy error, with a target that is measured once (like SIREN's
anchor) and an optional linear schedule."""
from __future__ import annotations

import math
from typing import Any


class EntropyPI:
    """u = clip(kp * e + ki * I, -u_max, u_max), e = (H* - H) / H*, I <- clip(I + e, -i_max, i_max); with
    ``floor=True`` both lower bounds are 0 (one-sided: only raises entropy toward the target).

    ``update(h)`` is called once per optimizer step with the measured entropy. The target H* is the first measured
    value unless given, times ``target_scale``; with ``target_end`` (absolute) or ``target_end_scale`` (x the start
    value) and ``schedule_steps`` it moves linearly from there to that end point over that many steps, then stays.
    """

    def __init__(self, kp: float, ki: float, u_max: float = 1.0, i_max: float = 10.0, target: float | None = None,
                 target_end: float | None = None, schedule_steps: int | None = None, target_scale: float = 1.0,
                 target_end_scale: float | None = None, floor: bool = False) -> None:
        self.kp, self.ki, self.u_max, self.i_max = float(kp), float(ki), float(u_max), float(i_max)
        #: one-sided control: the target is a floor; u and the integral never go below 0 (entropy above the
        #: target is left alone instead of pushed down)
        self.floor = bool(floor)
        self.target_start: float | None = None if target is None else float(target)
        self.target_end = target_end
        self.schedule_steps = schedule_steps
        self.target_scale = float(target_scale)
        self.target_end_scale = target_end_scale
        self.integral = 0.0
        self.steps = 0
        self.u = 0.0
        self.last_error = 0.0
        self.last_entropy: float | None = None

    @property
    def target(self) -> float | None:
        """The target now: ``target_scale`` x the start value, moving linearly to ``target_end`` (absolute) or
        ``target_end_scale`` x the start value over ``schedule_steps`` steps when a schedule is set."""
        if self.target_start is None:
            return None
        start = self.target_scale * self.target_start
        if not self.schedule_steps:
            return start
        if self.target_end_scale is not None:
            end = float(self.target_end_scale) * self.target_start
        elif self.target_end is not None:
            end = float(self.target_end)
        else:
            return start
        return start + min(self.steps / self.schedule_steps, 1.0) * (end - start)

    def update(self, entropy: float) -> float:
        h = float(entropy)
        if not math.isfinite(h):
            raise ValueError(f"measured entropy must be finite, got {entropy!r}")
        if self.target_start is None:
            self.target_start = h
        tgt = self.target
        e = (tgt - h) / max(abs(tgt), 1e-8)
        lo_i, lo_u = (0.0, 0.0) if self.floor else (-self.i_max, -self.u_max)
        self.integral = min(max(self.integral + e, lo_i), self.i_max)
        self.u = min(max(self.kp * e + self.ki * self.integral, lo_u), self.u_max)
        self.last_error, self.last_entropy = e, h
        self.steps += 1
        return self.u

    def state_dict(self) -> dict[str, Any]:
        return {"target_start": self.target_start, "integral": self.integral, "steps": self.steps, "u": self.u,
                "last_error": self.last_error, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target_start = None if state["target_start"] is None else float(state["target_start"])
        self.integral = float(state["integral"])
        self.steps = int(state["steps"])
        self.u = float(state.get("u", 0.0))
        self.last_error = float(state.get("last_error", 0.0))
        self.last_entropy = state.get("last_entropy")
