"""
Tests for L{nowconnect.web}: the Klein routes served by the real L{WebApp.site}, one HTTP/1.1
request at a time over L{twisted.test.iosim}, from a chosen client address.

treq is not a dependency, so instead of StubTreq the requests go through the same Twisted Web
L{Site} that production listens with; that also covers routing, headers and error pages.
"""
# -*- test-case-name: tests.test_web -*-

from __future__ import annotations

import ipaddress
import json
from typing import Any, Callable

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from nowconnect.metrics import CONTENT_TYPE_LATEST, Metrics
from nowconnect.web import WebApp, address_allowed

net = ipaddress.ip_network
LOCAL = IPv4Address("TCP", "127.0.0.1", 40000)


@attrs.frozen
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _Client(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True


def parse(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return Response(int(status_line.split()[1]), headers, body)


def dechunk(raw: bytes) -> bytes:
    """Decode an HTTP/1.1 chunked body (Twisted Web uses it when there is no length)."""
    out = b""
    while True:
        size_line, _, raw = raw.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, raw = out + raw[:size], raw[size + 2 :]


class WebCase(SynchronousTestCase):
    """Serve a L{WebApp} and make requests to it from any address."""

    def serve(
        self,
        unready: Callable[[], list[str]] | None = None,
        metrics_allow: list[Any] | None = None,
        tunnel: Any = None,
    ) -> None:
        self.metrics = Metrics()
        self.metrics.declare_connector("addomain")
        self.clock = MemoryReactorClock()
        self.site = WebApp(self.metrics, unready=unready, tunnel=tunnel,
                           metrics_allow=metrics_allow).site(self.clock)

    def request(self, path: bytes, method: bytes = b"GET",
                peer: IPv4Address | IPv6Address = LOCAL) -> Response:
        client = _Client(b"%s %s HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n"
                         % (method, path))
        server = self.site.buildProtocol(peer)
        server_transport = iosim.FakeTransport(server, isServer=True, peerAddress=peer)
        client_transport = iosim.FakeTransport(client, isServer=False)
        pump = iosim.connect(server, server_transport, client, client_transport,
                             clock=self.clock)
        pump.flush()
        self.assertTrue(client.closed, "the server did not finish the response")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        return parse(client.data)


class HealthTests(WebCase):
    def test_healthz(self) -> None:
        """/healthz answers 200 with JSON {"status": "ok"}, not cacheable."""
        self.serve()
        r = self.request(b"/healthz")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json(), {"status": "ok"})
        self.assertEqual(r.headers["content-type"], "application/json")
        self.assertEqual(r.headers["cache-control"], "no-store")

    def test_healthz_head(self) -> None:
        """HEAD /healthz answers 200 with no body."""
        self.serve()
        r = self.request(b"/healthz", method=b"HEAD")
        self.assertEqual((r.status, r.body), (200, b""))

    def test_healthz_not_restricted(self) -> None:
        """Liveness is open to everyone even when metrics_allow restricts the other routes."""
        self.serve(metrics_allow=[net("10.0.0.0/8")])
        self.assertEqual(self.request(b"/healthz", peer=IPv4Address("TCP", "192.0.2.1", 1))
                         .status, 200)

    def test_readyz_ready(self) -> None:
        """/readyz answers 200 ready when every connector has an agent."""
        self.serve(unready=lambda: [])
        r = self.request(b"/readyz")
        self.assertEqual((r.status, r.json()), (200, {"status": "ready"}))

    def test_readyz_without_callback(self) -> None:
        """A WebApp with no readiness callback is ready."""
        self.serve()
        self.assertEqual(self.request(b"/readyz").status, 200)

    def test_readyz_unready(self) -> None:
        """/readyz answers 503 naming the connectors without an agent, asked at request time."""
        missing = ["addomain", "ldaps"]
        self.serve(unready=lambda: list(missing))
        r = self.request(b"/readyz")
        self.assertEqual(r.status, 503)
        self.assertEqual(r.json(), {"status": "unready",
                                    "connectors_without_agent": ["addomain", "ldaps"]})
        missing.clear()
        self.assertEqual(self.request(b"/readyz").status, 200)


class MetricsTests(WebCase):
    def test_metrics(self) -> None:
        """/metrics is the Prometheus exposition, with its content type and our series."""
        self.serve()
        self.metrics.connections.labels("addomain").inc(3)
        r = self.request(b"/metrics")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers["content-type"], CONTENT_TYPE_LATEST)
        self.assertIn(b'nowconnect_tcp_connections_total{connector="addomain"} 3.0', r.body)
        self.assertIn(b"# TYPE nowconnect_tcp_bytes_total counter", r.body)
        self.assertIn(b'nowconnect_tcp_active_connections{connector="addomain"} 0.0', r.body)

    def test_metrics_allow_outside(self) -> None:
        """An address outside metrics_allow gets 403 on /metrics and /readyz."""
        self.serve(metrics_allow=[net("10.0.0.0/8"), net("2001:db8::/32")])
        outside = IPv4Address("TCP", "192.0.2.1", 5555)
        for path in (b"/metrics", b"/readyz"):
            r = self.request(path, peer=outside)
            self.assertEqual((r.status, r.json()), (403, {"error": "forbidden"}))
            self.assertNotIn(b"nowconnect_", r.body)

    def test_metrics_allow_inside(self) -> None:
        """Addresses inside metrics_allow, IPv4 and IPv6, get the metrics."""
        self.serve(metrics_allow=[net("10.0.0.0/8"), net("2001:db8::/32")])
        for peer in (IPv4Address("TCP", "10.9.8.7", 1), IPv6Address("TCP", "2001:db8::5", 1)):
            self.assertEqual(self.request(b"/metrics", peer=peer).status, 200)

    def test_metrics_allow_ipv4_mapped(self) -> None:
        """A dual-stack socket's IPv4-mapped client address is checked as IPv4."""
        self.serve(metrics_allow=[net("10.0.0.0/8")])
        inside = IPv6Address("TCP", "::ffff:10.1.2.3", 1)
        outside = IPv6Address("TCP", "::ffff:192.0.2.1", 1)
        self.assertEqual(self.request(b"/metrics", peer=inside).status, 200)
        self.assertEqual(self.request(b"/metrics", peer=outside).status, 403)


class RoutingTests(WebCase):
    def test_unknown_path(self) -> None:
        """An unknown path is a JSON 404."""
        self.serve()
        r = self.request(b"/nope")
        self.assertEqual((r.status, r.json()), (404, {"error": "not found"}))
        self.assertEqual(r.headers["content-type"], "application/json")

    def test_tunnel_absent(self) -> None:
        """Without a tunnel resource (the agent), /tunnel is a 404."""
        self.serve()
        r = self.request(b"/tunnel")
        self.assertEqual((r.status, r.json()), (404, {"error": "no tunnel here"}))

    def test_wrong_method(self) -> None:
        """A method a route does not take is refused with 405, as JSON."""
        self.serve()
        r = self.request(b"/healthz", method=b"POST")
        self.assertEqual((r.status, r.json()), (405, {"error": "error"}))

    def test_readiness_error_is_500(self) -> None:
        """A readiness callback that raises gives a JSON 500 and no traceback."""
        def broken() -> list[str]:
            raise RuntimeError("registry exploded")

        self.serve(unready=broken)
        r = self.request(b"/readyz")
        self.assertEqual((r.status, r.json()), (500, {"error": "error"}))
        self.assertNotIn(b"exploded", r.body)
        self.flushLoggedErrors(RuntimeError)


class AddressAllowedTests(SynchronousTestCase):
    def test_no_restriction(self) -> None:
        """None means everyone is allowed, even a malformed host."""
        self.assertTrue(address_allowed("192.0.2.1", None))
        self.assertTrue(address_allowed("garbage", None))

    def test_ipv4(self) -> None:
        """IPv4 addresses are matched against every network given."""
        nets = [net("10.0.0.0/8"), net("172.16.0.0/12")]
        self.assertTrue(address_allowed("10.255.0.1", nets))
        self.assertTrue(address_allowed("172.31.0.1", nets))
        self.assertFalse(address_allowed("172.32.0.1", nets))

    def test_ipv6(self) -> None:
        """IPv6 addresses match IPv6 networks."""
        nets = [net("2001:db8::/32")]
        self.assertTrue(address_allowed("2001:db8:1::1", nets))
        self.assertFalse(address_allowed("2001:db9::1", nets))

    def test_ipv4_mapped(self) -> None:
        """An IPv4-mapped IPv6 address is checked as the IPv4 address it carries."""
        nets = [net("10.0.0.0/8")]
        self.assertTrue(address_allowed("::ffff:10.1.2.3", nets))
        self.assertFalse(address_allowed("::ffff:192.0.2.1", nets))

    def test_not_an_address(self) -> None:
        """A host that is not an IP literal is refused when a restriction exists."""
        self.assertFalse(address_allowed("localhost", [net("127.0.0.0/8")]))
        self.assertFalse(address_allowed("", [net("0.0.0.0/0")]))

    def test_ipv4_mapped_against_ipv6_written_network(self) -> None:
        """
        An IPv4-mapped client matches a network written in IPv6 form, as it does for
        listener allow_cidrs.
        """
        self.assertTrue(address_allowed("::ffff:10.1.2.3", [net("::ffff:10.0.0.0/104")]))
