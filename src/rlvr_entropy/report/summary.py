"""Load runs, check they form one experiment, summarize them per method (mean and standard error over seeds), write a
verdict, plot, and write summary.json and report.html.

One experiment = one training configuration: every run under the directory shares the ``TrainConfig`` (except
``seed``; ``steps`` may differ only for a run still in progress) and every run of a method shares its overrides.
:func:`load_runs` refuses anything else with a :class:`MixedRunsError` naming the runs and the keys that differ, and
ignores folders without ``config.json`` (not runs of this library).

Column names are the same everywhere (CLI table, HTML table, figure labels): :data:`COLUMNS`.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
import textwrap
from pathlib import Path
from typing import Any

TRAIN_FREE = ("seed", "steps", "checkpoint_every")  # may differ between the runs of one experiment


class MixedRunsError(ValueError):
    """The directory holds runs of more than one configuration (or two runs of one method and seed)."""


# (summary key stem, column title, what it is)
COLUMNS = [
    ("entropy", "entropy", "held-out mean token entropy (nats) at temperature 1"),
    ("pass@1", "pass@1", "held-out pass@1 (unbiased estimator)"),
    ("pass@k", "pass@{k}", "held-out pass@k, unbiased 1 - C(n-c,k)/C(n,k)"),
    ("maj@k", "maj@{k}", "plurality vote over k samples is correct"),
    ("distinct_correct", "distinct correct", "different verified-correct solutions per problem among the samples"),
]
_EVAL_KEYS = {"entropy": "eval/entropy", "pass@1": "eval/pass@1", "pass@k": "eval/pass@k", "maj@k": "eval/maj@k",
              "distinct_correct": "eval/distinct_correct"}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line of a crashed run
    return rows


def _describe(d: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={d.get(k)!r}" for k in keys)


def load_runs(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every run under ``run_dir`` (a folder with ``metrics.jsonl`` and ``config.json``): dicts with method (its
    label), seed, path, config, rows. Raises ``FileNotFoundError`` when there is none and :class:`MixedRunsError`
    when they are not one experiment."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {root} does not exist")
    runs, skipped = [], []
    for mpath in sorted(root.rglob("metrics.jsonl")):
        cfg_path = mpath.parent / "config.json"
        if not cfg_path.exists():
            skipped.append(str(mpath.parent))
            continue
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            skipped.append(str(mpath.parent))
            continue
        if "method" not in cfg or "train" not in cfg:
            skipped.append(str(mpath.parent))
            continue
        rows = _read_jsonl(mpath)
        if not rows:
            continue
        runs.append({"method": cfg.get("label") or cfg["method"], "seed": cfg["train"].get("seed", 0),
                     "path": str(mpath.parent), "config": cfg, "rows": rows})
    if not runs:
        extra = f" (folders without config.json, not runs of rlvr-entropy: {skipped[:3]})" if skipped else ""
        raise FileNotFoundError(f"no testbed run (metrics.jsonl + config.json) with records under {root}{extra}")
    _check_one_experiment(root, runs)
    return runs


def _check_one_experiment(root: Path, runs: list[dict]) -> None:
    ref = runs[0]
    ref_train = {k: v for k, v in ref["config"]["train"].items() if k not in TRAIN_FREE}
    for r in runs[1:]:
        mine = {k: v for k, v in r["config"]["train"].items() if k not in TRAIN_FREE}
        diff = sorted(k for k in set(mine) | set(ref_train) if mine.get(k) != ref_train.get(k))
        if diff:
            raise MixedRunsError(
                f"{root} mixes training configurations: {ref['path']} ({_describe(ref_train, diff)}) vs {r['path']} "
                f"({_describe(mine, diff)}); report one experiment per directory, e.g. rlvr-entropy report "
                f"{Path(r['path']).parent}")
    by_label: dict[str, dict] = {}
    seen: dict[tuple, str] = {}
    for r in runs:
        key = (r["method"], r["seed"])
        if key in seen:
            raise MixedRunsError(f"{root} holds two runs of {r['method']} seed {r['seed']}: {seen[key]} and "
                                 f"{r['path']}; keep one (or give one a different label in its config.json)")
        seen[key] = r["path"]
        sig = {"method": r["config"]["method"], "overrides": r["config"].get("method_overrides", {}),
               "engine": r["config"].get("engine", "lean")}
        first = by_label.setdefault(r["method"], {"sig": sig, "path": r["path"]})
        if first["sig"] != sig:
            diff = [k for k in sig if sig[k] != first["sig"][k]]
            raise MixedRunsError(f"{root} mixes configurations of {r['method']}: {first['path']} "
                                 f"({_describe(first['sig'], diff)}) vs {r['path']} ({_describe(sig, diff)})")
    steps = {r["config"]["train"].get("steps") for r in runs}
    if len(steps) > 1:
        done = [r for r in runs if r["rows"][-1].get("step") == r["config"]["train"].get("steps")]
        if len({r["config"]["train"].get("steps") for r in done}) > 1:
            raise MixedRunsError(f"{root} mixes run lengths (steps {sorted(steps)}); report one experiment per "
                                 "directory")


# ------------------------------------------------------------------------------------------------ numbers
def _evals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "eval/pass@1" in r]


def _finite(xs) -> list[float]:
    return [float(x) for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]


def _mean(xs) -> float:
    xs = _finite(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _se(xs) -> float:
    """Standard error of the mean over seeds (nan with fewer than two)."""
    xs = _finite(xs)
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def _run_summary(run: dict) -> dict[str, Any]:
    rows = run["rows"]
    ev = _evals(rows)
    out: dict[str, Any] = {"seed": run["seed"], "steps": rows[-1].get("step", 0), "path": run["path"],
                           "finished": rows[-1].get("step") == run["config"]["train"].get("steps")}
    timing = {f"{k}_total": sum(_finite(r.get(k) for r in rows[1:])) for k in ("gen_s", "update_s", "eval_s",
                                                                               "ckpt_s")}
    timing["eval_s_total"] += sum(_finite([rows[0].get("eval_s")]))
    out.update(timing, setup_s=rows[0].get("setup_s"), wall_s=rows[-1].get("wall_s"))
    if not ev:
        return out
    first, last = ev[0], ev[-1]
    out["k"] = int(last.get("eval/k", 8))
    for stem, key in _EVAL_KEYS.items():
        out[f"{stem}_start"], out[f"{stem}_end"] = first.get(key), last.get(key)
    for stem in ("pass@1", "pass@k"):  # sampling noise of this run's final evaluation (over problems)
        out[f"{stem}_end_eval_se"] = last.get(f"eval/{stem}_se")
        out[f"{stem}_start_eval_se"] = first.get(f"eval/{stem}_se")
    out["pass_at_k_curve_end"] = {int(m.group(1)): v for key, v in last.items()
                                  if (m := re.fullmatch(r"eval/pass@(\d+)", key))}
    out["train_entropy_start"] = rows[1].get("entropy") if len(rows) > 1 else None
    out["train_entropy_end"] = rows[-1].get("entropy")
    fr = Path(run["path"]) / "frontier.json"
    if fr.exists():
        try:
            out["frontier"] = json.loads(fr.read_text())["records"]
        except (json.JSONDecodeError, KeyError):
            pass
    return out


_KEYS = [f"{stem}_{when}" for stem in _EVAL_KEYS for when in ("start", "end")] + [
    "train_entropy_start", "train_entropy_end", "wall_s", "steps", "setup_s", "gen_s_total", "update_s_total",
    "eval_s_total", "ckpt_s_total"]


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Per method: the mean over seeds of start/end metrics, their standard error (``<key>_se``: over seeds when
    there are several, else the final evaluation's standard error over problems, with ``se_over`` saying which),
    and every seed's own values."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(_run_summary(r))
    out: dict[str, Any] = {"methods": {}}
    for name, seeds in by.items():
        seeds.sort(key=lambda x: x["seed"])
        s: dict[str, Any] = {key: _mean([x.get(key) for x in seeds]) for key in _KEYS}
        many = len(seeds) > 1
        for key in _KEYS:
            if key.split("_")[0] in _EVAL_KEYS or key.startswith("distinct_correct"):
                s[f"{key}_se"] = _se([x.get(key) for x in seeds]) if many else float("nan")
        if not many:
            for stem in ("pass@1", "pass@k"):
                for when in ("start", "end"):
                    s[f"{stem}_{when}_se"] = _mean([seeds[0].get(f"{stem}_{when}_eval_se")])
        s["se_over"] = "seeds" if many else "problems"
        s["k"] = seeds[0].get("k")
        ks = sorted({k for x in seeds for k in x.get("pass_at_k_curve_end", {})})
        s["pass_at_k_curve_end"] = {str(k): _mean([x.get("pass_at_k_curve_end", {}).get(k) for x in seeds])
                                    for k in ks}
        s["n_seeds"] = len(seeds)
        s["seeds"] = [x["seed"] for x in seeds]
        s["finished"] = all(x["finished"] for x in seeds)
        s["per_seed"] = [{k: v for k, v in x.items() if k != "frontier"} for x in seeds]
        fr = [x["frontier"] for x in seeds if "frontier" in x]
        if fr:
            temps = sorted({float(rec["T"]) for f in fr for rec in f}, reverse=True)
            s["frontier"] = [{"T": t, **{key: _mean([rec.get(key) for f in fr for rec in f if float(rec["T"]) == t])
                                         for key in ("eval/pass@1", "eval/pass@k", "eval/entropy")}}
                             for t in temps]
        out["methods"][name] = s
    out["provenance"] = _provenance(runs)
    out["verdict"] = verdict(out)
    return out


def _provenance(runs: list[dict]) -> dict[str, Any]:
    cfg0 = runs[0]["config"]
    prov = dict(cfg0.get("provenance") or {})
    commits = sorted({str((r["config"].get("provenance") or {}).get("commit")) for r in runs})
    from dataclasses import fields

    try:
        from rlvr_entropy.testbed.train import TrainConfig

        defaults = {f.name: f.default for f in fields(TrainConfig)}
    except ImportError:  # pragma: no cover - the testbed always ships with the report
        defaults = {}
    train = {k: v for k, v in cfg0["train"].items() if k != "seed"}
    changed = {k: v for k, v in train.items() if k in defaults and defaults[k] != v}
    overrides = {}
    for r in runs:
        overrides.setdefault(r["method"], r["config"].get("method_overrides", {}))
    return {"command": prov.get("command"), "commit": commits[0] if len(commits) == 1 else commits,
            "version": prov.get("version"), "torch": prov.get("torch"), "machine": prov.get("machine"),
            "started": prov.get("started"), "engine": cfg0.get("engine", "lean"), "task": train.get("task"),
            "steps": train.get("steps"), "seeds": sorted({r["seed"] for r in runs}), "train": train,
            "train_changed": changed, "method_overrides": overrides}


# ------------------------------------------------------------------------------------------------ verdict
def _f(x: float, nd: int = 3) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def verdict(summary: dict) -> str:
    """A short paragraph: which method collapsed and by how much, which kept pass@k, and how sure one can be."""
    ms = summary["methods"]
    if not ms or not any(math.isfinite(s.get("entropy_end", float("nan"))) for s in ms.values()):
        return "No evaluation yet: nothing to conclude."
    k = next((s.get("k") for s in ms.values() if s.get("k")), 8)
    base = "grpo" if "grpo" in ms else next(iter(ms))
    b = ms[base]
    steps = int(b.get("steps") or 0)
    out = []

    def drop(s):
        return 1 - s["entropy_end"] / s["entropy_start"] if s["entropy_start"] else float("nan")

    def noise(s, t, key):
        return math.sqrt(sum(x ** 2 for x in (s.get(f"{key}_se", float("nan")), t.get(f"{key}_se", float("nan")))
                             if math.isfinite(x))) or float("nan")

    db = drop(b)
    collapsed = db > 0.4 and b["pass@k_end"] < b["pass@k_start"]
    what = "collapsed" if collapsed else ("lost entropy" if db > 0.2 else "kept its entropy")
    out.append(f"{base.upper() if base == 'grpo' else base} {what}: held-out entropy went from "
               f"{_f(b['entropy_start'])} to {_f(b['entropy_end'])} nats ({-100 * db:+.0f}%) in {steps} steps, "
               f"pass@1 from {_f(b['pass@1_start'])} to {_f(b['pass@1_end'])} and pass@{k} from "
               f"{_f(b['pass@k_start'])} to {_f(b['pass@k_end'])}.")
    kept, lost = [], []
    for name, s in ms.items():
        if name == base or not math.isfinite(s.get("entropy_end", float("nan"))):
            continue
        d_pk = s["pass@k_end"] - b["pass@k_end"]
        d_p1 = s["pass@1_end"] - b["pass@1_end"]
        se_pk, se_p1 = noise(s, b, "pass@k_end"), noise(s, b, "pass@1_end")
        sig = (lambda d, se: "" if not math.isfinite(se) else
               (" (within noise)" if abs(d) < 2 * se else f" (> 2 s.e. = {2 * se:.3f})"))
        out.append(f"{name}: entropy {_f(s['entropy_end'])} nats ({-100 * drop(s):+.0f}% from its start), "
                   f"pass@{k} {_f(s['pass@k_end'])} ({d_pk:+.3f} vs {base}{sig(d_pk, se_pk)}), "
                   f"pass@1 {_f(s['pass@1_end'])} ({d_p1:+.3f}{sig(d_p1, se_p1)}).")
        se_own = s.get("pass@k_end_se", float("nan"))
        margin = 2 * se_own if math.isfinite(se_own) else 0.0
        (kept if s["pass@k_end"] >= s["pass@k_start"] - margin else lost).append(name)
    if kept:
        out.append(f"Kept pass@{k} at its starting level (within 2 s.e.): {', '.join(kept)}"
                   + (f"; below it: {', '.join(lost)}." if lost else "."))
    elif lost:
        out.append(f"Every method ended below its starting pass@{k}.")
    fr = {n: s["frontier"] for n, s in ms.items() if s.get("frontier")}
    if base in fr and len(fr) > 1:
        from rlvr_entropy.testbed.frontier import at_matched

        x = b["pass@1_end"]
        parts = [f"{n} {at_matched(f, 'eval/pass@1', x, 'eval/pass@k'):.3f}" for n, f in fr.items() if n != base]
        out.append(f"At {base}'s final pass@1 ({_f(x)}), read off each policy's temperature frontier, pass@{k} is "
                   f"{', '.join(parts)} (vs {_f(b['pass@k_end'])} for {base}).")
    n = b.get("n_seeds", 1)
    if all(s.get("n_seeds", 1) > 1 for s in ms.values()):
        out.append(f"How sure: means over {n} seeds with their standard errors; a difference under two standard "
                   "errors is not established.")
    else:
        se = b.get("pass@k_end_se", float("nan"))
        out.append(f"How sure: one seed, so the only uncertainty measured is the evaluation's sampling noise over "
                   f"the held-out problems (pass@{k} s.e. {_f(se)}); run-to-run training noise is not in it, so read "
                   f"differences below ~{_f(max(0.05, 3 * se if math.isfinite(se) else 0.05), 2)} as unresolved "
                   "and rerun with --seeds 0,1,2 for error bars over seeds.")
    if not all(s.get("finished", True) for s in ms.values()):
        out.append("Some runs are unfinished (their last evaluation is shown).")
    return " ".join(out)


# ------------------------------------------------------------------------------------------------ table
def _pm(v: float, se: float | None, nd: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.{nd}f}" + (f"±{se:.{nd}f}" if se is not None and math.isfinite(se) else "")


def table_rows(summary: dict, with_se: bool = True, sep: str = " > ") -> tuple[list[str], list[list[str]]]:
    """The results table (the CLI prints it, the HTML renders it): one header, one row per method; each metric
    cell is ``start > end`` (``± s.e.`` of the end value when ``with_se``)."""
    k = next((s.get("k") for s in summary["methods"].values() if s.get("k")), 8)
    head = ["method", "seeds"] + [t.format(k=k) for _, t, _ in COLUMNS] + ["train s"]
    rows = []
    for name, s in summary["methods"].items():
        cells = [name, str(s.get("n_seeds", 1))]
        for stem, _, _ in COLUMNS:
            a, b = s.get(f"{stem}_start"), s.get(f"{stem}_end")
            se = s.get(f"{stem}_end_se") if with_se else None
            cells.append(f"{_pm(a, None)}{sep}{_pm(b, se)}" if a is not None and math.isfinite(a) else _pm(b, se))
        cells.append(_f(s.get("wall_s"), 0))
        rows.append(cells)
    return head, rows


def format_table(summary: dict) -> str:
    """Plain-text results table, under 100 characters wide for method names up to 16 characters (start>end;
    the standard errors are in report.html and summary.json)."""
    head, rows = table_rows(summary, with_se=False, sep=">")
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head)] + [line(r) for r in rows])


def time_split(summary: dict) -> str:
    """Where the time went, summed over the runs (seconds each run's process spent, not the compare's wall): each
    run's set-up (the warm start, loaded or trained) plus its loop (``wall_s``, which starts after the set-up)."""
    ms = summary["methods"].values()
    tot = {k: sum(s.get(k, 0.0) * s.get("n_seeds", 1) for s in ms
                  if isinstance(s.get(k), (int, float)) and math.isfinite(s[k]))
           for k in ("gen_s_total", "update_s_total", "eval_s_total", "ckpt_s_total", "setup_s", "wall_s")}
    total = tot["wall_s"] + tot["setup_s"]
    if not total:
        return ""
    parts = [("sampling", tot["gen_s_total"]), ("update", tot["update_s_total"]), ("evaluation", tot["eval_s_total"]),
             ("checkpoints", tot["ckpt_s_total"]), ("set-up", tot["setup_s"])]
    other = max(0.0, total - sum(v for _, v in parts))
    text = ", ".join(f"{n} {100 * v / total:.0f}%" for n, v in parts + [("other", other)])
    steps = sum(s.get("steps", 0) * s.get("n_seeds", 1) for s in ms)
    per = (tot["gen_s_total"] + tot["update_s_total"]) / steps if steps else float("nan")
    extra = []
    for key, name in (("compare_wall_s", "wall"), ("frontier_s", "frontier"), ("report_s", "report")):
        if summary.get(key) is not None:
            extra.append(f"{name} {summary[key]:.0f} s")
    return (f"time in the runs: {total:.0f} s summed over runs ({text}); {per:.2f} s per training step"
            + (f"; {', '.join(extra)}" if extra else ""))


# ------------------------------------------------------------------------------------------------ plots
def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _band(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float]]:
    """Mean over seeds and its standard error at each step (nan se with one seed)."""
    acc: dict[int, list[float]] = {}
    for r in runs:
        for x, y in zip(*_series(r["rows"], key)):
            acc.setdefault(x, []).append(y)
    xs = sorted(acc)
    return xs, [_mean(acc[x]) for x in xs], [_se(acc[x]) for x in xs]


def _plot_band(ax, runs, key, label, **kw):
    xs, ys, se = _band(runs, key)
    if not xs:
        return None
    line, = ax.plot(xs, ys, label=label, **kw)
    if any(math.isfinite(s) for s in se):
        lo = [y - (s if math.isfinite(s) else 0) for y, s in zip(ys, se)]
        hi = [y + (s if math.isfinite(s) else 0) for y, s in zip(ys, se)]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    return line


def make_plots(runs: list[dict], summary: dict, out_dir: Path) -> list[tuple[Path, str]]:
    """The report's figures: (png path, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    k = next((s.get("k") for s in summary["methods"].values() if s.get("k")), 8)
    n_seeds = max(s.get("n_seeds", 1) for s in summary["methods"].values())
    bands = " Bands: ± one standard error over seeds." if n_seeds > 1 else " One seed: no band."
    figs: list[tuple[Path, str]] = []

    def save(fig, name, caption):
        p = out_dir / name
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        figs.append((p, caption))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rs in by.items():
        line = _plot_band(ax, rs, "eval/entropy", name, marker="o", ms=3)
        if line is not None:
            xs, ys, _ = _band(rs, "entropy")
            ax.plot(xs, ys, color=line.get_color(), alpha=0.3, lw=1)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean token entropy (nats)")
    ax.set_title("Entropy: held-out evaluation (markers) and training rollouts (faint)")
    ax.legend()
    save(fig, "entropy.png", "Entropy of each method over training: held-out samples at temperature 1 (markers) and "
                             "the training rollouts (faint lines). Collapse shows as a fall towards 0." + bands)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rs in by.items():
        _plot_band(axes[0], rs, "eval/pass@1", name, marker="o", ms=3)
        _plot_band(axes[1], rs, "eval/pass@k", name, marker="o", ms=3)
    axes[0].set_title("pass@1 (held-out)")
    axes[1].set_title(f"pass@{k} (held-out, unbiased)")
    for a in axes:
        a.set_xlabel("RL step")
        a.legend()
    axes[0].set_ylabel("fraction of problems")
    save(fig, "pass_at_k.png", f"Held-out pass@1 (left) and pass@{k} (right) over training. A collapsing policy gains "
                               f"pass@1 while its pass@{k} falls." + bands)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, s in summary["methods"].items():
        curve = s.get("pass_at_k_curve_end", {})
        if curve:
            ks = sorted(int(x) for x in curve)
            ax.plot(ks, [curve[str(x)] for x in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_title("pass@k against k, final policies")
    ax.legend()
    save(fig, "pass_at_k_vs_k.png", "pass@k of each final policy for k = 1 ... n (unbiased estimator over the n "
                                    "samples per problem; mean over seeds). A sharper policy has a flatter curve.")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rs in by.items():
        _plot_band(ax, rs, "eval/distinct_correct", name, marker="o", ms=3)
    ax.set_xlabel("RL step")
    ax.set_ylabel("distinct correct solutions per problem")
    ax.set_title("Diversity of correct solutions (held-out)")
    ax.legend()
    save(fig, "distinct_correct.png", "Different verified-correct solutions per held-out problem among its samples: "
                                      "collapse drives it towards 1." + bands)
    return figs


def frontier_plot(runs: list[dict], summary: dict, out_dir: Path) -> list[tuple[Path, str]]:
    """pass@k against pass@1 of each method's final policy sampled at several temperatures (mean over seeds), from
    the ``frontier.json`` files that ``rlvr-entropy compare`` / ``frontier`` leave in the run directories."""
    fr = {n: s["frontier"] for n, s in summary["methods"].items() if s.get("frontier")}
    if not fr:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = next((s.get("k") for s in summary["methods"].values() if s.get("k")), 8)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, recs in fr.items():
        xs = [r["eval/pass@1"] for r in recs]
        ys = [r["eval/pass@k"] for r in recs]
        ax.plot(xs, ys, marker="o", label=name)
        for r in recs:
            ax.annotate(f"T={r['T']:g}", (r["eval/pass@1"], r["eval/pass@k"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    temps = sorted({r["T"] for recs in fr.values() for r in recs}, reverse=True)
    ax.set_xlabel("pass@1")
    ax.set_ylabel(f"pass@{k}")
    ax.set_title("Temperature frontier of the final policies (T = " + ", ".join(f"{t:g}" for t in temps) + ")")
    ax.legend()
    fig.tight_layout()
    p = out_dir / "frontier.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return [(p, f"Each final policy sampled at lower temperatures: pass@{k} against pass@1 (mean over seeds). The "
                f"point at the training temperature is the final evaluation of the table (the same samples); a "
                f"curve above another offers more pass@{k} at the same pass@1.")]


def diagnostic_plots(runs: list[dict], out_dir: Path) -> list[tuple[Path, str]]:
    """Entropy percentiles over steps (one panel per method, first seed, log scale) and, where a run holds
    entropy-change probes (``entropy_change.jsonl``, written by the TRL engine's ``diagnostics_every``), the
    predicted-vs-measured scatter and per-quadrant correlations."""
    from rlvr_entropy import diagnostics_plots as D

    out: list[tuple[Path, str]] = []
    first: dict[str, dict] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        if any("entropy/p50" in row for row in r["rows"]):
            first.setdefault(r["method"], r)
    if first:
        p = D.entropy_percentiles_by_method({m: r["rows"] for m, r in first.items()},
                                            out_dir / "entropy_percentiles.png")
        out.append((p, "Token entropy percentiles of the training rollouts, one panel per method (first seed), on a "
                       "log scale (values below 1e-4 drawn at 1e-4): most tokens are nearly deterministic (the median "
                       "sits near 0), so the collapse shows in the upper percentiles and the mean."))
    recs: list[dict] = []
    for r in runs:
        for cand in (Path(r["path"]) / "entropy_change.jsonl", Path(r["path"]) / "trl" / "entropy_change.jsonl"):
            recs += D.load_probe_records(cand)
    if recs:
        out.append((D.scatter_predicted_vs_measured(recs, out_dir / "entropy_change_scatter.png"),
                    "Predicted (first order, per unit learning rate) against measured entropy change per token, "
                    "pooled over probes, by advantage sign and probability."))
        out.append((D.quadrant_bars(recs, out_dir / "entropy_change_quadrants.png"),
                    "Correlation of predicted and measured entropy change in each quadrant."))
    return out


# ------------------------------------------------------------------------------------------------- html
def _esc(v: Any) -> str:
    return html.escape(str(v))


def write_html(summary: dict, figures: list[tuple[Path, str]], out: Path,
               title: str = "rlvr-entropy testbed report") -> None:
    head, rows = table_rows(summary)
    k = next((s.get("k") for s in summary["methods"].values() if s.get("k")), 8)
    thead = "".join(f"<th>{_esc(h)}</th>" for h in head)
    tbody = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    prov = summary.get("provenance", {})
    items = [("command", prov.get("command")), ("code", f"rlvr-entropy {prov.get('version')}, commit "
                                                        f"{prov.get('commit')}, torch {prov.get('torch')}"),
             ("engine / task", f"{prov.get('engine')} / {prov.get('task')}, {prov.get('steps')} steps"),
             ("seeds", ", ".join(map(str, prov.get("seeds", [])))),
             ("training config (non-default)", json.dumps(prov.get("train_changed", {})) or "{}"),
             ("method overrides", json.dumps(prov.get("method_overrides", {}))),
             ("machine, started", f"{prov.get('machine')}, {prov.get('started')}"),
             ("time", time_split(summary))]
    prov_html = "".join(f"<tr><th>{_esc(a)}</th><td style='text-align:left'><code>{_esc(b)}</code></td></tr>"
                        for a, b in items if b)
    full_cfg = html.escape(json.dumps(prov.get("train", {}), indent=1))
    figs = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" alt="{_esc(p.stem)}">'
        f"<figcaption><b>Figure {i}.</b> {_esc(c)}</figcaption></figure>" for i, (p, c) in enumerate(figures, 1))
    defs = "".join(f"<li><b>{_esc(t.format(k=k))}</b>: {_esc(d)}</li>" for _, t, d in COLUMNS)
    se_note = ("± one standard error over seeds" if all(s.get("se_over") == "seeds"
                                                          for s in summary["methods"].values())
               else "± one standard error over the held-out problems (one seed: sampling noise of the evaluation only)")
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{_esc(title)}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto;line-height:1.4}}table{{border-collapse:collapse;
margin:0.5em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th{{text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{max-width:900px;color:#333}}code{{font-size:90%}}</style>
</head><body>
<h1>{_esc(title)}</h1>
<h2>What the numbers show</h2>
<p>{_esc(summary.get("verdict", ""))}</p>
<h2>Results</h2>
<p>Held-out evaluation: start (after the warm start, before RL) &gt; end (last evaluation); {se_note}.</p>
<table><tr>{thead}</tr>{tbody}</table>
<ul>{defs}</ul>
<h2>Provenance</h2>
<table>{prov_html}</table>
<details><summary>full training configuration</summary><pre>{full_cfg}</pre></details>
<h2>Figures</h2>
{figs}
</body></html>"""
    out.write_text(doc)


def build_report(run_dir: str | Path, plots: bool = True, extra: dict | None = None) -> dict[str, Any]:
    """Rebuild ``summary.json`` (and figures + ``report.html`` when matplotlib is available) from the run files.
    ``extra`` (e.g. the compare's wall time) is merged into the summary before it is written."""
    root = Path(run_dir)
    runs = load_runs(root)
    summary = summarize(runs)
    cmp = root / "compare.json"  # the command a compare was started with (its runs record the same)
    if cmp.exists():
        try:
            summary["provenance"]["command"] = json.loads(cmp.read_text()).get("command") or \
                summary["provenance"]["command"]
        except json.JSONDecodeError:
            pass
    summary.update(extra or {})
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            plots = False
    if plots:
        figures = make_plots(runs, summary, root) + frontier_plot(runs, summary, root) + diagnostic_plots(runs, root)
        write_html(summary, figures, root / "report.html")
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def wrap(text: str, width: int = 100) -> str:
    return "\n".join(textwrap.wrap(text, width))
