"""The training-numerics warning (lamp_runtime/adapters/provenance.py) and its one exception, as
README.md states them: an adapter that records other numerics than the server's is warned about,
except a float32-trained adapter served on int4 from the same GGUF (the embedded backbone or a
.gguf path), whose Q4_1 blocks the float32 backbone was dequantized from."""

from __future__ import annotations

import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, SoftPromptAdapter
from lamp_runtime.adapters.provenance import serving_mismatch
from lamp_runtime.backbone.options import BackboneOptions


def trained_on(value: str | None) -> SoftPromptAdapter:
    extra = {} if value is None else {"trained_on": value}
    return SoftPromptAdapter(AdapterMeta(extra=extra), torch.zeros(2, 8))


@pytest.mark.parametrize("path", [None, "/models/smollm2.Q4_1.gguf"])
def test_float32_trained_on_int4_from_the_same_gguf_is_not_warned_about(path):
    options = BackboneOptions(path=path, dtype="bfloat16", quantization="int4", device="cpu")
    assert serving_mismatch(trained_on("float32/none"), options) is None


@pytest.mark.parametrize("recorded, options", [
    # int4 from an HF folder: not the GGUF's own blocks, so the exception does not apply
    ("float32/none", BackboneOptions(path="/models/llama-2-7b-hf", dtype="bfloat16", quantization="int4")),
    # trained on other numerics than float32: the exception is for float32-trained adapters only
    ("bfloat16/none", BackboneOptions(dtype="bfloat16", quantization="int4")),
    ("float32/none", BackboneOptions(dtype="bfloat16", quantization="nf4")),
    ("float32/none", BackboneOptions(dtype="float32", quantization="int8")),
    ("bfloat16/nf4", BackboneOptions(dtype="float32", quantization="none")),
])
def test_other_numerics_are_warned_about_naming_both_and_the_retrain_command(recorded, options):
    warning = serving_mismatch(trained_on(recorded), options)
    serving = f"{options.dtype}/{options.quantization}"
    assert warning is not None and f"trained on a {recorded} backbone but served on {serving}" in warning
    assert f"lamp train --dtype {options.dtype} --quantization {options.quantization}" in warning


def test_same_numerics_or_no_record_is_not_warned_about():
    options = BackboneOptions(dtype="float32", quantization="none")
    assert serving_mismatch(trained_on("float32/none"), options) is None
    assert serving_mismatch(trained_on(None), options) is None  # files from other tools say nothing
