"""PolicyLossConfig subclass carrying an rlvr-entropy method and its hyperparameters.

Hydra (verl's trainer CLI)::

    actor_rollout_ref.actor.policy_loss._target_=rlvr_entropy.verl.config.EntropyPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=rle_siren
    +actor_rollout_ref.actor.policy_loss.method_config.top_p=0.95

``method`` defaults to the name in ``loss_mode`` (``rle_<name>``); ``method_config`` holds the method's own config
fields (the PG fields eps_low/eps_high/dual_clip/loss_agg_mode/norm_length are taken from verl's actor config and are
rejected here). Everything is validated in ``__post_init__`` with a ValueError naming the bad key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from verl.workers.config.actor import PolicyLossConfig

from rlvr_entropy.core.validation import check_choice
from rlvr_entropy.methods.base import PGConfig, available_methods, check_one_generation, get_method_class
from rlvr_entropy.verl import PREFIX

#: PG fields owned by verl's actor config (clip_ratio_low/high, clip_ratio_c, loss_agg_mode, loss_scale_factor).
VERL_OWNED = tuple(f.name for f in dataclasses.fields(PGConfig) if f.name != "clamp_log_ratio")
#: Values of policy_loss.missing_state (kept equal to rlvr_entropy.verl.state.MISSING_STATE).
MISSING_STATE = ("raise", "fresh")


def method_from_loss_mode(loss_mode: str) -> str | None:
    return loss_mode[len(PREFIX):] if isinstance(loss_mode, str) and loss_mode.startswith(PREFIX) else None


def _plain(x: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return x


def validate_method_config(method: str, method_config: dict[str, Any]) -> dict[str, Any]:
    """Check ``method`` exists and ``method_config`` builds a valid config; returns a plain dict."""
    names = available_methods()
    if method not in names:
        raise ValueError(f"policy_loss.method: unknown rlvr-entropy method {method!r}; available: {names}")
    cfg = dict(_plain(method_config) or {})
    owned = sorted(set(cfg) & set(VERL_OWNED))
    if owned:
        raise ValueError(f"policy_loss.method_config: {owned} are set through verl's actor config "
                         "(clip_ratio_low, clip_ratio_high, clip_ratio_c, loss_agg_mode, loss_scale_factor), "
                         "not here")
    cls = get_method_class(method)
    check_one_generation(cls, method, "the verl plugin", key="policy_loss.method")
    valid = {f.name for f in dataclasses.fields(cls.Config)} - set(VERL_OWNED)
    unknown = sorted(set(cfg) - valid)
    if unknown:
        raise ValueError(f"policy_loss.method_config: unknown key(s) {unknown} for method {method!r}; "
                         f"valid keys: {sorted(valid)}")
    try:
        cls.Config(**cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"policy_loss.method_config for {method!r}: {e}") from e
    return cfg


@dataclass
class EntropyPolicyLossConfig(PolicyLossConfig):
    """verl PolicyLossConfig plus an rlvr-entropy method.

    Args:
        method: rlvr-entropy method name; empty means "take it from loss_mode (rle_<name>)".
        method_config: the method's own hyperparameters (its Config fields except the PG ones verl owns).
        missing_state: "raise" or "fresh": what resuming from a checkpoint without controller state does.
    """

    method: str = ""
    method_config: dict[str, Any] = field(default_factory=dict)
    #: Resuming from a checkpoint without controller state (rlvr_entropy_state.pt): "raise" (default) or "fresh"
    #: (start the controllers fresh, with a warning). See rlvr_entropy.verl.state.
    missing_state: str = "raise"

    def __post_init__(self) -> None:
        from_mode = method_from_loss_mode(self.loss_mode)
        method = self.method or from_mode
        if not method:
            raise ValueError(f"policy_loss: set loss_mode to '{PREFIX}<method>' or set method; got loss_mode="
                             f"{self.loss_mode!r} and no method")
        if from_mode is not None and self.method and from_mode != self.method:
            raise ValueError(f"policy_loss.method={self.method!r} disagrees with loss_mode={self.loss_mode!r}")
        check_choice("policy_loss.missing_state", self.missing_state, MISSING_STATE)
        cfg = validate_method_config(method, self.method_config)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "method_config", cfg)
        if from_mode is None:
            if self.loss_mode != "vanilla":
                raise ValueError(f"policy_loss.loss_mode={self.loss_mode!r} is not an rlvr-entropy loss; use "
                                 f"'{PREFIX}{method}'")
            object.__setattr__(self, "loss_mode", PREFIX + method)


__all__ = ["EntropyPolicyLossConfig", "validate_method_config", "method_from_loss_mode", "VERL_OWNED"]
