"""What the llama.cpp engine holds of a GGUF backbone: llama.cpp's model (weights in ggml's own
formats, mmap'ed), the tokenizer, and the token-embedding table (the one tensor dequantized, read
once with the `gguf` package) that soft prompts are joined to. No torch copy of the weights.

Everything that can be refused is refused before the weights load, naming the reason: a file
that is not a GGUF, an architecture llama.cpp does not run (or one with an encoder), an embedding
table whose width is not the model's, a model and KV cache that do not fit in the memory available.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbone.checkpoint import EMBEDDED_NAME, cache_root, embedded_gguf_path
from ..backbone.options import BackboneOptions
from .native import KernelSettings, lib, load_model

log = logging.getLogger(__name__)

KV_BYTES_PER_VALUE = 2  # llama.cpp's default KV cache type is f16
# What a context allocates beyond weights and KV (compute buffers, logits, batch arrays): an
# allowance, not a measurement of any one model.
CONTEXT_OVERHEAD_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class GgufInfo:
    """The facts read from a GGUF's header, before llama.cpp loads it."""

    path: Path
    architecture: str
    hidden_size: int
    layers: int
    kv_heads: int
    head_dim: int
    context_length: int
    eos_ids: frozenset[int]
    table: np.ndarray  # [vocab, hidden] float32: the dequantized token embeddings
    file_bytes: int

    @property
    def kv_bytes_per_cell(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * KV_BYTES_PER_VALUE


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def read_gguf(path: Path) -> GgufInfo:
    """Header facts and the dequantized token-embedding table of the GGUF at `path`: parsed once
    (the `gguf` reader walks the whole vocabulary, seconds) and kept in the lamp cache folder as
    JSON + .npy, memory-mapped on later starts."""
    import json

    from filelock import FileLock

    stat = path.stat()
    folder = cache_root() / "llamacpp" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    facts, table_file = folder / "info.json", folder / "token_embd.npy"
    if facts.is_file() and table_file.is_file():
        return GgufInfo(path=path, table=np.load(table_file, mmap_mode="r"), file_bytes=stat.st_size,
                        **_facts_from_json(json.loads(facts.read_text())))
    info = _parse_gguf(path)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        np.save(folder / "token_embd.tmp.npy", info.table)
        (folder / "token_embd.tmp.npy").replace(table_file)
        facts.write_text(json.dumps({"architecture": info.architecture, "hidden_size": info.hidden_size,
                                     "layers": info.layers, "kv_heads": info.kv_heads, "head_dim": info.head_dim,
                                     "context_length": info.context_length, "eos_ids": sorted(info.eos_ids)}))
    return info


def _facts_from_json(data: dict) -> dict:
    return {**data, "eos_ids": frozenset(data["eos_ids"])}


def _parse_gguf(path: Path) -> GgufInfo:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from None
    arch = _field(reader, "general.architecture")
    if not arch:
        raise ValueError(f"{path} names no general.architecture")
    hidden = _field(reader, f"{arch}.embedding_length")
    heads = _field(reader, f"{arch}.attention.head_count")
    if hidden is None or heads is None:
        raise ValueError(f"{path} ({arch}) has no {arch}.embedding_length / attention.head_count: "
                         "not a decoder llama.cpp can run with input embeddings")
    heads = int(heads if not isinstance(heads, list) else max(heads))
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    kv_heads = int(kv_heads if not isinstance(kv_heads, list) else max(kv_heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", int(hidden) // heads))
    tensor = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if tensor is None:
        raise ValueError(f"{path} ({arch}) has no token_embd.weight tensor to embed input tokens with")
    table = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != int(hidden):
        raise ValueError(f"{path}: token_embd.weight is {tuple(table.shape)} but {arch}.embedding_length is "
                         f"{hidden}: its embedding width mismatches the model's")
    eos = {int(v) for v in (_field(reader, "tokenizer.ggml.eos_token_id"), _field(reader, "tokenizer.ggml.eot_token_id"))
           if v is not None}
    return GgufInfo(path=path, architecture=str(arch), hidden_size=int(hidden),
                    layers=int(_field(reader, f"{arch}.block_count", 0)), kv_heads=kv_heads, head_dim=head_dim,
                    context_length=int(_field(reader, f"{arch}.context_length", 4096)),
                    eos_ids=frozenset(eos), table=table, file_bytes=path.stat().st_size)


def check_memory(info: GgufInfo, kv_cells: int, settings: KernelSettings, available: int | None = None) -> None:
    """Refuse, with the numbers, a model whose weights + KV cache + table cannot fit in RAM."""
    import psutil

    weights = info.file_bytes * (2 if settings.weight_repack else 1)  # repacking keeps a second copy at worst
    needed = weights + info.table.nbytes + kv_cells * info.kv_bytes_per_cell + CONTEXT_OVERHEAD_BYTES
    available = psutil.virtual_memory().available if available is None else available
    if needed > available:
        raise MemoryError(
            f"{info.path.name} cannot fit: it needs about {needed / 2**30:.1f} GiB (weights "
            f"{weights / 2**30:.1f}, embedding table {info.table.nbytes / 2**30:.2f}, KV cache of {kv_cells} cells "
            f"{kv_cells * info.kv_bytes_per_cell / 2**30:.2f}) and {available / 2**30:.1f} GiB are available; "
            "lower the KV cache (LlamaCppOptions.row_cells x max_batch_size) or free memory")


def load_tokenizer(path: Path):
    """The GGUF's tokenizer as transformers builds it, converted once and kept (no weights)."""
    from transformers import AutoTokenizer

    size = path.stat().st_size
    converted = cache_root() / "hf" / f"{path.stem}-{size}"  # a folder the hf engine converted already
    if (converted / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(converted)
    folder = cache_root() / "tokenizers" / f"{path.stem}-{size}"
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


@dataclass
class LlamaCppBackbone:
    info: GgufInfo
    name: str
    options: BackboneOptions
    tokenizer: object
    settings: KernelSettings
    model: object  # llama_model_p
    load_seconds: float

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what prompts and embedding rows are built in

    @property
    def is_encoder_decoder(self) -> bool:
        return False

    @property
    def max_positions(self) -> int:
        return self.info.context_length

    @property
    def weights_bytes(self) -> int:
        """The GGUF's weights as llama.cpp holds them plus our float32 embedding table."""
        return lib().llama_model_size(self.model) + self.info.table.nbytes

    def eos_token_ids(self) -> set[int]:
        ids = set(self.info.eos_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        ids = token_ids.cpu().numpy()
        vocab = self.info.table.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"token id out of range 0..{vocab - 1}: {ids.tolist()}")
        return torch.from_numpy(self.info.table[ids])

    def close(self) -> None:
        if self.model:
            lib().llama_model_free(self.model)
            self.model = None


def gguf_path(options: BackboneOptions) -> tuple[Path, str]:
    if options.path is None:
        return embedded_gguf_path(), EMBEDDED_NAME
    path = Path(options.path)
    if path.suffix != ".gguf" or not path.is_file():
        raise ValueError(f"the llama.cpp engine runs GGUF files; {path} is not one (use --engine hf for HF folders)")
    return path, path.stem


def refuse_options(options: BackboneOptions) -> BackboneOptions:
    """llama.cpp runs the GGUF's own formats on the CPU: dtype/quantization choices do not apply."""
    if options.device not in ("auto", "cpu"):
        raise ValueError(f"the llama.cpp engine runs on the CPU here; device {options.device!r} not supported")
    if options.quantization not in ("auto", "none"):
        raise ValueError(f"the llama.cpp engine runs the GGUF's own quantization; --quantization "
                         f"{options.quantization} does not apply (choose another GGUF file)")
    return BackboneOptions(options.path, "float32", "none", "cpu")


def load_llamacpp_backbone(options: BackboneOptions | None, settings: KernelSettings, kv_cells: int,
                           info: GgufInfo | None = None) -> LlamaCppBackbone:
    """Read and check the GGUF, then load its weights into llama.cpp with `settings`; `info`: an
    already read GGUF to load instead of the options' (a requantized copy: requantize.py)."""
    options = refuse_options(options or BackboneOptions())
    started = time.perf_counter()
    source, name = gguf_path(options)
    info = info or read_gguf(source)
    path = info.path
    check_memory(info, kv_cells, settings)
    try:
        model = load_model(str(path), settings)
    except ValueError as exc:
        raise ValueError(f"{name}: architecture {info.architecture!r} does not load in llama.cpp ({exc})") from None
    L = lib()
    try:
        tokenizer = load_tokenizer(source)  # a requantized copy has the source's vocabulary
        if L.llama_model_has_encoder(model):
            raise ValueError(f"{name} ({info.architecture}) has an encoder: the llama.cpp engine serves decoder-only "
                             "models; use --engine hf for encoder-decoder backbones")
        width = L.llama_model_n_embd(model)
        if width != info.hidden_size:
            raise ValueError(f"{name}: llama.cpp's embedding width {width} mismatches the table's {info.hidden_size}")
        vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        if vocab != info.table.shape[0] or len(tokenizer) > vocab:
            raise ValueError(f"{name}: vocabularies mismatch (llama.cpp {vocab}, embedding table "
                             f"{info.table.shape[0]}, tokenizer {len(tokenizer)})")
    except Exception:
        L.llama_model_free(model)
        raise
    backbone = LlamaCppBackbone(info=info, name=name, options=options, tokenizer=tokenizer, settings=settings,
                                model=model, load_seconds=time.perf_counter() - started)
    log.info("llama.cpp backbone %s (%s) loaded in %.1f s with %s", name, info.architecture, backbone.load_seconds,
             settings.as_dict())
    return backbone
