"""The generic decoder-only engine: continuous batching through transformers' own forward and its
DynamicCache, for decoder architectures outside the Llama template (decoder.py serves those faster).

Each step (1) prefills the requests that are waiting, as left-padded batches (rows of similar
length together) whose rows start with their own task's pooled soft prompt, (2) merges them into
the running batch's KV cache and (3) decodes one token for every running row in a single forward
pass. Finished rows leave the batch at once, so a short or early-EOS request never holds the
others back, and a new request starts at the next step instead of waiting for the batch to drain.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from ..requests import StepOutput
from . import kv_batch
from ..engine.base import StepStats
from .prefill_groups import prefill_groups
from ..engine.request_state import RequestState
from .step_engine import StepEngine


class GenericDecoderEngine(StepEngine):
    core_name = "generic_decoder"

    def __init__(self, backbone, *args, **kwargs):
        if backbone.is_encoder_decoder:
            raise ValueError("encoder-decoder backbone: use Seq2SeqEngine (build_engine chooses it)")
        super().__init__(backbone, *args, **kwargs)
        self._running: list[RequestState] = []
        self._kv = None
        self._mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._last_tokens: torch.Tensor | None = None

    def _running_sequences(self) -> list[RequestState]:
        return self._running

    def _abort_running(self, aborted: set[str]) -> list[StepOutput]:
        rows = [i for i, s in enumerate(self._running) if s.request.request_id in aborted]
        outputs = [self._running[i].abort() for i in rows]
        self._retire(rows)
        return outputs

    def _prefill(self, newcomers: list[RequestState], stats: StepStats) -> list[StepOutput]:
        lengths = [seq.length for seq in newcomers]
        groups = prefill_groups(lengths, self.config.prefill_forward_cost_tokens)
        stats.prefill_forwards = len(groups)
        stats.prefill_padding = sum(max(lengths[i] for i in g) * len(g) - sum(lengths[i] for i in g) for g in groups)
        return [out for group in groups for out in self._prefill_batch([newcomers[i] for i in group])]

    def _prefill_batch(self, newcomers: list[RequestState]) -> list[StepOutput]:
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
        for seq in newcomers:
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
