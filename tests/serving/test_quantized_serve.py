"""`lamp serve --quantization nf4` (bitsandbytes) end to end on the embedded backbone: concurrent
requests of different tasks answer exactly what transformers' `generate` answers, alone, on the
same quantized model; the metrics report the quantized weight bytes; and the model really holds
bitsandbytes 4-bit linear layers. nf4 is batch-invariant here, so its requests share batches (and
the prompt-KV cache is on).

int8 (LLM.int8) runs through the engine in process instead of a second server (which cost ~70 s of
the suite): the server adds nothing per quantization (`--quantization` reaches the same
`load_backbone`, exercised end to end by nf4). int8 is not batch-invariant: it picks the outlier
columns it keeps in 16 bits over all the rows of a forward, so a row's result depends on what else
that forward holds (a full run of the suite once saw a mixed batch answer one request differently
from `generate` alone): its engine runs one request per forward, prompt and input together as
`generate` does."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lamp_runtime.adapters import save_adapter
from lamp_runtime.backbone.hf import load_backbone
from lamp_runtime.backbone.options import BackboneOptions
from lamp_runtime.prompts.prepared import prepare

from ..conftest import assert_bitsandbytes_linears
from ..server_process import ServerProcess
from .conftest import engine_alone
from .test_api import metric_samples

pytestmark = pytest.mark.slow

NEW_TOKENS = 6
INPUTS = ["The capital of France is", "List three colours:"]


def reference(quantized, adapter, text: str) -> str:
    """Greedy transformers generate() on [pooled soft prompt; input embeddings], one request alone."""
    ids = quantized.tokenizer(text, return_tensors="pt")["input_ids"][0]
    embeds = quantized.embed(ids)
    if adapter is not None:
        embeds = torch.cat([prepare(adapter).prompt.to(embeds.dtype), embeds])
    with torch.no_grad():
        out = quantized.model.generate(inputs_embeds=embeds[None], max_new_tokens=NEW_TOKENS, do_sample=False,
                                       attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long))
    return quantized.tokenizer.decode(out[0], skip_special_tokens=True)


def quantized_backbone(quantization: str, backbone):
    """The embedded backbone, loaded in process with `quantization`; checked to be bitsandbytes-quantized."""
    quantized = load_backbone(BackboneOptions(dtype="float32", quantization=quantization, device="cpu"))
    assert assert_bitsandbytes_linears(quantized.model, quantization) == 30 * 7  # q k v o gate up down
    assert quantized.weights_bytes < 0.6 * backbone.weights_bytes
    return quantized


def quantized_reference(quantization: str, backbone, adapters: dict, cases: list[tuple[str, str]]):
    """Each case's greedy text from transformers on an in-process quantized backbone, and that
    backbone's weight bytes."""
    quantized = quantized_backbone(quantization, backbone)
    return [reference(quantized, adapters[task], text) for task, text in cases], quantized.weights_bytes


CASES = [(task, text) for text in INPUTS for task in ("plain", "lamp2", "lamp3")]


def test_int8_engine_answers_like_generate_on_the_same_model(backbone, task_adapters):
    quantized = quantized_backbone("int8", backbone)
    expected = [reference(quantized, task_adapters[task], text) for task, text in CASES]
    assert engine_alone(quantized, task_adapters, CASES, NEW_TOKENS) == expected


def test_quantized_server_answers_like_generate_on_the_same_model(backbone, task_adapters, tmp_path):
    quantization = "nf4"
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for task, adapter in task_adapters.items():
        save_adapter(adapter, prompts / f"{task}.safetensors")
    server = ServerProcess(store=tmp_path / "store", prompts=prompts, log_path=tmp_path / "serve.log",
                           extra_args=["--quantization", quantization, "--max-batch-size", "8"])
    server.launch()  # Ray and the server's own quantized backbone start while the reference is computed here
    try:
        cases = CASES
        expected, weights_bytes = quantized_reference(quantization, backbone, task_adapters, cases)
    except BaseException:
        server.kill()
        raise

    with server, httpx.Client(base_url=server.url, timeout=300) as client:
        def generate(case):
            task, text = case
            response = client.post("/generate", json={"task_id": task, "input": text, "max_new_tokens": NEW_TOKENS})
            response.raise_for_status()
            return response.json()["text"]

        with ThreadPoolExecutor(len(cases)) as pool:  # concurrent: tasks share batches
            answers = list(pool.map(generate, cases))
        assert answers == expected
        time.sleep(1.5)  # replicas push their metrics every 0.5 s
        metrics = client.get("/metrics").text
    served = [s.value for s in metric_samples(metrics, "lamp_backbone_bytes")]
    assert served == [weights_bytes]
    batched = sum(s.value for s in metric_samples(metrics, "lamp_batch_tasks_count")) - sum(
        s.value for s in metric_samples(metrics, "lamp_batch_tasks_bucket") if s.labels["le"] == "1.0")
    assert batched > 0, "no step held more than one task"
