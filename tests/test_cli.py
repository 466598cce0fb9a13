"""CLI on a tiny config: run, report, compare, demo, export, methods/config, errors, logs, report_to."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlvr_entropy import cli

TINY = ["width=32", "layers=1", "heads=2", "mlp=64", "warm_start_steps=0", "prompts_per_step=4",
        "samples_per_prompt=4", "eval_problems=4", "eval_samples=4", "eval_k=2", "eval_every=1"]


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RLVR_ENTROPY_CACHE", str(tmp_path / "cache"))


def _run(out, *extra, steps="2", method="grpo"):
    return cli.main(["run", "--method", method, "--steps", steps, "--out", str(out), "--quiet", *extra, *TINY])


def test_run_then_report(tmp_path, capsys):
    out = tmp_path / "r"
    assert _run(out, "eps_high=0.28") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method_config"]["eps_high"] == 0.28 and cfg["train"]["width"] == 32
    assert cfg["provenance"]["command"] and "commit" in cfg["provenance"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    (out / "summary.json").unlink()
    (out / "report.html").unlink()
    assert cli.main(["report", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())["methods"]["grpo"]
    for key in ("entropy_start", "entropy_end", "pass@1_start", "pass@1_end", "pass@k_start", "pass@k_end", "k",
                "maj@k_end", "distinct_correct_end", "wall_s", "pass@k_end_se", "gen_s_total", "update_s_total"):
        assert key in s, key
    assert s["k"] == 2 and s["se_over"] == "problems"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "grpo" in html
    for png in ("entropy.png", "pass_at_k.png", "pass_at_k_vs_k.png", "distinct_correct.png",
                "entropy_percentiles.png"):
        assert (out / png).stat().st_size > 0


def test_report_reads_like_a_results_section(tmp_path, capsys):
    out = tmp_path / "c"
    assert cli.main(["compare", "--methods", "grpo,siren", "--seeds", "0", "--steps", "2", "--out", str(out),
                     "--quiet", "--jobs", "1", "--frontier", "1.0,0.5", *TINY]) == 0
    printed = capsys.readouterr().out
    html = (out / "report.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    # provenance: command, commit, seeds, config
    prov = summary["provenance"]
    assert "compare" in prov["command"] and prov["seeds"] == [0] and prov["train"]["width"] == 32
    assert "commit" in prov and "Provenance" in html and "--methods grpo,siren" in html
    # a written verdict with its uncertainty, in the report and in the terminal
    v = summary["verdict"]
    assert v.startswith("GRPO") and "siren" in v and "How sure: one seed" in v
    assert "What the numbers show" in html and "How sure" in html and "How sure" in printed
    # captions that say what a figure shows, numbered
    assert "<b>Figure 1.</b> Entropy of each method" in html and "frontier" in html
    assert html.count("<figcaption>") >= 6
    # one set of column names, the same in the terminal and the HTML
    head = printed.splitlines()[0].split()
    assert head == ["method", "seeds", "entropy", "pass@1", "pass@2", "maj@2", "distinct", "correct", "train", "s"]
    for name in ("entropy", "pass@1", "pass@2", "maj@2", "distinct correct", "train s"):
        assert f"<th>{name}</th>" in html
    assert max(map(len, printed.splitlines()[:3])) <= 100
    # the time split
    assert "time in the runs" in printed and "sampling" in printed and "update" in printed
    # the frontier's point at the training temperature is the table's final value
    fr = summary["methods"]["grpo"]["frontier"]
    t1 = next(r for r in fr if r["T"] == 1.0)
    assert t1["eval/pass@k"] == summary["methods"]["grpo"]["pass@k_end"]


def test_report_refuses_mixed_configurations_and_ignores_foreign_folders(tmp_path, capsys):
    root = tmp_path / "mixed"
    assert _run(root / "a") == 0
    assert _run(root / "b", "lr=3e-4") == 0
    foreign = root / "tmp_test_dir"
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/pass@1": 0.5}) + "\n")
    capsys.readouterr()
    assert cli.main(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert "mixes training configurations" in err and "lr=" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["report", str(root / "a")]) == 0  # one experiment: fine
    (root / "b" / "config.json").unlink()  # now b is foreign too: ignored, never a method called "b"
    capsys.readouterr()
    assert cli.main(["report", str(root), "--no-plots"]) == 0
    assert list(json.loads((root / "summary.json").read_text())["methods"]) == ["grpo"]
    assert cli.main(["report", str(foreign)]) == 2
    assert "no testbed run" in capsys.readouterr().err


def test_frontier_prints_each_temperature(tmp_path, capsys):
    out = tmp_path / "r"
    assert _run(out, "--no-plots", steps="1") == 0
    capsys.readouterr()
    assert cli.main(["frontier", str(out), "--temperatures", "1.0,0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "T", "pass@1"]
    assert [ln.split()[1] for ln in lines[1:]] == ["1.00", "0.50"]
    assert (out / "frontier.json").exists()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_compare_two_seeds(tmp_path, jobs):
    out = tmp_path / "c"
    assert cli.main(["compare", "--methods", "grpo", "--seeds", "0,1", "--steps", "1", "--out", str(out),
                     "--quiet", "--no-plots", "--jobs", jobs, *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["methods"]["grpo"]["n_seeds"] == 2 and "compare_wall_s" in s
    assert s["methods"]["grpo"]["se_over"] == "seeds"
    assert (out / "grpo" / "seed1" / "metrics.jsonl").exists()
    # after training, each final policy is sampled at the default frontier temperatures
    recs = json.loads((out / "grpo" / "seed1" / "frontier.json").read_text())["records"]
    assert [r["T"] for r in recs] == [1.0, 0.9, 0.8, 0.7]
    assert json.loads((out / "compare.json").read_text())["seeds"] == [0, 1]


def test_compare_frontier_plot_in_report_and_skip(tmp_path):
    out = tmp_path / "c"
    assert cli.main(["compare", "--methods", "grpo", "--seeds", "0", "--steps", "1", "--out", str(out), "--quiet",
                     "--jobs", "1", "--frontier", "1.0,0.5", *TINY]) == 0
    assert (out / "frontier.png").stat().st_size > 0
    assert 'alt="frontier"' in (out / "report.html").read_text()
    out2 = tmp_path / "c2"
    assert cli.main(["compare", "--methods", "grpo", "--seeds", "0", "--steps", "1", "--out", str(out2), "--quiet",
                     "--jobs", "1", "--frontier", "", *TINY]) == 0
    assert not (out2 / "grpo" / "seed0" / "frontier.json").exists() and not (out2 / "frontier.png").exists()


@pytest.mark.parametrize("argv,msg", [
    (["run", "--method", "nope", "--steps", "1"], "available:"),
    (["run", "--method", "grpo", "--steps", "1", "bogus_key=1"], "bogus_key"),
    (["run", "--method", "grpo", "--steps", "1", "lr=abc"], "'lr'"),
    (["run", "--method", "grpo", "--steps", "1", "lr=inf"], "'lr': must be a finite number"),
    (["run", "--method", "grpo", "--steps", "1", "lr=0"], "lr must be > 0"),
    (["run", "--method", "grpo", "--steps", "1", "grad_clip=-3"], "grad_clip must be >= 0"),
    (["run", "--method", "grpo", "--steps", "1", "temperature=nan"], "'temperature'"),
    (["run", "--method", "grpo", "--steps", "1", "minibatches=3"], "minibatches"),
    (["run", "--method", "siren", "--steps", "1", "siren.beta=inf"], "'siren.beta'"),
    (["run", "--method", "grpo", "--steps", "1", "eps_low=-1"], "eps_low"),
    (["run", "--method", "grpo", "--steps", "1", "--engine", "jax"], "unknown engine"),
    (["run", "--method", "grpo", "--steps", "1", "--task", "chess"], "unknown task"),
    (["run", "--method", "grpo", "--steps", "1", "--report-to", "mlflow"], "--report-to"),
    (["compare", "--methods", "grpo,nope"], "available:"),
    (["compare", "--methods", "grpo,grpo"], "twice"),
    (["report", "/nonexistent/dir"], "does not exist"),
    (["compare", "--methods", "grpo", "--seeds", "a"], "--seeds"),
    (["compare", "--methods", "grpo", "--seeds", "-1"], "--seeds"),
    (["frontier", "/nonexistent/dir"], "ckpt.pt"),
    (["export", "/nonexistent/dir", "/tmp/x"], "ckpt.pt"),
    (["compare", "--methods", "grpo", "--frontier", "1,hot"], "--frontier"),
    (["compare", "--methods", "grpo", "--frontier", "1,0"], "--frontier"),
    (["frontier", "/nonexistent/dir", "--temperatures", "1,x"], "--temperatures"),
    (["methods", "nope"], "available:"),
])
def test_clear_errors(argv, msg, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv,msg", [
    (["run", "--method", "grpo", "--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    (["run", "--method", "grpo", "--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["compare", "--jobs", "0"], "argument --jobs: must be an integer >= 1, got 0"),
    (["run", "--method", "grpo", "--seed", "-2"], "argument --seed"),
    (["run", "--method", "grpo", "--threads", "two"], "argument --threads"),
])
def test_bad_flags_are_one_line_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_version_help_methods_and_config(capsys):
    import rlvr_entropy

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and rlvr_entropy.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    help_text = capsys.readouterr().out
    assert "thermostat" in help_text and "siren" in help_text and "rlvr-entropy methods NAME" in help_text
    assert "rlvr-entropy config" in help_text
    assert cli.main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "siren" in listing and "2509.25133" in listing and max(map(len, listing.splitlines())) <= 100
    assert cli.main(["methods", "siren"]) == 0
    keys = capsys.readouterr().out
    assert "beta" in keys and "= 0.005" in keys and "eps_high" in keys and "clip-higher" in keys  # base doc too
    assert cli.main(["config"]) == 0
    conf = capsys.readouterr().out
    assert "checkpoint_every" in conf and "= 5" in conf and "Checkpoint every" in conf and "lr" in conf


def test_python_dash_m_and_no_transformers_import_in_a_run(tmp_path):
    env = {**os.environ, "RLVR_ENTROPY_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "rlvr_entropy", "--version"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.startswith("rlvr-entropy ")
    # a run whose start is cached must not pay the transformers import (seconds per process)
    assert _run(tmp_path / "warm", "--no-plots", steps="1") == 0
    code = ("import sys\nfrom rlvr_entropy.testbed.train import TrainConfig, train\n"
            f"cfg = TrainConfig(steps=1, {', '.join(TINY)})\n"
            f"train('grpo', cfg, {str(tmp_path / 'r2')!r}, progress=False)\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]


def test_logs_are_quiet_when_not_a_terminal(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["run", "--method", "grpo", "--steps", "20", "--out", str(out), "--no-plots", *TINY,
                     "eval_every=10"]) == 0
    err = capsys.readouterr().err  # not a terminal: no redraws, a line per 10% at most
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert lines[0].endswith("starting at step 0 (grpo, seed 0, 20 steps)")
    assert 5 <= len(lines) <= 13 and lines[-1].startswith("grpo seed 0: 20/20 (100%)")


def test_resume_with_other_config_is_refused_and_no_resume_starts_over(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert _run(out, "--no-plots", steps="1") == 0
    capsys.readouterr()
    assert _run(out, "--no-plots", "lr=3e-4", steps="2") == 2
    assert "different configuration" in capsys.readouterr().err
    assert _run(out, "--no-plots", steps="2") == 0
    capsys.readouterr()
    assert _run(out, "--no-plots", "--no-resume", steps="2") == 0
    assert "starting over from step 0" in capsys.readouterr().err


def test_resume_messages(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert _run(out, "--no-plots", steps="1") == 0
    assert "starting at step 0" in capsys.readouterr().err
    assert _run(out, "--no-plots", steps="3") == 0
    assert f"resuming {out} from step 1" in capsys.readouterr().err
    (Path(out) / "ckpt.pt").unlink()
    assert _run(out, "--no-plots", steps="3") == 0
    assert "no checkpoint, starting over from step 0" in capsys.readouterr().err


def test_demo_resumes_by_default_and_restarts_another_configuration(tmp_path, capsys):
    import rlvr_entropy

    out = tmp_path / "d"
    base = ["demo", "--out", str(out), "--quiet", "--no-plots", "--jobs", "1", "--frontier", "", *TINY]
    assert cli.main([*base, "--steps", "1"]) == 0
    s = json.loads((out / "summary.json").read_text())
    expected = [m for m in cli.DEMO_METHODS if m in rlvr_entropy.available_methods()]
    assert sorted(s["methods"]) == sorted(expected) and "grpo" in expected
    capsys.readouterr()
    assert cli.main([*base, "--steps", "2"]) == 0  # what the Ctrl-C message promises: rerun to continue
    assert f"resuming {out / 'grpo' / 'seed0'} from step 1" in capsys.readouterr().err
    assert cli.main([*base, "--steps", "2", "lr=2e-4"]) == 0
    assert "different configuration (differs in ['lr']): starting over" in capsys.readouterr().err


def test_demo_trains_its_lighter_default_and_overrides_win(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "cmd_compare", lambda args: seen.setdefault("base", cli._cli_train_base(args)) and 0)
    cli.main(["demo", "--quiet"])
    assert seen.pop("base") == cli.DEMO_TRAIN and cli.DEMO_TRAIN == {"prompts_per_step": 16}
    seen.clear()
    monkeypatch.setattr(cli, "cmd_compare", lambda args: seen.setdefault(
        "cfg", cli._make_train_config(cli._cli_train_base(args), cli.split_overrides(args.overrides, ["grpo"])[0]))
                        and 0)
    cli.main(["demo", "--quiet", "--seed", "3", "prompts_per_step=8"])
    assert seen["cfg"].prompts_per_step == 8
    seen.clear()
    cli.main(["compare", "--methods", "grpo", "--quiet"])  # compare itself keeps TrainConfig's defaults
    assert seen["cfg"].prompts_per_step == 32


def test_compare_runs_one_process_per_usable_core_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "usable_cpus", lambda: 2)
    seen = {}

    def fake_parallel(jobs, args, temps):
        seen["jobs"] = args.jobs
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_parallel", fake_parallel)
    cli.main(["compare", "--methods", "grpo,siren,steer", "--out", str(tmp_path / "c"), "--quiet", *TINY])
    assert seen["jobs"] == 2


def test_ctrl_c_message_promises_what_demo_does(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_compare", interrupted)
    assert cli.main(["demo", "--quiet"]) == 130
    assert "rerun the same command to continue" in capsys.readouterr().err


def test_eval_subcommand_is_wired(capsys):
    mod, _ = cli._eval_module()
    if mod is None:
        assert cli.main(["eval"]) == 2
        assert "eval" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit):  # its own parser: --help exits 0
            cli.main(["eval", "--help"])


def test_export_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from rlvr_entropy.testbed.model import TinyQwen2
    from rlvr_entropy.testbed.tokenizer import CharTokenizer

    run, out = tmp_path / "r", tmp_path / "hf"
    assert _run(run, "--no-plots") == 0
    assert cli.main(["export", str(run), str(out)]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    ids = tok("3 5 7>022:", add_special_tokens=False)["input_ids"]
    assert ids == CharTokenizer().encode("3 5 7>022:") and tok.eos_token_id == CharTokenizer().eos_id
    assert tok.decode(CharTokenizer().encode("3*5=15,15+7=22")) == "3*5=15,15+7=22"
    ck = torch.load(run / "ckpt.pt", weights_only=False)
    lean = TinyQwen2(CharTokenizer().vocab_size, hf_model_cfg(ck))
    lean.load_state_dict(ck["model"])
    x = torch.tensor([ids + [5, 9, 12]])
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=x).logits, lean(x), atol=1e-5)
    meta = json.loads((out / "rlvr_entropy.json").read_text())
    assert meta["method"] == "grpo" and meta["step"] == 2
    assert cli.main(["export", str(run), str(out)]) == 2  # not over a non-empty directory by accident


def hf_model_cfg(ck):
    from rlvr_entropy.testbed.train import TrainConfig

    return TrainConfig(**ck["config"]).model


def test_report_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "r"
    assert _run(out, "--no-plots", "--report-to", "tensorboard") == 0
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/pass@1")] == [0, 1, 2]
    assert len(acc.Scalars("loss")) == 2


def test_report_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "r"
    assert _run(out, "--no-plots", "--report-to", "wandb", steps="1") == 0
    assert list((out / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("method", ["grpo", "siren", "thermostat"])
def test_trl_engine_trains_on_builtin_task(tmp_path, method, capfd, monkeypatch):
    pytest.importorskip("trl")
    import torch

    import rlvr_entropy.trl as rtrl

    built = []

    class Spy(rtrl.EntropyGRPOTrainer):  # the trainer the runner builds, and its model's weights at that point
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append((self, {n: v.detach().clone() for n, v in self.model.state_dict().items()}))

    monkeypatch.setattr(rtrl, "EntropyGRPOTrainer", Spy)
    out = tmp_path / "t"
    assert cli.main(["run", "--method", method, "--engine", "trl", "--steps", "2", "--out", str(out), "--quiet",
                     *TINY]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["engine"] == "trl"
    assert any(k.startswith(f"{method}/") for k in rows[1]) and "reward" in rows[1] and "eval/pass@1" in rows[2]
    # the thermostat's pull reads TRL's reference: the runner saved the warm start and trained from it, so TRL loaded
    # the reference from there, with the warm start's weights; no other method saves one or builds a reference
    (trainer, initial), = built
    saved = out / "trl" / "warm_start"
    assert (saved / "config.json").exists() is (trainer.ref_model is not None) is (method == "thermostat")
    if method == "thermostat":
        assert trainer.model.config._name_or_path == str(saved) and "thermostat/kl" in rows[1]
        ref = trainer.ref_model.state_dict()
        assert ref.keys() == initial.keys() and all(torch.equal(ref[n], v) for n, v in initial.items())
    s = json.loads((out / "summary.json").read_text())["methods"][method]
    assert "entropy_end" in s and "pass@k_end" in s
    captured = capfd.readouterr()
    assert "{'loss'" not in captured.out + captured.err  # TRL's raw log dicts are not printed


def test_report_includes_diagnostics(tmp_path):
    from rlvr_entropy.diagnostics import EntropyChangeProbe
    import torch

    out = tmp_path / "r"
    assert _run(out, "--no-plots") == 0
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 30, 5, generator=g, dtype=torch.float64)
    probe = EntropyChangeProbe()
    a = torch.randn(1, 30, generator=g, dtype=torch.float64)
    probe.before(z, torch.randint(5, (1, 30), generator=g), a, torch.ones(1, 30, dtype=torch.bool), a)
    rec = probe.after(z + 0.01)
    (out / "entropy_change.jsonl").write_text(json.dumps(rec.to_json()) + "\n")
    assert cli.main(["report", str(out)]) == 0
    for png in ("entropy_percentiles.png", "entropy_change_scatter.png", "entropy_change_quadrants.png"):
        assert (out / png).stat().st_size > 0
    assert "entropy_change_scatter" in (out / "report.html").read_text()


def test_verdict_names_the_collapse_and_who_kept_pass_at_k():
    from rlvr_entropy.report.summary import verdict

    def m(h0, h1, p10, p11, k0, k1, se=0.02):
        return {"entropy_start": h0, "entropy_end": h1, "pass@1_start": p10, "pass@1_end": p11, "pass@k_start": k0,
                "pass@k_end": k1, "k": 8, "steps": 120, "n_seeds": 1, "pass@k_end_se": se, "pass@1_end_se": se}

    s = {"methods": {"grpo": m(0.233, 0.080, 0.37, 0.55, 0.87, 0.73), "siren": m(0.233, 0.20, 0.37, 0.47, 0.87, 0.86)}}
    v = verdict(s)
    assert v.startswith("GRPO collapsed: held-out entropy went from 0.233 to 0.080 nats (-66%)")
    assert "pass@8 from 0.870 to 0.730" in v and "siren: entropy 0.200" in v and "+0.130 vs grpo (> 2 s.e." in v
    assert "Kept pass@8 at its starting level (within 2 s.e.): siren" in v and "How sure: one seed" in v
    s["methods"]["grpo"] = m(0.233, 0.22, 0.37, 0.38, 0.87, 0.86)
    assert verdict(s).startswith("GRPO kept its entropy")
