"""The task-affinity request router of the model deployment (Ray Serve's RequestRouter API).

Configured through the deployment's `request_router_config` (serving/routing/__init__.py); Serve
builds one per handle, in the caller's process (the ingress). The ingress passes each request's
task id as the handle's `session_id` (serving/generation.py), so routing reads
`pending_request.metadata.session_id` and never touches the request body.

Per request: rank the replicas for the task (rendezvous hashing), read their queue lengths from
Serve's queue-length cache (probing those without a fresh entry; a spill is confirmed by a fresh
probe, see `choose_replica_confirmed`) and this router's in-flight requests per replica and task
(serving/routing/inflight.py: up when a replica is given to a request, down in
`on_request_completed`),
and offer the first replica that takes the request within the task's share and the load bound,
then the rest of the task's ranking, as one-replica ranks: Serve's own selection
still skips a replica whose queue is full (max_ongoing_requests) and backs off when all are.
Calls without a task id (health and info calls) go to the shortest queue.
"""

from __future__ import annotations

import logging

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from .affinity import LoadBound, choose_replica_confirmed, rank_replicas
from .inflight import InFlight
from .stats import count_routed

log = logging.getLogger(__name__)


class TaskAffinityRouter(RequestRouter):
    """Each task to its preferred replica by rendezvous hashing, with bounded load and a per-task
    spill (a task past its share of a replica goes on; the light tasks stay)."""

    _bound = LoadBound()

    def initialize_state(self, load_factor: float = LoadBound.load_factor,
                         min_queue: int = LoadBound.min_queue, **unknown) -> None:
        if unknown:
            raise ValueError(f"TaskAffinityRouter: unknown request_router_kwargs {sorted(unknown)}; "
                             "known: load_factor, min_queue")
        self._bound = LoadBound(load_factor=load_factor, min_queue=min_queue)
        self._in_flight = InFlight()
        log.info("task-affinity routing for %s: load_factor %s, min_queue %d", self._deployment_id,
                 self._bound.load_factor, self._bound.min_queue)

    def _ranking(self, task_id: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
        return rank_replicas(task_id, {r: r.replica_id.unique_id for r in replicas})

    def _cached_queue_lens(self, replicas: list[RunningReplica]) -> dict[RunningReplica, int]:
        if not self._use_replica_queue_len_cache:
            return {}
        cached = {r: self._replica_queue_len_cache.get(r.replica_id) for r in replicas}
        return {r: n for r, n in cached.items() if n is not None}

    async def _probe(self, replicas: list[RunningReplica], backoff_index: int) -> dict[RunningReplica, int]:
        """Fresh queue lengths (Serve caches them); a replica that does not answer in time is left out.
        An empty queue clears the replica's in-flight counts (inflight.py: what a lost count needs)."""
        lengths = {r: n for r, n in await self._probe_queue_lens(replicas, backoff_index) if n is not None}
        for replica in (r for r, n in lengths.items() if n == 0):
            self._in_flight.clear(replica.replica_id.unique_id)
        return lengths

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # when every offered replica is full, back off before the next try instead of spinning
            pending_request.routing_context.should_backoff = True
        task_id = pending_request.metadata.session_id if pending_request is not None else ""
        if not task_id:
            return [list(candidate_replicas)]
        order = self._ranking(task_id, candidate_replicas)
        held = {r: self._in_flight.on(r.replica_id.unique_id) for r in order}
        chosen = await choose_replica_confirmed(order, self._cached_queue_lens(order), self._probe, self._bound,
                                                task_id, held)
        return [[chosen]] + [[r] for r in order if r is not chosen]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        task_id = pending_request.metadata.session_id
        if not task_id or not self._replicas:
            return
        preferred = self._ranking(task_id, list(self._replicas.values()))[0]
        count_routed(replica_id.unique_id, spilled=preferred.replica_id != replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._in_flight.finish(replica_id.unique_id, internal_request_id)

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Give `replica` to the very request it was chosen for.

        Serve's default matches by `internal_request_id`, which every handle call made while serving
        one HTTP request shares (a list of prompts in one /v1/completions request is several calls):
        the replica chosen for one task's call could go to another call, and the call it was chosen
        for would never be matched. Matching the metadata object itself is exact.
        """
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                if request_metadata.session_id:  # counted down in on_request_completed, once it was sent
                    self._in_flight.start(replica.replica_id.unique_id, request_metadata.internal_request_id,
                                          request_metadata.session_id)
                pending.future.set_result(replica)
                if self._pending_requests_by_id.get(request_metadata.internal_request_id) is pending:
                    self._remove_pending_request_from_indices(pending)
                return
