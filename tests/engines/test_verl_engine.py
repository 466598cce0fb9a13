"""verl 0.9.1's own FSDP2 engine on 2 CPU ranks (torchrun, gloo) and on 1 rank, with rlvr-entropy's losses.

The ranks run tests/engines/verl_engine_run.py with the python of .venv-verl (verl without trl: with trl 1.16 in the
environment verl cannot build an FSDP model; `make setup` creates it). What is checked, for siren, thermostat,
adaptive_entropy, steer (scope="global"), forking_tokens and entrocraft, each rank with different data:

* one truth across ranks: every controller's state is identical on both ranks, and it is the reduction of both
  ranks' observations (not either rank's own); global statistics (STEER's M, the forking-tokens quantile) are the
  same on both ranks and are not a rank's local value;
* steps from the engine: ppo_epochs=2 x 2 mini-batches with equal token counts are 4 optimizer steps (the old
  token-count detector merged them into 1); a forward-only pass through the loss changes nothing;
* checkpoints: one state file, restored by a second engine in the same process (which shares nothing with the
  first) and by a 1-rank run from the 2-rank checkpoint;
* use_dynamic_bsz (another micro-batch split) gives the same SIREN anchor as fixed micro-batches;
* STEER reads the v1 trainer's old entropy (``entropy`` in the batch); Entrocraft decides each step with that
  step's own rollout entropy (``begin_step`` from ``train_mini_batch``, reduced over both ranks), no lag;
* the thermostat's reach reads each response's group mean reward over both ranks (``group_reward`` from ``uid``),
  and its pull the data's ``ref_log_prob`` (verl's reference enabled as docs/engines/verl.md says:
  ``use_kl_loss=True``, ``kl_loss_coef=0``);
* ``use_fused_kernels=True``: SIREN reads the distribution from the tiled LM head on the recorded hidden state and
  the gathered FSDP2 weight (no logits anywhere).

Phase "ref" (its own 2-rank run, fixture ``ref_runs``): the thermostat with a floor far above the entropy (its pull
acts from the second step), verl's reference enabled the same way, trains on the ``ref_log_prob`` of the data each
rank passed: the rows it sees are the data's, its
logged k3 at the first step is the one computed from the data (per micro-batch, and as verl reports it: the mean over
both ranks' micro-batches), its controller state is one over both ranks, and its pull acts.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "engines" / "verl_engine_run.py"
VERL_PY = Path(os.environ.get("RLVR_ENTROPY_VERL_PYTHON", ROOT / ".venv-verl" / "bin" / "python"))
METHODS = ["siren", "thermostat", "adaptive_entropy", "steer", "forking_tokens", "entrocraft"]
CONTROLLED = {"siren": "anchor", "thermostat": "pi", "adaptive_entropy": "coef"}

if not VERL_PY.exists():
    if os.environ.get("RLVR_ENTROPY_REQUIRE_VERL_ENV") == "1":  # `make test` sets it: a missing env is a failure
        raise RuntimeError(f"{VERL_PY} is missing: run `make setup` (it creates .venv-verl)")
    pytest.skip(f"{VERL_PY} is missing (make setup creates .venv-verl)", allow_module_level=True)


def _torchrun(nproc: int, phase: str, work: Path, timeout: int) -> dict:
    torchrun = VERL_PY.parent / "torchrun"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLVR_ENTROPY_VERL", "VERL_"))}
    env.update(RLVR_ENTROPY_VERL_LOSS="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(nproc), str(SCRIPT), "--phase", phase,
           "--work", str(work)]
    log = work / f"{phase}.log"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # torchrun and its ranks: a hang fails instead of blocking
            p.wait()
            rc = "timeout"
    if rc != 0:
        tail = log.read_text()[-6000:]
        pytest.fail(f"torchrun {phase} on {nproc} rank(s) failed ({rc}); log tail:\n{tail}")
    return {r: json.loads((work / f"{phase}_rank{r}.json").read_text()) for r in range(nproc)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("verl_engine")
    train = _torchrun(2, "train", work, timeout=400)
    resume = _torchrun(1, "resume", work, timeout=300)
    return work, train, resume


def _losses(rec, observe=True):
    return [e for e in rec if e["event"] == "loss" and e["observe"] is observe]


def _ends(rec):
    return [e for e in rec if e["event"] == "end_step"]


@pytest.mark.parametrize("name", METHODS)
def test_state_identical_across_ranks_and_steps_from_the_engine(runs, name):
    _, train, _ = runs
    a, b = train[0][name], train[1][name]
    assert a["after_update"] == b["after_update"]  # every controller, the step count, the fingerprint
    assert a["after_update"]["step"] == 4  # ppo_epochs=2 x 2 mini-batches
    for rank in (0, 1):
        rec = train[rank][name]["record"]
        calls = _losses(rec)
        assert [c["step"] for c in calls] == [0, 0, 1, 1, 2, 2, 3, 3]  # 2 micro-batches per optimizer step
        tokens = [c["tokens"] for c in calls]
        assert tokens[0:2] == tokens[2:4] == tokens[4:6] == tokens[6:8]  # equal token counts, still 4 steps
        assert len(_ends(rec)) == 4
        # a forward-only pass through the loss (infer_batch with compute_loss) observes nothing, changes nothing
        evals = _losses(rec, observe=False)
        assert evals and all(c["step"] == 4 for c in evals)
        assert train[rank][name]["after_eval"] == train[rank][name]["after_update"]
    if name in CONTROLLED:
        steps = {"siren": None, "thermostat": ("pi", "steps"), "adaptive_entropy": ("coef", "steps")}[name]
        if steps:
            assert a["after_update"]["methods"][name][steps[0]][steps[1]] == 4


@pytest.mark.parametrize("name", list(CONTROLLED))
def test_controllers_read_the_reduction_over_both_ranks(runs, name):
    _, train, _ = runs
    per_rollout = name == "siren"  # its anchor spans the whole first pass over the rollout (2 mini-batches)
    for step in range(4):
        e0, e1 = _ends(train[0][name]["record"])[step], _ends(train[1][name]["record"])[step]
        assert e0["rollout_end"] is e1["rollout_end"] is (step % 2 == 1)  # 2 mini-batches per pass, 2 epochs
        assert e0["reduced"] == e1["reduced"]
        if per_rollout and not e0["rollout_end"]:
            assert e0["reduced"] == {}  # nothing reduced yet: the sums go on into the next mini-batch's step
        else:
            assert list(e0["reduced"].values()) == [x + y for x, y in zip(e0["local"], e1["local"])]  # exact
        assert e0["state"] == e1["state"]
    first = 1 if per_rollout else 0
    first0, first1 = _ends(train[0][name]["record"])[first], _ends(train[1][name]["record"])[first]
    if per_rollout:  # the sums at the end of the pass hold both mini-batches: more responses than the first one
        assert first0["local"][1] > _ends(train[0][name]["record"])[0]["local"][1]
        assert _ends(train[0][name]["record"])[0]["state"]["anchor"]["value"] is None
    red = list(first0["reduced"].values())
    glob = red[0] / red[1]
    own = [first0["local"][0] / first0["local"][1], first1["local"][0] / first1["local"][1]]
    assert min(abs(glob - o) for o in own) > 1e-3  # the ranks' data differ: the reduction is not a rank's own
    s = train[0][name]["after_update"]["methods"][name]
    if name == "siren":
        assert s["anchor"]["value"] == pytest.approx(glob, rel=1e-12)
    elif name == "thermostat":
        assert s["pi"]["target_start"] == pytest.approx(glob, rel=1e-6)
    else:
        assert first0["state"]["coef"]["last_entropy"] == pytest.approx(glob, rel=1e-12)


def test_steer_global_scope_spans_both_ranks_and_reads_the_old_entropy(runs):
    _, train, _ = runs
    c0, c1 = _losses(train[0]["steer"]["record"]), _losses(train[1]["steer"]["record"])
    differs = 0
    for x, y in zip(c0, c1):
        M = x["metrics"]["steer/omega_max"]
        assert M == y["metrics"]["steer/omega_max"]
        assert M == pytest.approx(max(x["local_M"], y["local_M"]), rel=1e-6)
        differs += not math.isclose(M, x["local_M"], rel_tol=1e-6) or not math.isclose(M, y["local_M"], rel_tol=1e-6)
        assert x["old_entropy_given"] and y["old_entropy_given"]  # the v1 trainer's "entropy" (old policy)
    assert differs == len(c0)  # on every micro-batch one rank's own M is not the global one


def test_entrocraft_decides_each_step_with_its_own_rollout_entropy_over_both_ranks(runs):
    _, train, resume = runs
    b0 = [e for e in train[0]["entrocraft"]["record"] if e["event"] == "begin"]
    b1 = [e for e in train[1]["entrocraft"]["record"] if e["event"] == "begin"]
    assert len(b0) == len(b1) == 1  # one update_actor call: one decision for its 4 optimizer steps
    (x,), (y,) = b0, b1
    glob = (x["local"][0] + y["local"][0]) / (x["local"][1] + y["local"][1])
    assert x["entropy"] == y["entropy"] == pytest.approx(glob, rel=1e-12)
    assert min(abs(glob - e["local"][0] / e["local"][1]) for e in (x, y)) > 1e-4  # not one rank's own entropy
    assert x["state"] == y["state"] == {"band": {"steps": 1, "entropy": x["entropy"]}}  # before the first loss
    first = [e for e in train[0]["entrocraft"]["record"] if e["event"] != "begin"][0]
    assert first["event"] == "loss" and first["step"] == 0  # the decision came before the first micro-batch
    band = train[0]["entrocraft"]["after_update"]["methods"]["entrocraft"]["band"]
    assert band == {"steps": 1, "entropy": x["entropy"]}  # the step's optimizer steps do not count as rollouts
    one = resume[0]["entrocraft"]
    (r,) = [e for e in one["record"] if e["event"] == "begin"]
    assert one["after_update"]["methods"]["entrocraft"]["band"] == {"steps": 2, "entropy": r["entropy"]}
    assert r["entropy"] == pytest.approx(r["local"][0] / r["local"][1], rel=1e-12)


def test_thermostat_reads_each_groups_mean_reward_over_both_ranks(runs):
    """The default thermostat (reach-gated floor) gets ``group_reward`` from the rollout's ``uid`` and rewards: each
    group's mean over both ranks (groups q0 and q1 span them), attached before the rollout is split; its pull gets
    the ``ref_log_prob`` of the data on every micro-batch (training and the forward-only pass)."""
    _, train, resume = runs
    rows = {rank: list(zip(train[rank]["rollout"]["uid"], train[rank]["rollout"]["reward"])) for rank in (0, 1)}
    both = rows[0] + rows[1]

    def mean(u, rs):
        return sum(r for v, r in rs if v == u) / sum(1 for v, _ in rs if v == u)

    assert sorted({u for u, _ in both}) == ["own0", "own1", "q0", "q1"]
    assert any(mean(u, both) != mean(u, rows[0]) for u in ("q0", "q1"))  # the data tell a rank's mean apart
    for rank in (0, 1):
        got = [g for c in _losses(train[rank]["thermostat"]["record"]) for g in c["group_reward"]]
        assert len(got) == 4 * 2  # each row once per epoch (the forward-only pass has no rollout hook)
        assert sorted(got) == pytest.approx(sorted([mean(u, both) for u, _ in rows[rank]] * 2), abs=1e-6)
        # the pull's input: every micro-batch (training, and the forward-only pass) carries rows of this rank's
        # ref_log_prob, each row once per pass
        data_ref = train[rank]["thermostat"]["data_ref"]
        assert data_ref != train[1 - rank]["thermostat"]["data_ref"]
        calls = _losses(train[rank]["thermostat"]["record"]) + _losses(train[rank]["thermostat"]["record"], False)
        seen = []
        for c in calls:
            for ref in c["ref"]:
                row = next((i for i, r in enumerate(data_ref) if r == pytest.approx(ref, rel=0, abs=1e-6)), None)
                assert row is not None, f"rank {rank}: a reference {ref} that is no row of the data's"
                seen.append(row)
        assert sorted(seen) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # 2 epochs + the forward-only pass
    assert not any("ref" in c for c in _losses(train[0]["siren"]["record"]))  # no reference in siren's data
    s0 = train[0]["thermostat"]["after_update"]["methods"]["thermostat"]
    assert s0["reach"]["steps"] == 4 and s0 == train[1]["thermostat"]["after_update"]["methods"]["thermostat"]
    assert resume[0]["thermostat"]["after_update"]["methods"]["thermostat"]["reach"]["steps"] == 6


def test_forking_tokens_quantile_spans_both_ranks(runs):
    _, train, _ = runs
    c0, c1 = _losses(train[0]["forking_tokens"]["record"]), _losses(train[1]["forking_tokens"]["record"])
    local_differs = 0
    for x, y in zip(c0, c1):
        t = x["metrics"]["forking_tokens/threshold"]
        assert t == y["metrics"]["forking_tokens/threshold"]
        local_differs += abs(t - x["local_threshold"]) > 1e-4 or abs(t - y["local_threshold"]) > 1e-4
    assert local_differs >= len(c0) - 1


@pytest.mark.parametrize("name", METHODS)
def test_one_state_file_restored_on_two_ranks_and_on_one(runs, name):
    import torch

    work, train, resume = runs
    saved = train[0][name]["after_eval"]
    files = sorted(p.name for p in (work / "ckpt" / name).glob("rlvr_entropy_state*"))
    assert files == ["rlvr_entropy_state.pt"]
    on_disk = torch.load(work / "ckpt" / name / "rlvr_entropy_state.pt", weights_only=False)
    assert on_disk["step"] == saved["step"] and on_disk["methods"] == saved["methods"]
    assert train[0]["second_engine_fresh"] is None  # a second engine in the same process shares nothing
    for rank in (0, 1):
        assert train[rank][name]["loaded"]["fingerprint"] == saved["fingerprint"]
    one = resume[0][name]  # one engine resumed every method's checkpoint in turn
    assert one["loaded"]["step"] == saved["step"]  # 1 rank resumes the 2-rank state
    assert one["loaded"]["methods"][name] == saved["methods"][name]
    assert one["after_update"]["step"] == 6  # 4 + ppo_epochs=2 x 1 mini-batch on one rank
    if name == "thermostat":
        assert one["after_update"]["methods"][name]["pi"]["steps"] == 6
        assert one["after_update"]["methods"][name]["pi"]["target_start"] == saved["methods"][name]["pi"][
            "target_start"]
    if name == "siren":
        assert one["after_update"]["methods"][name] == saved["methods"][name]  # the anchor is kept, not re-measured


def test_dynamic_batch_size_gives_the_same_anchor(runs):
    """use_dynamic_bsz splits each mini-batch into other micro-batches. What the anchor measures with the initial
    policy (the first mini-batch's step) is the same up to float rounding (the tiled LM head's GEMMs see other row
    counts); the second mini-batch of the pass is measured
    after the first optimizer step, which differs by float rounding between the splits (Adam's first step is about
    lr * sign(g), so rounding in near-zero gradient components shows), hence the looser second check."""
    _, train, _ = runs
    for rank in (0, 1):
        f_ends, d_ends = _ends(train[rank]["siren"]["record"]), _ends(train[rank]["siren_dynamic"]["record"])
        assert d_ends[0]["local"] == pytest.approx(f_ends[0]["local"], rel=1e-6, abs=0)
        assert not f_ends[0]["rollout_end"]
        fixed = train[rank]["siren"]["after_update"]["methods"]["siren"]["anchor"]["value"]
        dyn = train[rank]["siren_dynamic"]["after_update"]["methods"]["siren"]["anchor"]["value"]
        red = d_ends[1]["reduced"]
        assert dyn == red["h_sel_sum"] / red["responses"] and red["responses"] == 8  # 2 mini-batches x 2 ranks
        assert dyn == pytest.approx(fixed, rel=2e-2, abs=0)
        calls = [c["step"] for c in _losses(train[rank]["siren_dynamic"]["record"])]
        assert calls == [0, 1, 2, 3]  # really another split: one micro-batch per step instead of two


# ------------------------------------------------------------------- phase "ref": the thermostat's pull acting
def _k3(ref, lp):
    return sum(math.exp(r - x) - (r - x) - 1 for r, x in zip(ref, lp)) / len(ref)


@pytest.fixture(scope="module")
def ref_runs(tmp_path_factory):
    return _torchrun(2, "ref", tmp_path_factory.mktemp("verl_engine_ref"), timeout=300)


def test_thermostat_pull_reads_the_ref_log_prob_of_the_data_on_verls_engine(ref_runs):
    runs = ref_runs
    for rank in (0, 1):
        assert runs[rank]["rlvr_entropy_file"].startswith(str(ROOT / "src"))  # this checkout's package on the ranks
    a, b = (runs[r]["thermostat_pull"] for r in (0, 1))
    assert a["after_update"] == b["after_update"] and a["after_update"]["step"] == 4  # one state, both ranks
    first_step_kl = []
    for rank in (0, 1):
        data = runs[rank]["data"]
        assert data["ref"] != runs[1 - rank]["data"]["ref"]  # each rank its own reference
        calls = _losses(runs[rank]["thermostat_pull"]["record"])
        assert len(calls) == 8
        seen = []
        for c in calls:
            (ref,), (lp,) = c["ref"], c["log_prob"]  # one row per micro-batch
            row = next((i for i, r in enumerate(data["ref"]) if r == pytest.approx(ref, rel=0, abs=1e-6)), None)
            assert row is not None, f"rank {rank}: the method saw a reference {ref} that is no row of the data's"
            seen.append(row)
            m = c["metrics"]
            assert m["thermostat/kl"] == pytest.approx(_k3(ref, lp), rel=1e-4)
            if c["step"] == 0:  # the initial weights: the current log-probs are the data's old ones
                assert lp == pytest.approx(data["old"][row], abs=1e-4)
                k3 = _k3(data["ref"][row], data["old"][row])
                assert k3 > 1e-3 and m["thermostat/kl"] == pytest.approx(k3, rel=1e-3)
                first_step_kl.append(k3)
            assert m["thermostat/pull_coef"] == (0.0 if c["step"] == 0 else 0.5)  # u = 1 from the second step
        assert sorted(seen) == [0, 0, 1, 1, 2, 2, 3, 3]  # every row of this rank's data, once per epoch
        ends = _ends(runs[rank]["thermostat_pull"]["record"])
        other = _ends(runs[1 - rank]["thermostat_pull"]["record"])
        for e, o in zip(ends, other):  # the controlled entropy: pooled over both ranks
            assert list(e["reduced"].values()) == [x + y for x, y in zip(e["local"], o["local"])]
    # what verl reports for the first optimizer step: the mean over both ranks' micro-batches
    logged = a["metrics"]["actor/thermostat/kl"][0]
    assert logged == pytest.approx(sum(first_step_kl) / len(first_step_kl), rel=1e-3)
    assert a["metrics"]["actor/thermostat/pull_coef"] == [0.0, 0.5, 0.5, 0.5]
