"""Hidden states and LM head of a Hugging Face causal LM, for :class:`~rlvr_entropy.kernels.LMHeadSource`.

Imports no engine (duck-typed on the transformers ``PreTrainedModel`` interface: ``config``,
``get_output_embeddings()``, ``forward(input_ids, attention_mask, logits_to_keep)``).

* :func:`causal_lm_hidden` runs the model's ordinary forward (through any DDP / accelerate wrapper, under the
  caller's autocast) with the output-embedding module temporarily replaced by a recorder: it returns the LM
  head's input instead of computing [B, T, V] logits. The positions are those of an engine's
  ``model(input_ids, attention_mask, logits_to_keep=k + 1).logits[:, :-1]``.
* :func:`lm_head_params` returns the head's weight, bias and the model's logit scale (Cohere's ``logit_scale``,
  Granite's ``1 / logits_scaling``, ... the same list as TRL 1.16's fused LM head), and raises for final-logit
  soft-capping (Gemma 2/3/4, ...), which the tiled pass does not implement.
* :func:`check_lm_head` compares, once, the model's real logits on a tiny input with ``hidden @ W^T (+ b)``
  times that scale, so a model that post-processes its logits in some other way raises instead of training on
  the wrong distribution.
* :func:`causal_lm_source` puts it together (the scale is folded into the temperature: exact).
* :func:`capture_backbone_hidden` records the backbone's last hidden state during an engine's own forward (e.g.
  verl's ``use_fused_kernels=True`` path, which computes log-probs and entropy from hidden states itself), for a
  source that serves only the method's extra statistics; ``check_lm_head(model, backbone=True)`` verifies that
  this hidden state is the LM head's input for the model.

PEFT models (LoRA) are unwrapped to the transformers model they wrap (its backbone carries the adapters).
Not covered: FSDP-sharded heads (gather the weight first, as TRL's ``maybe_gather_lm_head_ctx`` does), heads that
are not ``torch.nn.Linear``, encoder-decoder models.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from rlvr_entropy.kernels.lm_head import LMHeadSource

__all__ = ["lm_head_params", "causal_lm_hidden", "check_lm_head", "causal_lm_source", "capture_backbone_hidden"]

_CHECKED: "weakref.WeakKeyDictionary[Any, set[bool]]" = weakref.WeakKeyDictionary()  # model -> checked settings


def _unwrap(model: Any) -> Any:
    """The transformers model inside DDP / accelerate / torch.compile / PEFT wrappers."""
    m = model
    for _ in range(8):
        if callable(getattr(m, "get_base_model", None)):  # PEFT: the wrapped transformers model (LoRA layers in it)
            m = m.get_base_model()
        if hasattr(m, "get_output_embeddings"):
            return m
        m = getattr(m, "module", None) or getattr(m, "_orig_mod", None)
        if m is None:
            break
    raise ValueError(f"model must be a Hugging Face causal LM (with get_output_embeddings()), got "
                     f"{type(model).__name__}")


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _logit_scale(model: Any) -> float:
    """The factor the model multiplies its LM-head output by (1.0 for most models); TRL 1.16's list."""
    cfg = _text_config(model)
    scale = getattr(cfg, "logit_scale", None)                     # Cohere, Cohere2: logits * logit_scale
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)          # Falcon-H1: logits * lm_head_multiplier
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        s = cfg.logits_scaling                                    # Granite*: logits / logits_scaling
        scale = s if getattr(cfg, "model_type", "") == "hyperclovax" else 1.0 / s
    scale = 1.0 if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"the model's logit scale must be a positive finite number, got {scale!r}")
    return scale


def lm_head_params(model: Any) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(weight [V, H], bias [V] or None, logit_scale) of a causal LM's output head.

    Raises ValueError for final-logit soft-capping (not implemented by the tiled pass) and for heads that are not
    a plain ``torch.nn.Linear``."""
    m = _unwrap(model)
    cfg = _text_config(m)
    for key in ("final_logit_softcapping", "logits_soft_cap"):
        if getattr(cfg, key, None) is not None:
            raise ValueError(f"the model soft-caps its logits ({key}={getattr(cfg, key)}), which the tiled LM-head "
                             "pass does not implement; use the materialized-logits route for this model")
    head = m.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise ValueError(f"the model's output head must be a plain torch.nn.Linear, got {type(head).__name__}")
    return head.weight, head.bias, _logit_scale(m)


def causal_lm_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, logits_to_keep: int,
                     *, return_outputs: bool = False, **model_kwargs: Any) -> Any:
    """The LM head's input at the positions that predict the last ``logits_to_keep`` tokens: [B, k, H].

    The same positions as ``model(input_ids, attention_mask, logits_to_keep=k + 1).logits[:, :-1]`` (TRL's
    ``_full_logits``): the model runs its ordinary forward (so wrappers, hooks and autocast apply) with its
    output-embedding module replaced, for the call, by a recorder that returns a [B, L, 1] placeholder instead of
    [B, L, V] logits. Gradient flows from the returned hidden states into the backbone as usual.
    ``return_outputs=True`` returns (hidden, the model's output) (e.g. for the MoE ``aux_loss``; its ``logits`` are
    the placeholder)."""
    if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 1:
        raise ValueError(f"logits_to_keep must be a positive int, got {logits_to_keep!r}")
    head = _unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output embeddings (get_output_embeddings() is None)")
    seen: dict[str, torch.Tensor] = {}
    had = "forward" in head.__dict__
    prev = head.__dict__.get("forward")

    def record(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen["hidden"] = x
        return x.new_zeros(*x.shape[:-1], 1)

    head.forward = record
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1,
                    use_cache=False, **model_kwargs)
    finally:
        if had:
            head.forward = prev
        else:
            del head.forward
    if "hidden" not in seen:
        raise ValueError("the model's forward never called its output embeddings; cannot capture hidden states")
    h = seen["hidden"]
    if h.dim() != 3 or h.shape[1] < logits_to_keep + 1:
        raise ValueError(f"captured LM-head input of shape {list(h.shape)}; expected [B, >= {logits_to_keep + 1}, H]")
    h = h[:, -(logits_to_keep + 1):-1]
    return (h, out) if return_outputs else h


@contextmanager
def capture_backbone_hidden(model: Any) -> Iterator[dict[str, torch.Tensor]]:
    """While active, every forward of the model's backbone (``base_model``) stores its last hidden state
    (``last_hidden_state``, or the first output) in the yielded dict under ``"hidden"``, with its graph.

    For engines whose own forward already computes log-probs from hidden states (verl ``use_fused_kernels=True``,
    TRL's fused LM head): the captured tensor, laid out like their logits would be, gives an
    :class:`LMHeadSource` for the method's other statistics. ``check_lm_head(model, backbone=True)`` verifies it is
    the LM head's input for this model (not so where the model rescales hidden states before its head)."""
    backbone = _unwrap(model).base_model
    seen: dict[str, torch.Tensor] = {}

    def hook(module: Any, args: Any, out: Any) -> None:
        seen["hidden"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    handle = backbone.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def check_lm_head(model: Any, *, length: int = 6, atol: float = 1e-3, rtol: float = 1e-3,
                  backbone: bool = False) -> None:
    """Raise ValueError unless the model's logits equal ``(hidden @ W^T + b) * logit_scale`` on a tiny input.

    One forward of a [1, length] input (once per model object and ``backbone`` setting: later calls return at once).
    Catches models that transform their LM-head output in a way :func:`lm_head_params` does not know. With
    ``backbone=True`` also checks that :func:`capture_backbone_hidden` records the LM head's input. The model runs in
    eval mode for the check (no dropout) and is put back in its mode."""
    m = _unwrap(model)
    if backbone in _CHECKED.get(m, ()):
        return
    weight, bias, scale = lm_head_params(m)
    V = weight.shape[0]
    ids = (torch.arange(length, device=weight.device) * 7919 + 11) % V
    ids = ids[None]
    am = torch.ones_like(ids)
    was_training = m.training
    m.eval()
    try:
        with capture_backbone_hidden(m) as seen:
            ref = m(input_ids=ids, attention_mask=am, use_cache=False).logits[:, -length:-1].float()
        h = causal_lm_hidden(m, ids, am, length - 1).float()
    finally:
        m.train(was_training)
    ours = (h @ weight.float().t() + (0 if bias is None else bias.float())) * scale
    if ref.shape != ours.shape or not torch.allclose(ours, ref, atol=atol, rtol=rtol):
        err = float((ours - ref).abs().max()) if ref.shape == ours.shape else float("nan")
        raise ValueError(f"the model's logits are not (hidden @ W^T + b) x {scale} (max difference {err:.3g}): it "
                         "post-processes them in a way the tiled LM-head pass does not support")
    if backbone:
        hb = seen.get("hidden")
        if hb is None or hb.shape[1] < length or not torch.allclose(hb[:, -length:-1].float(), h, atol=atol,
                                                                       rtol=rtol):
            raise ValueError("the backbone's last hidden state is not the LM head's input for this model: use "
                             "causal_lm_hidden (which records the head's input) instead of capture_backbone_hidden")
    _CHECKED.setdefault(m, set()).add(backbone)


def causal_lm_source(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                     logits_to_keep: int, token_ids: torch.Tensor, mask: torch.Tensor | None,
                     temperature: float = 1.0, tile_size: int | None = None, check: bool = True,
                     return_outputs: bool = False, **model_kwargs: Any) -> Any:
    """An :class:`LMHeadSource` for the completion positions of a causal LM (what ``TokenBatch.lm_head`` takes).

    token_ids [B, k]: the completion tokens (k = logits_to_keep); mask [B, k]: the valid ones. The model's logit
    scale is folded into the temperature (temperature / scale: exact). ``check``: run :func:`check_lm_head` once
    per model. ``return_outputs=True`` returns (source, the model's output), e.g. for the MoE ``aux_loss``."""
    if check:
        check_lm_head(model)
    weight, bias, scale = lm_head_params(model)
    hidden, out = causal_lm_hidden(model, input_ids, attention_mask, logits_to_keep, return_outputs=True,
                                   **model_kwargs)
    hidden = hidden.to(weight.device)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    src = LMHeadSource(hidden, weight, bias, token_ids=token_ids, temperature=float(temperature) / scale,
                       mask=mask, tile_size=tile_size)
    return (src, out) if return_outputs else src
