"""Which backbone numerics an adapter was tuned on, and a warning when it is served on others.

A soft prompt is tuned to the exact function the frozen backbone computes, so serving it on other
numerics can cost accuracy. Measured on the bundled tasks (prompts/README.md,
docs/bench/accuracy-quantized.json): prompts tuned on the float32 backbone kept their accuracy on
bfloat16 and lost a little on int8, but on nf4 extract fell from 0.86 to 0.00.
"""

from __future__ import annotations

from .base import PromptAdapter
from .stored import StoredAdapterRef

# Metadata key written by `lamp train`: "<dtype>/<quantization>" of the backbone it trained on.
TRAINED_ON_KEY = "trained_on"


def numerics(options) -> str:
    """"float32/none", "bfloat16/nf4", ... for resolved BackboneOptions."""
    return f"{options.dtype}/{options.quantization}"


def _same_gguf_weights(recorded: str, options) -> bool:
    """int4 from a GGUF serves the very Q4_1 blocks the float32 backbone was dequantized from, with
    bfloat16 products: the bundled adapters, trained on float32, score the same there
    (docs/bench/accuracy.json), and int4 itself cannot train (its kernel has no backward)."""
    from_gguf = options.path is None or str(options.path).endswith(".gguf")
    return from_gguf and options.quantization == "int4" and recorded == "float32/none"


def serving_mismatch(adapter: PromptAdapter | StoredAdapterRef, options) -> str | None:
    """A warning when the adapter (or a stored version's reference: its meta is the file's) records
    other training numerics than `options`; None when they match or the adapter does not say (files
    from other tools)."""
    recorded = adapter.meta.extra.get(TRAINED_ON_KEY)
    serving = numerics(options)
    if not recorded or recorded == serving or _same_gguf_weights(recorded, options):
        return None
    return (f"trained on a {recorded} backbone but served on {serving}; soft prompts are tuned to the "
            f"backbone's exact numerics and can lose accuracy (retrain with lamp train "
            f"--dtype {options.dtype} --quantization {options.quantization})")
