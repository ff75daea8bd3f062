"""`lamp serve --backbone <T5 folder>` end to end: an encoder-decoder backbone in its own server.

A tiny seeded random T5 (tests/runtime/test_t5_engine.py builds it; no T5 weights are reachable here) is
served by the real `lamp serve` on a free port. Adapters of three kinds sized for its d_model are
registered over the admin API, concurrent HTTP requests mixing them must return the texts a direct
transformers `generate(inputs_embeds=...)` gives in this process, and an adapter sized for the
decoder-only default backbone (hidden 576) must be refused by name without disturbing the others.

The server gets an empty `prompts/` folder: the repo's bundled adapters are 576 wide, so the
server would log one "not registered" error per file at start (and skip them) for this backbone.
Its store, though, already holds one 576-wide adapter, as a store last used with the default
backbone would: requests for that task must say why it cannot be served (409), not "unknown".
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer, T5ForConditionalGeneration

from lamp_runtime.adapters import AdapterLimits, AdapterMeta, EptAdapter, LampAdapter, SoftPromptAdapter, save_adapter
from lamp_runtime.backbone.checkpoint import backbone_folder
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.prompts.math import average_pool
from serving.store.files import store_adapter
from serving.store.registry import open_store

from ..server_process import ServerProcess
from ..tiny_t5 import D_MODEL, build_tiny_t5

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "t5-admin-token"
NEW_TOKENS = 8
DECODER_HIDDEN = 576  # the embedded SmolLM2's hidden size, which the bundled adapters have
UNKNOWN_TASK = "not-registered"
FOREIGN_TASK = "made-for-smollm"  # in the store before the server starts, 576 wide
CASES = [("t5-lamp", "summarize: the cat sat on the mat"), ("t5-plain", "translate English to German: hello"),
         ("t5-ept", "question: why is the sky blue?"), ("t5-lamp", "a b c"),
         ("t5-ept", "x"),  # shorter than the EPT offset: only its first row is added
         ("t5-plain", "one more request with a longer input than the others"), ("t5-lamp", "hello world")]
# Checked when written: every case but the first EPT one gives another text without its adapter, and
# "x" another one without the EPT offset; the first plain case ends at once on EOS (empty text).


def seeded(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=generator)


def make_adapters(hidden: int, seed: int) -> dict:
    randn = seeded(seed)
    return {
        "t5-lamp": LampAdapter(AdapterMeta(pool=3), randn(10, 4), randn(4).abs() + 0.5, randn(4, hidden)),
        "t5-plain": SoftPromptAdapter(AdapterMeta(), randn(5, hidden)),
        "t5-ept": EptAdapter(AdapterMeta(), randn(3, hidden), randn(4, 2), randn(2, hidden)),
    }


def prompt_and_offset(adapter) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The soft prompt and the EPT offset written out from the adapter's factors (the paper's math)."""
    if isinstance(adapter, LampAdapter):
        return average_pool(adapter.u @ torch.diag(adapter.q) @ adapter.v, adapter.meta.pool), None
    if isinstance(adapter, EptAdapter):
        return average_pool(adapter.prompt, adapter.meta.pool), adapter.a @ adapter.b
    return average_pool(adapter.prompt, adapter.meta.pool), None


@pytest.fixture(scope="module")
def tokenizer():
    folder, _ = backbone_folder(BackboneOptions())
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory, tokenizer):
    return build_tiny_t5(tmp_path_factory.mktemp("t5") / "tiny-t5", tokenizer)


@pytest.fixture(scope="module")
def adapters():
    return make_adapters(D_MODEL, seed=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory, t5_folder):
    store = tmp_path_factory.mktemp("store")
    store_adapter(open_store(store), FOREIGN_TASK, make_adapters(DECODER_HIDDEN, seed=3)["t5-lamp"], DECODER_HIDDEN,
                  AdapterLimits())
    process = ServerProcess(
        store=store, prompts=tmp_path_factory.mktemp("empty-prompts"),
        admin_token=ADMIN_TOKEN, log_path=tmp_path_factory.mktemp("logs") / "serve.log",
        extra_args=["--backbone", str(t5_folder), "--max-batch-size", "8", "--batch-wait-ms", "50",
                    "--max-new-tokens", "32"],
    )
    with process:
        yield process


def upload(server, task_id: str, adapter, tmp_path) -> httpx.Response:
    data = save_adapter(adapter, tmp_path / f"{task_id}.safetensors").read_bytes()
    return httpx.put(f"{server.url}/admin/adapters/{task_id}", headers=server.admin_headers(), timeout=120,
                     files={"adapter": ("adapter.safetensors", data)})


@pytest.fixture(scope="module")
def registered(server, adapters, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    replies = {task_id: upload(server, task_id, adapter, folder) for task_id, adapter in adapters.items()}
    for task_id, reply in replies.items():
        assert reply.status_code == 201, f"{task_id}: {reply.status_code} {reply.text}"
    return {task_id: reply.json() for task_id, reply in replies.items()}


@pytest.fixture(scope="module")
def reference(t5_folder, tokenizer, adapters):
    """Greedy texts of transformers' own T5 generate on [prompt ; embeddings (+ EPT offset)], decoded
    as the server decodes: the decoder start token dropped, cut at the first end-of-sequence id,
    special tokens skipped."""
    model = T5ForConditionalGeneration.from_pretrained(t5_folder, dtype=torch.float32).eval()
    eos_ids = {model.config.eos_token_id, model.generation_config.eos_token_id, tokenizer.eos_token_id} - {None}
    texts = []
    for task_id, text in CASES:
        ids = torch.tensor(tokenizer(text)["input_ids"])
        with torch.no_grad():
            inputs = model.get_encoder().get_input_embeddings()(ids)
        prompt, offset = prompt_and_offset(adapters[task_id])
        if offset is not None:
            n = min(len(ids), offset.shape[0])
            inputs = torch.cat([inputs[:n] + offset[:n], inputs[n:]])
        inputs = torch.cat([prompt, inputs])
        with torch.no_grad():
            out = model.generate(inputs_embeds=inputs[None],
                                 attention_mask=torch.ones(1, len(inputs), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False)
        generated = []
        for token in out[0].tolist()[1:]:
            if token in eos_ids:
                break
            generated.append(token)
        texts.append(tokenizer.decode(generated, skip_special_tokens=True))
    return texts


def generate(server, task_id: str, text: str) -> httpx.Response:
    return httpx.post(f"{server.url}/generate", timeout=300,
                      json={"task_id": task_id, "input": text, "max_new_tokens": NEW_TOKENS})


def request_counts(server) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=60).text
    return {(s.labels["task"], s.labels["status"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "lamp_requests_total"}


def test_adapters_of_every_kind_register_for_the_t5_hidden_size(server, registered):
    assert {task: (body["kind"], body["version"], body["prompt_tokens"], body["pooled_tokens"])
            for task, body in registered.items()} == {
        "t5-lamp": ("lamp", 1, 10, 4), "t5-plain": ("soft_prompt", 1, 5, 5), "t5-ept": ("ept", 1, 3, 3)}
    models = httpx.get(f"{server.url}/v1/models", timeout=60).json()
    assert sorted(m["id"] for m in models["data"]) == sorted([*registered, FOREIGN_TASK])
    health = httpx.get(f"{server.url}/healthz", timeout=60).json()
    assert health["backbone"] == "tiny-t5"


def test_concurrent_mixed_tasks_match_transformers_generate(server, registered, reference):
    before = request_counts(server)
    cases = [*CASES, (UNKNOWN_TASK, "hello")]
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda case: generate(server, *case), cases))
    *served, unknown = replies
    for (task_id, text), reply in zip(CASES, served, strict=True):
        assert reply.status_code == 200, f"{task_id} {text!r}: {reply.status_code} {reply.text}"
    bodies = [reply.json() for reply in served]
    assert [b["text"] for b in bodies] == reference
    assert [b["task_id"] for b in bodies] == [task for task, _ in CASES]
    assert [b["usage"]["soft_prompt_tokens"] for b in bodies] == \
        [registered[task]["pooled_tokens"] for task, _ in CASES]
    assert all(b["adapter_version"] == 1 for b in bodies)
    assert unknown.status_code == 404 and f"unknown task id {UNKNOWN_TASK!r}" in unknown.json()["error"]["message"]

    expected = {task: sum(t == task for t, _ in CASES) for task in registered}
    deadline = time.monotonic() + 15  # the ingress publishes its counters every 0.5 s
    while True:
        after = request_counts(server)
        grown = {task: after.get((task, "200"), 0) - before.get((task, "200"), 0) for task in registered}
        if grown == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert grown == expected
    assert after.get(("other", "404"), 0) - before.get(("other", "404"), 0) == 1  # unknown ids never become labels


def test_decoder_sized_adapter_is_refused_by_hidden_size(server, registered, reference, tmp_path):
    wide = make_adapters(DECODER_HIDDEN, seed=9)
    for task_id, adapter in wide.items():
        reply = upload(server, f"{task_id}-576", adapter, tmp_path)
        assert reply.status_code == 422, f"{task_id}: {reply.status_code} {reply.text}"
        message = reply.json()["error"]["message"]
        assert f"d={DECODER_HIDDEN}" in message and f"hidden size {D_MODEL}" in message, message
    # Re-registering an existing task with a wide adapter keeps its current version serving.
    assert upload(server, "t5-lamp", wide["t5-lamp"], tmp_path).status_code == 422
    models = httpx.get(f"{server.url}/v1/models", timeout=60).json()
    assert sorted(m["id"] for m in models["data"]) == sorted([*registered, FOREIGN_TASK])
    for index, (task_id, text) in enumerate(CASES[:3]):
        reply = generate(server, task_id, text)
        assert reply.status_code == 200, reply.text
        assert (reply.json()["adapter_version"], reply.json()["text"]) == (1, reference[index])


def test_a_stored_adapter_for_another_backbone_is_explained_not_unknown(server, registered):
    reply = generate(server, FOREIGN_TASK, "hello")
    assert reply.status_code == 409, reply.text
    message = reply.json()["error"]["message"]
    assert f"task {FOREIGN_TASK!r} is in the adapter store but this server cannot serve it" in message
    assert f"d={DECODER_HIDDEN}" in message and f"hidden size {D_MODEL}" in message, message
