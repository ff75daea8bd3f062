"""Shared fixtures: the real embedded backbone (fp32), loaded once per test session, and HTTP clients."""

from __future__ import annotations

import httpx
import pytest
import torch

from lamp_runtime.adapters import AdapterMeta, LampAdapter, SoftPromptAdapter


@pytest.fixture(scope="session")
def backbone():
    from lamp_runtime.backbone.hf import load_backbone
    from lamp_runtime.backbone.options import BackboneOptions

    return load_backbone(BackboneOptions(dtype="float32", quantization="none", device="cpu"))


def vocab_prompt(backbone, length: int, seed: int) -> torch.Tensor:
    """A prompt of real token embeddings (the usual prompt-tuning init), so outputs stay fluent."""
    weight = backbone.model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    return weight[torch.randint(0, weight.shape[0], (length,), generator=generator)].detach().clone()


def lamp_from_prompt(prompt: torch.Tensor, rank: int, pool: int) -> LampAdapter:
    """Truncated SVD of a prompt, as LAMP initialises its factors."""
    u, s, vh = torch.linalg.svd(prompt, full_matrices=False)
    return LampAdapter(AdapterMeta(pool=pool), u[:, :rank].contiguous(), s[:rank].contiguous(),
                       vh[:rank].contiguous())


@pytest.fixture(scope="session")
def task_adapters(backbone):
    """Three tasks with different kinds and pooled prompt lengths (8, 6 and 4 tokens)."""
    return {
        "plain": SoftPromptAdapter(AdapterMeta(), vocab_prompt(backbone, 8, seed=1)),
        "lamp2": lamp_from_prompt(vocab_prompt(backbone, 12, seed=2), rank=8, pool=2),
        "lamp3": lamp_from_prompt(vocab_prompt(backbone, 10, seed=3), rank=6, pool=3),
    }


@pytest.fixture()
def engine(backbone, task_adapters):
    """A decoder engine with the three `task_adapters` registered."""
    from lamp_runtime.engine.base import EngineConfig
    from lamp_runtime.hf.decoder import DecoderEngine

    e = DecoderEngine(backbone, config=EngineConfig(max_batch_size=8))
    for task_id, adapter in task_adapters.items():
        e.registry.register(task_id, adapter)
    return e


def assert_bitsandbytes_linears(model, quantization: str) -> int:
    """Every linear layer of the transformer blocks is a bitsandbytes module of `quantization`
    (nf4: Linear4bit holding Params4bit; int8: Linear8bitLt holding Int8Params), except those the
    model class keeps in full precision on purpose (T5's `wo`, its `_keep_in_fp32_modules`) and
    the LM head; returns how many."""
    import bitsandbytes as bnb

    kind, params = {"nf4": (bnb.nn.Linear4bit, bnb.nn.Params4bit),
                    "int8": (bnb.nn.Linear8bitLt, bnb.nn.Int8Params)}[quantization]
    kept = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name
               and not any(name.split(".")[-1] == k for k in kept)]
    assert linears and all(isinstance(m, kind) and isinstance(m.weight, params) for m in linears), \
        sorted({type(m).__name__ for m in linears})
    if quantization == "nf4":
        assert all(m.weight.quant_state.quant_type == "nf4" for m in linears)
    return len(linears)


# (task, input, max_new_tokens): requests finishing at different steps, so rows leave mid-batch
# (the prompt-KV and CUDA decoder tests run them staggered and together).
STAGGERED_CASES = [
    ("plain", "The capital of France is", 12),
    ("long", "Write a haiku about the sea:", 8),
    ("lamp3", "1, 2, 3,", 16),
    (None, "Hello, my name is", 6),
    ("ept", "Once upon a time", 10),
    ("long", "def add(a, b):", 14),
    ("lamp2", "Q: What is 2 + 2?\nA:", 5),
]


def run_staggered_results(engine, requests, every: int) -> list:
    """Submit one request every `every` engine steps while the others decode (continuous
    batching); return each request's result in submission order."""
    results, pending, steps = {}, list(requests), 0
    while len(results) < len(requests):
        if pending and steps % every == 0:
            engine.submit(pending.pop(0))
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.result
        steps += 1
    return [results[r.request_id] for r in requests]


def run_staggered(engine, requests, every: int) -> list[list[int]]:
    """run_staggered_results' token ids."""
    return [result.token_ids for result in run_staggered_results(engine, requests, every)]


# HTTP clients of the real server that a test package starts as its own `server` fixture
# (tests/serving, tests/reliability).
@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture()
def admin(server):
    with httpx.Client(base_url=server.url, timeout=120, headers=server.admin_headers()) as c:
        yield c


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL server for the session (tests/local_postgres.py); skips where none is installed."""
    from .local_postgres import local_postgres

    with local_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path):
    """A fresh, empty registry database: SQLite in the test's folder, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    from .local_postgres import fresh_database

    server = request.getfixturevalue("postgres_server")
    return fresh_database(server, f"t{abs(hash(request.node.nodeid)) % 10**12}")
