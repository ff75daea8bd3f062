"""A GGUF rewritten by llama.cpp's own quantizer into a weight type whose CPU kernels run faster
on this host, once, and kept in the lamp cache folder (LlamaCppOptions.requantize).

    .venv/bin/python -m lamp_runtime.llamacpp.requantize [SOURCE.gguf] TYPE

makes it ahead of serving and prints its path (to train adapters on, `lamp train --backbone`);
SOURCE defaults to the embedded GGUF.

Why: llama.cpp repacks some weight types at load into interleaved layouts with batched kernels
(on x86 Q4_0, IQ4_NL and Q4_K) and runs the others a row pair at a time. On the AMD EPYC here the
embedded Q4_1 GGUF has no such layout: docs/bench/llamacpp.json has llama-bench and the served
engine on both files. The price is a second rounding of every weight: the requantized model is not
the GGUF's function, so a soft prompt tuned on the original may answer differently
(docs/bench/accuracy-llamacpp.json measures the bundled tasks on both). Opt-in, never chosen for
the user.

llama.cpp keeps the token-embedding table's type where it is also the output projection and the
width is not a multiple of 256 (SmolLM2's Q8_0 stays Q8_0): the table soft prompts are joined to
is then the source's.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import time
from pathlib import Path

from ..backbone.checkpoint import cache_root
from ..backbone.gguf_file import gguf_scalar
from .native import last_errors, lib
from .options import REQUANTIZE_TYPES

log = logging.getLogger(__name__)

# The output is about the source's size for 4-bit targets and up to 4x it for F16 from Q4: refuse
# when the disk cannot hold that much with room to spare.
DISK_FACTOR = {"Q8_0": 2.2, "Q6_K": 1.8, "F16": 4.2}


def check_type(name: str) -> str:
    if name not in REQUANTIZE_TYPES:
        raise ValueError(f"requantize type {name!r} is not one of {', '.join(REQUANTIZE_TYPES)}")
    return name


def file_type(path: Path) -> int | None:
    """The GGUF's general.file_type (a LLAMA_FTYPE value), None when it does not say."""
    value = gguf_scalar(path, "general.file_type")
    return None if value is None else int(value)


def requantized_path(source: Path, name: str) -> Path:
    """Where `source` requantized to `name` is kept: one file per source (path stem, size, mtime)
    and llama-cpp-python version."""
    from importlib.metadata import version

    stat = source.stat()
    tag = f"{source.stem}-{stat.st_size}-{int(stat.st_mtime)}-llama-cpp-{version('llama_cpp_python')}"
    return cache_root() / "llamacpp-requantized" / f"{tag}.{name}.gguf"


def requantized_gguf(source: Path, name: str, threads: int = 2) -> Path:
    """`source` requantized to `name` (of REQUANTIZE_TYPES), made once (under a file lock: replicas
    starting together make it once), or `source` itself when it is of that type already."""
    from filelock import FileLock

    if file_type(source) == getattr(lib(), f"LLAMA_FTYPE_MOSTLY_{check_type(name)}"):
        return source
    log.warning("serving %s requantized to %s: adapters trained on its own weights can lose their accuracy "
                "on it; serve adapters trained on the requantized file (docs/llamacpp.md, Requantized weights)",
                source.name, name)
    out = requantized_path(source, name)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if out.is_file():  # another replica made it while this one waited
            return out
        needed = int(source.stat().st_size * DISK_FACTOR.get(name, 1.3))
        free = shutil.disk_usage(out.parent).free
        if needed > free:
            raise OSError(f"requantizing {source.name} to {name} needs about {needed / 2**30:.1f} GiB of disk in "
                          f"{out.parent} and {free / 2**30:.1f} GiB are free")
        log.info("requantizing %s to %s into %s (once; kept for later starts)", source.name, name, out.parent)
        started = time.perf_counter()
        quantize_file(source, out, name, threads)
        log.info("requantized %s to %s in %.1f s", source.name, name, time.perf_counter() - started)
    return out


def quantize_file(source: Path, out: Path, name: str, threads: int = 2, token_embd: str | None = None) -> Path:
    """Write `source` requantized to `name` at `out` (through `out`.partial, renamed when whole);
    `token_embd` (a GGML type name) overrides the type llama.cpp gives that tensor."""
    L = lib()
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, f"LLAMA_FTYPE_MOSTLY_{check_type(name)}")
    params.allow_requantize = True  # the source is quantized already
    params.nthread = threads
    if token_embd is not None:
        from gguf import GGMLQuantizationType

        params.token_embedding_type = int(GGMLQuantizationType[token_embd])
    partial = out.with_name(out.name + ".partial")
    code = L.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if code != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not requantize {source.name} to {name} ({code}): "
                           f"{last_errors() or 'no reason given'}")
    partial.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    from ..backbone.checkpoint import embedded_gguf_path

    parser = argparse.ArgumentParser(description="Requantize a GGUF with llama.cpp (once; kept in the lamp cache) "
                                                 "and print the path of the result.")
    parser.add_argument("source", nargs="?", type=Path, help="the GGUF (default: the embedded one)")
    parser.add_argument("type", choices=REQUANTIZE_TYPES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(requantized_gguf(args.source or embedded_gguf_path(), args.type))


if __name__ == "__main__":
    main()
