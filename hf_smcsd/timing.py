"""Wall-clock spans of the round loop's phases, for the auto planner's cost model.

On a CPU the work is done when a call returns, so `time.perf_counter` measures it. On CUDA a
call returns once its kernels are queued: spans are CUDA events, recorded without waiting,
and read only after the loop's own once-per-round synchronisation has passed them (events
recorded before a host synchronisation are complete by then, so reading them does not
wait). Nothing here synchronises per step.
"""

from __future__ import annotations

import time

import torch


class PhaseClock:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._open: dict[str, object] = {}
        self._done: list[tuple[str, object, object]] = []

    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._open[name] = self._stamp()

    def stop(self, name: str) -> None:
        self._done.append((name, self._open.pop(name), self._stamp()))

    def collect(self) -> dict[str, float]:
        """Seconds of every span stopped so far (call after a host synchronisation that
        followed them); forgets them."""
        out: dict[str, float] = {}
        for name, begin, end in self._done:
            seconds = begin.elapsed_time(end) / 1000.0 if self.cuda else end - begin
            out[name] = out.get(name, 0.0) + seconds
        self._done.clear()
        return out

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
