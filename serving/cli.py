"""The `lamp` command: one subcommand per module, each adding its own parser.

It lives on the top layer because it dispatches to every layer: `lamp train` / `lamp eval`
(lamp_runtime/training), `lamp generate` (lamp_runtime/generate/cli.py), `lamp serve`
(serving/serve_command.py) and `lamp bench` (lamp_runtime/bench). Subcommand modules expose
`register(subparsers)`, which adds a parser whose `func` handles it. Imports are deferred so
`lamp --help` is instant and a command pulls in only what it needs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = (
    "lamp_runtime.training.cli",
    "lamp_runtime.generate.cli",
    "serving.serve_command",
    "lamp_runtime.bench.cli",
    "serving.bench.cli",  # adds `lamp bench registry` to the parser lamp_runtime.bench.cli made
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamp", description="Serve tuned soft prompts over one shared backbone")
    parser.add_argument("--log-level", default="WARNING", help="python logging level (default WARNING)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


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
