"""The HF transformers engine: continuous batching of requests of any mix of tasks.

Each step (1) prefills the requests that are waiting, as left-padded batches (rows of similar
length together) whose rows start with their own task's pooled soft prompt, (2) merges them into the running batch's KV cache and
(3) decodes one token for every running row in a single forward pass. Finished rows leave the
batch at once, so a short or early-EOS request never holds the others back, and a new request
starts at the next step instead of waiting for the batch to drain.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from . import kv_batch
from .backbone import Backbone
from .prompt_assembly import assemble_embeddings
from .prefill_groups import prefill_groups
from .prompt_cache import PromptCache
from .registry import AdapterRegistry
from .request_checks import resolve_request
from .sampling import make_generator, next_token
from .sequence import GenerationRequest, GenerationResult, Sequence, StepOutput


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16
    max_input_tokens: int = 2048
    max_new_tokens: int = 1024
    prompt_cache_bytes: int = 256 * 1024 * 1024
    # A prefill forward's fixed cost in padded positions: newcomers whose lengths differ by more
    # than this (per row) are prefilled in separate forwards (see prefill_groups.py).
    prefill_forward_cost_tokens: int = 32

    def __post_init__(self):
        for name in ("max_batch_size", "max_input_tokens", "max_new_tokens", "prompt_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_forward_cost_tokens < 0:
            raise ValueError(f"EngineConfig.prefill_forward_cost_tokens must be >= 0, "
                             f"got {self.prefill_forward_cost_tokens}")


@dataclass
class StepStats:
    """What the last step did; the serving layer turns these into metrics."""

    batch_size: int = 0
    distinct_tasks: int = 0
    prefilled: int = 0
    prefill_tokens: int = 0
    prefill_forwards: int = 0
    prefill_padding: int = 0  # padded positions computed beyond the real tokens
    seconds: float = 0.0


class Engine:
    def __init__(self, backbone: Backbone, registry: AdapterRegistry | None = None,
                 config: EngineConfig | None = None, cache: PromptCache | None = None):
        if backbone.is_encoder_decoder and type(self) is Engine:
            raise ValueError("encoder-decoder backbone: use make_engine() or Seq2SeqEngine")
        self.backbone = backbone
        self.registry = registry if registry is not None else AdapterRegistry()
        self.config = config or EngineConfig()
        self.cache = cache or PromptCache(self.config.prompt_cache_bytes, backbone.device, backbone.dtype)
        self._eos_ids = backbone.eos_token_ids()
        self._lock = threading.Lock()
        self._waiting: deque[Sequence] = deque()
        self._aborted: set[str] = set()
        self._running: list[Sequence] = []
        self._kv = None
        self._mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._last_tokens: torch.Tensor | None = None
        self.last_step = StepStats()

    # ---- submission (any thread) -------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> str:
        """Validate, tokenize and resolve the task's current adapter version; queue the request."""
        entry, input_ids = resolve_request(request, self.registry, self.backbone.tokenizer, self.config,
                                           self.backbone.max_positions)
        generator = make_generator(request.params, self.backbone.device)
        sequence = Sequence(request, input_ids, entry, generator, self.backbone.tokenizer, self._eos_ids)
        with self._lock:
            self._waiting.append(sequence)
        return request.request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            if self._waiting:
                return True
        return bool(self._running_sequences())

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running_sequences())

    def _running_sequences(self) -> list[Sequence]:
        return self._running

    # ---- the loop (one thread) ---------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        started = time.perf_counter()
        outputs = self._handle_aborts()
        newcomers = self._admit()
        stats = StepStats(prefilled=len(newcomers), prefill_tokens=sum(s.length for s in newcomers))
        if newcomers:
            outputs += self._prefill(newcomers, stats)
        running = self._running_sequences()
        if running:
            stats.batch_size = len(running)
            stats.distinct_tasks = len({s.request.task_id for s in running})
            outputs += self._decode()
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

    def _handle_aborts(self) -> list[StepOutput]:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            if not aborted:
                return []
            dropped = [s for s in self._waiting if s.request.request_id in aborted]
            self._waiting = deque(s for s in self._waiting if s.request.request_id not in aborted)
        return [s.abort() for s in dropped] + self._abort_running(aborted)

    def _abort_running(self, aborted: set[str]) -> list[StepOutput]:
        rows = [i for i, s in enumerate(self._running) if s.request.request_id in aborted]
        outputs = [self._running[i].abort() for i in rows]
        self._retire(rows)
        return outputs

    def _admit(self) -> list[Sequence]:
        with self._lock:
            room = self.config.max_batch_size - self.num_running
            return [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]

    def _embed(self, seq: Sequence) -> torch.Tensor:
        """[soft prompt ; input embeddings (+ EPT offset on the first tokens)], pinning the prompt."""
        ids = torch.tensor(seq.input_ids, dtype=torch.long, device=self.backbone.device)
        inputs = self.backbone.embed(ids)
        if seq.entry is None:
            return inputs
        seq.prepared = self.cache.acquire(seq.entry.cache_key, seq.entry.adapter.prepare)
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

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor) -> tuple[list[StepOutput], list[int]]:
        """One token per row; returns the outputs and the indices of rows still running."""
        outputs, keep = [], []
        for i, seq in enumerate(sequences):
            outputs.append(seq.accept(next_token(logits[i], seq.params, seq.generator)))
            if seq.finish_reason is None:
                keep.append(i)
        return outputs, keep

    def _prefill(self, newcomers: list[Sequence], stats: StepStats) -> list[StepOutput]:
        now = time.perf_counter()
        for seq in newcomers:
            seq.admitted_at = now
        lengths = [seq.length for seq in newcomers]
        groups = prefill_groups(lengths, self.config.prefill_forward_cost_tokens)
        stats.prefill_forwards = len(groups)
        stats.prefill_padding = sum(max(lengths[i] for i in g) * len(g) - sum(lengths[i] for i in g) for g in groups)
        return [out for group in groups for out in self._prefill_batch([newcomers[i] for i in group])]

    def _prefill_batch(self, newcomers: list[Sequence]) -> list[StepOutput]:
        """One left-padded forward over `newcomers`; the rows still running join the batch."""
        now = time.perf_counter()
        rows = [self._embed(seq) for seq in newcomers]
        embeds, mask = self._pad(rows, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.backbone.config)
        out = self.backbone.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  past_key_values=cache, use_cache=True, logits_to_keep=1)
        elapsed = time.perf_counter() - now
        for seq in newcomers:
            seq.prefill_seconds = elapsed
        outputs, keep = self._sample(newcomers, out.logits[:, -1, :])
        for i, seq in enumerate(newcomers):
            if seq.finish_reason is not None:
                self._release(seq)
        if keep:
            rows_t = torch.tensor(keep, dtype=torch.long, device=mask.device)
            cache, mask = kv_batch.select_rows(cache, mask, rows_t)
            lengths = torch.tensor([rows[i].shape[0] for i in keep], device=mask.device)
            last = torch.tensor([newcomers[i].last_token for i in keep], device=mask.device)
            self._join([newcomers[i] for i in keep], cache, mask, lengths, last)
        return outputs

    def _join(self, sequences, cache, mask, positions, last_tokens) -> None:
        if not self._running:
            self._kv, self._mask, self._positions, self._last_tokens = cache, mask, positions, last_tokens
        else:
            self._kv, self._mask = kv_batch.merge(self._kv, self._mask, cache, mask)
            self._positions = torch.cat([self._positions, positions])
            self._last_tokens = torch.cat([self._last_tokens, last_tokens])
        self._running.extend(sequences)

    def _decode(self) -> list[StepOutput]:
        embeds = self.backbone.embed(self._last_tokens)[:, None, :]
        self._mask = torch.nn.functional.pad(self._mask, (0, 1), value=1)
        out = self.backbone.model(inputs_embeds=embeds, attention_mask=self._mask,
                                  position_ids=self._positions[:, None], past_key_values=self._kv,
                                  use_cache=True)
        self._positions = self._positions + 1
        outputs, keep = self._sample(self._running, out.logits[:, -1, :])
        self._last_tokens = torch.tensor([s.last_token for s in self._running], device=self._mask.device)
        self._retire([i for i in range(len(self._running)) if i not in set(keep)])
        return outputs

    def _retire(self, rows: list[int]) -> None:
        """Remove finished rows from the running batch and unpin their prompts."""
        if not rows:
            return
        for i in rows:
            self._release(self._running[i])
        keep = [i for i in range(len(self._running)) if i not in set(rows)]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._kv = self._mask = self._positions = self._last_tokens = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        self._kv, self._mask = kv_batch.select_rows(self._kv, self._mask, index)
        self._positions, self._last_tokens = self._positions[index], self._last_tokens[index]

    def _release(self, seq: Sequence) -> None:
        if seq.prepared is not None:
            seq.prepared = None
            self.cache.release(seq.entry.cache_key)


def make_engine(backbone: Backbone, registry: AdapterRegistry | None = None,
                config: EngineConfig | None = None, cache: PromptCache | None = None) -> Engine:
    """The engine that fits the backbone: decoder-only (continuous batching) or encoder-decoder."""
    if backbone.is_encoder_decoder:
        from .seq2seq_engine import Seq2SeqEngine

        return Seq2SeqEngine(backbone, registry, config, cache)
    return Engine(backbone, registry, config, cache)
