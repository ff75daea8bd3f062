"""What the CUDA checks share: the device they run on, why they skip, and the greedy oracle.

The device is `cuda` unless LAMP_CHECK_DEVICE says otherwise: `make gpu-check-dry` runs these same
checks on the CPU (tiny shapes) so that they cannot rot where no GPU is lent.

The oracle: random weights give near-ties that bfloat16 arithmetic (or another kernel) may break
the other way, after which two greedy continuations part for good. So a greedy continuation is
checked token by token against a reference model fed that same continuation (teacher forcing):
each chosen token's reference logit must be within a tolerance of the best one, in units of that
position's logit standard deviation. Exact agreement with the reference's own `generate` is
counted and recorded (junit properties, into the gpu-check JSON), not asserted.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

DEVICE = os.environ.get("LAMP_CHECK_DEVICE", "cuda")
# Largest allowed (best - chosen) reference logit, in logit standard deviations.
BF16_TOLERANCE = 0.15
FLOAT32_TOLERANCE = 1e-3


def _skip_reason() -> str | None:
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        return ("no CUDA device here: these run on a GPU host through `make gpu-check` (README, 'On a CUDA "
                "host'); `make gpu-check-dry` runs them on the CPU")
    return None


needs_device = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
BITSANDBYTES_MISSING = importlib.util.find_spec("bitsandbytes") is None
needs_bitsandbytes = pytest.mark.skipif(
    BITSANDBYTES_MISSING,
    reason="bitsandbytes is not installed: `make gpu-wheels` downloads its wheel (43 MB, within the device "
           "carry's 64 MiB) into .gpu-wheels/, which `make gpu-check` unpacks when the host lacks it")


@torch.no_grad()
def greedy_gaps(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """(best - chosen) logit at each position, in units of that position's logit std: 0 where the
    chosen token is the reference's argmax. `logits` [k, vocab] predict `tokens` [k]."""
    logits = logits.float()
    chosen = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    return (logits.max(-1).values - chosen) / logits.std(-1)


@torch.no_grad()
def decoder_logits(model, embeds: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """A decoder-only reference fed [embeds ; tokens[:-1]]: the logits predicting each token."""
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    generated = model.get_input_embeddings()(torch.tensor(tokens[:-1], dtype=torch.long, device=device))
    full = torch.cat([embeds.to(device, dtype), generated])[None]
    return model(inputs_embeds=full).logits[0, embeds.shape[0] - 1:]


@torch.no_grad()
def seq2seq_logits(model, embeds: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """An encoder-decoder reference: encoder fed `embeds`, decoder fed [start ; tokens[:-1]]."""
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    decoder_ids = torch.tensor([[model.config.decoder_start_token_id, *tokens[:-1]]], device=device)
    return model(inputs_embeds=embeds.to(device, dtype)[None], decoder_input_ids=decoder_ids).logits[0]


def assert_greedy(logits: torch.Tensor, tokens: list[int], tolerance: float, what: str) -> float:
    """Every token within `tolerance` of the reference's best; returns the largest gap."""
    assert tokens, f"{what}: no tokens generated"
    gaps = greedy_gaps(logits, tokens)
    worst = float(gaps.max())
    assert worst <= tolerance, (f"{what}: token {int(gaps.argmax())} of {len(tokens)} is {worst:.3f} logit std "
                                f"below the reference's best (tolerance {tolerance}); gaps {gaps.tolist()}")
    return worst


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    """'identical/total' token sequences (theirs may stop early at EOS: compared on its length)."""
    same = sum(a[: len(b)] == b for a, b in zip(ours, theirs))
    return f"{same}/{len(theirs)}"
