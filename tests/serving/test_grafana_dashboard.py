"""docs/grafana-lamp.json only queries metrics the server really exposes, under their exposed names."""

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from lamp_runtime.hf.decoder import DecoderEngine
from serving.metrics.ingress import IngressMetrics
from serving.metrics.replica import ModelMetrics
from serving.routing.stats import RoutingCounts

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-lamp.json"


def exposed_names(backbone) -> set[str]:
    """Sample names of a replica's and the ingress's registries, as /metrics renders them."""
    model = ModelMetrics(DecoderEngine(backbone), registered=lambda: 0)
    routed = RoutingCounts()
    routed.count("r1", spilled=True)  # a labelled metric shows up once it has a series
    ingress = IngressMetrics(routing_counts=routed)
    ingress.count_request("t", True, 200)  # a labelled metric shows up once it has a series
    model.request_seconds.labels("t").observe(0.1)
    model.ttft_seconds.labels("t").observe(0.1)
    text = (generate_latest(model.registry) + generate_latest(ingress.registry)).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_dashboard_query_uses_an_exposed_lamp_metric(backbone):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\blamp_[a-z_]+", expr)}
    assert len(exprs) >= 20 and used
    assert used <= exposed_names(backbone), sorted(used - exposed_names(backbone))
    for required in ("lamp_queue_seconds_bucket", "lamp_time_to_first_token_seconds_bucket",
                     "lamp_request_seconds_bucket", "lamp_batch_size_bucket", "lamp_batch_tasks_bucket",
                     "lamp_requests_total", "lamp_generated_tokens_total", "lamp_soft_prompt_tokens_total",
                     "lamp_soft_prompt_tokens_saved_total", "lamp_prompt_cache_hits_total",
                     "lamp_prompt_cache_misses_total", "lamp_prompt_cache_evictions_total", "lamp_prompt_cache_bytes",
                     "lamp_backbone_bytes", "lamp_registered_adapters", "lamp_process_resident_memory_bytes",
                     "lamp_prefill_seconds_sum", "lamp_prefill_seconds_saved_total", "lamp_kv_cache_bytes",
                     "lamp_kv_cache_bytes_saved_total", "lamp_routed_requests_total",
                     "lamp_prompt_kv_cache_hits_total"):
        assert required in used, required


def test_dashboard_layout_is_importable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "lamp-serve" and dashboard["templating"]["list"][0]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
