"""verl integration (optional extra ``rlvr-entropy[verl]``, verl 0.9.x).

Importing this package does not import verl; the submodules do. ``import verl`` loads the entry point
``rlvr_entropy.verl.plugin`` (group ``verl.plugins``), which registers every rlvr-entropy method in verl's
policy-loss registry as ``rle_<name>``. See docs/engines/verl.md.
"""
PREFIX = "rle_"


def loss_mode_name(method: str) -> str:
    """verl ``policy_loss.loss_mode`` for an rlvr-entropy method name."""
    return PREFIX + method


__all__ = ["PREFIX", "loss_mode_name"]
