"""Benchmark: seconds per lean-loop RL step at the default configuration (countdown3, 32 prompts x 8 samples,
2 minibatches, the 0.86M model, one torch thread), for this checkout and for earlier git revisions, side by side.

    python benchmarks/bench_testbed_step.py [--revs f7be3d4,HEAD] [--method grpo] [--steps 120] [--rounds 1]

Each revision is checked out into a temporary worktree (``.`` is this checkout as it is on disk, uncommitted changes
included) and run in a fresh subprocess with that worktree's ``src`` first on ``sys.path``; rounds alternate the
order. Per run: ``--steps`` steps without evaluation (steps 2..N: step 1 also prepares the method; the default 120 is
the default run's length, and the share of zero-advantage rows, whose forward an inert method skips, grows as a run
sharpens, so a shorter run measures its early steps only); the medians of ``step_s``, ``gen_s`` (sampling +
verifier) and ``update_s`` (minibatch forwards, backwards, optimizer) over every step of every round, the mean
``step_s``, and the ratios to the first revision.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, tempfile
from pathlib import Path
from rlvr_entropy.testbed.train import TrainConfig, train
steps, method = int(sys.argv[1]), sys.argv[2]
cfg = TrainConfig(steps=steps, eval_every=10_000, eval_problems=8, eval_samples=8, eval_k=8)
with tempfile.TemporaryDirectory() as d:
    kw = {"resume": False} if "resume" in train.__code__.co_varnames else {}
    train(method, cfg, Path(d) / "run", progress=False, threads=1, **kw)
    rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
rows = [r for r in rows if r.get("step", 0) > 1 and "step_s" in r and "eval/pass@1" not in r]
print(json.dumps({k: [r.get(k) for r in rows] for k in ("step_s", "gen_s", "update_s")}))
"""


def worktree(rev: str, base: Path) -> Path:
    if rev == ".":
        return ROOT
    path = base / rev
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def run(src: Path, steps: int, method: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", WORKER, str(steps), method], capture_output=True, text=True, env=env,
                       timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{src}: {p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--revs", default="f7be3d4,.", help="comma-separated git revisions ('.' = this checkout)")
    ap.add_argument("--method", default="grpo")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args(argv)
    revs = [r for r in a.revs.split(",") if r]
    print(f"{a.method}, countdown3, 32 x 8, 1 thread, {a.steps} steps x {a.rounds} rounds, load average "
          f"{os.getloadavg()[0]:.1f}")
    res: dict[str, dict[str, list[float]]] = {r: {"step_s": [], "gen_s": [], "update_s": []} for r in revs}
    with tempfile.TemporaryDirectory() as d:
        trees = {r: worktree(r, Path(d)) for r in revs}
        try:
            for k in range(a.rounds):
                for r in revs[k % len(revs):] + revs[:k % len(revs)]:
                    out = run(trees[r], a.steps, a.method)
                    for key, vals in out.items():
                        res[r][key] += [v for v in vals if v is not None]
                    print(f"  round {k}: {r:>10s} {statistics.median(out['step_s']):.3f} s/step", flush=True)
        finally:
            for r, path in trees.items():
                if path != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)
    first = statistics.median(res[revs[0]]["step_s"])
    first_mean = statistics.mean(res[revs[0]]["step_s"])
    print(f"\n{'revision':>10s} {'step s':>8s} {'gen s':>8s} {'update s':>9s} {'mean step':>10s} "
          f"{'speed-up':>9s} {'(mean)':>7s}")
    for r in revs:
        med = {k: statistics.median(v) if v else float("nan") for k, v in res[r].items()}
        mean = statistics.mean(res[r]["step_s"])
        print(f"{r:>10s} {med['step_s']:8.3f} {med['gen_s']:8.3f} {med['update_s']:9.3f} {mean:10.3f} "
              f"{first / med['step_s']:8.2f}x {first_mean / mean:6.2f}x")


if __name__ == "__main__":
    main()
