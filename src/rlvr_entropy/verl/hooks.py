"""The logits hook and configuration checks for methods that need entropy or full logits under verl.

Entropy: verl 0.9.1 computes it in ``prepare_model_outputs`` (with gradient) when the micro-batch carries
``calculate_entropy`` (set from ``actor.calculate_entropy``); ``entropy_ppo_loss`` passes it to the method.

Logits: verl hands logits to user code only through ``logits_processor_func`` on the FSDP engine's distillation
top-k branch, with per-token outputs. ``install_logits_hook()`` instead

* wraps ``verl.workers.engine.fsdp.transformer_impl._scale_logits_by_temperature`` (the one place the FSDP engine
  turns the LM head output into temperature-scaled logits, [nnz, V] with remove-padding) so that it records a
  reference to its result (no copy) while a capture is active, and
* wraps ``FSDPEngineWithLMHead.forward_step`` so that a capture is active exactly during training forward steps
  whose loss function is ``entropy_ppo_loss`` configured with a method that needs logits.

``entropy_ppo_loss`` then slices the response positions out ([B, T_resp, V]: one extra copy of the response
logits, the only [N, V]-sized buffer this adds; the methods chunk their own work). Requirements, checked with clear
errors: ``use_fused_kernels=False`` (fused kernels never build logits), ``use_remove_padding=True`` and Ulysses
sequence parallel size 1 (the captured tensor must hold whole sequences). Megatron / veomni / automodel engines are
not hooked.
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from rlvr_entropy.core.batch import TokenBatch
from rlvr_entropy.methods.base import get_method_class

_CAPTURE = threading.local()


def needs_logits(name: str, method_config: dict[str, Any] | None = None) -> bool:
    return "logits" in get_method_class(name)(**(method_config or {})).needs


def needs_entropy(name: str) -> bool:
    """True when the method with default config cannot run on log-probs alone (probed on a 1x2 batch)."""
    if needs_logits(name):
        return False
    m = get_method_class(name)()
    if "rewards" in m.needs:
        return False
    lp = torch.tensor([[-1.0, -2.0]])
    b = TokenBatch(log_prob=lp, old_log_prob=lp, advantages=torch.tensor([1.0]), mask=torch.ones(1, 2, dtype=bool))
    try:
        m.compute_loss(b)
    except ValueError as e:
        return "entropy" in str(e)
    return False


# ----------------------------------------------------------------------------------------- capture
@contextmanager
def capture_logits() -> Iterator[None]:
    """While active, the hooked ``_scale_logits_by_temperature`` records its output for ``entropy_ppo_loss``."""
    prev = getattr(_CAPTURE, "active", False)
    _CAPTURE.active, _CAPTURE.logits = True, None
    try:
        yield
    finally:
        _CAPTURE.active, _CAPTURE.logits = prev, None


def capturing() -> bool:
    return bool(getattr(_CAPTURE, "active", False))


def take_captured_logits() -> torch.Tensor | None:
    x = getattr(_CAPTURE, "logits", None)
    _CAPTURE.logits = None
    return x


def _record(result: torch.Tensor) -> torch.Tensor:
    if capturing():
        _CAPTURE.logits = result
    return result


def wants_logits(loss_function: Any, forward_only: bool) -> bool:
    """True for a training step whose loss is ``entropy_ppo_loss`` bound to a logits-needing method."""
    if forward_only or loss_function is None:
        return False
    from rlvr_entropy.verl.config import method_from_loss_mode
    from rlvr_entropy.verl.loss import entropy_ppo_loss

    fn = loss_function
    if not (isinstance(fn, functools.partial) and fn.func is entropy_ppo_loss):
        return False
    config = fn.keywords.get("config")
    name = method_from_loss_mode(config.policy_loss.get("loss_mode", "")) if config is not None else None
    if name is None:
        return False
    from rlvr_entropy.verl.loss import method_for

    return "logits" in method_for(name, config).needs  # instance-level needs (entropy_bonus with clamping)


def install_logits_hook() -> bool:
    """Patch verl's FSDP engine (idempotent); False when it cannot be imported here."""
    try:
        from verl.workers.engine.fsdp import transformer_impl as ti
    except Exception:  # pragma: no cover
        return False
    if not getattr(ti._scale_logits_by_temperature, "_rlvr_entropy", False):
        orig = ti._scale_logits_by_temperature

        @functools.wraps(orig)
        def _scale_logits_by_temperature(logits, temperature, *, is_unit_temperature: bool):
            return _record(orig(logits, temperature, is_unit_temperature=is_unit_temperature))

        _scale_logits_by_temperature._rlvr_entropy = True  # type: ignore[attr-defined]
        ti._scale_logits_by_temperature = _scale_logits_by_temperature
    cls = ti.FSDPEngineWithLMHead
    if not getattr(cls.forward_step, "_rlvr_entropy", False):
        orig_step = cls.forward_step

        @functools.wraps(orig_step)
        def forward_step(self, micro_batch, loss_function, forward_only):
            if not wants_logits(loss_function, forward_only):
                return orig_step(self, micro_batch, loss_function, forward_only)
            with capture_logits():
                return orig_step(self, micro_batch, loss_function, forward_only)

        forward_step._rlvr_entropy = True  # type: ignore[attr-defined]
        cls.forward_step = forward_step
    return True


def response_logits(captured: torch.Tensor | None, data: Any, name: str) -> torch.Tensor:
    """Response logits [B, T_resp, V] from the captured remove-padding logits [nnz(+pad), V]."""
    if captured is None:
        raise ValueError(f"rlvr-entropy method {name!r} needs full logits but none were captured: set "
                         "actor_rollout_ref.model.use_fused_kernels=False (fused kernels never build logits), use "
                         "the FSDP engine, and install the hook (RLVR_ENTROPY_VERL_LOSS=1 or "
                         "rlvr_entropy.verl.loss.install_loss())")
    if captured.dim() == 3 and captured.shape[0] == 1:
        captured = captured[0]
    if captured.dim() != 2:
        raise ValueError(f"rlvr-entropy method {name!r}: captured logits of shape {list(captured.shape)}; only "
                         "actor_rollout_ref.model.use_remove_padding=True is supported")
    from verl.workers.utils.padding import no_padding_2_padding

    prompts, responses = data["prompts"], data["responses"]
    if prompts.is_nested:
        total = int(prompts.offsets().diff().sum() + responses.offsets().diff().sum())
    else:
        total = int(data["attention_mask"].sum())
    if captured.shape[0] < total:
        raise ValueError(f"rlvr-entropy method {name!r}: captured logits hold {captured.shape[0]} positions for "
                         f"{total} tokens (Ulysses sequence parallel?); set ulysses_sequence_parallel_size=1")
    return no_padding_2_padding(captured[:total], data)


def check_verl_config(name: str, actor_config: Any, model_config: Any = None) -> None:
    """Raise ValueError when verl, configured this way, cannot deliver what method ``name`` needs."""
    mc = model_config or {}
    pl = actor_config.get("policy_loss", None) or {}
    if needs_logits(name, dict(pl.get("method_config", {}) or {}) if pl.get("method", "") == name else None):
        if mc.get("use_fused_kernels", False) or actor_config.get("use_fused_kernels", False):
            raise ValueError(f"rlvr-entropy method {name!r} needs full logits, which verl never builds with "
                             "use_fused_kernels=True; set actor_rollout_ref.model.use_fused_kernels=False")
        if not mc.get("use_remove_padding", True):
            raise ValueError(f"rlvr-entropy method {name!r} needs actor_rollout_ref.model.use_remove_padding=True")
        if actor_config.get("ulysses_sequence_parallel_size", 1) not in (1, None):
            raise ValueError(f"rlvr-entropy method {name!r} needs ulysses_sequence_parallel_size=1")
    elif needs_entropy(name) and not actor_config.get("calculate_entropy", False):
        raise ValueError(f"rlvr-entropy method {name!r} needs the entropy: set "
                         "actor_rollout_ref.actor.calculate_entropy=True")


__all__ = ["needs_logits", "needs_entropy", "check_verl_config", "install_logits_hook", "capture_logits",
           "take_captured_logits", "response_logits", "wants_logits"]
