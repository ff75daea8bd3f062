"""Engine for encoder-decoder backbones (T5, Flan-T5): the soft prompt is prepended to the
*encoder* input embeddings, as in the LAMP paper's T5 experiments.

T5's decoder computes its relative position bias from one cache length shared by the whole batch,
so rows that started decoding at different steps cannot share a forward pass without changing
their outputs. Requests admitted together therefore form a *cohort* that decodes in lock-step;
each step runs one decoder forward per cohort. Finished rows leave their cohort at once, and new
requests start a new cohort at the next step instead of waiting for the others to finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, EncoderDecoderCache

from ..requests import StepOutput
from ..engine.base import StepStats
from ..engine.request_state import RequestState
from .step_engine import StepEngine


@dataclass
class _Cohort:
    sequences: list[RequestState]
    encoder_states: torch.Tensor  # [B, T_enc, d]
    encoder_mask: torch.Tensor  # [B, T_enc]
    cache: EncoderDecoderCache

    def select(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.encoder_mask.device)
        self.sequences = [self.sequences[i] for i in rows]
        self.encoder_states = self.encoder_states[index]
        self.encoder_mask = self.encoder_mask[index]
        for part in (self.cache.self_attention_cache, self.cache.cross_attention_cache):
            for layer in part.layers:
                if layer.is_initialized and layer.keys.numel():
                    layer.keys, layer.values = layer.keys[index], layer.values[index]


class Seq2SeqEngine(StepEngine):
    core_name = "seq2seq"

    def __init__(self, backbone, *args, **kwargs):
        if not backbone.is_encoder_decoder:
            raise ValueError("Seq2SeqEngine needs an encoder-decoder backbone; use DecoderEngine")
        super().__init__(backbone, *args, **kwargs)
        config = self.backbone.config
        self._start_token = config.decoder_start_token_id
        if self._start_token is None:
            raise ValueError("backbone config has no decoder_start_token_id")
        self._cohorts: list[_Cohort] = []

    def _running_sequences(self) -> list[RequestState]:
        return [seq for cohort in self._cohorts for seq in cohort.sequences]

    def _abort_running(self, aborted: set[str]) -> list[StepOutput]:
        outputs = []
        for cohort in self._cohorts:
            rows = [i for i, s in enumerate(cohort.sequences) if s.request.request_id in aborted]
            outputs += [cohort.sequences[i].abort() for i in rows]
            self._drop(cohort, rows)
        self._cohorts = [c for c in self._cohorts if c.sequences]
        return outputs

    def _prefill(self, newcomers: list[RequestState], stats: StepStats) -> list[StepOutput]:
        """One encoder forward over all newcomers: they form one cohort (a decoder batch whose
        rows share a cache length), so they are not split by length like the decoder's prefill."""
        now = time.perf_counter()
        rows = [self._embed(seq) for seq in newcomers]
        stats.prefill_forwards = 1
        stats.prefill_padding = max(r.shape[0] for r in rows) * len(rows) - sum(r.shape[0] for r in rows)
        embeds, mask = self._pad(rows, left=False)
        encoder = self.backbone.model.get_encoder()
        states = encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        cache = EncoderDecoderCache(DynamicCache(config=self.backbone.config),
                                    DynamicCache(config=self.backbone.config))
        cohort = _Cohort(newcomers, states, mask, cache)
        self._cohorts.append(cohort)
        start = torch.full((len(newcomers),), self._start_token, dtype=torch.long, device=mask.device)
        logits = self._decoder_logits(cohort, start)
        elapsed = time.perf_counter() - now
        for seq in newcomers:
            seq.prefill_seconds = elapsed
        return self._advance(cohort, logits)

    def _decode(self) -> list[StepOutput]:
        outputs = []
        for cohort in list(self._cohorts):
            last = torch.tensor([s.last_token for s in cohort.sequences], device=cohort.encoder_mask.device)
            outputs += self._advance(cohort, self._decoder_logits(cohort, last))
        return outputs

    def _decoder_logits(self, cohort: _Cohort, tokens: torch.Tensor) -> torch.Tensor:
        out = self.backbone.model(encoder_outputs=(cohort.encoder_states,), attention_mask=cohort.encoder_mask,
                                  decoder_input_ids=tokens[:, None], past_key_values=cohort.cache, use_cache=True)
        return out.logits[:, -1, :]

    def _advance(self, cohort: _Cohort, logits: torch.Tensor) -> list[StepOutput]:
        """Sample one token per row; finished rows leave the cohort, and an empty cohort goes."""
        outputs, keep = self._sample(cohort.sequences, logits)
        self._drop(cohort, [i for i in range(len(cohort.sequences)) if i not in set(keep)])
        if not cohort.sequences:
            self._cohorts.remove(cohort)
        return outputs

    def _drop(self, cohort: _Cohort, rows: list[int]) -> None:
        if not rows:
            return
        for i in rows:
            self._release(cohort.sequences[i])
        cohort.select([i for i in range(len(cohort.sequences)) if i not in set(rows)])
