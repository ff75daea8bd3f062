"""How the llama.cpp engine sizes its KV cache and chooses its kernel settings."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import require_at_least

# The largest sequence id llama.cpp accepts (LLAMA_MAX_SEQ in llama-cparams.h).
LLAMA_MAX_SEQ = 256
# The types LlamaCppOptions.requantize offers: llama.cpp's LLAMA_FTYPE_MOSTLY_<name> for each.
REQUANTIZE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "F16")


@dataclass(frozen=True)
class LlamaCppOptions:
    # KV cells of each request row's own stream: the most soft prompt + input + answer one request
    # (one of its n samples) may hold; longer requests are refused, naming both numbers. The KV
    # cache holds EngineConfig.max_batch_size x row_cells cells, allocated at start (f16: 23 KB a
    # cell on the embedded SmolLM2, 512 KB on a Llama-2-7B shape).
    row_cells: int = 1024
    # Try the weight-repack / micro-batch settings in a child process at start (probe.py); False
    # runs llama.cpp's defaults untried.
    probe: bool = True
    # Mixed steps (decode rows + newcomers' prefills): "embed" turns the decode rows' tokens into
    # embedding rows and runs one llama_decode; "split" runs a token decode and an embedding decode.
    # With a KV stream per row, one decode measured faster (docs/llamacpp.md's benchmark).
    mixed_steps: str = "embed"
    # llama.cpp's flash attention (native.new_context says why it is on by default).
    flash_attention: bool = True
    # Choose ggml's thread count per step from measured step times (threads.py); False always
    # runs EngineConfig.threads (or the cores).
    adaptive_threads: bool = True
    # Serve the GGUF requantized by llama.cpp to this type (REQUANTIZE_TYPES, e.g. "Q4_0", which
    # llama.cpp repacks into batched kernels on x86: requantize.py), made once and cached; None
    # serves the file's own weights. It rounds every weight a second time: measure the
    # tasks' accuracy on it (bench/accuracy.py `llamacpp/Q4_0`) before serving it.
    requantize: str | None = None

    def __post_init__(self):
        require_at_least(self, 16, "row_cells", prefix="LlamaCppOptions.")
        if self.mixed_steps not in ("embed", "split"):
            raise ValueError(f"LlamaCppOptions.mixed_steps must be 'embed' or 'split', got {self.mixed_steps!r}")
        if self.requantize is not None and self.requantize not in REQUANTIZE_TYPES:
            raise ValueError(f"LlamaCppOptions.requantize {self.requantize!r} is not one of "
                             f"{', '.join(REQUANTIZE_TYPES)}")
