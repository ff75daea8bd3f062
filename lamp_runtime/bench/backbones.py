"""Compare backbone load options side by side: load time, weight memory, decode tokens/s, prefill.

    .venv/bin/python -m lamp_runtime.bench.backbones [--options float32/none bfloat16/none ...] [--repeats 3]

All options are loaded in this one process and measured interleaved (round-robin, `--repeats`
rounds) so that noise from other work on the machine hits each option alike; medians and
min..max are printed, plus each option's ratio to the first one. Greedy decoding of a fixed
prompt through our engine (batch 1 and batch 8), as the server runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from lamp_runtime.backbone.hf import load_backbone
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.engine.build import engine_for
from lamp_runtime.engine.step_engine import StepEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def decode_rate(engine: StepEngine, batch: int, new_tokens: int) -> tuple[float, float]:
    """(tokens/s over the whole batch, prefill ms) for `batch` identical greedy requests."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    requests = [GenerationRequest(PROMPT, None, params) for _ in range(batch)]
    started = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - started
    return sum(r.completion_tokens for r in results) / elapsed, results[0].prefill_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", nargs="+",
                        default=["float32/none", "bfloat16/none", "bfloat16/nf4", "float32/int8"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()

    engines, rows = {}, {}
    for spec in args.options:
        dtype, quantization = spec.split("/")
        backbone = load_backbone(BackboneOptions(dtype=dtype, quantization=quantization, device="cpu"))
        engines[spec] = engine_for(backbone)
        engines[spec].generate([GenerationRequest(PROMPT, None, SamplingParams(max_new_tokens=2))])  # warm-up
        rows[spec] = {"option": spec, "load_s": backbone.load_seconds, "weights_mb": backbone.weights_bytes / 1e6,
                      "b1": [], "b8": [], "prefill_ms": []}
    for _ in range(args.repeats):
        for spec, engine in engines.items():
            rate1, prefill = decode_rate(engine, 1, args.new_tokens)
            rate8, _ = decode_rate(engine, 8, args.new_tokens)
            rows[spec]["b1"].append(rate1)
            rows[spec]["b8"].append(rate8)
            rows[spec]["prefill_ms"].append(prefill)

    base = statistics.median(rows[args.options[0]]["b1"])
    print(f"{'option':16} {'load s':>7} {'weights MB':>10} {'tok/s b1 (min..max)':>22} {'tok/s b8':>9} "
          f"{'prefill ms':>10} {'b1 vs first':>11}")
    for spec in args.options:
        r = rows[spec]
        b1, b8, pf = statistics.median(r["b1"]), statistics.median(r["b8"]), statistics.median(r["prefill_ms"])
        print(f"{spec:16} {r['load_s']:7.1f} {r['weights_mb']:10.0f} {b1:8.1f} ({min(r['b1']):5.1f}..{max(r['b1']):5.1f})"
              f" {b8:9.1f} {pf:10.1f} {b1 / base:11.2f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(list(rows.values()), fh, indent=2)


if __name__ == "__main__":
    main()
