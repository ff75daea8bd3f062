"""`lamp bench pooling | batching | speed | cache`: run a bench, write its JSON, print its table.

On a machine shared with other work, run with `OMP_WAIT_POLICY=PASSIVE` (set before the process
starts) or `--threads 1`: spinning OpenMP workers that lose their core make a forward pass many
times slower and the spread huge (docs/benchmarks.md shows by how much).
"""

from __future__ import annotations


def register(subparsers) -> None:
    from ..backbone.options import DTYPE_NAMES
    from .pooling import ENGINE_KINDS, PoolingConfig
    from .speed import SpeedConfig

    bench = subparsers.add_parser("bench", help="measure pooling, mixed-task batching and prompt-cache savings")
    benches = bench.add_subparsers(dest="bench", required=True)

    p = benches.add_parser("pooling", help="on the engines as served: prefill cold / warm / prompt-KV cache off, "
                                            "TTFT, KV bytes per request and decode step per pool block p, vs theory")
    p.add_argument("--engines", nargs="+", default=list(PoolingConfig.engines), choices=ENGINE_KINDS)
    p.add_argument("--lengths", type=int, nargs="+", default=list(PoolingConfig.lengths),
                   help="LAMP prompt lengths l of the prefill variants")
    p.add_argument("--pools", type=int, nargs="+", default=list(PoolingConfig.pools), help="pool blocks p (must include 1)")
    p.add_argument("--decode-lengths", type=int, nargs="+", default=list(PoolingConfig.decode_lengths),
                   help="LAMP prompt lengths l of the decode-step variants")
    p.add_argument("--decode-pools", type=int, nargs="+", default=list(PoolingConfig.decode_pools))
    p.add_argument("--decode-tokens", type=int, default=PoolingConfig.decode_tokens,
                   help="tokens per decode request (EOS ignored)")
    p.add_argument("--rank", type=int, default=PoolingConfig.rank, help="LAMP rank r")
    p.add_argument("--plot", help="also draw measured vs theoretical ratios and decode steps into this PNG")
    _common(p, repeats=PoolingConfig.repeats, threads="the engines' threads (default: the cores)")
    p.set_defaults(parser=p, func=run_pooling_command)

    b = benches.add_parser("batching", help="single- vs mixed-task batching vs one at a time vs PeftModel.generate")
    b.add_argument("--requests", type=int, default=8, help="requests (and tasks, for the mixed batch)")
    b.add_argument("--length", type=int, default=100, help="LAMP prompt length l of every task")
    b.add_argument("--pool", type=int, default=4, help="pool block p of every task")
    b.add_argument("--no-peft", action="store_true", help="skip the PeftModel.generate baseline")
    _generation_bench(b, new_tokens=16, repeats=5, plot="also draw tokens/s per variant into this PNG")
    b.set_defaults(parser=b, func=run_batching_command)

    s = benches.add_parser("speed", help="decode tokens/s vs the bandwidth bound and llama.cpp; prefill with a "
                                          "200- vs 2-token prompt, warm and cold")
    s.add_argument("--options", nargs="+", default=list(SpeedConfig.options), help="backbones as dtype/quantization")
    s.add_argument("--batches", type=int, nargs="+", default=list(SpeedConfig.batches), help="decode batch sizes")
    s.add_argument("--prefill-batches", type=int, nargs="+", default=list(SpeedConfig.prefill_batches))
    s.add_argument("--new-tokens", type=int, default=SpeedConfig.new_tokens, help="tokens per decode run (EOS ignored)")
    s.add_argument("--llama-bench", help="llama.cpp's llama-bench binary, run on the embedded GGUF for comparison")
    s.add_argument("--plot", help="also draw decode tokens/s against the bounds into this PNG")
    _common(s, repeats=3)
    s.set_defaults(parser=s, func=run_speed_command)

    c = benches.add_parser("cache", help="prompt-cache miss vs hit cost and memory per task, 10 to 10,000 tasks")
    c.add_argument("--tasks", type=int, nargs="+", default=[10, 1000, 10000], help="registered task counts")
    c.add_argument("--length", type=int, default=100)
    c.add_argument("--rank", type=int, default=16)
    c.add_argument("--pool", type=int, default=4)
    c.add_argument("--hidden-size", type=int, default=576, help="the backbone's hidden size (576: SmolLM2-135M)")
    c.add_argument("--samples", type=int, default=200, help="misses and hits timed per task count per round")
    c.add_argument("--cache-bytes", type=int, default=None, help="prompt-cache budget (default: the engine's)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    c.add_argument("--out", required=True, help="write the report JSON here")
    c.add_argument("--repeats", type=int, default=5, help="rounds, each over every task count in shuffled order")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    c.set_defaults(parser=c, func=run_cache_command)


def _generation_bench(parser, new_tokens: int, repeats: int, plot: str) -> None:
    """The options of the benches that generate through the engine (pooling, batching)."""
    from ..backbone.cli_args import add_backbone_arguments

    parser.add_argument("--rank", type=int, default=16, help="LAMP rank r")
    parser.add_argument("--new-tokens", type=int, default=new_tokens, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--plot", help=plot)
    _common(parser, repeats=repeats)
    add_backbone_arguments(parser)


def _common(parser, repeats: int, threads: str = "torch intra-op threads (default: torch's)") -> None:
    parser.add_argument("--out", required=True, help="write the report JSON here")
    parser.add_argument("--repeats", type=int, default=repeats, help="recorded rounds over every variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--task", default="support_triage", help="bundled synthetic task whose inputs are used")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help=threads)


def _set_threads(args) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def _command_line(args) -> str:
    """`lamp bench NAME` with every option at the value it ran with (defaults resolved)."""
    from .report import full_command

    return full_command(f"lamp bench {args.bench}", args.parser, args)


def _finish(report: dict, args, table: str, plot: str | None = None) -> int:
    """Write the report's JSON, print its table and, with --plot, draw it with plots.<plot>."""
    from .report import write_json

    report["command"] = _command_line(args)
    report["out"] = str(args.out)
    path = write_json(args.out, report)
    print(table)
    if plot and args.plot:
        from . import plots

        print(f"plot: {getattr(plots, plot)(report, args.plot)}")
    print(f"wrote {path}")
    return 0


def run_pooling_command(args) -> int:
    import torch

    from .pooling import PoolingConfig, run_pooling
    from .pooling_report import DECODE_COLUMNS, PREFILL_COLUMNS, summary_lines, table_rows
    from .report import format_table

    config = PoolingConfig(engines=tuple(args.engines), lengths=tuple(args.lengths), pools=tuple(args.pools),
                           decode_lengths=tuple(args.decode_lengths), decode_pools=tuple(args.decode_pools),
                           decode_tokens=args.decode_tokens, rank=args.rank, repeats=args.repeats,
                           warmup=args.warmup, task=args.task, seed=args.seed, threads=args.threads)
    torch.set_num_threads(1)  # as `lamp serve` does: only the engine loops run multi-threaded work
    report = run_pooling(config)
    lines = [format_table(table_rows(report["prefill"]), PREFILL_COLUMNS), "",
             format_table(table_rows(report["decode"]), DECODE_COLUMNS), "", *summary_lines(report)]
    return _finish(report, args, "\n".join(lines), plot="plot_pooling")


def run_batching_command(args) -> int:
    from ..backbone.cli_args import backbone_options
    from ..backbone.hf import load_backbone
    from .batching import RATIOS, TABLE_COLUMNS, BatchingConfig, run_batching, table_rows
    from .report import format_table

    _set_threads(args)
    config = BatchingConfig(requests=args.requests, length=args.length, pool=args.pool, rank=args.rank,
                            new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup, task=args.task,
                            seed=args.seed, include_peft=not args.no_peft)
    report = run_batching(load_backbone(backbone_options(args)), config)
    lines = [format_table(table_rows(report), TABLE_COLUMNS), ""]
    for name in RATIOS:
        if name in report:
            spread = report["ratio_spread"][name]
            cpu = report["cpu_time_ratios"][name]
            lines.append(f"{name}: {report[name]:.2f}x wall-clock (IQR {spread['q1']:.2f}-{spread['q3']:.2f}), "
                         f"{cpu['median']:.2f}x CPU time (IQR {cpu['q1']:.2f}-{cpu['q3']:.2f})")
    if "peft_outputs_match" in report:
        lines.append(f"greedy outputs equal to PEFT's: {report['peft_outputs_match']}/{report['peft_outputs_compared']}")
    return _finish(report, args, "\n".join(lines), plot="plot_batching")


def run_speed_command(args) -> int:
    from .report import format_table
    from .speed import PREFILL_COLUMNS, TABLE_COLUMNS, SpeedConfig, run_speed

    _set_threads(args)
    import torch

    config = SpeedConfig(options=tuple(args.options), batches=tuple(args.batches),
                         prefill_batches=tuple(args.prefill_batches), new_tokens=args.new_tokens,
                         repeats=args.repeats, warmup=args.warmup, task=args.task, seed=args.seed,
                         llama_bench=args.llama_bench, threads=torch.get_num_threads())
    report = run_speed(config)
    lines = [f"memory read bandwidth: {report['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", "",
             format_table(report["decode"], TABLE_COLUMNS), "", format_table(report["prefill"], PREFILL_COLUMNS)]
    if "llama_cpp" in report:
        llama = report["llama_cpp"]
        lines.append(f"llama.cpp llama-bench: tg32 {llama['tg_tokens_per_s']['median']:.1f} tok/s, "
                     f"pp64 {llama['pp_tokens_per_s']['median']:.1f} tok/s")
    return _finish(report, args, "\n".join(lines), plot="plot_speed")


def run_cache_command(args) -> int:
    from ..engine.base import EngineConfig
    from .cache import TABLE_COLUMNS, CacheBenchConfig, run_cache_bench, table_rows
    from .report import format_table

    _set_threads(args)
    config = CacheBenchConfig(task_counts=tuple(args.tasks), length=args.length, rank=args.rank, pool=args.pool,
                              hidden_size=args.hidden_size, samples=args.samples, repeats=args.repeats,
                              cache_bytes=args.cache_bytes or EngineConfig.prompt_cache_bytes, device=args.device,
                              dtype=args.dtype, seed=args.seed)
    report = run_cache_bench(config)
    return _finish(report, args, format_table(table_rows(report), TABLE_COLUMNS))
