"""Admission checks every engine applies to a request before queueing it.

Shared by the HF engines and the vLLM engine so that a request is refused (or accepted) with the
same message whichever engine serves it. The input is tokenized here, once per request.
"""

from __future__ import annotations

from ..adapters.registry import AdapterEntry, AdapterRegistry
from ..errors import InputTooLongError, RequestError
from ..requests import GenerationRequest
from .chat import render_chat
from .resident import ResidentAdapters


def resolve_request(request: GenerationRequest, registry: AdapterRegistry, tokenizer, config,
                    context_tokens: int, context_name: str = "the backbone's context",
                    resident: ResidentAdapters | None = None) -> tuple[AdapterEntry | None, list[int]]:
    """Resolve the task's current adapter version and tokenize the input; refuse what cannot run.

    `config` is the engine's EngineConfig (limits); `context_tokens` the longest sequence the
    engine can hold (`context_name` says which limit that is in the error message). With `resident`,
    an adapter registered by reference is loaded there (the returned entry holds its factors).
    """
    if request.input_ids is not None:
        input_ids = _check_length(_known_ids(request.input_ids, tokenizer), config)
        entry = _entry(request, registry, resident)
    elif request.messages is None:  # before the task: a too-long input is 413 whatever it names
        input_ids = _check_length(tokenizer(request.input)["input_ids"], config)
        entry = _entry(request, registry, resident)
    else:  # the task may choose how its messages are rendered; the template's special tokens are in the text
        entry = _entry(request, registry, resident)
        text = render_chat(request, entry, tokenizer)
        input_ids = _check_length(tokenizer(text, add_special_tokens=False)["input_ids"], config)
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


def _entry(request: GenerationRequest, registry: AdapterRegistry,
           resident: ResidentAdapters | None) -> AdapterEntry | None:
    if request.task_id is None:
        return None
    entry = registry.get(request.task_id)
    return resident.resolve(entry) if resident is not None else entry


def _check_length(input_ids: list[int], config) -> list[int]:
    if len(input_ids) > config.max_input_tokens:
        raise InputTooLongError(f"input is {len(input_ids)} tokens, over the limit of {config.max_input_tokens}")
    return input_ids


def _known_ids(token_ids, tokenizer) -> list[int]:
    vocab = len(tokenizer)
    unknown = [t for t in token_ids if t >= vocab]
    if unknown:
        raise RequestError(f"token ids {unknown[:5]} are outside the vocabulary of {vocab}")
    return list(token_ids)
