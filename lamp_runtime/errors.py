"""Error types users see. Each message names the bad value so the caller can fix it."""


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
