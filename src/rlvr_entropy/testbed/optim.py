"""AdamW for the testbed: ``torch.optim.AdamW``'s arithmetic (decoupled weight decay, bias-corrected moments, the
same operation order, so the same numbers: tested bit for bit), with its ``state_dict`` layout (checkpoints of either
load into the other), in a handful of ``torch._foreach_*`` calls per step.

Why not ``torch.optim.AdamW``: constructing any ``torch.optim`` optimizer imports ``torch._dynamo`` (2-5 s of every
run's start on a 2-core machine, measured), and on CPU it updates the 51 parameter tensors one by one.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch


class AdamW:
    """``AdamW(params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)``: ``zero_grad``, ``step``,
    ``state_dict``, ``load_state_dict`` as in ``torch.optim``; ``param_groups[0]["lr"]`` may be changed."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("AdamW got an empty parameter list")
        self.param_groups = [{"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                              "params": self.params}]
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        g = self.param_groups[0]
        lr, (beta1, beta2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not idx:
            return
        params = [self.params[i] for i in idx]
        grads = [self.params[i].grad for i in idx]
        m = [self.exp_avg[i] for i in idx]
        v = [self.exp_avg_sq[i] for i in idx]
        self.steps += 1
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** self.steps
        bias_correction2 = 1 - beta2 ** self.steps
        step_size = lr / bias_correction1
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias_correction2 ** 0.5)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, value=-step_size)

    # torch.optim's layout: {"state": {i: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [{..., "params": [i]}]}
    def state_dict(self) -> dict[str, Any]:
        g = self.param_groups[0]
        state = ({i: {"step": torch.tensor(float(self.steps)), "exp_avg": self.exp_avg[i].clone(),
                      "exp_avg_sq": self.exp_avg_sq[i].clone()} for i in range(len(self.params))}
                 if self.steps else {})
        return {"state": state, "param_groups": [{"lr": g["lr"], "betas": g["betas"], "eps": g["eps"],
                                                  "weight_decay": g["weight_decay"], "amsgrad": False,
                                                  "maximize": False, "decoupled_weight_decay": True,
                                                  "params": list(range(len(self.params)))}]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        groups = sd["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"optimizer state for {sum(len(x['params']) for x in groups)} parameters in "
                             f"{len(groups)} group(s), this model has {len(self.params)} in 1")
        if groups[0].get("amsgrad"):
            raise ValueError("optimizer state uses amsgrad, which this AdamW does not implement")
        for key in ("lr", "betas", "eps", "weight_decay"):
            self.param_groups[0][key] = tuple(groups[0][key]) if key == "betas" else groups[0][key]
        state = sd["state"]
        steps = {float(s["step"]) for s in state.values()}
        if len(steps) > 1:
            raise ValueError(f"optimizer state has parameters at different step counts {sorted(steps)}")
        self.steps = int(steps.pop()) if steps else 0
        for pos, i in enumerate(groups[0]["params"]):
            s = state.get(i)
            if s is None:
                self.exp_avg[pos].zero_()
                self.exp_avg_sq[pos].zero_()
            else:
                self.exp_avg[pos].copy_(s["exp_avg"])
                self.exp_avg_sq[pos].copy_(s["exp_avg_sq"])
        if self.steps and not math.isfinite(self.steps):
            raise ValueError("optimizer state has a non-finite step count")
