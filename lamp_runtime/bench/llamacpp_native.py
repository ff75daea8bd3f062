"""bench.llamacpp's floor: what llama_decode alone takes in the engine's own context, with no engine.

The llama.cpp engine is built in this process (same GGUF, kernel settings, KV layout and threads
as the served one) but its loop never runs: a bare ctypes loop drives its context instead.
- ("decode", "bare-loop"): one sequence, one token a llama_decode, its logits fetched, as long as
  the engine's decode sample; against the engine's decode this is what the engine's own Python
  costs, against llama-bench what the context (its KV layout, logits) costs;
- ("prefill", "native-p200" / "native-p2"): the same request input as the engine's warm-prefill
  samples, as embedding rows after 200 / 2 soft-prompt rows already decoded into the sequence (its
  prompt KV, as the cache gives it): the llama_decode alone. The difference is the input rows'
  attention over 198 more cached positions; `info()["attention_flops_p200_minus_p2"]` says how
  much arithmetic that is.

The "-nofa" side runs the same with llama.cpp's flash attention off (LlamaCppOptions
.flash_attention), and its `info` says whether a text fed as its token embeddings still answers
like its tokens there (greedy, EXACTNESS_TOKENS steps; the engine's exactness goal).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.bench.llamacpp import PREFILL_INPUT, engine_config
from lamp_runtime.bench.workload import vocabulary_prompt
from lamp_runtime.llamacpp.engine import build_llamacpp_engine
from lamp_runtime.llamacpp.native import Batch, lib
from lamp_runtime.llamacpp.options import LlamaCppOptions

PROMPTS = {"p200": (200, 8), "p2": (2, 9)}  # length, seed: bench.llamacpp's p200 / p2
EXACTNESS_TEXT, EXACTNESS_TOKENS = "The capital of France is", 24


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """What a large float32 matrix product reaches on `threads` cores (torch.mm): the scale the
    attention's arithmetic rate is read against."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up: oneDNN/BLAS picks its kernel
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return 2 * size ** 3 * repeats / (time.perf_counter() - started) / 1e9
    finally:
        torch.set_num_threads(before)


class NativeLoopSide:
    def __init__(self, settings: dict):
        self.settings = settings
        self.matmul_gflops = matmul_gflops(settings["threads"])  # before llama.cpp's threads exist here
        torch.set_num_threads(1)  # as the engine sides
        self.flash_attention = not settings["kind"].endswith("-nofa")
        self.core = build_llamacpp_engine(BackboneOptions(path=settings["gguf"]), engine_config(settings),
                                          LlamaCppOptions(flash_attention=self.flash_attention))
        self.lib, self.ctx = lib(), self.core.ctx
        self.memory = self.lib.llama_get_memory(self.ctx)
        table = self.core.backbone.info.table
        rows = torch.from_numpy(np.array(table))  # a writable copy, as bench.llamacpp's sides draw from
        self.prompts = {name: vocabulary_prompt(rows, length, seed).numpy() for name, (length, seed) in PROMPTS.items()}
        ids = self.core.backbone.tokenizer(PREFILL_INPUT)["input_ids"]
        self.input_rows = np.ascontiguousarray(table[ids], dtype=np.float32)
        self.tokens = Batch(1, 0)
        self.embeds = Batch(256, table.shape[1])

    def info(self) -> dict:
        model, L = self.core.backbone.model, self.lib
        heads, layers = L.llama_model_n_head(model), L.llama_model_n_layer(model)
        head_dim = L.llama_model_n_embd(model) // heads
        # per input row, head, layer and cached position: a q.k dot and a value update of head_dim each
        extra = PROMPTS["p200"][0] - PROMPTS["p2"][0]
        flops = 4 * head_dim * heads * layers * extra * self.input_rows.shape[0]
        by_tokens, by_rows = self.greedy(as_rows=False), self.greedy(as_rows=True)
        return {"flash_attention": self.flash_attention, "input_rows": int(self.input_rows.shape[0]), "heads": heads,
                "layers": layers, "head_dim": head_dim, "attention_flops_p200_minus_p2": flops,
                "float32_matmul_gflops": self.matmul_gflops,
                "settings": self.core.settings, "greedy_by_tokens": by_tokens, "greedy_by_embedding_rows": by_rows,
                "embedding_rows_answer_like_tokens": by_tokens == by_rows}

    def measure(self, variant) -> dict:
        if variant[1].startswith("bare-loop"):
            return {"tokens_per_s": self._decode(self.settings["decode_tokens"])}
        return {"ms": self._prefill(self.prompts[variant[1].rsplit("-", 1)[-1]])}

    def greedy(self, as_rows: bool) -> list[int]:
        """EXACTNESS_TOKENS greedy tokens after EXACTNESS_TEXT, fed as its tokens or as their embedding rows."""
        L, table = self.lib, self.core.backbone.info.table
        ids = self.core.backbone.tokenizer(EXACTNESS_TEXT)["input_ids"]
        L.llama_memory_seq_rm(self.memory, 0, -1, -1)
        batch = self.embeds if as_rows else Batch(len(ids), 0)
        batch.clear()
        rows = batch.add(len(ids), 0, 0, "last")
        if as_rows:
            batch.embd[rows] = table[ids]
        else:
            batch.tokens[rows] = ids
        batch.decode(self.ctx)
        answer = []
        for pos in range(len(ids), len(ids) + EXACTNESS_TOKENS):
            answer.append(int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1),
                                                               shape=(table.shape[0],)))))
            self.tokens.clear()
            self.tokens.tokens[self.tokens.add(1, 0, pos, "last")] = answer[-1]
            self.tokens.decode(self.ctx)
        return answer

    def _decode(self, tokens: int) -> float:
        L, batch = self.lib, self.tokens
        L.llama_memory_seq_rm(self.memory, 0, -1, -1)
        started = time.perf_counter()
        for i in range(tokens + 1):  # the first decode stands for the prefill: not timed
            if i == 1:
                started = time.perf_counter()
            batch.clear()
            batch.tokens[batch.add(1, 0, i, "last")] = 1000 + i
            batch.decode(self.ctx)
            L.llama_get_logits_ith(self.ctx, -1)
        return tokens / (time.perf_counter() - started)

    def _prefill(self, prompt: np.ndarray) -> float:
        batch = self.embeds
        self.lib.llama_memory_seq_rm(self.memory, 0, -1, -1)
        batch.clear()
        batch.embd[batch.add(len(prompt), 0, 0, "none")] = prompt
        batch.decode(self.ctx)
        times = []
        for _ in range(3):  # as prefill_ms: the median of three
            self.lib.llama_memory_seq_rm(self.memory, 0, len(prompt), -1)
            batch.clear()
            batch.embd[batch.add(len(self.input_rows), 0, len(prompt), "last")] = self.input_rows
            started = time.perf_counter()
            batch.decode(self.ctx)
            self.lib.llama_get_logits_ith(self.ctx, -1)
            times.append(time.perf_counter() - started)
        return sorted(times)[1] * 1000

    def close(self) -> None:
        self.core.close()
