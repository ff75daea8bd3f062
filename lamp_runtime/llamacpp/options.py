"""How the llama.cpp engine sizes its KV cache and chooses its kernel settings."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import require_at_least

# The largest sequence id llama.cpp accepts (LLAMA_MAX_SEQ in llama-cparams.h).
LLAMA_MAX_SEQ = 256


@dataclass(frozen=True)
class LlamaCppOptions:
    # KV cells of the one unified cache shared by every sequence (running rows and cached prompts):
    # a cell holds one position of one or more sequences (a shared prompt position is one cell).
    kv_cells: int = 8192
    # Sequences kept for cached prompt KV (each (task, version) holds one while cached).
    prompt_kv_sequences: int = 64
    # Try the weight-repack / micro-batch settings in a child process at start (probe.py); False
    # runs llama.cpp's defaults untried.
    probe: bool = True
    # Mixed steps (decode rows + newcomers' prefills): "split" runs a token decode and an embedding
    # decode; "embed" turns the decode rows' tokens into embedding rows and runs one llama_decode.
    # Split measured faster (docs/llamacpp.md's benchmark).
    mixed_steps: str = "split"
    # llama.cpp's flash attention (native.new_context says why it is on by default).
    flash_attention: bool = True
    # Choose ggml's thread count per step from measured step times (threads.py); False always
    # runs EngineConfig.threads (or the cores).
    adaptive_threads: bool = True

    def __post_init__(self):
        require_at_least(self, 16, "kv_cells", prefix="LlamaCppOptions.")
        require_at_least(self, 0, "prompt_kv_sequences", prefix="LlamaCppOptions.")
        if self.mixed_steps not in ("embed", "split"):
            raise ValueError(f"LlamaCppOptions.mixed_steps must be 'embed' or 'split', got {self.mixed_steps!r}")
