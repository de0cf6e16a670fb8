"""
Stream events -> metrics and the C{connection_open} / C{connection_closed} log lines.
"""
# -*- test-case-name: tests.test_observer -*-

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from nowconnect import logs
from nowconnect.metrics import Metrics
from nowconnect.stream import Stream


class StreamObserver:
    """Turns stream events into metrics and connection log lines (hub and agent alike)."""

    def __init__(self, metrics: Metrics, clock: Any, log: Logger, *, hub: bool) -> None:
        self._m = metrics
        self._clock = clock
        self._log = log
        # A stream "sends" what its local socket reads: the client's bytes (c2a) on the hub,
        # the target's (a2c) on the agent.  Logs name directions as metrics do.
        self._hub = hub

    def stream_opened(self, stream: Stream) -> None:
        m = self._m
        m.child(m.connections, stream.connector).inc()
        m.child(m.active, stream.connector).inc()
        logs.emit(
            self._log, "info", logs.CONNECTION_OPEN,
            "connector={connector} client={client} stream={stream}",
            connector=stream.connector, client=stream.client, stream=stream.stream_id,
        )

    def stream_connected(self, stream: Stream) -> None:
        m = self._m
        elapsed = (stream.connected_at or stream.opened_at) - stream.opened_at
        m.child(m.open_seconds, stream.connector).observe(max(0.0, elapsed))

    def bytes_moved(self, stream: Stream, direction: str, n: int) -> None:
        m = self._m
        m.child(m.bytes, direction, stream.connector).inc(n)

    def close_event(self, stream: Stream, event: str) -> None:
        m = self._m
        m.child(m.close_events, stream.connector, event).inc()

    def stream_ended(self, stream: Stream, outcome: str) -> None:
        m = self._m
        m.child(m.active, stream.connector).dec()
        if outcome in _OPEN_FAILURES and stream.connected_at is None:
            m.child(m.open_failures, stream.connector, outcome).inc()
        logs.emit(
            self._log, "info", logs.CONNECTION_CLOSED,
            "connector={connector} client={client} stream={stream} c2a={c2a} a2c={a2c} "
            "outcome={outcome} duration={duration:.3f}",
            connector=stream.connector, client=stream.client, stream=stream.stream_id,
            c2a=stream.sent_bytes if self._hub else stream.received_bytes,
            a2c=stream.received_bytes if self._hub else stream.sent_bytes,
            outcome=outcome,
            duration=max(0.0, self._clock.seconds() - stream.opened_at),
        )


    def limit_hit(self, limit: str) -> None:
        m = self._m
        m.child(m.limit_hits, limit).inc()
        logs.emit(self._log, "warn", logs.LIMIT_REACHED, "limit={limit}", limit=limit)

_OPEN_FAILURES = frozenset(
    {"target_refused", "target_timeout", "tunnel_lost", "open_timeout", "unknown_connector",
     "limit"}
)
