"""Benchmark: SIREN's top-p entropy + backward from hidden states (tiled LM head, rlvr_entropy.kernels) against
stats.top_p_entropy on materialized logits (logits = hidden @ W^T with autograd, then the chunked top-p entropy).

    python benchmarks/bench_lm_head.py [--sizes 1024,2048,4096,8192] [--logits-max 4096] [--rounds 2]
                                       [--hidden 64] [--vocab 151936] [--json PATH] [--quick]

What is measured, per N (positions) and implementation, each in a fresh subprocess (sibling processes run one at
a time, the implementations in alternating order, ``--rounds`` times; medians reported): the wall time of one
forward + backward (to hidden and weight) after a small warm-up, and its peak extra resident memory (high-water
mark of the process during the call, reset through /proc/self/clear_refs, minus the resident size just before:
torch's CPU allocations are invisible to tracemalloc). Inputs: V = 151,936, hidden size 64 (tiny, so the
vocabulary-sized work dominates), float32, p = 0.8, top_k = 10,000, LLM-like logits (a rank feature: logits =
-s log(rank) + noise with s ~ U(1.1, 2.5), noise std 0.6: nuclei of a few to hundreds of tokens). The
materialized route needs ~2 x N x V x 4 bytes (logits and their gradient) and is only run up to ``--logits-max``.
Both routes' values are compared where both run (max |difference| printed).

Shared helpers (inputs, the memory probe, the subprocess runner) are imported by bench_lm_head_trl.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------------------------- helpers
def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(fn) -> tuple[float, int, object, float]:
    """(wall seconds, peak extra resident bytes, result, CPU seconds of every thread) of one call of fn()."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident high-water mark (VmHWM) to the current resident size
    base = status_kb("VmRSS")
    c0, t0 = cpu_seconds(), time.perf_counter()
    res = fn()
    dt, dc = time.perf_counter() - t0, cpu_seconds() - c0
    return dt, (status_kb("VmHWM") - base) * 1024, res, dc


def llm_like_inputs(N: int, H: int, V: int, seed: int = 0):
    """hidden [N, H], weight [V, H] (float32 leaves), token ids [N] for LLM-like logits hidden @ weight^T."""
    g = torch.Generator().manual_seed(seed)
    W = torch.empty(V, H)
    W[:, 0] = -torch.log1p(torch.randperm(V, generator=g).float())
    W[:, 1:] = torch.randn(V, H - 1, generator=g) * (0.6 / math.sqrt(H - 1))
    h = torch.randn(N, H, generator=g)
    h[:, 0] = 1.1 + 1.4 * torch.rand(N, generator=g)
    with torch.no_grad():  # sample the tokens from the distribution itself, in blocks
        ids = torch.cat([torch.multinomial(torch.softmax(h[s:s + 512] @ W.T, -1), 1, generator=g).squeeze(1)
                         for s in range(0, N, 512)])
    return h.requires_grad_(True), W.requires_grad_(True), ids


def run_worker(script: Path, args: dict, timeout: float = 3600) -> dict:
    """Run ``script --worker JSON`` in a fresh process; return the JSON it prints last."""
    proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(args)], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def side_by_side(script: Path, impls: list[str], sizes: list[int], rounds: int, extra: dict,
                 allowed=lambda impl, n: True) -> dict:
    """{(impl, N): [worker results]}: every round runs each implementation once per N, rotating the order."""
    out: dict = {}
    for n in sizes:
        todo = [i for i in impls if allowed(i, n)]
        for r in range(rounds):
            order = todo[r % len(todo):] + todo[:r % len(todo)]
            for impl in order:
                res = run_worker(script, {"impl": impl, "N": n, **extra})
                out.setdefault((impl, n), []).append(res)
                print(f"  N={n:6d} {impl:>22s}: {res['seconds']:7.2f} s ({res['cpu_seconds']:7.2f} s CPU), "
                      f"peak +{res['extra_bytes'] / 2**30:6.2f} GiB", flush=True)
    return out


def med(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


# ---------------------------------------------------------------------------------------------- worker
def worker(args: dict) -> dict:
    from rlvr_entropy import kernels, stats
    from rlvr_entropy.stats import Stat

    N, H, V, impl = args["N"], args["hidden"], args["vocab"], args["impl"]
    req = Stat.top_p_entropy(0.8, args["top_k"])

    def call(h, W, ids):
        if impl == "tiled":
            out = kernels.lm_head_stats(h, W, None, ids, (req,))[req]
        else:
            out = stats.top_p_entropy(h @ W.T, p=0.8, top_k=args["top_k"])
        gw = torch.randn(out.shape[0], generator=torch.Generator().manual_seed(1))
        out.backward(gw)
        return out.detach()

    h0, W0, ids0 = llm_like_inputs(64, H, V, seed=1)
    call(h0, W0, ids0)  # warm-up: code paths, thread pool
    del h0, W0, ids0
    h, W, ids = llm_like_inputs(N, H, V)
    seconds, extra, out, cpu = measure(lambda: call(h, W, ids))
    return {"impl": impl, "N": N, "seconds": seconds, "cpu_seconds": cpu, "extra_bytes": extra,
            "checksum": out[:256].tolist()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="1024,2048,4096,8192")
    ap.add_argument("--logits-max", type=int, default=4096, help="largest N for the materialized route")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--top-k", type=int, default=10_000)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="smoke mode: V=16384, N=64/256, 1 round")
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    if a.quick:
        a.sizes, a.vocab, a.rounds, a.top_k, a.logits_max = "64,256", 16_384, 1, 1000, 256
    sizes = [int(x) for x in a.sizes.split(",")]
    extra = {"hidden": a.hidden, "vocab": a.vocab, "top_k": a.top_k}
    print(f"top-p entropy (p=0.8, top_k={a.top_k}) + backward, V={a.vocab}, H={a.hidden}, float32, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    res = side_by_side(HERE, ["tiled", "materialized"], sizes, a.rounds, extra,
                       allowed=lambda impl, n: impl == "tiled" or n <= a.logits_max)
    rows = []
    print(f"\n{'N':>6} {'tiled s':>9} {'logits s':>9} {'time ratio':>10} {'CPU ratio':>9} {'tiled GiB':>10} "
          f"{'logits GiB':>11} {'mem ratio':>9} {'max|diff|':>10}")
    for n in sizes:
        t = res[("tiled", n)]
        row = {"N": n, "tiled_s": med(t, "seconds"), "tiled_cpu_s": med(t, "cpu_seconds"),
               "tiled_bytes": med(t, "extra_bytes")}
        m = res.get(("materialized", n))
        if m:
            row.update(logits_s=med(m, "seconds"), logits_cpu_s=med(m, "cpu_seconds"),
                       logits_bytes=med(m, "extra_bytes"),
                       max_abs_diff=max(abs(x - y) for x, y in zip(t[0]["checksum"], m[0]["checksum"])))
            row.update(time_ratio=row["tiled_s"] / row["logits_s"], cpu_ratio=row["tiled_cpu_s"] / row["logits_cpu_s"],
                       mem_ratio=row["tiled_bytes"] / row["logits_bytes"])
        rows.append(row)
        f = lambda k, fmt: format(row[k], fmt) if k in row else "-"  # noqa: E731
        print(f"{n:6d} {row['tiled_s']:9.2f} {f('logits_s', '9.2f'):>9} {f('time_ratio', '10.2f'):>10} "
              f"{f('cpu_ratio', '9.2f'):>9} "
              f"{row['tiled_bytes'] / 2**30:10.3f} "
              f"{(format(row['logits_bytes'] / 2**30, '11.3f') if 'logits_bytes' in row else '-'):>11} "
              f"{f('mem_ratio', '9.3f'):>9} {f('max_abs_diff', '10.1e'):>10}")
    if a.json:
        Path(a.json).write_text(json.dumps({"config": vars(a), "rows": rows, "runs": {f"{k[0]}@{k[1]}": v for k, v in
                                                                           res.items()}}, indent=1))


if __name__ == "__main__":
    main()
