"""Hugging Face TRL engine: ``EntropyGRPOTrainer``, a ``trl.GRPOTrainer`` that delegates its loss to any
registered rlvr-entropy method.

Tested with trl 1.16.x (the only module besides ``rlvr_entropy.verl`` that imports an engine). See
docs/engines/trl.md for the user's view; in short:

- ``_compute_loss`` is overridden (TRL's public ``compute_loss`` calls it). The trainer's inputs (prompt and
  completion ids and masks, advantages [B] or [B, T], old log-probs when off-policy, multimodal inputs) become a
  :class:`rlvr_entropy.TokenBatch`; the method returns the loss and its metrics.
- GRPOConfig owns the policy-gradient settings (:data:`TRL_OWNED`), as verl's actor config does for the verl
  engine: ``loss_type`` gives the method's aggregation and TRL's normalization, ``epsilon``/``epsilon_high`` the
  clip range, ``delta`` the dual clip. A method_config that sets one of them to another value raises, and so does
  every GRPOConfig option that cannot be mapped exactly (``loss_type`` cispo / sapo / vespo, TRL's own entropy
  bonus and entropy mask, sequence-level importance sampling).
- The step protocol (``Method`` in rlvr_entropy.methods.base): ``method.begin_step(rollout)`` at the start of every
  optimizer step for methods that override it, ``compute_loss(..., observe=(mode == "train"))`` on every
  micro-batch, ``method.end_step()`` once per optimizer step on every rank (``on_step_end``), through a
  :class:`~rlvr_entropy.core.dist.TorchCollective` over accelerate's processes when there is more than one. The
  controller state is therefore one state for the run, identical on every rank; evaluation never changes it.
- Methods that generate a second set of samples each step (``rollout_plan`` / ``assemble``: aepo) get it in
  ``_generate_and_score_completions``, for every training generation batch (``_second_generation``): the plan's
  prompts again at its temperature, split over the processes as TRL splits a generation, scored by the same reward
  functions; the rows ``assemble`` keeps replace the first rows of the generation batch (global order), with every
  per-row field, and old / reference log-probs and vLLM's importance ratio recomputed for them. Options it cannot
  honour raise at construction (``_check_second_generation``).
- Methods that read the reference policy (``"ref_log_prob" in method.needs``: the thermostat's pull) get
  ``TokenBatch.ref_log_prob`` from TRL's own reference, also with ``beta=0``: GRPOTrainer
  is made to build, prepare and run its reference as for a nonzero beta, and the user's beta (0) is kept for the loss,
  so no fixed KL term is added (``EntropyGRPOTrainer._reference_for_method``). With ``beta != 0`` both act: TRL's
  ``beta * KL`` and the method's own term.
- Method metrics are accumulated per process and reduced once per optimizer step (and once per evaluation) as one
  tensor over the union of every rank's keys: no per-key collective, so ranks whose micro-batches emit different
  keys (a fully masked micro-batch) cannot hang.
- Checkpoints hold the controller state once (``rlvr_entropy_state.json``), checked identical on every rank at save,
  restored on resume, on any world size.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from rlvr_entropy import stats
from rlvr_entropy.core.aggregation import agg_loss, masked_sum
from rlvr_entropy.core.batch import TokenBatch
from rlvr_entropy.core.dist import Collective, LocalCollective, TorchCollective
from rlvr_entropy.diagnostics import EntropyChangeProbe
from rlvr_entropy.methods.aepo import aepo_advantages
from rlvr_entropy.methods.base import Method, decides_from_rollout, get_method_class, make_method

_log = logging.getLogger(__name__)

STATE_FILE = "rlvr_entropy_state.json"

#: GRPOConfig.loss_type -> the method's loss_agg_mode. The normalization that follows is TRL's (see
#: ``EntropyGRPOTrainer._normalize``): together they reproduce TRL's loss exactly for method grpo.
LOSS_TYPES: dict[str, str] = {
    "grpo": "seq-mean-token-mean",         # mean over the B rows (empty ones count) of token means, / accumulation
    "bnpo": "token-mean",                  # token mean of the micro-batch, / accumulation
    "dr_grpo": "seq-mean-token-sum-norm",  # token sum / (B * max_completion_length), / accumulation
    "dapo": "token-mean",                  # token sum / tokens of the accumulation window over every process
    "luspo": "seq-mean-token-sum",         # mean over the B rows of token sums, / accumulation
}
#: loss types whose surrogate is not the PPO clipped ratio every method builds on
UNMAPPED_LOSS_TYPES: dict[str, str] = {
    "cispo": "a clipped-IS-weight REINFORCE surrogate",
    "sapo": "a soft sigmoid gate instead of the clipped ratio",
    "vespo": "sequence-level gamma weights instead of the clipped ratio",
}
#: PGConfig fields GRPOConfig decides (PGConfig.clamp_log_ratio stays the method's: TRL does not clamp the ratio)
TRL_OWNED: tuple[str, ...] = ("eps_low", "eps_high", "dual_clip", "loss_agg_mode", "norm_length")
#: the multimodal inputs TRL 1.16 passes to the policy's forward (_get_per_token_logps_and_entropies)
MULTIMODAL_KEYS: tuple[str, ...] = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                    "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                    "mm_token_type_ids", "image_position_ids")


def trl_pg_settings(args: Any) -> dict[str, tuple[Any, str]]:
    """The PG fields GRPOConfig ``args`` decides: ``{field: (value, "where it comes from in GRPOConfig")}``.

    Raises ValueError, naming the option, for what has no exact equivalent."""
    lt = args.loss_type
    if lt in UNMAPPED_LOSS_TYPES:
        raise ValueError(f"GRPOConfig.loss_type={lt!r} ({UNMAPPED_LOSS_TYPES[lt]}) has no rlvr-entropy equivalent; "
                         f"use one of {sorted(LOSS_TYPES)}")
    if lt not in LOSS_TYPES:
        raise ValueError(f"GRPOConfig.loss_type must be one of {sorted(LOSS_TYPES)}, got {lt!r}")
    eps_low = float(args.epsilon)
    high_src = "epsilon_high" if args.epsilon_high is not None else "epsilon (epsilon_high is None)"
    eps_high = float(args.epsilon_high if args.epsilon_high is not None else args.epsilon)
    dual_clip = None
    if args.delta is not None:
        # TRL clamps the ratio at delta before the min; for delta > 1 + epsilon_high that is exactly the dual clip
        # (A < 0: bound -delta A; A > 0: the clip at 1 + epsilon_high binds first). Below it the two differ.
        if not (isinstance(args.delta, (int, float)) and math.isfinite(args.delta) and args.delta > 1.0 + eps_high):
            raise ValueError(f"GRPOConfig.delta={args.delta!r}: only delta > 1 + epsilon_high ({1.0 + eps_high}) maps "
                             "exactly (onto the method's dual_clip); set delta=None or a larger value")
        dual_clip = float(args.delta)
    norm_length = int(args.max_completion_length) if lt == "dr_grpo" else None
    return {
        "eps_low": (eps_low, "epsilon"),
        "eps_high": (eps_high, high_src),
        "dual_clip": (dual_clip, "delta"),
        "loss_agg_mode": (LOSS_TYPES[lt], f"loss_type={lt!r}"),
        "norm_length": (norm_length, f"loss_type={lt!r} / max_completion_length"),
    }


def grpo_config_kwargs(method: str | Method, method_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The GRPOConfig keyword arguments that give ``method`` (a name + config overrides, or an instance) its own PG
    settings under EntropyGRPOTrainer (the inverse of :func:`trl_pg_settings`): ``loss_type``, ``epsilon``,
    ``epsilon_high``, ``delta`` and, for "seq-mean-token-sum-norm", ``max_completion_length`` (= norm_length).
    Raises ValueError for what GRPOConfig cannot express (token-sum, a norm_length of None, a dual clip
    <= 1 + eps_high)."""
    c = (method if isinstance(method, Method) else make_method(method, **(method_config or {}))).config
    inverse = {"seq-mean-token-mean": "grpo", "token-mean": "dapo", "seq-mean-token-sum-norm": "dr_grpo",
               "seq-mean-token-sum": "luspo"}
    if c.loss_agg_mode not in inverse:
        raise ValueError(f"loss_agg_mode={c.loss_agg_mode!r} has no GRPOConfig.loss_type; use one of "
                         f"{sorted(inverse)}")
    out: dict[str, Any] = {"loss_type": inverse[c.loss_agg_mode], "epsilon": c.eps_low, "epsilon_high": c.eps_high,
                           "delta": c.dual_clip}
    if c.dual_clip is not None and not c.dual_clip > 1.0 + c.eps_high:
        raise ValueError(f"dual_clip={c.dual_clip} <= 1 + eps_high: GRPOConfig.delta cannot express it")
    if c.loss_agg_mode == "seq-mean-token-sum-norm":
        if c.norm_length is None:
            raise ValueError("loss_agg_mode='seq-mean-token-sum-norm' with norm_length=None (the padded length) has "
                             "no GRPOConfig equivalent: set norm_length (GRPOConfig.max_completion_length)")
        out["max_completion_length"] = c.norm_length
    return out


def resolve_method(method: str | Method, method_config: dict[str, Any] | None = None, args: Any = None) -> Method:
    """A Method from a registered name (+ config overrides) or an instance (then method_config must be None).

    With ``args`` (a GRPOConfig), the PG fields it owns (:data:`TRL_OWNED`) are taken from it; a method_config (or an
    instance's config) that sets one of them to a different value raises, naming both."""
    if isinstance(method, Method):
        if method_config:
            raise ValueError("method_config must be None when method is a Method instance")
        if args is not None:
            owned = trl_pg_settings(args)
            diff = {k: (getattr(method.config, k), v, src) for k, (v, src) in owned.items()
                    if getattr(method.config, k) != v}
            if diff:
                lines = "; ".join(f"method.config.{k}={ours!r} vs GRPOConfig.{src} -> {v!r}"
                                  for k, (ours, v, src) in diff.items())
                raise ValueError(f"the {method.name!r} instance's PG settings differ from GRPOConfig's ({lines}); "
                                 "GRPOConfig owns them: build the method with these values, or pass it by name")
        return method
    if not isinstance(method, str):
        raise ValueError(f"method must be a registered name or a Method, got {type(method).__name__}")
    get_method_class(method)  # clear error for unknown names
    cfg = dict(method_config or {})
    if args is not None:
        owned = trl_pg_settings(args)
        for k, (v, src) in owned.items():
            if k in cfg and cfg[k] != v:
                raise ValueError(f"method_config[{k!r}]={cfg[k]!r} conflicts with GRPOConfig.{src} -> {v!r}: "
                                 f"GRPOConfig owns the policy-gradient settings {list(TRL_OWNED)}; drop {k!r} from "
                                 "method_config or set GRPOConfig to the value you want")
            cfg[k] = v
        try:
            return make_method(method, **cfg)
        except ValueError as e:
            raise ValueError(f"method {method!r} with GRPOConfig's PG settings "
                             f"({ {k: v for k, (v, _) in owned.items()} }): {e}") from e
    return make_method(method, **cfg)


def aggregation_note(method: Method, args: Any) -> str | None:
    """One line saying how GRPOConfig sets ``method``'s aggregation when it is not the method's paper default
    (e.g. SIREN's seq-mean-token-sum-norm over 3072 tokens: with ``loss_type="dr_grpo"`` the length is the engine's
    ``max_completion_length``; with another loss type the aggregation is that loss type's). None when they agree."""
    defaults = {f.name: f.default for f in dataclasses.fields(type(method).Config)}
    paper = (defaults["loss_agg_mode"], defaults["norm_length"])
    used = (method.config.loss_agg_mode, method.config.norm_length)
    if paper == used:
        return None

    def say(mode, n):
        return f"{mode} over {n} tokens" if mode == "seq-mean-token-sum-norm" and n is not None else mode

    where = (f"loss_type={args.loss_type!r}, max_completion_length={args.max_completion_length}"
             if used[0] == "seq-mean-token-sum-norm" else f"loss_type={args.loss_type!r}")
    return (f"rlvr-entropy: {method.name} aggregates with {say(*used)} (GRPOConfig {where}); its paper default is "
            f"{say(*paper)}")


def check_advantage_options(method: Method, *, off_policy_mask_threshold: float | None,
                            vllm_is_correction: bool) -> None:
    """TRL's off-policy sequence mask and vLLM importance-sampling correction reach a method through its advantages
    (zeroed, resp. multiplied per token). A method that builds its advantages from the rewards (``needs`` holds
    "rewards": w_reinforce, entrocraft) would drop them: raise, naming the option."""
    if "rewards" not in method.needs:
        return
    for opt, on in (("off_policy_mask_threshold", off_policy_mask_threshold is not None),
                    ("vllm_importance_sampling_correction", vllm_is_correction)):
        if on:
            raise ValueError(f"GRPOConfig.{opt} cannot be combined with method {method.name!r}: it builds its "
                             f"advantages from the rewards, and TRL's {opt} reaches a method through its advantages")


def trl_forward_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The multimodal model inputs TRL 1.16's ``_get_per_token_logps_and_entropies`` passes to the forward when the
    batch is scored in one chunk (as ``_compute_loss`` does): same keys, whole tensors."""
    g = inputs.get
    pv = g("pixel_values")
    out: dict[str, Any] = {}
    if g("image_grid_thw") is not None and pv is not None:
        out.update(pixel_values=pv, image_grid_thw=g("image_grid_thw"))
    elif g("image_position_ids") is not None and pv is not None:
        out.update(pixel_values=pv, image_position_ids=g("image_position_ids"))
    elif g("spatial_shapes") is not None and pv is not None:  # LFM2-VL, tile-indexed
        out.update(pixel_values=pv, spatial_shapes=g("spatial_shapes"))
        if g("pixel_attention_mask") is not None:
            out["pixel_attention_mask"] = g("pixel_attention_mask")
    elif pv is not None:
        out["pixel_values"] = pv
    if g("pixel_attention_mask") is not None and g("spatial_shapes") is None:
        out["pixel_attention_mask"] = g("pixel_attention_mask")
    for k in ("image_sizes", "token_type_ids", "mm_token_type_ids"):
        if g(k) is not None:
            out[k] = g(k)
    return out


#: What GRPOTrainer sees as ``beta`` while it builds or runs the reference for a method that reads
#: ``TokenBatch.ref_log_prob`` under the user's beta = 0 (``EntropyGRPOTrainer._reference_for_method``): TRL only tests
#: ``beta != 0`` there; NaN, so that a use as a coefficient could not go unnoticed.
REFERENCE_ONLY_BETA = float("nan")


def _with_grpo_config(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any], Any]:
    """(args, kwargs, the GRPOConfig) of an EntropyGRPOTrainer call; without one, GRPOTrainer's default
    (``GRPOConfig(f"{model_name}-GRPO")``) is built here and passed on, so that the method is resolved against the
    config the trainer will hold."""
    from trl import GRPOConfig

    if "args" in kwargs or len(args) > 2:
        cfg = kwargs["args"] if "args" in kwargs else args[2]
        if cfg is not None:
            return args, kwargs, cfg
    model = kwargs["model"] if "model" in kwargs else (args[0] if args else None)
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    cfg = GRPOConfig(f"{str(name).split('/')[-1]}-GRPO")
    if "args" in kwargs or len(args) <= 2:
        return args, {**kwargs, "args": cfg}, cfg
    return (*args[:2], cfg, *args[3:]), kwargs, cfg


def _check_reference_source(args: tuple, kwargs: dict[str, Any], method: Method) -> None:
    """Raise when GRPOTrainer could not build the reference of a method that reads ``ref_log_prob``: for a model
    instance without PEFT it loads a fresh copy from the model's path (``config._name_or_path``), which a model built
    from a config does not have (TRL would fail inside ``from_pretrained("")``)."""
    from accelerate.utils import is_peft_model

    model = kwargs["model"] if "model" in kwargs else (args[0] if args else None)
    peft_config = kwargs.get("peft_config", args[10] if len(args) > 10 else None)
    if isinstance(model, str) or peft_config is not None or is_peft_model(model):
        return
    if not getattr(getattr(model, "config", None), "_name_or_path", ""):
        raise ValueError(
            f"method {method.name!r} reads TokenBatch.ref_log_prob (the reference policy's log-probs), and GRPOTrainer "
            "builds its reference (as for beta != 0) by loading the model's path again (model.config._name_or_path), "
            "which this model, built from a config, does not have: save it (save_pretrained) and pass the path or the "
            "model loaded from it, or train a PEFT adapter (peft_config: the reference is the model with its adapters "
            "disabled)")


def _to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def _union_keys(dist: Collective, keys: list[str]) -> list[str]:
    """Sorted union of every rank's ``keys`` (one all-gather of their UTF-8 bytes; every rank must call it)."""
    if not dist.is_distributed:
        return sorted(set(keys))
    local = "".join(k + "\n" for k in keys).encode("utf-8")
    allb = dist.all_gather(torch.tensor(list(local), dtype=torch.int64))
    return sorted({k for k in bytes(allb.tolist()).decode("utf-8").split("\n") if k})


class MetricSums:
    """Per-process running (weighted sum, weight) of each metric since the last :meth:`reduce`."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, key: str, value: Any, weight: Any = 1.0) -> None:
        """Add ``value`` (a number or tensor; a tensor is averaged) with ``weight``; NaN/inf values only register
        the key."""
        v = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
        w = float(weight)
        s = self.sums.setdefault(key, [0.0, 0.0])
        if math.isfinite(v) and w > 0:
            s[0] += v * w
            s[1] += w

    def reduce(self, dist: Collective) -> dict[str, float]:
        """{key: sum over every rank of value * weight / sum of weights} (NaN where no rank had a finite value) over
        the union of every rank's keys, then reset. Two collectives whatever the keys (every rank must call it)."""
        keys = _union_keys(dist, list(self.sums))
        local = torch.tensor([v for k in keys for v in self.sums.get(k, (0.0, 0.0))], dtype=torch.float64)
        self.sums = {}
        if not keys:
            return {}
        tot = dist.all_reduce_sum(local).view(-1, 2).tolist()
        return {k: (s / w if w > 0 else float("nan")) for k, (s, w) in zip(keys, tot)}


class EntropyGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose policy loss is an rlvr-entropy method.

    Args:
        method: a registered method name (``rlvr_entropy.available_methods()``) or a Method instance.
        method_config: config overrides for a named method (paper defaults otherwise), except the PG fields GRPOConfig
            owns (:data:`TRL_OWNED`: set ``loss_type``, ``epsilon``, ``epsilon_high``, ``delta`` there; the same value
            here is accepted, a different one raises).
        diagnostics_every: every this many optimizer steps, probe the entropy change of the update: predicted per
            token (exact first-order and STEER's closed form) on the step's first micro-batch, measured after the
            optimizer step; Pearson/Spearman correlations are logged as "entropy_change/<form>/..." (averaged over
            processes) and every probe of the main process is appended to ``<output_dir>/entropy_change.jsonl``.
            None (default) disables it.
        *args, **kwargs: passed to ``trl.GRPOTrainer`` unchanged.

    Reference log-probs: a method whose ``needs`` holds ``"ref_log_prob"`` (the thermostat, for its pull) gets
    ``TokenBatch.ref_log_prob`` = the reference policy's log-prob of each sampled token at
    the training temperature, computed once per generation batch, whatever ``beta``. GRPOTrainer builds, prepares and
    runs a reference only when ``beta != 0``; with ``beta == 0`` it is shown a nonzero beta
    (:data:`REFERENCE_ONLY_BETA`) while its ``__init__`` runs and while it generates and scores each batch
    (``_reference_for_method``), so its own code does all of it: a frozen copy of the initial policy loaded from the
    model's path (a model built from a config, without a path, raises at construction), or with PEFT the model with
    its adapters disabled / the ``"ref"`` adapter; dropout disabled, LM head cast and fused as TRL does, prepared for
    DeepSpeed / FSDP, ``sync_ref_model`` honoured (PEFT + ``sync_ref_model`` raises TRL's NotImplementedError). The
    loss sees the user's beta = 0, so TRL's fixed ``beta * KL`` is not added: the method's own term (with its own,
    changing coefficient) is the only pull. With ``beta != 0`` both act, TRL's fixed KL on top of the method's term.
    Cost: the reference's parameters and one forward of it per generation batch (none for other methods).

    TRL's own entropy bonus (``entropy_coef``, ``use_adaptive_entropy``), ``top_entropy_quantile``, ``loss_type``
    cispo / sapo / vespo and ``importance_sampling_level="sequence"`` raise: use the methods entropy_bonus,
    adaptive_entropy, forking_tokens. ``beta`` (KL to a reference, with ``use_bias_correction_kl``),
    ``off_policy_mask_threshold``, the vLLM importance-sampling correction and the MoE router aux loss are applied as
    TRL applies them. A method with ``rollout_plan`` (aepo) runs its second generation each generation batch; with it,
    ``rollout_func``, ``tools`` / ``environment_factory``, a ``temperature`` in ``generation_kwargs`` and a temperature
    rollout that does not split evenly over the processes raise (docs/engines/trl.md).
    """

    def __init__(self, *args: Any, method: str | Method = "grpo", method_config: dict[str, Any] | None = None,
                 diagnostics_every: int | None = None, logits_free: bool = True, **kwargs: Any) -> None:
        if isinstance(method, str):
            get_method_class(method)  # fail on unknown names before building the trainer
        if diagnostics_every is not None and (not isinstance(diagnostics_every, int) or diagnostics_every < 1):
            raise ValueError(f"diagnostics_every must be a positive int or None, got {diagnostics_every!r}")
        self.diagnostics_every = diagnostics_every
        if not isinstance(logits_free, bool):
            raise ValueError(f"logits_free must be a bool, got {logits_free!r}")
        #: methods that read the whole distribution get it from hidden states + LM head in tiles (no [B, T, V])
        self.logits_free = logits_free
        self._tiled_head: bool | None = None  # decided at the first call: can this model's head be tiled?
        self.entropy_change_records: list = []
        self._probe = EntropyChangeProbe()
        self._probe_inputs: tuple | None = None
        self._metric_sums = {"train": MetricSums(), "eval": MetricSums()}
        args, kwargs, trl_args = _with_grpo_config(args, kwargs)
        # resolved before GRPOTrainer's __init__: whether the method reads the reference decides what TRL builds
        resolved = resolve_method(method, method_config, trl_args)
        #: the method reads TokenBatch.ref_log_prob while GRPOConfig.beta == 0: TRL builds, prepares and runs its
        #: reference only for beta != 0, so it is made to, without its fixed KL term (``_reference_for_method``)
        self._ref_for_method = "ref_log_prob" in resolved.needs and trl_args.beta == 0.0
        if self._ref_for_method:
            _check_reference_source(args, kwargs, resolved)
        with self._reference_for_method(trl_args):
            super().__init__(*args, **kwargs)
        if getattr(self, "_entropy_bonus_enabled", False):
            raise ValueError("TRL's entropy_coef / use_adaptive_entropy cannot be combined with an rlvr-entropy "
                             "method; use method='entropy_bonus' or 'adaptive_entropy' instead")
        if self.top_entropy_quantile < 1.0:
            raise ValueError("TRL's top_entropy_quantile cannot be combined with an rlvr-entropy method; use "
                             "method='forking_tokens' instead")
        if self.importance_sampling_level != "token":
            raise ValueError(f"GRPOConfig.importance_sampling_level={self.importance_sampling_level!r}: "
                             "EntropyGRPOTrainer supports 'token' only")
        self.method = resolved
        #: methods that generate a second set of samples each step (``rollout_plan`` / ``assemble``: aepo)
        self._two_generations = callable(getattr(self.method, "rollout_plan", None))
        if self._two_generations:
            self._check_second_generation()
        note = aggregation_note(self.method, self.args)
        if note and self.accelerator.is_main_process:
            _log.warning(note)
        check_advantage_options(self.method, off_policy_mask_threshold=self.off_policy_mask_threshold,
                                vllm_is_correction=bool(self.use_vllm and self.vllm_importance_sampling_correction))
        self.collective: Collective = (TorchCollective() if self.accelerator.num_processes > 1
                                       else LocalCollective())
        self.method.set_collective(self.collective)
        # methods that decide a step from its own rollout (Method.begin_step overridden, e.g. entrocraft)
        self._begins_steps = decides_from_rollout(self.method)
        self._begin_pending = False
        if self._begins_steps and self.args.steps_per_generation % self.args.gradient_accumulation_steps:
            raise ValueError(f"method {self.method.name!r} starts each optimizer step with its whole rollout "
                             f"(begin_step): GRPOConfig.steps_per_generation ({self.args.steps_per_generation}) must "
                             f"be a multiple of gradient_accumulation_steps ({self.args.gradient_accumulation_steps})")
        # first, so that other callbacks' on_step_end see the step's controller update
        self.callback_handler.callbacks.insert(0, _StepCallback(self))

    # ------------------------------------------------------------------------------------ rewards
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    @contextmanager
    def _reference_for_method(self, args: Any = None) -> Iterator[None]:
        """Inside the block, when the method reads ``TokenBatch.ref_log_prob`` and the user's ``beta`` is 0
        (``self._ref_for_method``), GRPOTrainer sees a nonzero beta (:data:`REFERENCE_ONLY_BETA`); the user's 0 is
        restored on exit. TRL decides everything about the reference from that one test, ``beta != 0``: in its
        ``__init__`` (``args`` given: ``args.beta`` and ``self.beta``) it builds the reference (a frozen copy of the
        initial policy loaded from the model's path as for its own KL, or with PEFT the ``"ref"`` adapter / the
        adapters disabled), disables its dropout, casts its LM head, adds its fused LM head at the training
        temperature, prepares it for DeepSpeed / FSDP / DDP and honours ``sync_ref_model``; in
        ``_generate_and_score_completions`` (no ``args``: ``self.beta``) it computes ``ref_per_token_logps`` once per
        generation batch. Outside these blocks beta is the user's, so ``_compute_loss`` adds no fixed KL term."""
        if not self._ref_for_method:
            yield
            return
        if args is not None:
            args.beta = REFERENCE_ONLY_BETA
        self.beta = REFERENCE_ONLY_BETA
        try:
            yield
        finally:  # the user's beta, 0 (only then is _ref_for_method set)
            if args is not None:
                args.beta = 0.0
            self.beta = 0.0

    def _generate_and_score_completions(self, inputs):
        with self._reference_for_method():
            out = super()._generate_and_score_completions(inputs)
        rpf = getattr(self, "_last_rewards_per_func", None)
        if rpf is not None:
            # Scalar reward per completion (weighted sum of the reward functions), for methods that read rewards
            # (W-REINFORCE). Completions no reward function could score count as 0.
            rewards = torch.nan_to_num((rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1))
            n = out["completion_ids"].size(0)
            start = self.accelerator.process_index * n
            out["rewards"] = rewards[start:start + n]
            # each completion's group statistics (TRL's groups: num_generations consecutive completions): mean
            # (the success rate for 0/1 rewards), unbiased std (0 for a group of one), size
            g = self.num_generations if self.model.training else self.num_generations_eval
            grouped = rewards.view(-1, g)
            std = grouped.std(1) if g > 1 else torch.zeros_like(grouped[:, 0])
            out["group_reward"] = grouped.mean(1).repeat_interleave(g)[start:start + n]
            out["group_reward_std"] = std.repeat_interleave(g)[start:start + n]
            out["group_size"] = torch.full((n,), g, dtype=torch.long, device=rewards.device)
            self._last_rewards_per_func = None
        if self._two_generations and self.model.training:
            out = self._second_generation(inputs, out)
        return out

    # ------------------------------------------------------------------ second generation (rollout_plan: aepo)
    #: per-row fields of a generation batch the second generation knows how to replace ([rows] or [rows, T])
    _ROW_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
                   "old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps",
                   "importance_sampling_ratio", "rewards", "group_reward", "group_reward_std", "group_size")

    def _check_second_generation(self) -> None:
        """Raise, naming the option, where the second generation of a method with ``rollout_plan`` (aepo) cannot run
        as the method says."""
        name = self.method.name
        what = f"method {name!r} generates a second set of samples each step at its own temperature"
        if self.rollout_func is not None:
            raise ValueError(f"{what}; GRPOTrainer's rollout_func owns the sampling, so that temperature cannot be "
                             "set: drop rollout_func or choose another method")
        if self.tools or self.environment_factories is not None:
            raise ValueError(f"{what} with single-turn generation; GRPOTrainer's tools / environment_factory "
                             "(multi-turn tool calls) are not supported with it")
        if "temperature" in (self.args.generation_kwargs or {}):
            raise ValueError(f"{what}; GRPOConfig.generation_kwargs sets 'temperature', which would override it "
                             "(vLLM applies generation_kwargs last): set GRPOConfig.temperature instead")
        G, W = self.num_generations, self.accelerator.num_processes
        prompts = self.args.generation_batch_size // G
        rows = self.method.num_resampled(prompts) * G
        if rows % W:
            raise ValueError(f"{what}: the first {self.method.num_resampled(prompts)} of the {prompts} prompts of a "
                             f"generation batch, x num_generations={G} = {rows} completions, which must split evenly "
                             f"over the {W} processes as TRL splits every generation; change generation_batch_size "
                             "(or per_device_train_batch_size / steps_per_generation), num_generations or the "
                             "method's resample_divisor")

    @contextmanager
    def _sampling_temperature(self, temperature: float) -> Iterator[None]:
        """Generate at ``temperature`` inside the block: vLLM reads ``vllm_generation.temperature`` at every call
        (server and colocate), transformers' generate (and continuous batching) ``generation_config``."""
        if self.use_vllm:
            vg = self.vllm_generation
            saved = vg.temperature
            vg.temperature = temperature
            try:
                yield
            finally:
                vg.temperature = saved
            return
        gc, gk = self.generation_config, self.generation_kwargs
        saved, saved_kw = gc.temperature, gk.get("temperature")
        gc.temperature = gk["temperature"] = temperature
        try:
            yield
        finally:
            gc.temperature, gk["temperature"] = saved, saved_kw

    def _decode_completions(self, prompts, prompt_ids, completion_ids):
        """Completions as GRPOTrainer._generate decodes them for the reward functions (no tools)."""
        from trl.data_utils import is_conversational

        if is_conversational({"prompt": prompts[0]}):
            if (getattr(self._tokenizer, "response_template", None) is not None
                    or getattr(self._tokenizer, "response_schema", None) is not None):
                from trl.chat_template_utils import parse_response

                return [[parse_response(self._tokenizer, ids, prefix=prompt_ids[i], tools=self.tools)]
                        for i, ids in enumerate(completion_ids)]
            contents = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
            return [[{"role": "assistant", "content": c}] for c in contents]
        return self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)

    def _second_generation(self, inputs: list[dict[str, Any]], out: dict[str, Any]) -> dict[str, Any]:
        """The method's second generation for one generation batch, on every rank (see docs/engines/trl.md).

        The generation batch is TRL's, over every process in rank order (rank r holds global rows r*n..(r+1)*n, each
        prompt's num_generations completions consecutive). ``rollout_plan(P)`` with the batch's P prompts (the same
        state, hence the same plan, on every rank); the plan's first prompts are generated again at its temperature,
        num_generations each, split over the ranks as TRL splits a generation, scored by the same reward functions;
        GRPO advantages within those groups (:func:`aepo_advantages`, gathered: every rank sees every group);
        ``assemble`` (identical on every rank) picks k of them. The update batch is the official one, in its order:
        the k kept samples in global positions 0..k-1 (the first k main rows are dropped), the main rows k.. after
        them; each rank keeps its positions (rank 0 holds the kept samples unless k > rows per rank), and TRL then
        shuffles each rank's rows over its micro-batches as it does every generation. Every per-row field follows
        the rows; old (and reference) log-probs of the kept samples are recomputed at the training temperature with
        the same weights where TRL carries them (off-policy, vLLM, beta != 0 or a method that reads
        ``ref_log_prob``)."""
        from accelerate.utils import gather, gather_object

        acc = self.accelerator
        W, rank = acc.num_processes, acc.process_index
        G = self.num_generations
        n = out["completion_ids"].size(0)
        unknown = sorted(k for k in out if k not in self._ROW_FIELDS and k != "num_items_in_batch")
        if unknown:
            raise ValueError(f"method {self.method.name!r}: the generation batch carries {unknown}, which the second "
                             "generation cannot replace row by row (multimodal inputs and tool masks are not "
                             "supported with it)")
        adv_all = gather(out["advantages"])  # [N] the main rollout's advantages, TRL's global order
        if adv_all.dim() != 1:
            raise ValueError(f"method {self.method.name!r} needs one advantage per completion, got shape "
                             f"{list(adv_all.shape)}")
        N = adv_all.numel()
        plan = self.method.rollout_plan(N // G)
        M = plan.num_prompts * G
        if M == 0:
            self.method.assemble(adv_all, adv_all[:0])
            return out
        if M % W:  # _check_second_generation refuses such configurations up front
            raise RuntimeError(f"{M} temperature samples do not split over {W} processes")
        all_inputs = gather_object(inputs)
        for g in range(plan.num_prompts):
            rows = all_inputs[g * G:(g + 1) * G]
            if any(r["prompt"] != rows[0]["prompt"] for r in rows):
                raise RuntimeError(f"the generation batch does not hold num_generations={G} consecutive completions "
                                   f"of each prompt (prompt {g}); the second generation cannot find its prompts")
        m = M // W
        x_inputs = [dict(x) for x in all_inputs[rank * m:(rank + 1) * m]]  # this rank's share of the plan's rows
        x_prompts = [x["prompt"] for x in x_inputs]
        prompt_ids, images, mm = self._tokenize_prompts(x_prompts)
        if images is not None or mm:
            raise ValueError(f"method {self.method.name!r}: the second generation does not support multimodal "
                             "prompts")
        with self._sampling_temperature(plan.temperature):
            completion_ids, logprobs = self._generate_single_turn(prompt_ids, None, {}, G)
        completions = self._decode_completions(x_prompts, prompt_ids, completion_ids)
        rpf = self._calculate_rewards(x_inputs, x_prompts, completions, completion_ids)  # [M, F] every rank's
        self._last_rewards_per_func = None
        # what reward functions logged while scoring the temperature rollout would be misaligned with the completions
        # table of the main rollout: not logged
        self._pending_extra_logs.clear()
        self._pending_metrics.clear()
        w = self.reward_weights.to(rpf.device).unsqueeze(0)
        unscorable = torch.isnan(rpf).all(dim=1)
        rx = (rpf * w).nansum(dim=1)
        adv_x = aepo_advantages(rx.masked_fill(unscorable, float("nan")), G)  # [M]
        upd = self.method.assemble(adv_all, adv_x)
        sums = self._metric_sums["train"]
        sums.add(f"{self.method.name}/second_generation/reward", rx.mean())
        sums.add(f"{self.method.name}/second_generation/qualified", (adv_x > self.method.config.select_threshold)
                 .float().sum())
        x_all = gather_object(list(zip(prompt_ids, completion_ids, logprobs if logprobs is not None else [None] * m)))
        self.state.num_input_tokens_seen += sum(len(p) + len(c) for p, c, _ in x_all)
        k = upd.k
        if k == 0:
            return out
        count = max(0, min(n, k - rank * n))  # this rank's positions 0..count-1 take kept samples
        picked = [int(i) for i in upd.extra_rows[rank * n:rank * n + count]]
        out = self._place_rows(out, [x_all[i] for i in picked])
        dev = out["advantages"].device
        out["advantages"] = upd.advantages[rank * n:(rank + 1) * n].to(device=dev, dtype=out["advantages"].dtype)
        if "rewards" in out and count:
            rewards = torch.nan_to_num(rx)  # as the main rollout's "rewards": unscorable counts 0
            grouped = rewards.view(-1, G)
            std = grouped.std(1) if G > 1 else torch.zeros_like(grouped[:, 0])
            idx = torch.tensor(picked, device=rewards.device)
            for key, val in (("rewards", rewards[idx]), ("group_reward", grouped.mean(1)[idx // G]),
                             ("group_reward_std", std[idx // G])):
                out[key] = out[key].clone()
                out[key][:count] = val.to(out[key])
            out["group_size"] = out["group_size"].clone()
            out["group_size"][:count] = G
        out["num_items_in_batch"] = gather(out["completion_mask"].sum()).sum()
        self._recompute_kept(out, min(k, n), count, plan.temperature)
        return out

    def _place_rows(self, out: dict[str, Any], rows: list[tuple]) -> dict[str, Any]:
        """``out`` with its first len(rows) rows replaced by (prompt ids, completion ids, vLLM log-probs or None);
        prompts left- and completions right-padded as TRL pads them (widths grown where needed, pad_to_multiple_of
        kept); [rows, T] fields widened with their padding value, and the old/ref log-probs of the new rows set to
        NaN until :meth:`_recompute_kept` fills them."""
        import torch.nn.functional as F

        out = dict(out)
        pad_id = self._tokenizer.pad_token_id
        mult = self.pad_to_multiple_of

        def width(cur: int, lens: list[int]) -> int:
            w = max([cur, *lens])
            return w + (-w) % mult if mult else w

        Lp = width(out["prompt_ids"].size(1), [len(p) for p, _, _ in rows])
        Lc0 = out["completion_ids"].size(1)
        Lc = width(Lc0, [len(c) for _, c, _ in rows])
        token_is = self.vllm_importance_sampling_mode in ("token_truncate", "token_mask")
        fills = {"prompt_ids": (pad_id, True), "prompt_mask": (0, True), "completion_ids": (pad_id, False),
                 "completion_mask": (0, False), "old_per_token_logps": (0.0, False),
                 "ref_per_token_logps": (0.0, False), "sampling_per_token_logps": (0.0, False)}
        if token_is:
            fills["importance_sampling_ratio"] = (1.0, False)
        for key, (value, left) in fills.items():
            t = out.get(key)
            if t is None:
                continue
            extra = (Lp if key.startswith("prompt") else Lc) - t.size(1)
            out[key] = F.pad(t, (extra, 0) if left else (0, extra), value=value) if extra else t.clone()
        eos_and_pad = {*self.eos_token_ids, pad_id}
        for j, (p, c, lp) in enumerate(rows):
            out["prompt_ids"][j] = pad_id
            out["prompt_mask"][j] = 0
            if p:
                out["prompt_ids"][j, Lp - len(p):] = torch.tensor(p)
                out["prompt_mask"][j, Lp - len(p):] = 1
            out["completion_ids"][j] = pad_id
            out["completion_mask"][j] = 0
            if c:
                out["completion_ids"][j, :len(c)] = torch.tensor(c)
                truncated = c[-1] not in eos_and_pad
                out["completion_mask"][j, :len(c)] = 0 if (self.mask_truncated_completions and truncated) else 1
            for key in ("old_per_token_logps", "ref_per_token_logps"):
                if key in out:
                    out[key][j] = float("nan")  # filled by _recompute_kept
            if "sampling_per_token_logps" in out:
                if lp is None:
                    raise RuntimeError("the main rollout carries vLLM's sampling log-probs but the second generation "
                                       "returned none")
                out["sampling_per_token_logps"][j] = 0.0
                out["sampling_per_token_logps"][j, :len(lp)] = torch.tensor(
                    [float("nan") if x is None else x for x in lp])
        return out

    @torch.no_grad()
    def _recompute_kept(self, out: dict[str, Any], c: int, count: int, temperature: float) -> None:
        """Old and reference log-probs (at the training temperature, current weights: the weights that generated the
        batch) and vLLM's importance-sampling ratio of this rank's kept samples (rows 0..count-1), where the batch
        carries them. Every rank runs the same forwards, over its rows 0..c-1 (c = min(k, rows per rank), equal on
        every rank), so sharded models (FSDP, ZeRO-3) step in lockstep."""
        from trl.models.utils import disable_gradient_checkpointing

        need = [k for k in ("old_per_token_logps", "ref_per_token_logps", "importance_sampling_ratio") if k in out]
        if not need:
            return  # on-policy: the loss takes the current log-probs (training temperature, same weights) as old
        ids = torch.cat([out["prompt_ids"][:c], out["completion_ids"][:c]], dim=1)
        am = torch.cat([out["prompt_mask"][:c], out["completion_mask"][:c]], dim=1)
        T = out["completion_ids"].size(1)
        bs = self.args.per_device_train_batch_size
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if "old_per_token_logps" in out:
                old, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, am, T, batch_size=bs)
                out["old_per_token_logps"][:count] = old[:count]
            if "ref_per_token_logps" in out:
                out["ref_per_token_logps"][:count] = self._ref_log_probs(ids, am, T, bs)[:count]
            if "importance_sampling_ratio" in out:
                # vLLM sampled these at the plan's temperature: the correction is the trainer's probability at that
                # temperature over vLLM's, not the training temperature's (which would undo the temperature)
                lp = self._log_probs_at(ids, am, out["completion_ids"][:c], out["completion_mask"][:c], temperature,
                                        bs)
                ratio = self._vllm_is_ratio(lp[:count], out["sampling_per_token_logps"][:count],
                                            out["completion_mask"][:count])
                out["importance_sampling_ratio"] = out["importance_sampling_ratio"].clone()
                out["importance_sampling_ratio"][:count] = ratio.to(out["importance_sampling_ratio"])

    def _ref_log_probs(self, ids, am, T, bs):
        """Reference log-probs as GRPOTrainer computes them (its ref_model, or the PEFT model with the "ref" adapter
        or the adapters off); the same reference whether the user's beta or the method's ``ref_log_prob`` made TRL
        build it."""
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(self.ref_model, ids, am, T, batch_size=bs)[0]
        from trl.trainer.utils import use_adapter

        model = self.accelerator.unwrap_model(self.model)
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return self._get_per_token_logps_and_entropies(self.model, ids, am, T, batch_size=bs)[0]

    def _log_probs_at(self, ids, am, completion_ids, completion_mask, temperature, bs):
        """Log-probs [rows, T] of the completion tokens under the current policy at ``temperature`` (logits-free when
        the LM head can be tiled), in chunks of ``bs`` rows."""
        T = completion_ids.size(1)
        parts = []
        for s in range(0, ids.size(0), bs):
            sl = slice(s, s + bs)
            tiled = self._lm_head_source(self.model, ids[sl], am[sl], T, completion_ids[sl], completion_mask[sl],
                                         temperature=temperature)
            if tiled is not None:
                parts.append(tiled[0].log_prob().float())
                continue
            logits, _ = self._full_logits(self.model, ids[sl], am[sl], T, temperature=temperature)
            logits = logits.float()
            parts.append(logits.gather(-1, completion_ids[sl][..., None]).squeeze(-1) - torch.logsumexp(logits, -1))
        return torch.cat(parts)

    def _vllm_is_ratio(self, log_probs, sampling_log_probs, mask):
        """TRL's vLLM importance-sampling ratio (GRPOTrainer._generate_and_score_completions) from the trainer's and
        vLLM's log-probs of the same tokens: per token or per sequence, truncated or masked at the clip bounds."""
        diff = torch.nan_to_num((log_probs - sampling_log_probs) * mask, nan=0.0)
        mode = self.vllm_importance_sampling_mode
        if mode in ("sequence_mask", "sequence_truncate"):
            diff = diff.sum(dim=-1, keepdim=True)
        ratio = torch.exp(diff)
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if mode in ("sequence_truncate", "token_truncate"):
            return torch.clamp(ratio, min=lo, max=hi)
        if mode in ("sequence_mask", "token_mask"):
            lo = -math.inf if lo is None else lo
            hi = math.inf if hi is None else hi
            return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
        raise ValueError(f"unknown vllm_importance_sampling_mode {mode!r}")

    # ------------------------------------------------------------------------------------ step start
    def _prepare_inputs(self, generation_batch):
        inputs = super()._prepare_inputs(generation_batch)
        if self._begin_pending and self.model.training:
            self._begin_pending = False
            self._begin_step()
        return inputs

    @torch.no_grad()
    def _begin_step(self) -> None:
        """``method.begin_step`` with this rank's micro-batches of the optimizer step that starts (on every rank,
        before the step's first loss): log-probs and entropies of the policy at the step's start (the rollout
        policy on-policy; TRL keeps no rollout entropies), from the fused path."""
        n = self.current_gradient_accumulation_steps
        spg = self.args.steps_per_generation
        parts = [self._buffered_inputs[(self._step + i) % spg] for i in range(n)]
        fields: dict[str, list] = {}
        for inp in parts:
            ids = torch.cat([inp["prompt_ids"], inp["completion_ids"]], dim=1)
            am = torch.cat([inp["prompt_mask"], inp["completion_mask"]], dim=1)
            T = inp["completion_ids"].size(1)
            lp, ent, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, am, T, compute_entropy=True, **{k: inp.get(k) for k in MULTIMODAL_KEYS})
            mask = inp["completion_mask"] if "tool_mask" not in inp else inp["completion_mask"] * inp["tool_mask"]
            old = inp.get("old_per_token_logps")
            row = {"log_prob": lp, "old_log_prob": lp if old is None else old, "advantages": inp["advantages"],
                   "mask": mask.bool(), "old_entropy": ent, "entropy": ent}
            for k in ("rewards", "group_reward", "group_reward_std", "group_size"):
                if inp.get(k) is not None:
                    row[k] = inp[k]
            if inp.get("ref_per_token_logps") is not None:
                row["ref_log_prob"] = inp["ref_per_token_logps"]
            for k, v in row.items():
                fields.setdefault(k, []).append(v)
        widths = {v.size(1) for v in fields["mask"]}
        if len(widths) != 1:
            raise RuntimeError(f"the step's micro-batches have different completion widths {sorted(widths)}")
        self.method.begin_step(TokenBatch(**{k: torch.cat(v) for k, v in fields.items()}))

    # ------------------------------------------------------------------------------------ model outputs
    def _full_logits(self, model, input_ids, attention_mask, logits_to_keep, *, temperature=None, **forward_kwargs):
        """(completion logits [B, T, V] from the ordinary forward divided by the sampling temperature (``temperature``,
        default the training one), the MoE aux loss or None). ``forward_kwargs``: multimodal inputs,
        ``output_router_logits``."""
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1,
                        use_cache=False, **forward_kwargs)
        logits = out.logits[:, :-1, :]
        aux = out.aux_loss if forward_kwargs.get("output_router_logits") else None
        return logits / (self.temperature if temperature is None else temperature), aux

    def _lm_head_source(self, model, input_ids, attention_mask, logits_to_keep, completion_ids, completion_mask, *,
                        temperature=None, **forward_kwargs):
        """(an LMHeadSource over the completion positions: hidden states + LM head, no [B, T, V] logits, the MoE aux
        loss or None), or None when this model's head cannot be tiled (soft-capping, a non-Linear head: then the
        materialized route is used, once logged) or ``logits_free=False``."""
        from rlvr_entropy.kernels import hf as khf

        if not self.logits_free:
            return None
        if self._tiled_head is None:
            try:
                weight = khf.lm_head_params(model)[0]
                khf.check_lm_head(model)
                self._tiled_head = True
            except ValueError as e:
                _log.warning("rlvr-entropy: %s; falling back to materialized [B, T, V] logits", e)
                self._tiled_head = False
            if self._tiled_head and (getattr(weight, "ds_id", None) is not None or weight.numel() == 0):
                raise ValueError("the LM head is partitioned (DeepSpeed ZeRO-3), which the tiled pass cannot read; "
                                 "pass logits_free=False to EntropyGRPOTrainer")
        if not self._tiled_head:
            return None
        with self.accelerator.autocast():
            src, out = khf.causal_lm_source(model, input_ids, attention_mask, logits_to_keep=logits_to_keep,
                                            token_ids=completion_ids, mask=completion_mask.bool(),
                                            temperature=self.temperature if temperature is None else temperature,
                                            check=False, return_outputs=True,
                                            **forward_kwargs)
        aux = out.aux_loss if forward_kwargs.get("output_router_logits") else None
        return src, aux

    def _forward_kwargs(self, inputs) -> dict[str, Any]:
        kw = trl_forward_inputs(inputs)
        if self.aux_loss_enabled:
            kw["output_router_logits"] = True
        return kw

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = loss_mask.bool()
        mode = "train" if self.model.training else "eval"

        logits = lm_head = None
        tiled = (self._lm_head_source(model, input_ids, attention_mask, logits_to_keep, completion_ids,
                                      completion_mask, **self._forward_kwargs(inputs))
                 if "logits" in self.method.needs else None)
        if tiled is not None:  # logits-free: one tiled pass serves log-prob, entropy and the method's statistics
            from rlvr_entropy.kernels import requests_for
            from rlvr_entropy.stats import Stat

            lm_head, aux_loss = tiled
            lm_head.prefetch(Stat.log_prob(), Stat.entropy(), *requests_for(self.method))
            per_token_logps, entropies = lm_head.log_prob(), lm_head.entropy()
        elif "logits" in self.method.needs:
            logits, aux_loss = self._full_logits(model, input_ids, attention_mask, logits_to_keep,
                                                 **self._forward_kwargs(inputs))
            logits32 = logits.float()
            per_token_logps = logits32.gather(-1, completion_ids[..., None]).squeeze(-1) - torch.logsumexp(
                logits32, -1)
            entropies = stats.entropy(logits, mask=mask)
        else:
            per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled, **{k: inputs.get(k) for k in MULTIMODAL_KEYS})

        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        if self.off_policy_mask_threshold is not None:
            # TRL multiplies the PG per-token loss of a dropped sequence (A < 0, large KL) by 0; zeroing its advantage
            # does the same to every PPO-type surrogate. Regularizers and denominators still see the sequence.
            keep = self.get_off_policy_mask(
                advantages=advantages if advantages.dim() == 2 else advantages.unsqueeze(1),
                per_token_logps=per_token_logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old),
                mask=loss_mask, off_policy_threshold=self.off_policy_mask_threshold)
            keep = keep.to(advantages.dtype)
            advantages = advantages * (keep if advantages.dim() == 2 else keep.squeeze(1))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL multiplies the PG per-token loss by the IS ratio (>= 0); for a PPO-type surrogate that is the
            # advantage times the ratio.
            adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(per_token_logps)
            advantages = adv * inputs["importance_sampling_ratio"]
        batch = TokenBatch(
            log_prob=per_token_logps,
            old_log_prob=old,
            advantages=advantages,
            mask=mask,
            logits=logits,
            lm_head=lm_head,
            entropy=entropies,
            old_entropy=entropies.detach() if entropies is not None else None,
            ref_log_prob=inputs.get("ref_per_token_logps"),
            rewards=inputs.get("rewards"),
            group_reward=inputs.get("group_reward"),
            group_reward_std=inputs.get("group_reward_std"),
            group_size=inputs.get("group_size"),
        )
        out = self.method.compute_loss(batch, step=self.state.global_step, observe=mode == "train")
        if (self.diagnostics_every and mode == "train" and self._probe_inputs is None
                and self.state.global_step % self.diagnostics_every == 0):
            self._arm_probe(model, batch, input_ids, attention_mask, completion_ids, logits_to_keep, inputs)
        loss = out.loss
        sums = self._metric_sums[mode]

        if self.beta != 0.0:
            # TRL adds beta * KL to the per-token loss before aggregating: the same aggregation as the method's
            ref = inputs["ref_per_token_logps"]
            kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:  # TRL: times the (differentiable) importance ratio
                kl = kl * torch.exp(per_token_logps - old)
            c = self.method.config
            loss = loss + self.beta * agg_loss(kl, mask, c.loss_agg_mode, c.norm_length)
            sums.add("kl", masked_sum(kl.detach(), mask) / mask.sum().clamp(min=1), weight=mask.sum())
        loss = self._normalize(loss, mask, inputs, mode)
        if self.aux_loss_enabled:
            ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / ga
            sums.add("aux_loss", aux_loss)

        for k, v in out.metrics.items():
            sums.add(k, v)
        n_tok = mask.sum()
        ent = masked_sum(entropies.detach().float(), mask) / n_tok.clamp(min=1)
        sums.add("entropy", ent, weight=n_tok)  # token-weighted over the step and every process
        return loss

    def _normalize(self, loss, mask, inputs, mode):
        """The method's micro-batch loss (aggregated as ``loss_type`` maps) -> TRL's normalization of that loss type."""
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "dapo":
            # token-mean over this micro-batch -> token sum / tokens of the whole window over every process
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * ga / self.args.steps_per_generation
            return loss * mask.sum().clamp(min=1) / normalizer
        if self.loss_type in ("grpo", "dr_grpo", "luspo"):
            # the method's row mean runs over non-empty rows; TRL's over all B rows (an empty row counts as 0)
            loss = loss * (mask.any(-1).sum() / mask.size(0))
        return loss / ga

    # ------------------------------------------------------------------------------------ step boundary
    def _end_step(self) -> None:
        """Once per optimizer step, on every rank (``on_step_end``): finish the probe, update the controllers from
        the step's sums over every process, reduce the step's metrics."""
        self._finish_probe()
        self.method.end_step(rollout_end=self._rollout_end(self.state.global_step))
        self._flush_metrics("train")

    def _rollout_end(self, global_step: int) -> bool:
        """Whether optimizer step ``global_step`` (1-based, as ``on_step_end`` sees it) completes a pass over a
        generation batch: TRL generates for ``steps_per_generation`` micro-steps and trains on them
        ``num_iterations`` times; a pass ends at every multiple of ``steps_per_generation`` micro-steps. The same on
        every rank (it depends on the config and the step only), so a per-rollout measurement (SIREN's anchor)
        spans the whole first generation batch whatever the accumulation."""
        ga, spg = self.args.gradient_accumulation_steps, self.args.steps_per_generation
        return (global_step * ga) // spg > ((global_step - 1) * ga) // spg

    def _flush_metrics(self, mode: str) -> None:
        for k, v in self._metric_sums[mode].reduce(self.collective).items():
            self._metrics[mode][k].append(v)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not self.model.training:  # the end of an evaluation (every rank logs it): reduce its metrics once
            self._flush_metrics("eval")
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------ diagnostics probe
    @torch.no_grad()
    def _arm_probe(self, model, batch, input_ids, attention_mask, completion_ids, logits_to_keep, inputs):
        fwd = trl_forward_inputs(inputs)
        completion_mask = inputs["completion_mask"]
        # logits-free when the head can be tiled: the batch's own source (its log-prob and entropy are cached)
        logits = batch.lm_head if batch.lm_head is not None else self._probe_distribution(
            model, input_ids, attention_mask, logits_to_keep, completion_ids, completion_mask, fwd)
        terms = self.method.pg_terms(batch)
        coef = terms.coef(batch.token_advantages())
        self._probe.before(logits, completion_ids, coef, batch.mask, batch.token_advantages(),
                           step=self.state.global_step)
        self._probe_inputs = (input_ids, attention_mask, logits_to_keep, fwd, completion_ids, completion_mask)

    def _probe_distribution(self, model, input_ids, attention_mask, logits_to_keep, completion_ids, completion_mask,
                            fwd):
        """What the probe reads: an LMHeadSource when the head can be tiled, else float logits [B, T, V]."""
        tiled = self._lm_head_source(model, input_ids, attention_mask, logits_to_keep, completion_ids,
                                     completion_mask, **fwd)
        if tiled is not None:
            return tiled[0]
        return self._full_logits(model, input_ids, attention_mask, logits_to_keep, **fwd)[0].float()

    @torch.no_grad()
    def _finish_probe(self) -> None:
        if self._probe_inputs is None:
            return
        input_ids, attention_mask, logits_to_keep, fwd, completion_ids, completion_mask = self._probe_inputs
        self._probe_inputs = None
        logits = self._probe_distribution(self.model, input_ids, attention_mask, logits_to_keep, completion_ids,
                                          completion_mask, fwd)
        rec = self._probe.after(logits)
        self.entropy_change_records.append(rec)
        for k, v in rec.report.items():
            if not k.startswith("count/"):
                self._metric_sums["train"].add(f"entropy_change/{k}", v)
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "entropy_change.jsonl"), "a") as f:
                f.write(json.dumps(rec.to_json()) + "\n")

    # ------------------------------------------------------------------------- controller checkpointing
    def _controller_payload(self) -> str:
        return json.dumps({"method": self.method.name, "state": _to_jsonable(self.method.state_dict())},
                          sort_keys=True)

    def _check_same_state(self, payload: str) -> None:
        """Raise on every rank if the controller state differs across ranks (one all-gather of a hash)."""
        if not self.collective.is_distributed:
            return
        digest = torch.tensor(list(hashlib.sha256(payload.encode()).digest()), dtype=torch.int64)  # [32]
        allh = self.collective.all_gather(digest).view(-1, digest.numel())
        bad = [r for r in range(allh.size(0)) if not torch.equal(allh[r], allh[0])]
        if bad:
            raise RuntimeError(f"rlvr-entropy controller state differs across ranks (ranks {bad} differ from rank 0; "
                               f"this rank holds {payload}); refusing to save a checkpoint of one rank's state")

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        payload = self._controller_payload()
        self._check_same_state(payload)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                f.write(payload)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            if self.method.controllers():
                raise ValueError(f"checkpoint {checkpoint} has no {STATE_FILE}: the controller state of method "
                                 f"{self.method.name!r} ({sorted(self.method.controllers())}) cannot be restored")
            return
        with open(path) as f:
            saved = json.load(f)
        if saved.get("method") != self.method.name:
            raise ValueError(f"checkpoint {checkpoint} holds state of method {saved.get('method')!r}, "
                             f"not {self.method.name!r}")
        self.method.load_state_dict(saved["state"])


class _StepCallback(TrainerCallback):
    """Opens (methods with ``begin_step``: at the step's first micro-batch, see ``EntropyGRPOTrainer._begin_step``)
    and closes every optimizer step (after the optimizer step, on every rank: ``EntropyGRPOTrainer._end_step``)."""

    def __init__(self, trainer: EntropyGRPOTrainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._begin_pending = self.trainer._begins_steps
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_step()
        return control


__all__ = ["EntropyGRPOTrainer", "resolve_method", "trl_pg_settings", "grpo_config_kwargs", "trl_forward_inputs", "check_advantage_options",
           "MetricSums",
           "LOSS_TYPES", "UNMAPPED_LOSS_TYPES", "TRL_OWNED", "MULTIMODAL_KEYS", "STATE_FILE"]
