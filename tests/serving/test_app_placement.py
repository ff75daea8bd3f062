"""Where the Serve application's deployments run (serving/app.py): the ingress and the metrics hub
ask for no CPU, so without a placement Ray could put them on a worker whose loss fails every
request the ingress holds; they are pinned to the head node. The model replicas may go anywhere."""

from __future__ import annotations

from serving.app import application
from serving.config import ServeSettings

HEAD = "node:__internal_head__"


def deployments(settings: ServeSettings) -> dict:
    ingress = application(settings)._bound_deployment
    model, hub = (arg._bound_deployment for arg in ingress.init_args[:2])
    return {d.name: d for d in (ingress, model, hub)}


def test_ingress_and_hub_are_pinned_to_the_head_node():
    found = deployments(ServeSettings(replicas=2))
    for name in ("LampIngress", "MetricsHub"):
        options = found[name].ray_actor_options
        assert options["resources"].get(HEAD, 0) > 0, f"{name} is not pinned to the head node: {options}"
        assert options["num_cpus"] == 0
    assert HEAD not in found["LampModel"].ray_actor_options.get("resources", {})


def test_model_replica_takes_a_full_batch_plus_the_fair_queue_with_its_reserve():
    found = deployments(ServeSettings(max_batch_size=4, max_queue=16))
    off = deployments(ServeSettings(max_batch_size=4, max_queue=16, fair_scheduling=False))
    # 16 waiting + 4 reserved for tasks within their share, 4 running, 8 control calls
    assert found["LampModel"].max_ongoing_requests == 4 + 16 + 4 + 8
    assert off["LampModel"].max_ongoing_requests == 4 + 16 + 8
