"""Export a trained testbed policy as a Hugging Face model directory.

    export_hf("runs/latest/thermostat/seed0", "exported/thermostat")
    # then, anywhere transformers is installed:
    model = transformers.AutoModelForCausalLM.from_pretrained("exported/thermostat")
    tok = transformers.PreTrainedTokenizerFast.from_pretrained("exported/thermostat")

(Not ``AutoTokenizer``: for a ``qwen2`` config, transformers 5 always builds its byte-level ``Qwen2Tokenizer``, which
drops the testbed's spaces.)

The directory holds the ``Qwen2ForCausalLM`` config and weights (``save_pretrained``: config.json,
model.safetensors, generation_config.json), the character tokenizer (``tokenizer.json``; ids as in the testbed, so
``tok("3 5 7>022:")`` encodes a prompt) and ``rlvr_entropy.json`` (the run's method, config and step). The logits
of the loaded model equal the testbed model's (tested).
"""
from __future__ import annotations

import json
from pathlib import Path


def export_hf(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``run_dir``'s final checkpoint (``ckpt.pt``) to ``out_dir`` as a Hugging Face model directory."""
    import torch

    from rlvr_entropy.testbed.model import TinyQwen2
    from rlvr_entropy.testbed.tokenizer import CharTokenizer
    from rlvr_entropy.testbed.train import TrainConfig

    run, out = Path(run_dir), Path(out_dir)
    ckpt = run / "ckpt.pt"
    if not ckpt.exists():
        raise ValueError(f"{run} has no ckpt.pt (not a testbed run of the lean engine, or not started)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose another directory or pass overwrite")
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in ck["config"].items() if k in fields})
    tok = CharTokenizer()
    model = TinyQwen2(tok.vocab_size, cfg.model, pad_id=tok.pad_id, eos_id=tok.eos_id, bos_id=tok.bos_id)
    model.load_state_dict(ck["model"])
    hf = model.to_hf().eval()
    hf.generation_config.eos_token_id = tok.eos_id
    hf.generation_config.pad_token_id = tok.pad_id
    hf.generation_config.bos_token_id = tok.bos_id
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    tok.to_hf().save_pretrained(out)
    (out / "rlvr_entropy.json").write_text(json.dumps({
        "source": str(run), "method": ck["method"], "method_overrides": ck.get("method_overrides", {}),
        "step": int(ck["step"]), "train": ck["config"], "task": cfg.task,
        "prompt_format": "the task's prompt string, e.g. '3 5 7>022:' (countdown3); the response ends with <eos>",
    }, indent=2))
    return out
