"""The metrics port's answers, without I/O: a DNS-rebound page cannot read it either."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from helexa.core.browser import host_names
from helexa.cortex.metrics_port import response_for


def registry() -> CollectorRegistry:
    found = CollectorRegistry()
    Counter("helexa_probe", "a counter", registry=found).inc()
    return found


def test_only_known_host_names_are_answered() -> None:
    hosts = host_names("127.0.0.1", ["metrics.lan"])
    for host in (b"127.0.0.1:31314", b"localhost:31314", b"metrics.lan", b"10.0.0.5:9"):
        status, _type, body = response_for(
            b"GET /metrics HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", registry(), hosts
        )
        assert status == 200 and b"helexa_probe_total 1.0" in body, host
    status, _type, body = response_for(
        b"GET /metrics HTTP/1.1\r\nhost: evil.example:31314\r\n\r\n", registry(), hosts
    )
    assert status == 421 and b"allowed_hosts" in body
    no_host = response_for(b"GET /metrics HTTP/1.0\r\n\r\n", registry(), hosts)
    assert no_host[0] == 200  # HTTP/1.0 scrapers send none; a browser always does
