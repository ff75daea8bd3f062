"""`lamp bench registry`, `lamp bench savings` and `lamp bench start` (the benches that need a real server) add
themselves to `lamp bench` (lamp_runtime/bench/cli.py), which sits on a lower layer and so cannot
import serving."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    bench = subparsers.choices["bench"]
    benches = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    r = benches.add_parser("registry", help="register many adapters through a real server's admin API: time per "
                                            "registration at growing task counts, sync cost, server memory")
    r.add_argument("--registry", default="sqlite",
                   help="'sqlite' (the default, under the store folder) or a postgresql:// URL")
    r.add_argument("--tasks", type=int, nargs="+", default=[1000, 10000, 100000],
                   help="task counts at which single PUTs, the sync and memory are measured")
    r.add_argument("--batch", type=int, default=500, help="adapters per batch registration request")
    r.add_argument("--samples", type=int, default=30, help="single PUTs timed at each task count")
    r.add_argument("--requests", type=int, default=40, help="generations for random tasks at each task count")
    r.add_argument("--length", type=int, default=100, help="LAMP prompt length l of every adapter")
    r.add_argument("--rank", type=int, default=8, help="LAMP rank r of every adapter")
    r.add_argument("--store", help="store folder (default: a new temporary one, removed afterwards)")
    r.add_argument("--out", required=True, help="write the report JSON here")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(parser=r, func=run_registry_command)
    register_savings(benches)
    register_start(benches)


def recorded(report: dict, args) -> dict:
    """`report` with the command that re-runs it (every option, defaults resolved) and its out path."""
    from lamp_runtime.bench.report import full_command

    return {**report, "command": full_command(f"lamp bench {args.bench}", args.parser, args), "out": args.out}


def run_registry_command(args) -> int:
    from lamp_runtime.bench.report import format_table, write_json

    from .registry import TABLE_COLUMNS, RegistryBenchConfig, run_registry_bench

    config = RegistryBenchConfig(registry=args.registry, tasks=tuple(args.tasks), batch=args.batch,
                                 samples=args.samples, requests=args.requests, length=args.length, rank=args.rank,
                                 store=args.store, seed=args.seed)
    report = run_registry_bench(config, on_progress=lambda partial: write_json(args.out, recorded(partial, args)))
    path = write_json(args.out, recorded(report, args))
    print(format_table(report["rows"], TABLE_COLUMNS))
    print(f"wrote {path}")
    return 0


def register_savings(benches) -> None:
    s = benches.add_parser("savings", help="prefill time pooling saves as /metrics estimates it vs the measured "
                                           "difference, with a real server (pool 1 vs pool p, interleaved)")
    s.add_argument("--length", type=int, default=200, help="LAMP prompt length l")
    s.add_argument("--pool", type=int, default=10, help="pool block p of the pooled version")
    s.add_argument("--rank", type=int, default=8, help="LAMP rank r")
    s.add_argument("--rounds", type=int, default=30, help="measured requests per version, interleaved")
    s.add_argument("--warmup", type=int, default=8, help="requests per version before measuring (>= 8)")
    s.add_argument("--out", required=True, help="write the report JSON here")
    s.add_argument("--seed", type=int, default=41)
    s.set_defaults(parser=s, func=run_savings_command)


def run_savings_command(args) -> int:
    from lamp_runtime.bench.report import write_json

    from .savings import SavingsBenchConfig, run_savings_bench

    config = SavingsBenchConfig(length=args.length, pool=args.pool, rank=args.rank, rounds=args.rounds,
                                warmup=args.warmup, seed=args.seed)
    report = run_savings_bench(config)
    path = write_json(args.out, recorded(report, args))
    print(f"tokens saved/request {report['tokens_saved_per_request']:.0f}, KV bytes saved/request "
          f"{report['kv_bytes_saved_per_request']:.0f}; prefill saved: estimated {report['estimated_saved_ms']} ms, "
          f"measured {report['measured_saved_ms']} ms (estimate/measured {report['estimate_over_measured']})")
    print(f"wrote {path}")
    return 0


def register_start(benches) -> None:
    s = benches.add_parser("start", help="a replica's start with many registered tasks: its store sync, and a "
                                         "real server's launch to healthy, empty vs filled store")
    s.add_argument("--registry", default="sqlite",
                   help="'sqlite' (the default, under the store folder) or a postgresql:// URL of an empty database")
    s.add_argument("--tasks", type=int, default=100_000, help="registered tasks")
    s.add_argument("--rounds", type=int, default=1, help="rounds of every variant, interleaved")
    s.add_argument("--length", type=int, default=100, help="LAMP prompt length l of every adapter")
    s.add_argument("--rank", type=int, default=8, help="LAMP rank r of every adapter")
    s.add_argument("--out", required=True, help="write the report JSON here")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(parser=s, func=run_start_command)


def run_start_command(args) -> int:
    from lamp_runtime.bench.report import write_json

    from .start import StartBenchConfig, run_start_bench

    config = StartBenchConfig(registry=args.registry, tasks=args.tasks, rounds=args.rounds, length=args.length,
                              rank=args.rank, seed=args.seed)
    report = run_start_bench(config)
    path = write_json(args.out, recorded(report, args))
    for row in report["rounds"]:
        print(f"{config.tasks} tasks: start sync from rows {row['sync_from_rows_s']} s (reading every file "
              f"{row['read_every_file_s']} s more); healthy {row['healthy_filled_s']} s vs "
              f"{row['healthy_empty_s']} s empty")
    print(f"wrote {path}")
    return 0
