"""The issue-6 evidence and design scripts: their metrics by hand on synthetic metric logs, and the report path
(--only-report) on fake runs. The real runs take tens of minutes and are not part of the suite."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import thermostat_design as design  # noqa: E402
import thermostat_evidence as ev  # noqa: E402


def _rows(hs, targets=None, p1=0.5):
    rows = [{"step": 0, "eval/pass@1": 0.3, "eval/pass@8": 0.6, "eval/pass@32": 0.8, "eval/maj@k": 0.4,
             "eval/distinct_correct": 2.0, "eval/entropy": 0.3}]
    for i, h in enumerate(hs, start=1):
        r = {"step": i, "entropy": h}
        if targets is not None:
            r["thermostat/target"] = targets[i - 1]
            r["thermostat/weight_mean"], r["thermostat/damped_frac"] = 0.9, 0.2
        rows.append(r)
    rows.append({"step": len(hs), "eval/pass@1": p1, "eval/pass@8": 0.7, "eval/pass@32": 0.9, "eval/maj@k": 0.5,
                 "eval/distinct_correct": 3.0, "eval/entropy": 0.2})
    return rows


def test_tracking_metrics_by_hand():
    # no target logged: H* = first step's value 1.0; |H - 1| = 0, 0.5, 0.5, 0 -> mean 0.25
    r = ev._per_run(_rows([1.0, 0.5, 1.5, 1.0]), window=2)
    assert r["track_err"] == pytest.approx(0.25)
    # signed errors 0, -0.5, +0.5, 0; 2-step averages 0, -0.25, 0, 0.25 -> worst 0.25
    assert r["max_dev"] == pytest.approx(0.25)
    assert r["max_short"] == pytest.approx(0.25)  # the -0.25 window
    # 2-step averages of H / H0: 1.0, 0.75, 1.0, 1.25
    assert (r["h_min_rel"], r["h_max_rel"]) == (pytest.approx(0.75), pytest.approx(1.25))
    assert (r["pass@1"], r["pass@8"], r["pass@32"], r["maj@8"], r["distinct"]) == (0.5, 0.7, 0.9, 0.5, 3.0)
    # a ramping target followed exactly: zero error (the average of the error, not of H, is compared)
    ramp = [1.0 - 0.1 * i for i in range(6)]
    r = ev._per_run(_rows(ramp, targets=ramp), window=10)
    assert r["track_err"] == pytest.approx(0.0) and r["max_dev"] == pytest.approx(0.0)
    # entropy 20% above its logged target throughout
    r = ev._per_run(_rows([1.2] * 5, targets=[1.0] * 5))
    assert r["track_err"] == pytest.approx(0.2) and r["max_dev"] == pytest.approx(0.2)
    assert r["max_short"] == 0.0  # never below the target
    # 10% below it throughout
    r = ev._per_run(_rows([0.9] * 5, targets=[1.0] * 5))
    assert r["max_short"] == pytest.approx(0.1) and r["max_dev"] == pytest.approx(0.1)


def _fake_runs(root: Path, per_method: dict[str, list[float]]):
    for m, p1s in per_method.items():
        for s, p1 in enumerate(p1s):
            d = root / m / f"seed{s}"
            d.mkdir(parents=True)
            targets = [0.9] * 5 if m == "thermostat" else None
            (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in _rows([1.0] * 5, targets, p1)))
            (d / "summary.json").write_text("{}")  # the run finished


def test_unfinished_runs_are_left_out(tmp_path):
    _fake_runs(tmp_path, {"grpo": [0.4, 0.5]})
    (tmp_path / "grpo" / "seed1" / "summary.json").unlink()  # still running: its last row is a mid-run evaluation
    runs = ev._runs(tmp_path)
    assert len(runs["grpo"]) == 1 and runs["grpo"][0][-1]["eval/pass@1"] == pytest.approx(0.4)


def test_table_and_goal_check(tmp_path):
    _fake_runs(tmp_path, {"grpo": [0.4, 0.5], "siren": [0.45, 0.45], "steer": [0.5, 0.6], "thermostat": [0.5, 0.5]})
    md, st = ev.table(tmp_path)
    assert md.splitlines()[2].startswith("| grpo | 2 | 0.450 ± 0.050 |")
    assert st["thermostat"]["pass@1"] == pytest.approx((0.5, 0.0))
    assert ev.controller_activity(st) == [
        "- thermostat: mean token weight 0.9000 ± 0.0000, share of tokens damped 0.200 ± 0.000"]  # grpo: no line
    assert ev.entropy_range({"grpo": st["grpo"]}) == [
        "- grpo: entropy stayed between 1.00 and 1.00 x its first-step value (10-step averages, every seed)"]
    lines = ev.goal_check(st)
    text = "\n".join(lines)
    assert "pass@1: thermostat 0.500 ± 0.000 vs siren 0.450 ± 0.000 (difference +0.050): no worse (mean at" in text
    # steer 0.55 ± 0.05: thermostat's 0.5 + 0 reaches steer's 0.55 - 0.05
    assert "vs steer 0.550 ± 0.050 (difference -0.050): no worse within standard errors" in text
    assert any("NOT separated" in x for x in lines)  # equal pass@8 everywhere
    # |1.0 - 0.9| / 0.9 = 0.111 <= 0.15, and never below the target
    assert lines[-2].endswith("0.111 -> yes") and lines[-1].endswith("0.000 -> yes")
    # steer 0.65 ± 0.05 is out of reach: 0.5 < 0.6
    _fake_runs(tmp_path / "b", {"siren": [0.45, 0.45], "steer": [0.6, 0.7], "thermostat": [0.5, 0.5]})
    assert "(difference -0.150): WORSE (standard errors do not overlap)" in "\n".join(ev.goal_check(
        ev.table(tmp_path / "b")[1]))


def test_fit_and_tradeoff_by_hand(tmp_path):
    a, b, r = ev._fit([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    assert (a, b, r) == (pytest.approx(1.0), pytest.approx(2.0), pytest.approx(1.0))
    # two methods on the same line (residual 0) and one above it
    for m, (h, p1) in {"a": (0.1, 0.5), "b": (0.3, 0.3), "c": (0.2, 0.5)}.items():
        d = tmp_path / m / "seed0"
        d.mkdir(parents=True)
        rows = _rows([1.0], p1=p1)
        rows[-1]["eval/entropy"] = h
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (d / "summary.json").write_text("{}")
    lines = ev.tradeoff(ev.table(tmp_path)[1])
    # fit through (0.1, 0.5), (0.2, 0.5), (0.3, 0.3): slope -1, intercept 0.633..; residuals -1/30, +1/15, -1/30
    assert lines[0].startswith("- pass@1 = 0.633 -1.000 x H_end")
    assert "| c | +0.067 ± nan |" in "\n".join(lines)
    assert ev.tradeoff(ev.table(tmp_path / "none")[1]) == []


def test_design_variants_and_table(tmp_path):
    import dataclasses

    from rlvr_entropy.methods.thermostat import ThermostatConfig

    fields = {f.name for f in dataclasses.fields(ThermostatConfig)}
    assert all(set(v[0]) <= fields for v in design.VARIANTS.values())
    cmd = design._cmd("pull-fixed", 10, 100, tmp_path)
    assert "reach_tol=none" in cmd and "target=10.0" in cmd and "pull_coef=0.5" in cmd and "--seed" in cmd
    _fake_runs(tmp_path, {"pull-fixed": [0.4, 0.5]})
    md = design.table(["pull-fixed", "off"], tmp_path)
    assert f"| pull-fixed | {design.VARIANTS['pull-fixed'][1]} | 2 | 0.450 ± 0.050 |" in md
    assert "| off |" not in md  # no runs, no row
    # a retired variant (its option left the method) is tabulated from its runs, never run
    _fake_runs(tmp_path, {"reach0.03": [0.3, 0.4]})
    assert "| reach0.03 | (retired: damping)" in design.table(["reach0.03"], tmp_path)
    with pytest.raises(SystemExit):
        design.main(["--variants", "reach0.03", "--out", str(tmp_path)])


def _curve(p1s, p8s, p32s):
    return [{"T": t, "eval/pass@1": a, "eval/pass@8": b, "eval/pass@32": c, "eval/entropy": 0.2}
            for t, a, b, c in zip(ev.FRONTIER_TEMPS, p1s, p8s, p32s)]


def test_frontier_section_matches_point_by_point(tmp_path):
    assert ev.FRONTIER_TEMPS == (1.0, 0.9, 0.8, 0.7)
    seed = _curve([0.40, 0.44, 0.48, 0.52], [0.70, 0.69, 0.68, 0.67], [0.80, 0.79, 0.78, 0.77])
    fr = {"siren": [seed, seed],
          # thermostat: pass@8 0.75 -> 0.71 while pass@1 goes 0.36 -> 0.48 (linear, 0.01 per 0.03 of pass@1)
          "thermostat": [_curve([0.36, 0.40, 0.44, 0.48], [0.75, 0.74, 0.73, 0.72], [0.85, 0.84, 0.83, 0.82])] * 2}
    lines = ev.frontier_section(fr, tmp_path / "f.png")
    text = "\n".join(lines)
    assert "| siren | 1 | 2 | 0.400 ± 0.000 | 0.700 ± 0.000 | 0.800 ± 0.000 | 0.200 ± 0.000 |" in text
    # at siren's T = 1 (pass@1 0.40): thermostat's curve gives pass@8 0.74 and pass@32 0.84
    assert ("| siren | 1 | 0.400 ± 0.000 | 0.700 ± 0.000 | 0.740 ± 0.000 (above) | 0.800 ± 0.000 | "
            "0.840 ± 0.000 (above) |") in text
    # at siren's T = 0.9 (0.44): 0.73 vs 0.69; at 0.7 (0.52) beyond thermostat's range: its end 0.72 vs 0.67
    assert "| siren | 0.9 | 0.440 ± 0.000 | 0.690 ± 0.000 | 0.730 ± 0.000 (above)" in text
    assert "| siren | 0.7 | 0.520 ± 0.000 | 0.670 ± 0.000 | 0.720 ± 0.000 (above)" in text
    assert (tmp_path / "f.png").stat().st_size > 0
    # a thermostat below the seed method is called below
    low = {"steer": [seed, seed], "thermostat": [_curve([0.40, 0.44, 0.48, 0.52], [0.60] * 4, [0.70] * 4)] * 2}
    assert "0.600 ± 0.000 (below)" in "\n".join(ev.frontier_section(low))


def test_design_table_paired_difference(tmp_path):
    _fake_runs(tmp_path, {design.REFERENCE: [0.40, 0.50], "pull-fixed": [0.45, 0.60, 0.9]})
    md = design.table([design.REFERENCE, "pull-fixed"], tmp_path)
    ref_row, row = md.splitlines()[2], md.splitlines()[3]
    assert ref_row.endswith("|  |  |")
    # seeds 0 and 1 are shared: +0.05 and +0.10 -> +0.075 ± 0.025; pass@8 is 0.7 everywhere
    assert row.endswith("| +0.075 ± 0.025 (2) | +0.000 ± 0.000 (2) |")


def test_frontier_verdicts_count_each_temperature():
    seed = _curve([0.40, 0.44, 0.48, 0.52], [0.70, 0.69, 0.68, 0.67], [0.80, 0.79, 0.78, 0.77])
    th = _curve([0.36, 0.40, 0.44, 0.48], [0.75, 0.74, 0.73, 0.72], [0.85, 0.84, 0.83, 0.82])
    lines = ev.frontier_verdicts({"siren": [seed, seed], "thermostat": [th, th]})
    assert lines == ["- at equal pass@1 (temperature frontier, siren's 4 temperatures): thermostat pass@8 above at "
                     "4/4 (below at 0), pass@32 above at 4/4 (below at 0)"]
    low = _curve([0.40, 0.44, 0.48, 0.52], [0.60] * 4, [0.79] * 4)
    lines = ev.frontier_verdicts({"steer": [seed, seed], "thermostat": [low, low]})
    assert lines == ["- at equal pass@1 (temperature frontier, steer's 4 temperatures): thermostat pass@8 above at "
                     "0/4 (below at 4), pass@32 above at 2/4 (below at 1)"]
    assert ev.frontier_verdicts({"siren": [seed]}) == []


def test_design_frontier_gap_is_paired_by_seed(tmp_path, monkeypatch):
    _fake_runs(tmp_path, {design.REFERENCE: [0.40, 0.50], "pull-fixed": [0.45, 0.60, 0.9]})
    curves = {  # per (variant, seed): the default's T = 1 point, the variant's frontier through it
        (design.REFERENCE, "seed0"): _curve([0.40, 0.44, 0.48, 0.52], [0.70, 0.69, 0.68, 0.67], [0.8] * 4),
        (design.REFERENCE, "seed1"): _curve([0.50, 0.52, 0.54, 0.56], [0.60, 0.59, 0.58, 0.57], [0.8] * 4),
        ("pull-fixed", "seed0"): _curve([0.36, 0.40, 0.44, 0.48], [0.75, 0.74, 0.73, 0.72], [0.8] * 4),
        ("pull-fixed", "seed1"): _curve([0.46, 0.48, 0.50, 0.52], [0.70, 0.66, 0.62, 0.58], [0.8] * 4),
    }
    monkeypatch.setattr(ev, "sweep_frontiers_dirs",
                        lambda dirs, jobs: [curves[(Path(d).parent.name, Path(d).name)] for d in dirs])
    # seed0: at pass@1 0.40 the variant has 0.74 vs 0.70 -> +0.04; seed1: at 0.50 it has 0.62 vs 0.60 -> +0.02
    m, se, n = design.frontier_gap("pull-fixed", ["seed0", "seed1"], tmp_path)
    assert (m, se, n) == (pytest.approx(0.03), pytest.approx(0.01), 2)
    assert design.frontier_gap(design.REFERENCE, ["seed0", "seed1"], tmp_path) is None
    assert design.frontier_gap("pull-fixed", [], tmp_path) is None
    md = design.table([design.REFERENCE, "pull-fixed"], tmp_path, frontier=True)
    assert md.splitlines()[3].endswith("| +0.030 ± 0.010 (2) |")


# ------------------------------------------------------------------------------ issue 15: scripts/field_evidence.py
import field_evidence as fe  # noqa: E402


def test_field_targets_scale_to_the_warm_start():
    o = fe.method_overrides(0.26, 100)
    assert o["entropic"] == {"target": 0.182} and o["aepo"] == {"target": 0.182}  # 0.7 x H0
    # the official band scaled by 0.26 / 0.65 = 0.4: lower 0.6 -> 0.4 becomes 0.24 -> 0.16, upper 0.28 -> 0.2
    assert o["entrocraft"] == {"lower": "0.24,0.16", "upper": "0.28,0.2", "total_steps": 100}
    from rlvr_entropy import make_method

    m = make_method("entrocraft", **o["entrocraft"])  # the CLI's string form is accepted by the config
    assert tuple(m.config.lower) == (0.24, 0.16) and tuple(m.config.upper) == (0.28, 0.2)


def _stats(tmp_path, per_method):
    """Fake runs: per method a list of (pass@1, pass@8, pass@32) per seed; the warm start has pass@32 0.95."""
    for m, runs in per_method.items():
        for s, (p1, p8, p32) in enumerate(runs):
            d = tmp_path / m / f"seed{s}"
            d.mkdir(parents=True)
            rows = _rows([1.0] * 3, p1=p1)
            rows[0]["eval/pass@32"] = 0.95
            rows[-1].update({"eval/pass@8": p8, "eval/pass@32": p32})
            (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
            (d / "summary.json").write_text("{}")
    return ev.table(tmp_path)[1]


def test_field_goal_check_by_hand(tmp_path):
    st = _stats(tmp_path, {"grpo": [(0.52, 0.70, 0.85), (0.54, 0.72, 0.87)],   # pass@8 0.71 ± 0.01
                           "siren": [(0.48, 0.74, 0.90), (0.48, 0.76, 0.90)],  # 0.75 ± 0.01
                           "thermostat": [(0.51, 0.77, 0.93), (0.51, 0.79, 0.93)]})  # 0.78 ± 0.01, pass@1 0.51
    assert fe.warm_reach(tmp_path) == (pytest.approx(0.95), 0.0)
    lines, met = fe.goal_check(st, None, fe.warm_reach(tmp_path))
    text = "\n".join(lines)
    # pass@8: 0.78 - 0.01 = 0.77 > grpo's 0.72 and > siren's 0.76: above both
    assert met["pass@8 above all at T = 1"] and "above (standard errors apart) grpo, siren; not above none" in text
    assert met["pass@32 above all at T = 1"]  # 0.93 ± 0 vs 0.86 ± 0.01 and 0.90 ± 0
    assert met["pass@1 >= siren"] and not met["pass@1 >= grpo"]  # 0.51 vs 0.48 and 0.53
    assert "pass@1: thermostat 0.510 ± 0.000 vs grpo 0.530 ± 0.010: BELOW its mean" in text
    assert "vs siren 0.480 ± 0.000: at least its mean" in text
    assert met["pass@32 within 0.03 of the warm start"]  # 0.93 - 0.95 = -0.02
    assert "pass@1 >= steer" not in met  # steer did not run: no goal invented
    # a contender within one standard error is not beaten; the warm start's reach lost by 0.05
    st = _stats(tmp_path / "b", {"grpo": [(0.5, 0.76, 0.90), (0.5, 0.78, 0.90)],
                                 "thermostat": [(0.5, 0.78, 0.90), (0.5, 0.78, 0.90)]})
    lines, met = fe.goal_check(st, None, fe.warm_reach(tmp_path / "b"))
    assert not met["pass@8 above all at T = 1"] and not met["pass@32 within 0.03 of the warm start"]
    assert met["pass@1 >= grpo"]  # equal means count as at least
    assert "not above grpo (best of those: grpo 0.770)" in "\n".join(lines)


def test_field_matched_frontier_against_every_other_method():
    seed = _curve([0.40, 0.44, 0.48, 0.52], [0.70, 0.69, 0.68, 0.67], [0.80, 0.79, 0.78, 0.77])
    ours = _curve([0.36, 0.40, 0.44, 0.48], [0.75, 0.74, 0.73, 0.72], [0.85, 0.84, 0.83, 0.82])
    low = _curve([0.40, 0.44, 0.48, 0.52], [0.60] * 4, [0.70] * 4)
    fr = {"aepo": [seed, seed], "entropic": [low, low], "thermostat": [ours, ours]}
    got = {(r, t): {k: v[2] for k, v in cmp.items()} for r, t, _, cmp in fe.matched(fr)}
    assert set(got) == {(m, t) for m in ("aepo", "entropic") for t in ev.FRONTIER_TEMPS}
    assert all(v == {"eval/pass@8": "above", "eval/pass@32": "above"} for v in got.values())
    fr["thermostat"] = [low, low]
    got = {(r, t): cmp["eval/pass@8"][2] for r, t, _, cmp in fe.matched(fr)}
    assert got[("aepo", 1.0)] == "below" and got[("entropic", 1.0)] == "overlap"
    st = {m: {k: (0.5, 0.0) for k in ("pass@1", "pass@8", "pass@32")} for m in fr}
    _, met = fe.goal_check(st, fr, (0.5, 0.0))
    assert met["pass@8 above all at matched pass@1"] is False


def test_field_evidence_covers_every_registered_method():
    """Every registered method is either a contender (5 evidence seeds) or one of the others (3 seeds): a newly
    registered method cannot be left out of the comparison silently."""
    from rlvr_entropy import available_methods

    assert set(fe.CONTENDERS) | set(fe.OTHERS) == set(available_methods())
    assert not set(fe.CONTENDERS) & set(fe.OTHERS)
