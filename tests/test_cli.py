"""CLI smoke tests on a tiny config: run, report, compare, errors."""
import json

import pytest

from rlvr_entropy import cli

TINY = ["width=32", "layers=1", "heads=2", "mlp=64", "warm_start_steps=0", "prompts_per_step=4",
        "samples_per_prompt=4", "eval_problems=4", "eval_samples=4", "eval_k=2", "eval_every=1"]


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RLVR_ENTROPY_CACHE", str(tmp_path / "cache"))


def test_run_then_report(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["run", "--method", "grpo", "--steps", "2", "--out", str(out), "--quiet", *TINY,
                     "eps_high=0.28"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method_config"]["eps_high"] == 0.28 and cfg["train"]["width"] == 32
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    (out / "summary.json").unlink()
    (out / "report.html").unlink()
    assert cli.main(["report", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())["methods"]["grpo"]
    for key in ("entropy_start", "entropy_end", "pass@1_start", "pass@1_end", "pass@k_start", "pass@k_end", "k",
                "maj@k_end", "distinct_answers_end", "wall_s"):
        assert key in s
    assert s["k"] == 2
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "grpo" in html
    for png in ("entropy.png", "pass_at_k.png", "pass_at_k_vs_k.png", "distinct_correct.png"):
        assert (out / png).stat().st_size > 0


def test_frontier_prints_each_temperature(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["run", "--method", "grpo", "--steps", "1", "--out", str(out), "--quiet", "--no-plots",
                     *TINY]) == 0
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
    assert (out / "grpo" / "seed1" / "metrics.jsonl").exists()
    # after training, each final policy is sampled at the default frontier temperatures
    recs = json.loads((out / "grpo" / "seed1" / "frontier.json").read_text())["records"]
    assert [r["T"] for r in recs] == [1.0, 0.9, 0.8, 0.7]


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
    (["run", "--method", "grpo", "--steps", "1", "lr=abc"], "lr"),
    (["run", "--method", "grpo", "--steps", "1", "--engine", "jax"], "unknown engine"),
    (["run", "--method", "grpo", "--steps", "1", "--task", "chess"], "unknown task"),
    (["compare", "--methods", "grpo,nope"], "available:"),
    (["report", "/nonexistent/dir"], "does not exist"),
    (["compare", "--methods", "grpo", "--seeds", "a"], "--seeds"),
    (["frontier", "/nonexistent/dir"], "ckpt.pt"),
    (["compare", "--methods", "grpo", "--frontier", "1,hot"], "--frontier"),
    (["compare", "--methods", "grpo", "--frontier", "1,0"], "--frontier"),
    (["frontier", "/nonexistent/dir", "--temperatures", "1,x"], "--temperatures"),
])
def test_clear_errors(argv, msg, capsys):
    assert cli.main(argv) == 2
    assert msg in capsys.readouterr().err


def test_eval_subcommand_is_wired(capsys):
    mod, _ = cli._eval_module()
    if mod is None:
        assert cli.main(["eval"]) == 2
        assert "eval" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit):  # its own parser: --help exits 0
            cli.main(["eval", "--help"])


def test_resume_with_other_config_is_refused(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert cli.main(["run", "--method", "grpo", "--steps", "1", "--out", out, "--quiet", "--no-plots", *TINY]) == 0
    assert cli.main(["run", "--method", "grpo", "--steps", "2", "--out", out, "--quiet", "--no-plots", *TINY,
                     "lr=3e-4"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert cli.main(["run", "--method", "grpo", "--steps", "2", "--out", out, "--quiet", "--no-plots", *TINY]) == 0


def test_demo_compares_the_default_methods(tmp_path):
    import rlvr_entropy

    out = tmp_path / "d"
    assert cli.main(["demo", "--steps", "1", "--out", str(out), "--quiet", "--no-plots", "--jobs", "1", *TINY]) == 0
    s = json.loads((out / "summary.json").read_text())
    expected = [m for m in cli.DEMO_METHODS if m in rlvr_entropy.available_methods()]
    assert sorted(s["methods"]) == sorted(expected) and "grpo" in expected


@pytest.mark.parametrize("method", ["grpo", "siren"])
def test_trl_engine_trains_on_builtin_task(tmp_path, method):
    pytest.importorskip("trl")
    out = tmp_path / "t"
    assert cli.main(["run", "--method", method, "--engine", "trl", "--steps", "2", "--out", str(out), "--quiet",
                     *TINY]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["engine"] == "trl"
    assert any(k.startswith(f"{method}/") for k in rows[1]) and "reward" in rows[1] and "eval/pass@1" in rows[2]
    s = json.loads((out / "summary.json").read_text())["methods"][method]
    assert "entropy_end" in s and "pass@k_end" in s


def test_report_includes_diagnostics(tmp_path):
    from rlvr_entropy.diagnostics import EntropyChangeProbe
    import torch

    out = tmp_path / "r"
    assert cli.main(["run", "--method", "grpo", "--steps", "2", "--out", str(out), "--quiet", "--no-plots", *TINY]) == 0
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 30, 5, generator=g, dtype=torch.float64)
    probe = EntropyChangeProbe()
    a = torch.randn(1, 30, generator=g, dtype=torch.float64)
    probe.before(z, torch.randint(5, (1, 30), generator=g), a, torch.ones(1, 30, dtype=torch.bool), a)
    rec = probe.after(z + 0.01)
    (out / "entropy_change.jsonl").write_text(json.dumps(rec.to_json()) + "\n")
    assert cli.main(["report", str(out)]) == 0
    for png in ("entropy_percentiles_grpo.png", "entropy_change_scatter.png", "entropy_change_quadrants.png"):
        assert (out / png).stat().st_size > 0
    assert "entropy_change_scatter" in (out / "report.html").read_text()
