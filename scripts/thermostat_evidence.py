"""Evidence for issue 6: every entropy method on the built-in Countdown testbed, same budget, several seeds; writes
the runs, a table (docs/results_issue6.md, generated) and entropy-curve plots. Every number in docs/results_issue6.md comes from
this script's runs.

    python scripts/thermostat_evidence.py [--seeds 20,21,22] [--extra-seeds 23,24,25,26,27] [--steps 100]
                                          [--out runs/evidence] [--jobs 2]
    python scripts/thermostat_evidence.py --only-report      # rebuild docs/results_issue6.md from existing runs

Protocol (same for every method): countdown3, the shared warm start, 32 prompts x 8 samples per step, 2 minibatches,
AdamW lr 1e-4, token-mean PPO surrogate with eps 0.2 / 0.28 and no dual-clip (the PG part is held fixed so only the
entropy intervention differs; SIREN's sum-over-3072 normalization is meant for 3k-token responses and would shrink
the policy gradient ~200x on 15-token ones). Method knobs at the paper defaults listed in METHOD_OVERRIDES.
Evaluation: 128 held-out problems x 32 samples; unbiased pass@k; maj@8; distinct correct solutions per problem.
Entropy tracking error: from the rollout entropy of every step, H* = the method's own target where it has one
(thermostat: its logged target) else the first step's value: mean |H - H*| / H*, and the worst 10-step moving
average of the signed relative error (H - H*) / H* ("max"; one step's rollout entropy is a noisy 256-sample
estimate).
Stress test: lr 3e-4 (TESTBED.md's unstable setting) for grpo, a strong selective bonus and thermostat.
Transfer check: the same protocol on a second task (countdown4 by default: 4 numbers, ~40 valid paths per problem)
for grpo, siren, steer and thermostat, with the first two seeds.
Temperature frontier: the final checkpoints of FRONTIER_METHODS (main comparison and transfer check) sampled at
FRONTIER_TEMPS (same held-out problems and samples; cached in each run directory), and the thermostat's pass@8 /
pass@32 read off each of its runs' curves at the pass@1 SIREN and STEER reach at each of their temperatures
(rlvr_entropy.testbed.frontier): which policy offers more pass@k at equal pass@1 once the sampling temperature, a
knob any deployment can turn, may differ.
Thermostat variants (THERMOSTAT_VARIANTS, TRANSFER_VARIANTS: settings of scripts/thermostat_design.py) run with the
same protocol and are shown as extra rows; the goal check judges the default only.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from rlvr_entropy import cli

METHODS = ["grpo", "entropy_bonus", "adaptive_entropy", "clip_cov", "kl_cov", "forking_tokens", "siren", "steer",
           "thermostat"]
PG = {"loss_agg_mode": "token-mean", "eps_low": 0.2, "eps_high": 0.28, "dual_clip": "none"}
METHOD_OVERRIDES: dict[str, dict[str, object]] = {
    "siren": {"norm_length": "none"},
}
TRAIN = {"eval_samples": 32, "eval_k": 8, "eval_every": 50}
# the goal check's three methods also run on --extra-seeds: more seeds where the comparison is judged
CONTENDERS = ["siren", "steer", "thermostat"]
STRESS_METHODS = ["grpo", "siren", "thermostat"]
STRESS_OVERRIDES = {"siren": {"beta": 0.5, "use_anchor": "false"}}  # a strong selective bonus
TRANSFER_METHODS = ["grpo", "siren", "steer", "thermostat"]
# thermostat settings shown next to the default (row name -> scripts/thermostat_design.py variant, e.g.
# {"thermostat-v1": "ramp0.7"} for the first default); run last; the goal check judges the default only. Empty:
# this session's budget went to more seeds of the compared methods instead
THERMOSTAT_VARIANTS: dict[str, str] = {}
# the temperature frontier: final checkpoints of these methods sampled at these temperatures
FRONTIER_METHODS = ["grpo", "siren", "steer", "thermostat"]
FRONTIER_TEMPS = (1.0, 0.9, 0.8, 0.7)
# rows run on the transfer task as well (none: the default is already one-sided there)
TRANSFER_VARIANTS: dict[str, str] = {}


def _run_variants(variants: dict[str, str], seeds, steps, out: Path, jobs, task=None) -> int:
    """Run design variants (row name -> variant) with this protocol into out/<row name>/seed<s>."""
    import thermostat_design

    return thermostat_design.run_all(list(variants.values()), seeds, steps, out, jobs,
                                     dirnames={v: k for k, v in variants.items()}, task=task)


def _argv(methods, seeds, steps, out, jobs, train_extra=None, per_method=None, task=None):
    argv = ["compare", "--methods", ",".join(methods), "--seeds", ",".join(map(str, seeds)), "--steps", str(steps),
            "--out", str(out), "--no-plots", "--quiet", "--jobs", str(jobs)]
    if task:
        argv += ["--task", task]
    argv += [f"train.{k}={v}" for k, v in {**TRAIN, **(train_extra or {})}.items()]
    for m in methods:
        for k, v in {**PG, **METHOD_OVERRIDES.get(m, {}), **(per_method or {}).get(m, {})}.items():
            argv.append(f"{m}.{k}={v}")
    return argv


def _runs(root: Path) -> dict[str, list[list[dict]]]:
    """{method: [per-seed metric rows]} of the finished runs under ``root`` (those with a summary.json: a run still
    in progress, or stopped part way, would report its last mid-run evaluation as final)."""
    out: dict[str, list[list[dict]]] = {}
    for p in sorted(root.glob("*/seed*/metrics.jsonl")):
        if not (p.parent / "summary.json").exists():
            continue
        rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        out.setdefault(p.parent.parent.name, []).append(rows)
    return out


def _mean_se(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return m, se


def _moving_avg(xs: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` values (shorter at the start)."""
    return [statistics.fmean(xs[max(0, i - window + 1):i + 1]) for i in range(len(xs))]


def _per_run(rows, window: int = 10):
    """Final evaluation metrics, plus entropy tracking from the per-step rollout entropy: H* = the method's own
    logged target ("<method>/target", the thermostat's) when it has one, else the first step's value; mean
    |H - H*| / H* over every step, and the worst |moving average| over ``window`` steps of the signed relative
    error (H - H*) / H* (averaging the error, not H, so a moving target is not charged the average's lag)."""
    ev = [r for r in rows if "eval/pass@1" in r]
    h0 = ev[0]["eval/entropy"]
    last = ev[-1]
    steps = [r for r in rows if r.get("step", 0) >= 1 and "entropy" in r]
    hs = [r["entropy"] for r in steps]
    first = hs[0] if hs else float("nan")
    targets = [next((v for k, v in r.items() if k.endswith("/target") and v == v), first) for r in steps]
    track = statistics.fmean(abs(h - t) / t for h, t in zip(hs, targets)) if hs else float("nan")
    rel = [(h - t) / t for h, t in zip(hs, targets)]  # signed relative error per step
    avg = _moving_avg(rel, window)
    worst = max(abs(x) for x in avg) if avg else float("nan")
    short = max(max(-x, 0.0) for x in avg) if avg else float("nan")  # below the target only (a floor's error)
    hav = [x / first for x in _moving_avg(hs, window)]
    ws = [r["thermostat/weight_mean"] for r in steps if "thermostat/weight_mean" in r]
    dfr = [r["thermostat/damped_frac"] for r in steps if "thermostat/damped_frac" in r]
    return {"h_min_rel": min(hav) if hav else float("nan"), "h_max_rel": max(hav) if hav else float("nan"),
            "weight_mean": statistics.fmean(ws) if ws else float("nan"),
            "damped_frac": statistics.fmean(dfr) if dfr else float("nan"),
            "pass@1": last["eval/pass@1"], "pass@8": last.get("eval/pass@8"), "pass@32": last.get("eval/pass@32"),
            "maj@8": last.get("eval/maj@k"), "distinct": last.get("eval/distinct_correct"),
            "entropy_end": last["eval/entropy"], "entropy_start": h0, "track_err": track, "max_dev": worst,
            "max_short": short}


COLS = [("pass@1", "pass@1"), ("pass@8", "pass@8"), ("pass@32", "pass@32"), ("maj@8", "maj@8"),
        ("distinct", "distinct correct"), ("entropy_end", "H end"), ("track_err", "mean abs(H-H*)/H*"),
        ("max_dev", "max abs(10-step avg of (H-H*)/H*)"), ("max_short", "max 10-step avg shortfall below H*")]


def table(root: Path) -> tuple[str, dict]:
    runs = _runs(root)
    stats = {}
    lines = ["| method | seeds | " + " | ".join(c[1] for c in COLS) + " |", "|---|---|" + "---|" * len(COLS)]
    for m in [x for x in METHODS + list(THERMOSTAT_VARIANTS) + sorted(runs) if x in runs]:
        if m in stats:
            continue
        per = [_per_run(r) for r in runs[m]]
        stats[m] = {k: _mean_se([p[k] for p in per]) for k, _ in COLS}
        stats[m]["runs"] = per
        stats[m]["start"] = _mean_se([p["entropy_start"] for p in per])
        stats[m]["h_range"] = (min(p["h_min_rel"] for p in per), max(p["h_max_rel"] for p in per))
        stats[m]["weight_mean"] = _mean_se([p["weight_mean"] for p in per])
        stats[m]["damped_frac"] = _mean_se([p["damped_frac"] for p in per])
        cells = [f"{stats[m][k][0]:.3f} ± {stats[m][k][1]:.3f}" for k, _ in COLS]
        lines.append(f"| {m} | {len(per)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), stats


def plot_entropy(root: Path, path: Path, title: str, window: int = 10) -> None:
    """Per-step rollout token entropy (``window``-step moving average, mean over seeds) for every method, and the
    thermostat's target (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(rs, key):
        by_step: dict[int, list[float]] = {}
        for rows in rs:
            for r in rows:
                if r.get("step", 0) >= 1 and key in r and r[key] == r[key]:
                    by_step.setdefault(r["step"], []).append(r[key])
        steps = sorted(by_step)
        ys = [statistics.fmean(by_step[x]) for x in steps]
        return steps, _moving_avg(ys, window)

    runs = _runs(root)
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, rs in runs.items():
        line, = ax.plot(*curve(rs, "entropy"), label=m, lw=2.5 if m == "thermostat" else 1.2)
        if m == "thermostat":
            ax.plot(*curve(rs, "thermostat/target"), ls="--", color=line.get_color(), lw=1.2,
                    label="thermostat target")
    ax.set_xlabel("step")
    ax.set_ylabel(f"rollout token entropy (nats, {window}-step avg)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares line y = a + b x and the Pearson correlation: (a, b, r)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx if sxx > 0 else 0.0
    r = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")
    return my - b * mx, b, r


def tradeoff(stats: dict) -> list[str]:
    """Does a method beat the entropy dial? Fit pass@1 and pass@8 on the final entropy over every run of every
    method (``stats`` from :func:`table`), then give each method's mean residual ± SE across its seeds: a method
    that only moves along the line (more entropy: more pass@8, less pass@1) has residuals near 0 on both; a better
    trade-off is above it."""
    per = {m: v["runs"] for m, v in stats.items()}
    pts = [p for ps in per.values() for p in ps]
    if len(pts) < 3:
        return []
    out = []
    fits = {}
    for k in ("pass@1", "pass@8"):
        a, b, r = _fit([p["entropy_end"] for p in pts], [p[k] for p in pts])
        fits[k] = (a, b)
        out.append(f"- {k} = {a:.3f} {b:+.3f} x H_end (per nat; Pearson r = {r:.2f}, {len(pts)} runs)")
    out += ["", "| method | pass@1 residual | pass@8 residual |", "|---|---|---|"]
    for m, ps in per.items():
        cells = []
        for k in ("pass@1", "pass@8"):
            a, b = fits[k]
            mean, se = _mean_se([p[k] - (a + b * p["entropy_end"]) for p in ps])
            cells.append(f"{mean:+.3f} ± {se:.3f}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return out


def controller_activity(stats: dict) -> list[str]:
    """One line per thermostat row: the token weight and the share of tokens damped, averaged over every step of
    the run (mean ± SE across seeds): how much of the policy-gradient signal the controller held back."""
    return [f"- {m}: mean token weight {v['weight_mean'][0]:.4f} ± {v['weight_mean'][1]:.4f}, share of tokens damped "
            f"{v['damped_frac'][0]:.3f} ± {v['damped_frac'][1]:.3f}"
            for m, v in stats.items() if not math.isnan(v["weight_mean"][0])]


def entropy_range(stats: dict) -> list[str]:
    """One line per method: the lowest and highest 10-step average of the rollout entropy over every seed's run,
    relative to the first step's entropy (collapse and explosion show here)."""
    return [f"- {m}: entropy stayed between {v['h_range'][0]:.2f} and {v['h_range'][1]:.2f} x its first-step value "
            f"(10-step averages, every seed)" for m, v in stats.items()]


def _sweep_one(run_dir: str) -> list[dict]:
    import torch

    from rlvr_entropy.testbed.frontier import temperature_sweep

    torch.set_num_threads(1)
    return temperature_sweep(run_dir, FRONTIER_TEMPS)


def sweep_frontiers_dirs(dirs: list[Path], jobs: int) -> list[list[dict]]:
    """Frontier records of each run directory (``jobs`` processes; cached per run)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(1, jobs)) as ex:
        return list(ex.map(_sweep_one, [str(d) for d in dirs]))


def sweep_frontiers(root: Path, methods: list[str], jobs: int) -> dict[str, list[list[dict]]]:
    """{method: [per-seed frontier records]} for the finished runs of ``methods`` under ``root`` (cached per run)."""
    dirs = [(m, d) for m in methods for d in sorted((root / m).glob("seed*")) if (d / "summary.json").exists()]
    recs = sweep_frontiers_dirs([d for _, d in dirs], jobs)
    out: dict[str, list[list[dict]]] = {}
    for (m, _), r in zip(dirs, recs):
        out.setdefault(m, []).append(r)
    return out


def _above(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(mean, se) ``a`` above ``b`` with non-overlapping standard errors: a's mean - se > b's mean + se."""
    return a[0] - a[1] > b[0] + b[1]


def _matched(fr: dict[str, list[list[dict]]], refs=("siren", "steer"), ours: str = "thermostat"):
    """For each method of ``refs`` (when both it and ``ours`` have frontiers), at each temperature: (method, T, its
    pass@1 (mean, se), {key: (its (mean, se), ours' (mean, se) at that pass@1, verdict)}) for pass@8 and pass@32;
    verdict "above" / "below" when the standard errors do not overlap, else "overlap"."""
    from rlvr_entropy.testbed.frontier import at_matched

    th = fr.get(ours)
    for r in refs:
        if r not in fr or not th:
            continue
        for i, t in enumerate(FRONTIER_TEMPS):
            x = _mean_se([run[i]["eval/pass@1"] for run in fr[r]])
            cmp = {}
            for k in ("eval/pass@8", "eval/pass@32"):
                ref = _mean_se([run[i][k] for run in fr[r]])
                mine = _mean_se([at_matched(run, "eval/pass@1", x[0], k) for run in th])
                cmp[k] = (ref, mine, "above" if _above(mine, ref) else "below" if _above(ref, mine) else "overlap")
            yield r, t, x, cmp


def frontier_section(fr: dict[str, list[list[dict]]], plot_path: Path | None = None) -> list[str]:
    """Markdown lines: pass@1 / pass@8 / pass@32 / entropy per temperature, and the thermostat's pass@k at the seed
    methods' pass@1 (matched point by point)."""
    keys = [("eval/pass@1", "pass@1"), ("eval/pass@8", "pass@8"), ("eval/pass@32", "pass@32"),
            ("eval/entropy", "H")]
    lines = ["| method | T | seeds | " + " | ".join(k[1] for k in keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    means: dict[str, list[tuple[float, float]]] = {}
    for m, runs in fr.items():
        for i, t in enumerate(FRONTIER_TEMPS):
            cells = [_mean_se([r[i][k] for r in runs]) for k, _ in keys]
            means.setdefault(m, []).append((cells[0][0], cells[1][0]))
            lines.append(f"| {m} | {t:g} | {len(runs)} | " + " | ".join(f"{a:.3f} ± {b:.3f}" for a, b in cells) + " |")
    lines += ["", "The thermostat's frontier against each seed method's, point by point: at every temperature of the "
              "seed method, its mean pass@1 there, and the thermostat's pass@8 / pass@32 read off each thermostat "
              "run's curve at that pass@1 (linear between temperatures, never extrapolated; mean ± standard error "
              "over seeds). \"above\" = the standard errors do not overlap.", "",
              "| seed method | its T | its pass@1 | its pass@8 | thermostat pass@8 at that pass@1 | its pass@32 | "
              "thermostat pass@32 at that pass@1 |", "|---|---|---|---|---|---|---|"]
    for r, t, x, cmp in _matched(fr):
        cells = [f"{x[0]:.3f} ± {x[1]:.3f}"]
        for ref, ours, verdict in cmp.values():
            cells += [f"{ref[0]:.3f} ± {ref[1]:.3f}", f"{ours[0]:.3f} ± {ours[1]:.3f} ({verdict})"]
        lines.append(f"| {r} | {t:g} | " + " | ".join(cells) + " |")
    if plot_path is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m, pts in means.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=m)
            ax.annotate("T=1", (xs[0], ys[0]), fontsize=7, textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("pass@1")
        ax.set_ylabel("pass@8")
        ax.set_title("Temperature frontier (mean over seeds; T = " + ", ".join(f"{t:g}" for t in FRONTIER_TEMPS) + ")")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot_path, dpi=110)
        plt.close(fig)
    return lines


def frontier_verdicts(fr: dict[str, list[list[dict]]]) -> list[str]:
    """One line per seed method: at how many of its temperatures the thermostat's pass@8 / pass@32 at the same
    pass@1 is above (standard errors do not overlap), overlapping, or below."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for r, _, _, cmp in _matched(fr):
        for k, (_, _, verdict) in cmp.items():
            c = counts.setdefault(r, {}).setdefault(k, {"above": 0, "overlap": 0, "below": 0})
            c[verdict] += 1
    n = len(FRONTIER_TEMPS)
    return [f"- at equal pass@1 (temperature frontier, {r}'s {n} temperatures): thermostat pass@8 above at "
            f"{c['eval/pass@8']['above']}/{n} (below at {c['eval/pass@8']['below']}), pass@32 above at "
            f"{c['eval/pass@32']['above']}/{n} (below at {c['eval/pass@32']['below']})" for r, c in counts.items()]


def goal_check(stats: dict) -> list[str]:
    out = []
    t = stats.get("thermostat")
    if not t:
        return ["thermostat missing"]
    for seed_m in ("siren", "steer"):
        s = stats.get(seed_m)
        if not s:
            continue
        for k in ("pass@8", "pass@32"):
            out.append(f"- {k}: thermostat {t[k][0]:.3f} ± {t[k][1]:.3f} vs {seed_m} {s[k][0]:.3f} ± {s[k][1]:.3f}: "
                       f"{'above, standard errors do not overlap' if _above(t[k], s[k]) else 'NOT separated'}")
        (tm, tse), (sm, sse) = t["pass@1"], s["pass@1"]
        if tm >= sm:
            verdict = "no worse (mean at or above)"
        elif tm + tse >= sm - sse:
            verdict = "no worse within standard errors (mean lower, standard errors overlap)"
        else:
            verdict = "WORSE (standard errors do not overlap)"
        out.append(f"- pass@1: thermostat {tm:.3f} ± {tse:.3f} vs {seed_m} {sm:.3f} ± {sse:.3f} "
                   f"(difference {tm - sm:+.3f}): {verdict}")
    out.append(f"- entropy within 15% of its target for the whole run (worst deviation of the 10-step moving "
               f"average, either side, mean over seeds): "
               f"{t['max_dev'][0]:.3f} -> {'yes' if t['max_dev'][0] <= 0.15 else 'NO'}")
    out.append(f"- entropy never more than 15% below its target (worst 10-step shortfall, mean over seeds): "
               f"{t['max_short'][0]:.3f} -> {'yes' if t['max_short'][0] <= 0.15 else 'NO'}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="20,21,22", help="seeds for every method (fresh: design used 10-13)")
    ap.add_argument("--extra-seeds", default="23,24,25,26,27",
                    help=f"more seeds for {', '.join(CONTENDERS)} only ('' for none)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default="runs/evidence")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--skip-stress", action="store_true")
    ap.add_argument("--transfer-task", default="countdown4", help="second task for the transfer check ('' skips)")
    ap.add_argument("--only-report", action="store_true")
    ap.add_argument("--no-frontier", action="store_true", help="skip the temperature frontier section")
    ap.add_argument("--results", default="docs/results_issue6.md")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.out)
    t0 = time.time()
    if not a.only_report:
        rc = cli.main(_argv(a.methods.split(","), seeds, a.steps, out / "main", a.jobs))
        if rc:
            return rc
        extra = [int(x) for x in a.extra_seeds.split(",") if x]
        contenders = [m for m in CONTENDERS if m in a.methods.split(",")]
        if extra and contenders:
            rc = cli.main(_argv(contenders, extra, a.steps, out / "main", a.jobs))
            if rc:
                return rc
        if not a.skip_stress:
            rc = cli.main(_argv(STRESS_METHODS, seeds[:2], a.steps, out / "stress", a.jobs,
                                train_extra={"lr": 3e-4}, per_method=STRESS_OVERRIDES))
            if rc:
                return rc
        if a.transfer_task:
            rc = cli.main(_argv(TRANSFER_METHODS, seeds[:2], a.steps, out / "transfer", a.jobs, task=a.transfer_task))
            if rc:
                return rc
            if TRANSFER_VARIANTS:
                rc = _run_variants(TRANSFER_VARIANTS, seeds[:2], a.steps, out / "transfer", a.jobs,
                                   task=a.transfer_task)
                if rc:
                    return rc
        if THERMOSTAT_VARIANTS:  # last: the comparison rows, not needed by the goal check
            rc = _run_variants(THERMOSTAT_VARIANTS, seeds, a.steps, out / "main", a.jobs)
            if rc:
                return rc
    main_table, main_stats = table(out / "main")
    fr = None if a.no_frontier else sweep_frontiers(
        out / "main", [m for m in FRONTIER_METHODS if m in main_stats], a.jobs)
    docs = Path(a.results).parent
    docs.mkdir(parents=True, exist_ok=True)
    plot_entropy(out / "main", docs / "results_entropy.png", "Countdown-3, lr 1e-4 (mean over seeds)")
    parts = ["# Results: entropy methods on the built-in Countdown testbed", "",
             "Generated by `python scripts/thermostat_evidence.py` (do not edit by hand). Mean ± standard error "
             "across seeds; final evaluation on 128 held-out problems x 32 samples (unbiased pass@k).", "",
             "Protocol: see the script's docstring.", "", "## Main comparison (lr 1e-4)", "", main_table, "",
             "thermostat = the default (a floor target that ramps from the first measured entropy H0 to 0.7 x H0 "
             "over 40 steps; efficient allocation; chosen on design seeds 10-11 before these runs, see "
             "docs/methods/thermostat_design.md). siren, steer and thermostat ran on more seeds than the "
             "other methods: the goal check compares them. The goal check judges the default only. \"No worse\" "
             "for pass@1 means the thermostat's mean is not below the other method's with non-overlapping "
             "standard errors (the mirror of the \"above\" rule for pass@k); the raw difference is printed.",
             "",
             "![entropy curves](results_entropy.png)", "",
             "Controller activity (averaged over every step of each run):", "", *controller_activity(main_stats), "",
             "## Goal check (issue 6)", "", *goal_check(main_stats), *(frontier_verdicts(fr) if fr else []), "",
             "## The entropy dial", "",
             "Final pass@1 and pass@8 against the final token entropy over every run of the main comparison "
             "(linear fit), and each method's mean residual: how far it sits above (+) or below (-) the line that "
             "entropy alone predicts.", "", *tradeoff(main_stats)]
    if fr:
        parts += ["", "## Temperature frontier", "",
                  "The same final policies sampled at lower temperatures (logits scaled by 1/T: a deployment knob, "
                  "not part of training). The goal check above is at T = 1, as trained; this section asks which "
                  "policy offers more pass@k at equal pass@1 when each may be sampled at its own temperature.", "",
                  *frontier_section(fr, docs / "results_frontier.png"), "",
                  "![temperature frontier](results_frontier.png)"]
    if (out / "stress").exists():
        st_table, st_stats = table(out / "stress")
        plot_entropy(out / "stress", docs / "results_stress_entropy.png", "Stress: lr 3e-4")
        parts += ["", "## Stress test (lr 3e-4; siren here is a strong selective bonus: beta 0.5, no anchor)", "",
                  st_table, "", *entropy_range(st_stats), "", "![stress entropy curves](results_stress_entropy.png)"]
    if (out / "transfer").exists():
        tr_table, tr_stats = table(out / "transfer")
        task = json.loads(next((out / "transfer").glob("*/seed*/config.json")).read_text())["train"]["task"]
        plot_entropy(out / "transfer", docs / "results_transfer_entropy.png", f"Transfer: {task}")
        fr_t = None if a.no_frontier else sweep_frontiers(
            out / "transfer", [m for m in FRONTIER_METHODS if m in tr_stats], a.jobs)
        parts += ["", f"## Transfer check ({task}, same protocol)", "", tr_table, "",
                  "![transfer entropy curves](results_transfer_entropy.png)", "",
                  *goal_check(tr_stats), *(frontier_verdicts(fr_t) if fr_t else [])]
        if fr_t:
            parts += ["", f"### Temperature frontier on {task}", "",
                      *frontier_section(fr_t, docs / "results_transfer_frontier.png"), "",
                      "![transfer temperature frontier](results_transfer_frontier.png)"]
    Path(a.results).write_text("\n".join(parts) + "\n")
    print("\n".join(parts))
    print(f"\nwall {time.time() - t0:.0f} s; wrote {a.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
