"""The lean loop on a tiny model: every registered method trains, writes metrics, resumes exactly."""
import json
from math import comb
from pathlib import Path

import pytest
import torch

import rlvr_entropy
from rlvr_entropy.testbed import metrics as M
from rlvr_entropy.testbed.tasks import Task
from rlvr_entropy.testbed.train import TrainConfig, grpo_advantages, train

TINY = dict(width=32, layers=1, heads=2, mlp=64, warm_start_steps=0, prompts_per_step=4, samples_per_prompt=4,
            eval_problems=4, eval_samples=4, eval_k=2, eval_every=1, checkpoint_every=1)


@pytest.fixture(autouse=True)
def _parity_reward(monkeypatch, tmp_path):
    # A random tiny model never solves Countdown; reward even-length responses so advantages are not all zero.
    monkeypatch.setattr(Task, "verify", lambda self, p, r: len(r) % 2 == 0)
    monkeypatch.setenv("RLVR_ENTROPY_CACHE", str(tmp_path / "cache"))


def _rows(d):
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", rlvr_entropy.available_methods())
def test_two_steps_change_parameters_and_write_metrics(method, tmp_path):
    from rlvr_entropy.testbed.model import build_model
    from rlvr_entropy.testbed.tokenizer import CharTokenizer

    cfg = TrainConfig(steps=2, **TINY)
    res = train(method, cfg, tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all("eval/pass@1" in r and "eval/entropy" in r for r in rows)
    assert all(f"{method}/clip_frac" in r or any(k.startswith(f"{method}/") for k in r) for r in rows[1:])
    assert 0.0 <= res["eval/pass@k"] <= 1.0
    init = build_model(CharTokenizer().vocab_size, cfg.model, seed=cfg.warm_start_seed).state_dict()
    final = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["model"]
    assert any(not torch.equal(init[k], final[k]) for k in init)


@pytest.mark.parametrize("method", sorted({"grpo"} | {m for m in rlvr_entropy.available_methods()
                                                      if rlvr_entropy.make_method(m).controllers()}))
def test_resume_continues_step_count_and_restores_state(method, tmp_path):
    straight, split = tmp_path / "a", tmp_path / "b"
    train(method, TrainConfig(steps=3, **TINY), straight, progress=False)
    train(method, TrainConfig(steps=2, **TINY), split, progress=False)
    mid = torch.load(split / "ckpt.pt", weights_only=False)
    with (split / "metrics.jsonl").open("a") as f:  # a step written after the checkpoint must be dropped
        f.write(json.dumps({"step": 3, "junk": 1}) + "\n")
    train(method, TrainConfig(steps=3, **TINY), split, progress=False)
    ra, rb = _rows(straight), _rows(split)
    assert [r["step"] for r in rb] == [0, 1, 2, 3] and "junk" not in rb[-1]
    for x, y in zip(ra, rb):  # everything but timings
        assert {k: v for k, v in x.items() if not k.endswith("_s")} == pytest.approx(
            {k: v for k, v in y.items() if not k.endswith("_s")}, nan_ok=True)
    a_end = torch.load(straight / "ckpt.pt", weights_only=False)
    b_end = torch.load(split / "ckpt.pt", weights_only=False)
    assert b_end["step"] == 3 and mid["step"] == 2
    assert a_end["method_state"] == b_end["method_state"]
    for k in a_end["model"]:
        assert torch.equal(a_end["model"][k], b_end["model"][k])


def test_pass_at_k_is_the_unbiased_estimator():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5 ("any correct in the first 2" would give 0 or 1)
    assert M.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert M.pass_at_k(8, 0, 8) == 0.0 and M.pass_at_k(8, 1, 8) == 1.0 and M.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                # reference: probability that a random k-subset of the n samples holds a correct one
                ref = 1 - comb(n - c, k) / comb(n, k)
                assert M.pass_at_k(n, c, k) == pytest.approx(ref)
    assert M.mean_pass_at_k([[True, False, False, False], [True] * 4], 2) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        M.pass_at_k(4, 1, 5)


def test_maj_and_distinct():
    assert M.maj_at_k(["22", "21", "22", None], "22", 4)
    assert not M.maj_at_k([None, None, "22"], "22", 3)
    assert not M.maj_at_k(["21", "22"], "22", 2)  # tie -> earliest
    assert M.maj_at_k(["a", "b", "b"], lambda r: r == "b", 3) and not M.maj_at_k(["a", "b"], lambda r: r == "b", 2)
    assert M.distinct_correct(["a", "a", "b", "c"], [True, True, True, False]) == 2


def test_grpo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = grpo_advantages(r, 4, std_norm=False)
    assert torch.allclose(a, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    s = grpo_advantages(r, 4, std_norm=True)
    assert torch.allclose(s[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6))  # unbiased std = 0.5
    assert torch.equal(s[4:], torch.zeros(4))


def test_warm_start_is_cached_by_recipe(tmp_path, monkeypatch):
    from rlvr_entropy.testbed import train as T
    from rlvr_entropy.testbed.tasks import get_task
    from rlvr_entropy.testbed.tokenizer import CharTokenizer

    tok, task = CharTokenizer(), get_task("countdown3")
    cfg = TrainConfig(**{**TINY, "warm_start_steps": 3, "warm_start_batch": 8})
    a = T.initial_model(cfg, task, tok)
    files = list((tmp_path / "cache" / "warm_start").glob("countdown3-*.pt"))
    assert len(files) == 1
    monkeypatch.setattr(T, "warm_start", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    b = T.initial_model(cfg, task, tok)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    fresh = T.build_model(tok.vocab_size, cfg.model, seed=0).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in a.state_dict().items())  # it did train
    other = TrainConfig(**{**TINY, "warm_start_steps": 4, "warm_start_batch": 8})
    assert T.warm_start_key(other, tok.vocab_size) != T.warm_start_key(cfg, tok.vocab_size)
    assert T.warm_start_key(TrainConfig(**{**TINY, "warm_start_steps": 3, "warm_start_batch": 8, "lr": 1.0}),
                            tok.vocab_size) == T.warm_start_key(cfg, tok.vocab_size)  # RL settings do not matter


def test_prepare_hook_gets_the_first_rollout():
    from rlvr_entropy.testbed.train import _prepare_method

    seen = []

    class WithHook:
        def prepare(self, batch):
            seen.append(batch)

    _prepare_method(WithHook(), "batch")
    _prepare_method(object(), "ignored")  # no hook: nothing happens
    assert seen == ["batch"]


@pytest.mark.parametrize("task_name", ["countdown3", "countdown4", "arith"])
def test_default_warm_starts_are_shipped_and_load(task_name, tmp_path, monkeypatch):
    """The evidence tasks' default-recipe warm starts ship with the package, so runs repeat across machines: an
    empty cache loads the shipped copy instead of training."""
    from rlvr_entropy.testbed import train as T
    from rlvr_entropy.testbed.tasks import get_task
    from rlvr_entropy.testbed.tokenizer import CharTokenizer

    monkeypatch.setenv("RLVR_ENTROPY_CACHE", str(tmp_path / "empty"))
    tok, task = CharTokenizer(), get_task(task_name)
    cfg = TrainConfig(task=task_name)
    shipped = Path(T.__file__).parent / "assets" / f"{task_name}-{T.warm_start_key(cfg, tok.vocab_size)}.pt"
    assert shipped.exists(), f"{shipped.name} not shipped"
    monkeypatch.setattr(T, "warm_start", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    model = T.initial_model(cfg, task, tok)
    state = torch.load(shipped, map_location="cpu", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_default_checkpoints_are_frequent():
    assert 1 <= TrainConfig().checkpoint_every <= 5


def test_killed_subprocess_resumes_with_the_same_metrics(tmp_path):
    """A run killed (SIGKILL) mid-way by the OS loses at most checkpoint_every steps, says where it resumes from,
    and ends with the metrics of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "RLVR_ENTROPY_CACHE": str(tmp_path / "cache")}
    over = [f"{k}={v}" for k, v in TINY.items() if k != "checkpoint_every"] + ["eval_every=4"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def cmd(out):
        return [sys.executable, "-m", "rlvr_entropy", "run", "--method", "thermostat", "--steps", "14", "--out",
                str(out), "--no-plots", *over]

    assert subprocess.run(cmd(straight), env=env, capture_output=True, text=True).returncode == 0
    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for step 7 (checkpoint at 5)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()]
    ck = torch.load(killed / "ckpt.pt", weights_only=False)
    assert ck["step"] % 5 == 0 and 0 < max(done) - ck["step"] <= 5
    r = subprocess.run(cmd(killed), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {killed} from step {ck['step']}" in r.stderr
    ra, rb = _rows(straight), _rows(killed)
    assert [x["step"] for x in rb] == list(range(15))
    for x, y in zip(ra, rb):  # everything but timings
        assert {k: v for k, v in x.items() if not k.endswith("_s")} == pytest.approx(
            {k: v for k, v in y.items() if not k.endswith("_s")}, nan_ok=True)


def test_seq_mean_token_sum_norm_takes_the_testbed_response_length(tmp_path):
    """SIREN's paper aggregation divides by 3072 tokens; the testbed's responses are at most max_response_len long:
    the run uses that length (recorded in config.json) and logs a line; a user's norm_length is kept."""
    from rlvr_entropy.testbed.tasks import get_task

    lines = []
    cfg = TrainConfig(steps=1, **TINY)
    train("siren", cfg, tmp_path / "a", progress=False, log=lines.append)
    n = get_task(cfg.task).max_response_len
    got = json.loads((tmp_path / "a" / "config.json").read_text())
    assert got["method_config"]["norm_length"] == n and got["method_overrides"] == {}
    assert any(f"max completion length {n}" in x and "3072" in x for x in lines)
    lines.clear()
    train("siren", cfg, tmp_path / "b", {"norm_length": 100}, progress=False, log=lines.append)
    got = json.loads((tmp_path / "b" / "config.json").read_text())
    assert got["method_config"]["norm_length"] == 100 and not any("max completion length" in x for x in lines)


INERT = [m for m in rlvr_entropy.available_methods()
         if rlvr_entropy.get_method_class(m).zero_advantage_rows_inert]


@pytest.mark.parametrize("reward", ["mixed", "none"])
@pytest.mark.parametrize("method", INERT)
def test_skipping_zero_advantage_rows_trains_the_same(method, reward, tmp_path, monkeypatch):
    """A method whose zero-advantage rows are inert trains the same with their forward skipped: same records,
    same parameters (to float rounding); half the groups here are all wrong, so rows really are skipped."""
    import rlvr_entropy.testbed.train as T

    if reward == "mixed":  # groups of prompts with an even first number all fail: their rows have advantage 0
        monkeypatch.setattr(Task, "verify", lambda self, p, r: int(p.prompt[0]) % 2 == 1 and len(r) % 2 == 0)
    else:
        monkeypatch.setattr(Task, "verify", lambda self, p, r: False)
    seen = []
    real = T._live_log_prob
    monkeypatch.setattr(T, "_live_log_prob", lambda *a: seen.append(a[4].float().mean()) or real(*a))
    cfg = TrainConfig(steps=3, **{**TINY, "prompts_per_step": 8})
    train(method, cfg, tmp_path / "lean", progress=False)
    assert seen and min(seen) < 1.0
    monkeypatch.setattr(rlvr_entropy.get_method_class(method), "zero_advantage_rows_inert", False)
    n = len(seen)
    train(method, cfg, tmp_path / "full", progress=False)
    assert len(seen) == n  # the full path never skips
    a, b = _rows(tmp_path / "lean"), _rows(tmp_path / "full")
    keep = ("step", "reward", "entropy", "response_len", "eval/pass@1", "eval/entropy", f"{method}/loss")
    for x, y in zip(a, b):
        assert {k: x[k] for k in keep if k in x} == pytest.approx({k: y[k] for k in keep if k in y}, rel=1e-4)
    pa = torch.load(tmp_path / "lean" / "ckpt.pt", weights_only=False)["model"]
    pb = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)["model"]
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6)
    if reward == "none":
        assert max(seen) == 0.0
