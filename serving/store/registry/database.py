"""The registry database: every task's current version and its change sequence, in SQL.

Writes are serialised on the one state row (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: the row lock
`SELECT ... FOR UPDATE` takes), so change numbers are handed out, and committed, in order: a reader
that has seen change n never later finds a change numbered below n. Each write is a handful of
single-row statements on primary keys, O(1) in the number of tasks; reads take no lock (SQLite in
WAL mode, PostgreSQL MVCC).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from sqlalchemy import bindparam, create_engine, event, func, insert, inspect, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

from ..base import AdapterPage, ChangeSet, StoredAdapter, StoreError
from ..index_json import StoreIndex
from .tables import ADDED_COLUMNS, SCHEMA_VERSION, STATE_ROW, adapters, metadata, state

log = logging.getLogger(__name__)

CREATE_ATTEMPTS = 5
CHUNK = 500  # task ids per IN (...) query: under SQLite's and PostgreSQL's parameter limits
PROGRESS_ABOVE_ROWS = 10 * CHUNK  # an index.json import of more rows shows a progress bar
BUSY_TIMEOUT_MS = 30_000  # how long an SQLite writer waits for another's transaction
RECORD_FIELDS = ("task_id", "version", "kind", "prompt_tokens", "pooled_tokens", "bytes", "sha256", "created_at",
                 "source", "pool", "hidden_size", "host_bytes", "metadata")


def redacted(url: str) -> str:
    """The URL without its password, for logs and errors."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: say so without echoing it
        return "<unparseable registry URL>"


LIMIT_FIELDS = ("weight", "max_waiting")  # the task's, kept across its versions: not written with one


def _stored(row) -> StoredAdapter:
    return StoredAdapter(**{name: getattr(row, name) for name in (*RECORD_FIELDS, *LIMIT_FIELDS)})


def _switch_to_wal(cursor) -> None:
    """WAL mode: readers never block the writer, nor it them. The switch needs the database to
    itself and, while another connection holds it, fails at once with "database is locked" without
    waiting on busy_timeout (seen with six connections opening a fresh file together, ~1 in 100
    tries): so it is retried here, for as long as a writer would wait."""
    import sqlite3

    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    pause = 0.01
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=FULL")  # a commit that returned survives a power cut
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin(connection):
        # A writer takes the write lock when it begins, not at its first write: two writers that
        # both read first would otherwise deadlock on the upgrade (SQLITE_BUSY without waiting).
        write = connection.get_execution_options().get("lamp_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class RegistryDatabase:
    def __init__(self, url: str):
        self.url = url
        self.name = redacted(url)
        try:
            self.engine = _sqlite_engine(url) if url.startswith("sqlite") else create_engine(url, pool_pre_ping=True)
            self.dialect = self.engine.dialect.name
            self._create_schema()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the adapter registry {self.name}: {exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0]}") from None

    def _create_schema(self) -> None:
        """Tables and the state row, once. The ingress and every replica start at the same time:
        the one that loses a race to create them (a duplicate table or row) finds them on retry."""
        for attempt in range(CREATE_ATTEMPTS):
            try:
                # In one write transaction (SQLite: BEGIN IMMEDIATE, waiting its turn): a deferred one that
                # read first could not upgrade to a write while another process creates the tables.
                with self.engine.connect().execution_options(lamp_write=True) as conn, conn.begin():
                    metadata.create_all(conn)
                    # FOR UPDATE: PostgreSQL's writers upgrading an old schema take turns (SQLite's already do)
                    row = conn.execute(select(state).where(state.c.id == STATE_ROW).with_for_update()).first()
                    if row is None:
                        conn.execute(insert(state).values(id=STATE_ROW, seq=0, current=0,
                                                          schema_version=SCHEMA_VERSION))
                    elif row.schema_version > SCHEMA_VERSION:
                        raise StoreError(f"adapter registry {self.name} has schema version {row.schema_version}; "
                                         f"this lamp-serve knows up to {SCHEMA_VERSION}: upgrade lamp-serve")
                    elif row.schema_version < SCHEMA_VERSION:
                        self._upgrade(conn, row.schema_version)
                return
            except (IntegrityError, ProgrammingError):
                if attempt == CREATE_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _upgrade(self, conn: Connection, version: int) -> None:
        """Add the columns later schema versions brought (NULL in existing rows: such a row's file
        is read once when a replica registers it, as before), in the writers' transaction."""
        present = {column["name"] for column in inspect(conn).get_columns(adapters.name)}
        for name in ADDED_COLUMNS:
            if name not in present:
                column = adapters.c[name]
                conn.exec_driver_sql(f"ALTER TABLE {adapters.name} ADD COLUMN {name} "
                                     f"{column.type.compile(dialect=conn.dialect)}")
        conn.execute(update(state).where(state.c.id == STATE_ROW).values(schema_version=SCHEMA_VERSION))
        log.info("adapter registry %s upgraded from schema version %d to %d", self.name, version, SCHEMA_VERSION)

    def __repr__(self) -> str:
        return f"RegistryDatabase({self.name!r})"

    def close(self) -> None:
        self.engine.dispose()

    # ---- transactions ----------------------------------------------------------------------------

    def _write(self):
        """A write transaction holding the writers' lock (the state row) from its first statement."""
        return _Transaction(self, write=True)

    def _read(self):
        return _Transaction(self, write=False)

    @staticmethod
    def _lock_state(conn: Connection):
        return conn.execute(select(state).where(state.c.id == STATE_ROW).with_for_update()).one()

    # ---- reading ---------------------------------------------------------------------------------

    def current_seq(self) -> int:
        with self._read() as conn:
            return conn.execute(select(state.c.seq).where(state.c.id == STATE_ROW)).scalar_one()

    def get(self, task_id: str) -> StoredAdapter | None:
        with self._read() as conn:
            row = conn.execute(select(adapters).where(adapters.c.task_id == task_id)).first()
        return _stored(row) if row is not None and row.version is not None else None

    def bundled_sha(self, task_id: str) -> str | None:
        with self._read() as conn:
            return conn.execute(select(adapters.c.bundled_sha).where(adapters.c.task_id == task_id)).scalar()

    def last_versions(self) -> dict[str, int]:
        with self._read() as conn:
            return dict(conn.execute(select(adapters.c.task_id, adapters.c.last_version)).all())

    def count(self) -> int:
        with self._read() as conn:
            return conn.execute(select(state.c.current).where(state.c.id == STATE_ROW)).scalar_one()

    def page(self, limit: int, after: str | None = None) -> AdapterPage:
        """Up to `limit` current tasks after `after` in id order: one range scan of the primary key."""
        query = select(adapters).where(adapters.c.version.is_not(None))
        if after is not None:
            query = query.where(adapters.c.task_id > after)
        with self._read() as conn:
            rows = conn.execute(query.order_by(adapters.c.task_id).limit(limit + 1)).all()
            total = conn.execute(select(state.c.current).where(state.c.id == STATE_ROW)).scalar_one()
        return AdapterPage([_stored(r) for r in rows[:limit]], total, len(rows) > limit)

    def changes_since(self, seq: int | None) -> ChangeSet:
        """Rows changed after change `seq` (None: every current row), read in one snapshot.

        O(changes): the rows come from the index on `seq`. A task changed twice since is one row."""
        with self._read() as conn:
            now = conn.execute(select(state.c.seq).where(state.c.id == STATE_ROW)).scalar_one()
            query = select(adapters)
            if seq is None:
                query = query.where(adapters.c.version.is_not(None))
            else:
                query = query.where(adapters.c.seq > seq).order_by(adapters.c.seq)
            rows = conn.execute(query).all()
        current = [_stored(r) for r in rows if r.version is not None]
        removed = [r.task_id for r in rows if r.version is None]
        return ChangeSet(now, current, removed, complete=seq is None)

    # ---- writing ---------------------------------------------------------------------------------

    def last_version(self, task_id: str) -> int:
        """The last version number `task_id` ever had (0: never registered)."""
        with self._read() as conn:
            return conn.execute(select(adapters.c.last_version).where(adapters.c.task_id == task_id)).scalar() or 0

    def make_current(self, stored: StoredAdapter, bundled_sha: str | None = None) -> bool:
        """Make `stored` (its file already stored and verified) the current version: one transaction.

        False, changing nothing, when a later version is already current (two uploads raced: the
        later version number wins, as if this one had committed first) or when `bundled_sha` was
        already imported for the task (another replica imported the same bundled file meanwhile)."""
        return self.make_current_many([stored], [bundled_sha])[0]

    def make_current_many(self, versions: list[StoredAdapter], bundled_shas: list[str | None] | None = None
                          ) -> list[bool]:
        """`make_current` for many versions in one transaction (a batch registration): one commit,
        the rows read with one query per chunk and new ones inserted with one executemany."""
        bundled_shas = bundled_shas or [None] * len(versions)
        done = []
        with self._write() as conn:
            lock = self._lock_state(conn)
            seq, current = lock.seq, lock.current
            rows = self._rows(conn, {stored.task_id for stored in versions})
            inserts, updates = {}, {}
            for stored, bundled_sha in zip(versions, bundled_shas):
                row = rows.get(stored.task_id)
                if row is not None and (bundled_sha is not None and row["bundled_sha"] == bundled_sha
                                        or row["version"] is not None and row["version"] >= stored.version):
                    done.append(False)
                    continue
                seq += 1
                current += row is None or row["version"] is None
                values = {name: getattr(stored, name) for name in RECORD_FIELDS}
                values.update(seq=seq, last_version=max(row["last_version"] if row else 0, stored.version),
                              bundled_sha=bundled_sha if bundled_sha is not None else
                              (row["bundled_sha"] if row else None))
                (updates if stored.task_id in updates or row is not None and stored.task_id not in inserts
                 else inserts)[stored.task_id] = values
                rows[stored.task_id] = values
                done.append(True)
            if inserts:
                conn.execute(insert(adapters), list(inserts.values()))
            if updates:
                conn.execute(update(adapters).where(adapters.c.task_id == bindparam("key"))
                             .values({name: bindparam(name) for name in (*RECORD_FIELDS[1:], "seq", "last_version",
                                                                          "bundled_sha")}),
                             [{**v, "key": k} for k, v in updates.items()])
            conn.execute(update(state).where(state.c.id == STATE_ROW).values(seq=seq, current=current))
        return done

    @staticmethod
    def _rows(conn: Connection, task_ids: set[str]) -> dict[str, dict]:
        found = {}
        ordered = sorted(task_ids)
        for start in range(0, len(ordered), CHUNK):
            chunk = ordered[start:start + CHUNK]
            for row in conn.execute(select(adapters).where(adapters.c.task_id.in_(chunk))).mappings():
                found[row["task_id"]] = dict(row)
        return found

    def last_versions_of(self, task_ids: list[str]) -> dict[str, int]:
        """The last version numbers of these tasks (absent: never registered), one query per chunk."""
        with self._read() as conn:
            return {task_id: row["last_version"] for task_id, row in self._rows(conn, set(task_ids)).items()}

    def delete(self, task_id: str) -> StoredAdapter | None:
        """Stop serving `task_id`; the row stays (version NULL) with its version counter."""
        row = self._change_current(task_id, {"version": None, **dict.fromkeys(LIMIT_FIELDS)}, current_delta=-1)
        return _stored(row) if row is not None else None

    def _change_current(self, task_id: str, values: dict, current_delta: int = 0):
        """Update the current task's row as a change (the next change number, so every replica's
        next sync sees it); its row as it was, or None, changing nothing, if the task is not current."""
        with self._write() as conn:
            lock = self._lock_state(conn)
            row = conn.execute(select(adapters).where(adapters.c.task_id == task_id)).first()
            if row is None or row.version is None:
                return None
            seq = lock.seq + 1
            conn.execute(update(adapters).where(adapters.c.task_id == task_id).values(seq=seq, **values))
            conn.execute(update(state).where(state.c.id == STATE_ROW)
                         .values(seq=seq, current=lock.current + current_delta))
            return row

    def imported_index(self) -> str | None:
        """The label of the index.json this registry imported (None: none)."""
        with self._read() as conn:
            return conn.execute(select(state.c.imported_index).where(state.c.id == STATE_ROW)).scalar_one()

    def has_rows(self) -> bool:
        """Whether any task was ever registered here (a counter outlives a delete)."""
        with self._read() as conn:
            return conn.execute(select(adapters.c.task_id).limit(1)).first() is not None

    def set_limits(self, task_id: str, weight: float | None, max_waiting: int | None) -> StoredAdapter | None:
        """The current task's limits, as a change (its row gets the next change number, so every
        replica's next sync applies them). None, changing nothing, if the task is not current."""
        row = self._change_current(task_id, {"weight": weight, "max_waiting": max_waiting})
        return dataclasses.replace(_stored(row), weight=weight, max_waiting=max_waiting) if row is not None else None

    def import_index(self, index: StoreIndex, reserved: dict[str, int], label: str) -> bool:
        """Import an `index.json` store once (False: this registry already holds an import, or
        tasks of its own), in one transaction. `reserved`: version numbers taken by files the index
        never named."""
        from tqdm import tqdm

        with self._write() as conn:
            lock = self._lock_state(conn)
            if lock.imported_index is not None or conn.execute(select(func.count()).select_from(adapters)).scalar():
                return False
            seq = lock.seq
            rows = []
            for task_id in sorted(set(index.tasks) | set(index.last_versions) | set(reserved) | set(index.bundled)):
                stored = index.tasks.get(task_id)
                last = max(index.last_versions.get(task_id, 0), reserved.get(task_id, 0),
                           stored.version if stored else 0)
                row = {"task_id": task_id, "last_version": last, "bundled_sha": index.bundled.get(task_id),
                       "seq": 0, **dict.fromkeys(RECORD_FIELDS[1:])}
                if stored is not None:
                    seq += 1
                    row.update({name: getattr(stored, name) for name in RECORD_FIELDS[1:]}, seq=seq)
                rows.append(row)
            with tqdm(total=len(rows), desc=f"importing {label}", unit="task",
                      disable=len(rows) <= PROGRESS_ABOVE_ROWS) as bar:
                for start in range(0, len(rows), CHUNK):
                    conn.execute(insert(adapters), rows[start:start + CHUNK])
                    bar.update(len(rows[start:start + CHUNK]))
            conn.execute(update(state).where(state.c.id == STATE_ROW)
                         .values(seq=seq, current=len(index.tasks), imported_index=label[:200]))
            return True


class _Transaction:
    """`with` block: a connection in one transaction, committed on success; SQL errors become StoreError."""

    def __init__(self, db: RegistryDatabase, write: bool):
        self.db = db
        self.write = write

    def __enter__(self) -> Connection:
        self.started = time.perf_counter()
        try:
            self.conn = self.db.engine.connect()
            if self.write:
                self.conn = self.conn.execution_options(lamp_write=True)
            self.conn.begin()
        except SQLAlchemyError as exc:
            raise self._error(exc) from None
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.conn.commit()
            else:
                self.conn.rollback()
        except SQLAlchemyError as error:
            if exc_type is None:
                raise self._error(error) from None
        finally:
            self.conn.close()
        if isinstance(exc, SQLAlchemyError):
            raise self._error(exc) from None
        return False

    def _error(self, exc: SQLAlchemyError) -> StoreError:
        action = "write" if self.write else "read"
        return StoreError(f"adapter registry {self.db.name}: {action} failed: {exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0]}")
