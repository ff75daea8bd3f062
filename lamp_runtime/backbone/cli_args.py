"""The backbone flags shared by every `lamp` subcommand that loads a backbone."""

from __future__ import annotations

import argparse

from .options import DTYPE_CHOICES, QUANTIZATION_CHOICES, BackboneOptions


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default=None,
                        help="local HF folder or .gguf file (default: the embedded SmolLM2-135M GGUF)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def backbone_options(args) -> BackboneOptions:
    return BackboneOptions(path=args.backbone, dtype=args.dtype, quantization=args.quantization,
                           device=args.device)
