"""`make loadtest`: a bounded, headless Locust run against lamp-serve, with CSV + HTML reports.

    python -m loadtest.run                      # starts its own server (temporary store, admin token)
    python -m loadtest.run --host http://HOST:PORT   # an existing server (admin user if LAMP_ADMIN_TOKEN is set)

The run is bounded three ways: users (--users), time (--run-time) and total inference requests
(--max-requests). Reports go to --out (CSV: lamp_stats.csv, lamp_failures.csv, ...; lamp.html);
a summary is printed. Exit status: 0 with no failed request, 1 when any request failed, 2 when the
test could not run. Task mix, input lengths and max_new_tokens: see loadtest/locustfile.py.
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
REPORT_PREFIX = "lamp"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", help="server URL, e.g. http://127.0.0.1:8000 (default: start a server for the run)")
    p.add_argument("--users", type=int, default=4, help="concurrent simulated users (one is the admin user "
                                                        "when an admin token is available)")
    p.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    p.add_argument("--run-time", default="60s", help="stop after this long (Locust syntax: 90s, 5m)")
    p.add_argument("--max-requests", type=int, default=300, help="stop after this many inference requests")
    p.add_argument("--out", default=str(REPO_ROOT / "loadtest" / "out"), help="report folder")
    p.add_argument("--prompts", default=str(REPO_ROOT / "prompts"), help="bundled adapters for a started server")
    p.add_argument("--serve-args", default="", help="extra `lamp serve` options for a started server, e.g. "
                                                    "\"--threads 1 --max-batch-size 8\"")
    p.add_argument("--json", help="also write the summary, with the command, revision, machine and load, here")
    p.add_argument("locust_args", nargs="*", help="extra Locust arguments, after --")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.users < 1 or args.spawn_rate <= 0 or args.max_requests < 1:
        p.error("--users and --max-requests must be >= 1 and --spawn-rate > 0")
    if args.host and not args.host.startswith(("http://", "https://")):
        p.error(f"--host must be a URL starting with http:// or https://, got {args.host!r}")
    return args


def locust_command(args, host: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
        "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", args.run_time,
        "--stop-timeout", "30", "--csv", str(out / REPORT_PREFIX), "--html", str(out / f"{REPORT_PREFIX}.html"),
        "--only-summary", "--lamp-max-requests", str(args.max_requests), *args.locust_args,
    ]


def stats_rows(out: Path) -> list[dict]:
    path = out / f"{REPORT_PREFIX}_stats.csv"
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def summarize(out: Path) -> tuple[str, int, int]:
    """A short table from Locust's stats CSV; returns (text, requests, failures)."""
    rows = stats_rows(out)
    if not rows:
        return f"no stats written ({out / (REPORT_PREFIX + '_stats.csv')} missing)", 0, 0
    lines = [f"{'endpoint':<44} {'requests':>8} {'failures':>8} {'median ms':>9} {'p95 ms':>8} {'req/s':>6}"]
    total = failures = 0
    for row in rows:
        name = f"{row['Type']} {row['Name']}".strip() if row["Name"] != "Aggregated" else "all"
        lines.append(f"{name[:44]:<44} {row['Request Count']:>8} {row['Failure Count']:>8} "
                     f"{row['50%']:>9} {row['95%']:>8} {float(row['Requests/s']):>6.2f}")
        if row["Name"] == "Aggregated":
            total, failures = int(row["Request Count"]), int(row["Failure Count"])
    return "\n".join(lines), total, failures


def run_locust(args, host: str, env: dict[str, str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{REPORT_PREFIX}*"):
        stale.unlink()
    code = subprocess.run(locust_command(args, host, out), cwd=REPO_ROOT, env=env).returncode
    text, total, failures = summarize(out)
    print(f"\nload test summary ({args.users} users, {args.run_time}, at most {args.max_requests} requests) "
          f"against {host}:\n{text}\nreports: {out / (REPORT_PREFIX + '_stats.csv')}, "
          f"{out / (REPORT_PREFIX + '.html')}", flush=True)
    if args.json:
        write_summary(args, host, code)
    if code == 0 and total == 0:
        print("no request was sent", file=sys.stderr)
        return 2
    if code not in (0, 1):
        return 2
    return 1 if failures or code else 0


def write_summary(args, host: str, code: int) -> None:
    """Locust's per-endpoint numbers as JSON, with where and how they were measured."""
    from lamp_runtime.bench.report import full_command, write_json
    from lamp_runtime.bench.workload import machine_context

    fields = {"Request Count": "requests", "Failure Count": "failures", "Median Response Time": "median_ms",
              "Average Response Time": "mean_ms", "Min Response Time": "min_ms", "Max Response Time": "max_ms",
              "95%": "p95_ms", "Requests/s": "requests_per_s"}
    endpoints = [{"endpoint": f"{row['Type']} {row['Name']}".strip(),
                  **{key: float(row[name]) for name, key in fields.items() if row.get(name) not in (None, "", "N/A")}}
                 for row in stats_rows(Path(args.out))]
    command = full_command("python -m loadtest.run", build_parser(), args)
    write_json(args.json, {"bench": "loadtest", "command": command, "out": args.json, "context": machine_context(),
                           "server": "started by the run" if not args.host else host,
                           "serve_args": args.serve_args, "users": args.users, "run_time": args.run_time,
                           "max_requests": args.max_requests, "locust_exit_code": code, "endpoints": endpoints})


def main(argv=None) -> int:
    args = parse_args(argv)
    env = dict(os.environ)
    if args.host:
        return run_locust(args, args.host.rstrip("/"), env)
    from tests.server_process import ServerProcess

    token = secrets.token_urlsafe(24)  # this run only; handed over in the environment, never printed
    env["LAMP_ADMIN_TOKEN"] = token
    with tempfile.TemporaryDirectory(prefix="lamp-loadtest-") as tmp:
        log_path = Path(args.out) / "server.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"starting lamp serve for the load test (log: {log_path})", flush=True)
        with ServerProcess(store=Path(tmp) / "store", prompts=args.prompts, admin_token=token,
                           extra_args=shlex.split(args.serve_args), log_path=log_path) as server:
            print(f"server ready at {server.url}", flush=True)
            return run_locust(args, server.url, env)


if __name__ == "__main__":
    sys.exit(main())
