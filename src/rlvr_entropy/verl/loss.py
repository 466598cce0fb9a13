"""Entropy-aware replacement of verl's ``ppo_loss`` and the registered-loss adapters.

Two ways in:

* ``rle_<name>`` in ``POLICY_LOSS_REGISTRY`` (registered by the plugin): verl's own ``ppo_loss`` calls it with
  log-probs only. Enough for methods that read only log_prob / old_log_prob / advantages / mask.
* ``entropy_ppo_loss(config, model_output, data, dp_group=None)``: drop-in for
  ``verl.workers.utils.losses.ppo_loss`` that also hands the method the current entropy (``model_output["entropy"]``,
  with gradient), the old-policy entropy when the batch carries one (``old_entropy`` / ``old_entropys``), and
  rewards (``rewards``: a [B] tensor, else the row sum of ``token_level_scores``) and, when the batch carries one,
  ``group_reward`` (a [B] tensor: each response's group mean reward, for thermostat's ``solved_at``). Install it with
  ``install_loss()`` (patches the name verl's workers bind) or a driver call ``actor_rollout_wg.set_loss_fn(...)``.

Loss scaling follows verl: the method aggregates over the micro-batch, then the loss is rescaled so that
micro-batch losses sum to the global mini-batch loss (token-mean: x local_tokens / batch_num_tokens * dp_size;
seq-mean-*: x local_seqs / global_batch_size * dp_size; token-sum: x dp_size). This equals verl's normalization
exactly for every method whose loss is a masked sum of per-token (or per-sequence) terms.

Controllers update once per mini-batch (optimizer step): verl does not pass the step to the loss, so a new step is
detected when ``batch_num_tokens`` (the mini-batch's global token count) changes, or, with dp_size 1, when the tokens
seen since the last step reach it; two consecutive mini-batches with identical token counts under dp_size > 1 are
merged (rare). A driver can call ``set_step(step)`` to override this.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rlvr_entropy.core.batch import TokenBatch
from rlvr_entropy.methods.base import Method, get_method_class
from rlvr_entropy.verl import PREFIX
from rlvr_entropy.verl.config import VERL_OWNED, method_from_loss_mode, validate_method_config

#: Live method instances of this process, by method name (their controllers hold the state to checkpoint).
METHODS: dict[str, Method] = {}
_STEP: dict[str, Any] = {"forced": None, "step": 0, "bnt": None, "seen": 0}


def set_step(step: int | None) -> None:
    """Force the optimizer step seen by the controllers (None: automatic detection)."""
    _STEP["forced"] = step


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


def method_for(name: str, actor_config: Any) -> Method:
    """The (cached) method instance for ``name`` configured from ``actor_config``; state survives config rebuilds."""
    pl = actor_config.get("policy_loss", None) or {}
    own = pl.get("method", "") or method_from_loss_mode(pl.get("loss_mode", ""))
    cfg = validate_method_config(name, pl.get("method_config", {}) if own == name else {})
    cls = get_method_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    pg = {k: v for k, v in pg_fields(actor_config).items() if k in fields}
    if name in ("clip_cov", "kl_cov"):  # verl's own clip_cov / kl_cov ignore clip_ratio_c: match them
        pg["dual_clip"] = None
    config = cls.Config(**pg, **cfg)
    m = METHODS.get(name)
    if m is None or m.config != config:
        new = cls(config)
        if m is not None:
            new.load_state_dict(m.state_dict())
        else:
            from rlvr_entropy.verl.state import restore_pending

            restore_pending(name, new)
        METHODS[name] = m = new
    return m


def _detect_step(mask: torch.Tensor, gbi: dict[str, Any]) -> int:
    if _STEP["forced"] is not None:
        return int(_STEP["forced"])
    bnt = _to_float(gbi.get("batch_num_tokens"))
    dp = _to_float(gbi.get("dp_size")) or 1.0
    local = int(mask.sum())
    if bnt is None:  # no global info: every call is a step
        _STEP["step"] += 1
        return _STEP["step"]
    # dp == 1: the micro-batches of a mini-batch hold exactly batch_num_tokens tokens; dp > 1: ranks are not
    # balanced exactly, so only a change of the global token count marks a new mini-batch
    if _STEP["bnt"] != bnt or (dp == 1 and _STEP["seen"] >= bnt - 0.5):
        _STEP["step"] += 1
        _STEP["bnt"], _STEP["seen"] = bnt, 0
    _STEP["seen"] += local
    return _STEP["step"]


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


def _explain(name: str, err: ValueError, has_entropy: bool) -> ValueError:
    msg = str(err)
    if "logits" in getattr(METHODS.get(name), "needs", ()):
        return ValueError(f"rlvr-entropy method {name!r} needs the full logits, which verl's own ppo_loss does not "
                          "hand to a policy loss: install the entropy-aware loss and its logits hook "
                          "(RLVR_ENTROPY_VERL_LOSS=1 or rlvr_entropy.verl.loss.install_loss()), see "
                          f"docs/engines/verl.md. Original error: {msg}")
    if "entropy" in msg and not has_entropy:
        return ValueError(f"rlvr-entropy method {name!r} needs the policy entropy: install the entropy-aware loss "
                          "(rlvr_entropy.verl.loss.install_loss() or actor_rollout_wg.set_loss_fn(...)) and set "
                          "actor_rollout_ref.actor.calculate_entropy=True. Original error: " + msg)
    return err


def method_loss(name: str, *, old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, config: Any, rollout_is_weights: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None, old_entropy: torch.Tensor | None = None,
                logits: torch.Tensor | None = None, rewards: torch.Tensor | None = None,
                group_reward: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Loss [] and float metrics of method ``name`` on one padded verl micro-batch ([B, T] tensors)."""
    if rollout_is_weights is not None:
        raise ValueError(f"{PREFIX}{name}: rollout correction weights (policy_loss.rollout_correction) are not "
                         "supported by rlvr-entropy methods; disable rollout correction")
    method = method_for(name, config)
    gbi = dict(getattr(config, "global_batch_info", {}) or {})
    mask = response_mask.to(torch.bool)
    batch = TokenBatch(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, mask=mask,
                       entropy=entropy, old_entropy=old_entropy, logits=logits, rewards=rewards,
                       group_reward=group_reward)
    step = _detect_step(mask, gbi)
    try:
        out = method.compute_loss(batch, step=step)
    except ValueError as e:
        raise _explain(name, e, entropy is not None) from e
    loss = out.loss * _scale(method.config.loss_agg_mode, mask, gbi)
    metrics = {f"actor/{k}": (float(v.detach().float()) if isinstance(v, torch.Tensor) else v)
               for k, v in out.metrics.items()}
    return loss, metrics


def make_registered_loss(name: str):
    """A function with verl's registered-policy-loss signature for method ``name``."""

    def loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
        if config is None:
            raise ValueError(f"{PREFIX}{name}: verl passed no actor config")
        if loss_agg_mode != config.get("loss_agg_mode", loss_agg_mode):
            raise ValueError(f"{PREFIX}{name}: loss_agg_mode {loss_agg_mode!r} differs from the actor config's")
        return method_loss(name, old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                           response_mask=response_mask, config=config, rollout_is_weights=rollout_is_weights)

    loss_fn.__name__ = loss_fn.__qualname__ = f"rlvr_entropy_{name}_policy_loss"
    loss_fn.__doc__ = f"rlvr-entropy method {name!r} as a verl policy loss (no entropy or logits)."
    return loss_fn


def entropy_ppo_loss(config: Any, model_output: dict[str, Any], data: Any, dp_group: Any = None):
    """Drop-in for ``verl.workers.utils.losses.ppo_loss`` that feeds entropy (and rewards) to the method.

    Same outputs as verl's: (loss, metrics) with ``actor/pg_loss``, the entropy bonus ``- entropy_coeff * H`` when
    entropy is computed, and the KL loss when ``use_kl_loss``. With a non-rlvr-entropy ``loss_mode`` it defers to
    verl's own ``ppo_loss``.
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

    fields = ["response_mask", "old_log_probs", "advantages"]
    optional = ["rollout_is_weights", "ref_log_prob", "old_entropy", "old_entropys", "token_level_scores"]
    fields += [k for k in optional if k in data.keys()]
    rewards = data["rewards"] if "rewards" in data.keys() else None
    group_reward = data["group_reward"] if "group_reward" in data.keys() else None
    pd = data.select(*fields).to_padded_tensor()
    mask = pd["response_mask"].to(bool)
    old_entropy = pd.get("old_entropy", None)
    if old_entropy is None:
        old_entropy = pd.get("old_entropys", None)
    if rewards is None and "token_level_scores" in pd.keys():
        rewards = torch.where(mask, pd["token_level_scores"], 0).sum(-1)
    if isinstance(rewards, torch.Tensor) and rewards.is_nested:
        rewards = None
    if isinstance(group_reward, torch.Tensor) and group_reward.is_nested:
        group_reward = None

    logits = None
    from rlvr_entropy.verl import hooks

    captured = hooks.take_captured_logits()
    if "logits" in method_for(name, config).needs:  # instance-level: entropy_bonus needs logits only when clamped
        logits = hooks.response_logits(captured, data, name)
    del captured
    pg_loss, pg_metrics = method_loss(
        name, old_log_prob=pd["old_log_probs"], log_prob=log_prob, advantages=pd["advantages"], response_mask=mask,
        config=config, rollout_is_weights=pd.get("rollout_is_weights", None), entropy=entropy,
        old_entropy=old_entropy, rewards=rewards, logits=logits, group_reward=group_reward)
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
    """Make verl's workers bind ``entropy_ppo_loss``: patches ``ppo_loss`` in ``verl.workers.utils.losses`` and
    ``verl.workers.engine_workers`` (the name the actor worker binds with ``partial(ppo_loss, config=...)``).
    Must run in each worker process before ``init_model``; the plugin does it when ``RLVR_ENTROPY_VERL_LOSS=1``.
    Non-rlvr-entropy loss modes still go to verl's own ``ppo_loss``."""
    from verl.workers.utils import losses as vlosses

    from rlvr_entropy.verl.hooks import install_logits_hook

    install_logits_hook()
    if not hasattr(vlosses, "_rlvr_entropy_original_ppo_loss"):
        vlosses._rlvr_entropy_original_ppo_loss = vlosses.ppo_loss
    vlosses.ppo_loss = entropy_ppo_loss
    try:
        from verl.workers import engine_workers
    except Exception:  # pragma: no cover  (engine_workers needs ray, uvicorn, ...)
        return
    engine_workers.ppo_loss = entropy_ppo_loss


__all__ = ["entropy_ppo_loss", "install_loss", "make_registered_loss", "method_loss", "method_for", "set_step",
           "pg_fields", "METHODS", "VERL_OWNED"]
