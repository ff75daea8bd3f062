"""How the ingress picks a model replica for each request: `routing` setting, `--routing`.

affinity: serving/routing/router.py, each task to its preferred replica (bounded load), so each
    replica's prompt caches hold about 1/N of the tasks. The default with more than one replica.
random: Serve's default router (power of two choices), every task on every replica.
"""

from __future__ import annotations

ROUTING_CHOICES = ("affinity", "random")
AFFINITY_ROUTER = "serving.routing.router:TaskAffinityRouter"


def effective_routing(routing: str | None, replicas: int) -> str:
    """The routing in force: as configured, else affinity with more than one replica."""
    if routing is not None:
        return routing
    return "affinity" if replicas > 1 else "random"


def request_router_config(routing: str, load_factor: float | None = None, min_queue: int | None = None
                          ) -> dict | None:
    """The model deployment's `request_router_config` option (None: Serve's default router);
    `load_factor` / `min_queue` set the affinity router's load bound (affinity.LoadBound)."""
    if routing == "affinity":
        bound = {name: value for name, value in (("load_factor", load_factor), ("min_queue", min_queue))
                 if value is not None}
        return {"request_router_class": AFFINITY_ROUTER, **({"request_router_kwargs": bound} if bound else {})}
    if routing == "random":
        return None
    raise ValueError(f"routing must be one of {', '.join(ROUTING_CHOICES)}; got {routing!r}")
