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


class RequestError(ValueError):
    """A generation request is invalid (bad sampling parameters, input too long, ...)."""
