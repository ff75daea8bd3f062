"""Checks on a request's prompt embeddings before they reach vLLM.

vLLM's own check is only that the tensor is 2-D; its docs warn that embeddings of the wrong shape
can crash the engine (every request in the batch fails with it), and a NaN would silently turn a
request's output into garbage. So each request's tensor is checked here, where a bad one costs
only that request a clear error.
"""

from __future__ import annotations

import torch

from ..errors import AdapterError, RequestError
from ..prompts.prepared import PreparedPrompt


def check_prepared_prompt(prepared: PreparedPrompt, *, hidden_size: int, task_id: str) -> None:
    """Raise unless a task's prompt (and EPT offset) are [n, hidden_size], so they can be assembled."""
    for what, tensor in (("prompt", prepared.prompt), ("EPT offset", prepared.offset)):
        if tensor is not None and (tensor.dim() != 2 or tensor.shape[1] != hidden_size):
            raise AdapterError(f"task {task_id!r}: its {what} has shape {tuple(tensor.shape)}; "
                               f"the backbone needs [tokens, {hidden_size}]")


def check_prompt_embeds(embeds: torch.Tensor, *, hidden_size: int, dtype: torch.dtype, max_model_len: int,
                        max_new_tokens: int, task_id: str | None) -> None:
    """Raise unless `embeds` is a finite [tokens, hidden_size] host tensor in `dtype` that fits."""
    source = f"task {task_id!r}" if task_id is not None else "the input"
    if not isinstance(embeds, torch.Tensor):
        raise TypeError(f"prompt embeddings must be a torch.Tensor, got {type(embeds).__name__}")
    if embeds.dim() != 2 or embeds.shape[1] != hidden_size:
        # Only an adapter can cause this: input embeddings come from the backbone's own table.
        raise AdapterError(f"prompt embeddings for {source} have shape {tuple(embeds.shape)}; "
                           f"the backbone needs [tokens, {hidden_size}]")
    if embeds.shape[0] == 0:
        raise RequestError("prompt embeddings are empty: nothing to condition on")
    if embeds.dtype != dtype:
        raise TypeError(f"prompt embeddings are {embeds.dtype}, the engine runs in {dtype}")
    if embeds.device.type != "cpu":
        # vLLM ships prompt embeddings to its engine process by serializing host tensors.
        raise TypeError(f"prompt embeddings must be on the CPU, got {embeds.device}")
    if embeds.shape[0] + max_new_tokens > max_model_len:
        raise RequestError(f"prompt ({embeds.shape[0]} tokens with the soft prompt) + max_new_tokens "
                           f"({max_new_tokens}) exceeds the vLLM engine's max_model_len of {max_model_len}")
    if not bool(torch.isfinite(embeds).all()):
        raise AdapterError(f"prompt embeddings for {source} contain NaN or infinite values")
