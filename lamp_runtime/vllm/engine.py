"""The vLLM engine: requests of every task in vLLM's continuous batch, through prompt embeddings.

Each request is sent to vLLM's v1 async engine (`AsyncLLM`, `enable_prompt_embeds=True`) as one
[tokens, hidden] tensor: its task's pooled soft prompt (from our `PromptCache`, with the EPT
offset on the first input tokens: `assemble_embeddings`, shared with the HF engine) followed by
its input token embeddings (from the backbone's embedding table, held once here). vLLM never
sees tasks, so requests of any mix of tasks share its batches, and a new adapter version needs
nothing from vLLM: a different prompt is simply different embeddings.

`VllmEngine` implements the engine contract (lamp_runtime/engine/base.py) itself: it drives
vLLM from its own loop thread (below), not from engine/step_loop.py, and is used through the
same async adapter as every engine (engine/streams.py).

AsyncLLM binds to the asyncio loop it is created in, so it lives in a private loop on its own
thread: callers on any loop (a Ray Serve replica, `asyncio.run` in a test or a benchmark) talk to
it through thread-safe queues, and vLLM's output handling (detokenization) does not run on the
serving loop. vLLM runs the model in its own engine-core process (spawned; see docs/vllm.md).

What vLLM 0.32 supports with prompt embeddings (docs/features compatibility matrix, PRs #24278,
#27219): chunked prefill yes; prefix caching yes (blocks are hashed by their embedding bytes, so
a re-registered adapter can never hit a stale block); prompt logprobs, speculative decoding and
encoder-decoder models no. Its own input check is only "2-D", so prompt_embeds_guard checks every
tensor first: a wrongly shaped tensor could otherwise crash the engine for every request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..adapters.registry import AdapterEntry, AdapterRegistry
from ..backbone.hf import kv_bytes_per_token
from ..engine.admission import resolve_request
from ..engine.base import Engine, EngineConfig, EngineStats, Sink, StepStats, device_memory
from ..engine.resident import ResidentAdapters
from ..errors import EngineStoppedError, RequestError, UnsupportedRequestError
from ..prompts.cache import CacheStats, PromptCache
from ..prompts.prepared import assemble_embeddings, prepare
from ..requests import GenerationRequest, GenerationResult, SamplingParams
from .backbone import VllmBackbone
from .guard import check_prepared_prompt, check_prompt_embeds
from .sequence import VllmSequence

log = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # first start on a busy 2-core machine: process spawn + imports + weights
SHUTDOWN_TIMEOUT_S = 10.0


# The smallest KV block each vLLM attention backend takes (vLLM 0.32: CPU_ATTN's
# get_supported_kernel_block_sizes is MultipleOf(32), FlashAttention's MultipleOf(16)).
SMALLEST_BLOCK = {"cpu": 32, "cuda": 16}


@dataclass(frozen=True)
class VllmOptions:
    """vLLM engine settings (the backbone's dtype, quantization and device come from BackboneOptions).

    kv_cache_mb: memory vLLM reserves for its KV cache (its `kv_cache_memory_bytes`). On CPU this
      is host memory; vLLM's own default reserves a fraction of the *whole* NUMA node instead
      (`gpu_memory_utilization`), which fails on a shared machine. None = use that fraction.
      The legacy environment variable VLLM_CPU_KVCACHE_SPACE (GiB), if set, overrides it on CPU.
    max_model_len: longest sequence (soft prompt + input + output); None = the backbone's context.
      The KV cache must hold at least one sequence this long.
    prefix_caching: reuse KV blocks of identical prompt-embedding prefixes, e.g. a task's soft
      prompt: only whole blocks are reused, so a prompt shorter than a block never is.
    block_size: tokens per KV block. None = the smallest each backend accepts, so as much of
      every task's prompt as possible is reused: 32 on CPU (its attention kernel takes multiples
      of 32; vLLM's own CPU default is 128), 16 on CUDA (FlashAttention's multiple). See
      docs/vllm.md for what it costs.
    enforce_eager: None = eager on CPU (torch.compile takes minutes there), graphs on GPU.
    max_num_batched_tokens: tokens per engine step, i.e. the chunk a long prompt is prefilled in
      (chunked prefill) while the running requests keep decoding; None = vLLM's default.
    """

    kv_cache_mb: int | None = 1024
    gpu_memory_utilization: float = 0.3
    max_model_len: int | None = None
    prefix_caching: bool = True
    block_size: int | None = None
    enforce_eager: bool | None = None
    max_num_batched_tokens: int | None = None

    def __post_init__(self):
        if self.kv_cache_mb is not None and (not isinstance(self.kv_cache_mb, int) or self.kv_cache_mb < 1):
            raise ValueError(f"kv_cache_mb must be an integer >= 1 or None, got {self.kv_cache_mb!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2 or None, got {self.max_model_len!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1
                                            or self.block_size % SMALLEST_BLOCK["cuda"]):
            raise ValueError(f"block_size must be a multiple of {SMALLEST_BLOCK['cuda']} (CPU: of "
                             f"{SMALLEST_BLOCK['cpu']}) or None, got {self.block_size!r}")
        if self.max_num_batched_tokens is not None and (not isinstance(self.max_num_batched_tokens, int)
                                                        or self.max_num_batched_tokens < 1):
            raise ValueError(f"max_num_batched_tokens must be an integer >= 1 or None, "
                             f"got {self.max_num_batched_tokens!r}")


def _vllm_quantization(quantization: str, device: str) -> str | None:
    if quantization == "none":
        return None
    if quantization == "nf4":
        if not device.startswith("cuda"):
            raise ValueError("quantization nf4 with the vLLM engine needs a CUDA device (bitsandbytes); "
                             "use --quantization none on CPU")
        return "bitsandbytes"  # vLLM's in-flight bitsandbytes quantization is NF4
    raise ValueError(f"quantization {quantization!r} is not available with the vLLM engine; use none or nf4")


def _step_stats_logger_factory(record: Callable) -> Callable:
    """A vLLM stat-logger factory that hands each engine step's stats to `record`.

    vLLM calls stat loggers from its output handler after every engine step; with a custom
    logger and `disable_log_stats=True` it sends the stats (and per-request timestamps) without
    its default periodic log lines.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StepStatsLogger(StatLoggerBase):
        def __init__(self, vllm_config=None, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self):
            pass

    return lambda vllm_config, engine_index=0: StepStatsLogger(vllm_config, engine_index)


class VllmEngine(Engine):
    kind = "vllm"

    def __init__(self, backbone: VllmBackbone, registry: AdapterRegistry | None = None,
                 config: EngineConfig | None = None, cache: PromptCache | None = None,
                 options: VllmOptions | None = None, start_timeout: float = START_TIMEOUT_S):
        super().__init__()
        self.backbone = backbone
        self.registry = registry if registry is not None else AdapterRegistry()
        self.config = config or EngineConfig()
        self.options = options or VllmOptions()
        # Prompts are built on the host: vLLM serializes prompt embeddings to its engine process.
        self.cache = cache or PromptCache(self.config.prompt_cache_bytes, "cpu", backbone.dtype)
        self.resident = ResidentAdapters(self.config.adapter_cache_bytes)
        self.max_model_len = self.options.max_model_len or backbone.max_positions
        if self.max_model_len > backbone.max_positions:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the backbone's context of "
                             f"{backbone.max_positions} tokens")
        self.last_step = StepStats()
        self.prefix_cache_queries = 0  # prompt tokens looked up in vLLM's prefix cache
        self.prefix_cache_hits = 0  # ... and found there
        self._kv_cache_usage = 0.0  # fraction of vLLM's KV blocks in use, after the last step
        self.kv_bytes_per_token = kv_bytes_per_token(backbone.config, backbone.dtype)
        self._lock = threading.Lock()
        self._sequences: dict[str, VllmSequence] = {}
        self._pumps: dict[str, concurrent.futures.Future] = {}
        self._pump_tasks: set[asyncio.Task] = set()  # the same pumps, as tasks (loop thread only)
        self._last_step_at = time.monotonic()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lamp-vllm-loop", daemon=True)
        self._thread.start()
        started = time.perf_counter()
        try:
            self._llm = asyncio.run_coroutine_threadsafe(self._start_llm(), self._loop).result(start_timeout)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
            raise
        log.info("vLLM engine ready in %.1f s (max_model_len %d, KV cache %s MB, prefix caching %s)",
                 time.perf_counter() - started, self.max_model_len, self.options.kv_cache_mb,
                 self.options.prefix_caching)

    def engine_args(self):
        """vLLM's AsyncEngineArgs for this backbone, config and options."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        backbone, options = self.backbone, self.options
        device = backbone.options.device
        enforce_eager = options.enforce_eager if options.enforce_eager is not None else not device.startswith("cuda")
        return AsyncEngineArgs(
            model=str(backbone.folder), tokenizer=str(backbone.folder), dtype=backbone.options.dtype,
            quantization=_vllm_quantization(backbone.options.quantization, device),
            enable_prompt_embeds=True, enforce_eager=enforce_eager, max_model_len=self.max_model_len,
            max_num_seqs=self.config.max_batch_size, max_num_batched_tokens=options.max_num_batched_tokens,
            enable_prefix_caching=options.prefix_caching,
            block_size=options.block_size or SMALLEST_BLOCK.get(torch.device(device).type),
            kv_cache_memory_bytes=None if options.kv_cache_mb is None else options.kv_cache_mb * 1024 * 1024,
            gpu_memory_utilization=options.gpu_memory_utilization,
            disable_log_stats=True,  # our step logger below still receives the stats
        )

    async def _start_llm(self):
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        wanted = torch.device(self.backbone.options.device).type
        if current_platform.device_type != wanted:
            raise ValueError(f"the installed vLLM runs on {current_platform.device_type!r} but the backbone "
                             f"device is {self.backbone.options.device!r} (CPU: vllm-cpu; GPU: vllm)")
        # Created inside this loop so its output handler task runs here.
        return AsyncLLM.from_engine_args(self.engine_args(),
                                         stat_loggers=[_step_stats_logger_factory(self._record_step)])

    # ---- state (any thread) -------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return not self._closed and self._thread.is_alive() and not self._llm.errored

    def stopped_reason(self) -> str:
        return "vLLM engine stopped"

    def stats(self) -> EngineStats:
        allocated, reserved = device_memory(self.backbone.device)
        block_size = self.options.block_size or SMALLEST_BLOCK.get(self.backbone.device.type)
        return EngineStats(
            kind=self.kind, waiting=self.num_waiting, running=self.num_running, prompt_cache=self.cache.stats(),
            adapter_cache=self.resident.stats(), prompt_kv=self.prompt_kv_stats(), prompt_kv_unit="prompt tokens",
            kv_cache_bytes=self.kv_cache_bytes(), backbone_bytes=self.backbone.weights_bytes,
            device=str(self.backbone.device), cuda_allocated_bytes=allocated, cuda_reserved_bytes=reserved,
            settings={"max_model_len": str(self.max_model_len), "block_size": str(block_size),
                      "prefix_caching": str(self.options.prefix_caching).lower()})

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet prefilled (queued here or in vLLM's scheduler)."""
        with self._lock:
            return sum(1 for s in self._sequences.values() if not s.started)

    @property
    def num_running(self) -> int:
        """Requests that have produced their first token and are still generating."""
        with self._lock:
            return sum(1 for s in self._sequences.values() if s.started)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._sequences)

    def prompt_kv_stats(self) -> CacheStats:
        """vLLM's prefix cache, in prompt tokens: hits were served from cached KV blocks (a task's
        prompt, when a whole block of it matched), misses computed."""
        return CacheStats(hits=self.prefix_cache_hits, misses=self.prefix_cache_queries - self.prefix_cache_hits)

    def kv_cache_bytes(self) -> int | None:
        """The share of vLLM's KV cache its scheduler reported in use (whole blocks), when its size is set."""
        if self.options.kv_cache_mb is None:
            return None
        return int(self._kv_cache_usage * self.options.kv_cache_mb * 1024 * 1024)

    def discard(self, cache_key) -> None:
        """Forget an adapter version's built prompt (vLLM's prefix cache holds blocks by their
        embedding bytes, so it can never serve a stale version's)."""
        self.cache.discard(cache_key)
        self.resident.discard(cache_key)

    # ---- submission (any thread) --------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Validate and embed `request`, then hand it to vLLM; its outputs (or an error) go to `sink`.

        Raises before anything is queued when the request is invalid (unknown task, too long,
        bad adapter embeddings) or the queue is full. `sink` is called on the engine's loop thread.
        """
        self._check_admission(self.num_waiting)
        if self._closed:
            raise EngineStoppedError("vLLM engine is shut down")
        unsupported = unsupported_by_vllm(request.params)
        if unsupported:
            raise UnsupportedRequestError(unsupported)
        entry, input_ids = resolve_request(request, self.registry, self.backbone.tokenizer, self.config,
                                           self.max_model_len, "the vLLM engine's max_model_len", self.resident)
        embeds = self._embed(entry, input_ids)
        check_prompt_embeds(embeds, hidden_size=self.backbone.hidden_size, dtype=self.backbone.dtype,
                            max_model_len=self.max_model_len, max_new_tokens=request.params.max_new_tokens,
                            task_id=request.task_id)
        sequence = VllmSequence(request, entry, input_ids, self.backbone.eos_ids)
        params = self.sampling_params(request.params)
        with self._lock:
            if request.request_id in self._sequences:
                raise RequestError(f"request id {request.request_id!r} is already in flight")
            if not self._sequences:  # idle -> busy: the next step's duration starts now
                self._last_step_at = time.monotonic()
            self._sequences[request.request_id] = sequence
        pump = asyncio.run_coroutine_threadsafe(self._pump(sequence, embeds, params, sink), self._loop)
        with self._lock:
            self._pumps[request.request_id] = pump
        pump.add_done_callback(lambda _: self._forget_pump(request.request_id))

    def abort(self, request_id: str) -> None:
        """Stop a request (its client went away); vLLM frees its slot and KV blocks."""
        with self._lock:
            pump = self._pumps.get(request_id)
        if pump is not None:
            pump.cancel()

    def _forget_pump(self, request_id: str) -> None:
        with self._lock:
            self._pumps.pop(request_id, None)

    def _embed(self, entry: AdapterEntry | None, input_ids: list[int]) -> torch.Tensor:
        inputs = self.backbone.embed(torch.tensor(input_ids, dtype=torch.long))
        if entry is None:
            return inputs.contiguous()
        # Pinned only while the tensor is assembled: vLLM keeps its own copy of the result.
        adapter = entry.adapter
        prepared = self.cache.acquire(entry.cache_key, lambda: prepare(adapter))
        try:
            check_prepared_prompt(prepared, hidden_size=self.backbone.hidden_size, task_id=entry.task_id)
            return assemble_embeddings(prepared, inputs).contiguous()
        finally:
            self.cache.release(entry.cache_key)

    def sampling_params(self, params: SamplingParams):
        """Our SamplingParams as vLLM's: same stop strings, EOS ids, seed and limits; deltas only."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            max_tokens=params.max_new_tokens, temperature=float(params.temperature), top_p=float(params.top_p),
            top_k=params.top_k or 0, seed=params.seed, stop=list(params.stop), ignore_eos=params.ignore_eos,
            # The HF engine stops on every EOS id of the generation config, the model config and the
            # tokenizer; passing the same set keeps both engines' outputs identical.
            stop_token_ids=[] if params.ignore_eos else sorted(self.backbone.eos_ids),
            skip_special_tokens=True, output_kind=RequestOutputKind.DELTA, logprobs=params.logprobs,
        )

    # ---- the loop thread ----------------------------------------------------------------------

    async def _pump(self, sequence: VllmSequence, embeds: torch.Tensor, params, sink) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        self._pump_tasks.add(asyncio.current_task())
        try:
            (engine_input,) = self._llm.renderer.render_cmpl([{"prompt_embeds": embeds}])
            async for output in self._llm.generate(engine_input, params, sequence.request_id):
                out = sequence.accept(output)
                if out.result is not None:
                    self._finished(sequence, out.result)
                sink(out)
        except asyncio.CancelledError:
            # The consumer went away, or the engine is shutting down; vLLM's generate() has
            # aborted the request on its side.
            if sequence.finish_reason is None:
                self._finished(sequence, sequence.abort().result)
            if self._closed:
                sink(EngineStoppedError("vLLM engine shut down before the request finished"))
            raise
        except EngineDeadError as exc:
            self._drop(sequence)
            sink(EngineStoppedError(f"vLLM engine died: {exc}"))
        except ValueError as exc:  # vLLM refused the request (its validation): the client's problem
            self._drop(sequence)
            sink(RequestError(str(exc)))
        except Exception as exc:
            log.exception("vLLM request %s failed", sequence.request_id)
            self._drop(sequence)
            sink(exc)
        finally:
            self._pump_tasks.discard(asyncio.current_task())

    def _drop(self, sequence: VllmSequence) -> None:
        with self._lock:
            self._sequences.pop(sequence.request_id, None)

    def _finished(self, sequence: VllmSequence, result: GenerationResult) -> None:
        self._drop(sequence)
        self._report_finish(result)

    def _record_step(self, scheduler_stats, iteration_stats) -> None:
        """Called by vLLM's output handler after each engine step (this loop's thread)."""
        if scheduler_stats is None:
            return
        now = time.monotonic()
        with self._lock:
            # vLLM does not say which requests a step ran. With none waiting in its scheduler,
            # every request in flight is in the batch; otherwise those that have started are
            # (this step's first tokens are only seen after this call, so they count next step).
            everyone = scheduler_stats.num_waiting_reqs == 0
            tasks = {s.task_id for s in self._sequences.values() if everyone or s.started}
        stats = StepStats(batch_size=scheduler_stats.num_running_reqs, distinct_tasks=len(tasks),
                          seconds=now - self._last_step_at)
        if iteration_stats is not None:
            stats.prefilled = len(iteration_stats.time_to_first_tokens_iter)
            stats.prefill_tokens = iteration_stats.prompt_token_stats.computed  # not the prefix-cached
            stats.computed_tokens = stats.prefill_tokens + iteration_stats.num_generation_tokens
        self._kv_cache_usage = scheduler_stats.kv_cache_usage
        prefix = scheduler_stats.prefix_cache_stats
        if prefix is not None:
            self.prefix_cache_queries += prefix.queries
            self.prefix_cache_hits += prefix.hits
        self._last_step_at = now
        self.last_step = stats
        self._report_step(stats)

    # ---- shutdown -----------------------------------------------------------------------------

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Abort what is in flight, stop vLLM's engine processes and the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            pumps = list(self._pumps.values())
        for pump in pumps:
            pump.cancel()

        async def close():
            if self._pump_tasks:  # let cancelled requests send their aborts
                await asyncio.wait(list(self._pump_tasks), timeout=min(2.0, timeout))
            # Blocking this loop while the engine stops keeps the output handler from logging
            # the engine's exit as a failure; it is cancelled right after.
            self._llm.shutdown(timeout=timeout)

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout + 10)
        except Exception:
            log.exception("vLLM engine shutdown failed")
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)


def unsupported_by_vllm(params: SamplingParams) -> str | None:
    """What this engine refuses by name: vLLM computes no prompt logprobs for prompt embeddings,
    and a request's n samples are not forked here (send n requests, or use the HF engine)."""
    if params.prompt_logprobs is not None:
        return "prompt logprobs (echo) are not available with the vLLM engine (prompt embeddings have none)"
    if params.n > 1:
        return f"n={params.n}: the vLLM engine serves one sample per request"
    return None
