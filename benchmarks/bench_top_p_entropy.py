"""Benchmark: SIREN's top-p entropy (rlvr_entropy.stats.top_p_entropy) against a plain log-softmax entropy pass.

Target (issue): top_p_entropy(logits, p=0.8, top_k=10000) on N=256 positions x V=151,936 costs at most 2x the plain
expression ``lp = torch.log_softmax(z, -1); -(lp.exp() * lp).sum(-1)``, forward and forward+backward (the baseline
forward+backward is the same expression under autograd), and its peak extra memory stays bounded by a block of
positions x V whatever N is.

What is printed (all timings measured side by side in one process: in each round every function runs once, in a
rotating order; the median over rounds is reported; torch's default thread count is left alone):
  * for each logit regime: the median nucleus size, the median time of each function, and the ratios
    top_p_entropy / plain (forward, forward+backward), stats.entropy / plain (forward, forward+backward) and
    official_style_top_p_entropy / plain (forward);
  * peak extra memory (resident set, measured in a fresh subprocess per configuration after a two-row warm-up:
    high-water mark during one call, reset through /proc/self/clear_refs, minus the resident size just before it)
    for N = 256 and 1024 at a fixed block size, for our functions, the plain expression and (N = 256) the
    official-style implementation;
  * the share of the machine's CPU that other processes used meanwhile (a warning above 10%: the machine this
    was written on is shared, and contention penalizes many-small-operation implementations most).

Regimes (V = 151,936, temperature 1):
  * llm-like (Zipf): per position, logits = -s log(rank) + 0.5 eps with s ~ U(1.1, 2.5), eps ~ N(0, 1) and the
    ranks randomly permuted over the vocabulary: most positions have a nucleus of a few tokens, a tail has hundreds
    (median 4, 90th percentile about 240), as in LLM outputs.
  * gaussian x4: logits ~ N(0, 16); nucleus of a few hundred tokens.
  * gaussian x3: logits ~ N(0, 9); nucleus of a few thousand tokens (a stress case: the nucleus must be sorted).
  * flat: logits ~ N(0, 1); C never reaches 0.8 within the top 10,000, so all 10,000 are kept.

Measured on the development machine (2 shared CPU cores, torch 2.13 CPU, 2 threads, no other load, 9 rounds):
  regime            nucleus med  top_p/plain fwd  top_p/plain fwd+bwd  entropy/plain fwd, fwd+bwd  official fwd
  llm-like (Zipf)        4           0.69x              0.58x              0.27x, 0.34x              5.4x
  gaussian x4          210           1.10x              0.76x              0.27x, 0.33x              5.4x
  gaussian x3         2462           1.85x              1.14x              0.27x, 0.34x              5.4x
  flat               10000           1.23x              0.97x              0.28x, 0.33x              5.7x
  (plain: 0.14 s forward, 0.32 s forward+backward.) Peak extra memory of top_p_entropy beyond the input and the
  gradient: 18 MiB (forward) and 15 MiB (forward+backward) at both N = 256 and N = 1024, i.e. about 2.4 and 2.0
  blocks of 13 x V float32; the plain expression needs 3x / 4x the input, the official-style one 4.6x.

Usage: python benchmarks/bench_top_p_entropy.py [--quick] [--reps R] [--json PATH] [--regime NAME ...] [--no-memory]
``--quick`` is a smoke mode used by tests/test_benchmarks.py: N=32, V=16384, top_k=1000 (so that the flat regime
still keeps all top_k tokens), 2 rounds, memory of top_p only at N=64 and 256 with a 16-position block.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from rlvr_entropy import stats

P, TOP_K = 0.8, 10000


# ----------------------------------------------------------------------------------------- implementations
def plain_entropy(z: torch.Tensor) -> torch.Tensor:
    """The baseline: one log-softmax entropy pass over [N, V]."""
    lp = torch.log_softmax(z, -1)
    return -(lp.exp() * lp).sum(-1)


def official_style_top_p_entropy(logits: torch.Tensor, k: int = TOP_K, p: float = P) -> torch.Tensor:
    """The official SIREN approach (verl dp_actor ``efficient_top_p_sampling``, read from github.com/Linn3a/siren),
    rewritten: full softmax [N, V], sorted top-k of the logits, gather of their probabilities, cumulative sum,
    cutoff by searchsorted (exclusive rule), a Python loop over rows that scatters the kept indices into a [N, V]
    bool mask, then a masked, renormalized entropy over [N, V] with 1e-12 guards. Like the official function it
    also computes the full entropy under no_grad (its second output), which is part of its cost."""
    probs = torch.softmax(logits, dim=-1)                                   # [N, V]
    top_idx = torch.topk(logits, k=k).indices                               # [N, k], sorted
    cum = torch.cumsum(torch.gather(probs, 1, top_idx), dim=-1)             # [N, k]
    with torch.no_grad():
        _full = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    cutoff = torch.searchsorted(cum, torch.full_like(cum, p)).amax(-1, keepdim=True)  # #{C_j < p}
    keep_sorted = torch.arange(k, device=logits.device)[None, :] < cutoff   # [N, k]
    kept_idx = [row[m] for row, m in zip(top_idx, keep_sorted)]
    mask = torch.zeros_like(logits, dtype=torch.bool)                       # [N, V]
    for i in range(logits.shape[0]):
        mask[i].scatter_(0, kept_idx[i], True)
    q = probs * mask.float()                                                # [N, V]
    q = q / (q.sum(-1, keepdim=True) + 1e-12)
    return -(q * torch.log(q + 1e-12)).sum(-1)


def _fwd(fn):
    def run(z):
        with torch.no_grad():
            fn(z)
    return run


def _fwd_bwd(fn):
    def run(z):
        x = z.detach().requires_grad_(True)
        fn(x).sum().backward()
    return run


def our_top_p(z, chunk_size=None, top_k=TOP_K):
    return stats.top_p_entropy(z, p=P, top_k=top_k, chunk_size=chunk_size)


def our_entropy(z, chunk_size=None):
    return stats.entropy(z, chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------- regimes
def make_logits(regime: str, N: int, V: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if regime == "llm-like (Zipf)":
        s = 1.1 + 1.4 * torch.rand(N, 1, generator=g)
        perm = torch.argsort(torch.rand(N, V, generator=g), dim=-1)
        log_rank = torch.log(torch.arange(1, V + 1, dtype=torch.float32)).expand(N, V)
        z = torch.empty(N, V).scatter_(1, perm, -s * log_rank)
        return z + 0.5 * torch.randn(N, V, generator=g)
    scale = {"gaussian x4": 4.0, "gaussian x3": 3.0, "flat": 1.0}[regime]
    return scale * torch.randn(N, V, generator=g)


REGIMES = ["llm-like (Zipf)", "gaussian x4", "gaussian x3", "flat"]


# ----------------------------------------------------------------------------------------------- timing
def time_side_by_side(z: torch.Tensor, runners: dict, reps: int, slow: dict) -> dict:
    """Median seconds per runner. Each round runs every runner once in a rotating order (so drift and other load
    hit all of them alike); runners in ``slow`` run only in their first ``slow[name]`` rounds."""
    names = list(runners)
    for n in names:  # warm-up
        runners[n](z)
    times = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            if n in slow and r >= slow[n]:
                continue
            t0 = time.perf_counter()
            runners[n](z)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def bench_regime(regime: str, N: int, V: int, reps: int, official_reps: int, top_k: int = TOP_K) -> dict:
    z = make_logits(regime, N, V)
    nucleus = stats.nucleus_size(z, P, top_k)

    def top_p(x):
        return our_top_p(x, top_k=top_k)

    def official(x):
        return official_style_top_p_entropy(x, k=min(top_k, V))

    runners = {
        "plain fwd": _fwd(plain_entropy), "plain fwd+bwd": _fwd_bwd(plain_entropy),
        "top_p fwd": _fwd(top_p), "top_p fwd+bwd": _fwd_bwd(top_p),
        "entropy fwd": _fwd(our_entropy), "entropy fwd+bwd": _fwd_bwd(our_entropy),
        "official fwd": _fwd(official),
    }
    t = time_side_by_side(z, runners, reps, slow={"official fwd": official_reps})
    with torch.no_grad():
        ours, off = top_p(z), official(z)
    return {
        "regime": regime, "N": N, "V": V,
        "nucleus_median": float(nucleus.float().median()),
        "nucleus_p90": float(nucleus.float().quantile(0.9)),
        "top_k": top_k,
        "nucleus_at_top_k": float((nucleus == min(top_k, V)).float().mean()),
        "seconds": t,
        "ratio": {
            "top_p/plain fwd": t["top_p fwd"] / t["plain fwd"],
            "top_p/plain fwd+bwd": t["top_p fwd+bwd"] / t["plain fwd+bwd"],
            "entropy/plain fwd": t["entropy fwd"] / t["plain fwd"],
            "entropy/plain fwd+bwd": t["entropy fwd+bwd"] / t["plain fwd+bwd"],
            "official/plain fwd": t["official fwd"] / t["plain fwd"],
        },
        "max_abs_diff_vs_official": float((ours - off).abs().max()),
    }


# ----------------------------------------------------------------------------------------------- memory
def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_probe(func: str, mode: str, N: int, V: int, chunk: int, top_k: int) -> dict:
    """Run once in this (fresh) process: peak resident bytes above the resident size just before the call."""
    z = make_logits("flat", N, V)
    fn = {
        "plain": plain_entropy,
        "top_p": lambda x: our_top_p(x, chunk_size=chunk, top_k=top_k),
        "entropy": lambda x: our_entropy(x, chunk_size=chunk),
        "official": lambda x: official_style_top_p_entropy(x, k=min(top_k, V)),
    }[func]
    run = _fwd(fn) if mode == "fwd" else _fwd_bwd(fn)
    run(z[:2].clone())  # warm-up on two rows: one-time library set-up is not the function's memory
    before = _rss_bytes("VmRSS")
    try:  # reset the high-water mark (Linux >= 4.0), so only this call counts
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    run(z)
    if reset and before is not None:
        peak = _rss_bytes("VmHWM")
    else:  # fall back to the process high-water mark
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        before = before or 0
    return {"extra_bytes": max(0, peak - before), "input_bytes": z.numel() * z.element_size(), "reset": reset}


def bench_memory(configs, V: int, chunk: int, top_k: int) -> list[dict]:
    """configs: (func, mode, N) triples, each measured in its own subprocess."""
    rows = []
    for func, mode, N in configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--_memory-probe", func, mode, str(N), str(V), str(chunk),
               str(top_k)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res.update(func=func, mode=mode, N=N)
        rows.append(res)
    return rows


# ----------------------------------------------------------------------------------------------- report
def _cpu_snapshot():
    """(wall seconds, machine busy CPU seconds or None, this process's and its children's CPU seconds)."""
    busy = None
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def other_load(start) -> float | None:
    """Fraction of the machine's CPU capacity used by other processes since ``start`` (a _cpu_snapshot)."""
    end = _cpu_snapshot()
    if start[1] is None or end[1] is None:
        return None
    other = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, other) / max(1e-9, (end[0] - start[0]) * (os.cpu_count() or 1))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke mode: small sizes, few repetitions")
    ap.add_argument("--reps", type=int, default=None, help="timing rounds per regime (median is reported)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--regime", action="append", choices=REGIMES, default=None,
                    help="run only this regime (repeatable; default: all)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    ap.add_argument("--_memory-probe", nargs=6, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._memory_probe:
        func, mode, N, V, chunk, top_k = args._memory_probe
        print(json.dumps(memory_probe(func, mode, int(N), int(V), int(chunk), int(top_k))))
        return {}

    top_k = TOP_K
    if args.quick:  # top_k scaled down with V so that the flat regime still keeps all top_k tokens
        N, V, reps, official_reps, mem_V, chunk, top_k = 32, 16384, args.reps or 2, 1, 16384, 16, 1000
        mem = [("top_p", mode, n) for mode in ("fwd", "fwd+bwd") for n in (64, 256)]
    else:
        N, V, reps, official_reps, mem_V = 256, 151936, args.reps or 9, 3, 151936
        chunk = stats.default_chunk_size(mem_V)
        mem = [(f, mode, n) for f in ("top_p", "entropy", "plain") for mode in ("fwd", "fwd+bwd")
               for n in (256, 1024)] + [("official", "fwd", 256)]
    snap = _cpu_snapshot()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"top_p_entropy(p={P}, top_k={top_k}) vs plain log-softmax entropy on [{N}, {V}] float32; "
          f"median of {reps} interleaved rounds ({official_reps} for the official-style implementation)\n")

    results = {"N": N, "V": V, "top_k": top_k, "p": P, "chunk": chunk, "reps": reps,
               "threads": torch.get_num_threads(), "regimes": [], "memory": []}
    hdr = (f"{'regime':<17} {'nucleus med/p90':>15} {'plain f':>8} {'plain fb':>8} {'top_p f':>8} {'top_p fb':>8}"
           f" | {'top_p/plain f':>13} {'top_p/plain fb':>14} {'entropy/plain f':>15} {'entropy/plain fb':>16}"
           f" {'official/plain f':>16}")
    print(hdr)
    print("-" * len(hdr))
    for regime in args.regime or REGIMES:
        r = bench_regime(regime, N, V, reps, official_reps, top_k)
        results["regimes"].append(r)
        s, q = r["seconds"], r["ratio"]
        nuc = f"{r['nucleus_median']:.0f}/{r['nucleus_p90']:.0f}"
        print(f"{regime:<17} {nuc:>15} {s['plain fwd']:>8.3f} {s['plain fwd+bwd']:>8.3f} {s['top_p fwd']:>8.3f}"
              f" {s['top_p fwd+bwd']:>8.3f} | {q['top_p/plain fwd']:>12.2f}x {q['top_p/plain fwd+bwd']:>13.2f}x"
              f" {q['entropy/plain fwd']:>14.2f}x {q['entropy/plain fwd+bwd']:>15.2f}x"
              f" {q['official/plain fwd']:>15.2f}x", flush=True)
    print("(times in seconds; max |ours - official| over all regimes: "
          f"{max(r['max_abs_diff_vs_official'] for r in results['regimes']):.2e})")

    mib = 1 << 20
    block = chunk * mem_V * 4
    if args.no_memory:
        mem = []
    if mem:
        print(f"\npeak extra resident memory during one call, flat logits, V={mem_V}, block = {chunk} positions "
              f"({block / mib:.1f} MiB of float32); gradient = input-sized [N, V] tensor returned by the backward")
        print(f"{'function':<9} {'mode':<8} {'N':>6} {'input MiB':>10} {'extra MiB':>10} {'extra - grad MiB':>17}"
              f" {'(extra - grad) / block':>23}")
    for m in bench_memory(mem, mem_V, chunk, top_k):
        results["memory"].append(m)
        grad = m["input_bytes"] if m["mode"] == "fwd+bwd" else 0
        beyond = m["extra_bytes"] - grad
        print(f"{m['func']:<9} {m['mode']:<8} {m['N']:>6} {m['input_bytes'] / mib:>10.1f}"
              f" {m['extra_bytes'] / mib:>10.1f} {beyond / mib:>17.1f} {beyond / block:>23.2f}", flush=True)
    other = other_load(snap)
    results["other_processes_cpu_fraction"] = other
    if other is not None:
        print(f"\nother processes used {100 * other:.0f}% of the machine's CPU during the run")
        if other > 0.1:
            print("WARNING: other processes competed for the CPU; the ratios are less reliable (contention "
                  "penalizes the implementations made of many small operations more than the plain expression).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
