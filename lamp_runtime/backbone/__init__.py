"""The one shared backbone:

- options.py: BackboneOptions and the one list of dtype / quantization choices (no torch import)
- checkpoint.py: where its HF folder is (the embedded GGUF or a .gguf converted once, or a folder)
- hf.py: loading it into transformers (decoder-only or T5), optionally bitsandbytes-quantized
- gguf_int4.py: a Llama GGUF loaded tensor by tensor into int4 (no float32 folder)
- gguf_file.py: one parse of a GGUF's header shared by the questions of one load
- memory.py: the memory a load needs, checked against what is available before loading
- random_shape.py: random-weight GGUFs of a real model's shape (benchmarks only, labelled random)
- embedding_table.py: the input-embedding table alone (the vLLM engine's process needs only that)
- cli_args.py: the `lamp` flags that choose it

This package's modules are imported by name (`from lamp_runtime.backbone.hf import load_backbone`)
so that the light ones (options, cli_args) never pull in torch.
"""
