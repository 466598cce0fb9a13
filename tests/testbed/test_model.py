"""TinyQwen2 computes what transformers' Qwen2ForCausalLM computes (forward, shared-prompt path, gradients, sampling);
the testbed's AdamW is torch.optim.AdamW bit for bit; the progress line is log-friendly."""
import io

import pytest
import torch

from rlvr_entropy.testbed import model as M
from rlvr_entropy.testbed.optim import AdamW
from rlvr_entropy.testbed.progress import Progress

CFG = M.ModelConfig(width=32, layers=2, heads=2, mlp=48)


@pytest.fixture(scope="module")
def pair():
    hf = M.build_hf_model(22, CFG, seed=3)
    lean = M.TinyQwen2(22, CFG)
    lean.load_state_dict(hf.state_dict())
    return hf, lean


def test_config_is_qwen2_defaults(pair):
    hf, _ = pair
    assert hf.config.rms_norm_eps == M.RMS_EPS and hf.config.rope_parameters["rope_theta"] == M.ROPE_THETA
    assert hf.config.tie_word_embeddings and hf.config.num_key_value_heads == CFG.heads


def test_forward_and_shared_prompt_logits_equal_hf(pair):
    hf, lean = pair
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 22, (5, 20), generator=g)
    assert torch.allclose(lean(x), hf(input_ids=x).logits, atol=1e-5)
    prompts = torch.randint(3, 22, (3, 7), generator=g)[torch.tensor([0, 0, 2, 1, 2, 2])]  # shared, unordered
    tokens = torch.randint(3, 22, (6, 9), generator=g)  # no EOS: every position computed
    ref = M.response_logits(hf, prompts, tokens, temperature=0.7)
    got = M.response_logits(lean, prompts, tokens, temperature=0.7)
    assert got.shape == (6, 9, 22) and torch.allclose(got, ref, atol=1e-5)
    # responses of different lengths (EOS, then padding): the valid positions as transformers computes them
    tokens[0, 3:], tokens[2, 6:], tokens[4, 0] = torch.tensor([1, 0, 0, 0, 0, 0]), torch.tensor([1, 0, 0]), 1
    valid = torch.cumsum((tokens == 1).long(), 1) - (tokens == 1).long() == 0
    ref = M.response_logits(hf, prompts, tokens)
    got = M.response_logits(lean, prompts, tokens)
    assert torch.allclose(got[valid], ref[valid], atol=1e-5) and torch.equal(got[~valid], torch.zeros_like(got[~valid]))


def test_shared_prompt_gradients_equal_hf(pair):
    hf, lean = pair
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 22, (2, 6), generator=g).repeat_interleave(3, 0)
    tokens = torch.randint(3, 22, (6, 8), generator=g)
    tokens[1, 4:] = torch.tensor([1, 0, 0, 0])  # one shorter response
    valid = torch.cumsum((tokens == 1).long(), 1) - (tokens == 1).long() == 0
    w = torch.randn(6, 8, 22, generator=g) * valid[..., None]  # a loss on valid positions, as the methods
    for m in (hf, lean):
        m.zero_grad()
        (M.response_logits(m, prompts, tokens) * w).sum().backward()
    ref = dict(hf.named_parameters())
    for name, p in lean.named_parameters():
        assert torch.allclose(p.grad, ref[name].grad, atol=1e-4, rtol=1e-4), name


def test_sampling_matches_hf_sampler(pair):
    hf, lean = pair
    prompts = torch.randint(3, 22, (4, 6), generator=torch.Generator().manual_seed(2)).repeat_interleave(4, 0)
    a = M.sample(hf, prompts, 12, eos_id=1, temperature=0.8, generator=torch.Generator().manual_seed(5))
    b = M.sample(lean, prompts, 12, eos_id=1, temperature=0.8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    assert torch.allclose(a.log_prob, b.log_prob, atol=1e-5) and torch.allclose(a.entropy, b.entropy, atol=1e-5)
    # the sampler's log-probs are the model's (old log-probs of the loss)
    lg = M.response_logits(lean, prompts, b.tokens, temperature=0.8)
    lp = torch.log_softmax(lg, -1).gather(-1, b.tokens[..., None]).squeeze(-1)
    assert torch.allclose(torch.where(b.mask, lp, 0.0), b.log_prob, atol=1e-5)
    with pytest.raises(ValueError, match="max_len"):
        M.sample(lean, prompts, 64, eos_id=1)


def test_to_hf_round_trip(pair):
    _, lean = pair
    hf = lean.to_hf()
    x = torch.randint(0, 22, (2, 10))
    assert torch.allclose(hf(input_ids=x).logits, lean(x), atol=1e-6)
    back = M.TinyQwen2.from_hf(hf)
    assert back.cfg == M.ModelConfig(width=32, layers=2, heads=2, mlp=48, max_len=CFG.max_len)
    assert torch.equal(back(x), lean(x))


def test_adamw_is_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    a, b = M.TinyQwen2(22, CFG), M.TinyQwen2(22, CFG)
    b.load_state_dict(a.state_dict())
    oa = torch.optim.AdamW(a.parameters(), lr=1e-3, weight_decay=0.1)
    ob = AdamW(b.parameters(), lr=1e-3, weight_decay=0.1)
    x = torch.randint(0, 22, (3, 9))

    def step(m, o):
        o.zero_grad(set_to_none=True)
        (m(x) ** 2).mean().backward()
        o.step()

    for _ in range(4):
        step(a, oa)
        step(b, ob)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # checkpoints of either load into the other and continue identically
    c = M.TinyQwen2(22, CFG)
    c.load_state_dict(a.state_dict())
    oc = torch.optim.AdamW(c.parameters(), lr=1e-3, weight_decay=0.1)
    oc.load_state_dict(ob.state_dict())
    d = M.TinyQwen2(22, CFG)
    d.load_state_dict(a.state_dict())
    od = AdamW(d.parameters(), lr=1e-3, weight_decay=0.1)
    od.load_state_dict(oa.state_dict())
    for m, o in ((a, oa), (c, oc), (d, od)):
        step(m, o)
    assert all(torch.equal(p, q) and torch.equal(p, r) for p, q, r in zip(a.parameters(), c.parameters(),
                                                                         d.parameters()))


def test_progress_in_a_log_is_a_dozen_plain_lines_and_eta_ignores_setup():
    buf, now = io.StringIO(), [100.0]
    p = Progress(1000, "grpo seed 0", stream=buf, tty=False, clock=lambda: now[0])
    now[0] += 300  # a slow first step (imports, warm start): must not set the ETA
    p.update(1)
    assert p.eta() is None
    for i in range(2, 1001):
        now[0] += 0.5
        p.update(i)
        if i == 11:
            assert p.eta() == pytest.approx(989 * 0.5)
    p.close()
    text = buf.getvalue()
    assert "\r" not in text and 10 <= len(text.splitlines()) <= 12
    assert text.splitlines()[-1].startswith("grpo seed 0: 1000/1000 (100%)")
    tty = io.StringIO()
    q = Progress(10, "x", stream=tty, tty=True, min_interval=0.0)
    for i in range(1, 11):
        q.update(i)
    q.close()
    assert tty.getvalue().count("\r") == 10 and tty.getvalue().endswith("\n")
