"""Temperature frontier: interpolation by hand, and a sweep of a tiny trained run (cached, temperature applied)."""
import json

import pytest

from rlvr_entropy.testbed import frontier
from rlvr_entropy.testbed.tasks import Task
from rlvr_entropy.testbed.train import TrainConfig, train
from tests.testbed.test_train import TINY


def test_at_matched_by_hand():
    recs = [{"T": 1.0, "p1": 0.40, "p8": 0.80}, {"T": 0.8, "p1": 0.50, "p8": 0.76}, {"T": 0.6, "p1": 0.60, "p8": 0.70}]
    assert frontier.at_matched(recs, "p1", 0.45, "p8") == pytest.approx(0.78)
    assert frontier.at_matched(recs, "p1", 0.55, "p8") == pytest.approx(0.73)
    assert frontier.at_matched(recs, "p1", 0.50, "p8") == pytest.approx(0.76)
    # outside the curve: the nearest end, never an extrapolation
    assert frontier.at_matched(recs, "p1", 0.30, "p8") == 0.80
    assert frontier.at_matched(recs, "p1", 0.90, "p8") == 0.70
    assert frontier.at_matched(list(reversed(recs)), "p1", 0.45, "p8") == pytest.approx(0.78)  # order-free
    with pytest.raises(ValueError, match="records"):
        frontier.at_matched([], "p1", 0.5, "p8")


@pytest.fixture()
def tiny_run(monkeypatch, tmp_path):
    monkeypatch.setattr(Task, "verify", lambda self, p, r: len(r) % 2 == 0)
    monkeypatch.setenv("RLVR_ENTROPY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    train("grpo", TrainConfig(steps=1, **TINY), out, progress=False)
    return out


def test_temperature_sweep_lowers_entropy_and_caches(tiny_run, monkeypatch):
    recs = frontier.temperature_sweep(tiny_run, [1.0, 0.3])
    assert [r["T"] for r in recs] == [1.0, 0.3]
    assert all(0.0 <= r["eval/pass@1"] <= 1.0 for r in recs)
    assert recs[1]["eval/entropy"] < recs[0]["eval/entropy"]  # the temperature reaches the sampler
    cached = json.loads((tiny_run / frontier.FRONTIER_FILE).read_text())
    assert cached["records"] == recs

    from rlvr_entropy.testbed import train as tr

    def boom(*a, **k):
        raise AssertionError("evaluated again despite the cache")

    monkeypatch.setattr(tr, "evaluate", boom)
    assert frontier.temperature_sweep(tiny_run, [1.0, 0.3]) == recs
    with pytest.raises(AssertionError, match="again"):  # other settings: not a cache hit
        frontier.temperature_sweep(tiny_run, [1.0, 0.5])


def test_temperature_sweep_rejects_bad_input(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="temperatures"):
        frontier.temperature_sweep(tiny_run, [])
    with pytest.raises(ValueError, match="temperatures"):
        frontier.temperature_sweep(tiny_run, [1.0, 0.0])
    with pytest.raises(ValueError, match="ckpt.pt"):
        frontier.temperature_sweep(tmp_path / "nowhere", [1.0])


def test_frontier_at_the_training_temperature_is_the_final_evaluation(tiny_run):
    final = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()][-1]
    recs = frontier.temperature_sweep(tiny_run, [1.0, 0.5])
    assert recs[0]["source"] == "final evaluation" and recs[1]["source"] == "sampled"
    for key in ("eval/pass@1", "eval/pass@k", "eval/entropy", "eval/maj@k"):
        assert recs[0][key] == final[key]
