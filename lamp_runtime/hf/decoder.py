"""The decoder-only engine: continuous batching of requests of any mix of tasks, on a slot KV cache,
with each task's soft prompt computed once.

Each step (1) prefills the requests that are waiting: a row's task prompt comes from the prompt-KV
cache (its keys/values computed once per task version, prompt_kv.py) and only the row's input
tokens run, attending to it; rows of similar length share a forward (prefill_groups.py), whatever
their tasks and prompt lengths. (2) It decodes one token for every running row in one forward.
Each running request owns a KV slot (kv_slots.py): rows join and leave without copying the
others, and a step attends only to the positions in use. Finished rows leave the batch at once,
so a short or early-EOS request never holds the others back, and a new request starts at the
next step instead of waiting for the batch to drain.

The model is the backbone's own, run by llama.py for Llama-template architectures (the builder
uses generic_decoder.py for the others).
"""

from __future__ import annotations

import time

import torch

from ..prompts.prepared import assemble_embeddings, offset_inputs, prepare
from ..requests import StepOutput
from ..engine.base import StepStats
from .llama import LlamaTemplateForward, Segment
from ..engine.logprobs import prompt_logprobs
from .prefill_groups import prefill_groups
from .prompt_kv import PromptKV, PromptKVCache
from ..engine.sampling import make_generator
from ..engine.request_state import RequestState
from .step_engine import StepEngine

# An empty batch gives its KV memory back only above this: zeroing a fresh allocation for every
# request of a sporadic stream costs more than keeping a few MB (one 256-position slot of SmolLM2
# in float32 is 12 MB).
KEEP_IDLE_KV_BYTES = 64 * 1024 * 1024


class _Row:
    """One newcomer's prefill: the prompt keys/values it starts from (None: none) and the
    embeddings it still has to run."""

    __slots__ = ("seq", "prefix", "embeds")

    def __init__(self, seq: RequestState, prefix: PromptKV | None, embeds: torch.Tensor):
        self.seq, self.prefix, self.embeds = seq, prefix, embeds

    @property
    def start(self) -> int:
        return self.prefix.tokens if self.prefix is not None else 0

    @property
    def scores_input(self) -> bool:
        """Whether the row wants its input's log-probabilities: it runs whole (soft prompt included)."""
        return self.seq.params.prompt_logprobs is not None


class DecoderEngine(StepEngine):
    core_name = "llama_template_decoder"
    supports_prompt_logprobs = True
    shares_prefill = True  # a request's n samples fork from one prefill (KV slot copies)
    can_pause = True  # a paused row's slot is copied out and loaded back (fair_queue.py)

    def __init__(self, backbone, *args, **kwargs):
        if backbone.is_encoder_decoder:
            raise ValueError("encoder-decoder backbone: use Seq2SeqEngine (build_engine chooses it)")
        super().__init__(backbone, *args, **kwargs)
        self.model = LlamaTemplateForward(backbone.model)
        self.kv = self.model.new_slots(self.config.max_batch_size)
        self.kv_bytes_per_token = self.kv.bytes_per_position()
        budget = self.config.prompt_kv_cache_bytes
        self.prompt_kv = PromptKVCache(budget) if budget else None
        self._running: list[RequestState] = []  # in slot order: _running[i] owns slot i
        self._lengths: list[int] = []  # positions each slot holds

    def _running_sequences(self) -> list[RequestState]:
        return self._running

    def kv_cache_bytes(self) -> int:
        return sum(list(self._lengths)) * self.kv_bytes_per_token  # positions in use, not the allocation

    # ---- a step: one forward for the decode rows and the newcomers ----------------------------

    def _run_model(self, newcomers: list[RequestState], stats: StepStats) -> list[StepOutput]:
        """Decode one token for every running row and prefill the newcomers, in one pass over the
        weights: the running rows are one segment of the forward, each length group of newcomers
        another (llama.Segment). With a steady stream of requests most steps admit someone, and a
        separate prefill forward would read every weight a second time."""
        started = time.perf_counter()  # a newcomer's prefill time includes building its prompt KV
        stats.prefill_tokens = 0  # positions computed: prompt-KV builds and the rows' own tokens
        rows = [self._row(seq, stats) for seq in newcomers]  # may run forwards building prompt KV
        try:
            decoding, segments = len(self._running), []
            if decoding:
                segments.append(self._decode_segment())
            groups = self._place(rows, stats)
            stats.computed_tokens = decoding + stats.prefill_tokens
            segments += [self._prefill_segment(group, slot) for slot, group in groups]
            if not segments:
                return []
            logits = self._score_inputs(self.model.forward_segments(segments, self.kv), groups, decoding)
        finally:
            for row in rows:
                if row.prefix is not None:
                    self.prompt_kv.release(row.seq.entry.cache_key)
        elapsed = time.perf_counter() - started
        for row in rows:
            row.seq.prefill_seconds = elapsed
        self._lengths[:decoding] = [n + 1 for n in self._lengths[:decoding]]
        placed = [row for _, group in groups for row in group]  # in slot order, as the segments stacked them
        self._running.extend(row.seq for row in placed)
        self._lengths.extend(row.start + row.embeds.shape[0] for row in placed)
        logits = self._fork(torch.cat(logits))
        stats.batch_size = len(self._running)
        stats.distinct_tasks = len({s.request.task_id for s in self._running})
        outputs, keep = self._sample(self._running, logits)
        self._retire([i for i in range(len(self._running)) if i not in set(keep)])
        return outputs

    def _row(self, seq: RequestState, stats: StepStats) -> _Row:
        """Pin the task's prompt (and its KV, building it on a miss) and embed what remains to run."""
        inputs = self.backbone.embed(torch.tensor(seq.input_ids, dtype=torch.long, device=self.backbone.device))
        if seq.entry is None:
            return _Row(seq, None, inputs)
        adapter = seq.entry.adapter
        seq.prepared = self.cache.acquire(seq.entry.cache_key, lambda: prepare(adapter))
        if self.prompt_kv is None or not seq.input_ids or seq.params.prompt_logprobs is not None:
            # no input: the prompt's last position gives the token; scoring the input: its first
            # token's log-probability comes from the prompt's last position
            return _Row(seq, None, assemble_embeddings(seq.prepared, inputs))
        key = seq.entry.cache_key
        hit = key in self.prompt_kv
        prefix = self.prompt_kv.acquire(key, lambda: self._compute_prompt_kv(seq.prepared.prompt, adapter, stats))
        if hit:
            seq.prompt_reused = True
            stats.prompt_kv_hits += 1
            stats.prompt_tokens_reused += prefix.tokens
        return _Row(seq, prefix, offset_inputs(seq.prepared, inputs))

    def _compute_prompt_kv(self, prompt: torch.Tensor, adapter, stats: StepStats) -> PromptKV:
        """Run the prompt alone through the model (in the first free slot) and keep its keys/values."""
        slot, length = len(self._running), prompt.shape[0]
        self._reserve(slot + 1, length)
        self.model.forward(prompt[None], torch.arange(length, device=prompt.device)[None], self.kv, slot,
                           torch.tensor([length - 1], device=prompt.device))
        stats.prefill_forwards += 1
        stats.prefill_tokens += length
        return PromptKV(*self.kv.read(slot, length), unpooled_tokens=adapter.prompt_tokens)

    def _place(self, rows: list[_Row], stats: StepStats) -> list[tuple[int, list[_Row]]]:
        """Group the newcomers by length (prefill_groups.py), give each group the slots after the
        running rows, and load their cached prompt keys/values there."""
        if not rows:
            return []
        lengths = [row.embeds.shape[0] for row in rows]
        shared = [i for i, row in enumerate(rows) if not row.scores_input]
        groups = [[rows[shared[i]] for i in g]
                  for g in prefill_groups([lengths[i] for i in shared], self.config.prefill_forward_cost_tokens)]
        groups += [[row] for row in rows if row.scores_input]  # all positions' logits: a segment each
        stats.prefill_tokens += sum(lengths)
        stats.prefill_forwards += len(groups)
        stats.prefill_padding += sum(max(r.embeds.shape[0] for r in g) * len(g) - sum(r.embeds.shape[0] for r in g)
                                     for g in groups)
        slot = len(self._running)
        self._reserve(slot + len(rows), max(row.start + max(r.embeds.shape[0] for r in g)
                                            for g in groups for row in g))
        placed = []
        for group in groups:
            for i, row in enumerate(group):
                if row.prefix is not None:
                    self.kv.load(slot + i, row.prefix.keys, row.prefix.values)
            placed.append((slot, group))
            slot += len(group)
        return placed

    def _prefill_segment(self, rows: list[_Row], slot_start: int) -> Segment:
        """Newcomers right-padded to the longest, at their positions after their cached prompts."""
        device = self.backbone.device
        width = max(row.embeds.shape[0] for row in rows)
        embeds = torch.stack([torch.nn.functional.pad(row.embeds, (0, 0, 0, width - row.embeds.shape[0]))
                              for row in rows])
        starts = torch.tensor([row.start for row in rows], device=device)
        positions = starts[:, None] + torch.arange(width, device=device)[None, :]
        last = torch.tensor([row.embeds.shape[0] - 1 for row in rows], device=device)
        return Segment(embeds, positions, slot_start, last, full=rows[0].scores_input)

    def _score_inputs(self, logits: list[torch.Tensor], groups, decoding: int) -> list[torch.Tensor]:
        """Record the input log-probabilities of the rows that asked (their segments returned every
        position's logits) and keep each such row's last position for sampling."""
        first = 1 if decoding else 0  # the decode rows' segment comes before the prefill groups
        for k, (_, group) in enumerate(groups):
            row = group[0]
            if row.scores_input:
                every = logits[first + k][0]  # [positions, vocab]
                seq = row.seq
                seq.prompt_logprobs = prompt_logprobs(every, seq.soft_prompt_tokens, seq.input_ids,
                                                      seq.params.prompt_logprobs, seq.tokenizer)
                logits[first + k] = every[row.embeds.shape[0] - 1][None]
        return logits

    def _fork(self, logits: torch.Tensor) -> torch.Tensor:
        """Add the n - 1 sibling samples of the rows just prefilled: each gets a copy of its
        parent's KV slot and the same first-token logits, and draws with its own generator, so the
        request's context is computed once (lamp_prefill_tokens_total counts it once)."""
        forking = [i for i, seq in enumerate(self._running) if seq.forks]
        if not forking:
            return logits
        self._reserve(len(self._running) + sum(self._running[i].forks for i in forking), max(self._lengths))
        extra = []
        for i in forking:
            parent = self._running[i]
            for index in range(1, parent.forks + 1):
                child = parent.fork(index, make_generator(parent.params, self.generator_device, index))
                if parent.entry is not None:
                    child.prepared = self.cache.acquire(parent.entry.cache_key, lambda: prepare(parent.entry.adapter))
                slot = len(self._running)
                self.kv.move(i, slot, self._lengths[i])
                self._running.append(child)
                self._lengths.append(self._lengths[i])
                extra.append(i)
            parent.forks = 0
        return torch.cat([logits, logits[extra]])

    def _decode_segment(self) -> Segment:
        """The running rows' last tokens, at the position after each row's (slots 0..B-1)."""
        device = self.backbone.device
        batch = len(self._running)
        self._reserve(batch, max(self._lengths) + 1)
        tokens = torch.tensor([s.last_token for s in self._running], dtype=torch.long, device=device)
        positions = torch.tensor(self._lengths, device=device)[:, None]
        return Segment(self.backbone.embed(tokens)[:, None], positions, 0,
                       torch.zeros(batch, dtype=torch.long, device=device))

    # ---- slots --------------------------------------------------------------------------------

    def _reserve(self, slots: int, positions: int) -> None:
        self.kv.reserve(slots, positions, used_slots=len(self._running),
                        used_positions=max(self._lengths, default=0))

    def _pause(self, rows: list[int]) -> list[RequestState]:
        """Copy each row's keys/values out of its slot and free the slot (its prompt stays pinned)."""
        paused = []
        for i in rows:
            seq = self._running[i]
            seq.paused = (*self.kv.read(i, self._lengths[i]), self._lengths[i])
            paused.append(seq)
        self._retire(rows, release=False)
        return paused

    def _resume(self, sequences: list[RequestState]) -> None:
        """Load paused rows' keys/values into the slots after the running rows; they decode next."""
        self._reserve(len(self._running) + len(sequences), max(seq.paused[2] for seq in sequences))
        for seq in sequences:
            keys, values, length = seq.paused
            self.kv.load(len(self._running), keys, values)
            self._running.append(seq)
            self._lengths.append(length)
            seq.paused = None

    def _abort_running(self, aborted: set[str]) -> list[StepOutput]:
        rows = [i for i, s in enumerate(self._running) if s.request.request_id in aborted]
        outputs = [self._running[i].abort() for i in rows]
        self._retire(rows)
        return outputs

    def _retire(self, rows: list[int], release: bool = True) -> None:
        """Remove finished (or paused: `release=False`) rows and unpin their prompts; the last rows
        move into the freed slots, so the running batch stays in slots 0..B-1 (one row's KV moved
        per hole, no batch copy)."""
        if not rows:
            return
        for i in rows if release else ():
            self._release(self._running[i])
        leaving = set(rows)
        for hole in sorted(rows):
            while self._running and len(self._running) - 1 in leaving:  # drop leaving rows at the end
                leaving.discard(len(self._running) - 1)
                self._running.pop()
                self._lengths.pop()
            if hole >= len(self._running):
                continue
            last = len(self._running) - 1
            self.kv.move(last, hole, self._lengths[last])
            self._running[hole], self._lengths[hole] = self._running.pop(), self._lengths.pop()
            leaving.discard(hole)
        if not self._running and self.kv.nbytes > KEEP_IDLE_KV_BYTES:
            self.kv.release_memory()
