"""How many ggml threads run the next step: learned from the steps' own times.

ggml's threads meet at a spin barrier after every operation of the graph (hundreds per token). On
a host whose cores are all busy with something else too (the HTTP ingress and proxy of the same
server, another replica, a neighbour), one of the threads is often descheduled while the others
spin for it, and a decode with as many threads as cores becomes many times slower than one with
fewer (docs/llamacpp.md, "Threads on a busy host", has the measurements and their JSON). On an
idle host the cores' count is the fastest. Which holds changes while a server runs, so the engine measures it:

- decode-only steps are timed per (thread count, batch rows rounded to a power of two);
- the fastest count so far runs the steps, but the cores' count (the first candidate) is left
  only for a count whose steps take under `margin` (0.9) of its time. On a quiet host fewer
  threads can come within a few percent at batch 1 (IQ4_NL weights: 1 thread 255 vs 2 threads
  245-290 tok/s), and with any faster sample winning the count flapped to one thread, so
  prefills, which are compute-bound, ran on one too: the warm prefill of a 2-token prompt took
  16.8 ms vs the bare llama_decode's 10.0, and batch-1 decode was 0.87x a bare llama_decode loop
  (docs/bench/llamacpp-iq4_nl-floor.json). A busy host's gap is many times the margin. (Timing
  prefill steps apart, per size, did not help: steps of one size differ by more than the margin
  with what they attend over, 1.3-1.5x between a 2- and a 200-position cached prompt, so their
  winner flapped instead);
- now and then one step runs with another count, more rarely while the winner stays the same
  (every `explore_every` steps, doubling up to `max_explore_every`), so a quiet host pays little
  for the check;
- the winner's time is the median of its last `window` (5) steps, so one step stalled by the host
  does not hand the steps to another count (with a moving average, one 2-thread step of ~25 ms
  among ~3.5 ms ones did, in a bench-like sequence of requests); another count's is its latest
  sample (an old one says nothing about the host now).

Prefills and prompt builds run with the current winner. `ThreadChooser` is pure (no ggml): the
engine calls `choose(rows)` before a step and `record(threads, rows, seconds)` after a decode-only one.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence


def thread_candidates(cores: int, adaptive: bool) -> tuple[int, ...]:
    """The thread counts to choose from: the cores' count first (tried first), then half, then one."""
    if not adaptive or cores <= 1:
        return (max(1, cores),)
    return tuple(dict.fromkeys((cores, max(1, cores // 2), 1)))


def rows_bucket(rows: int) -> int:
    """Batch rows rounded to a power of two (1, 2-3, 4-7, ...): step times differ mostly by that."""
    return max(1, rows).bit_length()


class ThreadChooser:
    def __init__(self, candidates: Sequence[int], explore_every: int = 16, max_explore_every: int = 512,
                 window: int = 5, margin: float = 0.9):
        if not candidates or any(c < 1 for c in candidates):
            raise ValueError(f"thread candidates must be positive counts, got {list(candidates)}")
        if not 1 <= explore_every <= max_explore_every:
            raise ValueError(f"need 1 <= explore_every <= max_explore_every, got {explore_every}, {max_explore_every}")
        if not 0 < margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {margin}")
        if window < 1:
            raise ValueError(f"window must be at least one step, got {window}")
        self.candidates = tuple(candidates)
        self.explore_every, self.max_explore_every, self.margin = explore_every, max_explore_every, margin
        self._window = window
        self._samples: dict[tuple[int, int], deque[float]] = {}  # (bucket, threads) -> its last `window` steps
        self._every: dict[int, int] = {}  # bucket -> decode steps between two explorations
        self._since: dict[int, int] = {}  # bucket -> decode steps since the last exploration
        self._explorations: dict[int, int] = {}  # bucket -> explorations so far
        self.current = self.candidates[0]  # the last winner: prefills run with it
        self.switches = 0  # how often the winner changed (shown in the engine's stats)

    @property
    def adaptive(self) -> bool:
        return len(self.candidates) > 1

    def choose(self, rows: int) -> int:
        """The thread count for a decode-only step of `rows` rows."""
        if not self.adaptive:
            return self.current
        bucket = rows_bucket(rows)
        untried = [t for t in self.candidates if (bucket, t) not in self._samples]
        if untried:
            return untried[0]
        winner = self._winner(bucket)
        since = self._since.get(bucket, 0) + 1
        self._since[bucket] = since
        if since >= self._every.get(bucket, self.explore_every):
            self._since[bucket] = 0
            others = [t for t in self.candidates if t != winner]
            self._explorations[bucket] = self._explorations.get(bucket, 0) + 1
            return others[self._explorations[bucket] % len(others)]  # each other count in turn
        return winner

    def record(self, threads: int, rows: int, seconds: float) -> None:
        """A decode-only step of `rows` rows took `seconds` with `threads` threads."""
        if not self.adaptive:
            return
        bucket = rows_bucket(rows)
        before = self._winner(bucket) if self._complete(bucket) else None
        key = (bucket, threads)
        samples = self._samples.setdefault(key, deque(maxlen=self._window))
        if threads != before:  # an exploration (or a first try): only what the host does now counts
            samples.clear()
        samples.append(seconds)
        if not self._complete(bucket):
            return
        after = self._winner(bucket)
        if before is not None and threads != before:  # an exploration's result: back off while nothing changes
            every = self._every.get(bucket, self.explore_every)
            self._every[bucket] = self.explore_every if after != before else min(2 * every, self.max_explore_every)
        if after != self.current:
            self.current = after
            self.switches += 1

    def seconds(self) -> dict[str, float]:
        """Per (rows bucket, threads): the seconds per step the choice is made on."""
        return {f"rows<{1 << bucket},threads={t}": statistics.median(samples)
                for (bucket, t), samples in sorted(self._samples.items())}

    def _complete(self, bucket: int) -> bool:
        return all((bucket, t) in self._samples for t in self.candidates)

    def _winner(self, bucket: int) -> int:
        """The fastest count, but the cores' count unless another one's steps take under `margin` of its time
        (a count's time: the median of its samples, one sample for a count just explored)."""
        seconds = {t: statistics.median(self._samples[(bucket, t)]) for t in self.candidates}
        cores = self.candidates[0]
        best = min(self.candidates, key=seconds.__getitem__)
        return best if seconds[best] < self.margin * seconds[cores] else cores
