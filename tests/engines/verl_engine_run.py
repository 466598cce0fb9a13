"""verl 0.9.1's own actor worker and FSDP2 engine on CPU ranks, with rlvr-entropy losses: the harness of
tests/engines/test_verl_engine.py.

Run with the python of .venv-verl (verl without trl; see the Makefile) under torchrun, gloo::

    torchrun --nproc_per_node 2 tests/engines/verl_engine_run.py --phase train --work DIR
    torchrun --nproc_per_node 1 tests/engines/verl_engine_run.py --phase resume --work DIR

What runs is verl's: a CPU platform registered with ``verl.plugin.platform`` (verl otherwise falls back to 'nvidia'
and calls torch.cuda), the config composed by hydra from verl's own ppo_trainer.yaml, ``ActorRolloutRefWorker``
(role "actor") whose ``init_model`` binds ``partial(ppo_loss, config=actor_config)`` (patched to
``entropy_ppo_loss`` by ``RLVR_ENTROPY_VERL_LOSS=1``, exactly as in a trainer's worker), ``compute_log_prob`` for the
old log-probs and entropy (stored as the v1 trainer stores them: ``old_log_probs``, ``entropy``), ``update_actor``
(``TrainingWorker.train_mini_batch``: mini-batches x ppo_epochs, each ``FSDPEngineWithLMHead.train_batch``) and
``save_checkpoint`` / ``load_checkpoint``. The model is a tiny Qwen2 built from a config (sdpa attention). Each rank
gets different data. Every rank writes ``DIR/<phase>_rank<r>.json``: controller states, step counts and what
the methods saw (their metrics and local statistics, recorded by wrapping ``Method.compute_loss`` / ``end_step``).
``VERL_RUN_TIMING=1`` prints where the time goes.
"""
from __future__ import annotations

import argparse
import copy
import functools
import datetime
import json
import math
import os
import string
import sys
import time
import types

import torch

# --------------------------------------------------------------------------------------- CPU platform
def register_cpu_platform() -> None:
    """A verl platform for CPU-only processes (gloo), set before any verl module resolves its platform."""
    from verl.plugin.platform import PlatformBase, PlatformRegistry, set_platform

    dev = types.SimpleNamespace(
        current_device=lambda: "cpu", device_count=lambda: 1, set_device=lambda i: None, synchronize=lambda i=None: None,
        is_available=lambda: True, empty_cache=lambda: None, manual_seed=torch.manual_seed,
        manual_seed_all=torch.manual_seed, max_memory_allocated=lambda *a, **k: 0,
        max_memory_reserved=lambda *a, **k: 0, memory_allocated=lambda *a, **k: 0,
        memory_reserved=lambda *a, **k: 0, reset_peak_memory_stats=lambda *a, **k: None,
        mem_get_info=lambda *a, **k: (0, 0), get_rng_state=torch.get_rng_state, set_rng_state=torch.set_rng_state,
        Stream=torch.cpu.Stream, current_stream=torch.cpu.current_stream, stream=torch.cpu.stream,
        get_device_name=lambda *a, **k: "CPU")

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = dev

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"

        def device_count(self):
            return 1

        def set_device(self, device_index):
            return None

        def synchronize(self, device_index=None):
            return None

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            return None

        def empty_cache(self):
            return None

        def get_device_capability(self, device_index=0):
            return None, None

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        def nvtx_range(self, msg):
            import contextlib

            return contextlib.nullcontext()

        def profiler_start(self):
            return None

        def profiler_stop(self):
            return None

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    set_platform(PlatformCPU())
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    # verl registers its FSDP engine for cuda / npu only; the same class serves the cpu platform
    EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")(FSDPEngineWithLMHead)


# ------------------------------------------------------------------------------------------ the model
def make_model_dir(path: str) -> None:
    """A tiny Qwen2 (random weights, seed 0) and a character-level tokenizer saved to ``path`` (rank 0 only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for c in string.digits + "+-*=,:> ":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
                      initializer_range=0.5)  # peaked, varied distributions: ranks' statistics differ clearly
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    hf.save_pretrained(path)


# -------------------------------------------------------------------------------------- configuration
METHODS = {  # name -> (loss_mode, method_config)
    "siren": ("rle_siren", {"top_p": 0.9}),
    # the default: its reach-gated floor reads group_reward (from uid), its pull ref_log_prob (METHOD_ACTOR)
    "thermostat": ("rle_thermostat", {}),
    "adaptive_entropy": ("rle_adaptive_entropy", {"target": 0.5}),
    "steer": ("rle_steer", {"scope": "global"}),
    "forking_tokens": ("rle_forking_tokens", {}),
    "entrocraft": ("rle_entrocraft", {"total_steps": 10}),
}
MINI = 4        # ppo_mini_batch_size (global, responses): 2 per rank with 2 ranks
PER_RANK = 4    # responses per rank per update: 2 mini-batches per epoch on 2 ranks
EPOCHS = 2      # ppo_epochs: 2 x 2 = 4 optimizer steps per update_actor


_BASE = {}

#: verl's reference enabled the way docs/engines/verl.md says for a method that reads ref_log_prob (use_kl_loss=True,
#: kl_loss_coef=0: the method's pull alone); the data carry a ref_log_prob (with_reference), as verl's trainer stores it
REFERENCE = {"use_kl_loss": True, "kl_loss_coef": 0.0}
#: actor overrides per method (phases train and resume)
METHOD_ACTOR = {"thermostat": REFERENCE}

#: phase "ref": the thermostat (default reach-gated floor; H0 = 10 nats far above the model's entropy so that u > 0
#: from the second step: the pull acts) with verl's reference enabled
REF_METHOD = ("rle_thermostat", {"target": 10.0})
REF_ACTOR = {**REFERENCE, "optim.lr": 1e-3}


def compose(model_dir: str, loss_mode: str, method_config: dict, *, dynamic: bool, load_contents=None,
            actor: dict | None = None):
    """verl's ppo_trainer.yaml composed by hydra with these overrides (composed once, then edited per worker)."""
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    a = "actor_rollout_ref.actor."
    if model_dir not in _BASE:
        ov = [f"actor_rollout_ref.model.path={model_dir}",
              "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
              "actor_rollout_ref.model.use_remove_padding=True", "actor_rollout_ref.model.use_fused_kernels=True",
              a + "strategy=fsdp2", a + "fsdp_config.strategy=fsdp2", a + "use_torch_compile=False",
              a + "fsdp_config.use_torch_compile=False",
              a + "policy_loss._target_=rlvr_entropy.verl.config.EntropyPolicyLossConfig",
              a + "policy_loss.loss_mode=rle_grpo", "+" + a + "policy_loss.method_config={}",
              a + f"ppo_mini_batch_size={MINI}", a + "ppo_micro_batch_size_per_gpu=1", a + f"ppo_epochs={EPOCHS}",
              a + "shuffle=False", a + "calculate_entropy=True", a + "entropy_coeff=0", a + "use_kl_loss=False",
              a + "optim.lr=1e-2", a + "clip_ratio_low=0.2", a + "clip_ratio_high=0.28",
              a + "ppo_max_token_len_per_gpu=24", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
              "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=24", "actor_rollout_ref.rollout.n=1",
              "trainer.n_gpus_per_node=2", "trainer.nnodes=1"]
        d = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
        with initialize_config_dir(config_dir=d, version_base=None):
            _BASE[model_dir] = hydra_compose("ppo_trainer", overrides=ov)
    cfg = copy.deepcopy(_BASE[model_dir])
    OmegaConf.update(cfg, a + "policy_loss.loss_mode", loss_mode)
    OmegaConf.update(cfg, a + "policy_loss.method_config", dict(method_config), merge=False)
    OmegaConf.update(cfg, a + "use_dynamic_bsz", dynamic)
    OmegaConf.update(cfg, "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz", dynamic)
    if load_contents is not None:
        OmegaConf.update(cfg, a + "checkpoint.load_contents", list(load_contents))
    for k, v in (actor or {}).items():
        OmegaConf.update(cfg, a + k, v)
    return cfg


def tick(what: str) -> None:
    if os.environ.get("VERL_RUN_TIMING") == "1":
        print(f"[rank{RANK}] {time.time() - T0:7.2f}s {what} (at {time.time():.1f})", file=sys.stderr, flush=True)


def build_worker(model_dir: str, name: str, *, dynamic: bool = False, load_contents=None, spec=None, actor=None):
    from verl.workers.engine_workers import ActorRolloutRefWorker

    loss_mode, mc = METHODS[name] if spec is None else spec
    actor = METHOD_ACTOR.get(name) if actor is None and spec is None else actor
    cfg = compose(model_dir, loss_mode, mc, dynamic=dynamic, load_contents=load_contents, actor=actor)
    w = ActorRolloutRefWorker(cfg.actor_rollout_ref, role="actor")
    tick(f"composed {name}")
    w.init_model()
    tick(f"built {name}")
    return w


# ---------------------------------------------------------------------------------------------- data
def make_batch(rank: int, seed: int):
    """PER_RANK responses for ``rank``, as the v1 trainer stores them (nested tensors, no padding). Lengths repeat
    across the two halves, so consecutive mini-batches have equal token counts (locally and globally). ``uid``
    (the prompt id verl groups by): the first two rows' groups span both ranks, the last two rows are a group of
    this rank's own."""
    from tensordict.tensorclass import NonTensorData, NonTensorStack
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(1000 * seed + rank)
    plens = [3, 4] * (PER_RANK // 2)
    rlens = [5, 3] * (PER_RANK // 2)
    prompts = [torch.randint(3, 21, (p,), generator=g) for p in plens]
    resps = [torch.randint(3, 21, (r,), generator=g) for r in rlens]
    ids = [torch.cat([p, r]) for p, r in zip(prompts, resps)]
    adv = torch.randn(PER_RANK, generator=g) + (0.5 if rank else -0.5)
    nest = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    td = tu.get_tensordict({
        "prompts": nest(prompts), "responses": nest(resps), "input_ids": nest(ids),
        "position_ids": nest([torch.arange(len(x)) for x in ids]),
        "attention_mask": nest([torch.ones(len(x), dtype=torch.long) for x in ids]),
        "response_mask": nest([torch.ones(r, dtype=torch.long) for r in rlens]),
        "loss_mask": nest([torch.ones(r, dtype=torch.long) for r in rlens]),
        "advantages": nest([torch.full((r,), float(a)) for r, a in zip(rlens, adv)]),
        # the reward on the last response token, as verl's reward manager stores it (entrocraft reads the rewards)
        "token_level_scores": nest([torch.nn.functional.pad(torch.tensor([float(a > 0)]), (r - 1, 0))
                                    for r, a in zip(rlens, adv)]),
        "uid": NonTensorStack.from_list([NonTensorData(u) for u in uids(rank)]),
    })
    return td


def uids(rank: int) -> list[str]:
    return ["q0", "q1"] + [f"own{rank}"] * (PER_RANK - 2)


def with_old_log_probs(worker, td):
    """The v1 trainer's _compute_old_log_prob: compute_log_prob (calculate_entropy, no loss), then store
    ``old_log_probs`` and ``entropy`` (the old policy's) on the response positions."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import response_from_nested

    q = td.copy()
    tu.assign_non_tensor(q, calculate_entropy=True, compute_loss=False, temperature=1.0)
    out = worker.compute_log_prob(q)
    td["old_log_probs"] = response_from_nested(out["log_probs"], td["response_mask"])
    td["entropy"] = response_from_nested(out["entropy"], td["response_mask"])
    return td


def update(worker, td):
    """The v1 trainer's _update_actor extra_info, then update_actor (train_mini_batch)."""
    from verl.utils import tensordict_utils as tu

    q = td.copy()
    tu.assign_non_tensor(q, calculate_entropy=True, distillation_use_topk=False, distillation_only=False,
                         global_batch_size=MINI, mini_batch_size=MINI, epochs=EPOCHS, seed=42,
                         dataloader_kwargs={"shuffle": False}, temperature=1.0)
    return worker.update_actor(q)


def evaluate(worker, td):
    """A forward-only pass through the loss (TrainingWorker.infer_batch with compute_loss=True)."""
    from verl.utils import tensordict_utils as tu

    q = td.copy()
    tu.assign_non_tensor(q, calculate_entropy=True, compute_loss=True, temperature=1.0, global_batch_size=MINI)
    return worker.actor.infer_batch(q)


# -------------------------------------------------------------------------------------- observation
RECORD: list[dict] = []


def _f(x):
    if isinstance(x, torch.Tensor):
        x = float(x.detach().double())
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def instrument() -> None:
    """Record what every method computes: local statistics next to the globally reduced ones."""
    from rlvr_entropy.methods import forking_tokens, steer
    from rlvr_entropy.methods.base import Method

    orig_loss, orig_end = Method.compute_loss, getattr(Method, "end_step", None)

    def compute_loss(self, batch, **kw):
        out = orig_loss(self, batch, **kw)
        rec = {"event": "loss", "method": self.name, "step": kw.get("step"), "observe": kw.get("observe", True),
               "tokens": int(batch.mask.sum()),
               "metrics": {k: _f(v) for k, v in out.metrics.items() if isinstance(v, (float, int, torch.Tensor))}}
        with torch.no_grad():
            if self.name == "steer":
                m = steer.steer_magnitude(batch.clean(batch.log_prob), batch.clean(batch.old_log_prob),
                                          batch.token_advantages(), self.old_entropy(batch), batch.mask,
                                          self.config.exponent)
                rec["local_M"] = _f(torch.where(batch.mask, m, -math.inf).amax())
                rec["old_entropy_given"] = batch.old_entropy is not None
            if batch.group_reward is not None:
                rec["group_reward"] = [float(x) for x in batch.group_reward]
            if batch.ref_log_prob is not None:  # per row, its valid positions (phase "ref")
                rec["ref"] = [[float(x) for x in r[m]] for r, m in zip(batch.ref_log_prob.detach(), batch.mask)]
                rec["log_prob"] = [[float(x) for x in r[m]] for r, m in zip(batch.log_prob.detach(), batch.mask)]
            if self.name == "forking_tokens":
                h = batch.current_entropy(self.name).detach()
                rec["local_threshold"] = _f(forking_tokens.entropy_threshold(h, batch.mask, self.config.quantile))
        RECORD.append(rec)
        return out

    def end_step(self, **kw):
        local = [float(x) for x in self._sums.tolist()]
        sums = orig_end(self, **kw)
        RECORD.append({"event": "end_step", "method": self.name, "local": local, "reduced": sums,
                       "rollout_end": kw.get("rollout_end", True), "state": self.state_dict()})
        return sums

    Method.compute_loss = compute_loss
    if orig_end is not None:
        Method.end_step = end_step
    from rlvr_entropy.methods import entrocraft

    orig_begin = getattr(entrocraft.Entrocraft, "begin_step", None)

    def begin_step(self, batch):
        h = batch.old_entropy.double()
        local = [float(torch.where(batch.mask, h, 0).sum()), float(batch.mask.sum())]
        out = orig_begin(self, batch)
        RECORD.append({"event": "begin", "method": self.name, "local": local, "entropy": out,
                       "state": self.state_dict()})
        return out

    if orig_begin is not None:
        entrocraft.Entrocraft.begin_step = begin_step


def engine_state(worker):
    """The engine's controller state (as its checkpoint would hold it) and a fingerprint."""
    from rlvr_entropy.verl import state as vstate

    st = getattr(worker.actor.engine, getattr(vstate, "ATTR", "-"), None)
    if st is None:
        if hasattr(vstate, "EngineState"):
            return None
        from rlvr_entropy.verl import loss  # the code before EngineState: module-level dicts
        return {"step": loss._STEP["step"], "methods": {n: m.state_dict() for n, m in loss.METHODS.items()}}
    sd = st.state_dict()
    return {"step": sd["step"], "methods": sd["methods"], "fingerprint": st.fingerprint()}


# ---------------------------------------------------------------------------------------------- phases
def phase_train(work: str, out: dict) -> None:
    model_dir = os.path.join(work, "model")
    for name in METHODS:
        RECORD.clear()
        w = build_worker(model_dir, name)
        td = with_old_log_probs(w, make_batch(RANK, seed=1))
        if name in METHOD_ACTOR:  # the method reads the reference's log-probs
            td = with_reference(td, RANK)
        if name == "thermostat":  # what each row's group mean reward must be: the rollout's uids and rewards
            out["rollout"] = {"uid": uids(RANK),
                              "reward": [float(x.sum()) for x in td["token_level_scores"].unbind()]}
        tick("old log-probs")
        update(w, td)  # ppo_epochs=2 x 2 mini-batches of equal token counts: 4 optimizer steps
        tick("update")
        s1 = engine_state(w)
        evaluate(w, td)  # forward-only through the loss: must not change anything
        w.save_checkpoint(os.path.join(work, "ckpt", name), global_step=4)
        tick("saved")
        out[name] = {"after_update": s1, "after_eval": engine_state(w), "record": list(RECORD)}
        if "ref_log_prob" in td.keys():
            out[name]["data_ref"] = [[float(x) for x in r] for r in td["ref_log_prob"].unbind()]
        del w
    # a second engine in this process (its own state: fresh), restoring every checkpoint on the same 2 ranks
    name = next(iter(METHODS))
    w2 = build_worker(model_dir, name)
    out["second_engine_fresh"] = engine_state(w2)
    for name in METHODS:
        w2.load_checkpoint(os.path.join(work, "ckpt", name))
        out[name]["loaded"] = engine_state(w2)
    del w2
    if "siren" not in METHODS:
        return
    # use_dynamic_bsz: the same data and initial model, micro-batches by token budget
    RECORD.clear()
    w = build_worker(model_dir, "siren", dynamic=True)
    update(w, with_old_log_probs(w, make_batch(RANK, seed=1)))
    out["siren_dynamic"] = {"after_update": engine_state(w), "record": list(RECORD)}


def with_reference(td, rank: int):
    """``ref_log_prob`` as verl's trainers store it (response positions, nested): here the old log-probs moved by a
    per-token offset (seeded by rank), so that every k3 term is nonzero and a test can tell the reference from the
    policy."""
    g = torch.Generator().manual_seed(500 + rank)
    refs = [o - 0.3 + 0.2 * torch.randn(len(o), generator=g) for o in td["old_log_probs"].unbind()]
    td["ref_log_prob"] = torch.nested.as_nested_tensor(refs, layout=torch.jagged)
    return td


def phase_ref(work: str, out: dict) -> None:
    """The thermostat reads the ref_log_prob of the data, and its pull acts: one update (4 optimizer steps) with verl's
    reference enabled as the docs say; every rank records its data (old and reference log-probs per row) and what the
    method saw."""
    import rlvr_entropy

    model_dir = os.path.join(work, "model")
    RECORD.clear()
    w = build_worker(model_dir, "thermostat_pull", spec=REF_METHOD, actor=REF_ACTOR)
    td = with_reference(with_old_log_probs(w, make_batch(RANK, seed=2)), RANK)
    out["data"] = {"old": [[float(x) for x in r] for r in td["old_log_probs"].unbind()],
                   "ref": [[float(x) for x in r] for r in td["ref_log_prob"].unbind()]}
    metrics = update(w, td)
    out["rlvr_entropy_file"] = rlvr_entropy.__file__
    out["thermostat_pull"] = {"after_update": engine_state(w), "record": list(RECORD),
                              "metrics": None if metrics is None else _plain_metrics(metrics)}


def _plain_metrics(output) -> dict:
    """update_actor's metrics (rank 0 holds them) as plain floats per key."""
    from verl.utils import tensordict_utils as tu

    def plain(x):
        if hasattr(x, "values") and not isinstance(x, dict):
            x = x.values
        if isinstance(x, (list, tuple)):
            return [plain(y) for y in x]
        return _f(x) if isinstance(x, (int, float, torch.Tensor)) else repr(x)

    return {k: plain(v) for k, v in tu.get(output, "metrics").items()}


def phase_resume(work: str, out: dict) -> None:
    """One rank resumes the controller state of each 2-rank checkpoint (verl's own FSDP shards are per world size,
    so the model is not loaded: checkpoint.load_contents=[]) and trains on. One engine serves every method: a
    driver's set_loss_fn binds each method's loss, as verl's init_model binds ppo_loss."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers import engine_workers

    model_dir = os.path.join(work, "model")
    w = build_worker(model_dir, next(iter(METHODS)), load_contents=[])
    for name in METHODS:
        RECORD.clear()
        w.load_checkpoint(os.path.join(work, "ckpt", name))
        loaded = engine_state(w)
        loss_mode, mc = METHODS[name]
        actor = omega_conf_to_dataclass(compose(model_dir, loss_mode, mc, dynamic=False,
                                                actor=METHOD_ACTOR.get(name)).actor_rollout_ref.actor)
        w.set_loss_fn(functools.partial(engine_workers.ppo_loss, config=actor))
        td = with_old_log_probs(w, make_batch(0, seed=3))
        update(w, with_reference(td, 0) if name in METHOD_ACTOR else td)
        tick(f"resumed {name}")
        out[name] = {"loaded": loaded, "after_update": engine_state(w), "record": list(RECORD)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["train", "resume", "ref"], required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of METHODS")
    args = ap.parse_args()
    for m in [m for m in METHODS if m not in args.methods.split(",")]:
        del METHODS[m]
    global RANK
    register_cpu_platform()
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # a hang fails
    RANK = torch.distributed.get_rank()
    torch.set_num_threads(1)
    model_dir = os.path.join(args.work, "model")
    if RANK == 0 and not os.path.exists(os.path.join(model_dir, "config.json")):
        make_model_dir(model_dir)
    torch.distributed.barrier()
    instrument()
    t0 = time.time()
    out: dict = {"rank": RANK, "world_size": torch.distributed.get_world_size()}
    {"train": phase_train, "resume": phase_resume, "ref": phase_ref}[args.phase](args.work, out)
    out["seconds"] = time.time() - t0
    with open(os.path.join(args.work, f"{args.phase}_rank{RANK}.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    tick("written")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    tick("done")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip ~10 s of interpreter teardown (ray, tensordict, ...): everything is written


RANK = 0
T0 = time.time()
if __name__ == "__main__":
    sys.exit(main())
