"""verl plugin: registration on `import verl`, the entropy-aware ppo_loss on a real verl TensorDict, configs."""
from __future__ import annotations

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
    code = ("import verl\nfrom verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R\n"
            "print(','.join(sorted(k for k in R if k.startswith('rle_'))))\n"
            "print('clip_cov' in R and R['clip_cov'] is not R['rle_clip_cov'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[-2].split(",") == ["rle_" + n for n in available_methods()]
    assert lines[-1] == "True"  # verl's own clip_cov untouched


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
def _tiny_batch(seed=0, B=4, idx=None, return_logits=False):
    from verl.utils import tensordict_utils as tu
    from tests.engines.tiny_hf import make_model, make_tokenizer

    torch.manual_seed(seed)
    model = make_model(make_tokenizer(), hidden=16, layers=1, seed=seed).float()
    V = model.config.vocab_size
    plens, rlens = [3, 2, 4, 3][:B], [5, 3, 1, 4][:B]
    prompts = [torch.randint(3, V, (p,)) for p in plens]
    resps = [torch.randint(3, V, (r,)) for r in rlens]
    lps, ents, rmpad = [], [], []
    for p, r in zip(prompts, resps):
        seq = torch.cat([p, r])
        logits = model(input_ids=seq[None]).logits[0].float()
        rmpad.append(logits)
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
    # what verl's FSDP engine builds with remove-padding: [nnz, V], position j predicts token j + 1
    model_output_logits = torch.cat([rmpad[i] for i in idx])
    if return_logits:
        return model, data, model_output, model_output_logits
    return model, data, model_output


def _loss(fn, config, model_output, data):
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
    cfg = _actor_config(loss_mode="rle_forking_tokens")
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="calculate_entropy=True"):
        get_policy_loss_fn("rle_forking_tokens")(lp, lp, torch.ones(2, 3), torch.ones(2, 3, dtype=bool),
                                                  "token-mean", cfg, None)


def test_micro_batch_split_invariance_token_mean():
    """Summing the micro-batch losses of a split mini-batch equals the loss of the whole (verl's convention)."""
    from rlvr_entropy.verl.loss import entropy_ppo_loss, set_step

    cases = [("grpo", {}), ("entropy_advantage", {}),
             ("grpo", {"loss_agg_mode": "seq-mean-token-sum-norm", "loss_scale_factor": 8}),
             ("grpo", {"loss_agg_mode": "seq-mean-token-mean"})]
    for name, over in cases:
        _, data, out = _tiny_batch(seed=5)
        cfg = _actor_config(loss_mode=f"rle_{name}")
        for k, v in over.items():
            object.__setattr__(cfg, k, v)
        set_step(1)
        whole, _ = _loss(entropy_ppo_loss, cfg, out, data)
        parts = 0.0
        for idx in ([0, 1], [2, 3]):  # same global batch_num_tokens / global_batch_size in each micro-batch
            _, sub, sub_out = _tiny_batch(seed=5, idx=idx)
            parts = parts + _loss(entropy_ppo_loss, cfg, sub_out, sub)[0]
        set_step(None)
        torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-7)


def test_checkpoint_hook_wraps_save_and_load(tmp_path):
    """The wrapper keeps verl's @register attributes, writes the state next to the checkpoint, restores it."""
    from rlvr_entropy.verl import state
    from rlvr_entropy.verl.loss import METHODS, method_for

    calls = []

    class FakeWorker:
        def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
            calls.append(("save", local_path))

        def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
            calls.append(("load", local_path))

    FakeWorker.save_checkpoint.attrs_from_register = "dispatch"
    state._wrap(FakeWorker)
    state._wrap(FakeWorker)  # idempotent
    assert FakeWorker.save_checkpoint.attrs_from_register == "dispatch"
    cfg = _actor_config(loss_mode="rle_grpo")
    method_for("grpo", cfg)
    from rlvr_entropy.verl.loss import _STEP

    _STEP["step"] = 42
    FakeWorker().save_checkpoint(str(tmp_path), global_step=3)
    _STEP["step"] = 0
    assert (tmp_path / "rlvr_entropy_state_rank0.pt").exists()
    METHODS.clear()
    FakeWorker().load_checkpoint(str(tmp_path))
    assert calls == [("save", str(tmp_path)), ("load", str(tmp_path))]
    assert _STEP["step"] == 42  # restored by the wrapped load_checkpoint
    FakeWorker().load_checkpoint(str(tmp_path / "missing"))  # old checkpoint: warning only


def test_checks_and_state_round_trip(tmp_path):
    from rlvr_entropy.verl import hooks, state
    from rlvr_entropy.verl.loss import METHODS, method_for

    cfg = _actor_config(loss_mode="rle_siren")
    hooks.check_verl_config("siren", cfg, {"use_fused_kernels": False})
    with pytest.raises(ValueError, match="use_fused_kernels=False"):
        hooks.check_verl_config("siren", cfg, {"use_fused_kernels": True})
    with pytest.raises(ValueError, match="use_remove_padding=True"):
        hooks.check_verl_config("siren", cfg, {"use_remove_padding": False})
    assert hooks.needs_entropy("forking_tokens") and not hooks.needs_entropy("grpo")
    noent = _actor_config(loss_mode="rle_forking_tokens")
    object.__setattr__(noent, "calculate_entropy", False)
    with pytest.raises(ValueError, match="calculate_entropy"):
        hooks.check_verl_config("forking_tokens", noent)
    from rlvr_entropy import TokenBatch

    METHODS.pop("siren", None)
    m = method_for("siren", cfg)
    fresh = repr(m.state_dict())
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(2, 3, 11, generator=g, requires_grad=True)
    lp = torch.log_softmax(lg, -1)[..., 0]
    m.compute_loss(TokenBatch(log_prob=lp, old_log_prob=lp.detach(), advantages=torch.tensor([1.0, -1.0]),
                              mask=torch.ones(2, 3, dtype=bool), logits=lg), step=5)
    sd = m.state_dict()
    assert repr(sd) != fresh  # the anchor was set: the round trip below is not vacuous
    state.save_state(str(tmp_path / "s.pt"))
    METHODS.pop("siren")
    assert state.load_state(str(tmp_path / "s.pt"))
    m2 = method_for("siren", cfg)
    assert m2 is not m and repr(m2.state_dict()) == repr(sd)


def test_logits_hook_delivers_temperature_scaled_response_logits():
    """siren / lp_reg through entropy_ppo_loss with logits captured from verl's own temperature-scaling function
    equal the method on a TokenBatch built directly from the response logits / T; gradients reach the model."""
    import functools

    from verl.workers.engine.fsdp import transformer_impl as ti

    from rlvr_entropy import TokenBatch, make_method
    from rlvr_entropy.verl import hooks
    from rlvr_entropy.verl.loss import METHODS, entropy_ppo_loss, set_step

    assert hooks.install_logits_hook()
    temp = 0.7
    for name in ("siren", "lp_reg"):
        if name not in available_methods():
            continue
        model, data, out, rmpad = _tiny_batch(seed=7, return_logits=True)
        cfg = _actor_config(loss_mode=f"rle_{name}")
        loss_fn = functools.partial(entropy_ppo_loss, config=cfg)
        assert hooks.wants_logits(loss_fn, False) and not hooks.wants_logits(loss_fn, True)
        # recompute log-probs / entropy from the scaled logits, as verl does after scaling
        METHODS.pop(name, None)
        set_step(1)
        with hooks.capture_logits():
            scaled = ti._scale_logits_by_temperature(rmpad, torch.tensor(temp), is_unit_temperature=False)
            out = _outputs_from_rmpad(scaled, data)
            loss, metrics = loss_fn(model_output=out, data=data)
        set_step(None)
        # reference: padded response logits by hand
        from verl.workers.utils.padding import no_padding_2_padding

        lp = no_padding_2_padding(out["log_probs"], data)
        pd = data.select("response_mask", "old_log_probs", "advantages").to_padded_tensor()
        resp_logits = []
        off = 0
        for p, r in zip(data["prompts"].unbind(), data["responses"].unbind()):
            L = len(p) + len(r)
            x = (rmpad[off: off + L] / temp)[len(p) - 1: L - 1]
            resp_logits.append(torch.nn.functional.pad(x, (0, 0, 0, lp.shape[1] - len(r))))
            off += L
        ref = make_method(name, **_pg(cfg, name)).compute_loss(TokenBatch(
            log_prob=lp, old_log_prob=pd["old_log_probs"], advantages=pd["advantages"],
            mask=pd["response_mask"].bool(), logits=torch.stack(resp_logits),
            entropy=no_padding_2_padding(out["entropy"], data)), step=1).loss
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        assert any(k.startswith(f"actor/{name}/") for k in metrics)
        model.zero_grad()
        loss.backward()
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    # nothing captured (fused kernels / hook missing): a clear error
    _, data, out = _tiny_batch(seed=7)
    with pytest.raises(ValueError, match="use_fused_kernels=False"):
        entropy_ppo_loss(_actor_config(loss_mode="rle_siren"), out, data)


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
    from rlvr_entropy.verl.loss import method_for

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
    c = method_for("siren", actor).config
    assert (c.top_p, c.beta, c.norm_length, c.dual_clip, c.loss_agg_mode) == (
        0.7, 0.01, 3072, 3.0, "seq-mean-token-sum-norm")
    check_verl_config("siren", actor, cfg.actor_rollout_ref.model)
    with initialize_config_dir(config_dir=d, version_base=None):
        bad = compose("ppo_trainer", overrides=overrides + ["+" + pre + "policy_loss.method_config.topp=0.7"])
    from hydra.errors import InstantiationException

    with pytest.raises((ValueError, InstantiationException), match="topp"):
        omega_conf_to_dataclass(bad.actor_rollout_ref.actor)


def test_logits_hook_through_verls_real_prepare_model_outputs():
    """verl's own FSDP prepare_model_outputs (remove-padding path, run on CPU with a stand-in engine) produces
    log-probs and entropy; the hook captures its temperature-scaled logits; siren's loss arrives with gradient and a
    static tail pad (pad_size) is dropped."""
    import types

    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.dataset_utils import DatasetPadMode
    from verl.workers.engine.fsdp import transformer_impl as ti

    from rlvr_entropy.verl import hooks
    from rlvr_entropy.verl.loss import entropy_ppo_loss, set_step

    assert hooks.install_logits_hook()
    model, data, _, rmpad = _tiny_batch(seed=11, return_logits=True)
    seqs = [torch.cat([p, r]) for p, r in zip(data["prompts"].unbind(), data["responses"].unbind())]
    ids = torch.cat(seqs)
    pad = 3  # what _get_packed_pad_size may append at the tail
    logits = torch.cat([rmpad, rmpad.new_zeros(pad, rmpad.shape[1])])
    temp = 0.6
    input_ids = torch.nested.as_nested_tensor(seqs, layout=torch.jagged)
    data["input_ids"] = input_ids
    tu.assign_non_tensor(data, use_remove_padding=True, pad_mode=DatasetPadMode.NO_PADDING, calculate_entropy=True)
    import verl.utils.torch_functional as verl_F

    fake = types.SimpleNamespace(
        engine_config=types.SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False),
        compute_entropy_from_logits=verl_F.entropy_from_logits, use_ulysses_sp=False)
    fake._gather_and_unpad_packed = types.MethodType(ti.FSDPEngine._gather_and_unpad_packed, fake)
    output_args = {"input_ids_rmpad_rolled": torch.cat([torch.roll(ids, -1), ids.new_zeros(pad)]),
                   "temperature_rmpad": torch.full((ids.numel() + pad,), temp), "pad_size": pad,
                   "temperature_is_one": False}
    cfg = _actor_config(loss_mode="rle_siren")
    from rlvr_entropy.verl.loss import METHODS

    METHODS.pop("siren", None)  # fresh anchor, measured on this batch
    set_step(1)
    with hooks.capture_logits():
        out = ti.FSDPEngineWithLMHead.prepare_model_outputs(
            fake, output=types.SimpleNamespace(logits=logits[None]), output_args=output_args, micro_batch=data,
            logits_processor_func=None)
        loss, metrics = entropy_ppo_loss(cfg, out, data)
    set_step(None)
    assert torch.isfinite(loss) and any(k.startswith("actor/siren/") for k in metrics)
    model.zero_grad()
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    # same loss from our own hand-made outputs (same scaled logits): the captured slice is the right one
    set_step(2)
    METHODS.pop("siren", None)
    with hooks.capture_logits():
        scaled = ti._scale_logits_by_temperature(rmpad.detach(), torch.tensor(temp), is_unit_temperature=False)
        loss2, _ = entropy_ppo_loss(cfg, _outputs_from_rmpad(scaled, data), data)
    set_step(None)
    torch.testing.assert_close(loss.detach(), loss2.detach(), rtol=1e-4, atol=1e-6)


def test_step_detection():
    from rlvr_entropy.verl.loss import _detect_step, set_step

    set_step(None)
    m2 = torch.ones(1, 2, dtype=bool)
    s0 = _detect_step(m2, {"batch_num_tokens": 4, "dp_size": 1})
    assert _detect_step(m2, {"batch_num_tokens": 4, "dp_size": 1}) == s0  # 2 + 2 = 4 tokens: same mini-batch
    assert _detect_step(m2, {"batch_num_tokens": 4, "dp_size": 1}) == s0 + 1  # the next one, same size
    assert _detect_step(m2, {"batch_num_tokens": 6, "dp_size": 2}) == s0 + 2  # count changed
    assert _detect_step(m2, {"batch_num_tokens": 6, "dp_size": 2}) == s0 + 2
    assert _detect_step(m2, {"batch_num_tokens": 6, "dp_size": 2}) == s0 + 2  # dp > 1: only a change counts
    set_step(7)
    assert _detect_step(m2, {"batch_num_tokens": 9, "dp_size": 1}) == 7
    set_step(None)


def test_clip_cov_and_kl_cov_ignore_clip_ratio_c_like_verl():
    from rlvr_entropy.verl.loss import method_for

    for name in ("clip_cov", "kl_cov"):
        assert method_for(name, _actor_config(loss_mode=f"rle_{name}")).config.dual_clip is None
    assert method_for("grpo", _actor_config(loss_mode="rle_grpo")).config.dual_clip == 3.0
