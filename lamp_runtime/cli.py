"""`lamp` command line: one subcommand per module, each adding its own parser.

Subcommand modules expose `register(subparsers)`, which adds a parser whose `func` handles it.
Imports are deferred so `lamp --help` is instant and a command pulls in only what it needs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = (
    "lamp_runtime.training.cli",
    "lamp_runtime.cli_generate",
    "serving.cli",
    "lamp_runtime.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamp", description="Serve tuned soft prompts over one shared backbone")
    parser.add_argument("--log-level", default="WARNING", help="python logging level (default WARNING)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads the backbone."""
    parser.add_argument("--backbone", default=None,
                        help="local HF folder or .gguf file (default: the embedded SmolLM2-135M GGUF)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", "nf4", "int8"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def backbone_options(args):
    from .backbone import BackboneOptions

    return BackboneOptions(path=args.backbone, dtype=args.dtype, quantization=args.quantization,
                           device=args.device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        # Errors users can fix (bad adapter, unknown file, invalid option) get one clear line.
        print(f"lamp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
