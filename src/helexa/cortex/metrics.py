"""Prometheus metrics (§2.9), served on their own port (``cortex.metrics_port``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from helexa.cortex.fleet import Fleet

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60)
TPS_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000, 2000)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)
MB = 1024 * 1024


PREFIX_CACHE_FIELDS = {
    "hits": "Prompts that started with cached tokens",
    "misses": "Prompts that found nothing cached",
    "prompt_tokens_reused": "Prompt tokens not computed thanks to the prefix cache",
    "prompt_tokens_evaluated": "Prompt tokens computed",
    "cached_tokens": "Tokens held in the KV cache",
    "capacity_tokens": "KV cache capacity in tokens",
}


@dataclass(frozen=True)
class Series:
    requests: Any
    duration: Any
    ttft: Any
    tps: Any
    prompt_tokens: Any
    completion_tokens: Any


class Metrics:
    def __init__(self, *, key_names: bool = False) -> None:
        self.registry = CollectorRegistry()
        self._series: dict[tuple[str, str], Series] = {}
        r = self.registry
        labels = ("model", "node")
        self.requests = Counter("cortex_requests", "Requests routed", labels, registry=r)
        self.errors = Counter(
            "cortex_request_errors", "Failed requests", (*labels, "reason"), registry=r
        )
        self.duration = Histogram(
            "cortex_request_duration_seconds",
            "Whole request, stream included",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "cortex_time_to_first_token_seconds",
            "Time to first token",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tps = Histogram(
            "cortex_tokens_per_second",
            "Completion tokens per second",
            labels,
            buckets=TPS_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("cortex_prompt_tokens", "Prompt tokens", labels, registry=r)
        self.completion_tokens = Counter(
            "cortex_completion_tokens", "Completion tokens", labels, registry=r
        )
        self.cold_starts = Counter(
            "cortex_cold_starts", "Cold loads triggered by requests", labels, registry=r
        )
        self.load_seconds = Histogram(
            "cortex_model_load_seconds", "Model load time", labels, buckets=LOAD_BUCKETS, registry=r
        )
        self.evictions = Counter("cortex_evictions", "Models evicted", labels, registry=r)
        self.neuron_up = Gauge(
            "cortex_neuron_up", "Neuron healthy (1) or not (0)", ("node",), registry=r
        )
        self.model_loaded = Gauge("cortex_model_loaded", "Model loaded on node", labels, registry=r)
        self.vram_used = Gauge(
            "cortex_neuron_vram_used_bytes", "VRAM in use on the node", ("node",), registry=r
        )
        # The neurons' prefix caches and batching, as their /health last reported them (the
        # neuron's counters start again at a reload, so these are gauges).
        self.prefix_cache = {
            field: Gauge(f"cortex_prefix_cache_{field}", help_text, labels, registry=r)
            for field, help_text in PREFIX_CACHE_FIELDS.items()
        }
        # Per API key name (operator-chosen, so a bounded set; never the key itself), only
        # when asked for: the metrics port has no auth, and the names say who uses the fleet.
        self.requests_by_key = (
            Counter("cortex_requests_by_key", "Requests by API key name", ("key",), registry=r)
            if key_names
            else None
        )
        self._by_key: dict[str, Any] = {}
        self.batch_peak = Gauge(
            "cortex_batch_peak_sequences",
            "Most sequences one decode step of the model carried",
            labels,
            registry=r,
        )

    def series(self, model: str, node: str) -> Series:
        """The labelled children for one model on one node, looked up once."""
        key = (model, node)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(
                requests=self.requests.labels(model, node),
                duration=self.duration.labels(model, node),
                ttft=self.ttft.labels(model, node),
                tps=self.tps.labels(model, node),
                prompt_tokens=self.prompt_tokens.labels(model, node),
                completion_tokens=self.completion_tokens.labels(model, node),
            )
        return found

    def by_key(self, key: str) -> None:
        if self.requests_by_key is None:
            return
        counter = self._by_key.get(key)
        if counter is None:
            counter = self._by_key[key] = self.requests_by_key.labels(key)
        counter.inc()

    def error(self, model: str, node: str, reason: str) -> None:
        self.errors.labels(model, node, reason).inc()

    def refresh(self, fleet: Fleet) -> None:
        """Gauges from the poller's latest picture (called after every poll round)."""
        self.model_loaded.clear()
        for state in fleet.neurons.values():
            self.neuron_up.labels(state.name).set(1 if state.healthy else 0)
            used = sum(d.vram_used_mb for d in state.health.devices) if state.health else 0
            self.vram_used.labels(state.name).set(used * MB)
            for model_id, status in state.models.items():
                self.model_loaded.labels(model_id, state.name).set(
                    1 if status.status == "loaded" else 0
                )
            for model_id, info in (state.health.models if state.health else {}).items():
                if info.prefix_cache is not None:
                    cache = info.prefix_cache.model_dump()
                    for field, gauge in self.prefix_cache.items():
                        gauge.labels(model_id, state.name).set(cache[field])
                if info.batch is not None:
                    self.batch_peak.labels(model_id, state.name).set(info.batch.peak_sequences)
