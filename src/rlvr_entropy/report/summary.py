"""Load runs, summarize them per method (mean over seeds), plot, write summary.json and report.html."""
from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any


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


def load_runs(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every run under ``run_dir``: dicts with method, seed, path, config, rows (metrics.jsonl records)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {root} does not exist")
    runs = []
    for mpath in sorted(root.rglob("metrics.jsonl")):
        cfg_path = mpath.parent / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        rows = _read_jsonl(mpath)
        if not rows:
            continue
        method = cfg.get("label") or cfg.get("method") or mpath.parent.name
        seed = cfg.get("train", {}).get("seed", 0)
        runs.append({"method": method, "seed": seed, "path": str(mpath.parent), "config": cfg, "rows": rows})
    if not runs:
        raise FileNotFoundError(f"no metrics.jsonl with records under {root}")
    return runs


def _evals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "eval/pass@1" in r]


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _run_summary(run: dict) -> dict[str, Any]:
    ev = _evals(run["rows"])
    if not ev:
        return {"seed": run["seed"], "steps": run["rows"][-1].get("step", 0)}
    first, last = ev[0], ev[-1]
    k = int(last.get("eval/k", 8))
    curve = {int(m.group(1)): v for key, v in last.items() if (m := re.fullmatch(r"eval/pass@(\d+)", key))}
    return {
        "seed": run["seed"],
        "steps": run["rows"][-1].get("step", 0),
        "entropy_start": first.get("eval/entropy"), "entropy_end": last.get("eval/entropy"),
        "pass@1_start": first.get("eval/pass@1"), "pass@1_end": last.get("eval/pass@1"),
        "pass@k_start": first.get("eval/pass@k"), "pass@k_end": last.get("eval/pass@k"), "k": k,
        "maj@k_end": last.get("eval/maj@k"),
        "distinct_answers_start": first.get("eval/distinct_correct"),
        "distinct_answers_end": last.get("eval/distinct_correct"),
        "train_entropy_start": run["rows"][1].get("entropy") if len(run["rows"]) > 1 else None,
        "train_entropy_end": run["rows"][-1].get("entropy"),
        "pass_at_k_curve_end": curve,
        "wall_s": run["rows"][-1].get("wall_s"),
    }


_KEYS = ("entropy_start", "entropy_end", "pass@1_start", "pass@1_end", "pass@k_start", "pass@k_end", "maj@k_end",
         "distinct_answers_start", "distinct_answers_end", "train_entropy_start", "train_entropy_end", "wall_s",
         "steps")


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Per method: the mean over seeds of start/end metrics, plus every seed's own values."""
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(_run_summary(r))
    out: dict[str, Any] = {"methods": {}}
    for name, seeds in by.items():
        s: dict[str, Any] = {key: _mean([x.get(key) for x in seeds]) for key in _KEYS}
        s["k"] = seeds[0].get("k")
        ks = sorted({k for x in seeds for k in x.get("pass_at_k_curve_end", {})})
        s["pass_at_k_curve_end"] = {str(k): _mean([x.get("pass_at_k_curve_end", {}).get(k) for x in seeds])
                                    for k in ks}
        s["n_seeds"] = len(seeds)
        s["per_seed"] = seeds
        out["methods"][name] = s
    return out


# ------------------------------------------------------------------------------------------------ plots
def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        if key in r and r[key] is not None:
            xs.append(r["step"])
            ys.append(r[key])
    return xs, ys


def _mean_series(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    acc: dict[int, list[float]] = {}
    for r in runs:
        for x, y in zip(*_series(r["rows"], key)):
            acc.setdefault(x, []).append(y)
    xs = sorted(acc)
    return xs, [_mean(acc[x]) for x in xs]


def make_plots(runs: list[dict], summary: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    paths = []

    def save(fig, name):
        p = out_dir / name
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in by.items():
        line, = ax.plot(*_mean_series(rs, "eval/entropy"), marker="o", ms=3, label=f"{name} (eval)")
        ax.plot(*_mean_series(rs, "entropy"), color=line.get_color(), alpha=0.3, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("token entropy (nats)")
    ax.set_title("Entropy (line: held-out eval; faint: rollouts)")
    ax.legend()
    save(fig, "entropy.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    k = next(iter(summary["methods"].values())).get("k", 8)
    for name, rs in by.items():
        axes[0].plot(*_mean_series(rs, "eval/pass@1"), marker="o", ms=3, label=name)
        axes[1].plot(*_mean_series(rs, "eval/pass@k"), marker="o", ms=3, label=name)
    axes[0].set_title("pass@1 (held-out)")
    axes[1].set_title(f"pass@{k} (held-out, unbiased)")
    for a in axes:
        a.set_xlabel("step")
        a.legend()
    save(fig, "pass_at_k.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in summary["methods"].items():
        curve = s.get("pass_at_k_curve_end", {})
        if curve:
            ks = sorted(int(x) for x in curve)
            ax.plot(ks, [curve[str(x)] for x in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_title("pass@k against k at the end")
    ax.legend()
    save(fig, "pass_at_k_vs_k.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in by.items():
        ax.plot(*_mean_series(rs, "eval/distinct_correct"), marker="o", ms=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("distinct correct solutions / problem")
    ax.set_title("Diversity of correct solutions")
    ax.legend()
    save(fig, "distinct_correct.png")
    return paths


def diagnostic_plots(runs: list[dict], out_dir: Path) -> list[Path]:
    """Entropy percentiles over steps (first run of each method that logged them) and, where a run holds
    entropy-change probes (``entropy_change.jsonl``, written by the TRL engine's ``diagnostics_every``), the
    predicted-vs-measured scatter and per-quadrant correlations."""
    from rlvr_entropy import diagnostics_plots as D

    paths: list[Path] = []
    seen: set[str] = set()
    for r in runs:
        if r["method"] in seen or not any("entropy/p50" in row for row in r["rows"]):
            continue
        seen.add(r["method"])
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", r["method"])
        paths.append(D.entropy_percentiles(r["rows"], out_dir / f"entropy_percentiles_{name}.png"))
    recs: list[dict] = []
    for r in runs:
        for cand in (Path(r["path"]) / "entropy_change.jsonl", Path(r["path"]) / "trl" / "entropy_change.jsonl"):
            recs += D.load_probe_records(cand)
    if recs:
        paths.append(D.scatter_predicted_vs_measured(recs, out_dir / "entropy_change_scatter.png"))
        paths.append(D.quadrant_bars(recs, out_dir / "entropy_change_quadrants.png"))
    return paths


# ------------------------------------------------------------------------------------------------- html
def frontier_plot(runs: list[dict], out_dir: Path) -> list[Path]:
    """pass@k against pass@1 of each method's final policy sampled at several temperatures (mean over seeds), from
    the ``frontier.json`` files that ``rlvr-entropy compare`` / ``frontier`` leave in the run directories; [] when
    there are none."""
    by: dict[str, dict[float, list[dict]]] = {}
    k = None
    for r in runs:
        f = Path(r["path"]) / "frontier.json"
        if not f.exists():
            continue
        try:
            recs = json.loads(f.read_text())["records"]
        except (json.JSONDecodeError, KeyError):
            continue
        for rec in recs:
            by.setdefault(r["method"], {}).setdefault(float(rec["T"]), []).append(rec)
            k = rec.get("eval/k", k)
    if not by:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, per_t in by.items():
        ts = sorted(per_t, reverse=True)
        xs = [_mean([x["eval/pass@1"] for x in per_t[t]]) for t in ts]
        ys = [_mean([x["eval/pass@k"] for x in per_t[t]]) for t in ts]
        ax.plot(xs, ys, marker="o", label=name)
        ax.annotate(f"T={ts[0]:g}", (xs[0], ys[0]), fontsize=7, textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("pass@1")
    ax.set_ylabel(f"pass@{_fmt(k)}")
    ax.set_title("Final policy at lower temperatures (T = " + ", ".join(
        f"{t:g}" for t in sorted({t for v in by.values() for t in v}, reverse=True)) + ")")
    ax.legend()
    fig.tight_layout()
    p = out_dir / "frontier.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return [p]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return html.escape(str(v))


def write_html(summary: dict, plots: list[Path], out: Path, title: str = "rlvr-entropy testbed report") -> None:
    cols = [("entropy_start", "H start"), ("entropy_end", "H end"), ("pass@1_start", "pass@1 start"),
            ("pass@1_end", "pass@1 end"), ("pass@k_start", "pass@k start"), ("pass@k_end", "pass@k end"),
            ("maj@k_end", "maj@k end"), ("distinct_answers_end", "distinct correct end"), ("n_seeds", "seeds"),
            ("wall_s", "wall s")]
    head = "".join(f"<th>{html.escape(c[1])}</th>" for c in cols)
    body = "".join("<tr><td>" + html.escape(name) + "</td>" + "".join(f"<td>{_fmt(s.get(c[0]))}</td>" for c in cols)
                   + "</tr>" for name, s in summary["methods"].items())
    imgs = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" '
                   f'alt="{html.escape(p.stem)}"><figcaption>{html.escape(p.name)}</figcaption></figure>'
                   for p in plots)
    k = next(iter(summary["methods"].values())).get("k")
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:8px}}img{{max-width:520px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Held-out evaluation at temperature 1: H = mean token entropy (nats); pass@k with the unbiased estimator
1 - C(n-c,k)/C(n,k), k = {_fmt(k)}; maj@k = plurality vote over final answers; distinct correct = different
verified-correct solutions per problem among the samples. Start = before RL (after the warm start), end = last
evaluation; values are means over seeds.</p>
<table><tr><th>method</th>{head}</tr>{body}</table>
{imgs}
</body></html>"""
    out.write_text(doc)


def build_report(run_dir: str | Path, plots: bool = True) -> dict[str, Any]:
    """Rebuild ``summary.json`` (and plots + ``report.html`` when matplotlib is available) from metrics files."""
    root = Path(run_dir)
    runs = load_runs(root)
    summary = summarize(runs)
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return summary
        paths = make_plots(runs, summary, root) + frontier_plot(runs, root) + diagnostic_plots(runs, root)
        write_html(summary, paths, root / "report.html")
    return summary
