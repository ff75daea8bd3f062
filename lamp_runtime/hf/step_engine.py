"""What the transformers step cores (decoder-only, generic decoder and T5) share: the waiting
queue, aborts, admission, prompt assembly and pinning, padding and sampling, and the synchronous
step. A core is a step core of engine/step_loop.py: `HfEngine` (engine.py) drives it on the loop
thread; tests, benches and training drive it synchronously through `generate()`.

Subclasses keep their own running state and say how a step runs the model (`_run_model`, or the
`_prefill` and `_decode` it calls by default), how running rows are aborted and which are running.
"""

from __future__ import annotations

import abc
import time

import torch

from ..adapters.registry import AdapterRegistry
from ..backbone.hf import kv_bytes_per_token
from ..errors import RequestError, UnsupportedRequestError
from ..prompts.cache import PromptCache
from ..prompts.prepared import assemble_embeddings, prepare
from ..requests import GenerationRequest, GenerationResult, StepOutput
from ..engine.admission import resolve_request
from ..engine.base import EngineConfig, EngineStats, StepStats, device_memory
from ..engine.fair_queue import task_key
from ..engine.logprobs import token_logprobs
from ..engine.resident import ResidentAdapters
from ..engine.sampling import next_token
from ..engine.request_state import RequestState
from ..engine.step_core import StepCoreBase


class StepEngine(StepCoreBase, abc.ABC):
    """A transformers step core, driven one `step()` at a time (by HfEngine's loop thread, or
    synchronously through `generate()`)."""

    kind = "hf"
    core_name: str  # which transformers core: shown in EngineStats.settings
    # Whether the engine computes the input tokens' log-probabilities (`echo`), and whether the n
    # samples of a request share one prefill (forked after it) rather than each running its own.
    supports_prompt_logprobs = False
    shares_prefill = False
    # Whether the core can pause a running row and resume it later (`_pause`, `_resume`): then a
    # task below its share of the rows need not wait for a free one (EngineConfig.fair_preemption).
    can_pause = False

    def __init__(self, backbone, registry: AdapterRegistry | None = None, config: EngineConfig | None = None,
                 cache: PromptCache | None = None):
        self.backbone = backbone
        self.registry = registry if registry is not None else AdapterRegistry()
        self.config = config or EngineConfig()
        self.cache = cache or PromptCache(self.config.prompt_cache_bytes, backbone.device, backbone.dtype)
        self.resident = ResidentAdapters(self.config.adapter_cache_bytes)
        self._eos_ids = backbone.eos_token_ids()
        self._init_queue(self.can_pause)  # waiting items: a request's sample group, list[RequestState]
        self.last_step = StepStats()
        self.threads = self.config.threads or torch.get_num_threads()  # intra-op threads of its steps
        self.kv_bytes_per_token = kv_bytes_per_token(backbone.config, backbone.dtype)

    # ---- submission (any thread) -------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> str:
        """Validate, tokenize and resolve the task's current adapter version; queue the request."""
        params = request.params
        if params.prompt_logprobs is not None and not self.supports_prompt_logprobs:
            raise UnsupportedRequestError(f"prompt logprobs (echo) are not computed by the {self.kind} engine "
                                          "for this backbone; the llama-template decoder engine computes them")
        if params.n > self.config.max_batch_size:
            raise RequestError(f"n={params.n} samples need as many batch rows; max_batch_size is "
                               f"{self.config.max_batch_size}")
        entry, input_ids = resolve_request(request, self.registry, self.backbone.tokenizer, self.config,
                                           self.backbone.max_positions, resident=self.resident)
        if self.shares_prefill:  # one sequence now; its n - 1 siblings fork from it after its prefill
            sequences = [self._sequence(request, input_ids, entry, 0)]
            sequences[0].forks = params.n - 1
        else:
            sequences = [self._sequence(request, input_ids, entry, i) for i in range(params.n)]
        width = sum(s.width for s in sequences)  # the n samples wait and enter together
        self._waiting.push(task_key(request.task_id), sequences, width)
        return request.request_id

    @property
    def generator_device(self) -> torch.device:
        return self.backbone.device

    def stats(self) -> EngineStats:
        allocated, reserved = device_memory(self.backbone.device)
        return EngineStats(
            kind=self.kind, waiting=self.num_waiting, running=self.num_running, prompt_cache=self.cache.stats(),
            adapter_cache=self.resident.stats(), prompt_kv=self.prompt_kv_stats(), prompt_kv_unit="requests",
            kv_cache_bytes=self.kv_cache_bytes(), backbone_bytes=self.backbone.weights_bytes,
            device=str(self.backbone.device), cuda_allocated_bytes=allocated, cuda_reserved_bytes=reserved,
            settings={"core": self.core_name, "threads": str(self.threads)}, tasks=self._waiting.stats())

    def on_loop_start(self) -> None:
        """The loop thread's torch intra-op pool (see engine/step_loop.py for why only there)."""
        torch.set_num_threads(self.threads)

    def kv_cache_bytes(self) -> int | None:
        # a running row's last sampled token is the next step's input: not in the cache yet
        return sum(s.length - 1 for s in list(self._running_sequences())) * self.kv_bytes_per_token

    def has_work(self) -> bool:
        return not self._waiting.empty() or bool(self._running_sequences())

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running_sequences())

    # ---- the loop (one thread) ---------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        started = time.perf_counter()
        outputs = self._handle_aborts()
        admitted = self._admit()
        resumed = [s for s in admitted if s.paused is not None]
        newcomers = [s for s in admitted if s.paused is None]
        if resumed:
            self._resume(resumed)
        stats = StepStats(prefilled=len(newcomers), prefill_tokens=sum(s.length for s in newcomers))
        now = time.perf_counter()
        for seq in newcomers:
            seq.admitted_at = now
        outputs += self._charge(self._run_model(newcomers, stats))
        stats.seconds = time.perf_counter() - started
        self.last_step = stats
        return outputs

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run `requests` to completion (batched together) and return results in order."""
        ids = [self.submit(r) for r in requests]
        results: dict[str, GenerationResult] = {}
        while len(results) < len(ids):
            for out in self.step():
                if out.result is not None:
                    results[out.request_id] = out.result
        return [results[i] for i in ids]

    def _run_model(self, newcomers: list[RequestState], stats: StepStats) -> list[StepOutput]:
        """The step's model work: by default the subclass's `_prefill(newcomers, stats)` (a first
        token each; the ones still running join the batch), then its `_decode()` (one token for
        every running row, the newcomers included). The decoder engine fuses both into one forward."""
        outputs = self._prefill(newcomers, stats) if newcomers else []
        running = self._running_sequences()
        stats.computed_tokens = stats.prefill_tokens + len(running)
        if running:
            stats.batch_size = len(running)
            stats.distinct_tasks = len({s.request.task_id for s in running})
            outputs += self._decode()
        return outputs

    @abc.abstractmethod
    def _running_sequences(self) -> list[RequestState]:
        """Every request prefilled and still generating."""

    @abc.abstractmethod
    def _abort_running(self, aborted: set[str]) -> list[StepOutput]:
        """Drop the running rows whose request ids are in `aborted`; their abort outputs."""


    def _pause(self, rows: list[int]) -> list[RequestState]:
        """Take the running rows at these indices out of the batch, keeping in each `seq.paused`
        what `_resume` needs to continue it (its prompt stays pinned); the paused sequences."""
        raise NotImplementedError(f"{type(self).__name__} cannot pause rows")

    def _resume(self, sequences: list[RequestState]) -> None:
        """Put paused sequences back in the batch (clearing `seq.paused`): they decode this step."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume rows")

    def _handle_aborts(self) -> list[StepOutput]:
        aborted = self._take_aborted()
        if not aborted:
            return []
        dropped = [s for group in self._waiting.remove(lambda group: group[0].request.request_id in aborted)
                   for s in group]
        for seq in dropped:
            if seq.paused is not None:  # paused while running: its kept state and its prompt go
                seq.paused = None
                self._release(seq)
        return [s.abort() for s in dropped] + self._abort_running(aborted)

    def _admit(self) -> list[RequestState]:
        """Newcomers (and paused rows resuming) in the fair queue's order while they fit; each
        newcomer is charged its context tokens. Rows the queue names to make room for a task below
        its share are paused here and handed back to it."""
        running = self._running_sequences()
        victims, groups = self._waiting.admit([task_key(s.request.task_id) for s in running],
                                              self.config.max_batch_size - len(running),
                                              prompt_tokens=lambda group: sum(s.length for s in group))
        if victims:
            for seq in self._pause(victims):
                self._waiting.requeue(task_key(seq.request.task_id), [seq])
        return [s for group in groups for s in group]

    def _charge(self, outputs: list[StepOutput]) -> list[StepOutput]:
        """Charge each sampled token to its task (every output of the model's step is one)."""
        tasks = {s.request.request_id: s.request.task_id for s in self._running_sequences()}
        counts: dict[str, int] = {}
        for out in outputs:
            task = task_key(out.result.task_id if out.result is not None else tasks.get(out.request_id))
            counts[task] = counts.get(task, 0) + 1
        for task, tokens in counts.items():
            self._waiting.charge(task, generated=tokens)
        return outputs

    def _embed(self, seq: RequestState) -> torch.Tensor:
        """[soft prompt ; input embeddings (+ EPT offset on the first tokens)], pinning the prompt."""
        ids = torch.tensor(seq.input_ids, dtype=torch.long, device=self.backbone.device)
        inputs = self.backbone.embed(ids)
        if seq.entry is None:
            return inputs
        adapter = seq.entry.adapter
        seq.prepared = self.cache.acquire(seq.entry.cache_key, lambda: prepare(adapter))
        return assemble_embeddings(seq.prepared, inputs)

    @staticmethod
    def _pad(rows: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack [n_i, d] rows into [B, max n, d] with zero padding, and the matching 0/1 mask."""
        width = max(r.shape[0] for r in rows)
        pads = [(width - r.shape[0], 0) if left else (0, width - r.shape[0]) for r in rows]
        embeds = torch.stack([torch.nn.functional.pad(r, (0, 0, *p)) for r, p in zip(rows, pads)])
        mask = torch.stack([torch.nn.functional.pad(torch.ones(r.shape[0], dtype=torch.long, device=r.device), p)
                            for r, p in zip(rows, pads)])
        return embeds, mask

    def _sample(self, sequences: list[RequestState], logits: torch.Tensor) -> tuple[list[StepOutput], list[int]]:
        """One token per row; returns the outputs and the indices of rows still running."""
        outputs, keep = [], []
        greedy = logits.argmax(-1).tolist()  # one op for the batch; sampled rows draw their own below
        for i, seq in enumerate(sequences):
            token = greedy[i] if seq.params.greedy else next_token(logits[i], seq.params, seq.generator)
            logprob = None
            if seq.params.logprobs is not None:
                logprob = token_logprobs(logits[i:i + 1], [token], seq.params.logprobs, seq.tokenizer)[0]
            outputs.append(seq.accept(token, logprob))
            if seq.finish_reason is None:
                keep.append(i)
        return outputs, keep

    def _release(self, seq: RequestState) -> None:
        if seq.prepared is not None:
            seq.prepared = None
            self.cache.release(seq.entry.cache_key)
