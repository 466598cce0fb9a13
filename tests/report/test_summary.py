"""report.summary by hand: the time split adds each run's set-up to its loop time (a run's wall_s starts after it)."""
import re

from rlvr_entropy.report.summary import time_split


def _summary(**runs):
    return {"methods": {m: {"n_seeds": 1, "steps": 2, **v} for m, v in runs.items()}}


def test_time_split_percentages_sum_to_100_with_set_up_outside_the_loop():
    # one run: 4.5 s of set-up (a warm start) before a 0.1 s loop; before the fix: "set-up 4495%"
    text = time_split(_summary(grpo={"gen_s_total": 0.02, "update_s_total": 0.05, "eval_s_total": 0.01,
                                     "ckpt_s_total": 0.0, "setup_s": 4.5, "wall_s": 0.1}))
    shares = {name: int(pct) for name, pct in re.findall(r"([a-z-]+) (\d+)%", text)}
    assert shares["set-up"] == 98 and shares["update"] == 1 and sum(shares.values()) in (99, 100, 101)
    assert text.startswith("time in the runs: 5 s summed over runs")
    assert "0.04 s per training step" in text  # (0.02 + 0.05) / 2 steps
    # two methods, a run without set-up recorded (a resumed run): no crash, loop times only
    text = time_split(_summary(a={"gen_s_total": 1.0, "update_s_total": 2.0, "eval_s_total": 0.5,
                                  "ckpt_s_total": 0.1, "setup_s": None, "wall_s": 4.0},
                               b={"gen_s_total": 1.0, "update_s_total": 2.0, "eval_s_total": 0.5,
                                  "ckpt_s_total": 0.1, "setup_s": 0.0, "wall_s": 4.0}))
    shares = {name: int(pct) for name, pct in re.findall(r"([a-z-]+) (\d+)%", text)}
    assert shares == {"sampling": 25, "update": 50, "evaluation": 12, "checkpoints": 2, "set-up": 0, "other": 10}
    assert time_split(_summary(a={"wall_s": 0.0, "setup_s": 0.0})) == ""
