"""The hooks on verl's FSDP engine, the step context they set, and configuration checks.

:func:`install_engine_hooks` (the plugin arranges it on ``import verl``: right after the engine module is first
imported, so that the plugin does not resolve verl's platform early) patches four methods of
``verl.workers.engine.fsdp.transformer_impl``, the engine verl 0.9.1's default trainer and its
``engine_workers.TrainingWorker`` use (``BaseEngine.train_batch`` = zero_grad, ``forward_backward_batch`` over the
micro-batches, ``optimizer_step``):

* ``FSDPEngineWithLMHead.forward_step`` runs inside a :class:`StepContext`: the engine's
  :class:`~rlvr_entropy.verl.state.EngineState` (the owner of every method instance and its controllers) and
  ``observe = not forward_only``. Both loss paths (``entropy_ppo_loss`` and the registered ``rle_<name>`` losses
  called by verl's own ``ppo_loss``) find their method there; outside a context they raise.
* ``FSDPEngine.optimizer_step``: after verl's optimizer step, ``EngineState.end_step()`` closes the step on every
  rank (controllers update once per optimizer step: several mini-batches, ``ppo_epochs`` > 1 and equal token
  counts are all counted exactly).
* ``FSDPEngine.save_checkpoint`` / ``load_checkpoint``: one controller-state file per checkpoint
  (:mod:`rlvr_entropy.verl.state`).
* ``engine_workers.TrainingWorker.train_mini_batch`` (:func:`install_worker_hooks`, patched once that module is
  imported): one call trains on one rollout batch (mini-batches x ``ppo_epochs``); it tells the EngineState how
  many optimizer steps make one pass over the rollout, and ``end_step`` passes ``rollout_end`` on to the methods
  (SIREN's anchor is measured over every mini-batch of the first rollout, not the first mini-batch's step only);
  a method with ``begin_step`` (entrocraft) gets the whole rollout first (:func:`begin_method_step`), so it decides
  each step with that step's own entropy, as its official trainer; and the rollout gets ``group_reward`` (each
  response's group mean reward over the whole DP group, :func:`attach_group_reward`: the thermostat's reach).
* The distribution: methods that read more than log-prob and entropy (SIREN's top-p entropy, Lp-Reg's min-p proxy,
  AEnt's clamped entropy) get a :class:`~rlvr_entropy.kernels.LMHeadSource`, never logits. During forward
  steps whose loss is ``entropy_ppo_loss`` with such a method, the hooked ``forward_step`` records the backbone's
  last hidden state (:func:`rlvr_entropy.kernels.hf.capture_backbone_hidden`: a reference, [1, nnz(+pad), H] with
  remove-padding, no copy) and the engine's module; ``entropy_ppo_loss`` slices the response positions out
  ([B, T_resp, H]) and builds the source on the module's LM-head weight (an FSDP2 shard is gathered for the loss,
  its gradient reduce-scattered and averaged as FSDP averages the rest: one [V, H] weight more while the loss
  lives, as TRL's fused head gathers a ZeRO-3 head). The method's statistics are then computed tile by tile (no
  [N, V] tensor), with ``use_fused_kernels=True`` (verl's fused log-prob/entropy kernel, no logits anywhere) or
  False (verl's own logits; ours adds no copy of them). The source's log-prob is compared with verl's at every
  call: a model whose backbone output is not its LM head's input, or that post-processes its logits, raises.

Requirements for the distribution, checked with clear errors: ``use_remove_padding=True`` and Ulysses sequence
parallel size 1 (the captured tensor must hold whole sequences), one sampling temperature per micro-batch. Entropy:
verl computes it in ``prepare_model_outputs`` (with gradient) when the micro-batch carries ``calculate_entropy``
(from ``actor.calculate_entropy``); the source serves it otherwise. Megatron / veomni / automodel engines are not
hooked: an rlvr-entropy loss called by them raises instead of keeping per-rank, per-call state.
"""
from __future__ import annotations

import contextvars
import functools
import hashlib
import importlib.abc
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from rlvr_entropy.core.batch import TokenBatch
from rlvr_entropy.methods.base import get_method_class

def needs_logits(name: str, method_config: dict[str, Any] | None = None) -> bool:
    return "logits" in get_method_class(name)(**(method_config or {})).needs


def needs_entropy(name: str, method_config: dict[str, Any] | None = None) -> bool:
    """True when the method (default config, or ``method_config``) cannot run on log-probs (and reference log-probs)
    alone (probed on a 1x2 batch)."""
    if needs_logits(name, method_config):
        return False
    m = get_method_class(name)(**(method_config or {}))
    if "rewards" in m.needs:
        return False
    lp = torch.tensor([[-1.0, -2.0]])
    b = TokenBatch(log_prob=lp, old_log_prob=lp, advantages=torch.tensor([1.0]), mask=torch.ones(1, 2, dtype=bool),
                   ref_log_prob=lp)
    try:
        m.compute_loss(b)
    except ValueError as e:
        return "entropy" in str(e)
    return False


# ------------------------------------------------------------------------------------ step context
class StepContext:
    """What one forward step of a hooked engine tells the loss: the engine's state, whether the step trains
    (``observe``: False for forward-only passes, which never change controller state) and, when the loss reads the
    distribution, the engine's module and the backbone hidden state its forward produced (``hidden["hidden"]``,
    recorded during the step). Set by the hooked ``forward_step`` for the duration of the call only."""

    def __init__(self, state: Any, observe: bool, module: Any = None) -> None:
        self.state = state
        self.observe = observe
        self.module = module
        self.hidden: dict[str, torch.Tensor] = {}


_ACTIVE: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("rlvr_entropy_verl_step", default=None)


def current() -> StepContext | None:
    """The step context of the engine forward step running now (None outside one)."""
    return _ACTIVE.get()


@contextmanager
def step_context(state: Any, *, observe: bool, module: Any = None) -> Iterator[StepContext]:
    """Run a forward step with ``state`` (an :class:`~rlvr_entropy.verl.state.EngineState`) as the losses' owner;
    what the hooked engine does around each ``forward_step``, and what a driver or a test without an engine uses.

    ``module``: the engine's model (a Hugging Face causal LM, possibly FSDP-wrapped), given when the loss reads the
    distribution: while the context is active every forward of its backbone records its last hidden state in
    ``ctx.hidden`` (a reference, with its graph), for :func:`response_lm_head`."""
    if not isinstance(observe, bool):
        raise ValueError(f"observe must be a bool, got {observe!r}")
    ctx = StepContext(state, observe, module)
    token = _ACTIVE.set(ctx)
    try:
        if module is None:
            yield ctx
        else:
            from rlvr_entropy.kernels.hf import capture_backbone_hidden

            with capture_backbone_hidden(module) as seen:
                ctx.hidden = seen
                yield ctx
    finally:
        ctx.hidden = {}
        _ACTIVE.reset(token)


def rle_loss_config(loss_function: Any) -> tuple[str, Any] | None:
    """(method name, actor config) when ``loss_function`` is ``entropy_ppo_loss`` or verl's ``ppo_loss`` bound
    (functools.partial, as verl's workers bind it) to an actor config with an ``rle_<name>`` loss mode."""
    if not isinstance(loss_function, functools.partial):
        return None
    config = loss_function.keywords.get("config")
    if config is None or not hasattr(config, "get"):
        return None
    from rlvr_entropy.verl.config import method_from_loss_mode

    pl = config.get("policy_loss", None)
    name = method_from_loss_mode(pl.get("loss_mode", "")) if pl is not None else None
    return None if name is None else (name, config)


def reads_distribution(loss_function: Any, state: Any = None) -> bool:
    """True for a forward step whose loss is ``entropy_ppo_loss`` bound to a method that reads the distribution
    beyond log-prob and entropy (training, or a forward-only pass that computes the loss: ``infer_batch`` with
    ``compute_loss``)."""
    if loss_function is None:
        return False
    from rlvr_entropy.verl.loss import entropy_ppo_loss

    found = rle_loss_config(loss_function)
    if found is None or loss_function.func is not entropy_ppo_loss:
        return False
    from rlvr_entropy.verl.state import EngineState

    name, config = found
    # instance-level needs (entropy_bonus needs the distribution only with clamping)
    return "logits" in (state if state is not None else EngineState()).method(name, config).needs


# ------------------------------------------------------------------------------------------ engine hooks
def install_engine_hooks() -> bool:
    """Patch verl's FSDP engine classes (idempotent); False when they cannot be imported here.

    * ``FSDPEngineWithLMHead.forward_step``: runs inside a :func:`step_context` with the engine's
      :class:`~rlvr_entropy.verl.state.EngineState` (``observe = not forward_only``), recording the backbone's
      hidden state when the loss is ``entropy_ppo_loss`` with a method that reads the distribution;
    * ``FSDPEngine.optimizer_step``: closes the step (``EngineState.end_step``) after verl's optimizer step, on
      every rank;
    * ``FSDPEngine.save_checkpoint`` / ``load_checkpoint``: write / restore the engine's controller state.
    """
    try:
        from verl.workers.engine.fsdp import transformer_impl as ti
    except Exception:  # pragma: no cover
        return False
    from rlvr_entropy.verl.state import state_of

    def hook(cls: Any, name: str, make: Any) -> None:
        fn = cls.__dict__.get(name)
        if fn is None:  # pragma: no cover  (another verl version)
            raise RuntimeError(f"rlvr-entropy: {cls.__name__}.{name} is not defined where verl 0.9.1 defines it; "
                               "this verl version is not supported by the engine hooks")
        if getattr(fn, "_rlvr_entropy", False):
            return
        new = functools.wraps(fn)(make(fn))
        new._rlvr_entropy = True
        setattr(cls, name, new)

    def forward_step(orig):
        def forward_step(self, micro_batch, loss_function, forward_only):
            st = state_of(self)
            module = self.module if reads_distribution(loss_function, st) else None
            with step_context(st, observe=not forward_only, module=module):
                return orig(self, micro_batch, loss_function, forward_only)
        return forward_step

    def optimizer_step(orig):
        def optimizer_step(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            state_of(self).end_step()
            return out
        return optimizer_step

    def save_checkpoint(orig):
        def save_checkpoint(self, local_path, *args, **kwargs):
            out = orig(self, local_path, *args, **kwargs)
            if local_path is not None:
                state_of(self).save(local_path)
            return out
        return save_checkpoint

    def load_checkpoint(orig):
        def load_checkpoint(self, local_path, *args, **kwargs):
            out = orig(self, local_path, *args, **kwargs)
            if local_path is not None:
                state_of(self).load(local_path)
            return out
        return load_checkpoint

    hook(ti.FSDPEngineWithLMHead, "forward_step", forward_step)
    hook(ti.FSDPEngine, "optimizer_step", optimizer_step)
    hook(ti.FSDPEngine, "save_checkpoint", save_checkpoint)
    hook(ti.FSDPEngine, "load_checkpoint", load_checkpoint)
    workers = sys.modules.get(WORKER_MODULE)
    if workers is not None and hasattr(workers, "TrainingWorker"):  # else the after-import finder installs it
        install_worker_hooks()
    return True


def _steps_per_pass(worker: Any, data: Any) -> int | None:
    """Optimizer steps per pass over ``data`` in ``TrainingWorker.train_mini_batch`` (its mini-batches per epoch,
    computed as verl computes them), or None when ``data`` does not say."""
    try:
        from tensordict import TensorDict
        from verl.utils import tensordict_utils as tu
    except Exception:  # pragma: no cover
        return None
    if not isinstance(data, TensorDict):
        return None
    size, count = tu.get(data, "mini_batch_size", default=None), tu.get(data, "num_mini_batch", default=None)
    rows = int(data.shape[0])
    if size is not None:
        per_rank = int(size) // int(worker.engine.get_data_parallel_size())
    elif count is not None:
        per_rank = rows // int(count)
    else:
        return None
    return rows // per_rank if per_rank > 0 and rows % per_rank == 0 else None


def begin_method_step(worker: Any, state: Any, data: Any) -> Any:
    """``method.begin_step(rollout)`` for a method that decides each step from its own rollout (entrocraft), at the
    start of ``TrainingWorker.train_mini_batch`` on every rank, before any of the rollout's mini-batches: the
    method named by the worker's loss (``partial(ppo_loss, config=actor_config)``, as verl's ``init_model`` binds
    it) gets this rank's whole rollout share: the response mask and the old policy's entropy (what ``begin_step``
    reads; verl 0.9.1's v1 trainer stores it as ``entropy``); its collective spans the engine's DP group. Returns what ``begin_step`` returned (None when nothing was called).

    Without the old entropy in the batch (the legacy ``RayPPOTrainer`` pops its ``entropys`` before the update) the
    method cannot decide with its own step's entropy: a warning says so once per engine, and the method falls back
    to its documented lag (it decides from the previous step's micro-batches)."""
    from rlvr_entropy.methods.base import decides_from_rollout
    from rlvr_entropy.verl.config import method_from_loss_mode
    from rlvr_entropy.verl.loss import OLD_ENTROPY_KEYS, old_entropy_key

    config = getattr(getattr(worker, "loss_fn", None), "keywords", {}).get("config")
    pl = getattr(config, "policy_loss", None) if config is not None else None
    name = method_from_loss_mode(pl.get("loss_mode", "vanilla")) if pl is not None else None
    if name is None or not decides_from_rollout(get_method_class(name)):
        return None
    old = old_entropy_key(data.keys(), f"rlvr-entropy method {name!r}")
    if old is None:
        if "no_old_entropy" not in state.warned:  # once per engine
            state.warned.add("no_old_entropy")
            import logging

            logging.getLogger(__name__).warning(
                "rlvr-entropy method %r decides each step from its rollout's entropy, but the batch given to "
                "update_actor carries no old-policy entropy (one of %s; verl's legacy RayPPOTrainer drops its "
                "'entropys'): it decides from the previous step's micro-batches instead (one step of lag)",
                name, list(OLD_ENTROPY_KEYS))
        return None
    pd = data.select("response_mask", old).to_padded_tensor()
    mask = pd["response_mask"].to(torch.bool)
    zero = torch.zeros(mask.shape, dtype=torch.float32)  # begin_step reads the entropy and the mask only
    method = state.method(name, config)
    return method.begin_step(TokenBatch(log_prob=zero, old_log_prob=zero, advantages=zero[:, 0], mask=mask,
                                        old_entropy=pd[old]))


def _uid_key(uid: Any) -> int:
    """A stable int64 for a verl ``uid`` (a prompt's id, shared by its ``rollout.n`` responses; any string)."""
    return int.from_bytes(hashlib.blake2b(str(uid).encode(), digest_size=8).digest(), "little", signed=True)


def group_mean(keys: torch.Tensor, values: torch.Tensor, dist: Any) -> torch.Tensor:
    """Each row's group mean of ``values`` over every rank of ``dist`` (a :class:`~rlvr_entropy.core.dist.Collective`):
    keys int64 [B] (the group of each row; a group may span ranks), values [B] -> [B] float64."""
    if keys.shape != values.shape or keys.dim() != 1:
        raise ValueError(f"keys and values must both be [B], got {tuple(keys.shape)} and {tuple(values.shape)}")
    all_keys = dist.all_gather(keys.to(torch.int64))
    all_values = dist.all_gather(values.detach().to(torch.float64))
    uniq, inv = torch.unique(all_keys, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, all_values)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(all_values))
    return (sums / counts)[torch.searchsorted(uniq, keys.to(torch.int64))]


def attach_group_reward(state: Any, data: Any) -> bool:
    """``data["group_reward"]`` [B]: each response's group mean reward, the group being its ``uid`` (what verl's
    GRPO advantage groups by) over the whole DP group (``balance_batch`` spreads a group over ranks), the reward
    its row sum of ``token_level_scores``. Run on every rank at the start of ``TrainingWorker.train_mini_batch``,
    before the rollout is split into mini-batches, so each mini-batch carries its rows' values. Returns False (and
    leaves ``data`` alone) when the batch already has ``group_reward`` or lacks ``uid`` / ``token_level_scores``;
    a method that needs it then raises in the loss, naming it."""
    keys = set(data.keys())
    if "group_reward" in keys or not {"uid", "token_level_scores", "response_mask"} <= keys:
        return False
    uids = data["uid"]
    uids = uids.tolist() if hasattr(uids, "tolist") else list(uids)
    pd = data.select("token_level_scores", "response_mask").to_padded_tensor()
    mask = pd["response_mask"].to(torch.bool)
    rewards = torch.where(mask, pd["token_level_scores"], 0).sum(-1)  # [B], as the loss reads the rewards
    if len(uids) != rewards.shape[0]:
        raise ValueError(f"uid: {len(uids)} entries for {rewards.shape[0]} responses")
    keys_t = torch.tensor([_uid_key(u) for u in uids], dtype=torch.int64)
    data["group_reward"] = group_mean(keys_t, rewards, state.dist).to(torch.float32)
    return True


def install_worker_hooks() -> bool:
    """Patch verl's ``TrainingWorker.train_mini_batch`` (idempotent; False when it cannot be imported here): one
    call trains on one rollout batch, split into mini-batches (one optimizer step each) for ``ppo_epochs``; the
    engine's :class:`~rlvr_entropy.verl.state.EngineState` learns how many optimizer steps make one pass over it,
    so ``end_step`` can tell methods where the first pass over the rollout ends (SIREN's anchor spans it)."""
    try:
        from verl.workers import engine_workers as ew
    except Exception:  # pragma: no cover
        return False
    from rlvr_entropy.verl.state import state_of

    fn = ew.TrainingWorker.__dict__.get("train_mini_batch")
    if fn is None:  # pragma: no cover  (another verl version)
        raise RuntimeError("rlvr-entropy: TrainingWorker.train_mini_batch is not defined where verl 0.9.1 defines "
                           "it; this verl version is not supported by the engine hooks")
    if getattr(fn, "_rlvr_entropy", False):
        return True

    @functools.wraps(fn)
    def train_mini_batch(self, *args, **kwargs):
        data = kwargs["data"] if "data" in kwargs else (args[0] if args else None)
        st = state_of(self.engine)
        st.begin_rollout(_steps_per_pass(self, data))
        if data is not None and hasattr(data, "keys"):
            attach_group_reward(st, data)
        begin_method_step(self, st, data)
        try:
            return fn(self, *args, **kwargs)
        finally:
            st.end_rollout()

    train_mini_batch._rlvr_entropy = True  # type: ignore[attr-defined]
    ew.TrainingWorker.train_mini_batch = train_mini_batch
    return True


ENGINE_MODULE = "verl.workers.engine.fsdp.transformer_impl"
WORKER_MODULE = "verl.workers.engine_workers"


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then ``after(module)``."""

    def __init__(self, loader: Any, after: Any) -> None:
        self.loader, self.after = loader, after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.after(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ...: the real loader's
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Meta-path finder that calls ``after(module)`` once module ``name`` has been executed."""

    def __init__(self, name: str, after: Any) -> None:
        self.name, self.after = name, after

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, self.after)
                return spec
        return None


def install_engine_hooks_on_import() -> bool:
    """Install the engine hooks now if verl's FSDP engine module is already imported, else right after it is.

    What the plugin does on ``import verl``: importing the engine module resolves verl's platform
    (``transformer_impl.device_name = get_device_name()``), so importing it from the plugin would fix the platform
    before a user or another plugin registers theirs (e.g. a CPU platform). True when installed now."""
    if WORKER_MODULE in sys.modules:
        install_worker_hooks()
    elif not any(isinstance(f, _AfterImport) and f.name == WORKER_MODULE for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(WORKER_MODULE, lambda module: install_worker_hooks()))
    if ENGINE_MODULE in sys.modules:
        return install_engine_hooks()
    if not any(isinstance(f, _AfterImport) and f.name == ENGINE_MODULE for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(ENGINE_MODULE, lambda module: install_engine_hooks()))
    return False


def response_lm_head(data: Any, name: str, token_ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """An :class:`~rlvr_entropy.kernels.LMHeadSource` of the response positions of a verl micro-batch ([B, T_resp]
    like ``token_ids`` / ``mask``), from the hidden state the active step context recorded ([1, nnz(+pad), H],
    remove-padding layout, position j predicting token j + 1: sliced as verl slices its logits) and the context's
    module's LM head, at the micro-batch's sampling temperature (the model's logit scale folded in)."""
    ctx = current()
    hidden = None if ctx is None else ctx.hidden.get("hidden")
    if hidden is None:
        raise ValueError(f"rlvr-entropy method {name!r} reads the next-token distribution, but no hidden state was "
                         "recorded for this step: use verl's FSDP engine with the hooks installed "
                         "(RLVR_ENTROPY_VERL_LOSS=1 or rlvr_entropy.verl.loss.install_loss()) and "
                         "actor_rollout_ref.model.use_remove_padding=True")
    if hidden.dim() == 3 and hidden.shape[0] == 1:
        hidden = hidden[0]
    if hidden.dim() != 2:
        raise ValueError(f"rlvr-entropy method {name!r}: recorded hidden state of shape {list(hidden.shape)}; only "
                         "actor_rollout_ref.model.use_remove_padding=True is supported")
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    from rlvr_entropy.kernels import LMHeadSource
    from rlvr_entropy.kernels.hf import lm_head_params

    prompts, responses = data["prompts"], data["responses"]
    if prompts.is_nested:
        total = int(prompts.offsets().diff().sum() + responses.offsets().diff().sum())
    else:
        total = int(data["attention_mask"].sum())
    if hidden.shape[0] < total:
        raise ValueError(f"rlvr-entropy method {name!r}: the recorded hidden state holds {hidden.shape[0]} positions "
                         f"for {total} tokens (Ulysses sequence parallel?); set ulysses_sequence_parallel_size=1")
    h = no_padding_2_padding(hidden[:total], data)  # [B, T_resp, H]
    temperature = tu.get(data, "temperature", default=1.0)
    if isinstance(temperature, torch.Tensor):
        t = temperature.detach().float().reshape(-1)
        if t.numel() == 0 or not bool((t == t[0]).all()):
            raise ValueError(f"rlvr-entropy method {name!r}: per-sample temperatures are not supported (the tiled LM "
                             "head takes one temperature per micro-batch)")
        temperature = float(t[0])
    weight, bias, scale = lm_head_params(ctx.module)
    weight, bias = _gathered(weight), (None if bias is None else _gathered(bias))
    return LMHeadSource(h, weight, bias, token_ids=token_ids, mask=mask, temperature=float(temperature) / scale)


def _gathered(p: torch.Tensor) -> torch.Tensor:
    """An FSDP2 parameter at loss time: the DTensor shard (the engine reshards every unit, the root included, after
    its forward when ``reshard_after_forward``) gathered into the full tensor, differentiably: its gradient is
    reduce-scattered back onto the shards and averaged over the mesh, as FSDP averages the rest of the parameter's
    gradient (it accumulates into the shard's ``.grad``). A plain tensor (FSDP1's root, no FSDP) is returned as is."""
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(p, DTensor):
        return p
    mesh = p.device_mesh
    full = p.full_tensor(grad_placements=[Partial()] * mesh.ndim)
    if full.requires_grad:
        n = mesh.size()
        full.register_hook(lambda g: g / n)
    return full


def check_verl_config(name: str, actor_config: Any, model_config: Any = None, algorithm_config: Any = None) -> None:
    """Raise ValueError when verl, configured this way, cannot deliver what method ``name`` needs (with the
    ``policy_loss.method_config`` of ``actor_config`` when its ``policy_loss.method`` is ``name``).

    ``model_config``: ``actor_rollout_ref.model``; ``algorithm_config``: verl's ``algorithm`` section, read for
    ``use_kl_in_reward`` (pass it when that option provides the reference log-probs: without it only
    ``actor.use_kl_loss`` counts)."""
    mc = model_config or {}
    pl = actor_config.get("policy_loss", None) or {}
    mcfg = dict(pl.get("method_config", {}) or {}) if pl.get("method", "") == name else None
    if needs_logits(name, mcfg):
        if not mc.get("use_remove_padding", True):
            raise ValueError(f"rlvr-entropy method {name!r} needs actor_rollout_ref.model.use_remove_padding=True")
        if actor_config.get("ulysses_sequence_parallel_size", 1) not in (1, None):
            raise ValueError(f"rlvr-entropy method {name!r} needs ulysses_sequence_parallel_size=1")
    elif needs_entropy(name, mcfg) and not actor_config.get("calculate_entropy", False):
        raise ValueError(f"rlvr-entropy method {name!r} needs the entropy: set "
                         "actor_rollout_ref.actor.calculate_entropy=True")
    if "ref_log_prob" in get_method_class(name)(**(mcfg or {})).needs:
        in_reward = bool((algorithm_config or {}).get("use_kl_in_reward", False))
        if not actor_config.get("use_kl_loss", False) and not in_reward:
            from rlvr_entropy.verl.loss import REFERENCE_OPTIONS

            raise ValueError(f"rlvr-entropy method {name!r} (with this method_config) reads the reference policy's "
                             f"log-probs (TokenBatch.ref_log_prob); {REFERENCE_OPTIONS}. Neither is set here "
                             "(pass algorithm_config= to check_verl_config when use_kl_in_reward provides them)")


__all__ = ["needs_logits", "needs_entropy", "check_verl_config", "install_engine_hooks", "install_worker_hooks",
           "install_engine_hooks_on_import", "attach_group_reward", "group_mean",
           "response_lm_head", "reads_distribution", "step_context", "current",
           "StepContext", "rle_loss_config"]
