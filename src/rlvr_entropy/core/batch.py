"""The record every method consumes, with its shape glossary.

Shape glossary: B responses, T response positions (padded), V vocabulary size.

=============== ============ ==========================================================================
field           shape        meaning
=============== ============ ==========================================================================
log_prob        [B, T]       log pi_theta(o_t | prefix) of the sampled token, with gradient
old_log_prob    [B, T]       log pi_old of the sampled token (behaviour policy), no gradient
advantages      [B] | [B, T] advantage per response or per token
mask            bool [B, T]  True at valid response tokens; everything else is padding
logits          [B, T, V]    optional; next-token logits, temperature already applied, with gradient
lm_head         source       optional; an :class:`rlvr_entropy.kernels.LMHeadSource` (last hidden states
                             [B, T, H], LM-head weight and bias, temperature, sampled token ids): serves what
                             methods ask for through :meth:`TokenBatch.stat` in tiled passes, without [B, T, V]
                             logits (docs/kernels.md); when ``logits`` are given too, they are used
entropy         [B, T]       optional; entropy of pi_theta at each position (with gradient when used as a
                             regularizer); computed from ``logits`` when missing and needed
old_entropy     [B, T]       optional; entropy of pi_old (STEER reads this)
ref_log_prob    [B, T]       optional; log-prob under a reference model
rewards         [B]          optional; scalar reward per response (W-REINFORCE reads this)
group_reward    [B]          optional; mean reward of the response's group (the prompt's GRPO group, all its
                             samples), i.e. the group success rate for 0/1 rewards (the thermostat's
                             reach-gated floor reads this)
group_reward_std [B]         optional; unbiased (n - 1) standard deviation of the rewards of the response's group,
                             0 for a group of one (with group_reward and group_size: the GRPO statistics)
group_size      [B]          optional; number of responses in the response's group (>= 1)
=============== ============ ==========================================================================

Values at padded positions are never read: they may be anything, NaN included, and never receive gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlvr_entropy.core.validation import as_bool_mask, check_finite_where, check_shape, check_tensor

_PER_TOKEN = ("log_prob", "old_log_prob", "entropy", "old_entropy", "ref_log_prob")


@dataclass
class TokenBatch:
    """One (micro-)batch of sampled responses. Validated on construction; see the module docstring for shapes."""

    log_prob: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    old_entropy: torch.Tensor | None = None
    ref_log_prob: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    group_reward: torch.Tensor | None = None
    group_reward_std: torch.Tensor | None = None
    group_size: torch.Tensor | None = None
    lm_head: Any = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_tensor("log_prob", self.log_prob)
        if self.log_prob.dim() != 2:
            raise ValueError(f"log_prob must have shape [B, T], got {list(self.log_prob.shape)}")
        if not self.log_prob.is_floating_point():
            raise ValueError(f"log_prob must be a floating tensor, got {self.log_prob.dtype}")
        B, T = self.log_prob.shape
        self.mask = as_bool_mask("mask", self.mask)
        check_shape("mask", self.mask, (B, T), "same as log_prob")
        for name in _PER_TOKEN:
            x = getattr(self, name)
            if x is None:
                continue
            check_tensor(name, x)
            check_shape(name, x, (B, T), "same as log_prob")
            check_finite_where(name, x, self.mask)
        check_tensor("advantages", self.advantages)
        if self.advantages.dim() == 1:
            check_shape("advantages", self.advantages, (B,), "[B] or [B, T]")
            check_finite_where("advantages", self.advantages, self.mask.any(-1))
        else:
            check_shape("advantages", self.advantages, (B, T), "[B] or [B, T]")
            check_finite_where("advantages", self.advantages, self.mask)
        if self.logits is not None:
            check_tensor("logits", self.logits)
            if self.logits.dim() != 3 or tuple(self.logits.shape[:2]) != (B, T):
                raise ValueError(f"logits must have shape [B, T, V] = [{B}, {T}, V], got {list(self.logits.shape)}")
            check_finite_where("logits", self.logits, self.mask)
        for name in ("rewards", "group_reward", "group_reward_std", "group_size"):
            x = getattr(self, name)
            if x is not None:
                check_tensor(name, x)
                check_shape(name, x, (B,))
                check_finite_where(name, x, None)
        if self.group_reward_std is not None and bool((self.group_reward_std < 0).any()):
            raise ValueError("group_reward_std must be >= 0")
        if self.group_size is not None and bool((self.group_size < 1).any()):
            raise ValueError("group_size must be >= 1")
        if self.lm_head is not None:
            self._check_lm_head()

    # ------------------------------------------------------------------ helpers
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.log_prob.shape)  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def clean(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, T] with padded positions replaced by 0 (no NaN can leak, no gradient reaches padding)."""
        return torch.where(self.mask, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def token_advantages(self) -> torch.Tensor:
        """Advantages broadcast to [B, T], 0 at padding, detached."""
        a = self.advantages.detach()
        if a.dim() == 1:
            a = a[:, None].expand(self.shape)
        return self.clean(a.to(self.log_prob.dtype))

    def require(self, name: str, method: str) -> torch.Tensor:
        """The field ``name`` (ValueError naming ``method`` when missing). The need ``"logits"`` is also met by
        ``lm_head``: then None is returned, and the distribution is read through :meth:`stat`."""
        x = getattr(self, name)
        if x is None and name == "logits" and self.lm_head is not None:
            return None  # type: ignore[return-value]
        if x is None:
            raise ValueError(f"method {method!r} needs TokenBatch.{name}; pass it when building the batch")
        return x

    def current_entropy(self, method: str) -> torch.Tensor:
        """Entropy of pi_theta [B, T] (0 at padding): the given ``entropy``, else computed from ``logits``."""
        if self.entropy is not None:
            return self.clean(self.entropy)
        if self.logits is not None:
            if "entropy" not in self._cache:
                from rlvr_entropy.stats import entropy as _entropy

                self._cache["entropy"] = self.clean(_entropy(self.logits, mask=self.mask))
            return self._cache["entropy"]
        if self.lm_head is not None:
            from rlvr_entropy.stats import Stat

            return self.stat(Stat.entropy(), method)
        raise ValueError(f"method {method!r} needs TokenBatch.entropy or TokenBatch.logits "
                         "(or TokenBatch.lm_head)")

    @property
    def has_distribution(self) -> bool:
        """True when the full next-token distribution can be read: ``logits`` or ``lm_head`` is given."""
        return self.logits is not None or self.lm_head is not None

    def stat(self, stat: Any, method: str) -> Any:
        """A per-position statistic of pi_theta (``stat``: a :class:`rlvr_entropy.stats.Stat`), 0 at padding:
        [B, T], or a pair of [B, T] tensors for ``change_terms`` / ``proxy_log_mass``; with gradient for the
        differentiable kinds. From ``logits`` when given (:func:`rlvr_entropy.stats.compute_stat`: the functions
        methods always used), else from ``lm_head`` (one tiled pass over hidden states serves every statistic
        the engine prefetched; another is computed on demand). Cached on the batch."""
        key = ("stat", stat)
        if key not in self._cache:
            if self.logits is not None:
                from rlvr_entropy.stats import compute_stat

                self._cache[key] = compute_stat(self.logits, stat, mask=self.mask)
            elif self.lm_head is not None:
                out = self.lm_head.get(stat)
                self._cache[key] = tuple(map(self.clean, out)) if isinstance(out, tuple) else self.clean(out)
            else:
                raise ValueError(f"method {method!r} needs TokenBatch.logits or TokenBatch.lm_head "
                                 f"(for the statistic {getattr(stat, 'kind', stat)!r})")
        return self._cache[key]

    def _check_lm_head(self) -> None:
        from rlvr_entropy.kernels.lm_head import LMHeadSource

        src = self.lm_head
        if not isinstance(src, LMHeadSource):
            raise ValueError(f"lm_head must be a rlvr_entropy.kernels.LMHeadSource, got {type(src).__name__}")
        if tuple(src.shape) != tuple(self.shape):
            raise ValueError(f"lm_head must cover [B, T] = {list(self.shape)}, got {list(src.shape)}")
        if bool((self.mask & ~src.mask.to(self.mask.device)).any()):
            raise ValueError("mask has valid positions outside lm_head.mask (the source computes nothing there)")

    def with_(self, **changes: Any) -> "TokenBatch":
        """A copy with some fields replaced (validated again)."""
        fields = {k: getattr(self, k) for k in
                  ("log_prob", "old_log_prob", "advantages", "mask", "logits", "entropy", "old_entropy",
                   "ref_log_prob", "rewards", "group_reward", "group_reward_std", "group_size")}
        fields["lm_head"] = self.lm_head
        fields.update(changes)
        return TokenBatch(**fields)


@dataclass
class LossOutput:
    """What every method returns: a 0-dim loss and metrics named ``"<method>/<metric>"``."""

    loss: torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
