"""Run requests through the engine step by step, timing every step in wall-clock and CPU time.

Wall-clock time is what a user waits; on a machine shared with other work it also counts the time
the process sat descheduled. Process CPU time counts only the work done, so it stays meaningful
under contention (with one torch thread; with more, idle OpenMP workers spinning count too). The
first step prefills the batch and decodes one token; every later step only decodes, so the
prefill's CPU time is the first step's minus the median later step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from ..requests import GenerationRequest, GenerationResult


@dataclass
class SteppedRun:
    results: list[GenerationResult]
    wall_s: float
    cpu_s: float
    step_cpu_s: list[float]

    @property
    def prefill_cpu_s(self) -> float:
        if len(self.step_cpu_s) < 2:
            return self.step_cpu_s[0]
        return max(0.0, self.step_cpu_s[0] - statistics.median(self.step_cpu_s[1:]))


def run_stepped(engine, requests: list[GenerationRequest]) -> SteppedRun:
    """What `Engine.generate` does, with every step timed. All requests must fit one batch, so
    that the first step is the only one that prefills."""
    if len(requests) > engine.config.max_batch_size:
        raise ValueError(f"{len(requests)} requests do not fit one batch of {engine.config.max_batch_size}")
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    ids = [engine.submit(r) for r in requests]
    results: dict[str, GenerationResult] = {}
    step_cpu = []
    while len(results) < len(ids):
        step_start = time.process_time()
        outputs = engine.step()
        step_cpu.append(time.process_time() - step_start)
        for out in outputs:
            if out.result is not None:
                results[out.request_id] = out.result
    return SteppedRun([results[i] for i in ids], time.perf_counter() - wall_start,
                      time.process_time() - cpu_start, step_cpu)
