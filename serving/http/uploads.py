"""Reading an adapter upload: multipart/form-data with file field `adapter` (.safetensors) or
`adapter_config` + `adapter_model` (PEFT), and an optional text field `pool`."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ServingError

UPLOAD_FILE_FIELDS = ("adapter", "adapter_config", "adapter_model")
UPLOAD_FORM_FIELDS = ("pool",)
MAX_FORM_FIELDS = 8
MAX_TEXT_PART_BYTES = 64 * 1024


async def _multipart_form(request: Request, expected: str, what: str, max_files: int, max_fields: int):
    """The request's multipart form within the limits; 422 naming `expected` for another content
    type, 422 for a malformed form, 413 (Starlette's) for a text part over MAX_TEXT_PART_BYTES."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ServingError(422, f"{expected} (got content type {content_type or 'none'!r})")
    try:
        return await request.form(max_files=max_files, max_fields=max_fields, max_part_size=MAX_TEXT_PART_BYTES)
    except StarletteHTTPException as exc:
        if exc.status_code == 413:
            raise
        raise ServingError(422, f"malformed multipart {what}: {exc.detail}") from None


async def read_upload(request: Request) -> tuple[dict[str, bytes], str | None]:
    """The uploaded files by field name and the raw `pool` field (None when absent)."""
    form = await _multipart_form(request, "upload must be multipart/form-data with file field 'adapter' or "
                                          "'adapter_config' + 'adapter_model'", "upload",
                                 max_files=len(UPLOAD_FILE_FIELDS), max_fields=MAX_FORM_FIELDS)
    try:
        unknown = sorted(set(form.keys()) - set(UPLOAD_FILE_FIELDS) - set(UPLOAD_FORM_FIELDS))
        if unknown:
            raise ServingError(422, f"unexpected form fields {unknown}; expected file fields "
                                    f"{list(UPLOAD_FILE_FIELDS)} and optional field 'pool'")
        files = {}
        for name in UPLOAD_FILE_FIELDS:
            values = form.getlist(name)
            if len(values) > 1:
                raise ServingError(422, f"form field {name!r} was sent {len(values)} times")
            if values:
                if not isinstance(values[0], UploadFile):
                    raise ServingError(422, f"form field {name!r} must be a file upload, not a text value")
                files[name] = await values[0].read()
        pool = form.get("pool")
        if pool is not None and not isinstance(pool, str):
            raise ServingError(422, "form field 'pool' must be a text value, not a file")
        return files, pool
    finally:
        await form.close()


MAX_BATCH_ADAPTERS = 1000  # adapters in one batch registration (each still bounded on its own)


async def read_batch_upload(request: Request) -> dict[str, tuple[dict[str, bytes], str | None]]:
    """A batch registration: the same fields as one upload, each named `<field>.<task id>`
    (`adapter.sentiment`, `adapter_config.qa` + `adapter_model.qa`, `pool.qa`); by task id, in the
    order sent: {task: (files by field, pool)}."""
    form = await _multipart_form(request, "a batch registration must be multipart/form-data with file fields "
                                          "named 'adapter.<task id>'", "batch",
                                 max_files=MAX_BATCH_ADAPTERS * 2, max_fields=MAX_BATCH_ADAPTERS * 3)
    try:
        batch: dict[str, tuple[dict[str, bytes], str | None]] = {}
        for key, value in form.multi_items():
            field, _, task_id = key.partition(".")
            if field not in (*UPLOAD_FILE_FIELDS, *UPLOAD_FORM_FIELDS) or not task_id:
                raise ServingError(422, f"unexpected form field {key[:80]!r}: name each part '<field>.<task id>' "
                                        f"with field one of {[*UPLOAD_FILE_FIELDS, *UPLOAD_FORM_FIELDS]}")
            files, pool = batch.setdefault(task_id, ({}, None))
            if field in files or (field == "pool" and pool is not None):
                raise ServingError(422, f"form field {key[:80]!r} was sent more than once")
            if field == "pool":
                if not isinstance(value, str):
                    raise ServingError(422, f"form field {key[:80]!r} must be a text value, not a file")
                batch[task_id] = (files, value)
            elif not isinstance(value, UploadFile):
                raise ServingError(422, f"form field {key[:80]!r} must be a file upload, not a text value")
            else:
                files[field] = await value.read()
        if len(batch) > MAX_BATCH_ADAPTERS:
            raise ServingError(413, f"a batch holds at most {MAX_BATCH_ADAPTERS} adapters, got {len(batch)}")
        if not batch:
            raise ServingError(422, "the batch is empty: send file fields named 'adapter.<task id>'")
        return batch
    finally:
        await form.close()
