"""Admission checks every engine applies to a request before queueing it.

Shared by the HF engines and the vLLM engine so that a request is refused (or accepted) with the
same message whichever engine serves it.
"""

from __future__ import annotations

from .errors import RequestError
from .registry import AdapterEntry, AdapterRegistry
from .sequence import GenerationRequest


def resolve_request(request: GenerationRequest, registry: AdapterRegistry, tokenizer, config,
                    context_tokens: int, context_name: str = "the backbone's context",
                    ) -> tuple[AdapterEntry | None, list[int]]:
    """Resolve the task's current adapter version and tokenize the input; refuse what cannot run.

    `config` is the engine's EngineConfig (limits); `context_tokens` the longest sequence the
    engine can hold (`context_name` says which limit that is in the error message).
    """
    entry = registry.get(request.task_id) if request.task_id is not None else None
    input_ids = tokenizer(request.input)["input_ids"]
    if len(input_ids) > config.max_input_tokens:
        raise RequestError(f"input is {len(input_ids)} tokens, over the limit of {config.max_input_tokens}")
    if not input_ids and entry is None:
        raise RequestError("input is empty and no task was given: nothing to condition on")
    params = request.params
    if params.max_new_tokens > config.max_new_tokens:
        raise RequestError(f"max_new_tokens {params.max_new_tokens} over the limit of {config.max_new_tokens}")
    soft = entry.adapter.pooled_tokens if entry else 0
    if soft + len(input_ids) + params.max_new_tokens > context_tokens:
        raise RequestError(
            f"soft prompt ({soft}) + input ({len(input_ids)}) + max_new_tokens ({params.max_new_tokens}) "
            f"exceeds {context_name} of {context_tokens} tokens"
        )
    return entry, input_ids
