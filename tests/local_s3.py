"""A moto S3 server on 127.0.0.1 for the object-store and cluster tests (no network needed)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from .requires import require_module

moto_server = require_module("moto.server", "the S3 tests run a moto server (a dev extra: make setup)")

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def local_s3() -> Iterator[str]:
    """Start the server and point the AWS_* variables at it (boto, s3fs and child processes such as
    Ray nodes started inside the block all inherit them); yield its endpoint URL; restore on exit."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    _forget_s3_clients()
    try:
        yield endpoint
    finally:
        server.stop()
        _forget_s3_clients()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _forget_s3_clients() -> None:
    """fsspec keeps one S3FileSystem per set of options, and the endpoint read from the environment
    is not one of them: a client made for an earlier server (another test module's) would call a
    port that is closed now."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()
