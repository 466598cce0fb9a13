"""Plots for entropy-change diagnostics (matplotlib, imported lazily): predicted vs measured scatter, per-quadrant
correlation bars, entropy percentiles over steps. Each function writes one PNG and returns its path.

Inputs are the JSON records written by the engines (``entropy_change.jsonl``: one :meth:`ProbeRecord.to_json`
per probe) and per-step entropy statistics (dicts with "step" and "entropy/p10" ... keys).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from rlvr_entropy.diagnostics import FORMS, QUADRANTS


_LABELS = {"pos_high": "A>0, high p", "pos_low": "A>0, low p", "neg_high": "A<0, high p", "neg_low": "A<0, low p"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _mean_report(records: list[dict[str, Any]], key: str) -> float:
    """Mean of a report value over probes, NaNs (too few points) left out."""
    vals = [r["report"].get(key, math.nan) for r in records]
    vals = [v for v in vals if v == v]
    return sum(vals) / len(vals) if vals else math.nan


def load_probe_records(path: str | Path) -> list[dict[str, Any]]:
    """Read an ``entropy_change.jsonl`` file (a missing file gives [])."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def scatter_predicted_vs_measured(records: list[dict[str, Any]], out: str | Path) -> Path:
    """One panel per form: predicted (per unit lr) against measured entropy change, pooled over probes."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(FORMS), figsize=(5 * len(FORMS), 4), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, form in zip(axes[0], FORMS):
        for qi, q in enumerate(QUADRANTS):
            xs, ys = [], []
            for r in records:
                for p, m, qq in zip(r.get(f"predicted_{form}", []), r["measured"], r["quadrant"]):
                    if qq == qi:
                        xs.append(p)
                        ys.append(m)
            ax.scatter(xs, ys, s=4, alpha=0.4, color=colors[qi], label=_LABELS[q])
        ax.set_title(f"{form}: mean Pearson {_mean_report(records, f'{form}/pearson'):.3f}")
        ax.set_xlabel("predicted change / lr")
        ax.set_ylabel("measured entropy change")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7, markerscale=3)
    return _save(plt, fig, out)


def quadrant_bars(records: list[dict[str, Any]], out: str | Path) -> Path:
    """Mean Pearson correlation per quadrant and form, averaged over probes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(FORMS)
    for fi, form in enumerate(FORMS):
        means = [_mean_report(records, f"{form}/pearson/{q}") for q in QUADRANTS]
        means = [0.0 if m != m else m for m in means]
        ax.bar([i + fi * width for i in range(len(QUADRANTS))], means, width=width, label=form)
    ax.set_xticks([i + width * (len(FORMS) - 1) / 2 for i in range(len(QUADRANTS))])
    ax.set_xticklabels([_LABELS[q] for q in QUADRANTS])
    ax.set_ylabel("Pearson(predicted, measured)")
    ax.set_ylim(-1, 1)
    ax.legend()
    return _save(plt, fig, out)


_PCT_KEYS = ("entropy/p50", "entropy/p90", "entropy/p99", "entropy")
_PCT_FLOOR = 1e-4  # log-scale floor: values below (deterministic tokens) are drawn at the floor


def _percentile_axes(ax, rows: list[dict[str, Any]], keys: tuple[str, ...], log: bool) -> None:
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
        if pts:
            ys = [max(p[1], _PCT_FLOOR) if log else p[1] for p in pts]
            label = "mean" if k in ("entropy", "entropy/mean") else k.split("/")[-1]
            ax.plot([p[0] for p in pts], ys, label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("RL step")
    ax.set_ylabel("token entropy (nats" + (", log)" if log else ")"))
    ax.legend(fontsize=8)


def entropy_percentiles(rows: Iterable[dict[str, Any]], out: str | Path,
                        keys: tuple[str, ...] = ("entropy/p10", "entropy/p50", "entropy/p90", "entropy/mean"),
                        title: str | None = None, log: bool = False) -> Path:
    """Entropy percentiles over steps from per-step metric rows (``title``: e.g. the method's name; ``log``: a log
    y axis, useful because most tokens of a trained policy have entropy ~0)."""
    plt = _plt()
    rows = [r for r in rows if "step" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    _percentile_axes(ax, rows, keys, log)
    if title:
        ax.set_title(title)
    return _save(plt, fig, out)


def entropy_percentiles_by_method(rows_by_method: dict[str, list[dict[str, Any]]], out: str | Path,
                                  keys: tuple[str, ...] = _PCT_KEYS, log: bool = True) -> Path:
    """One panel per method (titled with its name) of rollout-token entropy percentiles and mean over steps, on a
    shared log y axis."""
    plt = _plt()
    n = max(len(rows_by_method), 1)
    cols = min(n, 2)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    for i, (ax, (name, rows)) in enumerate(zip(axes.flat, rows_by_method.items())):
        _percentile_axes(ax, [r for r in rows if "step" in r], keys, log)
        ax.set_title(name)
        if i % cols:
            ax.set_ylabel("")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(plt, fig, out)
