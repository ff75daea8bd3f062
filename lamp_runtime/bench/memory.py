"""Memory figures: KV-cache bytes from the model config, and peak tensor memory of a run.

KV bytes are computed, not sampled: 2 (keys and values) x layers x kv_heads x head_dim x tokens x
bytes per element is exactly what a transformers `DynamicCache` holds (tests/runtime/test_bench.py checks
it against a real cache). Peak memory is the high-water mark of bytes allocated by torch during a
run, above what was allocated when it started, so weights and earlier runs do not count: on CUDA
from the allocator's own counters; on CPU from the profiler's allocation records, replayed in
time order (process RSS cannot show it, since the C allocator keeps freed memory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

import torch

from ..backbone.hf import kv_bytes_per_token

log = logging.getLogger(__name__)


def kv_cache_bytes(config, dtype: torch.dtype, tokens: int) -> int:
    """Bytes of keys and values that `tokens` cached positions take (summed over the batch)."""
    return kv_bytes_per_token(config, dtype) * tokens


def peak_memory_bytes(run: Callable[[], object], device: torch.device) -> int | None:
    """Run `run()` once and return its peak of torch-allocated bytes above the starting level.

    None when the figure cannot be had on this device or torch build (reported as such).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # profiler internals moved in this torch build
        log.warning("peak memory unavailable: torch profiler has no kineto_results")
        return None
    records = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    level = peak = 0
    for _, nbytes in records:
        level += nbytes
        peak = max(peak, level)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """The profiler's C++ side prints stage lines ("profiler_start", ...) straight to file descriptor 2
    on every run, dozens per bench; point fd 2 at /dev/null meanwhile. Python exceptions still surface
    (they propagate and are printed after the descriptor is restored)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
