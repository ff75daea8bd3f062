"""`lamp serve` with the repo's own `prompts/`: the bundled tuned adapters, as a user gets them.

Lists the four bundled tasks at `/v1/models` and answers held-out rows of each over HTTP, mixed in
one burst; every answer equals what the in-process engine gives with the same file. (How often the
answers are right is measured on 100 rows per task by `make prompts`, see prompts/README.md; here
they are only printed.) The server runs as `make serve` starts it, without LAMP_ADMIN_TOKEN: its admin
API is off and says how to turn it on.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from lamp_runtime.adapters import load_adapter
from lamp_runtime.hf.decoder import DecoderEngine
from lamp_runtime.requests import GenerationRequest, SamplingParams
from lamp_runtime.tasks.format import answer_matches, format_input
from lamp_runtime.tasks.synthetic import TASKS

from ..server_process import REPO_ROOT, ServerProcess

pytestmark = pytest.mark.slow

PROMPTS = REPO_ROOT / "prompts"
ROWS_PER_TASK = 4
MAX_NEW_TOKENS = {"sentiment": 4, "topic": 4, "support_triage": 4, "extract": 24}  # as in prompts/README.md


def eval_rows(task: str) -> list[dict]:
    lines = (PROMPTS / "data" / task / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:ROWS_PER_TASK]]


CASES = [(task, row) for task in sorted(MAX_NEW_TOKENS) for row in eval_rows(task)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(store=tmp_path_factory.mktemp("store"), prompts=PROMPTS,
                            log_path=tmp_path_factory.mktemp("logs") / "serve.log",
                            extra_args=["--max-batch-size", "16", "--batch-wait-ms", "50"])
    with process:
        yield process


@pytest.fixture(scope="module")
def engine_answers(backbone):
    engine = DecoderEngine(backbone)
    for task in MAX_NEW_TOKENS:
        engine.registry.register(task, load_adapter(PROMPTS / f"{task}.safetensors", backbone.hidden_size))
    requests = [GenerationRequest(format_input(row["input"]), task, SamplingParams(max_new_tokens=MAX_NEW_TOKENS[task]))
                for task, row in CASES]
    return [result.text for result in engine.generate(requests)]


def test_bundled_tasks_are_listed(server):
    models = httpx.get(f"{server.url}/v1/models", timeout=60).json()
    assert sorted(m["id"] for m in models["data"]) == sorted(p.stem for p in Path(PROMPTS).glob("*.safetensors"))
    assert set(MAX_NEW_TOKENS) <= {m["id"] for m in models["data"]}


def test_admin_is_off_without_a_token_and_says_how_to_turn_it_on(server):
    for headers in ({}, {"Authorization": "Bearer some-guess"}):
        refused = httpx.get(f"{server.url}/admin/adapters", headers=headers, timeout=60)
        assert refused.status_code == 403
        assert "set LAMP_ADMIN_TOKEN" in refused.json()["error"]["message"]
    assert httpx.delete(f"{server.url}/admin/adapters/sentiment", timeout=60).status_code == 403
    assert "sentiment" in {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=60).json()["data"]}


def test_each_bundled_task_answers_like_the_engine(server, engine_answers, backbone):
    def ask(case):
        task, row = case
        return httpx.post(f"{server.url}/generate", timeout=300, json={
            "task_id": task, "input": format_input(row["input"]), "max_new_tokens": MAX_NEW_TOKENS[task]})

    with ThreadPoolExecutor(len(CASES)) as pool:
        replies = list(pool.map(ask, CASES))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    texts = [r.json()["text"] for r in replies]
    assert texts == engine_answers
    assert all(text.strip() for text in texts)  # each adapter answers (the tuned ones stop on EOS)
    assert [r.json()["usage"]["soft_prompt_tokens"] for r in replies] == \
        [load_adapter(PROMPTS / f"{task}.safetensors", backbone.hidden_size).pooled_tokens for task, _ in CASES]
    correct = {task: sum(answer_matches(text, row["target"], TASKS[task].labels)
                         for (t, row), text in zip(CASES, texts) if t == task) for task in MAX_NEW_TOKENS}
    print("correct of", ROWS_PER_TASK, "per task:", correct)


HARNESS_ROWS = 6


def test_lm_eval_harness_scores_through_completions_like_a_direct_computation(server, backbone):
    """lm-evaluation-harness's `local-completions` model type, as people run it, on the repo's
    support_triage tasks (evals/tasks): its generations equal the engine's greedy answers, and its
    log-likelihoods (context + label as token ids with echo) equal a direct forward, every label of
    every row."""
    import torch

    from evals.harness import TASK, lm_eval_runs, run_lm_eval
    from lamp_runtime.backbone.checkpoint import backbone_folder
    from lamp_runtime.backbone.options import BackboneOptions
    from lamp_runtime.prompts.prepared import assemble_embeddings, prepare

    outcome = run_lm_eval(lm_eval_runs(server.url, backbone_folder(BackboneOptions())[0])["completions"],
                          HARNESS_ROWS)
    generations, choices = outcome["samples"]["lamp_triage_gen"], outcome["samples"]["lamp_triage_mc"]
    assert len(generations) == len(choices) == HARNESS_ROWS
    adapter = load_adapter(PROMPTS / f"{TASK}.safetensors", backbone.hidden_size)
    engine = DecoderEngine(backbone)
    engine.registry.register(TASK, adapter)
    expected = engine.generate([GenerationRequest(s["arguments"]["gen_args_0"]["arg_0"], TASK,
                                                  SamplingParams(max_new_tokens=4, stop=("\n",)))
                                for s in generations])
    assert [s["resps"][0][0] for s in generations] == [r.text for r in expected]

    for row, sample in enumerate(choices):  # each row's label log-likelihoods after its context, directly
        context = sample["arguments"]["gen_args_0"]["arg_0"]
        context_ids = backbone.tokenizer(context)["input_ids"]
        for k, label in enumerate(["billing", "shipping", "technical", "account", "other"]):
            label_ids = backbone.tokenizer(" " + label)["input_ids"]
            ids = context_ids + label_ids
            embeds = assemble_embeddings(prepare(adapter), backbone.embed(torch.tensor(ids)))
            with torch.inference_mode():
                logp = torch.log_softmax(backbone.model(inputs_embeds=embeds[None].float()).logits[0].float(), -1)
            start = adapter.pooled_tokens + len(context_ids) - 1
            direct = sum(float(logp[start + j, t]) for j, t in enumerate(label_ids))
            # logged samples hold strings
            assert abs(float(sample["resps"][k][0][0]) - direct) < 1e-3, (row, label)
