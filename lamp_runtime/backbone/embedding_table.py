"""The backbone's input-embedding matrix, read alone from its safetensors files.

The vLLM engine runs the model in its own process; this process only needs to turn input token
ids into embeddings (to append them to a soft prompt). So we read that one tensor instead of
loading a second copy of the whole model. Its parameter name is found by building the model
class on the meta device (no memory, no weights) and asking it for its input embeddings, so any
architecture transformers knows works without a table of names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class EmbeddingTable:
    """[vocab, hidden] embeddings held once on the host, in the dtype the model runs in."""

    def __init__(self, weight: torch.Tensor):
        if weight.dim() != 2:
            raise ValueError(f"an embedding table must be [vocab, hidden], got shape {tuple(weight.shape)}")
        self.weight = weight

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[n] token ids -> [n, hidden] embeddings (a copy; the table is never written)."""
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.vocab_size):
            raise ValueError(f"token id out of range 0..{self.vocab_size - 1}: {token_ids.tolist()}")
        return self.weight[token_ids]


def input_embedding_name(folder: Path) -> str:
    """The state-dict name of the model's input embedding weight (e.g. model.embed_tokens.weight)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weight = model.get_input_embeddings().weight
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if parameter is weight:
            return name
    raise ValueError(f"cannot find the input embedding parameter of {type(model).__name__}")


def _file_holding(folder: Path, name: str) -> Path:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        if name not in weight_map:
            raise ValueError(f"{index} does not list {name!r}")
        return folder / weight_map[name]
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    return single


def load_embedding_table(folder: str | Path, dtype: torch.dtype) -> EmbeddingTable:
    """Read only the input-embedding tensor of the HF checkpoint in `folder`, cast to `dtype`."""
    from safetensors import safe_open

    folder = Path(folder)
    name = input_embedding_name(folder)
    path = _file_holding(folder, name)
    with safe_open(str(path), framework="pt") as f:
        if name not in f.keys():
            raise ValueError(f"{path.name} has no tensor {name!r} (tensors: {sorted(f.keys())[:8]} ...)")
        weight = f.get_tensor(name)
    table = EmbeddingTable(weight.to(dtype).contiguous())
    log.info("embedding table %s %s read from %s (%.0f MB)", name, tuple(weight.shape), path.name, table.nbytes / 1e6)
    return table
