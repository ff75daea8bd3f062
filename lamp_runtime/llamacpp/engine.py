"""`LlamaCppEngine`: continuous batching of requests of any mix of tasks on llama.cpp, one
`llama_decode` per step for every running row.

Each batch row is a llama.cpp sequence with a KV stream of its own (`LlamaCppOptions.row_cells`
cells), so a decode row attends over its own cells only (one unified cache made every row attend
over every used cell: docs/llamacpp.md, "KV layout").

A step (1) admits waiting requests while batch rows last; (2) plans each newcomer's prefill: its
task's prompt keys/values are written into its stream from the prompt-KV cache in host memory
(computed once per task version, prompt_kv.py) and only its input rows run, as embedding rows
(EPT's offset on the first ones); (3) runs ONE decode holding a row for every running request's
last token and the newcomers' rows; (4) samples a token per row (greedy: numpy argmax on
llama.cpp's logits buffer; sampled rows and log-probabilities: the shared torch helpers, so seeds
and semantics are the HF engine's); (5) forks the n - 1 siblings of a request by seq_cp (a copy of
the parent's stream) and retires finished rows (seq_rm).

Fair rows (engine/fair_queue.py, EngineConfig.fair_preemption): when the fair queue names running
rows to pause so that a task below its share of the rows enters now, each row's cells are copied
to host memory (read_seq_state) and its stream freed; when its turn comes back they are written
into a free stream (write_seq_state) and it decodes on, answers unchanged (tests/runtime/
test_fair_rows.py).

A llama_batch holds token ids or embedding rows, not both. A step with newcomers runs, by default
(`LlamaCppOptions.mixed_steps = "embed"`), one decode: the running rows' tokens turned into
embedding rows (the GGUF's own dequantized table: llama.cpp's logits are bitwise those of the
tokens) and the newcomers' rows; "split" instead runs a token decode for the running rows and an
embedding decode for the newcomers. One decode measured faster with a KV stream per row
(docs/llamacpp.md's benchmark, `mixed` variants). Decode-only steps use a token batch.

Threads: ggml's threads (at most `ggml_threads`: EngineConfig.threads or the cores) do the model's
work, as many per step as threads.py's `ThreadChooser` finds fastest on the host now (a busy host
makes ggml's spin barriers slow with every core in use); torch only samples and scores rows, in
the loop thread with one intra-op thread (`threads`, set in `on_loop_start`), so the two thread
pools never compete for the cores.

`LlamaCppEngine` is a synchronous step core; `build_llamacpp_engine` returns it, and
lamp_runtime/engines/ wraps it in engine/step_loop.py's `StepLoopEngine` like the HF cores.
"""

from __future__ import annotations

import bisect
import ctypes
import heapq
import os
import time

import numpy as np
import torch

from ..adapters.registry import AdapterRegistry
from ..errors import RequestError
from ..prompts.cache import PromptCache
from ..prompts.prepared import assemble_embeddings, offset_inputs, prepare
from ..requests import GenerationRequest, GenerationResult, StepOutput
from ..engine.admission import resolve_request
from ..engine.base import EngineConfig, EngineStats, StepStats
from ..engine.fair_queue import task_key
from ..engine.logprobs import prompt_logprobs, token_logprobs
from ..engine.resident import ResidentAdapters
from ..engine.sampling import make_generator, next_token
from ..engine.request_state import RequestState
from ..engine.step_core import StepCoreBase
from ..prompts.prompt_kv import PromptKVLRU
from .native import Batch, lib, new_context, read_seq_state, write_seq_state
from .options import LLAMA_MAX_SEQ, LlamaCppOptions
from .prompt_kv import PromptState
from .threads import ThreadChooser, thread_candidates


class _Row:
    """A request's sequence in llama.cpp (its own KV stream): its id and the next position it writes."""

    __slots__ = ("seq", "seq_id", "pos")

    def __init__(self, seq: RequestState, seq_id: int, pos: int):
        self.seq, self.seq_id, self.pos = seq, seq_id, pos


class _Prefill:
    """A newcomer's rows to run: embeddings [n, d] from position `start` (after its shared prompt)."""

    __slots__ = ("row", "embeds", "start", "all_logits")

    def __init__(self, row: _Row, embeds: np.ndarray, start: int, all_logits: bool):
        self.row, self.embeds, self.start, self.all_logits = row, embeds, start, all_logits


# Prefill rows one step may run at least (more when a row's stream is longer): newcomers beyond
# them wait a step, so one burst of long prompts does not stall every running row for long.
PREFILL_ROWS = 2048


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LlamaCppEngine(StepCoreBase):
    kind = "llamacpp"
    supports_prompt_logprobs = True
    shares_prefill = True  # n samples fork from one prefill (seq_cp)

    def __init__(self, backbone, registry: AdapterRegistry | None = None, config: EngineConfig | None = None,
                 cache: PromptCache | None = None, options: LlamaCppOptions | None = None):
        self.backbone = backbone
        self.registry = registry if registry is not None else AdapterRegistry()
        self.config = config or EngineConfig()
        self.options = options or LlamaCppOptions()
        self.cache = cache or PromptCache(self.config.prompt_cache_bytes, "cpu", torch.float32)
        self.resident = ResidentAdapters(self.config.adapter_cache_bytes)
        self.settings = dict(backbone.settings.as_dict())
        self.threads = 1  # torch's, for sampling in the loop thread (see the module docstring)
        self.ggml_threads = self.config.threads or available_cores()
        self.thread_chooser = ThreadChooser(thread_candidates(self.ggml_threads, self.options.adaptive_threads))
        self._threads_set = self.ggml_threads  # what the context runs with (new_context's count)
        self.kv_bytes_per_token = backbone.info.kv_bytes_per_cell
        self._eos_ids = backbone.eos_token_ids()
        self._table = backbone.info.table
        # A row the fair queue names to pause (a task below its share waits for none) is copied
        # out of its stream (read_seq_state) and written back when it resumes (_pause, _resume).
        self._init_queue(can_pause=True)  # waiting items: RequestState
        self._running: list[_Row] = []
        self.last_step = StepStats()

        rows = self.config.max_batch_size
        if rows >= LLAMA_MAX_SEQ:
            raise ValueError(f"max_batch_size {rows} over llama.cpp's {LLAMA_MAX_SEQ - 1} sequences")
        self.row_cells = self.options.row_cells
        self.prompt_kv = (PromptKVLRU(self.config.prompt_kv_cache_bytes)
                          if self.config.prompt_kv_cache_bytes >= self.kv_bytes_per_token else None)
        self._free_ids = list(range(rows))  # a heap: the lowest id first (see _compact)
        # Embedding rows one step may run (newcomers' prefills, decode rows in "embed" mode): at
        # least one whole row's stream; admission keeps a step's newcomers within it.
        self.step_rows = max(self.row_cells, PREFILL_ROWS) + rows
        self._lib = lib()
        self.ctx = new_context(backbone.model, n_ctx=rows * self.row_cells, n_batch=self.step_rows,
                               n_ubatch=backbone.settings.n_ubatch, n_seq_max=rows, threads=self.ggml_threads,
                               flash_attention=self.options.flash_attention)
        self._mem = self._lib.llama_get_memory(self.ctx)
        self._vocab = self._table.shape[0]
        self._embeds = Batch(self.step_rows, backbone.hidden_size)  # prefills, prompt builds, mixed steps
        self._tokens = Batch(rows, 0)  # decode-only steps (and the decode half of a split step)
        self._split_logits = np.empty((rows, self._vocab), dtype=np.float32)
        self._logits_view: tuple[int, np.ndarray] | None = None  # (buffer address, [rows, vocab] view)

    # ---- submission (any thread) -------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> str:
        params = request.params
        if params.n > self.config.max_batch_size:
            raise RequestError(f"n={params.n} samples need as many batch rows; max_batch_size is "
                               f"{self.config.max_batch_size}")
        # a row's stream holds soft prompt + input + answer (each of the n samples has a row)
        context, name = ((self.row_cells, "a llama.cpp engine row's KV cells (row_cells, --llamacpp-row-cells)")
                         if self.row_cells < self.backbone.max_positions
                         else (self.backbone.max_positions, "the backbone's context"))
        entry, input_ids = resolve_request(request, self.registry, self.backbone.tokenizer, self.config,
                                           context, name, resident=self.resident)
        seq = self._sequence(request, input_ids, entry, 0)
        seq.forks = params.n - 1
        self._waiting.push(task_key(request.task_id), seq, seq.width)
        return request.request_id

    def stats(self) -> EngineStats:
        return EngineStats(
            kind=self.kind, waiting=self.num_waiting, running=self.num_running, prompt_cache=self.cache.stats(),
            adapter_cache=self.resident.stats(), prompt_kv=self.prompt_kv_stats(), prompt_kv_unit="requests",
            kv_cache_bytes=self.kv_cache_bytes(), backbone_bytes=self.backbone.weights_bytes, device="cpu",
            settings={**self.settings, "threads": str(self.ggml_threads), "row_cells": str(self.row_cells),
                      "threads_policy": "adaptive" if self.thread_chooser.adaptive else "fixed"},
            compute_threads=self.thread_chooser.current, tasks=self._waiting.stats())

    def on_loop_start(self) -> None:
        """torch samples on the loop thread with one intra-op thread: ggml's threads own the cores."""
        torch.set_num_threads(self.threads)

    def kv_cache_bytes(self) -> int:
        return sum(row.pos for row in list(self._running)) * self.kv_bytes_per_token

    def has_work(self) -> bool:
        return not self._waiting.empty() or bool(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run `requests` to completion (batched together); results in order (first sample each)."""
        ids = [self.submit(r) for r in requests]
        results: dict[str, GenerationResult] = {}
        while len(results) < len(ids):
            for out in self.step():
                if out.result is not None and out.result.index == 0:
                    results[out.request_id] = out.result
        return [results[i] for i in ids]

    def close(self) -> None:
        if self.ctx:
            self._lib.llama_free(self.ctx)
            self.ctx = None

    # ---- the loop (one thread) ---------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        started = time.perf_counter()
        outputs = self._handle_aborts()
        admitted = self._admit()
        resumed = [s for s in admitted if s.paused is not None]
        newcomers = [s for s in admitted if s.paused is None]
        if resumed:
            self._resume(resumed)
        stats = StepStats(prefilled=len(newcomers))
        for seq in newcomers:
            seq.admitted_at = started
        outputs += self._run(newcomers, stats)
        stats.seconds = time.perf_counter() - started
        self.last_step = stats
        return outputs

    def _run(self, newcomers: list[RequestState], stats: StepStats) -> list[StepOutput]:
        started = time.perf_counter()
        decoding = list(self._running)
        decode_only = bool(decoding) and not newcomers
        threads = self.thread_chooser.choose(len(decoding)) if decode_only else self.thread_chooser.current
        self._set_threads(threads)
        prefills = [self._plan(seq, stats) for seq in newcomers]  # may decode prompt-KV builds
        if not decoding and not prefills:
            return []
        stats.prefill_tokens += sum(p.embeds.shape[0] for p in prefills)
        stats.prefill_forwards += 1 if prefills else 0
        stats.computed_tokens = len(decoding) + stats.prefill_tokens
        forward_started = time.perf_counter()
        logits = self._forward(decoding, prefills)  # decode rows' logits first, then each newcomer's
        if decode_only:
            self.thread_chooser.record(threads, len(decoding), time.perf_counter() - forward_started)
        elapsed = time.perf_counter() - started
        for row in decoding:
            row.pos += 1
        sample_at = list(range(len(decoding)))
        at = len(decoding)
        for p in prefills:
            seq, count = p.row.seq, (p.embeds.shape[0] if p.all_logits else 1)
            if p.all_logits:
                seq.prompt_logprobs = prompt_logprobs(torch.from_numpy(logits[at:at + count]), seq.soft_prompt_tokens,
                                                      seq.input_ids, seq.params.prompt_logprobs, seq.tokenizer)
            at += count
            sample_at.append(at - 1)
            seq.prefill_seconds = elapsed
            p.row.pos = p.start + p.embeds.shape[0]
            self._running.append(p.row)
        rows, sample_at = self._fork(decoding + [p.row for p in prefills], sample_at)
        stats.batch_size = len(rows)
        stats.distinct_tasks = len({r.seq.request.task_id for r in rows})
        outputs, finished = self._sample(rows, logits, sample_at)
        self._charge(rows)
        self._retire(finished)
        return outputs

    def _set_threads(self, threads: int) -> None:
        if threads != self._threads_set:
            self._lib.llama_set_n_threads(self.ctx, threads, threads)
            self._threads_set = threads

    def _charge(self, rows: list[_Row]) -> None:
        """Charge each sampled token (one per row this step) to its task's fair-queue counter."""
        counts: dict[str, int] = {}
        for row in rows:
            task = task_key(row.seq.request.task_id)
            counts[task] = counts.get(task, 0) + 1
        for task, tokens in counts.items():
            self._waiting.charge(task, generated=tokens)

    def _forward(self, decoding: list[_Row], prefills: list[_Prefill]) -> np.ndarray:
        """One decode for every row (two in split mode): logits [outputs, vocab], decode rows first."""
        split = bool(decoding and prefills and self.options.mixed_steps == "split")
        if decoding and (split or not prefills):
            batch = self._tokens
            batch.clear()
            self._add_decode_rows(batch, decoding)
            batch.tokens[:len(decoding)] = [r.seq.last_token for r in decoding]
            batch.decode(self.ctx)
            if not prefills:
                return self._logits(len(decoding))
            np.copyto(self._split_logits[:len(decoding)], self._logits(len(decoding)))
        batch = self._embeds
        batch.clear()
        if decoding and not split:
            sl = self._add_decode_rows(batch, decoding)
            np.take(self._table, [r.seq.last_token for r in decoding], axis=0, out=batch.embd[sl])
        outputs = 0 if split else len(decoding)
        for p in prefills:
            sl = batch.add(p.embeds.shape[0], p.row.seq_id, p.start, "all" if p.all_logits else "last")
            batch.embd[sl] = p.embeds
            outputs += p.embeds.shape[0] if p.all_logits else 1
        batch.decode(self.ctx)
        logits = self._logits(outputs)
        return np.concatenate([self._split_logits[:len(decoding)], logits]) if split else logits

    @staticmethod
    def _add_decode_rows(batch: Batch, rows: list[_Row]) -> slice:
        n = len(rows)
        batch.pos[:n] = [r.pos for r in rows]
        batch.seq[:n] = [r.seq_id for r in rows]
        batch.logits[:n] = 1
        batch.n = n
        return slice(0, n)

    def _logits(self, outputs: int) -> np.ndarray:
        """A view of llama.cpp's logits buffer (valid until the next decode). The view is made once
        per buffer (llama.cpp keeps it until a decode needs more outputs): making one costs 40 us,
        1% of a decode step at batch 1."""
        address = ctypes.cast(self._lib.llama_get_logits(self.ctx), ctypes.c_void_p).value
        view = self._logits_view
        if view is None or view[0] != address or view[1].shape[0] < outputs:
            array = (ctypes.c_float * (outputs * self._vocab)).from_address(address)
            view = self._logits_view = (address, np.frombuffer(array, dtype=np.float32).reshape(outputs, self._vocab))
        return view[1][:outputs]

    def _sample(self, rows: list[_Row], logits: np.ndarray, sample_at: list[int]):
        """A token per row: greedy rows by one numpy argmax, the others by the shared torch sampler
        (their own generators), log-probabilities by the shared helper."""
        greedy = [i for i, r in enumerate(rows) if r.seq.params.greedy]
        picks = dict(zip(greedy, _argmax_rows(logits, [sample_at[i] for i in greedy]))) if greedy else {}
        outputs, finished = [], []
        for i, row in enumerate(rows):
            seq = row.seq
            token = picks.get(i)
            if token is None:
                token = next_token(torch.from_numpy(logits[sample_at[i]]), seq.params, seq.generator)
            logprob = None
            if seq.params.logprobs is not None:
                at = sample_at[i]
                logprob = token_logprobs(torch.from_numpy(logits[at:at + 1]), [token], seq.params.logprobs,
                                         seq.tokenizer)[0]
            outputs.append(seq.accept(token, logprob))
            if seq.finish_reason is not None:
                finished.append(row)
        return outputs, finished

    # ---- admission, prefill plans, forks, retirement -------------------------------------------

    def _handle_aborts(self) -> list[StepOutput]:
        aborted = self._take_aborted()
        if not aborted:
            return []
        dropped = self._waiting.remove(lambda s: s.request.request_id in aborted)
        for seq in dropped:
            if seq.paused is not None:  # paused while running: its kept cells and its prompt pin go
                seq.paused = None
                self._unpin(seq)
        leaving = [r for r in self._running if r.seq.request.request_id in aborted]
        outputs = [s.abort() for s in dropped] + [r.seq.abort() for r in leaving]
        self._retire(leaving)
        return outputs

    def _admit(self) -> list[RequestState]:
        """Newcomers (and paused rows resuming) in the fair queue's order while batch rows last
        and newcomers' prefill rows fit one step (`step_rows`, at worst a whole prompt each); each
        newcomer is charged its context tokens. Rows the queue names to make room for a task below
        its share are paused here and handed back to it."""
        if self._waiting.empty():
            return []
        planned = 0

        def fits(seq: RequestState) -> bool:  # called by the queue, for the item it takes next
            nonlocal planned
            rows = 0 if seq.paused is not None else seq.soft_prompt_tokens + len(seq.input_ids)
            if planned and planned + rows > self.step_rows - self.config.max_batch_size:
                return False
            planned += rows
            return True

        victims, taken = self._waiting.admit([task_key(r.seq.request.task_id) for r in self._running],
                                             self.config.max_batch_size - len(self._running),
                                             prompt_tokens=lambda s: s.soft_prompt_tokens + len(s.input_ids),
                                             fits=fits)
        for seq in self._pause(victims):
            self._waiting.requeue(task_key(seq.request.task_id), seq)
        return taken

    def _pause(self, indices: list[int]) -> list[RequestState]:
        """Copy these running rows' cells to host memory (`seq.paused`: state and position) and
        free their streams; their prompts stay pinned."""
        rows = [self._running[i] for i in indices]
        for row in rows:
            row.seq.paused = (read_seq_state(self.ctx, row.seq_id), row.pos)
        self._retire(rows, release=False)
        return [row.seq for row in rows]

    def _resume(self, sequences: list[RequestState]) -> None:
        """Write paused rows' cells back into free streams; they decode from their last token."""
        for seq in sequences:
            state, pos = seq.paused
            row = _Row(seq, heapq.heappop(self._free_ids), pos)
            write_seq_state(self.ctx, state, row.seq_id)
            seq.paused = None
            self._running.append(row)
        self._running.sort(key=lambda r: r.seq_id)

    def _plan(self, seq: RequestState, stats: StepStats) -> _Prefill:
        """Give the newcomer a row (its own stream); put its task's prompt KV there (from the
        prompt-KV cache, or computed now and kept on a miss) and return the rows still to run."""
        row = _Row(seq, heapq.heappop(self._free_ids), 0)
        inputs = self.backbone.embed(torch.tensor(seq.input_ids, dtype=torch.long))
        scoring = seq.params.prompt_logprobs is not None
        if seq.entry is None:
            return _Prefill(row, inputs.numpy(), 0, scoring)
        adapter = seq.entry.adapter
        seq.prepared = self.cache.acquire(seq.entry.cache_key, lambda: prepare(adapter))
        # no input: the prompt's last position gives the token; scoring the input: its first
        # token's log-probability comes from the prompt's last position. Both run the prompt.
        cached = (self.prompt_kv is not None and seq.input_ids and not scoring
                  and seq.prepared.prompt.shape[0] * self.kv_bytes_per_token <= self.prompt_kv.max_bytes)
        if not cached:
            return _Prefill(row, assemble_embeddings(seq.prepared, inputs).numpy(), 0, scoring)
        start = self._prompt_kv_into(row, seq, stats)
        return _Prefill(row, offset_inputs(seq.prepared, inputs).numpy(), start, False)

    def _prompt_kv_into(self, row: _Row, seq: RequestState, stats: StepStats) -> int:
        """Fill the row's stream with its task version's prompt KV: the cached copy written in on a
        hit; on a miss the prompt decoded there and a copy kept. Returns the positions it holds."""
        key = seq.entry.cache_key
        state: PromptState | None = self.prompt_kv.acquire_cached(key)
        if state is not None:
            write_seq_state(self.ctx, state.data, row.seq_id)
            seq.prompt_reused = True
            stats.prompt_kv_hits += 1
            stats.prompt_tokens_reused += state.tokens
        else:
            prompt = seq.prepared.prompt.numpy()
            self._decode_prompt(prompt, row.seq_id, stats)
            built = PromptState(read_seq_state(self.ctx, row.seq_id), prompt.shape[0],
                                seq.entry.adapter.prompt_tokens)
            state = self.prompt_kv.acquire(key, lambda: built)
        self.prompt_kv.release(key)
        return state.tokens

    def _decode_prompt(self, prompt: np.ndarray, seq_id: int, stats: StepStats) -> None:
        batch = self._embeds
        batch.clear()
        sl = batch.add(prompt.shape[0], seq_id, 0, "none")
        batch.embd[sl] = prompt
        batch.decode(self.ctx)
        stats.prefill_forwards += 1
        stats.prefill_tokens += prompt.shape[0]

    def _fork(self, rows: list[_Row], sample_at: list[int]) -> tuple[list[_Row], list[int]]:
        """The n - 1 siblings of each request just prefilled: a copy of its sequence's cells (the
        context is computed once; copied now, not by seq_cp, which defers a cross-stream copy of
        the whole stream to the next decode) and the same first-token logits, own generator."""
        for i in [i for i, r in enumerate(rows) if r.seq.forks]:
            parent = rows[i]
            cells = read_seq_state(self.ctx, parent.seq_id)  # once for all n - 1 siblings
            for index in range(1, parent.seq.forks + 1):
                child = parent.seq.fork(index, make_generator(parent.seq.params, self.generator_device, index))
                if parent.seq.entry is not None:
                    entry = parent.seq.entry
                    child.prepared = self.cache.acquire(entry.cache_key, lambda: prepare(entry.adapter))
                row = _Row(child, heapq.heappop(self._free_ids), parent.pos)
                write_seq_state(self.ctx, cells, row.seq_id)
                self._running.append(row)
                rows.append(row)
                sample_at.append(sample_at[i])
            parent.seq.forks = 0
        return rows, sample_at

    def _retire(self, rows: list[_Row], release: bool = True) -> None:
        """Empty finished (or paused: `release=False`) rows' streams (seq_rm), free their sequence
        ids and unpin their prompts; then keep the running rows' ids compact (_compact)."""
        if not rows:
            return
        leaving = {id(r) for r in rows}
        self._running = [r for r in self._running if id(r) not in leaving]
        for row in rows:
            self._lib.llama_memory_seq_rm(self._mem, row.seq_id, -1, -1)
            heapq.heappush(self._free_ids, row.seq_id)
            if release:
                self._unpin(row.seq)
        self._compact()

    def _compact(self) -> None:
        """Keep the running rows on sequence ids 0..R-1, in that order in `_running`: llama.cpp
        splits a decode batch over KV streams into micro-batches of consecutive sequence ids in
        increasing order (llama_batch_allocr::split_equal), so rows on ids with holes between them,
        or out of order, run as several micro-batches, each reading every weight again. A row
        above a free id moves down: its cells are copied (only those it uses) and its old stream
        emptied."""
        by_id = sorted(self._running, key=lambda r: r.seq_id)
        while by_id and self._free_ids and self._free_ids[0] < by_id[-1].seq_id:
            row, low = by_id.pop(), heapq.heappop(self._free_ids)
            write_seq_state(self.ctx, read_seq_state(self.ctx, row.seq_id), low)
            self._lib.llama_memory_seq_rm(self._mem, row.seq_id, -1, -1)
            heapq.heappush(self._free_ids, row.seq_id)
            row.seq_id = low
            bisect.insort(by_id, row, key=lambda r: r.seq_id)
        self._running.sort(key=lambda r: r.seq_id)

    def _unpin(self, seq: RequestState) -> None:
        if seq.prepared is not None:
            seq.prepared = None
            self.cache.release(seq.entry.cache_key)


def _argmax_rows(logits: np.ndarray, at: list[int]) -> list[int]:
    """The argmax of each logits row in `at`; rows 0..n-1 (every row of a decode step) are read in
    place: gathering them copies 196 kB a row first (SmolLM2's vocabulary)."""
    if at == list(range(len(at))):
        return np.argmax(logits[:len(at)], axis=1).tolist()
    return np.argmax(logits[at], axis=1).tolist()


def build_llamacpp_engine(backbone_options=None, config: EngineConfig | None = None,
                          options: LlamaCppOptions | None = None, registry: AdapterRegistry | None = None,
                          probe_cache: "os.PathLike | None" = None) -> LlamaCppEngine:
    """Read and check the GGUF, probe (or recall) the kernel settings this host runs, load, start."""
    from pathlib import Path

    from ..backbone.options import BackboneOptions
    from .backbone import check_memory, gguf_path, load_llamacpp_backbone, read_gguf, refuse_options
    from .native import KernelSettings, weight_type
    from .probe import probe_settings
    from .requantize import requantized_gguf

    config = config or EngineConfig()
    options = options or LlamaCppOptions()
    backbone_options = refuse_options(backbone_options or BackboneOptions())
    given, _ = gguf_path(backbone_options)
    threads = config.threads or available_cores()
    path = given if options.requantize is None else requantized_gguf(given, options.requantize, threads)
    info = read_gguf(path)  # refuses what is not a runnable GGUF before any child starts
    kv_cells = config.max_batch_size * options.row_cells
    if options.probe:
        check_memory(info, kv_cells, KernelSettings())
        report = probe_settings(path, threads, cache_file=Path(probe_cache) if probe_cache else None)
        settings, source = report.chosen, report.source
    else:
        settings, source = KernelSettings(), "default"
    backbone = load_llamacpp_backbone(backbone_options, settings, kv_cells, info)
    engine = LlamaCppEngine(backbone, registry, config, options=options)
    engine.settings["probe"] = source
    # A file already of the asked type is served as it is: "requantized" only when rewritten.
    engine.settings["weights"] = weight_type(backbone.model) + (" requantized" if path != given else "")
    return engine
