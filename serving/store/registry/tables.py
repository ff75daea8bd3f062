"""The registry's SQL schema (SQLAlchemy Core; the same tables on SQLite and PostgreSQL).

One row per task ever registered: its current version (NULL once deleted, so the row keeps the
task's version counter and its change sequence number), what the file holds (all a replica needs to
register it: kind, lengths, pool, hidden size, factor bytes, header metadata), and `seq`, the change
number of the row's last visible change. One state row holds the last change number handed out and
the number of current tasks, so a write, a count and "anything new?" are each O(1).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table, Text

# 2: hidden_size, host_bytes, metadata (a replica registers a version from its row alone); weight,
#    max_waiting (a task's limits, set through the admin API)
SCHEMA_VERSION = 2
STATE_ROW = 1

metadata = MetaData()

# Task ids sort byte-wise on both databases (PostgreSQL's default collation follows the locale), so a
# page cursor means the same thing everywhere.
TaskId = String(64).with_variant(String(64, collation="C"), "postgresql")

adapters = Table(
    "lamp_adapters", metadata,
    Column("task_id", TaskId, primary_key=True),
    Column("version", Integer, nullable=True),  # the current version; NULL: not served (deleted)
    Column("last_version", Integer, nullable=False),  # the last version number handed out
    Column("kind", String(32)),
    Column("prompt_tokens", Integer),
    Column("pooled_tokens", Integer),
    Column("pool", Integer, nullable=True),
    # What a replica registers the version by without reading its file (NULL in rows of schema 1):
    Column("hidden_size", Integer, nullable=True),
    Column("host_bytes", BigInteger, nullable=True),
    Column("metadata", Text, nullable=True),  # the file's safetensors header metadata, JSON
    # The task's fair-queue limits (engine/fair_queue.py TaskLimits; NULL: the defaults), kept
    # across new versions, cleared when the task is deleted:
    Column("weight", Float, nullable=True),
    Column("max_waiting", Integer, nullable=True),
    Column("bytes", BigInteger),
    Column("sha256", String(64)),
    Column("created_at", Float),
    Column("source", String(300)),
    Column("bundled_sha", String(64), nullable=True),  # sha256 of the bundled source last imported
    Column("seq", BigInteger, nullable=False, default=0),
    Index("lamp_adapters_seq", "seq"),
)

state = Table(
    "lamp_registry_state", metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("current", BigInteger, nullable=False),  # tasks with a current version
    Column("schema_version", Integer, nullable=False),
    Column("imported_index", String(200), nullable=True),  # the index.json imported, if any
)

# Columns later schema versions added, in order: a database of an older version gets them (database.py).
ADDED_COLUMNS = ("hidden_size", "host_bytes", "metadata", "weight", "max_waiting")
