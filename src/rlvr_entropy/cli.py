"""``rlvr-entropy``: run the CPU testbed, compare methods, rebuild reports, evaluate.

    rlvr-entropy run --method grpo [--task countdown3 --steps N --seed S --out DIR --engine lean] [key=value ...]
    rlvr-entropy compare --methods grpo,siren,steer [--seeds 0,1] --out runs/latest [key=value ...]
    rlvr-entropy report RUN_DIR
    rlvr-entropy frontier RUN_DIR [RUN_DIR ...] [--temperatures 1.0,0.9,0.8,0.7]
    rlvr-entropy demo            (the default compare; what `make run` calls)
    rlvr-entropy eval ...        (benchmark evaluation, from rlvr_entropy.eval.cli)

Overrides ``key=value`` go to the training config (``TrainConfig`` fields, e.g. ``lr=2e-4``) or to the method
config (e.g. ``eps_high=0.28``); prefix with ``train.``, ``method.`` or ``<method>.`` (``siren.beta=0.01``) to be
explicit. In ``compare`` an unprefixed method key goes to every method whose config has it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

DEMO_METHODS = ("grpo", "siren", "steer", "thermostat")


class CLIError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def _train_fields() -> dict[str, Any]:
    from rlvr_entropy.testbed.train import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _method_fields(name: str) -> dict[str, Any]:
    from rlvr_entropy import get_method_class

    cls = get_method_class(name)
    return {f.name: f.default for f in dataclasses.fields(cls.Config)}


def _check_methods(names: list[str]) -> None:
    from rlvr_entropy import available_methods

    avail = available_methods()
    bad = [n for n in names if n not in avail]
    if bad:
        raise CLIError(f"unknown method(s) {bad}; available: {', '.join(avail)}")


def split_overrides(pairs: list[str], methods: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``key=value`` strings -> (train overrides, {method: overrides}); values typed after the field defaults."""
    from rlvr_entropy.testbed.train import parse_value

    tfields = _train_fields()
    mfields = {m: _method_fields(m) for m in methods}
    train: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for pair in pairs:
        if "=" not in pair:
            raise CLIError(f"override {pair!r} is not of the form key=value")
        key, text = pair.split("=", 1)
        scope, _, name = key.rpartition(".")

        def parse(like, fld=name):
            try:
                return parse_value(text, like)
            except ValueError as e:
                raise CLIError(f"bad value for {fld!r}: {e}") from None

        if scope == "train" or (not scope and name in tfields):
            if name not in tfields:
                raise CLIError(f"unknown training key {name!r}; valid: {', '.join(sorted(tfields))}")
            if not scope and any(name in f for f in mfields.values()):
                raise CLIError(f"key {name!r} is both a training and a method key; write train.{name} or "
                               f"method.{name}")
            train[name] = parse(tfields[name])
            continue
        targets = methods if scope in ("", "method") else [scope]
        if scope not in ("", "method") and scope not in mfields:
            raise CLIError(f"override {pair!r} names method {scope!r}, which is not being run ({methods})")
        hit = False
        for m in targets:
            if name in mfields[m]:
                per[m][name] = parse(mfields[m][name])
                hit = True
        if not hit:
            valid = sorted(set(tfields) | {k for m in targets for k in mfields[m]})
            raise CLIError(f"unknown override key {name!r} (not a training key nor a config key of "
                           f"{', '.join(targets)}); valid keys: {', '.join(valid)}")
    return train, per


def _make_train_config(base: dict[str, Any], over: dict[str, Any]):
    from rlvr_entropy.testbed.train import TrainConfig

    try:
        return TrainConfig(**{**base, **over})
    except (TypeError, ValueError) as e:
        raise CLIError(f"bad training config: {e}") from None


def _check_engine(engine: str) -> None:
    if engine not in ("lean", "trl"):
        raise CLIError(f"unknown engine {engine!r}; available: lean (built-in loop), trl (EntropyGRPOTrainer)")
    if engine == "trl":
        try:
            import trl  # noqa: F401
        except ImportError:
            raise CLIError("--engine trl needs trl: pip install 'rlvr-entropy[trl]'") from None


def _run_one(method: str, cfg, out: Path, overrides: dict, args) -> dict:
    from rlvr_entropy.testbed.train import train

    try:
        if getattr(args, "engine", "lean") == "trl":
            from rlvr_entropy.testbed.trl_engine import train_trl

            return train_trl(method, cfg, out, method_overrides=overrides, progress=not args.quiet,
                             threads=args.threads)
        return train(method, cfg, out, method_overrides=overrides, resume=not args.no_resume,
                     progress=not args.quiet, threads=args.threads)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _run_parallel(jobs: list[tuple[str, Any, Path, dict]], args) -> None:
    """Each run in its own process (``threads`` torch threads each), at most ``args.jobs`` at a time; one progress
    bar over every run's steps (read from the metrics files)."""
    import os
    import subprocess

    from rlvr_entropy.testbed.train import initial_model
    from rlvr_entropy.testbed.tasks import get_task
    from rlvr_entropy.testbed.tokenizer import CharTokenizer
    import torch

    # warm start once here, so the runs find it cached instead of each training it
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        for cfg in {j[1] for j in jobs}:
            initial_model(cfg, get_task(cfg.task), CharTokenizer(), progress=not args.quiet)
    finally:
        torch.set_num_threads(old)
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, tuple, Any]] = []
    total = sum(j[1].steps for j in jobs)
    bar = None
    if not args.quiet:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="compare", dynamic_ncols=True)
        except ImportError:
            bar = None
    failures = []

    def done_steps() -> int:
        n = 0
        for _, cfg, out, _ in jobs:
            p = out / "metrics.jsonl"
            if p.exists():
                n += max(0, len(p.read_text().splitlines()) - 1)
        return min(n, total)

    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            m, cfg, out, over = pending.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "rlvr_entropy.cli", "run", "--method", m, "--out", str(out), "--quiet",
                   "--no-plots", "--threads", str(args.threads), "--engine", getattr(args, "engine", "lean")]
            if args.no_resume:
                cmd.append("--no-resume")
            cmd += [f"train.{k}={v}" for k, v in dataclasses.asdict(cfg).items()]
            cmd += [f"{m}.{k}={v}" for k, v in over.items()]
            log = (out / "run.log").open("w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), (m, cfg.seed, out), log))
        time.sleep(0.5)
        still = []
        for proc, info, log in running:
            if proc.poll() is None:
                still.append((proc, info, log))
            else:
                log.close()
                if proc.returncode != 0:
                    failures.append(info)
        running = still
        if bar is not None:
            bar.n = done_steps()
            bar.refresh()
    if bar is not None:
        bar.close()
    if failures:
        tails = "; ".join(f"{m} seed {s}: " + " | ".join((o / "run.log").read_text().strip().splitlines()[-3:])
                          for m, s, o in failures)
        raise CLIError(f"{len(failures)} run(s) failed: {tails}")


def _print_summary(summary: dict) -> None:
    cols = ["entropy_start", "entropy_end", "pass@1_start", "pass@1_end", "pass@k_start", "pass@k_end",
            "distinct_answers_end", "wall_s"]
    print(f"{'method':<12}" + "".join(f"{c:>22}" for c in cols))
    for name, s in summary["methods"].items():
        print(f"{name:<12}" + "".join(f"{s.get(c, float('nan')):>22.3f}" for c in cols))


def cmd_run(args) -> int:
    _check_engine(args.engine)
    _check_methods([args.method])
    train_over, per = split_overrides(args.overrides, [args.method])
    cfg = _make_train_config(_cli_train_base(args), train_over)
    out = Path(args.out or f"runs/{args.method}-s{cfg.seed}")
    res = _run_one(args.method, cfg, out, per[args.method], args)
    from rlvr_entropy.report import build_report

    summary = build_report(out, plots=not args.no_plots)
    _print_summary(summary)
    print(f"run written to {out} (metrics.jsonl, summary.json{'' if args.no_plots else ', report.html'}); "
          f"wall {res['wall_s']:.1f} s")
    return 0


def _cli_train_base(args) -> dict[str, Any]:
    base: dict[str, Any] = {}
    for k in ("task", "steps"):
        v = getattr(args, k, None)
        if v is not None:
            base[k] = v
    if getattr(args, "seed", None) is not None:
        base["seed"] = args.seed
    return base


def cmd_compare(args) -> int:
    _check_engine(args.engine)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise CLIError("--methods is empty")
    _check_methods(methods)
    temps = _frontier_temps(getattr(args, "frontier", ""))
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    train_over, per = split_overrides(args.overrides, methods)
    out = Path(args.out)
    t0 = time.time()
    jobs = [(m, _make_train_config({**_cli_train_base(args), "seed": s}, train_over), out / m / f"seed{s}", per[m])
            for m in methods for s in seeds]
    if args.jobs is None:
        import os

        args.jobs = min(len(jobs), 2 * (os.cpu_count() or 1))
    if args.jobs > 1 and len(jobs) > 1:
        _run_parallel(jobs, args)
    else:
        for m, cfg, run_out, over in jobs:
            if not args.quiet:
                print(f"[{m} seed {cfg.seed}] {cfg.steps} steps on {cfg.task}", file=sys.stderr)
            _run_one(m, cfg, run_out, over, args)
    if temps:
        from rlvr_entropy.testbed.frontier import temperature_sweep

        for m, cfg, run_out, _ in jobs:
            if (run_out / "ckpt.pt").exists():  # the lean loop's runs (the TRL engine keeps no checkpoint)
                if not args.quiet:
                    print(f"[frontier {m} seed {cfg.seed}] final policy at T = {args.frontier}", file=sys.stderr)
                temperature_sweep(run_out, temps)
    from rlvr_entropy.report import build_report

    summary = build_report(out, plots=not args.no_plots)
    summary["compare_wall_s"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    print(f"compare of {', '.join(methods)} over seeds {seeds} written to {out} in {time.time() - t0:.1f} s")
    return 0


def _frontier_temps(text: str, flag: str = "--frontier") -> list[float]:
    try:
        temps = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CLIError(f"{flag} must be comma-separated temperatures (or ''), got {text!r}") from None
    if any(not (t > 0) for t in temps):
        raise CLIError(f"{flag} temperatures must be positive, got {text!r}")
    return temps


def cmd_demo(args) -> int:
    from rlvr_entropy import available_methods

    avail = available_methods()
    methods = [m for m in DEMO_METHODS if m in avail]
    missing = [m for m in DEMO_METHODS if m not in avail]
    if missing:
        print(f"demo: method(s) {missing} are not registered yet; comparing {methods}", file=sys.stderr)
    args.methods = ",".join(methods)
    if not args.resume:  # a demo starts over: an old runs/latest may hold another configuration
        args.no_resume = True
    args.seeds = str(args.seed if args.seed is not None else 0)
    args.seed = None
    return cmd_compare(args)


def cmd_report(args) -> int:
    from rlvr_entropy.report import build_report

    try:
        summary = build_report(args.run_dir, plots=not args.no_plots)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    _print_summary(summary)
    print(f"report written to {Path(args.run_dir) / 'report.html'}")
    return 0


def cmd_frontier(args) -> int:
    from rlvr_entropy.testbed.frontier import temperature_sweep

    temps = _frontier_temps(args.temperatures, "--temperatures")
    print(f"{'run':40s} {'T':>5s} {'pass@1':>8s} {'pass@8':>8s} {'pass@32':>8s} {'entropy':>8s}")
    for d in args.run_dirs:
        try:
            recs = temperature_sweep(d, temps, use_cache=not args.no_cache)
        except ValueError as e:
            raise CLIError(str(e)) from None
        for r in recs:
            print(f"{str(d)[-40:]:40s} {r['T']:5.2f} {r['eval/pass@1']:8.3f} {r.get('eval/pass@8', float('nan')):8.3f} "
                  f"{r.get('eval/pass@32', float('nan')):8.3f} {r['eval/entropy']:8.3f}")
    return 0


def _eval_module():
    try:
        from rlvr_entropy.eval import cli as eval_cli
    except ImportError as e:
        return None, e
    return eval_cli, None


def cmd_eval(args) -> int:
    mod, err = _eval_module()
    if mod is None:
        raise CLIError(f"the eval subcommand is not available: rlvr_entropy.eval.cli could not be imported ({err})")
    return int(mod.run_eval(args) or 0)


def _common(p: argparse.ArgumentParser, single: bool) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1: robust on a shared machine; see testbed.train.train)")
    if not single:
        import os

        p.add_argument("--jobs", type=int, default=None,
                       help="runs in parallel, one process each (default: every run at once, at most twice the "
                            f"number of CPU cores = {2 * (os.cpu_count() or 1)})")
    p.add_argument("--task", default=None, help="countdown3 (default), countdown4 or arith")
    p.add_argument("--steps", type=int, default=None, help="RL steps (default: TrainConfig.steps)")
    p.add_argument("--engine", default="lean", help="lean (built-in loop, default) or trl (EntropyGRPOTrainer on the same tasks)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--no-plots", action="store_true", help="write summary.json only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training or method config overrides")


def _frontier_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frontier", default="1.0,0.9,0.8,0.7",
                   help="after training, sample each run's final policy at these temperatures (frontier.json, "
                        "frontier.png in the report); '' skips")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlvr-entropy", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="one testbed run of one method")
    p.add_argument("--method", required=True)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="output directory (default runs/<method>-s<seed>)")
    _common(p, True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="several methods (and seeds) on the testbed, then a report")
    p.add_argument("--methods", default=",".join(DEMO_METHODS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--out", default="runs/latest")
    _frontier_arg(p)
    _common(p, False)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the default compare (grpo, siren, steer, thermostat; one seed) into runs/latest")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default="runs/latest")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo instead of starting over")
    _frontier_arg(p)
    _common(p, False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="rebuild summary.json, plots and report.html from metrics.jsonl files")
    p.add_argument("run_dir")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("frontier", help="a finished run's final policy sampled at several temperatures "
                                        "(pass@1 against pass@k; cached in the run directory)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--temperatures", default="1.0,0.9,0.8,0.7")
    p.add_argument("--no-cache", action="store_true", help="sample again even if frontier.json matches")
    p.set_defaults(func=cmd_frontier)

    p = sub.add_parser("eval", help="benchmark evaluation (rlvr_entropy.eval)")
    mod, _ = _eval_module()
    if mod is not None and hasattr(mod, "add_eval_arguments"):
        mod.add_eval_arguments(p)
    else:
        p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"rlvr-entropy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
