"""A fake data-parallel world for the "global" scopes: R ranks run as threads, and each rank's ``gather_fn`` is a
real all-gather (every rank blocks until all have contributed, then gets the concatenation in rank order), the
contract of ``Method.gather_fn``."""
from __future__ import annotations

import threading

import torch


class FakeWorld:
    def __init__(self, size: int, timeout: float = 60.0) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots: list[torch.Tensor | None] = [None] * size
        self.calls = [0] * size

    def gather_fn(self, rank: int):
        def gather(x: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self._slots[rank] = x.detach().clone()
            self._barrier.wait()
            out = torch.cat([s.to(x.dtype) for s in self._slots])
            self._barrier.wait()  # nobody overwrites a slot before every rank has read them all
            return out
        return gather

    def run(self, fns):
        """Run fns[r]() as rank r (one thread each); return their results in rank order, re-raising any error."""
        assert len(fns) == self.size
        results: list = [None] * self.size
        errors: list = [None] * self.size

        def target(r):
            try:
                results[r] = fns[r]()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors[r] = e
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for e in errors:
            if e is not None and not isinstance(e, threading.BrokenBarrierError):
                raise e
        for e in errors:
            if e is not None:
                raise e
        return results
