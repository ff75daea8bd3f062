"""Locust load test for lamp-serve: mixed-task `/generate` traffic, OpenAI completions, and an
admin user that replaces adapters while the traffic runs.

    make loadtest                                   # starts a server, runs headless, reports
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000      # web UI, running server

Options (Locust flag, or environment variable):
  --lamp-tasks           LAMP_TASKS            task mix, e.g. "sentiment:3,topic:1"
                                               (default: every task the server lists, weight 1)
  --lamp-input-words     LAMP_INPUT_WORDS      "MIN-MAX" words per input (default: the task's inputs)
  --lamp-max-new-tokens  LAMP_MAX_NEW_TOKENS   tokens per request (default 16)
  --lamp-max-requests    LAMP_MAX_REQUESTS     stop after this many inference requests (0: no limit)
  --lamp-own-tasks       LAMP_OWN_TASKS        tasks the test uploads (needs the admin token; default 2)
  --lamp-admin-interval  LAMP_ADMIN_INTERVAL   seconds between adapter replacements (default 5)
  --lamp-hidden-size     LAMP_HIDDEN_SIZE      hidden size of uploaded adapters (default 576)
  LAMP_ADMIN_TOKEN (environment only, so it never shows in a process list) enables the admin user.

With the admin token the test uploads its own tasks (`loadtest-<task>`), sends them traffic too,
replaces them round-robin during the run (each replacement is a new version; requests already
running finish on the version they started with), and deletes them at the end. It never replaces
or deletes any other task.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from dataclasses import dataclass, field

import gevent
import requests
from lamp_traffic import (
    OWN_PREFIX,
    TaskMix,
    lamp_adapter_bytes,
    load_inputs,
    parse_task_mix,
    parse_word_range,
    shaped_input,
)
from locust import HttpUser, between, events, task
from locust.runners import WorkerRunner

from lamp_runtime.tasks.format import format_input

log = logging.getLogger("lamp-loadtest")
ADMIN_TOKEN = os.environ.get("LAMP_ADMIN_TOKEN") or None
BUNDLED_TASK_NAMES = ("sentiment", "topic", "extract", "support_triage")
REQUEST_TIMEOUT_S = 120
INFERENCE_PREFIXES = ("/generate", "/v1/completions")


@dataclass
class Plan:
    """What every user draws from; set up once in test_start."""

    mix: TaskMix | None = None
    inputs: dict[str, list[str]] = field(default_factory=dict)
    words: tuple[int, int] | None = None
    max_new_tokens: int = 16
    own_tasks: list[str] = field(default_factory=list)
    inference_requests: int = 0
    max_requests: int = 0
    stopping: bool = False
    environment: object = None  # request events do not carry it; remembered at init


PLAN = Plan()


@events.init_command_line_parser.add_listener
def _add_options(parser):
    parser.add_argument("--lamp-tasks", env_var="LAMP_TASKS", default="", help="task mix, e.g. sentiment:3,topic:1")
    parser.add_argument("--lamp-input-words", env_var="LAMP_INPUT_WORDS", default="", help="MIN-MAX words per input")
    parser.add_argument("--lamp-max-new-tokens", env_var="LAMP_MAX_NEW_TOKENS", type=int, default=16)
    parser.add_argument("--lamp-max-requests", env_var="LAMP_MAX_REQUESTS", type=int, default=0,
                        help="stop after this many inference requests (0: no limit)")
    parser.add_argument("--lamp-own-tasks", env_var="LAMP_OWN_TASKS", type=int, default=2,
                        help="tasks uploaded by the test when LAMP_ADMIN_TOKEN is set")
    parser.add_argument("--lamp-admin-interval", env_var="LAMP_ADMIN_INTERVAL", type=float, default=5.0)
    parser.add_argument("--lamp-hidden-size", env_var="LAMP_HIDDEN_SIZE", type=int, default=576)


@events.init.add_listener
def _remember_environment(environment, **_kwargs):
    PLAN.environment = environment


def _admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _upload(session, host: str, task_id: str, hidden_size: int, seed: int) -> requests.Response:
    data = lamp_adapter_bytes(hidden_size, length=100, rank=16, pool=4, seed=seed)
    return session.put(f"{host}/admin/adapters/{task_id}", headers=_admin_headers(), timeout=REQUEST_TIMEOUT_S,
                       files={"adapter": (f"{task_id}.safetensors", data, "application/octet-stream")})


def _abort(environment, message: str) -> None:
    log.error("load test not started: %s", message)
    environment.process_exit_code = 2
    gevent.spawn(environment.runner.quit)


@events.test_start.add_listener
def _plan_traffic(environment, **_kwargs):
    if isinstance(environment.runner, WorkerRunner):
        return  # the master plans; workers in distributed mode read the same options
    options = environment.parsed_options
    host = environment.host.rstrip("/")
    try:
        PLAN.words = parse_word_range(options.lamp_input_words)
        if options.lamp_max_new_tokens < 1 or options.lamp_own_tasks < 0 or options.lamp_admin_interval <= 0:
            raise ValueError("--lamp-max-new-tokens must be >= 1, --lamp-own-tasks >= 0, --lamp-admin-interval > 0")
        PLAN.max_new_tokens = options.lamp_max_new_tokens
        PLAN.max_requests = max(0, options.lamp_max_requests)
        with requests.Session() as session:
            if options.lamp_tasks:
                mix = parse_task_mix(options.lamp_tasks)
                tasks, weights = list(mix.tasks), list(mix.weights)
            else:
                listed = session.get(f"{host}/v1/models", timeout=REQUEST_TIMEOUT_S)
                listed.raise_for_status()
                tasks = [m["id"] for m in listed.json()["data"] if not m["id"].startswith(OWN_PREFIX)]
                weights = [1.0] * len(tasks)
            if ADMIN_TOKEN:
                for index in range(options.lamp_own_tasks):
                    task_id = f"{OWN_PREFIX}{BUNDLED_TASK_NAMES[index % len(BUNDLED_TASK_NAMES)]}"
                    if index >= len(BUNDLED_TASK_NAMES):
                        task_id += f"-{index}"
                    reply = _upload(session, host, task_id, options.lamp_hidden_size, seed=index)
                    if reply.status_code != 201:
                        raise ValueError(f"uploading {task_id} failed: HTTP {reply.status_code} {reply.text[:300]}")
                    PLAN.own_tasks.append(task_id)
                    tasks.append(task_id)
                    weights.append(1.0)
        if not tasks:
            raise ValueError(f"no tasks to send: {host} lists none and LAMP_ADMIN_TOKEN is unset. Register "
                             "adapters, pass --lamp-tasks, or set LAMP_ADMIN_TOKEN so the test uploads its own")
    except (ValueError, KeyError, requests.RequestException) as exc:
        _abort(environment, str(exc))
        return
    PLAN.mix = TaskMix(tuple(tasks), tuple(weights))
    PLAN.inputs = {t: load_inputs(t) for t in tasks}
    log.info("traffic over %d tasks: %s", len(tasks), ", ".join(f"{t}:{w:g}" for t, w in zip(tasks, weights)))


@events.test_stop.add_listener
def _remove_own_tasks(environment, **_kwargs):
    if isinstance(environment.runner, WorkerRunner) or not PLAN.own_tasks:
        return
    host = environment.host.rstrip("/")
    with requests.Session() as session:
        for task_id in PLAN.own_tasks:
            try:
                session.delete(f"{host}/admin/adapters/{task_id}", headers=_admin_headers(), timeout=30)
            except requests.RequestException as exc:
                log.warning("could not delete %s after the test: %s", task_id, exc)
    PLAN.own_tasks = []


@events.request.add_listener
def _count_inference(name, **_kwargs):
    """Stop the whole test after --lamp-max-requests inference requests (a bound on total work)."""
    if not name.startswith(INFERENCE_PREFIXES):
        return
    PLAN.inference_requests += 1
    if PLAN.max_requests and PLAN.inference_requests >= PLAN.max_requests and not PLAN.stopping:
        PLAN.stopping = True
        log.info("reached %d inference requests: stopping", PLAN.max_requests)
        gevent.spawn(PLAN.environment.runner.quit)


class LampUser(HttpUser):
    abstract = True
    wait_time = between(0.5, 2.0)

    def on_start(self):
        self.rng = random.Random()

    def draw(self) -> tuple[str, str] | None:
        if PLAN.mix is None:  # planning failed or has not finished; the test is being stopped
            return None
        task_id = PLAN.mix.pick(self.rng)
        # The input shape the bundled adapters were trained on (lamp_runtime/tasks/format.py).
        return task_id, format_input(shaped_input(PLAN.inputs[task_id], PLAN.words, self.rng))


class GenerateUser(LampUser):
    """Our own API, one request per task drawn from the mix."""

    weight = 3

    @task
    def generate(self):
        drawn = self.draw()
        if drawn is None:
            return
        task_id, text = drawn
        body = {"task_id": task_id, "input": text, "max_new_tokens": PLAN.max_new_tokens}
        with self.client.post("/generate", json=body, name=f"/generate {task_id}", catch_response=True,
                              timeout=REQUEST_TIMEOUT_S) as response:
            problem = _generate_problem(response, PLAN.max_new_tokens)
            if problem:
                response.failure(problem)


class CompletionsUser(LampUser):
    """The OpenAI completions API, as the `openai` client calls it."""

    weight = 1

    @task
    def complete(self):
        drawn = self.draw()
        if drawn is None:
            return
        task_id, text = drawn
        body = {"model": task_id, "prompt": text, "max_tokens": PLAN.max_new_tokens, "temperature": 0}
        with self.client.post("/v1/completions", json=body, name=f"/v1/completions {task_id}", catch_response=True,
                              timeout=REQUEST_TIMEOUT_S) as response:
            problem = _completion_problem(response, PLAN.max_new_tokens)
            if problem:
                response.failure(problem)


class AdminUser(HttpUser):
    """Replaces the test's own adapters round-robin while the other users send them traffic."""

    abstract = ADMIN_TOKEN is None
    fixed_count = 1

    def wait_time(self):
        return self.environment.parsed_options.lamp_admin_interval

    def on_start(self):
        self.turn = itertools.count()

    @task
    def replace_adapter(self):
        if not PLAN.own_tasks:
            return
        index = next(self.turn)
        task_id = PLAN.own_tasks[index % len(PLAN.own_tasks)]
        data = lamp_adapter_bytes(self.environment.parsed_options.lamp_hidden_size, length=100, rank=16, pool=4,
                                  seed=1000 + index)
        with self.client.put(f"/admin/adapters/{task_id}", headers=_admin_headers(), name="/admin/adapters/[own]",
                             files={"adapter": (f"{task_id}.safetensors", data, "application/octet-stream")},
                             catch_response=True, timeout=REQUEST_TIMEOUT_S) as response:
            if response.status_code != 201:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif response.json().get("task_id") != task_id:
                response.failure(f"replaced {response.json().get('task_id')!r}, not {task_id!r}")


def _json(response):
    try:
        return response.json()
    except ValueError:
        return None


def _generate_problem(response, max_new_tokens: int) -> str | None:
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    body = _json(response)
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        return f"no text in the response: {response.text[:200]}"
    tokens = body.get("usage", {}).get("completion_tokens")
    if not isinstance(tokens, int) or not 0 <= tokens <= max_new_tokens:
        return f"completion_tokens {tokens!r} outside 0..{max_new_tokens}"
    if body.get("finish_reason") not in ("stop", "length"):
        return f"unexpected finish_reason {body.get('finish_reason')!r}"
    return None


def _completion_problem(response, max_new_tokens: int) -> str | None:
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    body = _json(response)
    choices = body.get("choices") if isinstance(body, dict) else None
    if not choices or not isinstance(choices[0].get("text"), str):
        return f"no choices[0].text in the response: {response.text[:200]}"
    tokens = (body.get("usage") or {}).get("completion_tokens")
    if not isinstance(tokens, int) or not 0 <= tokens <= max_new_tokens:
        return f"completion_tokens {tokens!r} outside 0..{max_new_tokens}"
    return None
