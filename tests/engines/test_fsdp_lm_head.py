"""The tiled LM head on FSDP2-sharded weights (what the verl plugin does when verl's engine has resharded the root
after its forward): 2 gloo ranks, each with its own data, give every parameter the gradient one process computes for
the mean of both ranks' losses (FSDP averages gradients over ranks; the gathered weight's gradient must be averaged
alike and accumulate with FSDP's own). Harness: tests/engines/fsdp_lm_head_run.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "engines"))


def test_gathered_lm_head_gradients_on_two_ranks_equal_one_process(tmp_path):
    import fsdp_lm_head_run as run

    out = tmp_path / "grads.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "tests" / "engines" / "fsdp_lm_head_run.py"), str(out)],
                       capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = torch.load(out)
    assert got["weight_kind"] == "DTensor"  # the loss really saw a shard: the gather is exercised
    model = run.make_model()
    loss = sum(run.rank_loss(model, run.rank_data(r), model.lm_head.weight) for r in range(2)) / 2
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got["grads"]) == set(ref)
    for n, g in ref.items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)
    # not vacuous: had the gathered weight lost its gradient, the tied weight's would differ by this much
    model.zero_grad()
    (sum(run.rank_loss(model, run.rank_data(r), model.lm_head.weight.detach()) for r in range(2)) / 2).backward()
    name = "model.embed_tokens.weight"  # tied: lm_head.weight is this parameter
    assert (model.model.embed_tokens.weight.grad - ref[name]).abs().max() > 1e-3
