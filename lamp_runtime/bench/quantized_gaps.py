"""How far the engine's greedy tokens on a bitsandbytes-quantized backbone are from the same
model's greedy choice in transformers: the evidence for the bound of
tests/serving/test_quantized_serve.py.

    .venv/bin/python -m lamp_runtime.bench.quantized_gaps [--quantizations nf4 int8] [--tokens 6]
        [--inputs 2] [--adapters bundled suite] [--out docs/bench/quantized-gaps.json]

bitsandbytes' CPU kernels give bitwise-different results for one row in different shapes (nf4's
fused kernel rounds its input to bfloat16 and tiles by rows; int8 picks outlier columns over the
rows of a forward), so the engine's answers can differ from `generate` at near-ties. For each
adapter (`bundled`: prompts/*.safetensors with `--inputs` inputs of its task; `suite`: the three
adapters and two inputs tests/serving/test_quantized_serve.py uses, built the same way), the engine generates greedily in the two shapes the tests
use (one request per forward with no prompt-KV cache, as the int8 test runs; every request in one
batch of up to 8 with the prompt-KV cache, as the nf4 server runs); one transformers forward of
the same quantized model then reads [soft prompt; input; the engine's tokens], and the report
gives, per position, the gap between its best log-probability and that of the engine's token
(0: the same greedy choice).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..adapters import load_adapter
from ..backbone.hf import load_backbone
from ..backbone.options import BackboneOptions
from ..engine.base import EngineConfig
from ..hf.decoder import DecoderEngine
from ..prompts.prepared import prepare
from ..requests import GenerationRequest, SamplingParams
from ..tasks.format import format_input
from .report import full_command, write_json
from .workload import BUNDLED_PROMPTS, lamp_from_prompt, machine_context, task_inputs, vocabulary_prompt

SHAPES = {"batch 1, no prompt-KV cache": (1, 0), "batch 8, prompt-KV cache": (8, 64 << 20)}


def gaps(backbone, adapter, text: str, tokens: list[int]) -> list[float]:
    """For each of `tokens` (a continuation of `text` under `adapter`), how far its
    log-probability is below the best token's, in one transformers forward of `backbone` over
    [pooled soft prompt; input; tokens]: 0 where it is transformers' greedy choice (the quantized
    tests bound these too)."""
    ids = backbone.tokenizer(text, return_tensors="pt")["input_ids"][0]
    embeds = torch.cat([prepare(adapter).prompt.float(), backbone.embed(ids).float(),
                        backbone.embed(torch.tensor(tokens)).float()])
    with torch.no_grad():
        logits = backbone.model(inputs_embeds=embeds[None],
                                attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long)).logits[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    first = embeds.shape[0] - len(tokens) - 1
    return [(logprobs[first + i].max() - logprobs[first + i, t]).item() for i, t in enumerate(tokens)]


SUITE_INPUTS = ["The capital of France is", "List three colours:"]


def suite_adapters(backbone) -> dict:
    """tests/conftest.py's `task_adapters`: a plain prompt and two LAMP ones from vocabulary rows."""
    from ..adapters import AdapterMeta, SoftPromptAdapter

    weight = backbone.model.get_input_embeddings().weight
    return {"plain": SoftPromptAdapter(AdapterMeta(), vocabulary_prompt(weight, 8, seed=1)),
            "lamp2": lamp_from_prompt(vocabulary_prompt(weight, 12, seed=2), rank=8, pool=2),
            "lamp3": lamp_from_prompt(vocabulary_prompt(weight, 10, seed=3), rank=6, pool=3)}


def adapters_and_cases(backbone, which: str, inputs: int):
    if which == "suite":
        adapters = suite_adapters(backbone)
        return adapters, [(task, text) for text in SUITE_INPUTS for task in adapters]
    adapters = {p.stem: load_adapter(p, backbone.hidden_size) for p in sorted(BUNDLED_PROMPTS.glob("*.safetensors"))}
    return adapters, [(task, format_input(text)) for task in adapters for text in task_inputs(task, inputs)]


def measure(quantization: str, which: str, tokens: int, inputs: int) -> dict:
    backbone = load_backbone(BackboneOptions(dtype="float32", quantization=quantization, device="cpu"))
    adapters, cases = adapters_and_cases(backbone, which, inputs)
    shapes = {}
    for name, (batch, kv_bytes) in SHAPES.items():
        engine = DecoderEngine(backbone, config=EngineConfig(max_batch_size=batch, prompt_kv_cache_bytes=kv_bytes))
        for task, adapter in adapters.items():
            engine.registry.register(task, adapter)
        requests = [GenerationRequest(text, task, SamplingParams(max_new_tokens=tokens)) for task, text in cases]
        results = [engine.generate([r])[0] for r in requests] if batch == 1 else engine.generate(requests)
        rows = [{"task": task, "text": r.text,
                 "gaps": [round(g, 5) for g in gaps(backbone, adapters[task], text, r.token_ids)]}
                for (task, text), r in zip(cases, results)]
        every = [g for row in rows for g in row["gaps"]]
        shapes[name] = {"max_gap": max(every), "positions": len(every),
                        "positions_not_greedy": sum(g > 0 for g in every), "rows": rows}
        print(f"{quantization} {which} adapters, {name}: max gap {max(every):.4f}, {shapes[name]['positions_not_greedy']} of "
              f"{len(every)} positions not transformers' greedy choice")
    return {"machine": machine_context(backbone), "shapes": shapes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantizations", nargs="+", default=["nf4", "int8"], choices=["nf4", "int8"])
    parser.add_argument("--tokens", type=int, default=6)
    parser.add_argument("--inputs", type=int, default=2, help="inputs per bundled adapter")
    parser.add_argument("--adapters", nargs="+", default=["bundled", "suite"], choices=["bundled", "suite"])
    parser.add_argument("--out", type=Path, default=Path("docs/bench/quantized-gaps.json"))
    args = parser.parse_args(argv)
    report = {"command": full_command("python -m lamp_runtime.bench.quantized_gaps", parser, args), "out": str(args.out),
              "results": {f"{q}/{which}": measure(q, which, args.tokens, args.inputs)
                          for q in args.quantizations for which in args.adapters}}
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
