"""`HfEngine`: the engine contract over a transformers step core, and the choice of that core.

    engine = HfEngine.load(BackboneOptions(), EngineConfig())   # loads the backbone, starts the loop
    core = engine_for(backbone)                                  # or a core alone, stepped synchronously

The core is picked by the backbone: encoder-decoder (T5: seq2seq.py), a Llama-template decoder
(slot KV cache + prompt-KV cache: decoder.py over llama.py), or any other decoder (transformers'
own forward: generic_decoder.py). The engine loop thread is engine/step_loop.py's.
"""

from __future__ import annotations

from ..adapters.registry import AdapterRegistry
from ..backbone.options import BackboneOptions
from ..engine.base import EngineConfig
from ..engine.step_loop import StepLoopEngine
from ..prompts.cache import PromptCache
from .step_engine import StepEngine


def engine_for(backbone, registry: AdapterRegistry | None = None, config: EngineConfig | None = None,
               cache: PromptCache | None = None) -> StepEngine:
    """The transformers step core that fits a loaded backbone."""
    if backbone.is_encoder_decoder:
        from .seq2seq import Seq2SeqEngine

        return Seq2SeqEngine(backbone, registry, config, cache)
    from .llama import supports

    if supports(backbone.model):
        from .decoder import DecoderEngine

        return DecoderEngine(backbone, registry, config, cache)
    from .generic_decoder import GenericDecoderEngine

    return GenericDecoderEngine(backbone, registry, config, cache)


class HfEngine(StepLoopEngine):
    """A transformers step core (`core`) on its own loop thread, behind the engine contract."""

    core: StepEngine

    @classmethod
    def load(cls, backbone_options: BackboneOptions | None = None, config: EngineConfig | None = None) -> "HfEngine":
        """Load the backbone (transformers' model classes are imported here) and start the engine."""
        from ..backbone.hf import load_backbone

        return cls(engine_for(load_backbone(backbone_options), config=config))
