"""What a local store's registry holds, read straight from its SQLite file (read-only), so server
tests can check that a refused or failed call changed nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from serving.store.base import REGISTRY_NAME


def registry_state(store_dir: str | Path) -> dict:
    """{"seq": last change number, "tasks": {task: row}, "last_versions": {task: n}}; empty before the first start."""
    path = Path(store_dir) / REGISTRY_NAME
    if not path.exists():
        return {"seq": 0, "tasks": {}, "last_versions": {}}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        seq = conn.execute("SELECT seq FROM lamp_registry_state").fetchone()["seq"]
        rows = [dict(r) for r in conn.execute("SELECT * FROM lamp_adapters ORDER BY task_id")]
    conn.close()
    return {"seq": seq, "tasks": {r["task_id"]: r for r in rows if r["version"] is not None},
            "last_versions": {r["task_id"]: r["last_version"] for r in rows}}


def store_files(store_dir: str | Path) -> list[str]:
    """The store's adapter files and folders (not the database's own files, which SQLite manages)."""
    root = Path(store_dir)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.name.startswith(REGISTRY_NAME))
