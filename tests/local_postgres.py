"""A throwaway PostgreSQL server for the registry tests, from Debian's `postgresql` package.

`initdb` refuses to run as root, so as root the server runs as the `postgres` user (which the
package creates); its data and socket live in a fresh temporary folder that the server's user owns.
Skips, saying why, where no PostgreSQL binaries are installed (`make setup` installs them where
root and apt-get exist).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serving.bench.ports import free_port

from .requires import missing

START_TIMEOUT_S = 60.0


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian keeps it off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_server_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        missing("running as root and there is no 'postgres' user to run PostgreSQL as (initdb refuses root)")
    return ["runuser", "-u", "postgres", "--"]


@contextmanager
def local_postgres() -> Iterator[str]:
    """Start a server on a free port; yield a `postgresql://` URL of its database; stop and remove it."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        missing("PostgreSQL is not installed (apt-get install postgresql; `make setup` does it as root)")
    prefix = _as_server_user()
    folder = Path(tempfile.mkdtemp(prefix="lamp-pg-"))
    if prefix:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "lamp", "--no-sync"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"),
                    "-w", "-t", str(int(START_TIMEOUT_S)), "start"], check=True, capture_output=True)
    try:
        url = f"postgresql://lamp@127.0.0.1:{port}/postgres"
        _wait_ready(url)
        yield url
    finally:
        subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(url: str) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            psycopg.connect(url).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def fresh_database(server_url: str, name: str) -> str:
    """A new empty database on the server (one per test), its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"
