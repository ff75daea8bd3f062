"""What every serving process reports about itself."""

from __future__ import annotations

import prometheus_client
import psutil
from prometheus_client.metrics_core import GaugeMetricFamily

# `_created` series double the exposition and no dashboard of ours uses them.
prometheus_client.disable_created_metrics()


class ProcessCollector:
    """Resident memory of this process (every replica reports its own)."""

    def __init__(self):
        self._process = psutil.Process()

    def collect(self):
        rss = GaugeMetricFamily("lamp_process_resident_memory_bytes", "Resident memory of this serving process")
        rss.add_metric([], self._process.memory_info().rss)
        yield rss
