"""The fair waiting queue (lamp_runtime/engine/fair_queue.py): VTC order, per-task share, reserve."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lamp_runtime.engine.base import EngineConfig
from lamp_runtime.engine.fair_queue import (
    REFUSED_QUEUE_FULL,
    REFUSED_TASK_LIMIT,
    REFUSED_TASK_SHARE,
    FairQueue,
    TaskLimits,
    queue_limit,
    reserve_rows,
)
from lamp_runtime.errors import QueueFullError, TaskQueueFullError


def drain(queue, room=1, cost=lambda item: 0):
    out = []
    while len(queue):
        taken = queue.pop_fitting(room, cost)
        assert taken, "a request that fits must be taken"
        out += taken
    return out


def test_light_task_overtakes_a_flood():
    q = FairQueue(capacity=100)
    for i in range(20):
        q.push("heavy", ("heavy", i))
    q.pop_fitting(4, lambda item: 50)  # the heavy task was served 4 x 50 tokens
    q.push("light", ("light", 0))
    # lifted to the heavy task's counter, not above it: the oldest head wins the tie, then light
    assert q.pop_fitting(1, lambda item: 50) == [("heavy", 4)]
    assert q.pop_fitting(1, lambda item: 50) == [("light", 0)]


def test_fcfs_when_off():
    q = FairQueue(capacity=100, fair=False)
    for i in range(5):
        q.push("heavy", ("heavy", i))
    q.push("light", ("light", 0))
    assert drain(q, cost=lambda item: 100)[-1] == ("light", 0)


def test_generated_tokens_count_and_weights():
    q = FairQueue(capacity=100)
    q.set_limits("b", TaskLimits(weight=2.0))
    for i in range(6):
        q.push("a", ("a", i))
        q.push("b", ("b", i))
    order = []
    for _ in range(9):
        (item,) = q.pop_fitting(1)
        order.append(item[0])
        q.charge(item[0], generated=10)  # each request generates 10 tokens
    # b has twice a's weight: twice the requests served
    assert order.count("b") == 6 and order.count("a") == 3
    stats = q.stats()
    assert stats["a"].generated_tokens == 30 and stats["a"].admitted == 3 and stats["b"].waiting == 0


def test_idle_time_banks_no_credit():
    q = FairQueue(capacity=100)
    q.push("a", "a0")
    q.pop_fitting(1, lambda item: 1000)  # a served 1000, queue empty
    q.push("b", "b0")  # b was idle all along: lifted to the floor a left at
    q.push("a", "a1")
    q.pop_fitting(1, lambda item: 10)
    assert q.stats()["b"].counter >= 1000


def test_samples_stay_together_and_wide_heads_are_not_skipped():
    q = FairQueue(capacity=100)
    q.push("a", "wide", width=3)
    q.push("b", "narrow", width=1)
    assert q.pop_fitting(2) == []  # the wide head does not fit; the narrow one does not jump it
    assert q.pop_fitting(4) == ["wide", "narrow"]


def test_a_task_alone_fills_the_queue_then_others_still_get_in():
    q = FairQueue(capacity=8)
    for i in range(8):
        q.push("heavy", i)  # alone: the whole queue
    with pytest.raises(TaskQueueFullError) as refused:
        q.push("heavy", 8)
    assert refused.value.task_id == "heavy"
    q.push("light", "l0")  # within its share: into the reserve
    q.push("other", "o0")
    assert len(q) == 10 == q.limit
    with pytest.raises(QueueFullError):
        q.push("third", "t0")
    stats = q.stats()
    assert stats["heavy"].refused == {REFUSED_TASK_SHARE: 1}
    assert stats["third"].refused == {REFUSED_QUEUE_FULL: 1}
    assert reserve_rows(8) == 2 and queue_limit(EngineConfig(max_waiting=8)) == 10
    assert queue_limit(EngineConfig(max_waiting=8, fair_scheduling=False)) == 8


@pytest.mark.parametrize("fair", [True, False])
def test_a_task_limit_refuses_beyond_it_while_the_queue_has_room(fair):
    q = FairQueue(capacity=100, fair=fair)
    q.set_limits("capped", TaskLimits(max_waiting=3))
    for i in range(3):
        q.push("capped", i)
    with pytest.raises(TaskQueueFullError, match=r"task 'capped' already has 3 requests waiting .*max_waiting=3"):
        q.push("capped", 3)
    q.push("other", 0)  # the limit is the task's own
    assert q.stats()["capped"].refused == {REFUSED_TASK_LIMIT: 1}
    q.pop_fitting(1)
    q.push("capped", 4)  # room under its limit again once one entered the batch
    q.set_limits("capped", TaskLimits())  # back to the default: only its share bounds it
    q.push("capped", 5)


def test_off_refuses_at_capacity_for_everyone():
    q = FairQueue(capacity=4, fair=False)
    for i in range(4):
        q.push("heavy", i)
    with pytest.raises(QueueFullError) as refused:
        q.push("light", "l0")
    assert not isinstance(refused.value, TaskQueueFullError)


def test_remove_keeps_order_and_counts():
    q = FairQueue(capacity=10)
    for i in range(4):
        q.push("a" if i % 2 else "b", i, width=2)
    assert q.remove(lambda item: item in (1, 2)) == [1, 2]
    assert len(q) == 4 and sorted(drain(q, room=2)) == [0, 3]


def test_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        FairQueue(0)
    for bad, message in [({"weight": 0}, r"weight must be a number in \(0, 1000\], got 0"),
                         ({"weight": float("nan")}, "got nan"), ({"weight": 1001}, "got 1001"),
                         ({"weight": True}, "got True"), ({"max_waiting": 0}, r"max_waiting .* 1..100000, got 0"),
                         ({"max_waiting": 2.5}, "got 2.5"), ({"max_waiting": 100_001}, "got 100001")]:
        with pytest.raises(ValueError, match=message):
            TaskLimits(**bad)
    with pytest.raises(ValueError, match="fair_scheduling"):
        EngineConfig(fair_scheduling="yes")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(1, 3), st.integers(0, 200)), max_size=80),
       st.integers(1, 20), st.booleans())
def test_properties(ops, capacity, fair):
    """Never more than the limit; FIFO within a task; everything queued comes out exactly once;
    counters only grow; refusals are counted."""
    q = FairQueue(capacity=capacity, fair=fair)
    pushed, refused, counters = [], 0, {}
    for n, (task, width, tokens) in enumerate(ops):
        try:
            q.push(task, (task, n, tokens), width)
            pushed.append((task, n, tokens))
        except QueueFullError:
            refused += 1
        assert len(q) <= q.limit
        if n % 3 == 0:
            for item in q.pop_fitting(3, lambda item: item[2]):
                pushed.remove(item)
                q.charge(item[0], generated=1)
        for t, s in q.stats().items():
            assert s.counter >= counters.get(t, 0.0)
            counters[t] = s.counter
    rest = drain(q, room=3)
    assert sorted(rest) == sorted(pushed)
    for task in "abcd":
        mine = [item[1] for item in rest if item[0] == task]
        assert mine == sorted(mine)
    assert sum(sum(s.refused.values()) for s in q.stats().values()) == refused


@pytest.mark.parametrize("fair", [True, False])
def test_decoder_engine_admits_a_light_task_ahead_of_a_queued_flood(engine, fair):
    """The real HF step core: a flood of one task queued, then one request of another; with fair
    scheduling the light request is the second to enter the batch, without it the last."""
    from lamp_runtime.hf.decoder import DecoderEngine
    from lamp_runtime.requests import GenerationRequest, SamplingParams

    core = DecoderEngine(engine.backbone, registry=engine.registry,
                         config=EngineConfig(max_batch_size=1, fair_scheduling=fair))
    params = SamplingParams(max_new_tokens=2)
    flood = [GenerationRequest(f"flood {i}", "plain", params) for i in range(4)]
    light = GenerationRequest("light", "lamp2", params)
    order = [r.task_id for r in sorted(core.generate([*flood, light]), key=lambda r: r.queue_ms)]
    assert order.index("lamp2") == (1 if fair else 4)
    stats = core.stats().tasks
    assert stats["plain"].admitted == 4 and stats["lamp2"].admitted == 1
    assert 4 <= stats["plain"].generated_tokens <= 8 and stats["lamp2"].prompt_tokens > 0  # EOS may end one early


# ---- fair rows: pausing a row of the task over its share (admit / requeue) ------------------------


def test_admit_without_preemption_is_pop_fitting():
    q = FairQueue(capacity=100)
    q.push("light", ("light", 0))
    assert q.admit(["heavy"] * 4, room=0) == ([], [])
    assert q.admit(["heavy"] * 3, room=1) == ([], [("light", 0)])


def test_a_light_request_pauses_a_row_of_the_flood_and_the_row_resumes_first():
    q = FairQueue(capacity=100, preempt=True, max_paused=4)
    for i in range(3):
        q.push("heavy", ("heavy", i))
    q.push("light", ("light", 0))
    running = ["heavy", "light2", "heavy", "heavy"]
    # no free row: the light task (0 rows, share 4/3) takes the last row of the heavy task (3 rows)
    victims, taken = q.admit(running, room=0)
    assert (victims, taken) == ([3], [("light", 0)])
    q.requeue("heavy", ("heavy", "paused"))
    assert len(q) == 3 and q.paused == 1 and not q.empty()  # a paused row is outside the queue's bound
    running = ["heavy", "light2", "heavy", "light"]
    assert q.admit(running, room=0) == ([], [])  # the heavy task is at its share: it waits
    # a row frees: the paused row goes before the heavy task's newcomers, charged nothing
    counter = q.stats()["heavy"].counter
    assert q.admit(["heavy", "light2", "heavy"], room=1, prompt_tokens=lambda item: 50) == ([], [("heavy", "paused")])
    assert q.paused == 0 and q.stats()["heavy"].counter == counter and q.stats()["heavy"].admitted == 0


def test_a_lone_task_is_never_paused_and_fills_the_batch():
    q = FairQueue(capacity=100, preempt=True)
    for i in range(6):
        q.push("heavy", ("heavy", i))
    assert q.admit(["heavy"] * 4, room=0) == ([], [])
    assert q.admit(["heavy"] * 2, room=2) == ([], [("heavy", 0), ("heavy", 1)])


def test_no_task_is_paused_below_its_share():
    q = FairQueue(capacity=100, preempt=True)
    q.push("c", ("c", 0))
    # shares of 4 rows over three tasks: 4/3 each; a and b hold 2 each: one row over, a's last goes
    assert q.admit(["a", "b", "a", "b"], room=0) == ([2], [("c", 0)])
    q.push("e", ("e", 0))
    # five tasks for four rows, four holding one each: every task keeps a row, e waits for a free one
    assert q.admit(["a", "b", "c", "d"], room=0) == ([], [])


def test_a_task_holding_no_row_gets_one_even_when_its_share_is_less():
    q = FairQueue(capacity=100, preempt=True)
    for task in ("a", "b", "c", "d"):
        q.push(task, (task, 0))
    # five tasks for four rows (shares 0.8): each light task takes one of the flood's rows, the
    # flood keeps one; then nothing moves (the light tasks hold one row each, the flood one)
    victims, taken = q.admit(["heavy"] * 4, room=0)
    assert sorted(victims) == [1, 2, 3] and taken == [("a", 0), ("b", 0), ("c", 0)]
    for _ in victims:
        q.requeue("heavy", ("heavy", "paused"))
    assert q.admit(["heavy", "a", "b", "c"], room=0) == ([], [])
    assert q.stats()["heavy"].paused == 3 and q.paused == 3


def test_one_row_is_never_swapped():
    q = FairQueue(capacity=100, preempt=True)
    q.push("light", ("light", 0))
    assert q.admit(["heavy"], room=0) == ([], [])


def test_weights_decide_the_shares_of_rows():
    q = FairQueue(capacity=100, preempt=True)
    q.set_limits("light", TaskLimits(weight=3.0))
    for i in range(3):
        q.push("light", ("light", i))
    # light's share is 3 of 4 rows: it takes three rows of the heavy task, which keeps one
    victims, taken = q.admit(["heavy"] * 4, room=0)
    assert sorted(victims) == [1, 2, 3] and taken == [("light", 0), ("light", 1), ("light", 2)]


def test_paused_rows_are_bounded():
    q = FairQueue(capacity=100, preempt=True, max_paused=1)
    q.push("a", ("a", 0))
    q.push("b", ("b", 0))
    victims, taken = q.admit(["heavy"] * 4, room=0)
    assert victims == [3] and taken == [("a", 0)]
    q.requeue("heavy", ("heavy", "paused"))
    assert q.admit(["heavy"] * 3 + ["a"], room=0) == ([], [])  # one paused row already: b waits


def test_an_aborted_paused_row_leaves_the_queue():
    q = FairQueue(capacity=100, preempt=True)
    q.requeue("heavy", ("heavy", "paused"))
    assert q.remove(lambda item: item[1] == "paused") == [("heavy", "paused")]
    assert q.empty() and q.paused == 0


def test_preemption_needs_fair_scheduling_and_follows_the_config():
    with pytest.raises(ValueError):
        FairQueue(capacity=4, fair=False, preempt=True)
    from lamp_runtime.engine.fair_queue import for_config

    assert for_config(EngineConfig(), can_pause=True).preempt
    assert not for_config(EngineConfig(), can_pause=False).preempt
    assert not for_config(EngineConfig(fair_preemption=False), can_pause=True).preempt
    assert not for_config(EngineConfig(fair_scheduling=False), can_pause=True).preempt
    with pytest.raises(ValueError, match="fair_preemption"):
        EngineConfig(fair_preemption="yes")
