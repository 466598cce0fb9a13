"""Entropy-aware replacement of verl's ``ppo_loss`` and the registered-loss adapters.

Two ways in:

* ``rle_<name>`` in ``POLICY_LOSS_REGISTRY`` (registered by the plugin): verl's own ``ppo_loss`` calls it with
  log-probs only. Enough for methods that read only log_prob / old_log_prob / advantages / mask.
* ``entropy_ppo_loss(config, model_output, data, dp_group=None)``: drop-in for
  ``verl.workers.utils.losses.ppo_loss`` that also hands the method the current entropy (``model_output["entropy"]``,
  with gradient), the old-policy entropy when the batch carries one (see below), and
  rewards (``rewards``: a [B] tensor, else the row sum of ``token_level_scores``) and, when the batch carries one,
  ``group_reward`` (a [B] tensor: each response's group mean reward; thermostat's reach-gated floor reads it).
  Install it with ``install_loss()`` (patches the name verl's workers bind) or a driver call
  ``actor_rollout_wg.set_loss_fn(...)``.

Loss scaling follows verl: the method aggregates over the micro-batch, then the loss is rescaled so that
micro-batch losses sum to the global mini-batch loss (token-mean: x local_tokens / batch_num_tokens * dp_size;
seq-mean-*: x local_seqs / global_batch_size * dp_size; token-sum: x dp_size). This equals verl's normalization
exactly for every method whose loss is a masked sum of per-token (or per-sequence) terms.

State: both paths find the method instance in the :class:`~rlvr_entropy.verl.state.EngineState` of the engine
running the step, through the step context the engine hooks set (:mod:`rlvr_entropy.verl.hooks`): ``step`` is the
engine's optimizer-step count (closed by the hook on ``optimizer_step``, never guessed from token counts), every
statistic spans the engine's DP group (``TorchCollective(dp_group)``) and forward-only passes never change
controller state (``observe=False``). Called outside a hooked engine step (no step context and no ``state=``), the
losses raise.

Reference log-probs (``TokenBatch.ref_log_prob``, read by a method whose ``needs`` holds it: the thermostat's
pull): the batch's ``ref_log_prob``, which verl's reference worker computes only with
``actor.use_kl_loss=True`` or ``algorithm.use_kl_in_reward=True`` (:data:`REFERENCE_OPTIONS`); a micro-batch without
it raises, naming the field and the options. The registered path never has it (verl's ``ppo_loss`` hands a policy
loss no reference) and raises the same way. verl's own KL loss (``use_kl_loss``, ``kl_loss_coef``) is added as verl
adds it, on top of the method's term.

Old-policy entropy (STEER's H): the first of ``old_entropy``, ``entropy`` (what verl 0.9.1's v1 trainer stores in
the batch: the actor's entropy from the old-log-prob pass), ``old_entropys`` / ``entropys`` (the legacy trainer's
name) found in the batch; ``model_output["entropy"]`` is always the current policy's.
"""
from __future__ import annotations

from typing import Any

import torch

from rlvr_entropy.core.batch import TokenBatch
from rlvr_entropy.methods.base import Method, get_method_class
from rlvr_entropy.verl import PREFIX
from rlvr_entropy.verl.config import VERL_OWNED, method_from_loss_mode


def _to_float(x: Any) -> float | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().sum()) if x.numel() else None
    return float(x)


def pg_fields(actor_config: Any) -> dict[str, Any]:
    """PG fields of the method, read from verl's actor config."""
    clip = actor_config.get("clip_ratio", 0.2)
    lo = actor_config.get("clip_ratio_low", None)
    hi = actor_config.get("clip_ratio_high", None)
    c = actor_config.get("clip_ratio_c", 3.0)
    lsf = actor_config.get("loss_scale_factor", None)
    return {"eps_low": float(clip if lo is None else lo), "eps_high": float(clip if hi is None else hi),
            "dual_clip": None if c is None else float(c), "loss_agg_mode": actor_config.get("loss_agg_mode"),
            "norm_length": None if lsf is None else int(lsf)}


def method_for(name: str, actor_config: Any, state: Any = None) -> Method:
    """The method instance ``name`` of ``state`` (default: the active step context's), configured from
    ``actor_config``."""
    return _owner(name, state).method(name, actor_config)


def _owner(name: str, state: Any = None):
    if state is not None:
        return state
    from rlvr_entropy.verl import hooks

    ctx = hooks.current()
    if ctx is None:
        raise ValueError(f"{PREFIX}{name}: called outside a hooked verl engine step, so there is no owner for the "
                         "method's state, step count and process group. Use verl's FSDP engine with the hooks "
                         "installed (the plugin does it on `import verl`; or rlvr_entropy.verl.hooks."
                         "install_engine_hooks() before the engine runs), or pass state=EngineState(dp_group) and "
                         "call state.end_step() after each optimizer step")
    return ctx.state


def _scale(mode: str, mask: torch.Tensor, gbi: dict[str, Any]) -> float | torch.Tensor:
    """Factor turning a micro-batch-normalized loss into verl's globally normalized one."""
    dp = _to_float(gbi.get("dp_size")) or 1.0
    if mode == "token-sum":
        return dp
    if mode == "token-mean":
        total = _to_float(gbi.get("batch_num_tokens"))
        if total is None:
            if dp > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return 1.0
        return mask.sum().to(torch.float64).item() / total * dp
    total = _to_float(gbi.get("global_batch_size"))
    if total is None:
        if dp > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        return 1.0
    return mask.any(-1).sum().to(torch.float64).item() / total * dp


def _explain(name: str, err: ValueError, has_entropy: bool, has_distribution: bool) -> ValueError:
    msg = str(err)
    if "logits" in get_method_class(name).needs and not has_distribution:
        return ValueError(f"rlvr-entropy method {name!r} reads the next-token distribution, which verl's own ppo_loss "
                          "does not hand to a policy loss: install the entropy-aware loss and the engine hooks "
                          "(RLVR_ENTROPY_VERL_LOSS=1 or rlvr_entropy.verl.loss.install_loss()), see "
                          f"docs/engines/verl.md. Original error: {msg}")
    if "entropy" in msg and not has_entropy:
        return ValueError(f"rlvr-entropy method {name!r} needs the policy entropy: install the entropy-aware loss "
                          "(rlvr_entropy.verl.loss.install_loss() or actor_rollout_wg.set_loss_fn(...)) and set "
                          "actor_rollout_ref.actor.calculate_entropy=True. Original error: " + msg)
    return err


#: How a method gets ``TokenBatch.ref_log_prob`` under verl (the error messages and docs/engines/verl.md say it).
REFERENCE_OPTIONS = ("verl computes the reference policy's log-probs (the batch's 'ref_log_prob', from its reference "
                     "worker) only when actor_rollout_ref.actor.use_kl_loss=True or algorithm.use_kl_in_reward=True: "
                     "set actor_rollout_ref.actor.use_kl_loss=True with actor_rollout_ref.actor.kl_loss_coef=0 for "
                     "the method's own pull alone (a nonzero kl_loss_coef adds verl's fixed KL loss on top, "
                     "use_kl_in_reward verl's KL penalty in the reward)")


def _missing_reference(name: str, registered: bool) -> ValueError:
    if registered:
        return ValueError(f"{PREFIX}{name}: rlvr-entropy method {name!r} (with this method_config) reads "
                          "TokenBatch.ref_log_prob, the reference policy's log-prob of each sampled token, which "
                          "verl's own ppo_loss does not hand to a registered policy loss: install the entropy-aware "
                          "loss (RLVR_ENTROPY_VERL_LOSS=1 or rlvr_entropy.verl.loss.install_loss()); "
                          + REFERENCE_OPTIONS)
    return ValueError(f"{PREFIX}{name}: rlvr-entropy method {name!r} (with this method_config) reads "
                      "TokenBatch.ref_log_prob, the reference policy's log-prob of each sampled token, but this "
                      "micro-batch carries no 'ref_log_prob'; " + REFERENCE_OPTIONS)


def method_loss(name: str, *, old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, config: Any, rollout_is_weights: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None, old_entropy: torch.Tensor | None = None,
                lm_head: Any = None, rewards: torch.Tensor | None = None,
                group_reward: torch.Tensor | None = None, ref_log_prob: torch.Tensor | None = None,
                state: Any = None, observe: bool | None = None, registered: bool = False,
                ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Loss [] and float metrics of method ``name`` on one padded verl micro-batch ([B, T] tensors).

    ``state``: the owning EngineState (default: the active step context's); ``observe``: whether controllers
    measure this call (default: the step context's, True with an explicit state and no context). ``ref_log_prob``:
    the batch's reference log-probs (a method that reads them raises, naming the verl options, without them);
    ``registered``: called by verl's own ``ppo_loss`` (which hands no entropy or reference)."""
    if rollout_is_weights is not None:
        raise ValueError(f"{PREFIX}{name}: rollout correction weights (policy_loss.rollout_correction) are not "
                         "supported by rlvr-entropy methods; disable rollout correction")
    from rlvr_entropy.verl import hooks

    owner = _owner(name, state)
    if observe is None:
        ctx = hooks.current()
        observe = ctx.observe if ctx is not None and ctx.state is owner else True
    method = owner.method(name, config)
    if "ref_log_prob" in method.needs and ref_log_prob is None:
        raise _missing_reference(name, registered)
    gbi = dict(getattr(config, "global_batch_info", {}) or {})
    mask = response_mask.to(torch.bool)
    batch = TokenBatch(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, mask=mask,
                       entropy=entropy, old_entropy=old_entropy, lm_head=lm_head, rewards=rewards,
                       group_reward=group_reward, ref_log_prob=ref_log_prob)
    try:
        out = method.compute_loss(batch, step=owner.step, observe=observe)
    except ValueError as e:
        raise _explain(name, e, entropy is not None, lm_head is not None) from e
    if observe:
        owner.observed(name)
    loss = out.loss * _scale(method.config.loss_agg_mode, mask, gbi)
    metrics = {f"actor/{k}": (float(v.detach().float()) if isinstance(v, torch.Tensor) else v)
               for k, v in out.metrics.items()}
    return loss, metrics


#: Largest mean |log-prob difference| (nats, over valid positions) between the tiled LM head and verl's own
#: log-probs: bf16 rounding of verl's logits stays far below it; a wrong layout or a model that post-processes its
#: logits does not.
LOG_PROB_TOLERANCE = 0.05


def _check_same_log_prob(name: str, ours: torch.Tensor, verls: torch.Tensor, mask: torch.Tensor) -> None:
    with torch.no_grad():
        if not bool(mask.any()):
            return
        d = (ours.detach().float() - verls.detach().float()).abs()[mask]
        if not float(d.mean()) <= LOG_PROB_TOLERANCE:
            raise ValueError(f"{PREFIX}{name}: the log-probs of the tiled LM head (backbone hidden state x lm_head "
                             f"weight) differ from verl's by {float(d.mean()):.3g} nats on average (max "
                             f"{float(d.max()):.3g}): this model's backbone output is not its LM head's input, or it "
                             "post-processes its logits (soft-capping, scaling), which the tiled LM head does not support")


def make_registered_loss(name: str):
    """A function with verl's registered-policy-loss signature for method ``name``."""

    def loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
        if config is None:
            raise ValueError(f"{PREFIX}{name}: verl passed no actor config")
        if loss_agg_mode != config.get("loss_agg_mode", loss_agg_mode):
            raise ValueError(f"{PREFIX}{name}: loss_agg_mode {loss_agg_mode!r} differs from the actor config's")
        return method_loss(name, old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                           response_mask=response_mask, config=config, rollout_is_weights=rollout_is_weights,
                           registered=True)

    loss_fn.__name__ = loss_fn.__qualname__ = f"rlvr_entropy_{name}_policy_loss"
    loss_fn.__doc__ = f"rlvr-entropy method {name!r} as a verl policy loss (no entropy or logits)."
    return loss_fn


#: Batch keys holding the old policy's entropy, in the order they are looked up (v1 trainer: "entropy").
OLD_ENTROPY_KEYS = ("old_entropy", "entropy", "old_entropys", "entropys")


def old_entropy_key(keys: Any, who: str) -> str | None:
    """The one key of :data:`OLD_ENTROPY_KEYS` among ``keys`` (a batch's), None without one; several raise (``who``
    names the caller in the error)."""
    found = [k for k in OLD_ENTROPY_KEYS if k in set(keys)]
    if len(found) > 1:
        raise ValueError(f"{who}: the batch carries the old-policy entropy under several keys {found}; keep one of "
                         f"{list(OLD_ENTROPY_KEYS)}")
    return found[0] if found else None


def entropy_ppo_loss(config: Any, model_output: dict[str, Any], data: Any, dp_group: Any = None, *,
                     state: Any = None, observe: bool | None = None):
    """Drop-in for ``verl.workers.utils.losses.ppo_loss`` that feeds entropy (and rewards) to the method.

    Same outputs as verl's: (loss, metrics) with ``actor/pg_loss``, the entropy bonus ``- entropy_coeff * H`` when
    entropy is computed, and the KL loss when ``use_kl_loss``. With a non-rlvr-entropy ``loss_mode`` it defers to
    verl's own ``ppo_loss``. ``dp_group`` (what verl's engine passes) must be the owning engine's data-parallel
    group; ``state`` / ``observe``: see :func:`method_loss` (the hooked engine supplies both).
    """
    from verl.trainer.ppo.core_algos import agg_loss, kl_penalty
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    name = method_from_loss_mode(config.policy_loss.get("loss_mode", "vanilla"))
    if name is None:
        return _VERL_PPO_LOSS(config, model_output, data, dp_group)

    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    entropy = model_output.get("entropy", None)
    if entropy is not None:
        entropy = no_padding_2_padding(entropy, data)
    gbi = config.global_batch_info
    gbi["dp_size"] = data["dp_size"]
    gbi["batch_num_tokens"] = data["batch_num_tokens"]
    gbi["global_batch_size"] = data["global_batch_size"]
    gbi["loss_scale_factor"] = config.loss_scale_factor
    if (data["dp_size"] > 1 or data["batch_num_tokens"] is not None or data["global_batch_size"] is not None
            or config.loss_scale_factor is not None):
        agg = AggregationType.SUM
    else:
        agg = AggregationType.MEAN

    owner = _owner(name, state)
    owner.check_group(dp_group)
    keys = set(data.keys())
    old_key = old_entropy_key(keys, f"{PREFIX}{name}")
    method = owner.method(name, config)
    reads = "logits" in method.needs  # instance-level: entropy_bonus reads the distribution only when clamped
    fields = ["response_mask", "old_log_probs", "advantages", *(["responses"] if reads else [])]
    optional = ["rollout_is_weights", "ref_log_prob", *([old_key] if old_key else []), "token_level_scores"]
    fields += [k for k in optional if k in keys]
    rewards = data["rewards"] if "rewards" in data.keys() else None
    group_reward = data["group_reward"] if "group_reward" in data.keys() else None
    pd = data.select(*fields).to_padded_tensor()
    mask = pd["response_mask"].to(bool)
    old_entropy = pd[old_key] if old_key else None
    if rewards is None and "token_level_scores" in pd.keys():
        rewards = torch.where(mask, pd["token_level_scores"], 0).sum(-1)
    if isinstance(rewards, torch.Tensor) and rewards.is_nested:
        rewards = None
    if isinstance(group_reward, torch.Tensor) and group_reward.is_nested:
        group_reward = None

    lm_head = None
    if reads:
        from rlvr_entropy import kernels
        from rlvr_entropy.stats import Stat
        from rlvr_entropy.verl import hooks

        lm_head = hooks.response_lm_head(data, name, pd["responses"], mask)
        # one tiled pass: the method's statistics, the consistency check below and, without verl's entropy
        # (calculate_entropy=False), the entropy the method reads (verl's own entropy bonus stays off then)
        want = (Stat.log_prob(), *(() if entropy is not None else (Stat.entropy(),)), *kernels.requests_for(method))
        lm_head.prefetch(*want)
        _check_same_log_prob(name, lm_head.log_prob(), log_prob, mask)
    pg_loss, pg_metrics = method_loss(
        name, old_log_prob=pd["old_log_probs"], log_prob=log_prob, advantages=pd["advantages"], response_mask=mask,
        config=config, rollout_is_weights=pd.get("rollout_is_weights", None), entropy=entropy,
        old_entropy=old_entropy, rewards=rewards, lm_head=lm_head, group_reward=group_reward,
        ref_log_prob=pd.get("ref_log_prob", None), state=owner, observe=observe)
    metrics: dict[str, Any] = dict(Metric.from_dict(pg_metrics, aggregation=AggregationType.MEAN))
    metrics["actor/pg_loss"] = Metric(value=pg_loss, aggregation=agg)
    policy_loss = pg_loss
    if entropy is not None:
        entropy_loss = agg_loss(loss_mat=entropy, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **gbi)
        policy_loss = policy_loss - config.entropy_coeff * entropy_loss
        metrics["actor/entropy_loss"] = Metric(value=entropy_loss, aggregation=agg)
    if config.use_kl_loss:
        kld = kl_penalty(logprob=log_prob, ref_logprob=pd["ref_log_prob"], kl_penalty=config.kl_loss_type)
        kl_loss = agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **gbi)
        policy_loss = policy_loss + kl_loss * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl_loss, aggregation=agg)
        metrics["kl_coef"] = config.kl_loss_coef
    return policy_loss, metrics


def _verl_ppo_loss():
    from verl.workers.utils import losses as vlosses

    return getattr(vlosses, "_rlvr_entropy_original_ppo_loss", vlosses.ppo_loss)


def _VERL_PPO_LOSS(config, model_output, data, dp_group=None):
    return _verl_ppo_loss()(config, model_output, data, dp_group)


def install_loss() -> None:
    """Make verl's workers bind ``entropy_ppo_loss``: patches ``ppo_loss`` in ``verl.workers.utils.losses`` (which
    ``verl.workers.engine_workers`` imports by name when it is first imported; patched there too when it already
    is: the name the actor worker binds with ``partial(ppo_loss, config=...)``) and installs the engine hooks (now,
    or right after verl's engine module is imported). Must run in each worker process before ``init_model``; the
    plugin does it when ``RLVR_ENTROPY_VERL_LOSS=1``. Non-rlvr-entropy loss modes still go to verl's own
    ``ppo_loss``. Imports nothing that resolves verl's platform."""
    import sys

    from verl.workers.utils import losses as vlosses

    from rlvr_entropy.verl.hooks import install_engine_hooks_on_import

    if not hasattr(vlosses, "_rlvr_entropy_original_ppo_loss"):
        vlosses._rlvr_entropy_original_ppo_loss = vlosses.ppo_loss
    vlosses.ppo_loss = entropy_ppo_loss
    engine_workers = sys.modules.get("verl.workers.engine_workers")
    if engine_workers is not None:
        engine_workers.ppo_loss = entropy_ppo_loss
    install_engine_hooks_on_import()


__all__ = ["entropy_ppo_loss", "install_loss", "make_registered_loss", "method_loss", "method_for", "pg_fields",
           "OLD_ENTROPY_KEYS", "old_entropy_key", "VERL_OWNED", "REFERENCE_OPTIONS"]
