"""The llama.cpp engine: GGUF backbones run by llama.cpp's own kernels (through the low-level
ctypes API of llama-cpp-python), with every adapter kind's soft prompt fed as embedding rows.

- options.py: `LlamaCppOptions` (KV cells, probe candidates)
- backbone.py: `LlamaCppBackbone`: the GGUF, its tokenizer and embedding table; refusals before loading
- native.py: the ctypes layer: model/context creation, a preallocated `llama_batch`
- probe.py: which weight-repack / micro-batch settings this host runs, tried in a child process
- prompt_kv.py: each (task, version)'s prompt keys/values in a llama.cpp sequence of its own
- engine.py: `LlamaCppEngine`, the synchronous step core (continuous batching, one decode per step)

Engines never import each other: this package uses only the shared helpers of lamp_runtime/engine/.
"""
