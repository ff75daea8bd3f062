"""10,000 tasks in the registry store (SQLite and PostgreSQL): a put, a sync and a page run the same
SQL statements (their full text, parameters aside) at 10 tasks as at 10,000, and at 10,000 each of
them reads its rows through a primary key or an index, never a scan of the adapters table (the
database's own query plan says so): O(1) and O(changes), checked rather than timed. A replica
loads them all once.

Set-up writes the 10,000 adapters with one `put_many` (one commit; tiny hidden size), ~10 s here.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from sqlalchemy import event

from lamp_runtime.adapters import AdapterLimits, AdapterMeta, SoftPromptAdapter, save_adapter
from lamp_runtime.adapters.registry import AdapterRegistry
from lamp_runtime.prompts.cache import PromptCache
from serving.store.registry import open_store
from serving.store.base import NewAdapter
from serving.store.files import facts_of, store_adapter
from serving.store.sync import StoreSync

HIDDEN = 16
TASKS = 10_000
LIMITS = AdapterLimits()


@contextmanager
def counted_statements(store):
    """The SQL statements (whitespace-normalised text, parameters) the store's engine runs inside the block."""
    seen = []

    def count(conn, cursor, statement, parameters, context, executemany):
        seen.append((" ".join(statement.split()), parameters))

    event.listen(store.db.engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(store.db.engine, "before_cursor_execute", count)


def query_plan(store, statement: str, parameters) -> list[str]:
    """The database's plan for `statement` with these parameters, one line per step."""
    sqlite = store.db.engine.dialect.name == "sqlite"
    with store.db.engine.connect() as conn:
        if not sqlite:
            conn.exec_driver_sql("ANALYZE lamp_adapters")  # plans from the table's real size
        rows = conn.exec_driver_sql(("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + statement, parameters)
        plan = [str(row[-1] if sqlite else row[0]) for row in rows]
        conn.rollback()
    return plan


def assert_indexed(store, statement: str, parameters) -> None:
    """A statement that reads table rows finds them through a key or an index: no full scan of
    lamp_adapters (SQLite: `SCAN lamp_adapters`; PostgreSQL: `Seq Scan on lamp_adapters`)."""
    if statement.split()[0].upper() not in ("SELECT", "UPDATE", "DELETE"):
        return
    plan = query_plan(store, statement, parameters)
    scans = [line for line in plan if line.startswith("SCAN lamp_adapters") or "Seq Scan on lamp_adapters" in line]
    assert not scans, f"{statement[:120]}... scans the adapters table: {plan}"


def fill(store, tmp_path, start: int, stop: int) -> None:
    adapter = SoftPromptAdapter(AdapterMeta(), torch.randn(2, HIDDEN))
    data = save_adapter(adapter, tmp_path / "src.safetensors").read_bytes()
    facts = facts_of(adapter, HIDDEN)
    outcomes = store.put_many([NewAdapter(f"task-{i:05d}", lambda p: p.write_bytes(data), facts)
                               for i in range(start, stop)])
    assert not [o for o in outcomes if isinstance(o, Exception)]


def one_put_sync_and_page(store, sync, task_id: str) -> tuple[list[str], list[str], list[str], int]:
    adapter = SoftPromptAdapter(AdapterMeta(), torch.randn(3, HIDDEN))
    with counted_statements(store) as put_sql:
        store_adapter(store, task_id, adapter, HIDDEN, LIMITS)
    with counted_statements(store) as sync_sql:
        report = sync.refresh_if_changed()
    assert report.loaded == [f"{task_id} v2"]
    with counted_statements(store) as page_sql:
        page = store.page(3, after="task-00004")
    assert [a.task_id for a in page.adapters] == ["task-00005", "task-00006", "task-00007"] and page.has_more
    return put_sql, sync_sql, page_sql, page.total


def test_ten_thousand_tasks_cost_what_ten_do(tmp_path, registry_url):
    store = open_store(tmp_path / "files", registry_url)
    fill(store, tmp_path, 0, 10)
    sync = StoreSync(store, AdapterRegistry(), PromptCache(1 << 20), HIDDEN, LIMITS)
    assert len(sync.refresh().loaded) == 10
    small = one_put_sync_and_page(store, sync, "task-00003")

    began = time.perf_counter()
    fill(store, tmp_path, 10, TASKS)
    fill_s = time.perf_counter() - began
    began = time.perf_counter()
    fresh = StoreSync(store, AdapterRegistry(), PromptCache(1 << 20), HIDDEN, LIMITS)
    assert len(fresh.refresh().loaded) == TASKS  # a starting replica reads the rows once
    start_s = time.perf_counter() - began
    sync.refresh()  # the running replica catches up with the 9,990 new tasks
    large = one_put_sync_and_page(store, sync, "task-09999")
    print(f"\n{TASKS} tasks ({registry_url.split(':')[0]}): put_many {fill_s:.1f} s, "
          f"a replica's first sync {start_s:.1f} s")

    for few, many in zip(small[:3], large[:3]):  # the same statements for one put, one sync, one page
        assert [text for text, _ in many] == [text for text, _ in few]
    for statements in large[:3]:
        for text, parameters in statements:
            assert_indexed(store, text, parameters)
    assert (small[3], large[3]) == (10, TASKS)
    pages, after = 0, None
    while True:
        page = store.page(1000, after)
        pages += 1
        if not page.has_more:
            break
        after = page.last_id
    assert pages == TASKS // 1000 and page.total == TASKS
