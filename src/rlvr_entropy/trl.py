"""Hugging Face TRL engine: ``EntropyGRPOTrainer``, a ``trl.GRPOTrainer`` that delegates its loss to any
registered rlvr-entropy method.

Tested with trl 1.16.x (the only module besides ``rlvr_entropy.verl`` that imports an engine).

How it plugs in (see docs/engines/trl.md):
- ``_compute_loss`` is overridden (TRL's public ``compute_loss`` calls it). The trainer's inputs (prompt and
  completion ids and masks, advantages [B] or [B, T], old log-probs when off-policy) become a
  :class:`rlvr_entropy.TokenBatch`; the method returns the loss and its metrics.
- Methods whose ``needs`` include ``"logits"`` (siren, lp_reg, entropy_bonus with AEnt clamping) get full logits
  from the model's ordinary forward, divided by the sampling temperature; log-probs come from the same logits and
  entropies from :func:`rlvr_entropy.stats.entropy` (chunked). Every other method keeps TRL's fused LM-head path,
  which never builds [B, T, V] logits.
- Normalization follows TRL so that gradient accumulation and multi-process runs scale as TRL's own losses do:
  a method aggregating with "token-mean" is rescaled to TRL's "dapo" normalizer (valid tokens of the whole
  accumulation window across processes); any other aggregation is divided by the accumulation steps, like TRL's
  "grpo". With method "grpo" this reproduces GRPOTrainer's loss for loss_type "dapo" (token-mean) and "grpo"
  (seq-mean-token-mean), which the tests check.
- ``old_entropy`` (STEER): TRL does not compute the old policy's entropies. When the step is on-policy (no
  ``old_per_token_logps`` in the inputs) it equals the current entropy, detached, which is what is passed; in the
  off-policy case the current entropy (detached) is passed as an approximation.
- Metrics go to TRL's logs under the method's name ("siren/selected_entropy", ...). The method's controller state
  (SIREN's anchor, adaptive coefficients) is written to ``rlvr_entropy_state.json`` in every checkpoint and
  restored on resume.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from rlvr_entropy import stats
from rlvr_entropy.core.batch import TokenBatch
from rlvr_entropy.diagnostics import EntropyChangeProbe
from rlvr_entropy.methods.base import Method, get_method_class, make_method

STATE_FILE = "rlvr_entropy_state.json"


def resolve_method(method: str | Method, method_config: dict[str, Any] | None = None) -> Method:
    """A Method from a registered name (+ config overrides) or an instance (then method_config must be None)."""
    if isinstance(method, Method):
        if method_config:
            raise ValueError("method_config must be None when method is a Method instance")
        return method
    if not isinstance(method, str):
        raise ValueError(f"method must be a registered name or a Method, got {type(method).__name__}")
    get_method_class(method)  # clear error for unknown names
    return make_method(method, **(method_config or {}))


def _to_jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


class EntropyGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose policy loss is an rlvr-entropy method.

    Args:
        method: a registered method name (``rlvr_entropy.available_methods()``) or a Method instance.
        method_config: config overrides for a named method (paper defaults otherwise).
        diagnostics_every: every this many optimizer steps, probe the entropy change of the update: predicted per
            token (exact first-order and STEER's closed form) on the step's first micro-batch, measured after the
            optimizer step; Pearson/Spearman correlations are logged as "entropy_change/<form>/..." and every probe
            is appended to ``<output_dir>/entropy_change.jsonl``. None (default) disables it.
        *args, **kwargs: passed to ``trl.GRPOTrainer`` unchanged.

    TRL's own ``loss_type``, ``epsilon``/``epsilon_high``, ``top_entropy_quantile`` and entropy bonus are not used
    by the loss: the method's config decides. Setting TRL's entropy bonus or entropy mask together with a method
    raises, to avoid applying two interventions by accident; ``beta`` (KL to a reference) is added on top as in TRL.
    """

    def __init__(self, *args: Any, method: str | Method = "grpo", method_config: dict[str, Any] | None = None,
                 diagnostics_every: int | None = None, **kwargs: Any) -> None:
        self.method = resolve_method(method, method_config)
        if diagnostics_every is not None and (not isinstance(diagnostics_every, int) or diagnostics_every < 1):
            raise ValueError(f"diagnostics_every must be a positive int or None, got {diagnostics_every!r}")
        self.diagnostics_every = diagnostics_every
        self.entropy_change_records: list = []
        self._probe = EntropyChangeProbe()
        self._probe_inputs: tuple | None = None
        super().__init__(*args, **kwargs)
        if diagnostics_every is not None:
            self.add_callback(_ProbeCallback(self))
        if getattr(self, "_entropy_bonus_enabled", False):
            raise ValueError("TRL's entropy_coef / use_adaptive_entropy cannot be combined with an rlvr-entropy "
                             "method; use method='entropy_bonus' or 'adaptive_entropy' instead")
        if self.top_entropy_quantile < 1.0:
            raise ValueError("TRL's top_entropy_quantile cannot be combined with an rlvr-entropy method; use "
                             "method='forking_tokens' instead")
        if self.importance_sampling_level != "token":
            raise ValueError("EntropyGRPOTrainer supports importance_sampling_level='token' only")

    # ------------------------------------------------------------------------------------ rewards
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        rpf = getattr(self, "_last_rewards_per_func", None)
        if rpf is not None:
            # Scalar reward per completion (weighted sum of the reward functions), for methods that read rewards
            # (W-REINFORCE). Completions no reward function could score count as 0.
            rewards = torch.nan_to_num((rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1))
            n = out["completion_ids"].size(0)
            start = self.accelerator.process_index * n
            out["rewards"] = rewards[start:start + n]
            # success rate of each completion's group (TRL's groups: num_generations consecutive completions)
            g = self.num_generations if self.model.training else self.num_generations_eval
            group = rewards.view(-1, g).mean(1).repeat_interleave(g)
            out["group_reward"] = group[start:start + n]
            self._last_rewards_per_func = None
        return out

    # ------------------------------------------------------------------------------------ model outputs
    def _full_logits(self, model, input_ids, attention_mask, logits_to_keep):
        """Completion logits [B, T, V] from the ordinary forward, divided by the sampling temperature."""
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1)
        logits = out.logits[:, :-1, :]
        return logits / self.temperature

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = mask.bool()
        mode = "train" if self.model.training else "eval"

        logits = None
        if "logits" in self.method.needs:
            logits = self._full_logits(model, input_ids, attention_mask, logits_to_keep)
            logits32 = logits.float()
            per_token_logps = logits32.gather(-1, completion_ids[..., None]).squeeze(-1) - torch.logsumexp(
                logits32, -1)
            entropies = stats.entropy(logits, mask=mask)
        else:
            per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, compute_entropy=True)

        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL multiplies the per-token loss by the IS ratio; for a linear surrogate that is the advantage.
            adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(per_token_logps)
            advantages = adv * inputs["importance_sampling_ratio"]
        batch = TokenBatch(
            log_prob=per_token_logps,
            old_log_prob=old,
            advantages=advantages,
            mask=mask,
            logits=logits,
            entropy=entropies,
            old_entropy=entropies.detach() if entropies is not None else None,
            ref_log_prob=inputs.get("ref_per_token_logps"),
            rewards=inputs.get("rewards"),
            group_reward=inputs.get("group_reward"),
        )
        out = self.method.compute_loss(batch, step=self.state.global_step)
        if (self.diagnostics_every and mode == "train" and self._probe_inputs is None
                and self.state.global_step % self.diagnostics_every == 0):
            self._arm_probe(model, batch, input_ids, attention_mask, completion_ids, logits_to_keep)
        loss = self._normalize(out.loss, mask, inputs, mode)

        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            kl = torch.where(mask, kl, torch.zeros_like(kl))
            loss = loss + self.beta * self._normalize((kl.sum() / mask.sum().clamp(min=1)), mask, inputs, mode)
            self._metrics[mode]["kl"].append(self.accelerator.gather(
                (kl.sum() / mask.sum().clamp(min=1)).detach()).mean().item())

        for k, v in out.metrics.items():
            val = v.detach().float().mean() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self._metrics[mode][k].append(self.accelerator.gather(val.to(self.accelerator.device)).mean().item())
        ent = torch.where(mask, entropies.detach(), torch.zeros_like(entropies)).sum() / mask.sum().clamp(min=1)
        self._metrics[mode]["entropy"].append(self.accelerator.gather(ent).mean().item())
        return loss

    @torch.no_grad()
    def _arm_probe(self, model, batch, input_ids, attention_mask, completion_ids, logits_to_keep):
        logits = self._full_logits(model, input_ids, attention_mask, logits_to_keep).float()
        terms = self.method.pg_terms(batch)
        coef = terms.coef(batch.token_advantages())
        self._probe.before(logits, completion_ids, coef, batch.mask, batch.token_advantages(),
                           step=self.state.global_step)
        self._probe_inputs = (input_ids, attention_mask, logits_to_keep)

    @torch.no_grad()
    def _finish_probe(self) -> None:
        if self._probe_inputs is None:
            return
        input_ids, attention_mask, logits_to_keep = self._probe_inputs
        self._probe_inputs = None
        logits = self._full_logits(self.model, input_ids, attention_mask, logits_to_keep).float()
        rec = self._probe.after(logits)
        self.entropy_change_records.append(rec)
        for k, v in rec.report.items():
            if not k.startswith("count/"):
                self._metrics["train"][f"entropy_change/{k}"].append(v)
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "entropy_change.jsonl"), "a") as f:
                f.write(json.dumps(rec.to_json()) + "\n")

    def _normalize(self, loss, mask, inputs, mode):
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.method.config.loss_agg_mode == "token-mean":
            # token-mean over this micro-batch -> TRL "dapo": token sum / tokens of the whole window.
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * ga / self.args.steps_per_generation
            return loss * mask.sum().clamp(min=1) / normalizer
        return loss / ga

    # ------------------------------------------------------------------------- controller checkpointing
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({"method": self.method.name, "state": _to_jsonable(self.method.state_dict())}, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            path = os.path.join(checkpoint, STATE_FILE)
            if os.path.exists(path):
                with open(path) as f:
                    saved = json.load(f)
                if saved.get("method") != self.method.name:
                    raise ValueError(f"checkpoint {checkpoint} holds state of method {saved.get('method')!r}, "
                                     f"not {self.method.name!r}")
                self.method.load_state_dict(saved["state"])


class _ProbeCallback(TrainerCallback):
    """Finishes an armed entropy-change probe right after the optimizer step."""

    def __init__(self, trainer: EntropyGRPOTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._finish_probe()
        return control
