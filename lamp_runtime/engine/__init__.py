"""The engines that run requests of any mix of tasks in one batch, behind one contract.

- base.py: the contract (`Engine`, `EngineRunner`), `EngineConfig`, `StepStats`
- admission.py: the checks every engine applies to a request before queueing it
- build.py: the ONE place an engine (and its async runner) is chosen and built
- step_engine.py: what the two transformers engines share (queue, aborts, prompts, sampling)
- decoder.py: decoder-only continuous batching; kv_batch.py, prefill_groups.py: its KV rows and prefill
- seq2seq.py: encoder-decoder (T5) cohort batching
- sequence.py, sampling.py: per-request state, stop strings, streaming; seeded sampling
- runner.py: `AsyncEngine`, the engine loop thread with async streams for the transformers engines

The vLLM engine (lamp_runtime/vllm/) and the llama.cpp engine (lamp_runtime/llamacpp/) implement
the same contract; engines never import each other, only build.py knows them all.
"""

ENGINE_KINDS = ("hf", "vllm", "llamacpp")  # --engine choices; build.py builds each
