"""verl plugin: ``import verl`` loads this module (entry point group ``verl.plugins``) and registers every
rlvr-entropy method in ``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY`` as ``rle_<name>``.

Importing the module runs ``register_all()`` (verl's loader only imports the entry point, it does not call it),
which also arranges the FSDP engine hooks (``rlvr_entropy.verl.hooks.install_engine_hooks``, run right after verl's
engine module is imported: step context, one ``end_step`` per optimizer step, controller state in checkpoints);
without them an rlvr-entropy loss raises.
Environment:
  RLVR_ENTROPY_VERL_LOSS=1   also install the entropy-aware ppo_loss (``rlvr_entropy.verl.loss.install_loss``).
  RLVR_ENTROPY_VERL_HOOKS=0  do not install the engine hooks (verl's own losses keep working; rle_ losses raise).
"""
from __future__ import annotations

import logging
import os

from rlvr_entropy.methods.base import available_methods
from rlvr_entropy.verl import PREFIX


def _flag(name: str, default: str) -> bool:
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"environment variable {name} must be '0' or '1', got {value!r}")
    return value == "1"


def register_all() -> list[str]:
    """Register every available method (idempotent); returns the registered verl names."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss

    from rlvr_entropy.verl.loss import make_registered_loss

    names = []
    for name in available_methods():
        key = PREFIX + name
        if key in POLICY_LOSS_REGISTRY and not getattr(POLICY_LOSS_REGISTRY[key], "_rlvr_entropy", False):
            raise ValueError(f"verl already has a policy loss named {key!r}")
        fn = make_registered_loss(name)
        fn._rlvr_entropy = True  # type: ignore[attr-defined]
        register_policy_loss(key)(fn)
        names.append(key)
    loss_env, hooks_env = _flag("RLVR_ENTROPY_VERL_LOSS", "0"), _flag("RLVR_ENTROPY_VERL_HOOKS", "1")
    # verl's loader logs plugin failures at debug level only: say it louder here
    if loss_env:
        try:
            from rlvr_entropy.verl.loss import install_loss

            install_loss()
        except Exception as e:  # pragma: no cover
            logging.getLogger(__name__).warning("rlvr-entropy: entropy-aware ppo_loss not installed: %r", e)
    if os.environ.get("RLVR_ENTROPY_VERL_CKPT") is not None:
        logging.getLogger(__name__).warning("rlvr-entropy: RLVR_ENTROPY_VERL_CKPT is no longer read; the controller "
                                            "state follows verl's checkpoints (RLVR_ENTROPY_VERL_HOOKS=0 disables "
                                            "every engine hook)")
    if hooks_env and not loss_env:
        from rlvr_entropy.verl.hooks import install_engine_hooks_on_import

        install_engine_hooks_on_import()
    return names


register_all()
