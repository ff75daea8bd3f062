"""The vLLM engine: the same engine contract (lamp_runtime/engine/base.py) over vLLM's continuous
batching, fed with prompt embeddings.

- engine.py: VllmEngine (the contract, on its own loop thread), VllmOptions
- backbone.py: what this process holds of the backbone (tokenizer, config, embedding table)
- sequence.py: vLLM's streamed outputs as our StepOutput / GenerationResult
- guard.py: checks on every prompt-embeddings tensor before it reaches vLLM

Importing this package does not import vLLM; building the engine does (see docs/vllm.md).
"""
