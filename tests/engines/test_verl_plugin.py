"""verl plugin: registration on `import verl`, the entropy-aware ppo_loss on a real verl TensorDict, configs."""
from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl")

from rlvr_entropy import available_methods  # noqa: E402


def _actor_config(**policy_loss):
    from verl.utils.config import omega_conf_to_dataclass
    pl = {"_target_": "rlvr_entropy.verl.config.EntropyPolicyLossConfig", **policy_loss}
    # as verl's trainer builds it: hydra-instantiated from _target_, policy_loss recursively
    cfg = {"_target_": "verl.workers.config.FSDPActorConfig", "strategy": "fsdp", "ppo_mini_batch_size": 4,
           "ppo_micro_batch_size_per_gpu": 2, "rollout_n": 1,
           "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "loss_agg_mode": "token-mean", "entropy_coeff": 0.0,
           "calculate_entropy": True, "use_kl_loss": False, "policy_loss": pl}
    return omega_conf_to_dataclass(cfg)


def test_import_verl_registers_every_method_in_fresh_interpreter():
    code = ("import sys\nimport verl\nfrom verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R\n"
            "import verl.plugin.platform.platform_manager as pm\n"
            "print(','.join(sorted(k for k in R if k.startswith('rle_'))))\n"
            "print('clip_cov' in R and R['clip_cov'] is not R['rle_clip_cov'])\n"
            "print(pm._current_platform is None)\n"  # the plugin does not resolve verl's platform
            "from rlvr_entropy.verl.hooks import ENGINE_MODULE, _AfterImport\n"
            "print(ENGINE_MODULE not in sys.modules and any(isinstance(f, _AfterImport) and f.name == ENGINE_MODULE "
            "for f in sys.meta_path))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLVR_ENTROPY_VERL")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env=env)
    lines = out.stdout.strip().splitlines()
    assert lines[-4].split(",") == ["rle_" + n for n in available_methods()]
    assert lines[-3] == "True"  # verl's own clip_cov untouched
    assert lines[-2] == "True"
    assert lines[-1] == "True"  # the engine hooks wait for the engine module (test_engine_hooks_after_import)


def test_engine_hooks_after_import(tmp_path, monkeypatch):
    """The after-import finder runs its callback once the module has executed (here a stand-in module), and the
    engine hooks on verl's real FSDP engine classes are installed idempotently."""
    from rlvr_entropy.verl import hooks

    (tmp_path / "rle_standin_mod.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    finder = hooks._AfterImport("rle_standin_mod", lambda m: seen.append(m.VALUE + 1))
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    import rle_standin_mod  # noqa: F401

    assert seen == [42]
    from verl.workers.engine.fsdp import transformer_impl as ti

    assert hooks.install_engine_hooks() and hooks.install_engine_hooks()  # idempotent
    for fn in (ti.FSDPEngineWithLMHead.forward_step, ti.FSDPEngine.optimizer_step, ti.FSDPEngine.save_checkpoint,
               ti.FSDPEngine.load_checkpoint):
        assert getattr(fn, "_rlvr_entropy", False)
    assert ti.FSDPEngine.optimizer_step.__wrapped__.__qualname__ == "FSDPEngine.optimizer_step"  # wrapped once
    assert hooks.install_engine_hooks_on_import()  # the module is imported: installs now


def test_config_subclass_through_omega_conf_to_dataclass():
    from rlvr_entropy.verl.config import EntropyPolicyLossConfig

    c = _actor_config(loss_mode="rle_siren", method_config={"top_p": 0.9})
    assert isinstance(c.policy_loss, EntropyPolicyLossConfig)
    assert c.policy_loss.method == "siren" and c.policy_loss.method_config == {"top_p": 0.9}
    c = _actor_config(method="steer")  # loss_mode filled in from method
    assert c.policy_loss.loss_mode == "rle_steer"
    # hydra wraps the ValueError in InstantiationException, keeping its message
    from hydra.errors import InstantiationException

    errs = (ValueError, InstantiationException)
    with pytest.raises(errs, match="unknown key.*bogus"):
        _actor_config(loss_mode="rle_siren", method_config={"bogus": 1})
    with pytest.raises(errs, match="top_p"):
        _actor_config(loss_mode="rle_siren", method_config={"top_p": 1.5})
    with pytest.raises(errs, match="actor config"):
        _actor_config(loss_mode="rle_grpo", method_config={"eps_high": 0.3})
    with pytest.raises(errs, match="unknown rlvr-entropy method"):
        _actor_config(loss_mode="rle_nope")


# ------------------------------------------------------------------------------ a real verl TensorDict
@functools.lru_cache(maxsize=None)
def _tiny_model(seed):
    from tests.engines.tiny_hf import make_model, make_tokenizer

    return make_model(make_tokenizer(), hidden=16, layers=1, seed=seed).float()


def _tiny_batch(seed=0, B=4, idx=None, return_logits=False):
    """(model, data, model_output[, logits [nnz, V], hidden [nnz, H]]): a verl micro-batch of B responses, and what
    verl's FSDP engine builds with remove-padding (position j predicts token j + 1)."""
    from verl.utils import tensordict_utils as tu

    from rlvr_entropy.kernels.hf import capture_backbone_hidden

    model = _tiny_model(seed)
    model.zero_grad()
    torch.manual_seed(seed)  # after the (cached) model: the same data on every call
    V = model.config.vocab_size
    plens, rlens = [3, 2, 4, 3][:B], [5, 3, 1, 4][:B]
    prompts = [torch.randint(3, V, (p,)) for p in plens]
    resps = [torch.randint(3, V, (r,)) for r in rlens]
    lps, ents, rmpad, hid = [], [], [], []
    for p, r in zip(prompts, resps):
        seq = torch.cat([p, r])
        with capture_backbone_hidden(model) as seen:
            logits = model(input_ids=seq[None]).logits[0].float()
        rmpad.append(logits)
        hid.append(seen["hidden"][0])
        logp = torch.log_softmax(logits, -1)
        lp = logp[:-1].gather(-1, seq[1:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)[:-1]
        lps.append(torch.cat([lp, lp.new_zeros(1)]))
        ents.append(torch.cat([ent, ent.new_zeros(1)]))
    idx = list(range(B)) if idx is None else idx
    nest = lambda xs: torch.nested.as_nested_tensor([xs[i] for i in idx], layout=torch.jagged)  # noqa: E731
    g = torch.Generator().manual_seed(seed + 1)
    old = [lp.detach()[len(p) - 1: len(p) - 1 + len(r)] + 0.05 * torch.randn(len(r), generator=g)
           for lp, p, r in zip(lps, prompts, resps)]
    adv = [torch.full((len(r),), float(a)) for r, a in zip(resps, torch.randn(B, generator=g))]
    rlens_all = sum(rlens)
    data = tu.get_tensordict({"prompts": nest(prompts), "responses": nest(resps),
                              "response_mask": nest([torch.ones(len(r), dtype=torch.long) for r in resps]),
                              "old_log_probs": nest(old), "advantages": nest(adv)})
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=rlens_all, global_batch_size=B)
    model_output = {"log_probs": nest(lps), "entropy": nest(ents)}
    if return_logits:
        return model, data, model_output, torch.cat([rmpad[i] for i in idx]), torch.cat([hid[i] for i in idx])
    return model, data, model_output


@contextlib.contextmanager
def _engine_step(state, model, hidden):
    """What the hooked forward_step does for a loss that reads the distribution: a step context on the engine's
    module, whose backbone forward recorded ``hidden`` ([nnz(+pad), H], remove-padding layout)."""
    from rlvr_entropy.verl import hooks

    with hooks.step_context(state, observe=True, module=model) as ctx:
        ctx.hidden["hidden"] = hidden[None]
        yield ctx


def _loss(fn, config, model_output, data, state=None):
    """One micro-batch through ``fn`` inside a step context (what the hooked engine's forward_step does)."""
    from rlvr_entropy.verl.hooks import step_context
    from rlvr_entropy.verl.state import EngineState

    with step_context(EngineState() if state is None else state, observe=True):
        return fn(config=config, model_output=model_output, data=data)


def test_replacement_equals_verl_ppo_loss_for_grpo_and_gradients_flow():
    from verl.workers.utils.losses import ppo_loss as verl_ppo_loss

    from rlvr_entropy.verl.loss import _verl_ppo_loss, entropy_ppo_loss

    model, data, out = _tiny_batch()
    cfg_v = _actor_config(loss_mode="rle_grpo")
    ref_fn = _verl_ppo_loss()
    assert ref_fn is verl_ppo_loss or ref_fn.__module__ == "verl.workers.utils.losses"
    from verl.workers.config import PolicyLossConfig

    vanilla = _actor_config(loss_mode="rle_grpo")
    object.__setattr__(vanilla, "policy_loss", PolicyLossConfig(loss_mode="vanilla"))
    for coeff in (0.0, 0.01):
        object.__setattr__(cfg_v, "entropy_coeff", coeff)
        object.__setattr__(vanilla, "entropy_coeff", coeff)
        ours, m = _loss(entropy_ppo_loss, cfg_v, out, data)
        ref, mr = _loss(ref_fn, vanilla, out, data)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
        assert "actor/grpo/clip_frac" in m and "actor/entropy_loss" in m
    model.zero_grad()
    ours.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_entropy_methods_receive_entropy_and_registered_loss_explains():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from rlvr_entropy.verl.loss import entropy_ppo_loss

    model, data, out = _tiny_batch(seed=3)
    for name in ("forking_tokens", "entropy_advantage", "steer", "adaptive_entropy"):
        if name not in available_methods():
            continue
        cfg = _actor_config(loss_mode=f"rle_{name}")
        loss, metrics = _loss(entropy_ppo_loss, cfg, out, data)
        assert torch.isfinite(loss) and any(k.startswith(f"actor/{name}/") for k in metrics)
        model.zero_grad()
        loss.backward(retain_graph=True)
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    # through verl's own ppo_loss (no entropy): a clear error pointing at the fix
    from rlvr_entropy.verl.hooks import step_context
    from rlvr_entropy.verl.state import EngineState

    cfg = _actor_config(loss_mode="rle_forking_tokens")
    lp = torch.zeros(2, 3)
    args = (lp, lp, torch.ones(2, 3), torch.ones(2, 3, dtype=bool), "token-mean", cfg, None)
    with step_context(EngineState(), observe=True), pytest.raises(ValueError, match="calculate_entropy=True"):
        get_policy_loss_fn("rle_forking_tokens")(*args)
    # outside a hooked engine step there is no owner for state, steps and process group: an error, not a guess
    with pytest.raises(ValueError, match="outside a hooked verl engine step"):
        get_policy_loss_fn("rle_grpo")(*args)
    with pytest.raises(ValueError, match="outside a hooked verl engine step"):
        entropy_ppo_loss(_actor_config(loss_mode="rle_grpo"), out, data)


def test_micro_batch_split_invariance_token_mean():
    """Summing the micro-batch losses of a split mini-batch equals the loss of the whole (verl's convention)."""
    from rlvr_entropy.verl.loss import entropy_ppo_loss

    cases = [("grpo", {}), ("entropy_advantage", {}),
             ("grpo", {"loss_agg_mode": "seq-mean-token-sum-norm", "loss_scale_factor": 8}),
             ("grpo", {"loss_agg_mode": "seq-mean-token-mean"})]
    for name, over in cases:
        _, data, out = _tiny_batch(seed=5)
        cfg = _actor_config(loss_mode=f"rle_{name}")
        for k, v in over.items():
            object.__setattr__(cfg, k, v)
        whole, _ = _loss(entropy_ppo_loss, cfg, out, data)
        parts = 0.0
        for idx in ([0, 1], [2, 3]):  # same global batch_num_tokens / global_batch_size in each micro-batch
            _, sub, sub_out = _tiny_batch(seed=5, idx=idx)
            parts = parts + _loss(entropy_ppo_loss, cfg, sub_out, sub)[0]
        torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-7)


def _siren_step(st, cfg, seed=0):
    """One siren micro-batch through entropy_ppo_loss with the hidden state recorded in st's step context, then
    end_step."""
    from rlvr_entropy.verl.loss import entropy_ppo_loss

    model, data, out, _, hidden = _tiny_batch(seed=seed, return_logits=True)
    with _engine_step(st, model, hidden.detach()):
        entropy_ppo_loss(cfg, out, data)
    st.end_step()


def test_engine_state_checkpoint_round_trip_and_missing_state(tmp_path, caplog):
    """One file per checkpoint; a resume without it raises for a method with controllers unless missing_state=fresh;
    the older per-rank format is read from rank 0's copy; stateless methods do not care."""
    from rlvr_entropy.verl.config import EntropyPolicyLossConfig
    from rlvr_entropy.verl.state import FILE, EngineState

    cfg = _actor_config(loss_mode="rle_siren")
    st = EngineState()
    _siren_step(st, cfg)
    saved = st.state_dict()
    assert saved["step"] == 1 and saved["methods"]["siren"]["anchor"]["value"] is not None
    assert st.save(str(tmp_path / "ck")) == str(tmp_path / "ck" / FILE)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [FILE]
    st2 = EngineState()
    assert st2.load(str(tmp_path / "ck"))
    assert st2.state_dict() == saved  # restored before the method is built ...
    assert st2.method("siren", cfg).state_dict() == saved["methods"]["siren"]  # ... and applied when it is
    assert EngineState().save(str(tmp_path / "empty")) is None  # an engine that never ran a loss writes nothing
    # resuming from a checkpoint without the state file
    st3 = EngineState()
    assert not st3.load(str(tmp_path / "no-state"))
    st3.method("grpo", _actor_config(loss_mode="rle_grpo"))  # no controllers: nothing is lost
    with pytest.raises(ValueError, match="missing_state=fresh"):
        st3.method("siren", cfg)
    fresh = _actor_config(loss_mode="rle_siren", missing_state="fresh")
    with caplog.at_level("WARNING"):
        m = st3.method("siren", fresh)
    assert m.state_dict()["anchor"]["value"] is None and "start fresh" in caplog.text
    with pytest.raises(ValueError, match="policy_loss.missing_state"):
        EntropyPolicyLossConfig(loss_mode="rle_siren", missing_state="ignore")
    # the older per-rank files: rank 0's copy
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"methods": {"siren": saved["methods"]["siren"]}, "step": {"step": 7, "bnt": 3, "seen": 0}},
               legacy / "rlvr_entropy_state_rank0.pt")
    st4 = EngineState()
    assert st4.load(str(legacy))
    assert st4.step == 7 and st4.method("siren", cfg).state_dict() == saved["methods"]["siren"]
    with pytest.raises(ValueError, match="not an rlvr-entropy verl state"):
        EngineState().load_state_dict({"methods": {}})


def test_two_engines_share_nothing_and_steps_only_advance_at_end_step():
    """Controllers measure every training micro-batch of a step and update once, at end_step; equal token counts
    do not matter; forward-only calls (observe=False) change nothing; two owners are independent."""
    from rlvr_entropy.verl.hooks import step_context
    from rlvr_entropy.verl.loss import entropy_ppo_loss
    from rlvr_entropy.verl.state import EngineState

    _, data, out = _tiny_batch(seed=2)
    cfg = _actor_config(loss_mode="rle_adaptive_entropy", method_config={"target": 0.5})
    a, b = EngineState(), EngineState()
    for _ in range(3):  # one optimizer step of 3 identical micro-batches
        _loss(entropy_ppo_loss, cfg, out, data, state=a)
    ma = a.methods["adaptive_entropy"]
    assert ma.state_dict()["coef"]["steps"] == 0 and a.step == 0
    a.end_step()
    assert a.step == 1 and ma.state_dict()["coef"]["steps"] == 1
    after = ma.state_dict()
    with step_context(a, observe=False):  # evaluation
        entropy_ppo_loss(cfg, out, data)
    a.end_step()  # an optimizer step without training calls: the controller is not closed again
    assert ma.state_dict() == after and a.step == 2
    assert b.methods == {} and b.step == 0  # the other engine's owner saw nothing
    mb = b.method("adaptive_entropy", cfg)
    assert mb is not ma and mb.state_dict()["coef"]["steps"] == 0


def test_old_entropy_from_the_v1_trainers_entropy_key():
    """verl 0.9.1's v1 trainer stores the old policy's entropy as `entropy` in the batch: STEER uses it (not the
    current entropy of model_output); two old-entropy keys at once are refused."""
    from verl.workers.utils.padding import no_padding_2_padding

    from rlvr_entropy import TokenBatch, make_method
    from rlvr_entropy.verl.loss import entropy_ppo_loss

    _, data, out = _tiny_batch(seed=4)
    cfg = _actor_config(loss_mode="rle_steer")
    current, _ = _loss(entropy_ppo_loss, cfg, out, data)
    g = torch.Generator().manual_seed(9)
    resp = [torch.rand(len(r), generator=g) * 3 for r in data["responses"].unbind()]
    data["entropy"] = torch.nested.as_nested_tensor(resp, layout=torch.jagged)
    old, _ = _loss(entropy_ppo_loss, cfg, out, data)
    pd = data.select("response_mask", "old_log_probs", "advantages", "entropy").to_padded_tensor()
    ref = make_method("steer", **_pg(cfg, "steer")).compute_loss(TokenBatch(
        log_prob=no_padding_2_padding(out["log_probs"], data), old_log_prob=pd["old_log_probs"],
        advantages=pd["advantages"], mask=pd["response_mask"].bool(), old_entropy=pd["entropy"])).loss
    torch.testing.assert_close(old, ref, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(old, current)  # the old entropy changed the weights: the test is not vacuous
    data["old_entropy"] = data["entropy"]
    with pytest.raises(ValueError, match="several keys"):
        _loss(entropy_ppo_loss, cfg, out, data)


def test_checks_and_state_round_trip(tmp_path):
    from rlvr_entropy.verl import hooks
    from rlvr_entropy.verl.state import EngineState

    cfg = _actor_config(loss_mode="rle_siren")
    hooks.check_verl_config("siren", cfg, {"use_fused_kernels": False})
    hooks.check_verl_config("siren", cfg, {"use_fused_kernels": True})  # the tiled LM head needs no logits
    with pytest.raises(ValueError, match="use_remove_padding=True"):
        hooks.check_verl_config("siren", cfg, {"use_remove_padding": False})
    assert hooks.needs_entropy("forking_tokens") and not hooks.needs_entropy("grpo")
    noent = _actor_config(loss_mode="rle_forking_tokens")
    object.__setattr__(noent, "calculate_entropy", False)
    with pytest.raises(ValueError, match="calculate_entropy"):
        hooks.check_verl_config("forking_tokens", noent)
    from rlvr_entropy import TokenBatch

    st = EngineState()
    m = st.method("siren", cfg)
    fresh = repr(m.state_dict())
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(2, 3, 11, generator=g, requires_grad=True)
    lp = torch.log_softmax(lg, -1)[..., 0]
    m.compute_loss(TokenBatch(log_prob=lp, old_log_prob=lp.detach(), advantages=torch.tensor([1.0, -1.0]),
                              mask=torch.ones(2, 3, dtype=bool), logits=lg), step=5)
    m.end_step()
    sd = m.state_dict()
    assert repr(sd) != fresh  # the anchor was set: the round trip below is not vacuous
    st.save(str(tmp_path / "s"))
    st2 = EngineState()
    assert st2.load(str(tmp_path / "s"))
    m2 = st2.method("siren", cfg)
    assert m2 is not m and repr(m2.state_dict()) == repr(sd)


def _response_logits(rmpad, data, T):
    """Padded response logits [B, T_resp, V] cut by hand from remove-padding logits [nnz, V]."""
    out, off = [], 0
    for p, r in zip(data["prompts"].unbind(), data["responses"].unbind()):
        L = len(p) + len(r)
        out.append(torch.nn.functional.pad(rmpad[off: off + L][len(p) - 1: L - 1], (0, 0, 0, T - len(r))))
        off += L
    return torch.stack(out)


def test_lm_head_source_equals_the_methods_on_response_logits():
    """siren / lp_reg / entropy_bonus (AEnt's clamped entropy) through entropy_ppo_loss, fed by the tiled LM head on
    the recorded hidden state at temperature 0.7, give the loss and the model gradients of the method on a TokenBatch
    of the response logits / T; a grpo loss records nothing."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    from rlvr_entropy import TokenBatch, make_method
    from rlvr_entropy.verl import hooks
    from rlvr_entropy.verl.loss import entropy_ppo_loss
    from rlvr_entropy.verl.state import EngineState

    temp = 0.7
    for name in ("siren", "lp_reg", "entropy_bonus"):
        extra = {"clamp_fraction": 0.3} if name == "entropy_bonus" else {}  # clamping: it reads the distribution
        cfg = _actor_config(loss_mode=f"rle_{name}", **({"method_config": extra} if extra else {}))
        loss_fn = functools.partial(entropy_ppo_loss, config=cfg)
        assert hooks.reads_distribution(loss_fn) and not hooks.reads_distribution(None)
        assert not hooks.reads_distribution(functools.partial(entropy_ppo_loss,
                                                              config=_actor_config(loss_mode="rle_grpo")))
        grads = []
        for route in ("source", "logits"):
            model, data, _, rmpad, hidden = _tiny_batch(seed=7, return_logits=True)
            tu.assign_non_tensor(data, temperature=temp)
            out = _outputs_from_rmpad(rmpad / temp, data)
            if route == "source":
                with _engine_step(EngineState(), model, hidden):
                    loss, metrics = loss_fn(model_output=out, data=data)
                assert any(k.startswith(f"actor/{name}/") for k in metrics)
            else:
                lp = no_padding_2_padding(out["log_probs"], data)
                pd = data.select("response_mask", "old_log_probs", "advantages").to_padded_tensor()
                loss = make_method(name, **_pg(cfg, name), **extra).compute_loss(TokenBatch(
                    log_prob=lp, old_log_prob=pd["old_log_probs"], advantages=pd["advantages"],
                    mask=pd["response_mask"].bool(), logits=_response_logits(rmpad, data, lp.shape[1]) / temp,
                    entropy=no_padding_2_padding(out["entropy"], data)), step=1).loss
            model.zero_grad()
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (l_src, g_src), (l_ref, g_ref) = grads
        torch.testing.assert_close(l_src, l_ref, rtol=1e-5, atol=1e-6)
        assert len(g_src) == len(g_ref) > 0 and any(float(g.abs().sum()) > 0 for g in g_src)
        for a, b in zip(g_src, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lm_head_source_errors_name_the_cause():
    """No recorded hidden state, per-sample temperatures, a hidden state that is not the LM head's input: one clear
    ValueError each."""
    from verl.utils import tensordict_utils as tu

    from rlvr_entropy.verl.loss import entropy_ppo_loss
    from rlvr_entropy.verl.state import EngineState

    cfg = _actor_config(loss_mode="rle_siren")
    model, data, out, rmpad, hidden = _tiny_batch(seed=7, return_logits=True)
    with pytest.raises(ValueError, match="no hidden state was recorded"):
        _loss(entropy_ppo_loss, cfg, out, data)
    with _engine_step(EngineState(), model, hidden.detach() * 3.0):  # e.g. a model that rescales before its head
        with pytest.raises(ValueError, match="differ from verl's"):
            entropy_ppo_loss(cfg, out, data)
    with _engine_step(EngineState(), model, hidden.detach()[1:]):  # off by one position
        with pytest.raises(ValueError, match="differ from verl's|positions"):
            entropy_ppo_loss(cfg, out, data)
    data["temperature"] = torch.tensor([1.0, 0.5, 1.0, 1.0])
    with _engine_step(EngineState(), model, hidden.detach()):
        with pytest.raises(ValueError, match="per-sample temperatures"):
            entropy_ppo_loss(cfg, out, data)
    data["temperature"] = torch.ones(4)  # one value per sample, all equal: fine
    with _engine_step(EngineState(), model, hidden.detach()):
        loss, metrics = entropy_ppo_loss(cfg, out, data)
    assert torch.isfinite(loss) and "actor/entropy_loss" in metrics
    # calculate_entropy=False: the method reads the source's entropy, verl's entropy bonus term stays off
    no_ent = {k: v for k, v in out.items() if k != "entropy"}
    with _engine_step(EngineState(), model, hidden.detach()):
        loss2, metrics2 = entropy_ppo_loss(cfg, no_ent, data)
    assert "actor/entropy_loss" not in metrics2
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)


def _outputs_from_rmpad(scaled, data):
    logp = torch.log_softmax(scaled, -1)
    lps, ents, off = [], [], 0
    for p, r in zip(data["prompts"].unbind(), data["responses"].unbind()):
        seq = torch.cat([p, r])
        L = len(seq)
        lp = logp[off: off + L - 1].gather(-1, seq[1:, None]).squeeze(-1)
        ent = -(logp[off: off + L - 1].exp() * logp[off: off + L - 1]).sum(-1)
        lps.append(torch.cat([lp, lp.new_zeros(1)]))
        ents.append(torch.cat([ent, ent.new_zeros(1)]))
        off += L
    nest = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    return {"log_probs": nest(lps), "entropy": nest(ents)}


def _pg(cfg, name):
    from rlvr_entropy.verl.loss import pg_fields
    import dataclasses
    from rlvr_entropy import get_method_class

    names = {f.name for f in dataclasses.fields(get_method_class(name).Config)}
    return {k: v for k, v in pg_fields(cfg).items() if k in names}


def test_hydra_command_line_of_the_docs_composes_with_verls_own_config():
    """The overrides used in docs/engines/verl.md compose with verl's ppo_trainer.yaml and reach the method."""
    import os

    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    from rlvr_entropy.verl.hooks import check_verl_config
    from rlvr_entropy.verl.state import EngineState

    pre = "actor_rollout_ref.actor."
    overrides = [pre + "policy_loss._target_=rlvr_entropy.verl.config.EntropyPolicyLossConfig",
                 pre + "policy_loss.loss_mode=rle_siren", "+" + pre + "policy_loss.method_config.top_p=0.7",
                 "+" + pre + "policy_loss.method_config.beta=0.01", pre + "loss_scale_factor=3072",
                 pre + "loss_agg_mode=seq-mean-token-sum-norm", pre + "clip_ratio_c=3",
                 pre + "ppo_micro_batch_size_per_gpu=2", pre + "ppo_mini_batch_size=8",
                 "actor_rollout_ref.model.use_fused_kernels=False",
                 "+ray_kwargs.ray_init.runtime_env.env_vars.RLVR_ENTROPY_VERL_LOSS='1'"]
    d = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=d, version_base=None):
        cfg = compose("ppo_trainer", overrides=overrides)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    c = EngineState().method("siren", actor).config
    assert (c.top_p, c.beta, c.norm_length, c.dual_clip, c.loss_agg_mode) == (
        0.7, 0.01, 3072, 3.0, "seq-mean-token-sum-norm")
    check_verl_config("siren", actor, cfg.actor_rollout_ref.model)
    with initialize_config_dir(config_dir=d, version_base=None):
        bad = compose("ppo_trainer", overrides=overrides + ["+" + pre + "policy_loss.method_config.topp=0.7"])
    from hydra.errors import InstantiationException

    with pytest.raises((ValueError, InstantiationException), match="topp"):
        omega_conf_to_dataclass(bad.actor_rollout_ref.actor)


def test_lm_head_source_beside_verls_fused_kernel_and_prepare_model_outputs():
    """use_fused_kernels=True as verl runs it: verl's FusedLinearForPPO (torch backend) computes log-probs and
    entropy from the recorded hidden state (with a static tail pad, pad_size), verl's own prepare_model_outputs
    unpads them, and siren's loss, fed by the tiled LM head on the same hidden state, equals the loss on verl's
    non-fused (logits) outputs; gradients reach the model."""
    import types

    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.dataset_utils import DatasetPadMode
    from verl.utils.experimental.torch_functional import FusedLinearForPPO
    from verl.workers.engine.fsdp import transformer_impl as ti

    from rlvr_entropy.verl.loss import entropy_ppo_loss
    from rlvr_entropy.verl.state import EngineState

    model, data, _, rmpad, hidden = _tiny_batch(seed=11, return_logits=True)
    seqs = [torch.cat([p, r]) for p, r in zip(data["prompts"].unbind(), data["responses"].unbind())]
    ids = torch.cat(seqs)
    pad = 3  # what _get_packed_pad_size may append at the tail
    hidden_p = torch.cat([hidden, hidden.new_full((pad, hidden.shape[1]), 7.0)])
    temp = 0.6
    rolled = torch.cat([torch.roll(ids, -1), ids.new_zeros(pad)])
    log_probs, entropy = FusedLinearForPPO(impl_backend="torch").forward(
        hidden_states=hidden_p[None], vocab_weights=model.lm_head.weight, input_ids=rolled[None], temperature=temp)
    data["input_ids"] = torch.nested.as_nested_tensor(seqs, layout=torch.jagged)
    tu.assign_non_tensor(data, use_remove_padding=True, pad_mode=DatasetPadMode.NO_PADDING, calculate_entropy=True,
                         use_fused_kernels=True, temperature=temp)
    fake = types.SimpleNamespace(use_ulysses_sp=False)
    fake._gather_and_unpad_packed = types.MethodType(ti.FSDPEngine._gather_and_unpad_packed, fake)
    output_args = {"input_ids_rmpad_rolled": rolled, "temperature_rmpad": torch.full((ids.numel() + pad,), temp),
                   "pad_size": pad, "temperature_is_one": False}
    cfg = _actor_config(loss_mode="rle_siren")
    out = ti.FSDPEngineWithLMHead.prepare_model_outputs(
        fake, output=types.SimpleNamespace(log_probs=log_probs, entropy=entropy), output_args=output_args,
        micro_batch=data, logits_processor_func=None)
    with _engine_step(EngineState(), model, hidden_p):  # fresh anchor, measured on this batch
        loss, metrics = entropy_ppo_loss(cfg, out, data)
    assert torch.isfinite(loss) and any(k.startswith("actor/siren/") for k in metrics)
    model.zero_grad()
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    with _engine_step(EngineState(), model, hidden.detach()):  # verl's logits route: log-probs from the logits
        loss2, _ = entropy_ppo_loss(cfg, _outputs_from_rmpad(rmpad.detach() / temp, data), data)
    torch.testing.assert_close(loss.detach(), loss2.detach(), rtol=1e-4, atol=1e-6)


def test_clip_cov_and_kl_cov_ignore_clip_ratio_c_like_verl():
    from rlvr_entropy.verl.state import method_config

    for name in ("clip_cov", "kl_cov"):
        assert method_config(name, _actor_config(loss_mode=f"rle_{name}")).dual_clip is None
    assert method_config("grpo", _actor_config(loss_mode="rle_grpo")).dual_clip == 3.0


def test_begin_method_step_feeds_the_rollout_entropy_and_warns_without_it(caplog):
    """train_mini_batch's hook: entrocraft (a method with begin_step) gets the rollout's old entropy before its
    mini-batches; without one in the batch it warns once and keeps its documented lag; other methods: nothing."""
    import logging

    from tensordict import TensorDict

    from rlvr_entropy.verl import hooks
    from rlvr_entropy.verl.state import EngineState

    def worker(method):
        w = type("W", (), {})()
        w.loss_fn = functools.partial(lambda **k: None, config=_actor_config(loss_mode=f"rle_{method}"))
        return w

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    h = torch.tensor([[0.5, 1.5, 9.0], [2.0, 0.0, 1.0]])
    st = EngineState()
    data = TensorDict({"response_mask": mask, "entropy": h}, batch_size=[2])
    assert hooks.begin_method_step(worker("entrocraft"), st, data) == pytest.approx(5.0 / 5)
    assert st.methods["entrocraft"].band.state_dict() == {"steps": 1, "entropy": pytest.approx(1.0)}
    assert hooks.begin_method_step(worker("siren"), st, data) is None and "siren" not in st.methods
    bare = TensorDict({"response_mask": mask}, batch_size=[2])
    with caplog.at_level(logging.WARNING, logger="rlvr_entropy.verl.hooks"):
        assert hooks.begin_method_step(worker("entrocraft"), st, bare) is None
        assert hooks.begin_method_step(worker("entrocraft"), st, bare) is None
    warned = [r for r in caplog.records if "one step of lag" in r.getMessage()]
    assert len(warned) == 1 and "entrocraft" in warned[0].getMessage()
    assert st.methods["entrocraft"].band.state_dict()["steps"] == 1  # no decision without the entropy
    two = TensorDict({"response_mask": mask, "entropy": h, "old_entropy": h}, batch_size=[2])
    with pytest.raises(ValueError, match="several keys"):
        hooks.begin_method_step(worker("entrocraft"), st, two)


def test_group_mean_by_hand_and_across_ranks():
    """Each row's group mean over every rank: one rank alone, and rank 0 of two whose groups span both."""
    from rlvr_entropy.core.dist import FnCollective, LocalCollective
    from rlvr_entropy.verl.hooks import group_mean

    keys, vals = torch.tensor([7, 3, 7, 9]), torch.tensor([1.0, 0.0, 0.0, 0.5])
    assert group_mean(keys, vals, LocalCollective()).tolist() == [0.5, 0.0, 0.5, 0.5]
    other = {torch.int64: torch.tensor([3, 3, 5]), torch.float64: torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)}
    two = FnCollective(lambda x: torch.cat([x, other[x.dtype].to(x.dtype)]), world_size=2)  # rank 0, then rank 1
    assert group_mean(keys, vals, two).tolist() == pytest.approx([0.5, 2 / 3, 0.5, 0.5])
    with pytest.raises(ValueError, match="keys and values"):
        group_mean(keys, vals[:3], LocalCollective())


def test_attach_group_reward_from_uid_and_token_level_scores():
    """train_mini_batch's hook: group_reward [B] from uid and the row sums of token_level_scores (nested, as the
    v1 trainer stores them); a batch without uid, or with its own group_reward, is left alone."""
    from tensordict import TensorDict
    from tensordict.tensorclass import NonTensorData, NonTensorStack
    from verl.utils import tensordict_utils as tu

    from rlvr_entropy.verl import hooks
    from rlvr_entropy.verl.state import EngineState

    nest = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    rl = [2, 3, 1, 2]
    scores = [torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0]), torch.tensor([0.0, 0.5])]
    td = tu.get_tensordict({"response_mask": nest([torch.ones(r, dtype=torch.long) for r in rl]),
                            "token_level_scores": nest(scores),
                            "uid": NonTensorStack.from_list([NonTensorData(u) for u in ["a", "b", "a", "b"]])})
    assert hooks.attach_group_reward(EngineState(), td)
    assert td["group_reward"].tolist() == [1.0, 0.25, 1.0, 0.25]
    assert not hooks.attach_group_reward(EngineState(), td)  # already there: kept
    bare = TensorDict({"response_mask": torch.ones(2, 3)}, batch_size=[2])
    assert not hooks.attach_group_reward(EngineState(), bare) and "group_reward" not in bare.keys()


def test_aepo_is_refused_instead_of_running_as_grpo():
    """AEPO needs a second generation per step (rollout_plan / assemble) that the plugin does not run: the config
    (and the loss, through the same check) refuses it instead of silently training GRPO."""
    from rlvr_entropy.verl.config import validate_method_config

    with pytest.raises(ValueError, match="second set of samples .* would silently be GRPO"):
        validate_method_config("aepo", {})
    with pytest.raises(Exception, match="would silently be GRPO"):
        _actor_config(loss_mode="rle_aepo")
    assert validate_method_config("entrocraft", {"total_steps": 5}) == {"total_steps": 5}


# ------------------------------------------------------------------------------ reference log-probs
#: the thermostat (its pull reads ref_log_prob) with the fixed floor: these micro-batches carry no group_reward
PULL = {"reach_tol": None}


def test_config_check_refuses_a_method_that_reads_the_reference_without_verls_reference_worker():
    """verl runs its reference worker only with actor.use_kl_loss or algorithm.use_kl_in_reward: a method that reads
    ref_log_prob (the thermostat, with its defaults too) is refused without either, with the options named; grpo,
    which reads no reference, needs neither."""
    from rlvr_entropy.verl.hooks import check_verl_config

    cfg = _actor_config(loss_mode="rle_thermostat", method_config=PULL)
    assert not cfg.use_kl_loss
    with pytest.raises(ValueError, match=r"ref_log_prob.*use_kl_loss=True or algorithm.use_kl_in_reward=True.*"
                                         r"use_kl_loss=True with actor_rollout_ref.actor.kl_loss_coef=0"):
        check_verl_config("thermostat", cfg, {})
    check_verl_config("thermostat", cfg, {}, {"use_kl_in_reward": True})
    with pytest.raises(ValueError, match="use_kl_in_reward"):
        check_verl_config("thermostat", cfg, {}, {"use_kl_in_reward": False})
    object.__setattr__(cfg, "use_kl_loss", True)
    object.__setattr__(cfg, "kl_loss_coef", 0.0)
    check_verl_config("thermostat", cfg, {})
    with pytest.raises(ValueError, match=r"ref_log_prob.*use_kl_loss=True"):  # the defaults read the reference too
        check_verl_config("thermostat", _actor_config(loss_mode="rle_thermostat"), {})
    check_verl_config("grpo", _actor_config(loss_mode="rle_grpo"), {})  # no reference needed
    # the thermostat reads the current entropy (not the distribution): calculate_entropy is required
    object.__setattr__(cfg, "calculate_entropy", False)
    with pytest.raises(ValueError, match="calculate_entropy=True"):
        check_verl_config("thermostat", cfg, {})


def _with_reference(data, seed=11):
    """``data`` with a ``ref_log_prob`` (nested, response positions, as verl's trainers store it) away from the
    policy: every k3 term nonzero."""
    g = torch.Generator().manual_seed(seed)
    refs = [o - 0.3 + 0.2 * torch.randn(len(o), generator=g) for o in data["old_log_probs"].unbind()]
    data["ref_log_prob"] = torch.nested.as_nested_tensor(refs, layout=torch.jagged)
    return data


def test_the_method_reads_the_batchs_ref_log_prob_and_verls_kl_loss_adds_on_top():
    """entropy_ppo_loss hands the method the batch's ref_log_prob: the thermostat's logged k3 is the mean computed from
    the data, and its pull (u forced to 1) adds pull_coef x k3 to the loss; verl's KL loss (use_kl_loss) adds
    nothing with kl_loss_coef=0 and kl_loss_coef x its KL with a nonzero one (both act)."""
    from verl.workers.utils.padding import no_padding_2_padding

    from rlvr_entropy.methods.thermostat import pull_term
    from rlvr_entropy.verl.loss import entropy_ppo_loss
    from rlvr_entropy.verl.state import EngineState

    _, data, out = _tiny_batch(seed=7)
    data = _with_reference(data)
    pd = data.select("ref_log_prob", "response_mask").to_padded_tensor()
    mask = pd["response_mask"].bool()
    lp = no_padding_2_padding(out["log_probs"], data).detach()
    k3 = pull_term(lp, pd["ref_log_prob"], mask)
    expect = float(k3[mask].mean())
    assert expect > 1e-2
    cfg = _actor_config(loss_mode="rle_thermostat", method_config=PULL)
    object.__setattr__(cfg, "use_kl_loss", True)
    losses = {}
    for u, coef in ((0.0, 0.0), (1.0, 0.0), (1.0, 0.1)):
        object.__setattr__(cfg, "kl_loss_coef", coef)
        st = EngineState()
        st.method("thermostat", cfg).pi.u = u
        loss, metrics = _loss(entropy_ppo_loss, cfg, out, data, state=st)
        assert float(metrics["actor/thermostat/kl"].values[0]) == pytest.approx(expect, rel=1e-5)
        losses[u, coef] = (loss.detach(), metrics)
    pull = 0.5 * expect  # pull_coef (default 0.5) x token-mean k3: the micro-batch is the whole batch here
    assert float(losses[1.0, 0.0][0] - losses[0.0, 0.0][0]) == pytest.approx(pull, rel=1e-4)
    kl_loss = losses[1.0, 0.1][1]["kl_loss"].values[0]
    assert float(kl_loss) > 1e-3
    assert float(losses[1.0, 0.1][0] - losses[1.0, 0.0][0]) == pytest.approx(0.1 * float(kl_loss), rel=1e-4)


def test_a_micro_batch_without_ref_log_prob_is_refused_naming_the_field_and_the_option():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from rlvr_entropy.verl.hooks import step_context
    from rlvr_entropy.verl.loss import entropy_ppo_loss
    from rlvr_entropy.verl.state import EngineState

    _, data, out = _tiny_batch(seed=7)
    cfg = _actor_config(loss_mode="rle_thermostat", method_config=PULL)
    with pytest.raises(ValueError, match=r"no 'ref_log_prob'.*actor_rollout_ref.actor.use_kl_loss=True"):
        _loss(entropy_ppo_loss, cfg, out, data)
    # verl's own ppo_loss hands a registered loss no reference: the same refusal, pointing at the entropy-aware loss
    lp = torch.zeros(2, 3)
    args = (lp, lp, torch.ones(2, 3), torch.ones(2, 3, dtype=bool), "token-mean", cfg, None)
    with step_context(EngineState(), observe=True), pytest.raises(
            ValueError, match=r"ref_log_prob.*RLVR_ENTROPY_VERL_LOSS=1.*use_kl_loss=True"):
        get_policy_loss_fn("rle_thermostat")(*args)
    _loss(entropy_ppo_loss, cfg, out, _with_reference(data))  # with the field: no error


def test_the_docs_reference_settings_compose_with_verls_config_and_pass_the_check():
    """docs/engines/verl.md's overrides for the thermostat compose with verl's ppo_trainer.yaml: verl then needs
    its reference policy (need_reference_policy, what starts the reference worker) and check_verl_config passes;
    without use_kl_loss (and use_kl_in_reward) verl would run no reference worker, and the check refuses."""
    import os

    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.utils import need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass

    from rlvr_entropy.verl.hooks import check_verl_config
    from rlvr_entropy.verl.state import EngineState

    pre = "actor_rollout_ref.actor."
    base = [pre + "policy_loss._target_=rlvr_entropy.verl.config.EntropyPolicyLossConfig",
            pre + "policy_loss.loss_mode=rle_thermostat",
            pre + "calculate_entropy=True", pre + "ppo_micro_batch_size_per_gpu=2", pre + "ppo_mini_batch_size=8"]
    d = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    cases = {"doc": ([pre + "use_kl_loss=True", pre + "kl_loss_coef=0"], True),
             "in_reward": ([pre + "use_kl_loss=False", "algorithm.use_kl_in_reward=True"], True),
             "neither": ([pre + "use_kl_loss=False", "algorithm.use_kl_in_reward=False"], False)}
    for name, (extra, ok) in cases.items():
        with initialize_config_dir(config_dir=d, version_base=None):
            cfg = compose("ppo_trainer", overrides=base + extra)
        actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
        assert actor.policy_loss.method == "thermostat" and actor.policy_loss.method_config == {}
        assert EngineState().method("thermostat", actor).needs == ("ref_log_prob",)  # its defaults read the reference
        assert bool(need_reference_policy(cfg)) is ok, name
        if ok:
            check_verl_config("thermostat", actor, cfg.actor_rollout_ref.model, cfg.algorithm)
        else:
            with pytest.raises(ValueError, match="use_kl_loss=True"):
                check_verl_config("thermostat", actor, cfg.actor_rollout_ref.model, cfg.algorithm)
        if name == "doc":
            assert actor.kl_loss_coef == 0
