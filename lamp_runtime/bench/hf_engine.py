"""The one place the GPU check (bench/gpu_bench.py and tests/cuda/) imports the transformers
engines, so that moving those modules changes this file alone."""

from ..engine.base import EngineConfig
from ..hf.engine import engine_for

__all__ = ["EngineConfig", "engine_for"]
