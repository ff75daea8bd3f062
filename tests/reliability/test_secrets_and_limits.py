"""Admin auth, the secrecy of the admin token, and overload limits on the shared 2-replica server.

Runs after the other server tests of this package (file order), so the log search covers every
admin call they made too: uploads, re-registrations, deletions, rejected uploads, a replica kill.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from pathlib import Path

import httpx
import pytest

from serving.http.auth import AdminAuth
from serving.http.errors import ServingError

from ..store_state import registry_state
from .conftest import ADMIN_TOKEN, MAX_BATCH_SIZE, MAX_QUEUE, REPLICAS, measured
from .hostile_files import lamp_file
from .traffic import REQUEST_TIMEOUT_S

ADMIN_CALLS = [("PUT", "/admin/adapters/auth-probe"), ("GET", "/admin/adapters/plain"),
               ("DELETE", "/admin/adapters/plain"), ("GET", "/admin/adapters")]
UNAUTHENTICATED = [{}, {"Authorization": "Basic dXNlcjpwdw=="}, {"Authorization": "Bearer"},
                   {"Authorization": ADMIN_TOKEN}, {"X-Admin-Token": ADMIN_TOKEN}]
WRONG = ["wrong", ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1], ADMIN_TOKEN.upper(), "x" + ADMIN_TOKEN]


def test_token_comparison_is_constant_time(monkeypatch):
    """Every decision goes through hmac.compare_digest, whatever the length or prefix of the guess."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    auth = AdminAuth("s3cret-token")
    for guess in ("x", "s3cret-toke", "s3cret-tokeN", "s3cret-token-longer"):
        with pytest.raises(ServingError) as refused:
            auth.check(f"Bearer {guess}")
        assert refused.value.status == 403 and "s3cret" not in refused.value.message
        assert calls[-1] == (guess.encode(), b"s3cret-token")
    auth.check("Bearer s3cret-token")
    auth.check("bearer s3cret-token")  # the scheme is case-insensitive (RFC 7235)
    assert len(calls) == 6


def call(client: httpx.Client, method: str, path: str, headers: dict, **kwargs) -> httpx.Response:
    files = {"adapter": ("a.safetensors", lamp_file())} if method == "PUT" else None
    return client.request(method, path, headers=headers, files=files, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("method, path", ADMIN_CALLS, ids=[f"{m} {p}" for m, p in ADMIN_CALLS])
def test_admin_without_a_bearer_token_is_401_and_with_a_wrong_one_403(server, method, path):
    index = registry_state(server.store)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for headers in UNAUTHENTICATED:
            r = call(client, method, path, headers, params={"token": ADMIN_TOKEN})  # a query token is ignored
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert ADMIN_TOKEN not in r.text
        for guess in WRONG:
            r = call(client, method, path, {"Authorization": f"Bearer {guess}"})
            assert (r.status_code, r.json()["error"]["message"]) == (403, "invalid admin token"), guess
    assert registry_state(server.store) == index  # nothing a refused call could change
    assert "auth-probe" not in {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}


@pytest.mark.slow
def test_admin_token_never_appears_in_logs_metrics_or_answers(server, admin, ray_tmpdir):
    answers = [admin.put("/admin/adapters/secret-probe", files={"adapter": ("a", lamp_file())}),
               admin.get("/admin/adapters/secret-probe"), admin.get("/admin/adapters"),
               admin.put("/admin/adapters/secret-probe", files={"adapter": ("a", b"not an adapter")}),
               admin.delete("/admin/adapters/secret-probe"), admin.get("/metrics"), admin.get("/openapi.json")]
    assert [a.status_code for a in answers] == [201, 200, 200, 422, 200, 200, 200]
    time.sleep(2.0)  # Ray's log monitor forwards worker output in batches
    needle = ADMIN_TOKEN.encode()
    files = [server.log_path, *(p for p in Path(ray_tmpdir).rglob("*") if p.is_file() and not p.is_symlink())]
    scanned, mentions_admin, leaks = 0, 0, []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:  # sockets, files removed meanwhile
            continue
        scanned += 1
        mentions_admin += b"/admin/adapters" in data
        if needle in data:
            leaks.append(str(path))
    assert mentions_admin > 0, "the searched logs do not show the admin calls: wrong log location?"
    assert not leaks, f"admin token found in {leaks}"
    assert all(ADMIN_TOKEN not in a.text for a in answers)
    measured("token-search", files=scanned, with_admin_calls=mentions_admin, leaks=0)


async def flood(url: str, n: int) -> list[tuple[int, str | None, str]]:
    async def one(i: int):
        if i % 2:
            body = {"model": "plain", "prompt": f"Story {i}:", "max_tokens": 4, "stream": i % 4 == 1}
            route = "/v1/completions"
        else:
            body = {"task_id": "lamp2", "input": f"Story {i}:", "max_new_tokens": 4, "stream": i % 4 == 0}
            route = "/generate"
        async with client.stream("POST", route, json=body) as r:
            data = await r.aread()
        return r.status_code, r.headers.get("retry-after"), data.decode()

    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.slow
def test_overload_is_refused_with_503_and_retry_after_and_the_server_recovers(server, client):
    capacity = REPLICAS * (MAX_BATCH_SIZE + MAX_QUEUE)
    answers = asyncio.run(flood(server.url, 4 * capacity))
    statuses = sorted({status for status, _, _ in answers})
    # 429: a task beyond its share of a full queue (fair scheduling); 503: the queue and its reserve full
    assert 200 in statuses and set(statuses) <= {200, 429, 503} and len(statuses) > 1, statuses
    for status, retry_after, body in answers:
        if status in (429, 503):
            kind = "rate_limited" if status == 429 else "overloaded"
            assert retry_after == "1" and f'"type":"{kind}"' in body, body
        else:
            assert '"error"' not in body, body  # accepted streams finish normally
    reply = client.post("/generate", json={"task_id": "plain", "input": "Hello", "max_new_tokens": 2})
    assert reply.status_code == 200, reply.text
    measured("overload", requests=len(answers), capacity=capacity,
             refused_503=sum(s == 503 for s, _, _ in answers), refused_429=sum(s == 429 for s, _, _ in answers))
