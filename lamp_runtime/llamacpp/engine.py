"""`LlamaCppEngine`: continuous batching of requests of any mix of tasks on llama.cpp, one
`llama_decode` per step for every running row.

A step (1) admits waiting requests while batch rows and KV cells last; (2) plans each newcomer's
prefill: its task's prompt keys/values are shared from the prompt-KV cache by seq_cp (built once
per task version, prompt_kv.py) and only its input rows run, as embedding rows (EPT's offset on
the first ones); (3) runs ONE decode holding a row for every running request's last token and the
newcomers' rows; (4) samples a token per row (greedy: numpy argmax on llama.cpp's logits buffer;
sampled rows and log-probabilities: the shared torch helpers, so seeds and semantics are the HF
engine's); (5) forks the n - 1 siblings of a request by seq_cp and retires finished rows (seq_rm).

A llama_batch holds token ids or embedding rows, not both. A step with newcomers runs, by default
(`LlamaCppOptions.mixed_steps = "split"`), a token decode for the running rows and an embedding
decode for the newcomers' rows; "embed" instead turns the decode rows' tokens into embedding rows
(the GGUF's own dequantized table: llama.cpp's logits are bitwise those of the tokens) and runs one
decode. Split measured faster (docs/llamacpp.md's benchmark, `mixed` variants). Decode-only steps
use a token batch.

Threads: ggml's threads (at most `ggml_threads`: EngineConfig.threads or the cores) do the model's
work, as many per step as threads.py's `ThreadChooser` finds fastest on the host now (a busy host
makes ggml's spin barriers slow with every core in use); torch only samples and scores rows, in
the loop thread with one intra-op thread (`threads`, set in `on_loop_start`), so the two thread
pools never compete for the cores.

`LlamaCppEngine` is a synchronous step core; `build_llamacpp_engine` returns it, and
lamp_runtime/engines/ wraps it in engine/step_loop.py's `StepLoopEngine` like the HF cores.
"""

from __future__ import annotations

import os
import threading
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
from ..engine.fair_queue import FairQueue, TaskLimits, for_config, task_key
from ..engine.logprobs import prompt_logprobs, token_logprobs
from ..engine.resident import ResidentAdapters
from ..engine.sampling import make_generator, next_token
from ..engine.request_state import RequestState
from .native import Batch, lib, new_context
from .options import LLAMA_MAX_SEQ, LlamaCppOptions
from .prompt_kv import PromptSeq, PromptSeqCache
from .threads import ThreadChooser, thread_candidates


class _Row:
    """A request's sequence in llama.cpp: its id, the next position it writes, the cells it reserved."""

    __slots__ = ("seq", "seq_id", "pos", "reserved")

    def __init__(self, seq: RequestState, seq_id: int, pos: int, reserved: int):
        self.seq, self.seq_id, self.pos, self.reserved = seq, seq_id, pos, reserved


class _Prefill:
    """A newcomer's rows to run: embeddings [n, d] from position `start` (after its shared prompt)."""

    __slots__ = ("row", "embeds", "start", "all_logits")

    def __init__(self, row: _Row, embeds: np.ndarray, start: int, all_logits: bool):
        self.row, self.embeds, self.start, self.all_logits = row, embeds, start, all_logits


class _NoPromptSeq(Exception):
    """No sequence id is free for a prompt build (the request then runs its prompt itself)."""


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LlamaCppEngine:
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
        self._lock = threading.Lock()
        # Fair between tasks (engine/fair_queue.py): the order newcomers enter the batch.
        self._waiting: FairQueue[RequestState] = for_config(self.config)
        self._aborted: set[str] = set()
        self._running: list[_Row] = []
        self.last_step = StepStats()

        rows = self.config.max_batch_size
        if rows >= LLAMA_MAX_SEQ:
            raise ValueError(f"max_batch_size {rows} over llama.cpp's {LLAMA_MAX_SEQ - 1} sequences")
        cells = self.options.kv_cells
        prompt_seqs = min(self.options.prompt_kv_sequences, LLAMA_MAX_SEQ - rows)
        prompt_bytes = min(self.config.prompt_kv_cache_bytes, cells // 4 * self.kv_bytes_per_token)
        self.prompt_kv = (PromptSeqCache(prompt_bytes, list(range(rows, rows + prompt_seqs)))
                          if prompt_bytes >= self.kv_bytes_per_token and prompt_seqs else None)
        # Cells requests may reserve: the rest of the cache beyond what cached prompts may hold.
        self.request_cells = cells - (prompt_bytes // self.kv_bytes_per_token if self.prompt_kv else 0)
        self._free_ids = list(range(rows - 1, -1, -1))
        self._reserved = 0
        self._lib = lib()
        self.ctx = new_context(backbone.model, n_ctx=cells, n_batch=cells, n_ubatch=backbone.settings.n_ubatch,
                               n_seq_max=rows + prompt_seqs, threads=self.ggml_threads,
                               flash_attention=self.options.flash_attention)
        self._mem = self._lib.llama_get_memory(self.ctx)
        self._vocab = self._table.shape[0]
        self._embeds = Batch(cells, backbone.hidden_size)  # prefills, prompt builds, mixed steps
        self._tokens = Batch(rows, 0)  # decode-only steps (and the decode half of a split step)
        self._split_logits = np.empty((rows, self._vocab), dtype=np.float32)

    # ---- submission (any thread) -------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> str:
        params = request.params
        if params.n > self.config.max_batch_size:
            raise RequestError(f"n={params.n} samples need as many batch rows; max_batch_size is "
                               f"{self.config.max_batch_size}")
        entry, input_ids = resolve_request(request, self.registry, self.backbone.tokenizer, self.config,
                                           min(self.backbone.max_positions, self.request_cells),
                                           resident=self.resident)
        seq = self._sequence(request, input_ids, entry, 0)
        seq.forks = params.n - 1
        if self._cells_needed(seq) > self.request_cells:
            raise RequestError(f"soft prompt + input + {params.n} x max_new_tokens need {self._cells_needed(seq)} "
                               f"KV cells; the llama.cpp engine holds {self.request_cells} for requests")
        self._waiting.push(task_key(request.task_id), seq, seq.width)
        return request.request_id

    def _sequence(self, request, input_ids, entry, index: int) -> RequestState:
        generator = make_generator(request.params, torch.device("cpu"), index)
        return RequestState(request, input_ids, entry, generator, self.backbone.tokenizer, self._eos_ids, index)

    @staticmethod
    def _cells_needed(seq: RequestState) -> int:
        return seq.soft_prompt_tokens + len(seq.input_ids) + seq.width * seq.params.max_new_tokens

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def set_task_limits(self, task_id: str, limits: TaskLimits) -> None:
        self._waiting.set_limits(task_key(task_id), limits)

    def discard(self, cache_key) -> None:
        """Forget an adapter version's prompt and prompt KV (re-registered or deleted); its cells are
        freed by the loop at its next step (requests still running on it keep their shared copy)."""
        self.cache.discard(cache_key)
        self.resident.discard(cache_key)
        if self.prompt_kv is not None:
            self.prompt_kv.discard(cache_key)

    def prompt_kv_stats(self):
        return self.prompt_kv.stats() if self.prompt_kv is not None else None

    def stats(self) -> EngineStats:
        return EngineStats(
            kind=self.kind, waiting=self.num_waiting, running=self.num_running, prompt_cache=self.cache.stats(),
            adapter_cache=self.resident.stats(), prompt_kv=self.prompt_kv_stats(), prompt_kv_unit="requests",
            kv_cache_bytes=self.kv_cache_bytes(), backbone_bytes=self.backbone.weights_bytes, device="cpu",
            settings={**self.settings, "threads": str(self.ggml_threads),
                      "threads_policy": "adaptive" if self.thread_chooser.adaptive else "fixed"},
            compute_threads=self.thread_chooser.current, tasks=self._waiting.stats())

    def on_loop_start(self) -> None:
        """torch samples on the loop thread with one intra-op thread: ggml's threads own the cores."""
        torch.set_num_threads(self.threads)

    def kv_cache_bytes(self) -> int:
        return sum(row.pos for row in list(self._running)) * self.kv_bytes_per_token

    def has_work(self) -> bool:
        return len(self._waiting) > 0 or bool(self._running)

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
        self._free_prompt_seqs()
        newcomers = self._admit()
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
        """A view of llama.cpp's logits buffer (valid until the next decode)."""
        pointer = self._lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(pointer, shape=(outputs, self._vocab))

    def _sample(self, rows: list[_Row], logits: np.ndarray, sample_at: list[int]):
        """A token per row: greedy rows by one numpy argmax, the others by the shared torch sampler
        (their own generators), log-probabilities by the shared helper."""
        greedy = [i for i, r in enumerate(rows) if r.seq.params.greedy]
        picks = dict(zip(greedy, np.argmax(logits[[sample_at[i] for i in greedy]], axis=1).tolist())) if greedy else {}
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
        with self._lock:
            aborted, self._aborted = self._aborted, set()
        if not aborted:
            return []
        dropped = self._waiting.remove(lambda s: s.request.request_id in aborted)
        leaving = [r for r in self._running if r.seq.request.request_id in aborted]
        outputs = [s.abort() for s in dropped] + [r.seq.abort() for r in leaving]
        self._retire(leaving)
        return outputs

    def _admit(self) -> list[RequestState]:
        """Newcomers in the fair queue's order while batch rows and KV cells last (each reserves
        its cells now, so no decode runs out of them); each is charged its context tokens."""

        def reserve(seq: RequestState) -> bool:  # called by the queue, for the item it takes next
            needed = self._cells_needed(seq)
            if self._reserved + needed > self.request_cells:
                return False
            self._reserved += needed
            return True

        rows = self.config.max_batch_size - len(self._running)
        return self._waiting.pop_fitting(rows, prompt_tokens=lambda s: s.soft_prompt_tokens + len(s.input_ids),
                                         fits=reserve)

    def _plan(self, seq: RequestState, stats: StepStats) -> _Prefill:
        """Give the newcomer a sequence; share its task's prompt KV into it (building it on a miss)
        and return the rows still to run."""
        row = _Row(seq, self._free_ids.pop(), 0, self._cells_needed(seq) - seq.forks * seq.params.max_new_tokens)
        inputs = self.backbone.embed(torch.tensor(seq.input_ids, dtype=torch.long))
        scoring = seq.params.prompt_logprobs is not None
        if seq.entry is None:
            return _Prefill(row, inputs.numpy(), 0, scoring)
        adapter = seq.entry.adapter
        seq.prepared = self.cache.acquire(seq.entry.cache_key, lambda: prepare(adapter))
        shared = None
        if self.prompt_kv is not None and seq.input_ids and not scoring:
            # no input: the prompt's last position gives the token; scoring the input: its first
            # token's log-probability comes from the prompt's last position
            shared = self._shared_prompt(seq, stats)
        if shared is None:
            return _Prefill(row, assemble_embeddings(seq.prepared, inputs).numpy(), 0, scoring)
        self._lib.llama_memory_seq_cp(self._mem, shared.seq_id, row.seq_id, -1, -1)
        self.prompt_kv.release(seq.entry.cache_key)  # the request holds the cells now
        return _Prefill(row, offset_inputs(seq.prepared, inputs).numpy(), shared.tokens, False)

    def _shared_prompt(self, seq: RequestState, stats: StepStats) -> PromptSeq | None:
        """The task version's prompt sequence, pinned (built now on a miss); None when the cache
        has no room for it (pinned entries fill it): the row then runs its prompt itself."""
        key, prompt = seq.entry.cache_key, seq.prepared.prompt
        hit = key in self.prompt_kv
        if not hit:
            if not self.prompt_kv.make_room(prompt.shape[0] * self.kv_bytes_per_token):
                return None
            self._free_prompt_seqs()
        try:
            shared = self.prompt_kv.acquire(
                key, lambda: self._build_prompt(prompt.numpy(), seq.entry.adapter.prompt_tokens, stats))
        except _NoPromptSeq:  # discarded by another thread between the lookup and here, with no id free
            return None
        if hit:
            seq.prompt_reused = True
            stats.prompt_kv_hits += 1
            stats.prompt_tokens_reused += shared.tokens
        return shared

    def _build_prompt(self, prompt: np.ndarray, unpooled_tokens: int, stats: StepStats) -> PromptSeq:
        if not self.prompt_kv.free_ids:
            raise _NoPromptSeq
        seq_id = self.prompt_kv.free_ids.pop()
        batch = self._embeds
        batch.clear()
        sl = batch.add(prompt.shape[0], seq_id, 0, "none")
        batch.embd[sl] = prompt
        batch.decode(self.ctx)
        stats.prefill_forwards += 1
        stats.prefill_tokens += prompt.shape[0]
        return PromptSeq(seq_id, prompt.shape[0], prompt.shape[0] * self.kv_bytes_per_token, unpooled_tokens)

    def _free_prompt_seqs(self) -> None:
        if self.prompt_kv is None:
            return
        for seq_id in self.prompt_kv.take_pending():
            self._lib.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            self.prompt_kv.free_ids.append(seq_id)

    def _fork(self, rows: list[_Row], sample_at: list[int]) -> tuple[list[_Row], list[int]]:
        """The n - 1 siblings of each request just prefilled: a seq_cp of its sequence (its
        context's cells shared, computed once) and the same first-token logits, own generator."""
        for i in [i for i, r in enumerate(rows) if r.seq.forks]:
            parent = rows[i]
            for index in range(1, parent.seq.forks + 1):
                child = parent.seq.fork(index, make_generator(parent.seq.params, torch.device("cpu"), index))
                if parent.seq.entry is not None:
                    entry = parent.seq.entry
                    child.prepared = self.cache.acquire(entry.cache_key, lambda: prepare(entry.adapter))
                row = _Row(child, self._free_ids.pop(), parent.pos, child.params.max_new_tokens)
                self._lib.llama_memory_seq_cp(self._mem, parent.seq_id, row.seq_id, -1, -1)
                self._running.append(row)
                rows.append(row)
                sample_at.append(sample_at[i])
            parent.seq.forks = 0
        return rows, sample_at

    def _retire(self, rows: list[_Row]) -> None:
        """Free finished rows' cells (seq_rm) and sequence ids, and unpin their prompts."""
        if not rows:
            return
        leaving = {id(r) for r in rows}
        self._running = [r for r in self._running if id(r) not in leaving]
        for row in rows:
            self._lib.llama_memory_seq_rm(self._mem, row.seq_id, -1, -1)
            self._free_ids.append(row.seq_id)
            with self._lock:
                self._reserved -= row.reserved
            if row.seq.prepared is not None:
                row.seq.prepared = None
                self.cache.release(row.seq.entry.cache_key)


def build_llamacpp_engine(backbone_options=None, config: EngineConfig | None = None,
                          options: LlamaCppOptions | None = None, registry: AdapterRegistry | None = None,
                          probe_cache: "os.PathLike | None" = None) -> LlamaCppEngine:
    """Read and check the GGUF, probe (or recall) the kernel settings this host runs, load, start."""
    from pathlib import Path

    from ..backbone.options import BackboneOptions
    from .backbone import check_memory, gguf_path, load_llamacpp_backbone, read_gguf, refuse_options
    from .native import KernelSettings
    from .probe import probe_settings

    config = config or EngineConfig()
    options = options or LlamaCppOptions()
    backbone_options = refuse_options(backbone_options or BackboneOptions())
    path, _ = gguf_path(backbone_options)
    info = read_gguf(path)  # refuses what is not a runnable GGUF before any child starts
    threads = config.threads or available_cores()
    if options.probe:
        check_memory(info, options.kv_cells, KernelSettings())
        report = probe_settings(path, threads, cache_file=Path(probe_cache) if probe_cache else None)
        settings, source = report.chosen, report.source
    else:
        settings, source = KernelSettings(), "default"
    backbone = load_llamacpp_backbone(backbone_options, settings, options.kv_cells, info)
    engine = LlamaCppEngine(backbone, registry, config, options=options)
    engine.settings["probe"] = source
    return engine
