"""Smoke test: the top-p entropy benchmark runs end to end in --quick mode (no timing assertions)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_top_p_entropy.py"


def test_bench_top_p_entropy_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top_p/plain" in proc.stdout and "peak extra resident memory" in proc.stdout
    res = json.loads(out.read_text())
    assert [r["regime"] for r in res["regimes"]] == ["llm-like (Zipf)", "gaussian x4", "gaussian x3", "flat"]
    for r in res["regimes"]:
        assert set(r["ratio"]) == {"top_p/plain fwd", "top_p/plain fwd+bwd", "entropy/plain fwd",
                                   "entropy/plain fwd+bwd", "official/plain fwd"}
        assert all(math.isfinite(v) and v > 0 for v in r["ratio"].values())
        assert r["max_abs_diff_vs_official"] < 1e-4  # same numbers as the official-style implementation
    flat = res["regimes"][-1]
    assert flat["nucleus_at_top_k"] == 1.0  # the flat regime really keeps all top_k tokens
    assert {(m["mode"], m["N"]) for m in res["memory"]} == {("fwd", 64), ("fwd", 256), ("fwd+bwd", 64),
                                                            ("fwd+bwd", 256)}
    assert all(m["extra_bytes"] >= 0 for m in res["memory"])
