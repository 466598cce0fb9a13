"""Controller state (SIREN's anchor, adaptive coefficients) across verl checkpoints.

What is automatic: nothing in verl 0.9.1 calls a policy loss on save/load, so this module patches
``BaseEngine``-level ``save_checkpoint`` / ``load_checkpoint`` of the actor worker (``TrainingWorker`` in
``verl.workers.engine_workers``) when ``install_checkpoint_hooks()`` runs (the plugin calls it): after verl saves a
checkpoint to ``local_path`` every rank also writes ``local_path/rlvr_entropy_state_rank{r}.pt``; on load it reads
it back (a missing file is a warning, not an error, so old checkpoints still load). The state is per rank but
identical across ranks for controllers fed with globally gathered statistics.

Driver-side alternative: ``save_state(path)`` / ``load_state(path)`` in the worker process.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

_log = logging.getLogger(__name__)
_PENDING: dict[str, Any] = {}
FILE = "rlvr_entropy_state_rank{rank}.pt"


def get_state() -> dict[str, Any]:
    from rlvr_entropy.verl.loss import METHODS, _STEP

    return {"methods": {n: m.state_dict() for n, m in METHODS.items()},
            "step": {k: _STEP[k] for k in ("step", "bnt", "seen")}}


def set_state(state: dict[str, Any]) -> None:
    """Restore; methods not built yet get their state when first built."""
    from rlvr_entropy.verl.loss import METHODS, _STEP

    for name, s in state.get("methods", {}).items():
        if name in METHODS:
            METHODS[name].load_state_dict(s)
        else:
            _PENDING[name] = s
    _STEP.update(state.get("step", {}))


def restore_pending(name: str, method: Any) -> None:
    if name in _PENDING:
        method.load_state_dict(_PENDING.pop(name))


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def state_file(local_path: str) -> str:
    return os.path.join(local_path, FILE.format(rank=_rank()))


def save_state(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(get_state(), path)


def load_state(path: str) -> bool:
    if not os.path.exists(path):
        _log.warning("rlvr-entropy: no controller state at %s; controllers start fresh", path)
        return False
    set_state(torch.load(path, weights_only=False))
    return True


def _wrap(cls: Any) -> None:
    if getattr(cls, "_rlvr_entropy_hooked", False):
        return
    save, load = cls.save_checkpoint, cls.load_checkpoint

    def save_checkpoint(self, local_path, *args, **kwargs):
        out = save(self, local_path, *args, **kwargs)
        if local_path is not None:
            save_state(state_file(local_path))
        return out

    def load_checkpoint(self, local_path, *args, **kwargs):
        out = load(self, local_path, *args, **kwargs)
        if local_path is not None:
            load_state(state_file(local_path))
        return out

    # keep verl's @register dispatch attributes
    functools.update_wrapper(save_checkpoint, save)
    functools.update_wrapper(load_checkpoint, load)
    cls.save_checkpoint, cls.load_checkpoint = save_checkpoint, load_checkpoint
    cls._rlvr_entropy_hooked = True


def install_checkpoint_hooks() -> bool:
    """Patch verl's TrainingWorker save/load_checkpoint; False when engine_workers cannot be imported here."""
    try:
        from verl.workers.engine_workers import TrainingWorker
    except Exception as e:  # pragma: no cover
        _log.debug("rlvr-entropy: checkpoint hooks not installed: %s", e)
        return False
    _wrap(TrainingWorker)
    return True


__all__ = ["get_state", "set_state", "save_state", "load_state", "install_checkpoint_hooks", "state_file"]
