"""rlvr-entropy (or python -m rlvr_entropy): run the CPU testbed, compare methods, rebuild reports, export.

    rlvr-entropy demo                 the main job (what `make run` calls): grpo, siren, steer, thermostat -> runs/latest
    rlvr-entropy run --method grpo [--steps N --seed S --out DIR] [key=value ...]
    rlvr-entropy compare --methods grpo,siren --seeds 0,1 --out runs/cmp [key=value ...]
    rlvr-entropy report RUN_DIR       rebuild summary.json, figures, report.html
    rlvr-entropy frontier RUN_DIR...  final policy at several temperatures
    rlvr-entropy export RUN_DIR OUT   a Hugging Face model directory (from_pretrained)
    rlvr-entropy methods [NAME]       the methods, or one method's keys with defaults and meaning
    rlvr-entropy config               the training keys with defaults and meaning
    rlvr-entropy eval ...             benchmark evaluation (rlvr_entropy.eval)

Overrides ``key=value`` go to the training config (``rlvr-entropy config``) or to the method config
(``rlvr-entropy methods NAME``); prefix with ``train.``, ``method.`` or ``<method>.`` (``siren.beta=0.01``) to be
explicit. In ``compare`` an unprefixed method key goes to every method whose config has it.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

DEMO_METHODS = ("grpo", "siren", "steer", "thermostat")
# the demo's training values besides TrainConfig's defaults (key=value overrides still win): 16 prompts x 8 samples
# per step halve the default's work and still show GRPO's collapse (held-out entropy -42%, pass@8 0.85 -> 0.69 at
# seed 0) beside SIREN, STEER and the thermostat, so `make run` ends in 79-93 s on 2 cores (~145 s at 32 prompts)
DEMO_TRAIN = {"prompts_per_step": 16}


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class CLIError(Exception):
    """A user error: printed as one line without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------- config docs
def field_docs(cls) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal under it), subclasses overriding their bases."""
    docs: dict[str, str] = {}
    for klass in reversed(getattr(cls, "__mro__", ())):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _train_fields() -> dict[str, Any]:
    from rlvr_entropy.testbed.train import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _method_fields(name: str) -> dict[str, Any]:
    from rlvr_entropy import get_method_class

    cls = get_method_class(name)
    return {f.name: f.default for f in dataclasses.fields(cls.Config)}


def _method_summary(name: str) -> str:
    """The first sentence of the method's module docstring (name, paper, arXiv id)."""
    from rlvr_entropy import get_method_class

    mod = sys.modules.get(get_method_class(name).__module__)
    doc = " ".join(((mod.__doc__ if mod else "") or "").strip().split("\n\n")[0].split())
    return doc


def _methods_epilog() -> str:
    from rlvr_entropy import available_methods

    return (textwrap.fill("methods: " + ", ".join(available_methods()), 100, subsequent_indent="  ")
            + "\n(rlvr-entropy methods NAME: a method's keys with defaults; rlvr-entropy config: the training keys)")


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
            raise CLIError(f"override {pair!r} is not of the form key=value (keys: rlvr-entropy config, "
                           "rlvr-entropy methods NAME)")
        key, text = pair.split("=", 1)
        scope, _, name = key.rpartition(".")

        def parse(like, fld=key):
            try:
                v = parse_value(text, like)
            except ValueError as e:
                raise CLIError(f"bad value for {fld!r}: {e}") from None
            if (isinstance(v, float) and not math.isfinite(v)
                    and not (isinstance(like, float) and not math.isfinite(like))):
                raise CLIError(f"bad value for {fld!r}: must be a finite number, got {text}")
            return v

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
    for m, over in per.items():  # a bad method value fails here, before anything runs
        from rlvr_entropy import make_method

        try:
            make_method(m, **over)
        except (TypeError, ValueError) as e:
            raise CLIError(f"bad config for method {m}: {e}") from None
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


def _report_to(text: str) -> list[str]:
    from rlvr_entropy.testbed.train import REPORT_TO

    names = [t.strip() for t in (text or "").split(",") if t.strip() and t.strip() != "none"]
    bad = [n for n in names if n not in REPORT_TO]
    if bad:
        raise CLIError(f"--report-to: unknown sink(s) {bad}; available: {', '.join(REPORT_TO)} (comma-separated)")
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise CLIError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise CLIError("--report-to wandb needs the wandb package: pip install wandb") from None
    return names


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run_one(method: str, cfg, out: Path, overrides: dict, args, temps: list[float] | None = None) -> dict:
    from rlvr_entropy.testbed.train import train

    try:
        if getattr(args, "engine", "lean") == "trl":
            from rlvr_entropy.testbed.trl_engine import train_trl

            return train_trl(method, cfg, out, method_overrides=overrides, progress=not args.quiet,
                             threads=args.threads, report_to=args.report_to)
        res = train(method, cfg, out, method_overrides=overrides, resume=_resume_mode(args),
                    progress=not args.quiet, threads=args.threads, report_to=args.report_to, log=_log)
        if temps:
            _sweep(out, temps, args)
        return res
    except ValueError as e:
        raise CLIError(str(e)) from None


def _resume_mode(args):
    if args.no_resume:
        return False
    return "if_same" if getattr(args, "restart_if_different", False) else True


def _sweep(out: Path, temps: list[float], args) -> None:
    from rlvr_entropy.testbed.frontier import temperature_sweep

    if (out / "ckpt.pt").exists():  # the lean loop's runs (the TRL engine keeps no checkpoint)
        old = None
        try:
            import torch

            old = torch.get_num_threads()
            torch.set_num_threads(max(1, args.threads))
            temperature_sweep(out, temps)
        finally:
            if old is not None:
                torch.set_num_threads(old)


def _prepare_shared(jobs, args) -> None:
    """Warm start and step-0 evaluation once here (both cached), so the runs find them instead of each computing
    them."""
    import torch

    from rlvr_entropy.testbed.tasks import get_task
    from rlvr_entropy.testbed.tokenizer import CharTokenizer
    from rlvr_entropy.testbed.train import initial_model, warm_start_eval

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        done = set()
        for _, cfg, out, _ in jobs:
            if cfg in done or ((out / "ckpt.pt").exists() and not args.no_resume):
                continue  # already prepared, or resuming (step 0 is done)
            done.add(cfg)
            tok, task = CharTokenizer(), get_task(cfg.task)
            model = initial_model(cfg, task, tok, progress=not args.quiet)
            if getattr(args, "engine", "lean") == "lean":
                warm_start_eval(cfg, task, tok, model)
    finally:
        torch.set_num_threads(old)


def _run_parallel(jobs: list[tuple[str, Any, Path, dict]], args, temps: list[float]) -> None:
    """Each run in its own process (``threads`` torch threads each), at most ``args.jobs`` at a time, each also
    sweeping its frontier; one progress line over every run's steps (read from the metrics files)."""
    import subprocess

    from rlvr_entropy.testbed.progress import Progress
    from rlvr_entropy.testbed.provenance import COMMAND_ENV, command_line

    _prepare_shared(jobs, args)
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, tuple, Any]] = []
    total = sum(j[1].steps for j in jobs)
    bar = None if args.quiet else Progress(total, f"{len(jobs)} runs, {min(args.jobs, len(jobs))} at a time")
    failures = []
    env = {**os.environ, COMMAND_ENV: os.environ.get(COMMAND_ENV) or command_line()}

    def done_steps() -> int:
        n = 0
        for _, cfg, out, _ in jobs:
            p = out / "metrics.jsonl"
            if p.exists():
                n += max(0, len(p.read_text().splitlines()) - 1)
        return min(n, total)

    try:
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                m, cfg, out, over = pending.pop(0)
                out.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, "-m", "rlvr_entropy", "run", "--method", m, "--out", str(out), "--no-plots",
                       "--threads", str(args.threads), "--engine", getattr(args, "engine", "lean"),
                       "--frontier", ",".join(map(str, temps))]
                if args.quiet:
                    cmd.append("--quiet")
                if args.no_resume:
                    cmd.append("--no-resume")
                elif getattr(args, "restart_if_different", False):
                    cmd.append("--restart-if-different")
                if args.report_to:
                    cmd += ["--report-to", ",".join(args.report_to)]
                cmd += [f"train.{k}={v}" for k, v in dataclasses.asdict(cfg).items()]
                cmd += [f"{m}.{k}={v}" for k, v in over.items()]
                log = (out / "run.log").open("w")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((proc, (m, cfg.seed, out), log))
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
                bar.update(done_steps())
    finally:
        for proc, _, log in running:  # Ctrl-C or an error here: the runs stop with us (they resume later)
            if proc.poll() is None:
                proc.terminate()
        for proc, _, log in running:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        if bar is not None:
            bar.close()
    if failures:
        tails = "; ".join(f"{m} seed {s}: " + " | ".join((o / "run.log").read_text().strip().splitlines()[-2:])
                          for m, s, o in failures)
        raise CLIError(f"{len(failures)} run(s) failed (logs in <run>/run.log): {tails}")


def print_summary(summary: dict, out=None) -> None:
    from rlvr_entropy.report.summary import format_table, time_split, wrap

    out = out or sys.stdout
    print(format_table(summary), file=out)
    print("", file=out)
    print(wrap(summary.get("verdict", "")), file=out)
    ts = time_split(summary)
    if ts:
        print("", file=out)
        print(wrap(ts), file=out)


def _build_report(out: Path, plots: bool, extra: dict | None = None) -> dict:
    from rlvr_entropy.report import build_report
    from rlvr_entropy.report.summary import MixedRunsError

    try:
        return build_report(out, plots=plots, extra=extra)
    except (FileNotFoundError, MixedRunsError) as e:
        raise CLIError(str(e)) from None


def cmd_run(args) -> int:
    _check_engine(args.engine)
    _check_methods([args.method])
    args.report_to = _report_to(args.report_to)
    temps = _frontier_temps(args.frontier)
    train_over, per = split_overrides(args.overrides, [args.method])
    cfg = _make_train_config(_cli_train_base(args), train_over)
    out = Path(args.out or f"runs/{args.method}-s{cfg.seed}")
    res = _run_one(args.method, cfg, out, per[args.method], args, temps)
    summary = _build_report(out, plots=not args.no_plots)
    print_summary(summary)
    print(f"\nrun written to {out} (metrics.jsonl, summary.json{'' if args.no_plots else ', report.html'}); "
          f"wall {res['wall_s']:.1f} s")
    return 0


def _cli_train_base(args) -> dict[str, Any]:
    base: dict[str, Any] = dict(getattr(args, "train_defaults", None) or {})
    for k in ("task", "steps", "seed"):
        v = getattr(args, k, None)
        if v is not None:
            base[k] = v
    return base


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--seeds must be comma-separated integers >= 0, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise CLIError(f"--seeds must be distinct comma-separated integers >= 0, got {text!r}")
    return seeds


def cmd_compare(args) -> int:
    _check_engine(args.engine)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise CLIError("--methods is empty")
    if len(set(methods)) != len(methods):
        raise CLIError(f"--methods lists a method twice: {args.methods!r}")
    _check_methods(methods)
    args.report_to = _report_to(args.report_to)
    temps = _frontier_temps(getattr(args, "frontier", ""))
    seeds = _parse_seeds(args.seeds)
    train_over, per = split_overrides(args.overrides, methods)
    out = Path(args.out)
    t0 = time.time()
    jobs = [(m, _make_train_config({**_cli_train_base(args), "seed": s}, train_over), out / m / f"seed{s}", per[m])
            for m in methods for s in seeds]
    if args.jobs is None:
        args.jobs = min(len(jobs), usable_cpus())  # one single-threaded run per core: 4 runs on 2 cores cost ~20% more
    from rlvr_entropy.testbed.provenance import COMMAND_ENV, command_line

    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"command": os.environ.get(COMMAND_ENV) or command_line(),
                                                  "methods": methods, "seeds": seeds,
                                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, indent=2))
    if args.jobs > 1 and len(jobs) > 1 and args.engine == "lean":
        _run_parallel(jobs, args, temps)
    else:
        for m, cfg, run_out, over in jobs:
            _run_one(m, cfg, run_out, over, args, temps)
    t_train = time.time()
    if temps:  # cached by the runs themselves; this only fills in what is missing (e.g. a resumed old run)
        for m, cfg, run_out, _ in jobs:
            _sweep(run_out, temps, args)
    t_front = time.time()
    summary = _build_report(out, plots=not args.no_plots, extra={"frontier_s": t_front - t_train})
    t_end = time.time()
    summary.update(compare_wall_s=t_end - t0, report_s=t_end - t_front)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    print(f"\ncompare of {', '.join(methods)} over seeds {seeds} written to {out} "
          f"({'report.html, ' if not args.no_plots else ''}summary.json) in {t_end - t0:.1f} s")
    return 0


def _frontier_temps(text: str, flag: str = "--frontier") -> list[float]:
    try:
        temps = [float(t) for t in (text or "").split(",") if t.strip()]
    except ValueError:
        raise CLIError(f"{flag} must be comma-separated temperatures (or ''), got {text!r}") from None
    if any(not (t > 0 and math.isfinite(t)) for t in temps):
        raise CLIError(f"{flag} temperatures must be positive and finite, got {text!r}")
    return temps


def cmd_demo(args) -> int:
    from rlvr_entropy import available_methods

    avail = available_methods()
    methods = [m for m in DEMO_METHODS if m in avail]
    missing = [m for m in DEMO_METHODS if m not in avail]
    if missing:
        print(f"demo: method(s) {missing} are not registered yet; comparing {methods}", file=sys.stderr)
    args.methods = ",".join(methods)
    # the demo resumes an interrupted demo, and starts a run over when its folder holds another configuration
    args.restart_if_different = True
    args.train_defaults = DEMO_TRAIN
    args.seeds = str(args.seed if args.seed is not None else 0)
    args.seed = None
    return cmd_compare(args)


def cmd_report(args) -> int:
    summary = _build_report(Path(args.run_dir), plots=not args.no_plots)
    print_summary(summary)
    print(f"\nreport written to {Path(args.run_dir) / ('summary.json' if args.no_plots else 'report.html')}")
    return 0


def cmd_frontier(args) -> int:
    from rlvr_entropy.testbed.frontier import temperature_sweep

    temps = _frontier_temps(args.temperatures, "--temperatures")
    if not temps:
        raise CLIError("--temperatures is empty")
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


def cmd_export(args) -> int:
    from rlvr_entropy.testbed.export import export_hf

    try:
        out = export_hf(args.run_dir, args.out, overwrite=args.force)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"exported {args.run_dir} to {out}: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) and "
          f"PreTrainedTokenizerFast.from_pretrained({str(out)!r})")
    return 0


def _print_keys(cls, defaults: dict[str, Any], out) -> None:
    docs = field_docs(cls)
    width = max(len(k) for k in defaults)
    for name, default in defaults.items():
        doc = docs.get(name, "")
        lines = textwrap.wrap(doc, 100 - width - 4) or [""]
        print(f"  {name:<{width}}  = {default!r}", file=out)
        for ln in lines:
            print(f"  {'':<{width}}    {ln}", file=out)


def cmd_methods(args) -> int:
    from rlvr_entropy import available_methods, get_method_class

    out = sys.stdout
    if not args.name:
        names = available_methods()
        w = max(map(len, names))
        for n in names:
            lines = textwrap.wrap(_method_summary(n), 100 - w - 2) or [""]
            if len(lines) > 2:
                lines = lines[:2]
                lines[1] = lines[1][:100 - w - 6] + " ..."
            print(f"{n:<{w}}  {lines[0]}", file=out)
            for ln in lines[1:]:
                print(f"{'':<{w}}  {ln}", file=out)
        print("\nrlvr-entropy methods NAME: a method's config keys (key=value or NAME.key=value on the command "
              "line)", file=out)
        return 0
    _check_methods([args.name])
    cls = get_method_class(args.name)
    print(textwrap.fill(_method_summary(args.name), 100), file=out)
    print(f"\nconfig keys of {args.name} (defaults are the paper's; set as key=value or {args.name}.key=value):",
          file=out)
    _print_keys(cls.Config, _method_fields(args.name), out)
    return 0


def cmd_config(args) -> int:
    from rlvr_entropy.testbed.train import TrainConfig

    print("training keys of the testbed (key=value or train.key=value on the command line):")
    _print_keys(TrainConfig, _train_fields(), sys.stdout)
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


# ---------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (``rlvr-entropy run: error: argument --threads: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def _common(p: argparse.ArgumentParser, single: bool) -> None:
    p.add_argument("--threads", type=_int_at_least(1), default=1,
                   help="torch threads per run (default 1: robust on a shared machine; see testbed.train.train)")
    if not single:
        p.add_argument("--jobs", type=_int_at_least(1), default=None,
                       help="runs in parallel, one process each (default: one per usable CPU core = "
                            f"{usable_cpus()}; more processes than cores only add contention)")
    p.add_argument("--task", default=None, help="countdown3 (default), countdown4 or arith")
    p.add_argument("--steps", type=_int_at_least(1), default=None, help="RL steps (default: TrainConfig.steps = 120)")
    p.add_argument("--engine", default="lean",
                   help="lean (built-in loop, default) or trl (EntropyGRPOTrainer on the same tasks)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if a checkpoint exists (default: continue from it, and say so)")
    p.add_argument("--no-plots", action="store_true", help="write summary.json only")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--report-to", default="", metavar="SINKS",
                   help="also log every step to tensorboard (<run>/tb) and/or wandb: e.g. --report-to tensorboard")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training or method config overrides (keys: rlvr-entropy config, rlvr-entropy methods NAME)")


def _frontier_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--frontier", default=default, metavar="TEMPS",
                   help="after training, sample each final policy at these temperatures (frontier.json, "
                        f"frontier.png in the report); '' skips (default {default!r})")


def build_parser() -> argparse.ArgumentParser:
    from rlvr_entropy import __version__

    parser = _Parser(prog="rlvr-entropy", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1] + "\n" + _methods_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"rlvr-entropy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("run", help="one testbed run of one method", epilog=_methods_epilog(), formatter_class=fmt)
    p.add_argument("--method", required=True, help="the method (rlvr-entropy methods lists them)")
    p.add_argument("--seed", type=_int_at_least(0), default=None, help="seed of the run (default 0)")
    p.add_argument("--out", default=None, help="output directory (default runs/<method>-s<seed>)")
    p.add_argument("--restart-if-different", action="store_true", help=argparse.SUPPRESS)
    _frontier_arg(p, "")
    _common(p, True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="several methods (and seeds) on the testbed, then a report",
                       epilog=_methods_epilog(), formatter_class=fmt)
    p.add_argument("--methods", default=",".join(DEMO_METHODS), help="comma-separated methods")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (several give error bars)")
    p.add_argument("--out", default="runs/latest")
    _frontier_arg(p, "1.0,0.9,0.8,0.7")
    _common(p, False)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the main job: grpo, siren, steer, thermostat (one seed) into runs/latest",
                       epilog="Trains with the default configuration except prompts_per_step=16 (a key=value "
                              "override wins). An interrupted demo continues where it stopped when rerun; "
                              "--no-resume starts over.",
                       formatter_class=fmt)
    p.add_argument("--seed", type=_int_at_least(0), default=None)
    p.add_argument("--out", default="runs/latest")
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    _frontier_arg(p, "1.0,0.9,0.8,0.7")
    _common(p, False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="rebuild summary.json, figures and report.html of one experiment directory")
    p.add_argument("run_dir")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("frontier", help="a finished run's final policy sampled at several temperatures "
                                        "(pass@1 against pass@k; cached in the run directory)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--temperatures", default="1.0,0.9,0.8,0.7")
    p.add_argument("--no-cache", action="store_true", help="sample again even if frontier.json matches")
    p.set_defaults(func=cmd_frontier)

    p = sub.add_parser("export", help="write a run's final policy as a Hugging Face model directory")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("methods", help="list the methods, or show one method's config keys with defaults")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("config", help="the testbed's training keys with defaults and meaning")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("eval", help="benchmark evaluation (rlvr_entropy.eval)")
    mod, _ = _eval_module()
    if mod is not None and hasattr(mod, "add_eval_arguments"):
        mod.add_eval_arguments(p)
    else:
        p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rlvr_entropy.testbed.provenance import COMMAND_ENV, command_line

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after flags too (argparse collects positionals only in one stretch)
    late = [x for x in extra if "=" in x and not x.startswith("-")]
    if extra and (len(late) != len(extra) or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(x for x in extra if x not in late or not hasattr(args, 'overrides'))}")
    if late:
        args.overrides = list(args.overrides) + late
    # what the runs record as their command: this one (a compare's runs inherit it through the environment)
    before = os.environ.get(COMMAND_ENV)
    if before is None:
        os.environ[COMMAND_ENV] = command_line(None if argv is None else ["rlvr-entropy", *argv])
    try:
        return args.func(args)
    except CLIError as e:
        print(f"rlvr-entropy: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `rlvr-entropy methods | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to continue; each run resumes from its last checkpoint "
              "(at most checkpoint_every = 5 steps back)", file=sys.stderr)
        return 130
    finally:
        if before is None:
            os.environ.pop(COMMAND_ENV, None)


if __name__ == "__main__":
    sys.exit(main())
