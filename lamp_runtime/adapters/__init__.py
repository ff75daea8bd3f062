"""Prompt adapters: one small module per kind behind a common base and a registry of kinds.

    from lamp_runtime.adapters import load_adapter, save_adapter, LampAdapter, AdapterMeta

- base.py: AdapterMeta, AdapterLimits, the PromptAdapter base and its value checks
- lamp.py, soft_prompt.py, ept.py: the kinds; peft.py: PEFT prompt-tuning checkpoints (soft prompts)
- files.py: the kinds by format, strict loading / saving (safetensors + JSON only, never pickle);
  safetensors_io.py: the header checks
- registry.py: task id -> current adapter version; provenance.py: training numerics vs serving
"""

from .base import MAX_CONFIG_BYTES, AdapterLimits, AdapterMeta, PromptAdapter, parse_pool
from .ept import EptAdapter
from .files import adapter_from_safetensors, load_adapter, save_adapter, validate
from .lamp import LampAdapter
from .peft import PEFT_TYPES, adapter_from_peft
from .soft_prompt import SoftPromptAdapter

__all__ = [
    "AdapterLimits", "AdapterMeta", "EptAdapter", "LampAdapter", "MAX_CONFIG_BYTES",
    "PEFT_TYPES", "PromptAdapter", "SoftPromptAdapter", "adapter_from_peft", "adapter_from_safetensors",
    "load_adapter", "parse_pool", "save_adapter", "validate",
]
