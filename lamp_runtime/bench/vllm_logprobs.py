"""How far vLLM's log-probabilities are from the HF model's on the same prompt embeddings: the
evidence for the near-tie bound of the vLLM parity test (tests/runtime/test_vllm_engine.py).

    .venv/bin/python -m lamp_runtime.bench.vllm_logprobs [--tokens 16] [--top 20]
        [--out docs/bench/vllm-logprobs.json]

Each bundled adapter (prompts/*.safetensors) with three inputs gives a prompt (soft prompt + input
embeddings, float32, on the CPU). vLLM generates greedily from it with its top-`--top`
log-probabilities per position; the HF model then reads the same prompt followed by vLLM's tokens
in one forward, and its log-softmax is compared with vLLM's at every position, for every token
vLLM reported. The report gives the largest, median and 99th-percentile difference, whether the HF
model would have picked the same token at each position, and the smallest top-2 gap of the HF
logits met on the way (a near-tie any disagreement would have to be).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ..adapters import load_adapter
from ..backbone.hf import load_backbone
from ..backbone.options import BackboneOptions
from ..prompts.prepared import assemble_embeddings, prepare
from ..tasks.format import format_input
from .report import format_table, full_command, write_json
from .workload import BUNDLED_PROMPTS, machine_context, task_inputs

INPUTS_PER_TASK = 3


def prompts(backbone) -> list[tuple[str, torch.Tensor]]:
    """(name, [positions, hidden] float32 embeddings) for every bundled adapter and input."""
    out = []
    for path in sorted(BUNDLED_PROMPTS.glob("*.safetensors")):
        adapter = load_adapter(path, backbone.hidden_size)
        prepared = prepare(adapter)
        for i, text in enumerate(task_inputs(path.stem, INPUTS_PER_TASK)):
            ids = backbone.tokenizer(format_input(text), return_tensors="pt")["input_ids"][0]
            out.append((f"{path.stem}/{i}", assemble_embeddings(prepared, backbone.embed(ids)).contiguous()))
    return out


def vllm_logprobs(folder: Path, embeds: list[torch.Tensor], tokens: int, top: int) -> list[list[dict[int, float]]]:
    """vLLM's greedy tokens' top-`top` log-probabilities per position, per prompt."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), tokenizer=str(folder), dtype="float32", enable_prompt_embeds=True,
              enforce_eager=True, max_model_len=512, block_size=32, enable_prefix_caching=False,
              kv_cache_memory_bytes=256 * 1024 * 1024, max_num_seqs=len(embeds))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, logprobs=top, ignore_eos=True)
    outputs = llm.generate([{"prompt_embeds": e} for e in embeds], params, use_tqdm=False)
    return [[{token: lp.logprob for token, lp in position.items()} for position in out.outputs[0].logprobs]
            for out in outputs]


def compare(backbone, embeds: torch.Tensor, vllm_positions: list[dict[int, float]], chosen: list[int]) -> dict:
    """HF log-softmax over the prompt + vLLM's tokens, against vLLM's values at each position."""
    generated = backbone.embed(torch.tensor(chosen[:-1], dtype=torch.long))
    sequence = torch.cat([embeds, generated])[None]
    with torch.no_grad():
        logits = backbone.model(inputs_embeds=sequence).logits[0, embeds.shape[0] - 1:].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    diffs, same, gaps = [], [], []
    for k, reported in enumerate(vllm_positions):
        diffs += [abs(float(logprobs[k, token]) - value) for token, value in reported.items()]
        same.append(int(logprobs[k].argmax()) == chosen[k])
        top2 = torch.topk(logits[k], 2).values
        gaps.append(float(top2[0] - top2[1]))
    return {"diffs": diffs, "same_choice": same, "min_top2_gap": min(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from ..vllm.backbone import load_vllm_backbone

    options = BackboneOptions(dtype="float32", quantization="none", device="cpu")
    backbone = load_backbone(options)
    named = prompts(backbone)
    started = time.perf_counter()
    reported = vllm_logprobs(load_vllm_backbone(options).folder, [e for _, e in named], args.tokens, args.top)
    rows = []
    for (name, embeds), positions in zip(named, reported):
        chosen = [max(p, key=p.get) for p in positions]  # greedy: the reported top-1
        result = compare(backbone, embeds, positions, chosen)
        rows.append({"prompt": name, "positions": len(positions), "values": len(result["diffs"]),
                     "max_abs_diff": max(result["diffs"]), "hf_same_choice": sum(result["same_choice"]),
                     "min_top2_logit_gap": result["min_top2_gap"], "diffs": result["diffs"]})
    every = sorted(d for row in rows for d in row["diffs"])
    summary = {"prompts": len(rows), "values": len(every), "max_abs_diff": every[-1],
               "median_abs_diff": statistics.median(every), "p99_abs_diff": every[int(0.99 * (len(every) - 1))],
               "positions_where_hf_picks_the_same_token": sum(r["hf_same_choice"] for r in rows),
               "positions": sum(r["positions"] for r in rows),
               "min_top2_logit_gap": min(r["min_top2_logit_gap"] for r in rows),
               "seconds": round(time.perf_counter() - started, 1)}
    print(format_table(rows, [("prompt", "prompt", ""), ("values", "values", "d"),
                              ("max_abs_diff", "max |diff|", ".2e"), ("hf_same_choice", "same token", "d"),
                              ("min_top2_logit_gap", "min top-2 gap", ".2e")]))
    print({k: v for k, v in summary.items()})
    if args.out:
        for row in rows:
            del row["diffs"]
        command = full_command("python -m lamp_runtime.bench.vllm_logprobs", parser, args)
        write_json(args.out, {"bench": "vllm_logprobs", "command": command, "out": str(args.out),
                              "context": machine_context(backbone), "summary": summary, "prompts": rows})


if __name__ == "__main__":
    main()
