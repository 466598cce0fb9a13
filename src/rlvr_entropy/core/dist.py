"""The processes a method's statistics span: an engine-agnostic collective hook (torch only).

A :class:`Collective` is what an engine hands a method (``Method.dist``) so that every statistic that is meant to
cover the whole batch of a step (controller measurements, "global" quantiles and top-k selections) covers every
process of the step. Two operations suffice:

* ``all_gather(x)``: x is a 1-D tensor (lengths may differ across ranks); returns the concatenation of every
  rank's x in rank order, on every rank.
* ``all_reduce_sum(x)``: x is a 1-D tensor of the same length on every rank; returns the elementwise sum. It is
  computed as a gather followed by a sum in rank order (float64), so the result is bit-identical on every rank
  (a ring all-reduce need not be), which is what lets controllers fed with it hold bit-identical state.

Implementations: :class:`LocalCollective` (one process: identity), :class:`TorchCollective` (``torch.distributed``,
an optional process group: TRL's accelerate world, verl's data-parallel group) and :class:`FnCollective` (wraps a
user-supplied all-gather function, e.g. the legacy ``Method.gather_fn``). Every call is a collective: every rank of
the group must make the same calls in the same order, whatever its data (a rank with no valid token passes an
empty or zero tensor, never skips the call).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

GatherFn = Callable[[torch.Tensor], torch.Tensor]


def _check_1d(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(x.shape)}")
    return x


class Collective:
    """Base class: one process (identity). Subclasses override :meth:`all_gather` and :attr:`world_size`."""

    @property
    def world_size(self) -> int:
        return 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[n_r] on rank r -> [sum_r n_r], the concatenation in rank order (identity on one process)."""
        return _check_1d("x", x)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """[k] on every rank -> [k] float64, the sum over ranks, summed in rank order (bit-identical everywhere)."""
        x = _check_1d("x", x).detach().to(torch.float64)
        if not self.is_distributed:
            return x.clone()
        k = x.numel()
        if k == 0:
            return x.clone()
        g = self.all_gather(x).to(torch.float64)
        if g.dim() != 1 or g.numel() == 0 or g.numel() % k != 0:
            raise ValueError(f"all_reduce_sum needs the same length on every rank: gathered {g.numel()} values "
                             f"for a local tensor of {k}")
        return g.reshape(-1, k).sum(0)


class LocalCollective(Collective):
    """One process: every collective is the identity."""


class FnCollective(Collective):
    """A collective from an all-gather function ``fn(x [n]) -> [sum_r n_r]`` (concatenation in rank order).

    ``world_size`` is given, or found on first use from a probe gather of one number (a collective itself, so
    every rank must make it at the same point: the first :meth:`all_reduce_sum`).
    """

    def __init__(self, fn: GatherFn, world_size: int | None = None) -> None:
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        if world_size is not None and (not isinstance(world_size, int) or world_size < 1):
            raise ValueError(f"world_size must be a positive int or None, got {world_size!r}")
        self.fn = fn
        self._size = world_size

    @property
    def world_size(self) -> int:
        if self._size is None:
            self._size = int(self.fn(torch.zeros(1, dtype=torch.float64)).numel())
        return self._size

    @property
    def is_distributed(self) -> bool:
        """Always True: a user's gather is used as given, without a probe (which would be a collective)."""
        return True

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(_check_1d("x", x))


class TorchCollective(Collective):
    """``torch.distributed`` over ``group`` (None: the default group). Tensors travel on CPU for gloo and on
    their own device otherwise (NCCL needs CUDA tensors); results come back on the input's device."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("TorchCollective needs an initialized torch.distributed process group")
        self.group = group
        self._dist = dist

    @property
    def world_size(self) -> int:
        return self._dist.get_world_size(self.group)

    def _comm_device(self, x: torch.Tensor) -> torch.device:
        backend = str(self._dist.get_backend(self.group)).lower()
        if "nccl" in backend and x.device.type == "cpu" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if backend == "gloo":
            return torch.device("cpu")
        return x.device

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_1d("x", x).detach()
        r = self.world_size
        if r == 1:
            return x.clone()
        dev = self._comm_device(x)
        xc = x.to(dev).contiguous()
        n = torch.tensor([xc.numel()], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(r)]
        self._dist.all_gather(sizes, n, group=self.group)
        lens = [int(s.item()) for s in sizes]
        m = max(lens)
        padded = torch.zeros(m, dtype=xc.dtype, device=dev)
        padded[: xc.numel()] = xc
        out = [torch.zeros_like(padded) for _ in range(r)]
        self._dist.all_gather(out, padded, group=self.group)
        return torch.cat([o[:k] for o, k in zip(out, lens)]).to(x.device)


def default_collective() -> Collective:
    """A :class:`TorchCollective` over the default group when torch.distributed is initialized with more than one
    process, else a :class:`LocalCollective`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollective()
    return LocalCollective()


__all__ = ["Collective", "LocalCollective", "FnCollective", "TorchCollective", "default_collective", "GatherFn"]
