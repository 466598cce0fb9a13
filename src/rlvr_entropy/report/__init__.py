"""Summaries, plots and the HTML report of testbed runs, rebuilt from ``metrics.jsonl`` files.

A run directory holds one run (``metrics.jsonl`` + ``config.json``) or several under sub-folders
(``<method>/seed<S>/``, as ``rlvr-entropy compare`` writes). ``build_report(run_dir)`` writes ``summary.json``,
PNG plots and a self-contained ``report.html`` (plots embedded as base64) into ``run_dir``.
"""
from rlvr_entropy.report.summary import build_report, load_runs, summarize

__all__ = ["build_report", "load_runs", "summarize"]
