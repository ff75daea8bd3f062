"""The transformers engines: step cores over an in-process transformers backbone, driven behind the
engine contract (lamp_runtime/engine/) by `HfEngine`.

- engine.py: `HfEngine` (contract = core + engine/step_loop.py) and `engine_for` (picks the core)
- step_engine.py: `StepEngine`, what every core shares (queue, aborts, prompts, sampling, stats)
- decoder.py: decoder-only continuous batching over llama.py (`LlamaTemplateForward`, the
  Llama-template forward), kv_slots.py (per-request KV slots), prompt_kv.py (tasks' prompt
  keys/values) and prefill_groups.py
- generic_decoder.py + kv_batch.py: any other decoder, through transformers' own forward
- seq2seq.py: encoder-decoder (T5) cohort batching

Importing this package imports torch, not transformers' model classes; loading a backbone does.
"""
