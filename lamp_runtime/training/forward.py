"""Teacher-forced forward passes behind a soft prompt: summed target loss and per-row exact match.

Decoder-only backbones see [prompt ; input tokens ; target tokens] in one sequence; encoder-decoder
backbones (T5) see [prompt ; input tokens] on the encoder and the target on the decoder, which is
where the seq2seq engine puts them at serve time. Either way an EPT offset is added to the
embeddings of the first s input tokens only (never to target tokens: at serve time the offset
meets only the client's input), exactly as `prompt_assembly` does.

A row counts as an exact match when the argmax at every target position is the target token,
which is exactly when greedy decoding would produce target + EOS.
"""

from __future__ import annotations

import torch

from ..backbone.hf import Backbone
from .data import Example, collate


def _with_offset(text: torch.Tensor, offset: torch.Tensor | None, input_lengths: torch.Tensor) -> torch.Tensor:
    """Add offset rows to the first min(s, input length) positions of each row of `text` [b, n, d]."""
    if offset is None:
        return text
    rows = min(offset.shape[0], text.shape[1])
    positions = torch.arange(rows, device=text.device)
    mask = (positions[None, :] < input_lengths[:, None].to(text.device)).unsqueeze(-1)
    added = offset[:rows].to(dtype=text.dtype, device=text.device) * mask
    return torch.cat([text[:, :rows] + added, text[:, rows:]], dim=1)


def _score(logits: torch.Tensor, labels: torch.Tensor, row_of: torch.Tensor, rows: int):
    loss_sum = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
    wrong = (logits.argmax(-1) != labels).float()
    wrong_per_row = torch.zeros(rows, device=labels.device).index_add_(0, row_of, wrong)
    return loss_sum, wrong_per_row == 0


def decoder_forward(backbone: Backbone, prompt: torch.Tensor, offset: torch.Tensor | None,
                    examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden state at position i predicts token i+1, so the target token at text position j is
    predicted by the hidden state at k + j - 1 (k >= 1 soft tokens come first); the LM head runs
    only at those positions, not over the 49k-wide vocabulary for every token."""
    model = backbone.model
    batch = collate(examples, pad_id)
    token_ids = batch.token_ids.to(backbone.device)
    target_mask = batch.target_mask.to(backbone.device)
    with torch.no_grad():
        text = model.get_input_embeddings()(token_ids)
    input_lengths = torch.tensor([len(e.prompt_ids) for e in examples])
    text = _with_offset(text, offset, input_lengths)
    rows, width = token_ids.shape
    soft = prompt.to(device=text.device, dtype=text.dtype)
    embeds = torch.cat([soft.unsqueeze(0).expand(rows, -1, -1), text], dim=1)
    hidden = model.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    k = soft.shape[0]
    predicting = hidden[:, k - 1 : k - 1 + width][target_mask]
    row_of = torch.arange(rows, device=token_ids.device)[:, None].expand(rows, width)[target_mask]
    return _score(model.get_output_embeddings()(predicting), token_ids[target_mask], row_of, rows)


def seq2seq_forward(backbone: Backbone, prompt: torch.Tensor, offset: torch.Tensor | None,
                    examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder: [prompt ; input] right-padded with an attention mask. Decoder: the target, shifted
    right behind the decoder start token, padding ignored."""
    model = backbone.model
    device = backbone.device
    rows = len(examples)
    width = max(len(e.prompt_ids) for e in examples)
    target_width = max(len(e.target_ids) for e in examples)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    input_mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, target_width), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example.prompt_ids)] = torch.tensor(example.prompt_ids)
        input_mask[row, : len(example.prompt_ids)] = 1
        labels[row, : len(example.target_ids)] = torch.tensor(example.target_ids)
    input_ids, input_mask, labels = input_ids.to(device), input_mask.to(device), labels.to(device)
    with torch.no_grad():
        text = model.get_input_embeddings()(input_ids)
    text = _with_offset(text, offset, input_mask.sum(1))
    soft = prompt.to(device=text.device, dtype=text.dtype)
    embeds = torch.cat([soft.unsqueeze(0).expand(rows, -1, -1), text], dim=1)
    attention = torch.cat([torch.ones((rows, soft.shape[0]), dtype=input_mask.dtype, device=device), input_mask], 1)
    # Decoder inputs from the labels (start token, shifted right) without `labels=`, which would
    # make the model compute a second full-vocabulary loss that `_score` computes anyway.
    decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    logits = model(inputs_embeds=embeds, attention_mask=attention, decoder_input_ids=decoder_ids,
                   use_cache=False).logits
    target_mask = labels != -100
    row_of = torch.arange(rows, device=device)[:, None].expand(rows, target_width)[target_mask]
    return _score(logits[target_mask], labels[target_mask], row_of, rows)


def prompt_forward(backbone: Backbone, prompt: torch.Tensor, offset: torch.Tensor | None,
                   examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed target-token loss, per-row exact match) of `examples` behind a [k, d] soft prompt."""
    forward = seq2seq_forward if backbone.is_encoder_decoder else decoder_forward
    return forward(backbone, prompt, offset, examples, pad_id)
