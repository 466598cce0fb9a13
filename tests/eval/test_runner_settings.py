"""Evaluation settings: device, dtype, backend selection (vLLM absent here: a clear error when asked for it; a fake
vLLM module drives the vLLM route end to end), CPU-sized defaults and the lines that say what runs."""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import sys
import types

import pytest
import torch

from rlvr_entropy.eval import runner
from rlvr_entropy.eval.runner import (ACCELERATOR_DEFAULTS, CPU_DEFAULTS, EvalSettingsError, resolve_device,
                                      resolve_dtype, resolve_settings, select_backend)
from tests.eval.test_benchmarks import DATA, _tiny_model

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@needs_no_cuda
def test_device_auto_and_explicit():
    assert resolve_device(None) in ("cpu", "mps") and resolve_device("auto") == resolve_device(None)
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(EvalSettingsError, match=r"torch.cuda.is_available\(\) is False"):
        resolve_device("cuda")
    with pytest.raises(EvalSettingsError, match="not a torch device"):
        resolve_device("gpu0")


def test_device_auto_prefers_cuda(fake_cuda):
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"


def test_dtype(fake_cuda):
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype(None, "cuda") == "bfloat16"
    assert resolve_dtype("bf16", "cpu") == "bfloat16" and resolve_dtype("torch.float16", "cpu") == "float16"
    with pytest.raises(EvalSettingsError, match="dtype must be one of"):
        resolve_dtype("float64", "cpu")


def test_vllm_absent_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(runner, "vllm_available", lambda: False)
    with pytest.raises(EvalSettingsError, match=r"vLLM is not installed: `pip install vllm`.*--backend transformers"):
        select_backend("vllm", "cuda", "some/model")
    assert select_backend("auto", "cuda", "some/model") == "transformers"
    assert select_backend("transformers", "cpu", "x") == select_backend("hf", "cpu", "x") == "transformers"
    with pytest.raises(EvalSettingsError, match="backend must be one of"):
        select_backend("onnx", "cpu", "x")


def test_vllm_is_real_absent_here():
    """This environment has no vLLM: the selection above is the one users without it get."""
    if runner.vllm_available():
        pytest.skip("vLLM is installed here")
    assert select_backend("auto", "cuda", "m") == "transformers"


def test_auto_picks_vllm_only_on_cuda_with_a_path(monkeypatch):
    monkeypatch.setattr(runner, "vllm_available", lambda: True)
    assert select_backend("auto", "cuda", "some/model") == "vllm"
    assert select_backend("auto", "cuda:0", "some/model") == "vllm"
    assert select_backend("auto", "cpu", "some/model") == "transformers"
    loaded = torch.nn.Linear(1, 1)
    assert select_backend("auto", "cuda", loaded) == "transformers"
    with pytest.raises(EvalSettingsError, match="needs a model path"):
        select_backend("vllm", "cuda", loaded)


@needs_no_cuda
def test_cpu_sized_defaults():
    st = resolve_settings("m", device="cpu")
    assert (st.n, st.max_new_tokens, st.batch_size) == (CPU_DEFAULTS["n"], CPU_DEFAULTS["max_new_tokens"],
                                                        CPU_DEFAULTS["batch_size"])
    assert st.cpu_defaults and st.backend == "transformers" and st.dtype == "float32"
    st = resolve_settings("m", device="cpu", n=2, max_new_tokens=8, batch_size=4)
    assert not st.cpu_defaults and (st.n, st.max_new_tokens, st.batch_size) == (2, 8, 4)
    with pytest.raises(EvalSettingsError, match="n must be >= 1"):
        resolve_settings("m", device="cpu", n=0)


def test_accelerator_defaults(fake_cuda, monkeypatch):
    monkeypatch.setattr(runner, "vllm_available", lambda: False)
    st = resolve_settings("m")
    assert st.device == "cuda" and st.dtype == "bfloat16" and not st.cpu_defaults
    assert (st.n, st.max_new_tokens, st.batch_size) == tuple(ACCELERATOR_DEFAULTS[k] for k in
                                                             ("n", "max_new_tokens", "batch_size"))


def test_loaded_model_keeps_its_device_and_dtype():
    m = torch.nn.Linear(2, 2).to(torch.bfloat16)
    m.device = torch.device("cpu")  # what transformers models expose
    m.dtype = torch.bfloat16
    st = resolve_settings(m, n=1, max_new_tokens=1, batch_size=1)
    assert st.device == "cpu" and st.dtype == "bfloat16"


def test_cli_vllm_error_before_loading_anything(tmp_path, capsys, monkeypatch):
    from rlvr_entropy import cli

    monkeypatch.setattr(runner, "vllm_available", lambda: False)
    rc = cli.main(["eval", "--model", str(tmp_path / "does-not-exist"), "--backend", "vllm", "--out",
                   str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "vLLM is not installed" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@needs_no_cuda
def test_cli_says_what_runs_and_that_defaults_are_cpu_sized(tmp_path, capsys):
    from rlvr_entropy.eval.cli import add_eval_arguments, run_eval

    mdir = _tiny_model(tmp_path)
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(mdir), "--benchmarks", "gsm8k", "--n", "2", "--max-new-tokens", "4", "--data-dir",
         str(DATA), "--out", str(tmp_path / "o"), "--limit", "1"])
    assert args.n == 2 and args.batch_size is None and args.device == "auto" and args.backend == "auto"
    assert run_eval(args) == 0
    err = capsys.readouterr().err
    assert "backend=transformers device=cpu dtype=float32 n=2 max_new_tokens=4 batch_size=8" in err
    assert "CPU-sized defaults" in err and "generated 2 samples" in err


def test_explicit_dtype_converts_a_loaded_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mdir = _tiny_model(tmp_path)
    model, tok = AutoModelForCausalLM.from_pretrained(mdir), AutoTokenizer.from_pretrained(mdir)
    runner.evaluate(model, tok, "gsm8k", n=1, max_new_tokens=2, batch_size=1, data_dir=DATA, limit=1,
                    out_dir=tmp_path / "o", device="cpu", dtype="bfloat16", progress=False, log=None)
    assert model.dtype == torch.bfloat16
    assert json.loads((tmp_path / "o" / "settings.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------ the vLLM route, with a fake vllm module
class _Out:
    def __init__(self, text, finish):
        self.text, self.finish_reason, self.token_ids = text, finish, [0] * len(text.split())


class _FakeLLM:
    instances: list = []

    def __init__(self, model, dtype, seed):
        self.kw = dict(model=model, dtype=dtype, seed=seed)
        self.calls = []
        _FakeLLM.instances.append(self)

    def generate(self, prompts, params):
        self.calls.append((list(prompts), params))
        outs = [[_Out("so $3 each, 3 * 6 = $18.\nAnswer: 18 dollars", "stop")] + [_Out("Answer: 7", "length")] *
                (params.n - 1) for _ in prompts]
        return [types.SimpleNamespace(outputs=o) for o in outs]


def _fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    mod.LLM = _FakeLLM
    mod.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    _FakeLLM.instances = []


def test_vllm_route_same_grading_same_files(tmp_path, monkeypatch, capsys):
    _fake_vllm(monkeypatch)
    assert runner.vllm_available()
    mdir = _tiny_model(tmp_path)
    tables = runner.evaluate(str(mdir), None, "gsm8k,aime24", n=3, max_new_tokens=16, temperature=0.5,
                             data_dir=DATA, limit=2, out_dir=tmp_path / "o", backend="vllm", device="cpu",
                             progress=False)
    assert "backend=vllm" in capsys.readouterr().err
    (llm,) = _FakeLLM.instances  # one engine for every benchmark
    assert llm.kw == {"model": str(mdir), "dtype": "float32", "seed": 0}
    assert len(llm.calls) == 2 and all(p.n == 3 and p.max_tokens == 16 and p.temperature == 0.5
                                       for _, p in llm.calls)
    recs = [json.loads(x) for x in (tmp_path / "o" / "gsm8k.answers.jsonl").read_text().splitlines()]
    assert len(recs) == 6
    first = [r for r in recs if r["sample"] == 0]
    assert all(r["answer"] == "18" and r["truncated"] is False for r in first)
    assert [r["correct"] for r in first] == [r["gold"] == "18" for r in first]  # gsm8k/0's gold is 18
    assert all(r["answer"] == "7" and r["truncated"] for r in recs if r["sample"] > 0)
    assert tables["gsm8k"]["problems"] == 2 and tables["gsm8k"]["avg@k"]["1"] == pytest.approx(0.5)
