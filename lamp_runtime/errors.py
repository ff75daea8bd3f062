"""Error types users see. Each message names the bad value so the caller can fix it.

Every engine raises these same types, and the serving layer maps each to one HTTP status
(serving/transport.py).
"""


class AdapterError(ValueError):
    """An adapter file, upload or config is invalid. Nothing was loaded or stored."""


class UnknownTaskError(KeyError):
    """A request named a task id that has no registered adapter."""

    def __init__(self, task_id: str):
        super().__init__(task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return f"unknown task id {self.task_id!r}: register an adapter for it first"


class UnservableTaskError(LookupError):
    """The task has an adapter in the store, but this server cannot load it (e.g. it was made for
    another backbone)."""

    def __init__(self, task_id: str, reason: str):
        super().__init__(task_id, reason)
        self.task_id = task_id
        self.reason = reason

    def __str__(self) -> str:
        return f"task {self.task_id!r} is in the adapter store but this server cannot serve it: {self.reason}"


class RequestError(ValueError):
    """A generation request is invalid (bad sampling parameters, input too long, ...)."""


class InputTooLongError(RequestError):
    """The input has more tokens than the engine accepts (HTTP 413: it is about size)."""


class UnsupportedRequestError(RequestError):
    """A valid option this engine or backbone cannot honour (prompt logprobs on vLLM, a chat
    request to a backbone without a chat template): HTTP 400, naming the option."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; try again later (HTTP 503)."""


class TaskQueueFullError(QueueFullError):
    """This task holds more than its share of a full waiting queue while other tasks still get in
    (HTTP 429): the task, not the server, should slow down."""

    def __init__(self, task_id: str, message: str):
        super().__init__(message)
        self.task_id = task_id


class EngineStoppedError(RuntimeError):
    """The engine loop is not running (shutting down, or it failed)."""


def require_at_least(owner, minimum: int, *names: str, prefix: str = "") -> None:
    """Config checks: raise ValueError naming the first of `owner`'s fields `names` below `minimum`
    (a field that is None is optional and skipped)."""
    for name in names:
        value = getattr(owner, name)
        if value is not None and value < minimum:
            raise ValueError(f"{prefix}{name} must be >= {minimum}, got {value}")
