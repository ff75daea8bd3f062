"""`lamp serve`: start Ray (or join a cluster), deploy the Serve application, run until a signal.

SIGINT and SIGTERM shut down Serve and then Ray, so no replica, raylet or GCS process outlives the
command. Relative paths (store, prompts, backbone) are resolved here, against the directory the
command was started in, before they travel to replicas whose working directory differs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0


def register(subparsers) -> None:
    from lamp_runtime.backbone.cli_args import add_backbone_arguments
    from lamp_runtime.engines import ENGINE_KINDS

    from .routing import ROUTING_CHOICES

    p = subparsers.add_parser(
        "serve", help="serve adapters over HTTP (Ray Serve)",
        description="Serve every registered adapter over one shared backbone. Settings: defaults < "
                    "--config YAML < flags. Admin API: set LAMP_ADMIN_TOKEN.",
    )
    p.add_argument("--config", help="YAML file with any of the settings below (keys like max_batch_size)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--address", help="join this Ray cluster (e.g. auto, ray://...) instead of starting one")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all cores)")
    p.add_argument("--store", help="adapter store: a directory or an fsspec URL such as s3://bucket/prefix "
                                     "(default: user data dir / lamp-serve / adapters)")
    p.add_argument("--registry", help="adapter registry database: postgresql://USER:PASSWORD@HOST/DB for a "
                                      "cluster, or sqlite:///PATH (default: SQLite inside a local --store; for an "
                                      "object store, in this machine's lamp-serve data folder)")
    p.add_argument("--prompts", help="folder of bundled adapters registered at start (default: prompts; '' = none)")
    add_backbone_arguments(p)
    # None = "not given", so values from --config are not overridden by flag defaults.
    p.set_defaults(backbone=None, dtype=None, quantization=None, device=None)
    p.add_argument("--replicas", type=int, help="model replicas, each holding one backbone (default 1)")
    p.add_argument("--routing", choices=ROUTING_CHOICES,
                   help="which replica takes a request: affinity (each task to its preferred replica, spilling "
                        "when that one is busy) or random (Serve's default); default affinity when replicas > 1")
    p.add_argument("--affinity-load-factor", type=float,
                   help="affinity routing: a task's request leaves its preferred replica when that one's queue "
                        "would pass this multiple of the mean queue (default 1.5)")
    p.add_argument("--affinity-min-queue", type=int,
                   help="affinity routing: a replica with a shorter queue always takes its tasks' requests "
                        "(default 4)")
    p.add_argument("--replica-cpus", type=float, help="Ray CPUs reserved per replica (default: fair share)")
    p.add_argument("--threads", type=int, help="torch threads per replica (default: cores / replicas)")
    p.add_argument("--max-batch-size", type=int, help="requests per engine batch (default 16)")
    p.add_argument("--batch-wait-ms", type=float, help="wait for company before an idle batch starts (default 5)")
    p.add_argument("--prefill-forward-cost-tokens", type=int,
                   help="a prefill forward's fixed cost in padded positions: newcomers whose lengths differ "
                        "more are prefilled apart (default 32; a huge value = one padded batch)")
    p.add_argument("--max-queue", type=int, help="waiting requests per replica before 503 (default 64)")
    p.add_argument("--fair-scheduling", choices=("on", "off"),
                   help="on (default): the next request is the task's with the fewest tokens served, and a task "
                        "beyond its share of a full queue gets 429; off: first come, first served")
    p.add_argument("--fair-preemption", choices=("on", "off"),
                   help="on (default, with fair scheduling): a request of a task below its share of the batch "
                        "rows enters at the next step, pausing a row of the task most over its share (kept, "
                        "resumed later, same answer); off: it waits for a free row")
    p.add_argument("--max-input-tokens", type=int, help="longest input in tokens; longer is 413 (default 2048)")
    p.add_argument("--max-new-tokens", type=int, help="largest max_new_tokens a request may ask (default 1024)")
    p.add_argument("--prompt-cache-mb", type=int, help="device memory for built prompts (default 256)")
    p.add_argument("--adapter-cache-mb", type=int,
                   help="host memory for the factors of the adapters being served; the others stay in the store "
                        "(default 64)")
    p.add_argument("--prompt-kv-cache-mb", type=int,
                   help="memory for tasks' soft-prompt keys/values, computed once per version (default 256; 0 = off)")
    p.add_argument("--engine", choices=ENGINE_KINDS,
                   help="hf (transformers, default), vllm (docs/vllm.md), llamacpp (the GGUF on llama.cpp, "
                        "docs/llamacpp.md) or auto (llamacpp for a GGUF backbone on the CPU when llama-cpp-python "
                        "is installed, else hf)")
    p.add_argument("--vllm-kv-cache-mb", type=int, help="vLLM's KV cache, host memory on CPU (default 1024)")
    p.add_argument("--vllm-max-model-len", type=int, help="longest sequence vLLM holds (default: backbone's)")
    p.add_argument("--vllm-block-size", type=int,
                   help="vLLM KV block tokens: only whole blocks of a prompt are reused (default: the smallest "
                        "the backend takes, 32 on CPU, 16 on CUDA)")
    p.add_argument("--llamacpp-row-cells", type=int,
                   help="KV cells of each batch row of the llama.cpp engine: the most soft prompt + input + "
                        "answer one request may hold; the KV cache is max-batch-size x this, allocated at start "
                        "(default 1024)")
    p.add_argument("--llamacpp-requantize", metavar="TYPE",
                   help="serve the GGUF requantized by llama.cpp to TYPE (e.g. Q4_0, which llama.cpp repacks into "
                        "batched kernels on x86), made once and cached; it rounds every weight again: check your "
                        "tasks' accuracy on it (docs/llamacpp.md)")
    p.add_argument("--allow-random-weights", action="store_true", default=None,
                   help="serve a backbone whose weights are random (made for benchmarks: it generates noise)")
    p.add_argument("--max-request-bytes", type=int, help="largest inference request body (default 1 MiB)")
    p.add_argument("--max-upload-bytes", type=int, help="largest adapter upload (default 64 MiB)")
    # Not --log-level: that one belongs to `lamp` itself (this process's own logging).
    p.add_argument("--serve-log-level", help="log level of Serve and the replicas (default INFO)")
    p.set_defaults(func=run)


SETTING_FLAGS = ("host", "port", "address", "num_cpus", "store", "registry", "prompts", "backbone", "dtype",
                 "quantization", "device", "replicas", "routing", "affinity_load_factor",
                 "affinity_min_queue", "replica_cpus", "threads", "max_batch_size",
                 "batch_wait_ms",
                 "prefill_forward_cost_tokens", "max_queue", "fair_scheduling", "fair_preemption", "max_input_tokens", "max_new_tokens", "prompt_cache_mb",
                 "adapter_cache_mb", "prompt_kv_cache_mb", "max_request_bytes", "max_upload_bytes",
                 "serve_log_level", "engine", "vllm_kv_cache_mb", "vllm_max_model_len",
                 "vllm_block_size", "llamacpp_row_cells", "llamacpp_requantize",
                 "allow_random_weights")


def settings_from_args(args: argparse.Namespace):
    import dataclasses

    from .config import load_settings
    from .store import is_url

    overrides = {name: getattr(args, name) for name in SETTING_FLAGS}
    for name in ("fair_scheduling", "fair_preemption"):
        if overrides[name] is not None:
            overrides[name] = overrides[name] == "on"
    overrides["log_level"] = overrides.pop("serve_log_level")
    settings = load_settings(args.config, overrides)
    absolute = {}
    for name in ("store", "prompts", "backbone"):
        value = getattr(settings, name)
        if value and not (name == "store" and is_url(value)):  # URLs are not paths of this machine
            absolute[name] = str(Path(value).expanduser().resolve())
    if settings.store is None:
        absolute["store"] = str(settings.store_dir)
    settings = dataclasses.replace(settings, **absolute)
    if settings.backbone and not Path(settings.backbone).exists():
        raise FileNotFoundError(f"backbone {settings.backbone} does not exist")
    return settings


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror} (another server running?)") from None


class ServeRunner:
    """Owns the Ray connection and the Serve application for the lifetime of the command."""

    def __init__(self, settings):
        self.settings = settings
        self.started_ray = False
        self.deployed = False

    def start(self, after_ray_init=lambda: None) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a server
        import ray
        from ray import serve

        from .app import APP_NAME, application

        s = self.settings
        if s.address:
            ray.init(address=s.address, logging_level=logging.WARNING)
        else:
            # "local" always starts a private cluster, never attaching to someone else's `ray start`.
            ray.init(address="local", num_cpus=s.num_cpus or os.cpu_count(), include_dashboard=False,
                     logging_level=logging.WARNING)
            self.started_ray = True
        after_ray_init()
        serve.start(http_options={"host": s.host, "port": s.port},
                    logging_config={"log_level": s.log_level})
        serve.run(application(s), name=APP_NAME, route_prefix="/", blocking=False)
        self.deployed = True

    def stop(self) -> None:
        import ray
        from ray import serve

        from .app import APP_NAME

        if not ray.is_initialized():
            return
        try:
            if self.started_ray:
                serve.shutdown()
            elif self.deployed:
                serve.delete(APP_NAME)  # a shared cluster: remove only our application
        except Exception as exc:  # still disconnect / stop Ray below
            log.warning("Serve shutdown failed: %r", exc)
        ray.shutdown()


def wait_until_healthy(host: str, port: int, timeout: float, stop: threading.Event) -> dict | None:
    """The `/healthz` body once it answers 200; None if `stop` was set first."""
    import httpx

    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/healthz"
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if stop.is_set():
            return None
        try:
            response = httpx.get(url, timeout=5.0)
            if response.status_code == 200:
                return response.json()
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise RuntimeError(f"server did not become healthy within {timeout:.0f} s ({last})")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not settings.address:
        check_port_free(settings.host, settings.port)
    stop = threading.Event()
    runner = ServeRunner(settings)

    def on_signal(signum, frame):
        # Interrupting Ray's start-up midway can crash its core worker on exit, so the first signal
        # lets start-up finish and then shuts down; a second one during start-up forces it.
        if not runner.deployed:
            if stop.is_set():
                raise KeyboardInterrupt
            print("lamp serve: stopping once start-up is done (signal again to force)", file=sys.stderr, flush=True)
        stop.set()

    def install_handlers():
        return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    previous = install_handlers()
    started = time.monotonic()
    try:
        runner.start(after_ray_init=install_handlers)  # ray.init replaces the SIGTERM handler with sys.exit
        health = wait_until_healthy(settings.host, settings.port, READY_TIMEOUT_S, stop)
        if health is not None:
            print(f"lamp serve: ready at http://{settings.host}:{settings.port} in {time.monotonic() - started:.1f} s "
                  f"(backbone {health['backbone']}, {settings.replicas} replica(s), {settings.routing_in_force} routing, "
                  f"store {settings.store})",
                  flush=True)
        while not stop.wait(1.0):
            pass
        print("lamp serve: shutting down", flush=True)
    except KeyboardInterrupt:
        print("lamp serve: start-up interrupted, shutting down", file=sys.stderr, flush=True)
    except RuntimeError as exc:  # deployment failed (e.g. the backbone did not load) or never got healthy
        print(f"lamp serve: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        runner.stop()
    return 0
