"""Benchmark loading: verl-format parquet files (columns prompt, reward_model.ground_truth, extra_info)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: short names -> file names in the data folder (``/work/shared/data/math`` layout).
BENCHMARK_FILES = {
    "aime24": "aime24.parquet", "aime25": "aime25.parquet", "amc23": "amc23.parquet",
    "math500": "math500.parquet", "minerva_math": "minerva_math.parquet", "minerva": "minerva_math.parquet",
    "olympiadbench": "olympiadbench.parquet", "gsm8k": "gsm8k_test.parquet", "gsm8k_test": "gsm8k_test.parquet",
    "dapo": "DAPO-Math-17k.parquet",
}


@dataclass
class Problem:
    """One deduplicated problem: ``id`` (stable string), ``prompt`` (chat list of {role, content}),
    ``ground_truth`` (gold answer string), ``data_source``, ``raw_problem``."""
    id: str
    prompt: list = field(default_factory=list)
    ground_truth: str = ""
    data_source: str = ""
    raw_problem: str = ""


def resolve_benchmark(name_or_path: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of a benchmark given a short name (``aime24``), a file name, or a path."""
    p = Path(name_or_path)
    if p.suffix == ".parquet" and p.exists():
        return p
    data_dir = Path(data_dir or os.environ.get("RLVR_ENTROPY_DATA_DIR", "/work/shared/data/math"))
    fname = BENCHMARK_FILES.get(name_or_path, name_or_path if name_or_path.endswith(".parquet")
                                else f"{name_or_path}.parquet")
    cand = data_dir / fname
    if not cand.exists():
        raise FileNotFoundError(f"benchmark {name_or_path!r} not found (looked for {cand})")
    return cand


def load_benchmark(name_or_path: str, data_dir: str | os.PathLike | None = None,
                   limit: int | None = None) -> list[Problem]:
    """Read a verl parquet with pyarrow and deduplicate repeated rows (the avg@32 protocol repeats each problem)
    by ``extra_info.index`` / ``extra_info.raw_problem`` (falling back to the prompt text). Keeps first-seen order;
    ``limit`` keeps the first ``limit`` distinct problems."""
    import pyarrow.parquet as pq

    path = resolve_benchmark(name_or_path, data_dir)
    rows = pq.read_table(path).to_pylist()
    name = Path(path).stem
    seen, out = set(), []
    for r in rows:
        extra = r.get("extra_info") or {}
        prompt = list(r.get("prompt") or [])
        raw = extra.get("raw_problem") or (prompt[-1]["content"] if prompt else "")
        key = raw if raw else ("idx", extra.get("index"))
        if key in seen:
            continue
        seen.add(key)
        idx = extra.get("index")
        pid = f"{name}/{idx if idx is not None else len(out)}"
        if any(p.id == pid for p in out):
            pid = f"{name}/{len(out)}"
        gt = (r.get("reward_model") or {}).get("ground_truth")
        out.append(Problem(id=pid, prompt=[{"role": m["role"], "content": m["content"]} for m in prompt],
                           ground_truth=str(gt), data_source=str(r.get("data_source", "")), raw_problem=raw))
        if limit is not None and len(out) >= limit:
            break
    return out
