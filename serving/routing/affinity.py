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

Per-task spill: the total bound alone makes whichever request arrives at a full replica spill. Under
one task's flood its preferred replica stays full (the flood refills every slot that frees), so the
requests that spill are mostly the light tasks' that prefer the same replica, each a prompt-cache
miss elsewhere, while the flood keeps its place. So each task also has a share of a replica (counted
from the router's own in-flight requests per replica and task): its equal part of the capacity among
the tasks queued there (`equal_part`), and no more than an even spread of its own requests over the
replicas (`LoadBound.spread_limit`). A task past its share goes on to the next replica in its
ranking; a task within it may also take the room that tasks past their part hold over the total
bound, since their next requests go elsewhere until it drains (`within_task_share`). Below
`min_queue` a replica still takes any of its tasks' requests, and a task past its share everywhere
still takes any replica within the total bound (`choose_replica`): routing stays work-conserving.
Without per-task counts (no task id) the choice is the total bound's alone.
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

    def spread_limit(self, task_in_flight: int, replicas: int) -> int:
        """The most requests one task may hold on one replica, with this request: `min_queue`, or
        an even spread of its requests over the `replicas`, whichever is larger.

        Why besides `capacity`: the total bound lets each replica reach `load_factor` x the mean,
        so with 1.5 and 3 replicas two of them may hold a lone flood's whole queue (1.5 x S/3 =
        S/2 each) while the third idles (tests/serving/test_routing.py,
        test_a_lone_flood_uses_every_replica). Past `min_queue`, more of one task's requests on one
        replica lengthen its queue while another replica idles; moving costs the task one
        prompt-cache miss per replica, after which that replica caches its prompts too."""
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
        return max(self.min_queue, math.ceil((task_in_flight + 1) / replicas))


def equal_part(capacity: int, tasks: int) -> int:
    """One task's share of a replica's `capacity` when `tasks` tasks queue on it: an equal part.
    Equal rather than max-min fair: a flood held to it loses only its first prompt-cache hit on each
    further replica (then that replica caches its prompts too), while the light tasks, each with its
    own prompts, keep the room they may need on their preferred replica. No `min_queue` floor of its
    own: `capacity` has one, and a floor as large as the capacity would let a flood hold all of a
    lightly loaded replica, so the light tasks' requests would find it full and spill."""
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        raise ValueError(f"tasks must be an integer >= 1, got {tasks!r}")
    return math.ceil(capacity / tasks)


def tasks_sharing(held: Mapping[str, int], task_id: str) -> int:
    """How many tasks share a replica once this task's request joins it; `held` is the replica's
    in-flight requests per task."""
    return len({t for t, n in held.items() if n > 0} | {task_id})


def held_past_part(held: Mapping[str, int], task_id: str, part: int) -> int:
    """The requests the other tasks hold on a replica beyond their equal part."""
    return sum(max(0, n - part) for t, n in held.items() if t != task_id)


def within_task_share(queue_len: int, held: Mapping[str, int], task_id: str, capacity: int,
                      spread_limit: int) -> bool:
    """Whether a replica takes this task's request by the per-task rule: the task stays within its
    share of the replica (its equal part of `capacity`, and at most `spread_limit`), and the queue
    within `capacity` plus the room that the other tasks hold beyond their equal part. They are
    the ones that give way: a flood refills its preferred replica as fast as it drains, so without
    that room the light tasks' requests would find it full and spill. The room is lent, not added:
    a task past its share gets no room here, so its next requests go elsewhere and the queue drains
    back; the queue passes `capacity` by at most what those tasks hold beyond their part."""
    part = equal_part(capacity, tasks_sharing(held, task_id))
    if held.get(task_id, 0) + 1 > min(part, spread_limit):
        return False
    return queue_len + 1 <= capacity + held_past_part(held, task_id, part)


def choose_replica(order: Sequence[K], queue_lens: Mapping[K, int], bound: LoadBound, task_id: str = "",
                   held: Mapping[K, Mapping[str, int]] | None = None) -> K:
    """The first replica in the task's `order` whose queue stays within `min_queue` with this
    request or that takes it by the per-task rule (`within_task_share`), else the first whose queue
    stays within the bound with this request.

    `queue_lens` holds the replicas whose queue length is known; replicas missing from it are
    skipped (they did not answer a probe). When none is known the preferred replica is returned
    and Serve's own probing decides. `held` maps a replica to the in-flight requests per task that
    the router sent it; without a `task_id` only the total bound applies.
    """
    if not order:
        raise ValueError("no replica to choose from")
    known = [r for r in order if r in queue_lens]
    if not known:
        return order[0]
    capacity = bound.capacity([queue_lens[r] for r in known])
    held = held or {}
    if task_id:
        in_flight = sum(held.get(r, {}).get(task_id, 0) for r in known)
        limit = bound.spread_limit(in_flight, len(known))
        for replica in known:
            if queue_lens[replica] + 1 <= bound.min_queue \
                    or within_task_share(queue_lens[replica], held.get(replica, {}), task_id, capacity, limit):
                return replica
    for replica in known:  # past its share everywhere: any room within the bound (work-conserving)
        if queue_lens[replica] + 1 <= capacity:
            return replica
    return min(known, key=lambda r: queue_lens[r])  # unreachable for load_factor >= 1; kept total


# A probe with Serve's backoff index 2 waits up to 0.4 s (its default first deadline is 0.1 s,
# doubled per index): on two busy cores a replica in the middle of a forward pass misses 0.1 s.
CONFIRM_BACKOFF_INDEX = 2


async def choose_replica_confirmed(order: Sequence[K], cached: Mapping[K, int],
                                   probe: Callable[[list[K], int], Awaitable[Mapping[K, int]]],
                                   bound: LoadBound, task_id: str = "",
                                   held: Mapping[K, Mapping[str, int]] | None = None) -> K:
    """`choose_replica` on the cached queue lengths, probing replicas without one; a request that
    would leave its preferred replica is decided again on freshly probed lengths first.

    Why: a router's cached length is its own count (up on send, down on completion) corrected by
    what a replica reports when it accepts a request, and that report includes other routers'
    requests (each handle in the ingress has its own router) whose completions this router never
    sees. So after a burst a cached length can stay high until the entry expires (10 s), and a
    quiet task would spill for nothing: a prompt-cache miss on another replica. A spill is the costly
    decision, so it is taken on fresh numbers; keeping the preferred replica never waits on a probe.
    `probe(replicas, backoff_index)` returns the lengths of the replicas that answered in time;
    `task_id` and `held` are `choose_replica`'s (the router's own counts, exact: no probe needed).
    """
    queue_lens = dict(cached)
    missing = [r for r in order if r not in queue_lens]
    if missing:
        queue_lens.update(await probe(missing, 0))
    chosen = choose_replica(order, queue_lens, bound, task_id, held)
    if order and chosen is order[0]:
        return chosen
    queue_lens.update(await probe(list(order), CONFIRM_BACKOFF_INDEX))
    return choose_replica(order, queue_lens, bound, task_id, held)
