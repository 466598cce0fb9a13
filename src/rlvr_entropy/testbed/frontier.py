"""Temperature frontier of a trained testbed policy: the final checkpoint sampled at several temperatures.

Sampling at temperature T < 1 is the same policy with its logits scaled by 1/T, a knob any deployment can turn, so
pass@1 at T = 1 alone mixes how much a policy has learned with how sharp it is. The frontier (pass@1 against
pass@k as T varies) separates the two: a method whose frontier lies above another's offers more pass@k at every
pass@1 the other reaches, and :func:`at_matched` reads that off by interpolating along the curve.

    recs = temperature_sweep("runs/evidence/main/thermostat/seed20", [1.0, 0.9, 0.8, 0.7])
    p8 = at_matched(recs, "eval/pass@1", 0.45, "eval/pass@8")   # pass@8 where this policy's pass@1 is 0.45

Results are cached in ``<run>/frontier.json`` (keyed by the evaluation settings and the checkpoint's step), so a
report can be rebuilt without sampling again.

The point at the run's own temperature is the run's final evaluation itself (same samples, so the frontier and the
results table agree to the last digit); the other temperatures sample the same held-out problems with one seed
(the final evaluation's), so the curve differs between temperatures only by the temperature.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

FRONTIER_FILE = "frontier.json"


FRONTIER_VERSION = 2  # 2: the final evaluation's seed for every temperature, its own records at the run's T


def _key(temperatures: Sequence[float], samples: int, k: int, step: int) -> str:
    return json.dumps({"T": [round(float(t), 6) for t in temperatures], "n": samples, "k": k, "step": step,
                       "v": FRONTIER_VERSION})


def temperature_sweep(run_dir: str | Path, temperatures: Sequence[float], samples: int | None = None,
                      k: int | None = None, use_cache: bool = True) -> list[dict]:
    """Evaluate a run's final checkpoint (``ckpt.pt``) at each temperature on the run's held-out problems.

    Returns one record per temperature (``{"T": t, "eval/pass@1": ..., "eval/pass@8": ..., ..., "source": ...}``,
    the keys of :func:`rlvr_entropy.testbed.train.evaluate`). ``samples`` / ``k`` default to the run's own
    evaluation settings; every temperature uses the final evaluation's sampling seed, and at the run's own
    temperature (with those settings) the record is the final evaluation itself (``"source": "final evaluation"``).
    """
    import torch

    from rlvr_entropy.testbed import train as tr
    from rlvr_entropy.testbed.tasks import get_task
    from rlvr_entropy.testbed.tokenizer import CharTokenizer

    run = Path(run_dir)
    temps = [float(t) for t in temperatures]
    if not temps:
        raise ValueError("temperatures must not be empty")
    for t in temps:
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(f"temperatures must be positive and finite, got {t!r}")
    ckpt_path = run / "ckpt.pt"
    if not ckpt_path.exists():
        raise ValueError(f"run_dir {str(run)!r} has no ckpt.pt (not a finished testbed run)")
    ck = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    fields = tr.TrainConfig.__dataclass_fields__
    cfg = tr.TrainConfig(**{name: v for name, v in ck["config"].items() if name in fields})
    n = int(samples or cfg.eval_samples)
    kk = int(k or cfg.eval_k)
    key = _key(temps, n, kk, int(ck["step"]))
    cache = run / FRONTIER_FILE
    if use_cache and cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored["records"]
    task = get_task(cfg.task)
    tok = CharTokenizer()
    model = tr.initial_model(cfg, task, tok)
    model.load_state_dict(ck["model"])
    model.eval()
    problems = tr.eval_problems(task, cfg.eval_problems)
    step = int(ck["step"])
    final = ck.get("last_eval") or {}
    recs = []
    for t in temps:
        if (abs(t - cfg.temperature) < 1e-9 and n == cfg.eval_samples and kk == cfg.eval_k and step == cfg.steps
                and "eval/pass@1" in final):
            recs.append({"T": t, **final, "source": "final evaluation"})
            continue
        r = tr.evaluate(model, task, tok, problems, n, kk, t, seed=cfg.seed * 100_003 + step)
        recs.append({"T": t, **r, "source": "sampled"})
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "records": recs}))
    tmp.replace(cache)
    return recs


def at_matched(records: Sequence[dict], x_key: str, x: float, y_key: str) -> float:
    """``y_key`` interpolated linearly at ``x_key == x`` along a frontier (records from :func:`temperature_sweep`).

    The records are ordered by ``x_key``; outside their range the nearest end is returned unchanged (no
    extrapolation), so a policy that never reaches ``x`` is credited with its closest point, not an invented one.
    """
    pts = sorted((float(r[x_key]), float(r[y_key])) for r in records)
    if not pts:
        raise ValueError("records must not be empty")
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]  # unreachable: x lies inside the range
