"""How a request's input sequence is built from its task's prepared prompt and its input embeddings.

Shared by every engine (the HF engines and the vLLM engine), so that the same adapter and input
give the same embeddings whichever engine runs them.
"""

from __future__ import annotations

import torch

from .prompt_cache import PreparedPrompt


def assemble_embeddings(prepared: PreparedPrompt | None, inputs: torch.Tensor) -> torch.Tensor:
    """[soft prompt ; input embeddings], with an EPT offset added to the first input tokens.

    `inputs` is [n, d] (n may be 0); `prepared` None means no task: the inputs alone.
    """
    if prepared is None:
        return inputs
    offset = prepared.offset
    if offset is not None and inputs.shape[0]:
        n = min(inputs.shape[0], offset.shape[0])
        inputs = torch.cat([inputs[:n] + offset[:n], inputs[n:]])
    return torch.cat([prepared.prompt, inputs])
