"""EntropyGRPOTrainer trains the packaged real model (SmolLM2-135M-Instruct, rlvr_entropy.models) for two steps on
GSM8K-style prompts, through the public API, with grpo, siren and thermostat.

Tiny settings so that it runs on 2 CPU cores: one prompt per step, two generations of at most 12 tokens. Skipped
without the ``real`` extra."""
from __future__ import annotations

import math
import os

import pytest

from rlvr_entropy.models import real_model_available

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not real_model_available(), reason="needs pip install 'rlvr-entropy[real]'")]
pytest.importorskip("trl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.eval.test_real_model import one_thread_on_a_busy_cpu  # noqa: E402,F401  (autouse fixture)

PROBLEMS = [  # short GSM8K-style word problems with integer answers
    ("Tom has 3 apples and buys 5 more. How many apples does he have?", "8"),
    ("A pen costs $2. How much do 4 pens cost in dollars?", "8"),
    ("Sara reads 10 pages a day. How many pages does she read in 3 days?", "30"),
    ("There are 12 eggs and 5 are eaten. How many eggs are left?", "7"),
]


def _dataset():
    from datasets import Dataset

    suffix = " Give the final answer after \"Answer:\"."
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": q + suffix}] for q, _ in PROBLEMS],
                              "answer": [a for _, a in PROBLEMS]})


def math_reward(completions, answer, **kwargs):
    """1 for a correct final answer (the library's grader), plus 0.1 per distinct digit written (at most 0.5): real
    outputs of a 135M model are rarely right, and a step needs reward differences to have advantages."""
    from rlvr_entropy.eval.grading import extract_answer, math_equal

    out = []
    for c, a in zip(completions, answer):
        text = c[0]["content"] if isinstance(c, list) else c
        out.append(float(math_equal(extract_answer(text), a)) + 0.1 * min(5, len(set(filter(str.isdigit, text)))))
    return out


@pytest.mark.parametrize("method", ["grpo", "siren", "thermostat"])
def test_two_steps_on_the_real_model(method, tmp_path):
    import torch
    from trl import GRPOConfig

    from rlvr_entropy.models import load_smollm2
    from rlvr_entropy.trl import EntropyGRPOTrainer

    model, tok = load_smollm2()
    model.train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2, num_generations=2,
                      generation_batch_size=2, max_completion_length=12, max_steps=2, learning_rate=1e-5,
                      logging_steps=1, report_to=[], save_strategy="no", bf16=False, seed=0, temperature=1.0,
                      beta=0.0)
    trainer = EntropyGRPOTrainer(model=model, reward_funcs=math_reward, args=args, train_dataset=_dataset(),
                                 processing_class=tok, method=method)
    assert trainer.processing_class.eos_token_id == 2  # <|im_end|>: generation stops where the model does
    # the thermostat's pull reads ref_log_prob: TRL loads its reference again from the model's directory
    assert (trainer.ref_model is not None) is (method == "thermostat") and trainer.beta == 0.0
    trainer.train()
    logs = trainer.state.log_history
    assert trainer.state.global_step == 2
    logged = set().union(*[set(h) for h in logs])
    assert "entropy" in logged and any(k.startswith(f"{method}/") for k in logged), sorted(logged)
    steps = [h for h in logs if "loss" in h]
    assert len(steps) == 2 and all(math.isfinite(h["loss"]) for h in steps)
    assert all(0.0 < h["entropy"] < math.log(49_152) for h in steps)  # nats, below the uniform bound
    changed = sum(not torch.equal(before[k], v) for k, v in model.named_parameters())
    if any(h.get("reward_std", 0.0) > 0 for h in steps) or method != "grpo":
        assert changed > 0, "parameters must change"
