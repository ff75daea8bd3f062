"""Request values that used to escape validation and crash a replica call (500s), checked where
they are validated; the HTTP-level versions are in test_fuzz_api.py."""

from __future__ import annotations

import json

import pytest
import torch

from lamp_runtime.engine.sampling import make_generator
from lamp_runtime.errors import RequestError
from lamp_runtime.requests import MAX_SEED, MIN_SEED, SamplingParams
from serving.http.protocol import CompletionRequest, GenerateRequest


@pytest.mark.parametrize("seed", [MAX_SEED + 1, MIN_SEED - 1, 10**30, True, 1.5])
def test_seed_outside_what_torch_accepts_is_a_request_error(seed):
    with pytest.raises(RequestError, match="seed must be null or an integer in"):
        SamplingParams(temperature=0.7, seed=seed)


@pytest.mark.parametrize("seed", [MIN_SEED, -1, 0, MAX_SEED])
def test_every_accepted_seed_seeds_a_generator(seed):
    """The seed acts: the generator is at that seed (two made from it draw the same numbers, and
    the same as torch's own generator seeded with it), and a different seed draws differently."""
    params = SamplingParams(temperature=0.7, seed=seed)
    first, second = (make_generator(params, torch.device("cpu")) for _ in range(2))
    assert first.initial_seed() == seed % 2**64  # torch keeps a negative seed modulo 2**64
    draws = torch.rand(8, generator=first)
    assert torch.equal(draws, torch.rand(8, generator=second))
    assert torch.equal(draws, torch.rand(8, generator=torch.Generator().manual_seed(seed)))
    other = seed + 1 if seed < MAX_SEED else seed - 1
    assert not torch.equal(draws, torch.rand(8, generator=make_generator(
        SamplingParams(temperature=0.7, seed=other), torch.device("cpu"))))


@pytest.mark.parametrize("model, raw", [
    (GenerateRequest, {"task_id": "t", "input": "ok \ud800"}),
    (CompletionRequest, {"model": "t", "prompt": "\udfff"}),
    (CompletionRequest, {"model": "t", "prompt": ["fine", "bad \udbff"]}),
])
def test_lone_surrogates_are_refused_naming_the_field(model, raw):
    # What FastAPI hands the model after json.loads of a body with a "\ud800" escape.
    body = json.loads(json.dumps(raw))
    with pytest.raises(ValueError, match="lone surrogate"):
        model.model_validate(body)


def test_real_unicode_text_is_accepted():
    assert GenerateRequest.model_validate({"task_id": "t", "input": "café 😀 ☃"}).input == "café 😀 ☃"
