"""The grader on the benchmarks' own ground truths, and the real pipeline on the shipped files with a tiny model."""
import json
from pathlib import Path

import pytest

from rlvr_entropy.eval import extract_answer, math_equal
from rlvr_entropy.eval.benchmarks import BENCHMARK_FILES, load_benchmark

DATA = Path(__file__).parent.parent / "data" / "math"
SHIPPED = sorted(p.stem for p in DATA.glob("*.parquet"))


def test_shipped_files_and_dedup():
    assert {"aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench", "gsm8k_test"} <= set(SHIPPED)
    for name in SHIPPED:
        probs = load_benchmark(str(DATA / f"{name}.parquet"))
        assert 1 <= len(probs) <= 5
        assert len({p.id for p in probs}) == len(probs)
        assert all(p.prompt and p.prompt[0]["content"] for p in probs)
    assert load_benchmark("aime24", data_dir=DATA, max_problems=2)[0].gold == "540"
    with pytest.raises(ValueError, match="not found"):
        load_benchmark("nope", data_dir=DATA)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_gold_grades_correct_against_itself(name):
    for p in load_benchmark(str(DATA / f"{name}.parquet")):
        for text in (f"The result follows. \\boxed{{{p.gold}}}", f"Some reasoning.\nAnswer: {p.gold}",
                     f"Answer: ${p.gold}$"):
            ans = extract_answer(text)
            assert ans is not None and math_equal(ans, p.gold), (name, p.gold, text, ans)
        if p.gold.replace(".", "", 1).lstrip("-").isdigit():  # plain numbers also arrive bare in a sentence
            assert math_equal(extract_answer(f"so we get {p.gold} in total"), p.gold)


def test_pipeline_end_to_end_with_tiny_model_resumes(tmp_path):
    pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from rlvr_entropy.eval.runner import evaluate

    chars = sorted(set("".join(chr(i) for i in range(32, 127))))
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=4096, pad_token_id=0, eos_token_id=1))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "m")
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    kw = dict(n=4, temperature=1.0, max_new_tokens=8, out_dir=out, data_dir=DATA, max_problems=2, progress=False)
    res = evaluate(model, tok, ["aime24", "math500"], **kw)
    for b in ("aime24", "math500"):
        lines = (out / f"{b}.answers.jsonl").read_text().splitlines()
        assert len(lines) == 8
        rec = json.loads(lines[0])
        assert set(rec) == {"id", "response", "answer", "correct"}
        assert set(res[b]) >= {"pass@1", "pass@2", "pass@4", "maj@4", "avg@4", "problems", "n"}
        assert 0.0 <= res[b]["pass@4"] <= 1.0
    assert json.loads((out / "results.json").read_text()) == res
    assert "| pass@1 |" in (out / "results.md").read_text()
    # resume: nothing left to generate, same tables
    before = {b: (out / f"{b}.answers.jsonl").read_text() for b in ("aime24", "math500")}
    res2 = evaluate(model, tok, ["aime24", "math500"], **kw)
    assert res2 == res
    assert {b: (out / f"{b}.answers.jsonl").read_text() for b in ("aime24", "math500")} == before
