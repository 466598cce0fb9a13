"""The launch commands in docs/engines/verl.md pass the validation verl's own trainer runs before training.

Each ```bash block that runs ``python -m verl.trainer.main_ppo`` is parsed (shlex, as a shell would), its hydra
overrides compose verl 0.9.1's ppo_trainer.yaml, and ``verl.trainer.main_ppo.main``'s checks run on the result:
``validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))``,
then the rlvr-entropy actor config is built (``omega_conf_to_dataclass``, as the worker does) and checked with
``check_verl_config``. So the doc cannot drift from what verl accepts.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("verl")

DOC = Path(__file__).resolve().parents[2] / "docs" / "engines" / "verl.md"
ENTRY = ["python", "-m", "verl.trainer.main_ppo"]


def launch_commands() -> dict[str, list[str]]:
    """{experiment name: hydra overrides} of every main_ppo command in the doc."""
    out = {}
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S):
        words = shlex.split(block.replace("\\\n", " "))
        if not any(words[i:i + 3] == ENTRY for i in range(len(words))):
            continue
        i = next(i for i in range(len(words)) if words[i:i + 3] == ENTRY)
        env, overrides = words[:i], words[i + 3:]
        assert all(re.fullmatch(r"[A-Z_]+=\S*", w) for w in env), env
        assert all("=" in o for o in overrides), overrides
        name = next(o.split("=", 1)[1] for o in overrides if o.startswith("trainer.experiment_name="))
        out[name] = [o.replace("$DATA", "/data") for o in overrides]
    return out


def test_the_doc_has_the_launch_commands_and_names_their_environment():
    assert sorted(launch_commands()) == ["siren-qwen25math7b-dapo", "steer-qwen25math7b-dapo"]
    text = DOC.read_text()
    assert 'pip install "verl[vllm]==0.9.1" "rlvr-entropy[verl]"' in text  # the v1 trainer's TransferQueue ...
    assert "`verl-core`" in text  # ... comes with verl's verl-core extra, which verl[vllm] includes


@pytest.mark.parametrize("name", sorted(launch_commands()))
def test_launch_command_passes_verls_validate_config(name):
    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.main_ppo import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    from rlvr_entropy.verl.config import EntropyPolicyLossConfig, method_from_loss_mode
    from rlvr_entropy.verl.hooks import check_verl_config

    overrides = launch_commands()[name]
    d = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(d), version_base=None):
        cfg = compose("ppo_trainer", overrides=overrides)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, EntropyPolicyLossConfig)
    method = method_from_loss_mode(actor.policy_loss.loss_mode)
    check_verl_config(method, actor, cfg.actor_rollout_ref.model)
    # the entropy-aware loss reaches the Ray workers, and the v1 trainer (the default) is what the doc describes
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.RLVR_ENTROPY_VERL_LOSS == "1"
    assert cfg.trainer.use_v1 is True


def test_a_command_missing_log_prob_micro_batch_size_fails_validation():
    """The check is real: the doc's commands before the fix (no log_prob_micro_batch_size_per_gpu) are refused."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.main_ppo import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    overrides = [o for o in launch_commands()["steer-qwen25math7b-dapo"]
                 if not o.startswith("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=")]
    d = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(d), version_base=None):
        cfg = compose("ppo_trainer", overrides=overrides)
    with pytest.raises(ValueError, match="log_prob_micro_batch_size"):
        validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
