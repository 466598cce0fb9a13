"""Lean loop vs TRL engine on the testbed's default configuration (countdown3, 32 prompts x 8 samples, 0.86M model):
seconds per RL step, measured side by side in one process (alternating engines), median over steps.

    python benchmarks/bench_engines.py [--steps 8] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from rlvr_entropy.testbed.train import TrainConfig, train
from rlvr_entropy.testbed.trl_engine import train_trl


def step_times(path: Path) -> list[float]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [r["step_s"] for r in rows if r.get("step", 0) > 1 and "step_s" in r and "eval/pass@1" not in r]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--method", default="grpo")
    a = ap.parse_args(argv)
    cfg = TrainConfig(steps=a.steps, eval_every=10_000, eval_problems=8)
    times: dict[str, list[float]] = {"lean": [], "trl": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(a.rounds):
            for name, fn in (("lean", train), ("trl", train_trl)):
                out = Path(d) / f"{name}{r}"
                kw = {"resume": False} if name == "lean" else {}
                fn(a.method, cfg, out, progress=False, threads=1, **kw)
                times[name] += step_times(out / "metrics.jsonl")
    lean, trl = statistics.median(times["lean"]), statistics.median(times["trl"])
    print(f"method {a.method}, {cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} samples, 1 thread each")
    print(f"lean: {lean:.3f} s/step (median of {len(times['lean'])})")
    print(f"trl : {trl:.3f} s/step (median of {len(times['trl'])})")
    print(f"trl / lean = {trl / lean:.2f}x")


if __name__ == "__main__":
    main()
