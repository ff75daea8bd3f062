"""Task affinity with bounded load: the pure decisions behind the task-affinity request router.

Each task ranks the replicas by rendezvous (highest-random-weight) hashing: a replica's score for a
task is a hash of (task, replica), the task's preferred replica is the best score, and the rest of
the ranking is where it goes when that one is busy. Rendezvous rather than a ring: there is no ring
state to build or keep in step between ingress processes (each ingress runs its own router), the
ranking is a pure function of the task id and the current replica ids, and when a replica joins or
leaves only the tasks it wins (or won) move, about 1/N of them, with no virtual nodes to tune.

Bounded load (Mirrokni et al., "Consistent hashing with bounded loads"): a replica takes the request
while its queue, with this request, stays within `load_factor` x the mean queue (this request
included) or within `min_queue`, whichever is larger; otherwise the request goes to the next replica
in the task's ranking. So a hot task spreads over more replicas instead of piling onto one, and no
queue runs ahead of the others by more than the bound. There is always a replica within the bound:
the shortest queue q_min <= floor(S/N), and ceil(c (S+1)/N) >= floor(S/N) + 1 for c >= 1.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def affinity_score(task_id: str, replica: str) -> int:
    """A stable 64-bit score of (task, replica): the same in every process and Python run
    (`hash()` of a str is salted per process, so two ingresses would disagree)."""
    digest = hashlib.blake2b(f"{task_id}\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_replicas(task_id: str, replicas: Mapping[K, str]) -> list[K]:
    """The replicas in the task's order of preference: `replicas` maps each replica to its stable
    name (Serve's replica unique id); ties, practically impossible, go by name."""
    return sorted(replicas, key=lambda r: (affinity_score(task_id, replicas[r]), replicas[r]), reverse=True)


@dataclass(frozen=True)
class LoadBound:
    """When a replica is too busy to take a task's request.

    load_factor: a replica's queue (this request included) may reach this multiple of the mean.
    min_queue: below this many queued requests a replica always takes its tasks' requests: a
        replica batches requests of every task in one forward, so a short queue costs the next
        request about nothing and spilling it would only cost a prompt-cache miss elsewhere.

    The defaults are measured (docs/benchmarks.md section 8, bench/affinity.json against
    bench/affinity-looser-bound.json, 2 replicas, 6 clients, 400 tasks): with 1.25 / 2 (the classic
    bound of the paper) 12-15 % of requests spilled and each spill missed the other replica's
    caches; with 1.5 / 4 5-8 % spilled, the uniform workload's hit ratio went 0.83 -> 0.94 and its
    TTFT p95 1334 -> 971 ms, with requests per replica still within 1.08x of each other. Routers
    for batching LLM servers tolerate more imbalance still (SGLang's cache-aware router rebalances
    only past 1.5x and 64 requests; Ray Serve's prefix-cache router defaults to no bound at all).
    """

    load_factor: float = 1.5
    min_queue: int = 4

    def __post_init__(self):
        if isinstance(self.load_factor, bool) or not isinstance(self.load_factor, (int, float)) \
                or not 1.0 <= self.load_factor <= 100.0:
            raise ValueError(f"load_factor must be a number in [1, 100], got {self.load_factor!r}")
        if isinstance(self.min_queue, bool) or not isinstance(self.min_queue, int) or self.min_queue < 1:
            raise ValueError(f"min_queue must be an integer >= 1, got {self.min_queue!r}")

    def capacity(self, queue_lens: Sequence[int]) -> int:
        """The longest queue a replica may reach by taking the next request."""
        mean_after = (sum(queue_lens) + 1) / len(queue_lens)
        return max(self.min_queue, math.ceil(self.load_factor * mean_after))


def choose_replica(order: Sequence[K], queue_lens: Mapping[K, int], bound: LoadBound) -> K:
    """The first replica in the task's `order` whose queue stays within the bound with this request.

    `queue_lens` holds the replicas whose queue length is known; replicas missing from it are
    skipped (they did not answer a probe). When none is known the preferred replica is returned
    and Serve's own probing decides.
    """
    if not order:
        raise ValueError("no replica to choose from")
    known = [r for r in order if r in queue_lens]
    if not known:
        return order[0]
    capacity = bound.capacity([queue_lens[r] for r in known])
    for replica in known:
        if queue_lens[replica] + 1 <= capacity:
            return replica
    return min(known, key=lambda r: queue_lens[r])  # unreachable for load_factor >= 1; kept total


# A probe with Serve's backoff index 2 waits up to 0.4 s (its default first deadline is 0.1 s,
# doubled per index): on two busy cores a replica in the middle of a forward pass misses 0.1 s.
CONFIRM_BACKOFF_INDEX = 2


async def choose_replica_confirmed(order: Sequence[K], cached: Mapping[K, int],
                                   probe: Callable[[list[K], int], Awaitable[Mapping[K, int]]],
                                   bound: LoadBound) -> K:
    """`choose_replica` on the cached queue lengths, probing replicas without one; a request that
    would leave its preferred replica is decided again on freshly probed lengths first.

    Why: a router's cached length is its own count (up on send, down on completion) corrected by
    what a replica reports when it accepts a request, and that report includes other routers'
    requests (each handle in the ingress has its own router) whose completions this router never
    sees. So after a burst a cached length can stay high until the entry expires (10 s), and a
    quiet task would spill for nothing: a prompt-cache miss on another replica. A spill is the costly
    decision, so it is taken on fresh numbers; keeping the preferred replica never waits on a probe.
    `probe(replicas, backoff_index)` returns the lengths of the replicas that answered in time.
    """
    queue_lens = dict(cached)
    missing = [r for r in order if r not in queue_lens]
    if missing:
        queue_lens.update(await probe(missing, 0))
    chosen = choose_replica(order, queue_lens, bound)
    if order and chosen is order[0]:
        return chosen
    queue_lens.update(await probe(list(order), CONFIRM_BACKOFF_INDEX))
    return choose_replica(order, queue_lens, bound)
