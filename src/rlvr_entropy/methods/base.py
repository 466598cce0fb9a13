"""Method base class, the shared policy-gradient config, and the registry.

A method is a small change to one or more of three axes: the per-token surrogate (or a weight / mask on it), the
aggregation, and additive regularizers. Each lives in its own module with a frozen config dataclass (paper
defaults, citations), pure functions for the math, and ``@register_method``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlvr_entropy.core.aggregation import AGG_MODES, agg_loss, masked_mean
from rlvr_entropy.core.batch import LossOutput, TokenBatch
from rlvr_entropy.core.dist import Collective, FnCollective, GatherFn, LocalCollective
from rlvr_entropy.core.surrogate import PGTerms, ppo_token_loss
from rlvr_entropy.core.validation import check_choice, check_float, check_int


@dataclass(frozen=True)
class PGConfig:
    """Policy-gradient part shared by every method (PPO clipped surrogate + aggregation)."""

    eps_low: float = 0.2
    """Lower clip range epsilon_low (PPO, arXiv 1707.06347): ratio floor 1 - eps_low for A < 0."""
    eps_high: float = 0.2
    """Upper clip range epsilon_high; DAPO's clip-higher uses 0.28 (arXiv 2503.14476)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for A < 0 (arXiv 1912.09729); verl uses 3, DAPO/STEER 10; None disables."""
    loss_agg_mode: str = "token-mean"
    """One of token-mean, token-sum, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm."""
    norm_length: int | None = None
    """Divisor of seq-mean-token-sum-norm (the maximum response length); None uses the padded T, like verl."""
    clamp_log_ratio: float = 20.0
    """The log-ratio is clamped to [-c, c] before exp (verl's vanilla loss uses 20)."""

    def __post_init__(self) -> None:
        check_float("eps_low", self.eps_low, lo=0.0, hi=1.0, hi_open=True)
        check_float("eps_high", self.eps_high, lo=0.0)
        if self.dual_clip is not None:
            check_float("dual_clip", self.dual_clip, lo=1.0, lo_open=True)
        check_choice("loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        check_int("norm_length", self.norm_length, lo=1, allow_none=True)
        check_float("clamp_log_ratio", self.clamp_log_ratio, lo=0.0, lo_open=True)

    def pg_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(PGConfig)}


class Method:
    """Base class. Subclasses set ``name``, ``Config`` and implement ``_loss``.

    The step protocol (every engine follows it; see docs/engines/):

    * ``compute_loss(batch, step=..., observe=True)`` on each micro-batch: the loss uses the controller state as it
      stands; what controllers measure (``observes``) is added to this step's running sums.
    * ``end_step()`` once per optimizer step, on every rank, after the optimizer step: the sums are reduced over
      every process through ``dist`` (one collective of a fixed-size tensor) and the controllers update from the
      whole global batch of the step. Every rank therefore holds the same state, whatever the data each saw and
      however the step was split into micro-batches.
    * Evaluation passes ``observe=False``: it never changes controller state.
    * Optionally, ``begin_step(rollout_batch)`` once per step before its micro-batches, on every rank, with this
      rank's whole rollout (no logits needed): for methods that decide the step from its own rollout (entrocraft).
      A method that has such a hook works without it too (it then decides from the previous step's observations).

    A caller that passes no ``step`` gets one step per call (``end_step`` runs right after the loss); a call with a
    new ``step`` value closes the previous step first if its engine did not.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[PGConfig]] = PGConfig
    #: TokenBatch fields the method cannot work without (beyond log_prob/old_log_prob/advantages/mask).
    needs: ClassVar[tuple[str, ...]] = ()
    #: False for methods whose loss uses stop-gradient functions of the differentiated inputs (e.g. STEER's weights
    #: computed from log_prob under no_grad): finite differences then see a different function than autograd, by
    #: design. Their own tests check the gradient against the reweighted surrogate instead.
    smooth_in_inputs: ClassVar[bool] = True
    #: Batch fields the method reads only under stop-gradient (e.g. entropy used for a mask or an advantage bonus).
    detached_inputs: ClassVar[tuple[str, ...]] = ()
    #: True when a row whose advantage is 0 at every valid position changes neither the loss's value nor its
    #: gradient, nor any controller state, through its log_prob, logits or entropy (it only counts in the
    #: aggregation's denominators, through its mask). A caller may then skip such rows' forward and pass their
    #: ``old_log_prob`` as ``log_prob``, and no logits or entropy for the batch: the testbed does. The claim is
    #: checked for every method that makes it (tests/methods/test_harness.py); a method that needs logits or
    #: entropy cannot make it.
    zero_advantage_rows_inert: ClassVar[bool] = False
    #: Names of the sums the controllers measure over a step (reduced with a sum over every process).
    observes: ClassVar[tuple[str, ...]] = ()
    #: "step": the sums are reduced and the controllers update at every ``end_step``; "rollout": only at an
    #: ``end_step(rollout_end=True)``, so one measurement spans every optimizer step of a rollout (SIREN's anchor).
    observes_per: ClassVar[str] = "step"

    def __init__(self, config: PGConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = make_config(type(self), **overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(config, self.Config):
            raise ValueError(f"config for {self.name!r} must be a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        #: The processes this method's statistics span (set by the engine; one process by default).
        self.dist: Collective = LocalCollective()
        self._step: int | None = None
        self._calls = 0
        self._observing = False
        self._open = False  # a step has observations not yet reduced
        self._sums = torch.zeros(len(self.observes), dtype=torch.float64)

    # ------------------------------------------------------------------------------- distributed hook
    @property
    def gather_fn(self) -> GatherFn | None:
        """All-gather of ``dist`` (None on one process): what "global" scopes and quantiles use."""
        return self.dist.all_gather if self.dist.is_distributed else None

    @gather_fn.setter
    def gather_fn(self, fn: GatherFn | None) -> None:
        self.dist = LocalCollective() if fn is None else FnCollective(fn)

    def set_collective(self, dist: Collective | None) -> "Method":
        """Set the processes this method's statistics span (None: this process only); returns self."""
        if dist is not None and not isinstance(dist, Collective):
            raise ValueError(f"dist must be a rlvr_entropy.core.dist.Collective or None, got {type(dist).__name__}")
        self.dist = LocalCollective() if dist is None else dist
        return self

    # --------------------------------------------------------------------------------------- public API
    def compute_loss(self, batch: TokenBatch, *, step: int | None = None, observe: bool = True) -> LossOutput:
        """Loss of one (micro-)batch with the controller state as it stands. ``observe=False`` (evaluation) leaves
        every controller untouched. ``step`` is the optimizer step, for callers that do not call
        :meth:`end_step` themselves: a new value closes the previous step; None makes every call a step."""
        if not isinstance(batch, TokenBatch):
            raise ValueError(f"batch must be a TokenBatch, got {type(batch).__name__}")
        if not isinstance(observe, bool):
            raise ValueError(f"observe must be a bool, got {observe!r}")
        for f in self.needs:
            batch.require(f, self.name)
        new_step = step is None or step != self._step
        if observe and new_step and self._open:
            self.end_step()
        if observe:
            self._step = step
        self._calls += 1
        self._observing = observe
        try:
            loss, metrics = self._loss(batch, new_step=new_step)
        finally:
            self._observing = False
        if observe:
            self._open = True
        if loss.dim() != 0:
            raise RuntimeError(f"{self.name}: loss must be 0-dim")
        if not bool(torch.isfinite(loss.detach())):
            raise ValueError(f"{self.name}: the loss is not finite ({float(loss)}); check the batch and config")
        if observe and step is None:
            self.end_step()
        return LossOutput(loss=loss, metrics={f"{self.name}/{k}": v for k, v in metrics.items()})

    def observe(self, **sums: torch.Tensor | float) -> None:
        """Add to this step's running sums (names from ``observes``); a no-op outside a training call."""
        if not self._observing:
            return
        for k, v in sums.items():
            if k not in self.observes:
                raise ValueError(f"{self.name}: {k!r} is not one of the declared observations {self.observes}")
            i = self.observes.index(k)
            self._sums[i] += float(v.detach().to(torch.float64).sum()) if isinstance(v, torch.Tensor) else float(v)

    def begin_step(self, batch: TokenBatch) -> Any:
        """Start a step with this rank's whole rollout batch (see the class docstring); a no-op by default. Methods
        that override it make it a collective through ``dist``: every rank calls it once per step."""
        return None

    def end_step(self, *, rollout_end: bool = True) -> dict[str, float]:
        """Close the optimizer step: reduce this step's sums over every process (one collective when the method
        observes anything; every rank must call it) and update the controllers. Returns the reduced sums.

        ``rollout_end``: whether this optimizer step completes one pass over the rollout batch it trains on. An
        engine whose rollout spans several optimizer steps (TRL's ``steps_per_generation`` > gradient accumulation,
        verl's mini-batches) passes False for the others, the same on every rank; a method that measures per
        rollout (``observes_per = "rollout"``) then keeps adding to its sums until the pass is complete."""
        if not isinstance(rollout_end, bool):
            raise ValueError(f"rollout_end must be a bool, got {rollout_end!r}")
        sums: dict[str, float] = {}
        if self.observes and (rollout_end or self.observes_per == "step"):
            total = self.dist.all_reduce_sum(self._sums)
            sums = {k: float(v) for k, v in zip(self.observes, total.tolist())}
            self._sums = torch.zeros(len(self.observes), dtype=torch.float64)
            self._update(sums)
        self._open = False
        return sums

    def state_dict(self) -> dict[str, Any]:
        return {k: c.state_dict() for k, c in self.controllers().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ctrls = self.controllers()
        unknown = set(state) - set(ctrls)
        if unknown:
            raise ValueError(f"state for {self.name!r} has unknown controller(s) {sorted(unknown)}")
        for k, c in ctrls.items():
            if k in state:
                c.load_state_dict(state[k])
        self._sums = torch.zeros(len(self.observes), dtype=torch.float64)
        self._open = False

    def controllers(self) -> dict[str, Any]:
        """Stateful pieces (anchors, adaptive coefficients), saved with checkpoints."""
        return {}

    @classmethod
    def neutral_overrides(cls) -> dict[str, Any] | None:
        """Config overrides under which the method equals ``grpo`` with the same PG settings (None: no such
        setting exists)."""
        return None

    # ------------------------------------------------------------------------------------- for subclasses
    def _loss(self, batch: TokenBatch, *, new_step: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def _update(self, sums: dict[str, float]) -> None:
        """Update the controllers from one step's sums over every process (the names in ``observes``)."""

    def pg_terms(self, batch: TokenBatch, advantages: torch.Tensor | None = None) -> PGTerms:
        c = self.config
        adv = batch.token_advantages() if advantages is None else advantages
        return ppo_token_loss(batch.clean(batch.log_prob), batch.clean(batch.old_log_prob), adv,
                              eps_low=c.eps_low, eps_high=c.eps_high, dual_clip=c.dual_clip,
                              clamp_log_ratio=c.clamp_log_ratio)

    def aggregate(self, loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return agg_loss(loss_mat, mask, self.config.loss_agg_mode, self.config.norm_length)

    @staticmethod
    @torch.no_grad()
    def pg_metrics(terms: PGTerms, batch: TokenBatch) -> dict[str, torch.Tensor]:
        m = batch.mask
        return {
            "clip_frac": masked_mean(terms.clipped.float(), m),
            "dual_clip_frac": masked_mean(terms.dual_clipped.float(), m),
            "approx_kl": masked_mean(-terms.log_ratio.detach(), m),
            "ratio_mean": masked_mean(terms.ratio.detach(), m),
        }


# ------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under ``cls.name``. Registering a taken name raises."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    import rlvr_entropy.methods  # noqa: F401  (imports every method module)


def available_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def decides_from_rollout(method: Method | type[Method]) -> bool:
    """True when ``method`` (an instance or a class) overrides ``Method.begin_step``: it decides each step from that
    step's own rollout (entrocraft), so an engine must call ``begin_step`` before the step's micro-batches."""
    cls = method if isinstance(method, type) else type(method)
    return cls.begin_step is not Method.begin_step


def check_one_generation(method: Method | type[Method], name: str, engine: str, key: str = "method") -> None:
    """Raise for a method that adds a second generation per step (``rollout_plan`` / ``assemble``: aepo) in an
    ``engine`` that does not run it (the verl plugin): there the method would silently be GRPO."""
    if callable(getattr(method, "rollout_plan", None)):
        raise ValueError(f"{key} {name!r} generates a second set of samples each step at another temperature "
                         f"(rollout_plan / assemble); {engine} does not run that generation, and without it the "
                         f"method would silently be GRPO. It runs on the testbed (rlvr-entropy run --method {name}) "
                         "and in the TRL engine (rlvr_entropy.trl.EntropyGRPOTrainer)")


def make_config(cls: type[Method], **config: Any) -> PGConfig:
    names = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for method {cls.name!r}; valid keys: {sorted(names)}")
    return cls.Config(**config)


def make_method(name: str, **config: Any) -> Method:
    """Build a registered method with its paper defaults, overridden by ``config``."""
    cls = get_method_class(name)
    return cls(make_config(cls, **config))


def engine_length_overrides(name: str, overrides: dict[str, Any], max_completion_length: int
                            ) -> tuple[dict[str, Any], str | None]:
    """What an engine that owns the completion length passes to :func:`make_method`: a method whose aggregation is
    "seq-mean-token-sum-norm" (SIREN's paper default, over 3072 tokens) divides by the engine's
    ``max_completion_length`` unless ``overrides`` sets ``norm_length``; a paper length far above the engine's would
    shrink the policy gradient against the method's other terms (48-token completions over 3072: about 66x).
    Returns (overrides, the line to log, or None when nothing was changed)."""
    check_int("max_completion_length", max_completion_length, lo=1)
    cfg = make_config(get_method_class(name), **overrides)
    if cfg.loss_agg_mode != "seq-mean-token-sum-norm" or "norm_length" in overrides \
            or cfg.norm_length == max_completion_length:
        return dict(overrides), None
    note = (f"rlvr-entropy: {name} aggregates with seq-mean-token-sum-norm over the engine's max completion length "
            f"{max_completion_length} (paper default {cfg.norm_length}; set norm_length to choose)")
    return {**overrides, "norm_length": max_completion_length}, note
