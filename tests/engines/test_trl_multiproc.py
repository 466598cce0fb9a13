"""EntropyGRPOTrainer on 2 processes (torch.distributed.run, gloo, CPU): one controller state for the run.

tests/engines/trl_multiproc.py trains siren, thermostat (its pull toward TRL's reference, beta=0), adaptive_entropy,
steer(scope="global") and forking_tokens (and entrocraft, whose begin_step is a collective, and aepo, whose second
generation spans both ranks) for 3 optimizer steps on 2 ranks that see different prompts, with evaluation in the loop,
rank 1's whole second step fully masked (and emitting a metric key rank 0 never emits), a checkpoint and a resume. See
that script's docstring.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
METHODS = ("siren", "thermostat", "adaptive_entropy", "steer", "forking_tokens", "entrocraft", "aepo")
CONTROLLED = {"siren", "thermostat", "adaptive_entropy", "entrocraft"}
#: where each controlled method keeps the entropy it measured over the step
MEASURED = {"thermostat": ("pi", "last_entropy"), "adaptive_entropy": ("coef", "last_entropy"),
            "entrocraft": ("band", "entropy")}
MASK_RANK = 1
TIMEOUT_S = 400  # a hang (e.g. ranks issuing different collectives) fails here instead of blocking the suite


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("trl2proc")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "trl_multiproc.py"), str(out), "--mask-rank", str(MASK_RANK)]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the 2-process run did not finish in {TIMEOUT_S} s (a collective hung?)\n"
                    f"{(e.stderr or b'')[-3000:]!r}")
    assert p.returncode == 0, p.stderr[-6000:]
    return {m: [json.load(open(out / f"{m}.rank{r}.json")) for r in (0, 1)] for m in METHODS}


@pytest.mark.parametrize("name", METHODS)
def test_state_identical_on_every_rank_at_every_step(runs, name):
    r0, r1 = runs[name]
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["steps"]) == 3
    assert r0["steps"] == r1["steps"]
    assert r0["final"] == r1["final"]


@pytest.mark.parametrize("name", sorted(CONTROLLED))
def test_the_reduction_is_real(runs, name):
    """Each rank alone (its LocalCollective shadow) would hold a different state: the ranks saw different data."""
    r0, r1 = runs[name]
    assert r0["local_final"] != r1["local_final"]
    assert r0["final"] != r0["local_final"] and r1["final"] != r1["local_final"]
    s0, s1 = r0["local_sums"], r1["local_sums"]
    assert len(s0) == len(s1) == 3
    if name == "siren":  # the anchor: mean H_sel over every response of the first step, every rank
        expect = (s0[0]["h_sel_sum"] + s1[0]["h_sel_sum"]) / (s0[0]["responses"] + s1[0]["responses"])
        assert r0["final"]["anchor"]["value"] == pytest.approx(expect, rel=1e-12, abs=0)
        assert s0[0]["responses"] > 0 and s1[0]["responses"] > 0
    else:  # the controlled entropy of each step: token mean over every rank's micro-batches (entrocraft: from
        # begin_step's own pass over the step's rollout, the same numbers)
        ctrl, key = MEASURED[name]
        for k in range(3):
            expect = (s0[k]["entropy_sum"] + s1[k]["entropy_sum"]) / (s0[k]["tokens"] + s1[k]["tokens"])
            got = r0["steps"][k][ctrl][key]
            assert got == pytest.approx(expect, rel=1e-9 if name == "entrocraft" else 1e-12, abs=0)
        # the fully masked step of rank 1 contributes no token: the step's entropy is rank 0's
        assert s1[1]["tokens"] == 0 and s0[1]["tokens"] > 0


@pytest.mark.parametrize("name", ["steer", "forking_tokens"])
def test_global_scope_statistics_are_shared(runs, name):
    """steer's omega_max (scope="global") and forking_tokens' batch quantile are the same on both ranks at every
    micro-batch, and differ from what each rank alone computes."""
    r0, r1 = runs[name]
    assert len(r0["shared"]) == len(r1["shared"]) == 6  # 3 steps x 2 micro-batches, training only
    assert r0["shared"] == pytest.approx(r1["shared"], rel=1e-12, abs=0)
    assert r0["shadow_shared"] != pytest.approx(r1["shadow_shared"], abs=1e-9)
    for r in (r0, r1):
        assert r["shared"] != pytest.approx(r["shadow_shared"], abs=1e-9)


@pytest.mark.parametrize("name", METHODS)
def test_evaluation_never_changes_state(runs, name):
    r0, r1 = runs[name]
    for r in (r0, r1):
        assert len(r["evals"]) == 4  # eval_on_start + after each of the 3 steps
        assert r["evals"][0] == r["begin"]
        assert r["evals"][1:] == r["steps"]
    if name in CONTROLLED:
        assert r0["begin"] != r0["steps"][0]  # the first training step does change it


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_resume_on_every_rank(runs, name):
    r0, r1 = runs[name]
    for r in (r0, r1):
        assert r["resumed_begin"] == r0["final"]
    assert r0["resumed_final"] == r1["resumed_final"]
    saved = json.load(open(os.path.join(r0["checkpoint"], "rlvr_entropy_state.json")))
    assert saved["method"] == name and saved["state"] == r0["final"]


def test_aepo_second_generation_is_one_plan_and_one_update_batch_over_both_ranks(runs):
    """AEPO on 2 ranks (trl_multiproc.py: 16-row generation batches, every prompt generated again, 12 qualifying
    temperature samples each time): the plan and the kept rows are the same on both ranks; H_prev at each plan is the
    token mean of the NLL estimate over both ranks' micro-batches of the previous step (not either rank's own); the
    kept samples take global positions 0..k-1 of the update batch, crossing from rank 0 (positions 0..7) to rank 1
    when k = 12, each the temperature sample assemble chose, whichever rank generated it."""
    r0, r1 = runs["aepo"]
    a0, a1 = r0["aepo"], r1["aepo"]
    assert a0["plans"] == a1["plans"] and a0["updates"] == a1["updates"]
    assert [(t, n) for t, n, _ in a0["plans"]] == [(1.2, 4), (0.8, 4), (0.8, 4)]  # T_high while H_prev = 0 <= 0.5
    s0, s1 = r0["local_sums"], r1["local_sums"]
    assert a0["plans"][0][2] == 0.0
    for g in (1, 2):
        a, b = s0[g - 1], s1[g - 1]
        expect = (a["estimate_sum"] + b["estimate_sum"]) / (a["estimate_count"] + b["estimate_count"])
        assert a0["plans"][g][2] == pytest.approx(expect, rel=1e-12, abs=0)
    own = [s["estimate_sum"] / s["estimate_count"] for s in (s0[0], s1[0])]
    assert all(abs(a0["plans"][1][2] - o) > 1e-6 for o in own)  # the ranks saw different data
    assert [u["k"] for u in a0["updates"]] == [12, 6, 6]  # min(60, 12), then halved above the target
    n = 8  # rows per rank per generation batch
    for g, u in enumerate(a0["updates"]):
        every = a0["extra"][g] + a1["extra"][g]  # the 16 temperature samples in global order: 8 from each rank
        assert len(a0["extra"][g]) == len(a1["extra"][g]) == 8
        for i in range(0, 16, 4):  # each prompt's 4 samples are one group, the prompts the batch's 4 in order
            assert all(p == every[i][0] for p, _ in every[i:i + 4])
        kept = [every[e] for e in u["extra_rows"]]
        assert a0["placed"][g] == kept[:n] and a1["placed"][g] == kept[n:2 * n]
    assert [len(p) for p in a1["placed"]] == [4, 0, 0] and any(
        e >= 8 for e in a0["updates"][0]["extra_rows"][:n])  # rank 0 placed samples rank 1 generated


def test_thermostat_reads_the_reference_on_both_ranks(runs):
    """The thermostat with beta=0: TRL's reference is built on both ranks, every training micro-batch hands the
    method ref_log_prob, beta stays 0, and the pull acts (u > 0) with the same coefficient on both ranks (one
    controller state); its state is identical on both ranks at every step (the tests above). A method that does not
    read the reference builds none."""
    r0, r1 = runs["thermostat"]
    for r in (r0, r1):
        assert r["has_ref_model"] and r["beta"] == 0.0
        assert len(r["ref_seen"]) == 6 and all(r["ref_seen"])  # 3 steps x 2 micro-batches
    assert [s["pi"]["u"] for s in r0["steps"]] == [s["pi"]["u"] for s in r1["steps"]]
    assert r0["steps"][0]["pi"]["u"] > 0  # the first step's update: the floor is far above the entropy
    coef = r0["logged"]["thermostat/pull_coef"]
    assert coef[0] == 0.0 and all(c > 0 for c in coef[1:])  # logged: reduced over both ranks
    assert all(k > 0 for k in r0["logged"]["thermostat/kl"][1:])
    assert not r0["trl_kl_logged"] and not r1["trl_kl_logged"]  # no fixed-KL term (TRL's "kl" metric)
    assert not any(runs[m][r]["has_ref_model"] for m in METHODS if m != "thermostat" for r in (0, 1))


def test_masked_micro_batch_on_one_rank_does_not_hang_and_keys_union(runs):
    """Rank 1's fully masked step emitted a metric key rank 0 never emitted: the run finished (fixture) and rank 0's
    logs hold the key, reduced over both ranks."""
    for name in METHODS:
        r0, r1 = runs[name]
        assert r0["masked_micro_batches"] == 0 and r1["masked_micro_batches"] == 2
        assert r0["logged"]["probe/only_on_masked_rank"] == [1.0]
        assert any(k.startswith(f"eval_{name}/") for k in r0["logged"])


def test_resume_two_process_checkpoint_on_one_process(runs, tmp_path):
    """The controller state is world-size independent: a 2-process checkpoint resumes in a single process."""
    from trl import GRPOConfig

    from rlvr_entropy.trl import EntropyGRPOTrainer
    from tests.engines.tiny_hf import digit_reward, make_dataset, make_model, make_tokenizer

    r0 = runs["siren"][0]
    tok = make_tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4,
                      gradient_accumulation_steps=2, num_generations=4, max_completion_length=6, max_steps=4,
                      report_to=[], save_strategy="no", bf16=False, disable_tqdm=True)
    t = EntropyGRPOTrainer(model=make_model(tok, seed=3), reward_funcs=digit_reward, args=args,
                           train_dataset=make_dataset(8), processing_class=tok, method="siren")
    t.train(resume_from_checkpoint=r0["checkpoint"])
    assert t.state.global_step == 4
    assert t.method.state_dict() == r0["final"]
