"""Regenerate smollm2_outputs.jsonl: real SmolLM2-135M-Instruct outputs (the packaged GGUF, rlvr_entropy.models)
on GSM8K and MATH500 prompts with their gold answers, for the grading tests.

    python tests/data/real_outputs/generate.py [--data-dir /work/shared/data/math] [--threads 1]

Prompts: the first 80 GSM8K problems with their "Answer:" instruction (2 samples each), the first 30 MATH500
problems with their instruction and with a \\boxed{} instruction (1 sample each), and 24 easy word problems (EASY)
with the GSM8K instruction (2 samples each). Sampling at temperature 0.7, top-p 1.0, max 256 new tokens, seed 0,
batched with rlvr_entropy.eval.runner.generate_hf (sorted by prompt length). Appends; rerunning skips done keys.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BOXED = "Please reason step by step, and put your final answer within \\boxed{}."
# Easy word problems written for this corpus (currency, units, thousands separators), so that it also holds real
# correct answers: the model rarely solves benchmark problems. Asked with the GSM8K instruction.
EASY = [
    ("A pen costs $3. Tom buys 6 pens and leaves a $2 tip. How much does he pay in dollars?", "20"),
    ("Janet has 12 eggs and uses 4 for a cake. How many eggs are left?", "8"),
    ("A book costs $15 and a pen costs $5. How much do they cost together in dollars?", "20"),
    ("Sam walks 3 miles a day for 7 days. How many miles does he walk?", "21"),
    ("A box holds 250 apples. How many apples are in 4 boxes?", "1000"),
    ("Lisa earns $1,200 a month. How much does she earn in 3 months in dollars?", "3600"),
    ("A car travels 60 miles per hour for 2 hours. How many miles does it travel?", "120"),
    ("There are 5 cups of flour and a recipe needs 2 cups. How many cups are left after one recipe?", "3"),
    ("Mark has 40 dollars and spends 15 dollars. How many dollars does he have left?", "25"),
    ("A class has 18 boys and 12 girls. How many students are in the class?", "30"),
    ("Each ticket costs $8. How much do 5 tickets cost in dollars?", "40"),
    ("A farmer has 3 fields with 120 cows each. How many cows does he have?", "360"),
    ("Anna reads 20 pages an hour. How many hours does she need to read 100 pages?", "5"),
    ("A shirt costs $25 and is 20% off. What is the sale price in dollars?", "20"),
    ("Tim has 2,500 stamps and gives away 500. How many stamps does he have left?", "2000"),
    ("A pizza has 8 slices. How many slices are in 3 pizzas?", "24"),
    ("Water costs $2 a bottle. How many bottles can you buy with $14?", "7"),
    ("A train leaves at 3 pm and arrives at 7 pm. How many hours is the trip?", "4"),
    ("Jo saves $10 a week. How many weeks does she need to save $90?", "9"),
    ("A rope 45 meters long is cut into 5 equal pieces. How long is each piece in meters?", "9"),
    ("Ben buys 3 bags of 12 candies each and eats 6. How many candies are left?", "30"),
    ("A garden has 7 rows of 9 plants. How many plants are there?", "63"),
    ("Kate pays $50 for 2 shirts. How much does one shirt cost in dollars?", "25"),
    ("A tank holds 1,000 liters and is half full. How many liters are in it?", "500"),
]
GSM8K_INSTRUCTION = ("Solve the following math problem step by step. The last line of your response should be of the "
                     "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{q}\n\n"
                     "Remember to put your answer on its own line after \"Answer:\".")
OUT = Path(__file__).with_name("smollm2_outputs.jsonl")


def jobs(data_dir, gsm8k=80, math500=30):
    from rlvr_entropy.eval.benchmarks import load_benchmark

    out = []
    for p in load_benchmark("gsm8k", data_dir=data_dir, limit=gsm8k):
        for s in range(2):
            out.append(dict(key=f"{p.id}#answer#{s}", id=p.id, style="answer", sample=s, prompt=p.prompt,
                            gold=p.ground_truth))
    for p in load_benchmark("math500", data_dir=data_dir, limit=math500):
        out.append(dict(key=f"{p.id}#answer#0", id=p.id, style="answer", sample=0, prompt=p.prompt,
                        gold=p.ground_truth))
        out.append(dict(key=f"{p.id}#boxed#0", id=p.id, style="boxed", sample=0,
                        prompt=[{"role": "user", "content": f"{p.raw_problem}\n\n{BOXED}"}], gold=p.ground_truth))
    for i, (q, a) in enumerate(EASY):
        for s in range(2):
            out.append(dict(key=f"easy/{i}#answer#{s}", id=f"easy/{i}", style="answer", sample=s, gold=a,
                            prompt=[{"role": "user", "content": GSM8K_INSTRUCTION.format(q=q)}]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default="/work/shared/data/math")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args()
    import torch

    from rlvr_entropy.eval.runner import generate_hf
    from rlvr_entropy.models import load_smollm2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    done = set()
    if OUT.exists():
        done = {json.loads(line)["key"] for line in OUT.read_text().splitlines() if line.strip()}
    todo = [j for j in jobs(args.data_dir) if j["key"] not in done]
    for j in todo:
        j["text"] = tok.apply_chat_template(j["prompt"], tokenize=False, add_generation_prompt=True)
    todo.sort(key=lambda j: len(tok(j["text"], add_special_tokens=False)["input_ids"]))
    for s in range(0, len(todo), args.batch_size):
        chunk = todo[s:s + args.batch_size]
        t0 = time.perf_counter()
        res = generate_hf(model, tok, [j["text"] for j in chunk], 1, 0.7, 1.0, args.max_new_tokens, args.batch_size)
        dt = time.perf_counter() - t0
        ntok = sum(r[0][2] for r in res)
        with open(OUT, "a") as f:
            for j, r in zip(chunk, res):
                text, truncated, n = r[0]
                f.write(json.dumps({"key": j["key"], "id": j["id"], "style": j["style"], "gold": j["gold"],
                                    "response": text, "truncated": truncated, "new_tokens": n}) + "\n")
        print(f"{s + len(chunk)}/{len(todo)}: {ntok} tokens in {dt:.1f} s ({ntok / dt:.1f} tok/s)", flush=True)


if __name__ == "__main__":
    main()
