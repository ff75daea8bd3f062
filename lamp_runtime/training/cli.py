"""`lamp train` (tune a LAMP or plain soft prompt) and `lamp eval` (accuracy through the Engine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    from ..backbone.cli_args import add_backbone_arguments

    p = subparsers.add_parser("train", help="tune a LAMP (or plain) soft prompt on a JSONL file")
    p.add_argument("--data", required=True, help='training JSONL, one {"input": ..., "target": ...} per line')
    p.add_argument("--eval-data", help="held-out JSONL scored every epoch to keep the best checkpoint")
    p.add_argument("--holdout", type=int, default=0,
                   help="without --eval-data: score the last N training rows instead (not trained on)")
    p.add_argument("--out", required=True, help="where to write the adapter (.safetensors)")
    p.add_argument("--task", help="task name stored in the adapter's metadata (default: the file stem)")
    p.add_argument("--description", help="free text stored in the adapter's metadata")
    p.add_argument("--method", default="lamp", choices=["lamp", "pt", "ept"],  # training.methods.METHODS (torch-free here)
                   help="lamp (factors U, Q, V), pt (plain prompt tuning, the baseline) or ept (short prompt "
                        "+ low-rank input offset, multi-space projection folded into the saved prompt)")
    p.add_argument("--prompt-length", "-l", type=int, default=100, help="soft prompt tokens l before pooling")
    p.add_argument("--rank", "-r", type=int, default=8, help="LAMP rank r (EPT: rank of the offset A·B)")
    p.add_argument("--offset-tokens", type=int, default=32,
                   help="EPT: rows s of the offset A·B added to the first s input tokens")
    p.add_argument("--spaces", type=int, default=2, help="EPT: subspaces K of the multi-space projection")
    p.add_argument("--projection-rank", type=int, default=1, help="EPT: rank of each subspace's residual map")
    p.add_argument("--pool", "-p", type=int, default=1, help="average-pooling block p (served tokens = ceil(l/p))")
    p.add_argument("--lr", type=float, default=0.3, help="peak learning rate (relative to each tensor's RMS "
                   "with the default Adafactor)")
    p.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="train exactly this many steps (overrides --epochs)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default 10%% of the steps)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=None, help="steps between evals (default: each epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-text", help="initialise P from this text's token embeddings instead of random vocabulary")
    p.add_argument("--init-text-file", help="like --init-text, read from a file")
    p.add_argument("--max-train-rows", type=int, default=None, help="use only the first N training rows")
    p.add_argument("--max-input-tokens", type=int, default=256)
    p.add_argument("--max-target-tokens", type=int, default=64)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_backbone_arguments(p)
    p.set_defaults(func=run_train)

    e = subparsers.add_parser("eval", help="accuracy of adapters vs zero-shot on a JSONL file")
    e.add_argument("--adapter", action="append", default=[], help="adapter file or PEFT folder (repeatable)")
    e.add_argument("--data", required=True, help='JSONL of {"input": ..., "target": ...}')
    e.add_argument("--task", help="bundled task whose instruction is the zero-shot row (default: the "
                   "first adapter's metadata task, if it is a bundled task)")
    e.add_argument("--instruction", help="zero-shot instruction text (overrides --task)")
    e.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot rows")
    e.add_argument("--zero-shot-chat", action="store_true",
                   help="add a zero-shot row with the instruction wrapped in the backbone's chat template")
    e.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    e.add_argument("--match", default="auto", choices=["auto", "exact", "label"],
                   help="label: the completion names the target class and no other; exact: the first line "
                   "equals the target; auto: label for bundled classification tasks and data whose targets "
                   "take few distinct values")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--out", help="write the results as JSON here")
    e.add_argument("--no-progress", action="store_true")
    add_backbone_arguments(e)
    e.set_defaults(func=run_eval)


# An init text only needs its first l tokens; refuse files that could not be meant as one.
MAX_INIT_TEXT_BYTES = 1024 * 1024


def _init_text(args) -> str | None:
    if args.init_text and args.init_text_file:
        raise ValueError("give --init-text or --init-text-file, not both")
    if args.init_text_file:
        path = Path(args.init_text_file)
        if path.stat().st_size > MAX_INIT_TEXT_BYTES:
            raise ValueError(f"--init-text-file {path} is over {MAX_INIT_TEXT_BYTES} bytes")
        return path.read_text(encoding="utf-8")
    return args.init_text


def _split_rows(args, load_rows):
    rows = load_rows(args.data, args.max_train_rows)
    if args.eval_data:
        if args.holdout:
            raise ValueError("give --eval-data or --holdout, not both")
        return rows, load_rows(args.eval_data)
    if args.holdout:
        if not 0 < args.holdout < len(rows):
            raise ValueError(f"--holdout {args.holdout} must leave training rows (file has {len(rows)})")
        return rows[: -args.holdout], rows[-args.holdout :]
    return rows, None


def run_train(args) -> int:
    from .openmp import prefer_passive_openmp

    prefer_passive_openmp()
    from ..adapters import AdapterMeta
    from ..backbone.cli_args import backbone_options
    from ..backbone.hf import load_backbone
    from .data import load_rows, tokenize_rows
    from .methods import EptShape
    from .trainer import TrainConfig, save_checked, train

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out}")
    config = TrainConfig(
        method=args.method, optimizer=args.optimizer, prompt_length=args.prompt_length, rank=args.rank,
        pool=args.pool, learning_rate=args.lr, batch_size=args.batch_size, epochs=args.epochs,
        max_steps=args.max_steps, warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
        eval_every=args.eval_every, seed=args.seed, init_text=_init_text(args),
        ept=EptShape(offset_tokens=args.offset_tokens, spaces=args.spaces, projection_rank=args.projection_rank),
    )
    train_rows, eval_rows = _split_rows(args, load_rows)
    options = backbone_options(args)
    if options.quantization == "int4":
        raise ValueError("int4 cannot train a prompt (its kernel has no backward pass); train with --quantization "
                         "none: from a GGUF, int4 serves those very weights (the bundled adapters score the same)")
    backbone = load_backbone(options, int4=False)
    tokenize = lambda rows: tokenize_rows(backbone.tokenizer, rows, args.max_input_tokens, args.max_target_tokens)  # noqa: E731
    meta = AdapterMeta(task=args.task or out.stem, base_model=backbone.name, description=args.description)
    result = train(backbone, tokenize(train_rows), tokenize(eval_rows) if eval_rows else None, config, meta,
                   progress=not args.no_progress)
    save_checked(result.adapter, out, backbone.hidden_size)
    summary = {"out": str(out), "method": config.method, "pool": config.pool,
               "pooled_tokens": result.adapter.pooled_tokens,
               "trainable_parameters": result.trainable_parameters, "steps": result.steps,
               "best_step": result.best.step, "eval_loss": round(result.best.loss, 4),
               "eval_exact_match": round(result.best.exact_match, 4),
               "train_seconds": round(result.train_seconds, 1)}
    print(json.dumps(summary))
    return 0


def format_table(reports) -> str:
    lines = [f"{'name':<28} {'soft tokens':>11} {'input tok':>9} {'accuracy':>8} {'correct':>9} {'seconds':>8}"]
    for r in reports:
        lines.append(f"{r.name:<28} {r.soft_prompt_tokens:>11} {r.mean_input_tokens:>9.1f} {r.accuracy:>8.3f} "
                     f"{f'{r.correct}/{r.total}':>9} {r.seconds:>8.1f}")
    return "\n".join(lines)


def _task_name(args, adapters) -> str | None:
    """The bundled task being evaluated: --task, else the first adapter's metadata task if bundled."""
    from ..tasks.synthetic import TASKS

    if args.task is not None:
        if args.task not in TASKS:
            raise ValueError(f"--task {args.task!r} is not a bundled task ({', '.join(TASKS)}); give --instruction")
        return args.task
    return next((a.meta.task for a in adapters if a.meta.task in TASKS), None)


def _labels(args, task: str | None, rows) -> tuple[str, ...] | None:
    from ..tasks.synthetic import TASKS
    from .evaluate import infer_labels, label_set

    if args.match == "exact":
        return None
    if task is not None and TASKS[task].labels:
        return TASKS[task].labels
    return label_set(rows) if args.match == "label" else infer_labels(rows)


def run_eval(args) -> int:
    from .openmp import prefer_passive_openmp

    prefer_passive_openmp()
    from ..adapters import load_adapter
    from ..adapters.provenance import serving_mismatch
    from ..backbone.cli_args import backbone_options
    from ..backbone.hf import load_backbone
    from ..engine.base import EngineConfig
    from ..hf.engine import engine_for
    from ..tasks.synthetic import TASKS
    from .data import load_rows
    from .evaluate import evaluate

    if args.task is not None:
        _task_name(args, ())  # an unknown --task fails before the backbone loads
    rows = load_rows(args.data, args.limit)
    backbone = load_backbone(backbone_options(args))
    engine = engine_for(backbone, config=EngineConfig(max_batch_size=args.batch_size))
    adapters = {}
    for path in args.adapter:
        name = Path(path).stem if Path(path).suffix else Path(path).name
        if name in adapters:
            raise ValueError(f"two adapters are named {name!r}; rename one")
        adapters[name] = load_adapter(path, backbone.hidden_size)
        engine.registry.register(name, adapters[name])
        if warning := serving_mismatch(adapters[name], backbone.options):
            print(f"warning: {name}: {warning}", file=sys.stderr)
    task = _task_name(args, adapters.values())
    labels = _labels(args, task, rows)
    instruction = None
    if not args.no_zero_shot:
        instruction = args.instruction or (TASKS[task].instruction if task else None)
    if not adapters and instruction is None:
        raise ValueError("nothing to evaluate: give --adapter, or --task/--instruction for the zero-shot row")
    common = {"labels": labels, "batch_size": args.batch_size, "progress": not args.no_progress}
    reports = []
    if instruction is not None:
        reports.append(evaluate(engine, rows, "zero-shot", instruction=instruction, **common))
        if args.zero_shot_chat:
            reports.append(evaluate(engine, rows, "zero-shot (chat)", instruction=instruction, chat=True, **common))
    for name in adapters:
        reports.append(evaluate(engine, rows, name, task_id=name, **common))
    print(format_table(reports))
    if args.out:
        Path(args.out).write_text(json.dumps([r.as_dict() for r in reports], indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
