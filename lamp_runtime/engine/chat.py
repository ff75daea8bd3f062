"""Chat messages -> the input text a task's soft prompt is prepended to.

The backbone tokenizer's own chat template renders them (no hand-written template); a task
trained on plain text (its adapter records `input_template`, e.g. "Input: {input}\\nAnswer:")
can ask for that template instead, around the last user message, with `chat_format:
input_template` in its metadata or on the request (docs/serving.md, "Chat completions").
"""

from __future__ import annotations

from ..errors import UnsupportedRequestError
from ..requests import CHAT_FORMATS, GenerationRequest

CHAT_FORMAT_KEY = "chat_format"  # adapter metadata: the task's default chat format
INPUT_TEMPLATE_KEY = "input_template"


def chat_format_of(request: GenerationRequest, entry) -> str:
    """The request's own choice, else the task's (its adapter metadata), else the chat template."""
    if request.chat_format is not None:
        return request.chat_format
    chosen = _metadata(entry).get(CHAT_FORMAT_KEY) or "chat_template"
    if chosen not in CHAT_FORMATS:
        raise UnsupportedRequestError(f"task {request.task_id!r} asks for chat_format {chosen!r} in its metadata; "
                                      f"known: {list(CHAT_FORMATS)}")
    return chosen


def render_chat(request: GenerationRequest, entry, tokenizer) -> str:
    """The text the messages become (special tokens of the template included)."""
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    if chat_format_of(request, entry) == "input_template":
        template = _metadata(entry).get(INPUT_TEMPLATE_KEY)
        if not template or "{input}" not in template:
            raise UnsupportedRequestError(
                f"chat_format input_template: task {request.task_id!r} records no input_template with {{input}}")
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise UnsupportedRequestError("chat_format input_template needs a user message")
        return template.replace("{input}", users[-1])
    if not getattr(tokenizer, "chat_template", None):
        raise UnsupportedRequestError("the backbone's tokenizer has no chat template: use /v1/completions")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _metadata(entry) -> dict:
    meta = entry.adapter.meta if entry is not None else None
    return dict(getattr(meta, "extra", None) or {})
