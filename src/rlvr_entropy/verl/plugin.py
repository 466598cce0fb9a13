"""verl plugin: ``import verl`` loads this module (entry point group ``verl.plugins``) and registers every
rlvr-entropy method in ``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY`` as ``rle_<name>``.

Importing the module runs ``register_all()`` (verl's loader only imports the entry point, it does not call it).
Environment:
  RLVR_ENTROPY_VERL_LOSS=1   also install the entropy-aware ppo_loss (``rlvr_entropy.verl.loss.install_loss``).
  RLVR_ENTROPY_VERL_CKPT=0   do not patch verl's worker save/load_checkpoint for controller state.
"""
from __future__ import annotations

import logging
import os

from rlvr_entropy.methods.base import available_methods
from rlvr_entropy.verl import PREFIX


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
    # verl's loader logs plugin failures at debug level only: say it louder here
    if os.environ.get("RLVR_ENTROPY_VERL_LOSS", "0") == "1":
        try:
            from rlvr_entropy.verl.loss import install_loss

            install_loss()
        except Exception as e:  # pragma: no cover
            logging.getLogger(__name__).warning("rlvr-entropy: entropy-aware ppo_loss not installed: %r", e)
    if os.environ.get("RLVR_ENTROPY_VERL_CKPT", "1") != "0":
        from rlvr_entropy.verl.state import install_checkpoint_hooks

        install_checkpoint_hooks()
    return names


register_all()
