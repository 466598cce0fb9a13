"""Predicted vs measured entropy change on the built-in testbed (issue 4): trains through the TRL engine with the
entropy-change probe on every optimizer step, then prints the Pearson / Spearman correlations of both predictors
(exact first-order form and STEER's closed form) with the measured change, overall and per quadrant, and writes the
plots.

    python scripts/entropy_change_diagnostics.py [--steps 10] [--method grpo] [--lr 1e-4] [--out runs/diagnostics]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rlvr_entropy import diagnostics_plots as P
from rlvr_entropy.diagnostics import FORMS, QUADRANTS
from rlvr_entropy.testbed.train import TrainConfig
from rlvr_entropy.testbed.trl_engine import train_trl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--method", default="grpo")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", default="runs/diagnostics")
    a = ap.parse_args(argv)
    out = Path(a.out)
    cfg = TrainConfig(steps=a.steps, lr=a.lr, eval_every=10_000, eval_problems=16)
    train_trl(a.method, cfg, out, progress=False, diagnostics_every=1)
    recs = P.load_probe_records(out / "trl" / "entropy_change.jsonl")
    print(f"{len(recs)} probes ({a.method}, lr {a.lr}, countdown3, TRL engine); mean over probes:")
    for form in FORMS:
        def m(key):
            return P._mean_report(recs, key)
        quad = ", ".join(f"{q} {m(f'{form}/pearson/{q}'):.3f}" for q in QUADRANTS)
        print(f"  {form:5s}: Pearson {m(f'{form}/pearson'):.3f}, Spearman {m(f'{form}/spearman'):.3f}; "
              f"Pearson per quadrant: {quad}")
    P.scatter_predicted_vs_measured(recs, out / "entropy_change_scatter.png")
    P.quadrant_bars(recs, out / "entropy_change_quadrants.png")
    print(f"plots in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
