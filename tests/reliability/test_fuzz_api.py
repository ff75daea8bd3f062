"""Fuzzing the HTTP API: schemathesis generates requests from the server's own OpenAPI schema
(valid and invalid ones) for every route, and a hypothesis property sends generation requests for
registered tasks with arbitrary parameters. No request may get a 5xx or hang, every error has the
JSON error shape, and every 200 respects the limits it was given.

Examples are derandomized (the same requests every run) and bounded per operation.
"""

from __future__ import annotations

import json

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from .conftest import BUNDLED_TASKS, MAX_NEW_TOKENS, MAX_QUEUE
from .traffic import REQUEST_TIMEOUT_S

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 25
FUZZ_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck), print_blob=True)
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# Negative (schema-violating) cases exist only where the schema constrains something: the bodies.
INFERENCE = [("POST", "/generate", POSITIVE), ("POST", "/generate", NEGATIVE), ("POST", "/v1/completions", POSITIVE),
             ("POST", "/v1/completions", NEGATIVE), ("GET", "/v1/models", POSITIVE), ("GET", "/healthz", POSITIVE),
             ("GET", "/metrics", POSITIVE)]
ADMIN = [("PUT", "/admin/adapters/{task_id}"), ("GET", "/admin/adapters/{task_id}"),
         ("DELETE", "/admin/adapters/{task_id}"), ("GET", "/admin/adapters")]


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def check_answer(status: int, headers, body: bytes, what) -> None:
    """No 5xx except a clean overload refusal; every error in the JSON error shape."""
    if status in (429, 503):  # more engine requests than the queue holds (a list of prompts): refused, not failed
        kind = "rate_limited" if status == 429 else "overloaded"  # 429: one task beyond its share
        assert headers.get("retry-after") == "1" and json.loads(body)["error"]["type"] == kind, (body, what)
    else:
        assert status < 500, (status, body[:300], what)
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:300], what)
        error = json.loads(body)["error"]
        assert error["code"] == status and error["message"], (error, what)


def fuzz(schema, server, method: str, path: str, mode: GenerationMode, headers: dict) -> int:
    operation = schema[path][method]
    calls = 0
    with requests.Session() as session:

        @FUZZ_SETTINGS
        @given(case=operation.as_strategy(generation_mode=mode))
        def one(case):
            nonlocal calls
            if method == "DELETE":  # fuzzing must not remove the adapters other tests rely on
                assume(str((case.path_parameters or {}).get("task_id")) not in BUNDLED_TASKS)
            response = case.call(base_url=server.url, session=session, headers=headers, timeout=REQUEST_TIMEOUT_S)
            calls += 1
            answer_headers = {name.lower(): values[0] for name, values in response.headers.items()}  # lists
            check_answer(response.status_code, answer_headers, response.content, case.as_curl_command())

        one()
    return calls


@pytest.mark.parametrize("method, path, mode", INFERENCE, ids=[f"{m} {p} {g}" for m, p, g in INFERENCE])
def test_schemathesis_inference_routes(schema, server, method, path, mode):
    assert fuzz(schema, server, method, path, mode, {}) > 0


@pytest.mark.parametrize("authorized", [True, False], ids=["token", "no-token"])
@pytest.mark.parametrize("method, path", ADMIN, ids=[f"{m} {p}" for m, p in ADMIN])
def test_schemathesis_admin_routes(schema, server, method, path, authorized):
    assert fuzz(schema, server, method, path, POSITIVE, server.admin_headers() if authorized else {}) > 0


def any_text(max_size: int):
    """Any code points, lone surrogates and NUL included (JSON escapes them; the server must cope)."""
    return st.text(st.characters(codec=None, exclude_categories=()), max_size=max_size)


JUNK = st.one_of(st.integers(-3, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.none(),
                 st.text(max_size=3), st.booleans(), st.lists(st.integers(), max_size=2), any_text(300))
VALID_FIELDS = {
    "input": st.text(max_size=200), "max_new_tokens": st.integers(1, MAX_NEW_TOKENS), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1), "top_k": st.none() | st.integers(1, 100),
    "stop": st.lists(st.text(min_size=1, max_size=5), max_size=3), "seed": st.none() | st.integers(0, 2**64 - 1),
    "stream": st.booleans(),
}


@st.composite
def generate_bodies(draw):
    """A valid request for a registered task, then (half the time) one field replaced by junk, so
    that many requests really reach the engine and the others probe one field at a time."""
    body = {"task_id": draw(st.sampled_from(BUNDLED_TASKS)), "input": draw(VALID_FIELDS["input"])}
    for name, values in VALID_FIELDS.items():
        if name != "input" and draw(st.booleans()):
            body[name] = draw(values)
    spoiled = draw(st.none() | st.sampled_from(sorted(VALID_FIELDS)))
    if spoiled is not None:
        body[spoiled] = draw(JUNK)
    return body


@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(body=generate_bodies(), openai=st.booleans())
def test_generation_with_arbitrary_parameters_for_registered_tasks(server, body, openai):
    if openai:  # the same values through the OpenAI route
        body = {"model": body.pop("task_id"), "prompt": body.pop("input", ""),
                **({"max_tokens": body.pop("max_new_tokens")} if "max_new_tokens" in body else {}), **body}
    route = "/v1/completions" if openai else "/generate"
    # json.dumps escapes lone surrogates and writes NaN/Infinity, as a careless client would.
    content = json.dumps(body).encode()
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as client:
        with client.stream("POST", route, content=content, headers={"content-type": "application/json"}) as r:
            data = r.read()
    check_answer(r.status_code, r.headers, data, body)
    if r.status_code == 200 and body.get("stream") is True:
        assert data.rstrip().endswith(b"data: [DONE]") and b'"error"' not in data, data[-300:]
    elif r.status_code == 200:
        usage = json.loads(data)["usage"]
        assert usage["completion_tokens"] <= token_bound(body, openai)


def token_bound(body: dict, openai: bool) -> int:
    """The most tokens an accepted request may generate: its own limit, else the route's default
    (OpenAI's max_tokens 16; /generate's max_new_tokens 64). An accepted value may have come as a
    float or numeric string that the model coerced."""
    key, default = ("max_tokens", 16) if openai else ("max_new_tokens", 64)
    return int(float(body.get(key, default)))


def test_prompt_list_beyond_the_queue_is_served_or_a_json_503(server):
    """Regression: a completion with more prompts than the model handle's queue used to come back as
    Serve's plain-text 503 (its DeploymentResponse.cancel() re-raised the rejection)."""
    body = {"model": BUNDLED_TASKS[0], "prompt": ["Hi"] * (MAX_QUEUE + 4), "max_tokens": 1}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    check_answer(r.status_code, r.headers, r.content, body)
    assert r.status_code in (200, 429, 503), r.text


@pytest.mark.parametrize("route, body", [
    ("/generate", {"task_id": BUNDLED_TASKS[0], "input": "a \ud800 b", "max_new_tokens": 2}),
    ("/v1/completions", {"model": BUNDLED_TASKS[0], "prompt": ["ok", "\udfff"], "max_tokens": 2}),
])
def test_lone_surrogates_are_422(server, route, body):
    """Regression: valid JSON, not encodable text; the tokenizer raised and the answer was a 500."""
    content = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as the escape "\\ud800"
    r = httpx.post(f"{server.url}{route}", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "lone surrogate" in r.json()["error"]["message"]


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_seed_out_of_range_is_422(server, seed):
    """Regression: torch.Generator.manual_seed raised ValueError in the replica: a 500."""
    for route, body in (("/generate", {"task_id": BUNDLED_TASKS[0], "input": "Hi", "max_new_tokens": 1}),
                        ("/v1/completions", {"model": BUNDLED_TASKS[0], "prompt": "Hi", "max_tokens": 1})):
        r = httpx.post(f"{server.url}{route}", json={**body, "temperature": 0.7, "seed": seed})
        assert r.status_code == 422, r.text
        assert "seed must be null or an integer in" in r.json()["error"]["message"]
