"""rlvr_entropy.models.read_gguf_metadata against the gguf package's own writer and reader, on a small file."""
from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")

from rlvr_entropy.models import gguf_special_tokens, read_gguf_metadata  # noqa: E402


def _write(path):
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.context_length", 512)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.add_array("tokenizer.ggml.tokens", ["<unk>", "<s>", "</s>", "a", "b"])
    w.add_array("tokenizer.ggml.token_type", [2, 3, 3, 1, 1])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_int64("custom.negative", -7)
    w.add_array("custom.floats", [0.5, -1.25])
    w.add_tensor("t", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_matches_the_gguf_reader(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path)
    ours = read_gguf_metadata(path)
    ref = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}
    assert ours == ref
    assert ours["custom.negative"] == -7 and ours["tokenizer.ggml.tokens"][2] == "</s>"
    assert read_gguf_metadata(path, ["llama.context_length"]) == {"llama.context_length": 512}


def test_special_tokens(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path)
    sp = gguf_special_tokens(path)
    assert sp["bos"] == (1, "<s>") and sp["eos"] == (2, "</s>") and sp["unk"] == (0, "<unk>")
    assert "pad" not in sp and sp["context_length"] == 512 and sp["chat_template"] == "{{ messages }}"


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf_metadata(p)
