"""HF PEFT prompt-tuning checkpoints (PROMPT_TUNING / P_TUNING), served as soft prompts.

A checkpoint is `adapter_config.json` + `adapter_model.safetensors`; only its
`prompt_embeddings` tensor is used, exactly as `PeftModel.generate` prepends it.
"""

from __future__ import annotations

import json

from ..errors import AdapterError
from .base import MAX_CONFIG_BYTES, AdapterMeta, check_exact_tensors, parse_pool
from .safetensors_io import load_tensors
from .soft_prompt import SoftPromptAdapter

PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")
CONFIG_FILE, MODEL_FILE = "adapter_config.json", "adapter_model.safetensors"


def adapter_from_peft(config_bytes: bytes, model_bytes: bytes, source: str = "peft adapter",
                      pool: int | None = None) -> SoftPromptAdapter:
    """Parse a PEFT prompt-tuning checkpoint (adapter_config.json + adapter_model.safetensors)."""
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{source}: adapter_config.json is {len(config_bytes)} bytes, over {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{source}: adapter_config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{source}: adapter_config.json must be a JSON object")
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise AdapterError(f"{source}: peft_type must be one of {list(PEFT_TYPES)}, got {peft_type!r}")
    _, tensors = load_tensors(model_bytes)
    check_exact_tensors(tensors, ("prompt_embeddings",))
    prompt = tensors["prompt_embeddings"]
    virtual = config.get("num_virtual_tokens")
    if virtual is not None and prompt.dim() == 2 and prompt.shape[0] != virtual:
        raise AdapterError(
            f"{source}: prompt_embeddings has {prompt.shape[0]} rows but num_virtual_tokens={virtual}"
        )
    meta = AdapterMeta(
        pool=parse_pool(pool if pool is not None else 1, f"{source}: pool"),
        base_model=config.get("base_model_name_or_path"),
        task=config.get("task_type"),
        extra={"peft_type": peft_type},
    )
    return SoftPromptAdapter(meta, prompt, source_format="peft_prompt_tuning")
