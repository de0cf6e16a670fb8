"""
Every Prometheus collector NowConnect exports, defined once, on an injected registry.

Label values come only from closed sets (connector names from config, directions, event and
reason names); never per-peer or per-stream values.  Children are cached because ``.labels()``
on every byte count is measurable on the hot path.
"""
# -*- test-case-name: tests.test_metrics -*-

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# The `_created` series double the exposition and no runbook or alert uses them.
disable_created_metrics()

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

CLOSE_EVENTS = ("FIN_SENT", "FIN_RECV", "RST_SENT", "RST_RECV")
OPEN_FAILURE_REASONS = (
    "no_agent",
    "cidr_blocked",
    "target_refused",
    "target_timeout",
    "tunnel_lost",
    "limit",
    "open_timeout",
    "unknown_connector",
)


class Metrics:
    """The collectors of one process (hub or agent) on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.connections = Counter(
            "nowconnect_tcp_connections",
            "Client TCP connections accepted and carried through a tunnel.",
            ["connector"],
            registry=r,
        )
        self.bytes = Counter(
            "nowconnect_tcp_bytes",
            "Payload bytes relayed; c2a = client to agent, a2c = agent to client.",
            ["direction", "connector"],
            registry=r,
        )
        self.active = Gauge(
            "nowconnect_tcp_active_connections",
            "Streams open now.",
            ["connector"],
            registry=r,
        )
        self.close_events = Counter(
            "nowconnect_tcp_close_events",
            "Half-close and reset frames sent and received.",
            ["connector", "event"],
            registry=r,
        )
        self.open_failures = Counter(
            "nowconnect_tcp_open_failures",
            "Client connections that never reached their target, by reason.",
            ["connector", "reason"],
            registry=r,
        )
        self.agents_connected = Gauge(
            "nowconnect_agents_connected",
            "Live agent tunnels serving the connector.",
            ["connector"],
            registry=r,
        )
        self.tunnel_connects = Counter(
            "nowconnect_tunnel_connects",
            "Agent tunnels established.",
            ["agent_id"],
            registry=r,
        )
        self.tunnel_disconnects = Counter(
            "nowconnect_tunnel_disconnects",
            "Agent tunnels lost, by reason.",
            ["agent_id", "reason"],
            registry=r,
        )
        self.open_seconds = Histogram(
            "nowconnect_tcp_open_seconds",
            "Time from client accept to target connected.",
            ["connector"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.agent_rejections = Counter(
            "nowconnect_agent_rejections",
            "Tunnel upgrades or HELLOs refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.limit_hits = Counter(
            "nowconnect_limit_hits",
            "Times a configured limit refused or reset something.",
            ["limit"],
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def declare_connector(self, connector: str) -> None:
        """Create the connector's series at zero so dashboards and alerts see them at once."""
        self.connections.labels(connector)
        for direction in ("c2a", "a2c"):
            self.bytes.labels(direction, connector)
        self.active.labels(connector)
        self.agents_connected.labels(connector)

    def child(self, metric: Any, *labels: str) -> Any:
        """A cached label child; label values must come from closed sets."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)
