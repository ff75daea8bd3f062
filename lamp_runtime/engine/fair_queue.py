"""`FairQueue`: the waiting queue of a step core, fair between tasks (one per engine, any core).

Which waiting request enters the batch next is chosen by a virtual token counter (VTC; Sheng et
al., "Fairness in Serving Large Language Models", OSDI 2024): every task has a counter that grows
by the tokens it was served (prompt tokens when admitted, one per generated token), divided by the
task's weight. The next request is the oldest of the waiting task with the lowest counter. A task
that starts waiting is lifted to the lowest counter of the tasks already waiting (or, when none
waits, to the counter of the last task that stopped waiting), so time spent idle banks no credit.
The queue is work-conserving: it never holds a request back while there is room in the batch.

How much of the queue one task may hold (the admission rule):
- `capacity` (EngineConfig.max_waiting) is what all tasks together fill: a task alone may fill
  it all.
- A task's share is capacity x its weight / the weights of the tasks waiting (itself included).
  A task beyond its share is refused (`TaskQueueFullError`, HTTP 429) once the queue holds
  `capacity` rows, while a task within its share still gets in: up to `capacity + reserve` rows,
  the room kept for tasks that arrive while another floods (reserve = capacity / 4, at least 1).
- Past `capacity + reserve` rows every request is refused (`QueueFullError`, HTTP 503).
- A task with its own `max_waiting` (TaskLimits, set through the admin API) is refused (429)
  beyond it at any time, even while the queue has room.
With `fair=False` it is the first-come first-served queue of before: one global bound at
`capacity`, admission in arrival order.

A request's n samples wait as one item of `width` rows and are admitted together. Thread-safe.

Fair rows (`preempt=True`, EngineConfig.fair_preemption): a full batch of one task's long answers
would still make a light task's request wait for a row to free. `admit` therefore takes first the
waiting tasks that hold no row or stay within their share of the batch rows (max_batch_size x
weight / the weights of the tasks running or waiting), and when such a task's next request finds
no free row it names rows of the task most over its share for the core to pause: the core keeps
their keys/values and gives them back with `requeue`; they wait at the head of their task's
queue (outside the queue's bound, charged nothing more) and resume, answers unchanged, when
their task's turn comes. A lone task is never paused (work-conserving), a task keeps at least one
row, and at most `max_paused` rows wait paused (their KV is held).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..errors import QueueFullError, TaskQueueFullError

T = TypeVar("T")

REFUSED_QUEUE_FULL = "queue_full"  # the whole queue, capacity + reserve, is full (503)
REFUSED_TASK_SHARE = "task_share"  # the task holds more than its share of a full queue (429)
REFUSED_TASK_LIMIT = "task_limit"  # the task holds its own max_waiting (429)

# Bounds of what an operator may set per task (TaskLimits).
MAX_TASK_WEIGHT = 1000.0
MAX_TASK_WAITING = 100_000


def reserve_rows(capacity: int) -> int:
    """Rows beyond `capacity` kept for tasks within their share."""
    return max(1, capacity // 4)


def task_key(task_id: str | None) -> str:
    """The queue's key for a request's task (None: no soft prompt)."""
    return "(none)" if task_id is None else task_id


def queue_limit(config) -> int:
    """The most rows an engine's waiting queue holds under `config` (an EngineConfig)."""
    capacity = config.max_waiting
    return capacity + reserve_rows(capacity) if config.fair_scheduling else capacity


def for_config(config, can_pause: bool = False) -> "FairQueue":
    """The waiting queue an EngineConfig asks for; `can_pause`: the core can pause running rows."""
    return FairQueue(config.max_waiting, fair=config.fair_scheduling,
                     preempt=config.fair_scheduling and config.fair_preemption and can_pause,
                     max_paused=config.max_batch_size)


@dataclass(frozen=True)
class TaskLimits:
    """A task's weight (its share of service and of a full queue, relative to the default 1) and
    the most requests it may have waiting at any time (None: only its share bounds it)."""

    weight: float = 1.0
    max_waiting: int | None = None

    def __post_init__(self):
        weight, waiting = self.weight, self.max_waiting
        if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight)
                or not 0 < weight <= MAX_TASK_WEIGHT):
            raise ValueError(f"weight must be a number in (0, {MAX_TASK_WEIGHT:g}], got {weight!r}")
        if waiting is not None and (isinstance(waiting, bool) or not isinstance(waiting, int)
                                    or not 1 <= waiting <= MAX_TASK_WAITING):
            raise ValueError(f"max_waiting must be an integer in 1..{MAX_TASK_WAITING}, got {waiting!r}")


@dataclass(frozen=True)
class TaskQueueStats:
    """One task's part of a queue: now (waiting rows) and since the engine started (the rest)."""

    waiting: int = 0
    admitted: int = 0  # requests that entered the batch
    refused: dict[str, int] = field(default_factory=dict)  # reason -> requests refused at submission
    prompt_tokens: int = 0  # served: prefilled
    generated_tokens: int = 0  # served: sampled
    counter: float = 0.0  # the virtual token counter
    paused: int = 0  # running rows paused to let another task in (fair rows)


@dataclass
class _Task:
    items: deque = field(default_factory=deque)  # (seq, item, width, paused)
    rows: int = 0
    counter: float = 0.0
    weight: float = 1.0
    max_waiting: int | None = None
    admitted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    paused: int = 0

    def snapshot(self) -> TaskQueueStats:
        return TaskQueueStats(self.rows, self.admitted, dict(self.refused), self.prompt_tokens,
                              self.generated_tokens, self.counter, self.paused)


class FairQueue(Generic[T]):
    def __init__(self, capacity: int, fair: bool = True, preempt: bool = False, max_paused: int = 16):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if preempt and not fair:
            raise ValueError("preempt needs fair=True")
        self.capacity = capacity
        self.fair = fair
        self.preempt = preempt
        self.max_paused = max_paused
        self._paused = 0  # paused rows waiting to resume (not in _rows: the queue's bound is for newcomers)
        self.limit = capacity + reserve_rows(capacity) if fair else capacity  # rows, never more (queue_limit)
        self._tasks: dict[str, _Task] = {}
        self._active: set[str] = set()  # tasks with waiting items
        self._rows = 0
        self._floor = 0.0  # the counter of the last task that stopped waiting
        self._seq = itertools.count()
        self._lock = threading.RLock()

    # ---- any thread ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._rows

    @property
    def paused(self) -> int:
        """Paused rows waiting to resume."""
        return self._paused

    def empty(self) -> bool:
        """Nothing waits: no newcomer, no paused row."""
        return self._rows == 0 and self._paused == 0

    def set_limits(self, task_id: str, limits: TaskLimits) -> None:
        """A task's weight and queue limit (the operator's, through the admin API); requests
        already waiting stay."""
        with self._lock:
            task = self._task(task_id)
            task.weight, task.max_waiting = float(limits.weight), limits.max_waiting

    def push(self, task_id: str, item: T, width: int = 1) -> None:
        """Queue `item` (a request taking `width` batch rows) or raise QueueFullError /
        TaskQueueFullError, counting the refusal."""
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        with self._lock:
            task = self._task(task_id)
            refusal = self._refusal(task_id, task, width)
            if refusal is not None:
                reason, error = refusal
                task.refused[reason] = task.refused.get(reason, 0) + 1
                raise error
            if task_id not in self._active:
                self._activate(task_id, task)
            task.items.append((next(self._seq), item, width, False))
            task.rows += width
            self._rows += width

    def requeue(self, task_id: str, item: T) -> None:
        """Give back a row the core paused (one of `admit`'s victims): it waits at the head of its
        task's queue, ahead of the task's newcomers, and is charged nothing when it resumes."""
        with self._lock:
            task = self._task(task_id)
            if task_id not in self._active:
                self._activate(task_id, task)
            head = task.items[0][0] if task.items else next(self._seq)
            task.items.appendleft((head - 1, item, 1, True))
            task.paused += 1
            self._paused += 1

    def charge(self, task_id: str, generated: int = 0) -> None:
        """Count tokens a task was served after its admission (one per sampled token)."""
        with self._lock:
            task = self._task(task_id)
            task.generated_tokens += generated
            task.counter += generated / task.weight

    def stats(self) -> dict[str, TaskQueueStats]:
        with self._lock:
            return {task_id: task.snapshot() for task_id, task in self._tasks.items()}

    # ---- the step core -------------------------------------------------------------------------

    def pop_fitting(self, room: int, prompt_tokens: Callable[[T], int] = lambda item: 0,
                    fits: Callable[[T], bool] = lambda item: True) -> list[T]:
        """Take requests in turn while the next one's width fits in `room` rows and `fits(item)`
        (another resource the core reserves, e.g. KV cells; called once per item taken, last);
        each is charged its `prompt_tokens(item)` at once, so the next choice already sees it. The
        next request is never skipped for a smaller one behind it (a large request would starve)."""
        taken = []
        with self._lock:
            while self._active:
                task_id = self._next_task()
                width = self._tasks[task_id].items[0][2]
                if width > room or not fits(self._tasks[task_id].items[0][1]):
                    break
                room -= width
                taken.append(self._take(task_id, prompt_tokens))
        return taken

    def admit(self, running: Sequence[str], room: int, prompt_tokens: Callable[[T], int] = lambda item: 0,
              fits: Callable[[T], bool] = lambda item: True) -> tuple[list[int], list[T]]:
        """What enters the batch at this step: (indices into `running`, the task keys of the
        running rows, of the rows to pause, the requests taken). Without `preempt` it is
        `pop_fitting(room)` and pauses nothing. With it, the waiting tasks that hold no row or
        stay within their share of the rows (len(running) + room) go first, in counter order, and
        when one's next request needs more rows than are free, the last rows in `running` of the
        task most over its share are named to pause. The rest of the room is then filled by
        `pop_fitting`. The core pauses the named rows before it runs the step and gives each
        back with `requeue` after this call."""
        if not self.preempt:
            return [], self.pop_fitting(room, prompt_tokens, fits)
        victims, taken = [], []
        with self._lock:
            rows = Counter(running)
            slots = len(running) + room
            chosen: set[int] = set()
            while True:
                shares = self._row_shares(rows, slots)
                below = [t for t in self._active
                         if rows[t] == 0 or rows[t] + self._tasks[t].items[0][2] <= shares[t]]
                if not below:
                    break
                task_id = min(below, key=self._order)
                _, item, width, _ = self._tasks[task_id].items[0]
                pause = self._victims(running, rows, shares, task_id, width - room, chosen)
                if pause is None or not fits(item):
                    break
                for i in pause:
                    chosen.add(i)
                    rows[running[i]] -= 1
                victims += pause
                room += len(pause) - width
                rows[task_id] += width
                taken.append(self._take(task_id, prompt_tokens))
            taken += self.pop_fitting(room, prompt_tokens, fits)
        return victims, taken

    def _row_shares(self, rows: Counter, slots: int) -> dict[str, float]:
        """Each task with demand (running rows or waiting requests): its share of `slots` rows."""
        weights = {t: self._tasks[t].weight if t in self._tasks else 1.0
                   for t in set(self._active) | {t for t, n in rows.items() if n > 0}}
        total = sum(weights.values())
        return Counter({t: slots * w / total for t, w in weights.items()})

    def _victims(self, running: Sequence[str], rows: Counter, shares: dict, task_id: str, need: int,
                 chosen: set[int]) -> list[int] | None:
        """`need` rows to pause for `task_id`, each from the task then most over its share, the
        last of its rows in `running`; None when there are not enough, or when more rows would
        wait paused than `max_paused`. A task keeps at least one row. Nothing swaps back and
        forth: a task takes rows only while it holds none or stays within its share, and gives
        them only while it holds more than its share and more than one."""
        if need <= 0:
            return []
        if self._paused + len(chosen) + need > self.max_paused:
            return None
        rows, pause = Counter(rows), []
        for _ in range(need):
            over = [t for t, n in rows.items() if t != task_id and n > max(shares[t], 1)]
            if not over:
                return None
            victim = max(over, key=lambda t: rows[t] - shares[t])
            index = next(i for i in range(len(running) - 1, -1, -1)
                         if running[i] == victim and i not in chosen and i not in pause)
            pause.append(index)
            rows[victim] -= 1
        return pause

    def _take(self, task_id: str, prompt_tokens: Callable[[T], int]) -> T:
        """Pop a task's head; a newcomer is charged its prompt tokens, a paused row nothing."""
        task = self._tasks[task_id]
        _, item, width, paused = task.items.popleft()
        if paused:
            self._paused -= 1
        else:
            task.rows -= width
            self._rows -= width
            task.admitted += 1
            tokens = prompt_tokens(item)
            task.prompt_tokens += tokens
            task.counter += tokens / task.weight
        if not task.items:
            self._active.discard(task_id)
            self._floor = max(self._floor, task.counter)
        return item

    def remove(self, drop: Callable[[T], bool]) -> list[T]:
        """Take out the waiting items for which `drop` is true (aborted requests), in arrival order."""
        removed = []
        with self._lock:
            for task_id in list(self._active):
                task = self._tasks[task_id]
                kept = deque()
                for entry in task.items:
                    if drop(entry[1]):
                        removed.append(entry)
                        if entry[3]:
                            self._paused -= 1
                        else:
                            task.rows -= entry[2]
                            self._rows -= entry[2]
                    else:
                        kept.append(entry)
                task.items = kept
                if not kept:
                    self._active.discard(task_id)
        return [entry[1] for entry in sorted(removed, key=lambda e: e[0])]

    def items(self) -> Iterable[T]:
        with self._lock:
            return [entry[1] for task_id in self._active for entry in self._tasks[task_id].items]

    # ---- inside ------------------------------------------------------------------------------

    def _task(self, task_id: str) -> _Task:
        task = self._tasks.get(task_id)
        if task is None:
            task = self._tasks[task_id] = _Task()
        return task

    def _activate(self, task_id: str, task: _Task) -> None:
        lift = min((self._tasks[t].counter for t in self._active), default=self._floor)
        task.counter = max(task.counter, lift)
        self._active.add(task_id)

    def _order(self, task_id: str) -> tuple:
        """Fair order: lowest counter; ties: the oldest head."""
        task = self._tasks[task_id]
        return task.counter, task.items[0][0]

    def _next_task(self) -> str:
        if self.fair:
            return min(self._active, key=self._order)
        return min(self._active, key=lambda t: self._tasks[t].items[0][0])

    def share(self, task_id: str) -> float:
        """Rows of a full queue the task may hold now (its weight over the waiting tasks')."""
        with self._lock:
            weights = {t: self._tasks[t].weight for t in self._active | {task_id} if t in self._tasks}
            weights.setdefault(task_id, 1.0)
            return self.capacity * weights[task_id] / sum(weights.values())

    def _refusal(self, task_id: str, task: _Task, width: int):
        if task.max_waiting is not None and task.rows + width > task.max_waiting:
            return REFUSED_TASK_LIMIT, TaskQueueFullError(
                task_id, f"task {task_id!r} already has {task.rows} requests waiting (its limit "
                         f"max_waiting={task.max_waiting})")
        total = self._rows + width
        if total > self.limit:
            return REFUSED_QUEUE_FULL, QueueFullError(f"{self._rows} requests already waiting (limit {self.limit})")
        if total <= self.capacity or not self.fair:
            return None
        share = self.share(task_id)
        if task.rows + width <= max(share, 1):
            return None
        return REFUSED_TASK_SHARE, TaskQueueFullError(
            task_id, f"task {task_id!r} already has {task.rows} of the {self._rows} requests waiting (limit "
                     f"{max(share, 1):.0f} for one task of {len(self._active | {task_id})} while the queue is full)")
