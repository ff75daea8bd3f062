"""Cursor pages for the list routes (GET /admin/adapters, /v1/models), OpenAI-style.

`?limit=N&after=<task id>`: up to N entries whose id sorts after `after` (byte order), with
`has_more`, `first_id` / `last_id` (pass `last_id` as the next `after`) and `total`, the number of
tasks in all. A registry store answers from its primary-key index and a kept count, so a page
costs O(limit), not O(tasks).
"""

from __future__ import annotations

from fastapi import Query

from .errors import ServingError

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000


def page_query(limit: int | None = Query(None, description=f"entries per page (1-{MAX_LIMIT}, default "
                                                          f"{DEFAULT_LIMIT})"),
               after: str | None = Query(None, max_length=200, description="list entries after this task id")
               ) -> tuple[int, str | None]:
    """The (limit, after) of a list request; a limit out of range is a 422 naming the range."""
    if limit is None:
        limit = DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise ServingError(422, f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    return limit, after or None
