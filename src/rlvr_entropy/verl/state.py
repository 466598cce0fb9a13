"""Who owns rlvr-entropy's state under verl: one :class:`EngineState` per verl training engine.

verl 0.9.1 never tells a loss which optimizer step it is in, which process group it spans or when a checkpoint is
written, but its FSDP engine does all three, so the state lives on the engine: ``engine.rlvr_entropy_state``, created
by the hooks of :mod:`rlvr_entropy.verl.hooks` and reached by the losses through the step context those hooks set
(two engines in one process, e.g. an actor and a second actor in a test, never share anything). It holds

* ``methods``: the live method instances of this engine by name (their controllers are the state to keep), each
  with ``Method.set_collective(TorchCollective(dp_group))`` over the engine's data-parallel group, so every
  controller input and every "global" statistic spans the DP group and every rank holds the same state;
* ``step``: optimizer steps closed so far, the ``step`` handed to ``Method.compute_loss``;
* :meth:`EngineState.end_step`: called once per optimizer step on every rank by the hook on
  ``FSDPEngine.optimizer_step`` (the one place verl 0.9.1's ``BaseEngine.train_batch`` updates the weights); it
  reduces what the controllers observed over the DP group and updates them. The hook on
  ``TrainingWorker.train_mini_batch`` (one rollout batch: mini-batches x ``ppo_epochs``) tells it how many
  optimizer steps make one pass over the rollout, so a per-rollout measurement (SIREN's anchor) spans them all.

Checkpoints (hooks on ``FSDPEngine.save_checkpoint`` / ``load_checkpoint``, which ``TrainingWorker`` and the v1
trainer call): one file ``local_path/rlvr_entropy_state.pt`` per checkpoint, the same for every rank and every world
size. On save the ranks first check that they hold the same state (one all-gather of a fingerprint; a difference is
a bug and raises), then global rank 0 writes the file. On load global rank 0 reads it and broadcasts it, so a resume
works on any world size and without a shared file system for that file. An engine that never ran an rlvr-entropy
loss (critic, reference model) writes nothing.

Resuming from a checkpoint without the file: the first method with controller state built afterwards raises a
ValueError (its controllers would start fresh in the middle of a run: SIREN would re-measure its anchor on the
trained policy), unless ``policy_loss.missing_state=fresh`` says to start them fresh (a warning). A file from the
older per-rank format (``rlvr_entropy_state_rank{r}.pt``) is read from rank 0's copy, with a warning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
from typing import Any

import torch

from rlvr_entropy.core.dist import Collective, LocalCollective, TorchCollective
from rlvr_entropy.core.validation import check_choice
from rlvr_entropy.methods.base import Method, get_method_class
from rlvr_entropy.verl.config import MISSING_STATE

_log = logging.getLogger(__name__)

FILE = "rlvr_entropy_state.pt"
LEGACY_FILE = "rlvr_entropy_state_rank{rank}.pt"
FORMAT = "rlvr_entropy.verl/1"
#: Attribute of a verl engine holding its EngineState.
ATTR = "rlvr_entropy_state"


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _ranks(group: Any) -> list[int]:
    return list(torch.distributed.get_process_group_ranks(group or torch.distributed.group.WORLD))


def method_config(name: str, actor_config: Any):
    """The Config of method ``name`` from verl's actor config: PG fields from the actor, the rest from
    ``policy_loss.method_config`` (when policy_loss names this method)."""
    from rlvr_entropy.verl.config import method_from_loss_mode, validate_method_config
    from rlvr_entropy.verl.loss import pg_fields

    pl = actor_config.get("policy_loss", None) or {}
    own = pl.get("method", "") or method_from_loss_mode(pl.get("loss_mode", ""))
    cfg = validate_method_config(name, pl.get("method_config", {}) if own == name else {})
    cls = get_method_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    pg = {k: v for k, v in pg_fields(actor_config).items() if k in fields}
    if name in ("clip_cov", "kl_cov"):  # verl's own clip_cov / kl_cov ignore clip_ratio_c: match them
        pg["dual_clip"] = None
    return cls.Config(**pg, **cfg)


def missing_state_policy(actor_config: Any) -> str:
    pl = actor_config.get("policy_loss", None) or {}
    value = pl.get("missing_state", "raise") if hasattr(pl, "get") else "raise"
    check_choice("policy_loss.missing_state", value, MISSING_STATE)
    return value


class EngineState:
    """rlvr-entropy's state for one verl engine (see the module docstring).

    Args:
        group: the data-parallel process group (verl's ``engine.get_data_parallel_group()``); None: the default
            group when torch.distributed is initialized, else this process alone.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.methods: dict[str, Method] = {}
        self.step = 0
        self._dist: Collective | None = None
        self._open: set[str] = set()            # methods that observed in the step not closed yet
        self._restored: dict[str, Any] | None = None  # methods' state read from a checkpoint, for methods not built
        self._resumed_from: str | None = None   # checkpoint resumed from, when it had no state file
        self._pass_steps: int | None = None     # optimizer steps per pass over the rollout being trained on
        self._pass_done = 0                     # optimizer steps of that rollout closed so far
        self.warned: set[str] = set()           # one-time warnings already given for this engine

    # ----------------------------------------------------------------------------------------- methods
    @property
    def dist(self) -> Collective:
        """The collective every method of this engine uses: ``TorchCollective(group)``, or this process only."""
        if self._dist is None:
            self._dist = TorchCollective(self.group) if _dist_ready() else LocalCollective()
        return self._dist

    def check_group(self, dp_group: Any) -> None:
        """Raise when ``dp_group`` (what verl passed the loss) is not this engine's group."""
        if dp_group is None or not _dist_ready():
            return
        if _ranks(dp_group) != _ranks(self.group):
            raise ValueError(f"dp_group: the loss was called with process group ranks {_ranks(dp_group)}, but this "
                             f"engine's data-parallel group has ranks {_ranks(self.group)}")

    def method(self, name: str, actor_config: Any) -> Method:
        """The method instance ``name`` configured from verl's ``actor_config``, built on first use (its state
        restored from the checkpoint this engine resumed from); the state survives a config rebuild."""
        config = method_config(name, actor_config)
        m = self.methods.get(name)
        if m is not None and m.config == config:
            return m
        new = get_method_class(name)(config)
        new.set_collective(self.dist)
        if m is not None:
            new.load_state_dict(m.state_dict())
            if name in self._open:
                new._open = True
        else:
            self._restore(name, new, missing_state_policy(actor_config))
        self.methods[name] = new
        return new

    def _restore(self, name: str, m: Method, policy: str) -> None:
        if self._restored is not None and name in self._restored:
            m.load_state_dict(self._restored.pop(name))
            return
        if not m.controllers():
            return
        if self._resumed_from is not None:
            msg = (f"rlvr-entropy method {name!r}: resumed from the checkpoint {self._resumed_from}, which holds no "
                   f"controller state ({FILE}); its controllers would start fresh in the middle of the run")
            if policy == "raise":
                raise ValueError(msg + "; set actor_rollout_ref.actor.policy_loss.missing_state=fresh to accept that")
            _log.warning("%s (policy_loss.missing_state=fresh)", msg)
        elif self._restored is not None and self.step > 0:
            _log.warning("rlvr-entropy method %r: the checkpoint's controller state has no entry for it (a different "
                         "method?); its controllers start fresh", name)

    def observed(self, name: str) -> None:
        """Mark that method ``name`` observed during the current step (the loss calls this)."""
        self._open.add(name)

    def begin_rollout(self, steps_per_pass: int | None) -> None:
        """A rollout batch is about to be trained on in ``steps_per_pass`` optimizer steps per pass (verl's
        mini-batches per epoch; the hook on ``TrainingWorker.train_mini_batch`` calls it); None: unknown, every
        optimizer step counts as a whole rollout."""
        if steps_per_pass is not None and (not isinstance(steps_per_pass, int) or steps_per_pass < 1):
            raise ValueError(f"steps_per_pass must be a positive int or None, got {steps_per_pass!r}")
        self._pass_steps, self._pass_done = steps_per_pass, 0

    def end_rollout(self) -> None:
        self._pass_steps, self._pass_done = None, 0

    def end_step(self) -> None:
        """Close one optimizer step, on every rank: ``Method.end_step(rollout_end=...)`` of every method that
        observed in it (in name order, the same on every rank: each is one collective), then ``step += 1``.
        ``rollout_end`` is True at the step that completes a pass over the rollout (every ``steps_per_pass``-th
        step of :meth:`begin_rollout`; every step outside one), so SIREN's anchor spans the whole first rollout."""
        self._pass_done += 1
        rollout_end = self._pass_steps is None or self._pass_done % self._pass_steps == 0
        for name in sorted(self._open):
            self.methods[name].end_step(rollout_end=rollout_end)
        self._open.clear()
        self.step += 1

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        methods = {n: m.state_dict() for n, m in sorted(self.methods.items())}
        for n, s in (self._restored or {}).items():  # restored but not built yet: keep it for the next checkpoint
            methods.setdefault(n, s)
        return {"format": FORMAT, "step": self.step, "methods": methods}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"state: not an rlvr-entropy verl state (format {FORMAT!r}); got "
                             f"{type(state).__name__} with format {getattr(state, 'get', lambda k: None)('format')!r}")
        self.step = int(state["step"])
        pending = dict(state["methods"])
        for name, m in self.methods.items():
            if name in pending:
                m.load_state_dict(pending.pop(name))
        self._restored = pending
        self._open.clear()
        self._resumed_from = None

    def fingerprint(self) -> str:
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        return hashlib.sha256(buf.getvalue()).hexdigest()

    def has_state(self) -> bool:
        """True once a method was built on this engine or a state was restored (then a checkpoint holds a file)."""
        return bool(self.methods) or self._restored is not None

    # -------------------------------------------------------------------------------------- checkpoints
    def save(self, local_path: str) -> str | None:
        """Write ``local_path/rlvr_entropy_state.pt`` once (global rank 0), after checking every rank holds the same
        state; every rank of the engine must call it. Returns the path (None when there is nothing to save)."""
        if not self.has_state():
            return None
        path = os.path.join(local_path, FILE)
        if _dist_ready() and torch.distributed.get_world_size() > 1:
            prints: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(prints, self.fingerprint())
            if len(set(prints)) != 1:
                bad = [r for r, p in enumerate(prints) if p != prints[0]]
                raise RuntimeError(f"rlvr-entropy: controller state differs across ranks (ranks {bad} differ from "
                                   "rank 0); refusing to write a checkpoint that would hide it")
            rank = torch.distributed.get_rank()
        else:
            rank = 0
        if rank == 0:
            os.makedirs(local_path, exist_ok=True)
            tmp = path + ".tmp"
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        if _dist_ready() and torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
        return path

    def load(self, local_path: str) -> bool:
        """Restore from ``local_path`` (global rank 0 reads, every rank receives the same state); every rank of the
        engine must call it. False when the checkpoint has no state file (see the module docstring)."""
        multi = _dist_ready() and torch.distributed.get_world_size() > 1
        rank = torch.distributed.get_rank() if multi else 0
        obj: list[Any] = [None]
        if rank == 0:
            obj[0] = _read(local_path)
        if multi:
            torch.distributed.broadcast_object_list(obj, src=0)
        if obj[0] is None:
            # methods built before the load keep their state; the policy applies to the ones built from now on
            self._resumed_from, self._restored = local_path, None
            _log.warning("rlvr-entropy: the checkpoint %s has no controller state (%s)", local_path, FILE)
            return False
        self.load_state_dict(obj[0])
        return True


def _read(local_path: str) -> dict[str, Any] | None:
    path = os.path.join(local_path, FILE)
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    legacy = os.path.join(local_path, LEGACY_FILE.format(rank=0))
    if os.path.exists(legacy):
        old = torch.load(legacy, weights_only=False)
        _log.warning("rlvr-entropy: %s is the older per-rank format; every rank now restores rank 0's copy", legacy)
        return {"format": FORMAT, "step": int(old.get("step", {}).get("step", 0)), "methods": dict(old["methods"])}
    return None


def state_of(engine: Any) -> EngineState:
    """The EngineState of a verl engine (created on first use with the engine's data-parallel group)."""
    st = getattr(engine, ATTR, None)
    if st is None:
        group = engine.get_data_parallel_group() if _dist_ready() else None
        st = EngineState(group)
        setattr(engine, ATTR, st)
    return st


__all__ = ["EngineState", "state_of", "method_config", "missing_state_policy", "FILE", "ATTR", "MISSING_STATE"]
