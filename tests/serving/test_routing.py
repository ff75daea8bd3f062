"""Task-affinity routing, the pure decisions: rendezvous ranking (stable, balanced, moves only a
leaving or joining replica's share), the bounded-load choice (a hot task spills, queues stay
bounded) and the per-task spill (under a flood the flood spills, the light tasks keep their
replica; a lone flood uses every replica). The router on the real server is tested in
test_replicas.py and the reliability tests."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, deque

import pytest

from serving.routing import effective_routing, request_router_config
from serving.routing.affinity import (
    CONFIRM_BACKOFF_INDEX,
    LoadBound,
    choose_replica,
    choose_replica_confirmed,
    equal_part,
    rank_replicas,
)
from serving.routing.inflight import InFlight

TASKS = [f"task-{i}" for i in range(400)]


def replicas(n: int) -> dict[str, str]:
    return {f"r{i}": f"replica{i}x7q" for i in range(n)}


def preferred(replica_set: dict[str, str]) -> dict[str, str]:
    return {t: rank_replicas(t, replica_set)[0] for t in TASKS}


def test_ranking_is_the_same_in_every_process():
    code = ("from serving.routing.affinity import rank_replicas;"
            "print([rank_replicas(f't{i}', {k: k for k in 'abcd'}) for i in range(20)])")
    outputs = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed, "PYTHONPATH": "."},
                              capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(outputs) == 1
    assert outputs.pop().strip() == str([rank_replicas(f"t{i}", {k: k for k in "abcd"}) for i in range(20)])


@pytest.mark.parametrize("n", [2, 3, 4])
def test_tasks_spread_evenly(n):
    shares = Counter(preferred(replicas(n)).values())
    assert len(shares) == n
    assert max(shares.values()) / min(shares.values()) < 1.35  # 400 tasks: binomial noise only


def test_a_leaving_replica_moves_only_its_own_tasks():
    before = preferred(replicas(4))
    after = preferred({k: v for k, v in replicas(4).items() if k != "r2"})
    moved = {t for t in TASKS if before[t] != after[t]}
    assert moved == {t for t in TASKS if before[t] == "r2"}
    # each moved task goes to its second choice: the remaining replicas share them
    assert len(Counter(after[t] for t in moved)) == 3


def test_a_joining_replica_takes_about_its_share_and_nothing_else_moves():
    before = preferred(replicas(3))
    after = preferred(replicas(4))
    moved = {t for t in TASKS if before[t] != after[t]}
    assert all(after[t] == "r3" for t in moved)
    assert 0.15 < len(moved) / len(TASKS) < 0.35  # about 1/4


def test_preferred_replica_takes_the_request_while_queues_are_short_or_even():
    order = ["a", "b", "c"]
    bound = LoadBound(load_factor=1.25, min_queue=2)
    assert choose_replica(order, {"a": 0, "b": 0, "c": 0}, bound) == "a"
    assert choose_replica(order, {"a": 1, "b": 0, "c": 0}, bound) == "a"  # within min_queue
    assert choose_replica(order, {"a": 5, "b": 4, "c": 4}, bound) == "a"  # ceil(1.25 * 14/3) = 6


def test_an_overloaded_preferred_replica_spills_to_the_next_in_the_tasks_order():
    bound = LoadBound(load_factor=1.25, min_queue=2)
    assert choose_replica(["a", "b", "c"], {"a": 6, "b": 0, "c": 0}, bound) == "b"
    assert choose_replica(["a", "c", "b"], {"a": 6, "b": 0, "c": 0}, bound) == "c"
    assert choose_replica(["a", "b", "c"], {"a": 6, "b": 5, "c": 0}, bound) == "c"


def test_replicas_without_a_known_queue_are_skipped():
    bound = LoadBound()
    assert choose_replica(["a", "b"], {"b": 3}, bound) == "b"
    assert choose_replica(["a", "b"], {}, bound) == "a"
    with pytest.raises(ValueError, match="no replica"):
        choose_replica([], {}, bound)


@pytest.mark.parametrize("queues", [[0], [3, 0], [9, 9, 0, 1], [0, 0, 0, 50], [7, 7, 7, 7, 7]])
@pytest.mark.parametrize("factor", [1.0, 1.25, 2.0])
def test_some_replica_is_always_within_the_bound(queues, factor):
    bound = LoadBound(load_factor=factor, min_queue=1)
    assert min(queues) + 1 <= bound.capacity(queues)


class Replicas:
    """Queue lengths as the replicas would answer a probe (None: no answer in time); records each probe."""

    def __init__(self, **queues):
        self.queues, self.probes = queues, []

    async def probe(self, replicas, backoff_index):
        self.probes.append((list(replicas), backoff_index))
        return {r: self.queues[r] for r in replicas if self.queues[r] is not None}


def confirmed(order, cached, replicas: Replicas, bound=LoadBound(), task_id="", held=None):
    import asyncio

    return asyncio.run(choose_replica_confirmed(order, cached, replicas.probe, bound, task_id, held))


def test_a_stale_long_cached_queue_does_not_make_a_quiet_task_spill():
    # the cache still holds a burst's length; the preferred replica is idle by now
    replicas = Replicas(a=0, b=0)
    assert confirmed(["a", "b"], {"a": 7, "b": 1}, replicas) == "a"
    assert replicas.probes == [(["a", "b"], CONFIRM_BACKOFF_INDEX)]


def test_a_spill_that_fresh_lengths_confirm_goes_ahead():
    replicas = Replicas(a=6, b=0)
    assert confirmed(["a", "b"], {"a": 6, "b": 0}, replicas) == "b"


def test_keeping_the_preferred_replica_never_waits_on_a_probe():
    replicas = Replicas(a=9, b=0)  # its real queue does not matter: the cache says it is within the bound
    assert confirmed(["a", "b"], {"a": 1, "b": 0}, replicas) == "a"
    assert replicas.probes == []


def test_replicas_missing_from_the_cache_are_probed_and_a_slow_preferred_one_gets_a_longer_deadline():
    replicas = Replicas(a=0, b=0)
    assert confirmed(["a", "b"], {}, replicas) == "a"
    assert replicas.probes == [(["a", "b"], 0)]
    slow = Replicas(a=None, b=0)  # never answers: the spill stands, after one longer probe
    assert confirmed(["a", "b"], {}, slow) == "b"
    assert slow.probes == [(["a", "b"], 0), (["a", "b"], CONFIRM_BACKOFF_INDEX)]


def simulate_hot_task(bound: LoadBound, ticks: int = 400) -> tuple[list[int], list[int]]:
    """One task sending 3 requests every 2 ticks to 2 replicas that each finish 1 request per tick:
    more than one replica can serve. Returns the replicas' final queues and requests taken."""
    order = rank_replicas("hot", {"a": "a", "b": "b"})
    queues = {r: deque() for r in order}
    taken = Counter()
    for tick in range(ticks):
        for _ in range(2 if tick % 2 else 1):
            chosen = choose_replica(order, {r: len(q) for r, q in queues.items()}, bound)
            queues[chosen].append(tick)
            taken[chosen] += 1
        for q in queues.values():
            if q:
                q.popleft()
    return [len(queues[r]) for r in order], [taken[r] for r in order]


def test_a_hot_task_spreads_and_no_queue_grows_without_bound():
    queues, taken = simulate_hot_task(LoadBound(load_factor=1.25, min_queue=2))
    assert max(queues) <= 3
    assert taken[0] >= 0.65 * sum(taken)  # the preferred replica runs full (1 of the 1.5 per tick)
    assert taken[1] >= 0.3 * sum(taken)  # and the overflow goes to the other one
    queues, taken = simulate_hot_task(LoadBound())  # the defaults: a longer queue before it spills, still bounded
    assert max(queues) <= 4 and taken[1] >= 0.3 * sum(taken)
    # without spilling (an unreachable bound) the preferred replica's queue grows with time
    queues, taken = simulate_hot_task(LoadBound(load_factor=1.0, min_queue=10_000))
    assert queues[0] > 150 and taken[1] == 0


FLOOD, LIGHT_B, LIGHT_C = [t for t in TASKS if rank_replicas(t, {r: r for r in "abc"}) == ["a", "b", "c"]][:3]


def test_a_flood_past_its_share_spills_and_the_light_tasks_keep_their_preferred_replica():
    order, queues, bound = ["a", "b", "c"], {"a": 6, "b": 0, "c": 0}, LoadBound()  # capacity 4
    held = {"a": {FLOOD: 6}}
    assert choose_replica(order, queues, bound, LIGHT_B, held) == "a"  # takes room the flood holds past its part
    assert choose_replica(order, queues, bound, FLOOD, held) == "b"
    # the total bound alone: whichever request arrives spills, the light task's too
    assert choose_replica(order, queues, bound) == "b"
    # the room is lent, not added: capacity 5, the flood's part 2 of it, so the room ends at 5 + 4
    held = {"a": {FLOOD: 6, LIGHT_C: 2}}
    assert choose_replica(order, {"a": 8, "b": 0, "c": 0}, bound, LIGHT_B, held) == "a"
    assert choose_replica(order, {"a": 9, "b": 0, "c": 0}, bound, LIGHT_B, held) == "b"


def test_a_task_within_its_share_keeps_the_preferred_replica_without_waiting_on_a_probe():
    replicas = Replicas(a=6, b=0, c=0)
    held = {"a": {FLOOD: 6}}
    assert confirmed(["a", "b", "c"], {"a": 6, "b": 0, "c": 0}, replicas, LoadBound(), LIGHT_B, held) == "a"
    assert replicas.probes == []
    assert confirmed(["a", "b", "c"], {"a": 6, "b": 0, "c": 0}, replicas, LoadBound(), FLOOD, held) == "b"


def test_past_its_share_everywhere_a_task_still_takes_any_room_within_the_bound():
    # three tasks on each replica: the flood's part is 2 of 4 and it holds 3 everywhere, yet the
    # replicas have room: work-conserving, the first in its order within the total bound
    held = {r: {FLOOD: 3} for r in "abc"}
    assert choose_replica(["a", "b", "c"], {"a": 3, "b": 3, "c": 3}, LoadBound(), FLOOD, held) == "a"


def test_below_min_queue_the_preferred_replica_takes_any_of_its_tasks_requests():
    bound = LoadBound()  # min_queue 4
    # "hot" holds 2 of the 3 queued, past its equal part (2 of capacity 4), yet the queue is short
    assert choose_replica(["a", "b"], {"a": 3, "b": 0}, bound, "hot", {"a": {"hot": 2, "u": 1}}) == "a"
    # past min_queue the part counts: capacity 8, "hot" holds 4 of a's 5 (its part: 4), so its next
    # request goes on to b, which the total bound alone would not have asked of it
    queues, held = {"a": 5, "b": 4}, {"a": {"hot": 4, "u": 1}}
    assert choose_replica(["a", "b"], queues, bound, "hot", held) == "b"
    assert choose_replica(["a", "b"], queues, bound, "u", held) == "a"
    assert choose_replica(["a", "b"], queues, bound) == "a"


def closed_loop(clients: dict[str, int], per_task: bool, ticks: int = 300) -> tuple[Counter, int]:
    """Each task keeps `clients[task]` requests in flight (a client sends again when its request is
    done); replicas a, b, c each finish 2 queued requests per tick, in order. Returns the requests
    taken per (task, replica) and the longest queue seen. With `per_task` the router knows its
    in-flight requests per replica and task (exact here), as TaskAffinityRouter does."""
    names = {r: r for r in "abc"}
    queues = {r: deque() for r in names}
    taken, longest = Counter(), 0
    ready = [t for t, n in clients.items() for _ in range(n)]
    for _ in range(ticks):
        for task in ready:
            held = {r: Counter(q) for r, q in queues.items()} if per_task else None
            chosen = choose_replica(rank_replicas(task, names), {r: len(q) for r, q in queues.items()},
                                    LoadBound(), task if per_task else "", held)
            queues[chosen].append(task)
            taken[task, chosen] += 1
        longest = max(longest, *map(len, queues.values()))
        ready = [q.popleft() for q in queues.values() for _ in range(min(2, len(q)))]
    return taken, longest


@pytest.mark.parametrize("flood_clients", [3, 6, 12, 30])
def test_under_a_flood_the_light_tasks_stay_and_the_flood_spreads(flood_clients):
    clients = {FLOOD: flood_clients, LIGHT_B: 1, LIGHT_C: 1}
    taken, _ = closed_loop(clients, per_task=True)
    for light in (LIGHT_B, LIGHT_C):
        assert taken[light, "b"] == taken[light, "c"] == 0 and taken[light, "a"] > 0
    assert taken[FLOOD, "b"] > 0  # the flood is the one that spills
    if flood_clients >= 12:  # more than two replicas' worth: it reaches the third too
        assert taken[FLOOD, "c"] > 0
    # the total bound alone: the light tasks are the ones that spill (half to all of their requests)
    taken, _ = closed_loop(clients, per_task=False)
    light = sum(taken[t, r] for t in (LIGHT_B, LIGHT_C) for r in "abc")
    assert light - taken[LIGHT_B, "a"] - taken[LIGHT_C, "a"] > 0.4 * light


def test_a_lone_flood_uses_every_replica():
    taken, longest = closed_loop({FLOOD: 30}, per_task=True)
    total = sum(taken.values())
    assert all(taken[FLOOD, r] >= 0.25 * total for r in "abc")
    assert longest <= 11  # 30 in flight over 3 replicas, about even
    # the total bound alone lets two replicas hold it all (1.5 x 30/3 each) while the third idles
    taken, longest = closed_loop({FLOOD: 30}, per_task=False)
    assert taken[FLOOD, "c"] == 0 and longest >= 15


def test_in_flight_counts_go_up_and_down_and_never_below_zero():
    counts = InFlight()
    counts.start("r1", "req-1", "t")
    counts.start("r1", "req-1", "t")  # two calls of one HTTP request share its id (and its task)
    counts.start("r1", "req-2", "u")
    assert counts.on("r1") == {"t": 2, "u": 1} and counts.on("r2") == {}
    counts.finish("r1", "req-1")
    counts.finish("r1", "req-2")
    counts.finish("r1", "req-2")  # completed twice, or a call without a task: ignored
    counts.finish("r2", "req-1")  # another replica's completion of the same id
    assert counts.on("r1") == {"t": 1}
    counts.finish("r1", "req-1")
    assert counts.on("r1") == {} and counts._held == {} and counts._tasks == {}  # nothing kept per past request


def test_an_empty_queue_clears_a_replicas_counts():
    counts = InFlight()
    counts.start("r1", "req-1", "t")  # e.g. its caller was cancelled before it was sent: never completed
    counts.start("r2", "req-2", "t")
    counts.clear("r1")
    assert counts.on("r1") == {} and counts.on("r2") == {"t": 1}
    counts.finish("r1", "req-1")  # a late completion stays harmless
    assert counts.on("r2") == {"t": 1}


@pytest.mark.parametrize("count", [0, -1, 1.5, True])
def test_equal_part_and_spread_limit_reject_a_bad_count(count):
    with pytest.raises(ValueError, match="tasks must be an integer"):
        equal_part(4, count)
    with pytest.raises(ValueError, match="replicas must be an integer"):
        LoadBound().spread_limit(3, count)


@pytest.mark.parametrize("kwargs, message", [({"load_factor": 0.9}, "load_factor"), ({"load_factor": True}, "load_factor"),
                                             ({"min_queue": 0}, "min_queue"), ({"min_queue": 1.5}, "min_queue")])
def test_load_bound_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoadBound(**kwargs)


def test_routing_setting_defaults_to_affinity_with_several_replicas():
    assert effective_routing(None, 1) == "random"
    assert effective_routing(None, 2) == "affinity"
    assert effective_routing("random", 4) == "random"
    assert effective_routing("affinity", 1) == "affinity"
    assert request_router_config("random") is None
    assert request_router_config("affinity")["request_router_class"] == "serving.routing.router:TaskAffinityRouter"
    assert "request_router_kwargs" not in request_router_config("affinity")  # the router's own defaults
    assert request_router_config("affinity", 2.0, 3)["request_router_kwargs"] == {"load_factor": 2.0, "min_queue": 3}
    with pytest.raises(ValueError, match="routing must be one of"):
        request_router_config("round-robin")


def test_routed_counts_render_per_model_replica_and_choice():
    from prometheus_client import generate_latest

    from serving.metrics.ingress import IngressMetrics
    from serving.routing.stats import RoutingCounts

    counts = RoutingCounts()
    for replica, spilled in (("r1", False), ("r1", False), ("r2", True), ("r2", False)):
        counts.count(replica, spilled)
    text = generate_latest(IngressMetrics(routing_counts=counts).registry).decode()
    assert 'lamp_routed_requests_total{choice="preferred",model_replica="r1"} 2.0' in text
    assert 'lamp_routed_requests_total{choice="spilled",model_replica="r2"} 1.0' in text
    assert 'lamp_routed_requests_total{choice="preferred",model_replica="r2"} 1.0' in text
