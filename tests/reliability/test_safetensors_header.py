"""The safetensors header parser turns every hostile header into an AdapterError naming the problem.

Regression: entries with the wrong JSON types (offsets that are not two integers, a list as dtype,
a number as shape) used to escape as TypeError/ValueError, which the admin API answered with a
bare `500 Internal Server Error` instead of a 422.
"""

from __future__ import annotations

import io
import zipfile

import pytest

from lamp_runtime.adapters import adapter_from_safetensors
from lamp_runtime.adapters.safetensors_io import load_tensors, parse_header
from lamp_runtime.errors import AdapterError

from .hostile_files import MALFORMED_HEADERS, lamp_file, pickle_file, raw_safetensors, zip_file


@pytest.mark.parametrize("header, payload, expected", [case[1:] for case in MALFORMED_HEADERS],
                         ids=[case[0] for case in MALFORMED_HEADERS])
def test_malformed_header_is_an_adapter_error_naming_the_problem(header, payload, expected):
    data = raw_safetensors(header, b"\0" * payload)
    with pytest.raises(AdapterError) as caught:
        load_tensors(data)
    assert str(caught.value)
    if expected is not None:
        assert expected in str(caught.value)


def test_not_safetensors_at_all():
    assert zipfile.is_zipfile(io.BytesIO(zip_file()))  # what torch.save writes
    good = lamp_file()
    for data, expected in ((pickle_file(), "not a safetensors file"), (zip_file(), "not a safetensors file"),
                           (b"", "only 0 bytes"), (good[: len(good) // 2], "truncated"),
                           (good[:8] + b"\xff" * 64, "header"), (b"\x10" + b"\0" * 7 + b"not json!!" * 2, "not JSON")):
        with pytest.raises(AdapterError, match=expected):
            adapter_from_safetensors(data)


def test_a_well_formed_file_still_parses():
    metadata, header = parse_header(lamp_file())
    assert metadata["format"] == "lamp" and set(header) == {"lamp.U", "lamp.Q", "lamp.V"}
