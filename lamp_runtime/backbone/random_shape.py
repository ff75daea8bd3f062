"""A backbone of a real model's shape with random weights, for benchmarks only: Llama-2-7B's size
without its weights (no model hub here, and 7B weights would not be ours to ship).

    python -m lamp_runtime.backbone.random_shape [--shape llama-2-7b] [--seed 0] [--out PATH]

writes a Q4_1 GGUF (the `gguf` package's writer) tensor by tensor: random Q4_1 blocks are
generated directly (random nibbles, a small fp16 scale d per block and the minimum m = -7.5 d, so
each weight is zero-mean with standard deviation 1 / sqrt(fan-in) and activations stay finite
through every layer; norms are 1), streamed to disk, never the whole model in memory. The file is
4.0 GB at the 7B shape and goes to $LAMP_CACHE_DIR/random (or the user cache dir), never into the
repository. llama.cpp, `llama-bench` and lamp's int4 engine (backbone/gguf_int4.py, tensor by
tensor) all run the very same model from it.

The tokenizer is the embedded SmolLM2 GGUF's byte-level BPE cut to Llama-2's 32,000 tokens: its
merges are ordered by the id of the token they create, so the first 31,748 merges build exactly
tokens 0..31,999 (checked at write time). The vocabulary size, not the tokens, is what sets the
embedding and output-head bytes a benchmark measures.

Every such file says it is random: general.name starts with "random-" and `lamp.random_weights` is
true. `lamp serve` refuses it unless `--allow-random-weights` is given, and benches record
`"random_weights": true`.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RANDOM_WEIGHTS_KEY = "lamp.random_weights"
RANDOM_NAME_PREFIX = "random-"
Q4_1_GROUP = 32
NIBBLE_STD = math.sqrt((16**2 - 1) / 12)  # standard deviation of a uniform integer in 0..15
SCALE_JITTER = 0.25  # each block's scale d is drawn in [1 - j, 1 + j] x the tensor's: groups differ
TOKENIZER_VOCAB = 32000
TOKENIZER_KEYS_COPIED = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template")
TOKENIZER_IDS_COPIED = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that make a Llama-family model's cost: what a random model of it needs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = TOKENIZER_VOCAB
    context: int = 4096
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden} / heads {self.heads} / kv_heads {self.kv_heads} do not divide")
        if self.hidden % Q4_1_GROUP or self.intermediate % Q4_1_GROUP:
            raise ValueError(f"Q4_1 needs hidden and intermediate divisible by {Q4_1_GROUP}")
        if self.vocab != TOKENIZER_VOCAB:
            raise ValueError(f"the random models' tokenizer has {TOKENIZER_VOCAB} tokens, got vocab {self.vocab}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """GGUF tensor names and numpy shapes ([out, in] for matrices), in llama.cpp's file order."""
        kv = self.kv_heads * self.head_dim
        out = [("token_embd.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            out += [(f"blk.{i}.attn_norm.weight", (self.hidden,)),
                    (f"blk.{i}.attn_q.weight", (self.hidden, self.hidden)),
                    (f"blk.{i}.attn_k.weight", (kv, self.hidden)),
                    (f"blk.{i}.attn_v.weight", (kv, self.hidden)),
                    (f"blk.{i}.attn_output.weight", (self.hidden, self.hidden)),
                    (f"blk.{i}.ffn_norm.weight", (self.hidden,)),
                    (f"blk.{i}.ffn_gate.weight", (self.intermediate, self.hidden)),
                    (f"blk.{i}.ffn_up.weight", (self.intermediate, self.hidden)),
                    (f"blk.{i}.ffn_down.weight", (self.hidden, self.intermediate))]
        return out + [("output_norm.weight", (self.hidden,)), ("output.weight", (self.vocab, self.hidden))]

    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())


SHAPES = {
    "llama-2-7b": LlamaShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008),
    # For tests: every code path of the 7B shape (grouped-query heads included), in a second.
    "tiny": LlamaShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, context=512),
    # For tests of K-quant types (Q4_K, Q6_K: rows of 256 values), token_embd included.
    "tiny-k": LlamaShape(hidden=256, layers=1, heads=4, kv_heads=2, intermediate=512, context=512),
}


def default_path(shape: str, seed: int) -> Path:
    from .checkpoint import cache_root

    return cache_root() / "random" / f"random-{shape}-shape-seed{seed}.Q4_1.gguf"


def random_q4_1_blocks(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Q4_1 blocks [rows, cols / 32 * 20] (uint8) of zero-mean weights with std 1 / sqrt(cols)."""
    from gguf import GGMLQuantizationType, quant_shape_to_byte_shape

    blocks = cols // Q4_1_GROUP
    d = (1 / math.sqrt(cols) / NIBBLE_STD) * rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER, (rows, blocks, 1))
    d = d.astype(np.float16)
    m = (-7.5 * d.astype(np.float32)).astype(np.float16)  # q * d + m: mean of q (7.5) maps to ~0
    nibbles = rng.integers(0, 256, (rows, blocks, 16), dtype=np.uint8)
    out = np.concatenate([d.view(np.uint8), m.view(np.uint8), nibbles], axis=-1).reshape(rows, -1)
    expected = quant_shape_to_byte_shape((rows, cols), GGMLQuantizationType.Q4_1)
    if out.shape != tuple(expected):
        raise RuntimeError(f"Q4_1 layout {out.shape} != {expected}: the gguf package changed its block layout")
    return out


def tokenizer_metadata(vocab: int = TOKENIZER_VOCAB) -> dict:
    """The embedded SmolLM2 GGUF's tokenizer, cut to its first `vocab` tokens and the merges that build them."""
    from gguf import GGUFReader

    from .checkpoint import embedded_gguf_path

    reader = GGUFReader(str(embedded_gguf_path()))
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()[:vocab]
    kept = set(tokens)
    merges = []
    for merge in fields["tokenizer.ggml.merges"].contents():
        left, right = merge.split(" ", 1)
        if left in kept and right in kept and left + right in kept:
            merges.append(merge)
    meta = {"tokens": tokens, "token_type": fields["tokenizer.ggml.token_type"].contents()[:vocab], "merges": merges}
    meta.update({key: fields[key].contents() for key in TOKENIZER_KEYS_COPIED})
    meta.update({key: fields[f"tokenizer.ggml.{key}"].contents() for key in TOKENIZER_IDS_COPIED})
    if any(meta[key] >= vocab for key in TOKENIZER_IDS_COPIED):
        raise ValueError(f"a special token id is beyond the {vocab}-token vocabulary")
    return meta


def write_random_gguf(path: str | os.PathLike | None = None, shape: str = "llama-2-7b", seed: int = 0,
                      progress: bool = True) -> Path:
    """Write a random-weight Q4_1 GGUF of `shape` (a SHAPES key) tensor by tensor; return its path.

    Written to a temporary name and renamed when complete: an interrupted run leaves no file that
    looks finished. An existing file at `path` is replaced.
    """
    import gguf
    from gguf import GGMLQuantizationType, GGUFWriter, quant_shape_to_byte_shape
    from tqdm import tqdm

    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} unknown; use one of {', '.join(SHAPES)}")
    spec = SHAPES[shape]
    path = Path(path) if path is not None else default_path(shape, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    writer = GGUFWriter(str(tmp), "llama")
    writer.add_name(f"{RANDOM_NAME_PREFIX}{shape}-shape")
    writer.add_bool(RANDOM_WEIGHTS_KEY, True)
    writer.add_uint32("lamp.random_seed", seed)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(spec.intermediate)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_vocab_size(spec.vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok = tokenizer_metadata(spec.vocab)
    writer.add_tokenizer_model(tok["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["token_type"])
    writer.add_token_merges(tok["merges"])
    writer.add_bos_token_id(tok["bos_token_id"])
    writer.add_eos_token_id(tok["eos_token_id"])
    writer.add_unk_token_id(tok["unknown_token_id"])
    writer.add_pad_token_id(tok["padding_token_id"])
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(tok["tokenizer.chat_template"])

    tensors = spec.tensors()
    for name, dims in tensors:
        if len(dims) == 1:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * 4)
        else:
            byte_shape = quant_shape_to_byte_shape(dims, GGMLQuantizationType.Q4_1)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape),
                                   raw_dtype=GGMLQuantizationType.Q4_1)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(math.prod(quant_shape_to_byte_shape(d, GGMLQuantizationType.Q4_1)) if len(d) == 2 else d[0] * 4
                    for _, d in tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"random {shape} GGUF",
                  disable=not progress) as bar:
            for index, (name, dims) in enumerate(tensors):
                rng = np.random.default_rng([seed, index])
                data = np.ones(dims, np.float32) if len(dims) == 1 else random_q4_1_blocks(rng, *dims)
                writer.write_tensor_data(data)
                bar.update(data.nbytes)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)
    return path


def gguf_is_random(path: str | os.PathLike) -> bool:
    """Whether a GGUF file says its weights are random (`lamp.random_weights`); reads the header only."""
    from .gguf_file import gguf_reader

    field = gguf_reader(path).fields.get(RANDOM_WEIGHTS_KEY)
    return bool(field is not None and field.contents())


def backbone_is_random(path: str | os.PathLike | None) -> bool:
    """Whether the backbone at `path` (a .gguf file, an HF folder, or None: the embedded one) is random."""
    if path is None or not str(path).endswith(".gguf") or not Path(path).is_file():
        return False
    return gguf_is_random(path)


def refuse_random_weights(path: str | os.PathLike | None, allowed: bool) -> None:
    """Serving a random-weight backbone is a mistake unless asked for by name."""
    if not allowed and backbone_is_random(path):
        raise ValueError(f"backbone {path} has random weights (made for benchmarks: it generates noise); "
                         "pass --allow-random-weights (allow_random_weights: true) to serve it anyway")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight Q4_1 GGUF of a model's shape (benchmarks only)")
    parser.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="the .gguf to write (default: $LAMP_CACHE_DIR/random/...)")
    args = parser.parse_args(argv)
    spec = SHAPES[args.shape]
    print(f"{args.shape}: {spec.parameters() / 1e9:.2f} B parameters, random weights (benchmarks only)")
    print(write_random_gguf(args.out, args.shape, args.seed))


if __name__ == "__main__":
    main()
