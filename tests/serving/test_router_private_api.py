"""The affinity router (serving/routing/router.py) reads and overrides private parts of Ray Serve's
RequestRouter (ray pinned ==2.60.0). When Ray changes them, this test fails and names what moved,
instead of routing silently breaking (a request never matched to its replica hangs)."""

from __future__ import annotations

import inspect

from ray.serve.request_router import RequestRouter

from serving.routing.router import TaskAffinityRouter

# What router.py uses of the base class: attributes set in its __init__, and methods.
PRIVATE_ATTRIBUTES = ("_replica_queue_len_cache", "_use_replica_queue_len_cache", "_pending_requests_to_fulfill",
                      "_pending_requests_by_id", "_deployment_id", "_replicas")
PRIVATE_METHODS = {
    "_fulfill_next_pending_request": ["self", "replica", "request_metadata"],
    "_probe_queue_lens": ["self", "replicas", "backoff_index"],
    "_cancel_routing_task_for_pending_request": None,
    "_record_queue_wait_time": None,
    "_remove_pending_request_from_indices": None,
}


def _source() -> str:
    return inspect.getsource(inspect.getmodule(RequestRouter))


def test_private_methods_the_router_overrides_or_calls_still_exist():
    for name, parameters in PRIVATE_METHODS.items():
        method = getattr(RequestRouter, name, None)
        assert callable(method), (f"ray.serve RequestRouter no longer has {name}: serving/routing/router.py "
                                  "must be ported to this Ray version")
        if parameters is not None:
            found = list(inspect.signature(method).parameters)
            assert found == parameters, (f"RequestRouter.{name}{found} changed (router.py expects {parameters}): "
                                         "port serving/routing/router.py")


def test_private_attributes_the_router_reads_are_still_set():
    source = _source()
    for name in PRIVATE_ATTRIBUTES:
        assert f"self.{name}" in source, (f"RequestRouter no longer sets self.{name}: "
                                          "serving/routing/router.py reads it; port it to this Ray version")


def test_serve_still_fulfills_through_the_overridden_method_with_the_request_metadata():
    # router.py matches the pending request by its metadata object: Serve must pass it.
    calls = _source().split("self._fulfill_next_pending_request(")[1:]
    assert any(call.split(")")[0].split(",")[-1].strip() == "request_metadata" for call in calls), (
        "Serve no longer calls _fulfill_next_pending_request(replica, request_metadata): "
        "TaskAffinityRouter's override would never match a request; port serving/routing/router.py")
    assert TaskAffinityRouter._fulfill_next_pending_request is not RequestRouter._fulfill_next_pending_request


def test_serve_still_reports_each_sent_request_completed_by_replica_and_request_id():
    # router.py counts a task's request in flight from _fulfill_next_pending_request (above) until
    # on_request_completed(replica_id, internal_request_id), which Serve must fire for every request
    # it sent, or the counts only grow.
    from ray.serve._private import router as serve_router

    found = list(inspect.signature(RequestRouter.on_request_completed).parameters)
    assert found == ["self", "replica_id", "internal_request_id"], (
        f"RequestRouter.on_request_completed{found} changed: port serving/routing/router.py and inflight.py")
    assert "_active_request_router.on_request_completed(" in inspect.getsource(serve_router), (
        "Serve no longer calls on_request_completed: the affinity router's in-flight counts would never go "
        "down; port serving/routing/router.py and inflight.py")
