"""
The hub and the agent paired in memory: real L{HubService} and L{AgentService} objects on one
L{MemoryReactorClock}, their tunnel carried by L{twisted.test.iosim}, client and target sockets
played by L{StringTransport}s.

What runs is the production assembly: the hub's Twisted Web L{Site} serves the upgrade through
Klein and Autobahn's L{WebSocketResource}, the agent dials through its C{ClientService} and
C{HostnameEndpoint}.  Only the sockets are fake, and time moves only when a test says so.
"""
# -*- test-case-name: tests.test_inmemory -*-

from __future__ import annotations

import hashlib
from typing import Any, Callable

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from nowconnect import wire
from nowconnect.agent import AgentService, make_agent_service
from nowconnect.config import parse_agent_config, parse_hub_config
from nowconnect.hub import HubService, make_hub_service
from nowconnect.tunnel import (
    CLOSE_GOING_AWAY,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_REJECTED,
    AgentTunnelProtocol,
)

HUB_PORT = 8765
LISTEN_PORT = 1389
TARGET_PORT = 389
TOKENS = {"agent-1": "token-one-secret", "agent-2": "token-two-secret"}
HANDSHAKE_TIMEOUT = 5.0
WINDOW = 65536


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def hub_data(**overrides: Any) -> dict[str, Any]:
    """A hub config: one listener for C{addomain} (10/8 only), agents 1 and 2 serving it."""
    data: dict[str, Any] = {
        "listen": f"tcp:{HUB_PORT}:interface=127.0.0.1",
        "listeners": [{"connector": "addomain", "bind": "127.0.0.1", "port": LISTEN_PORT,
                       "allow_cidrs": ["10.0.0.0/8"]}],
        "agents": [{"id": agent_id, "token_sha256": sha(token), "connectors": ["addomain"]}
                   for agent_id, token in TOKENS.items()],
        "limits": {"handshake_timeout": HANDSHAKE_TIMEOUT, "initial_window": WINDOW,
                   "max_frame": 16384, "open_timeout": 15.0},
        "drain_seconds": 1.0,
    }
    data.update(overrides)
    return data


def agent_data(agent_id: str = "agent-1", **overrides: Any) -> dict[str, Any]:
    """An agent config serving C{addomain} from 127.0.0.1:389."""
    data: dict[str, Any] = {
        "hub_url": f"ws://127.0.0.1:{HUB_PORT}/tunnel",
        "agent_id": agent_id,
        "token": TOKENS.get(agent_id, "token-one-secret"),
        "connectors": {"addomain": f"127.0.0.1:{TARGET_PORT}"},
        "handshake_timeout": HANDSHAKE_TIMEOUT,
        "drain_seconds": 1.0,
    }
    data.update(overrides)
    return data


class LocalTransport(StringTransport):
    """
    A StringTransport that behaves like a TCP socket where NowConnect needs it to: it records
    half-close and abort, and unregistering a producer twice is allowed, as on Twisted's real
    TCP transports (the relay unregisters on write_eof and again on close).
    """

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class RecordingFakeTransport(iosim.FakeTransport):
    """An iosim transport that also keeps everything written, to read HTTP status lines."""

    def __init__(self, protocol: Any, isServer: bool) -> None:
        super().__init__(protocol, isServer,
                         peerAddress=IPv4Address("TCP", "192.0.2.10", 50000))
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)
        super().write(data)

    def all_written(self) -> bytes:
        return b"".join(self.written)


class Socket:
    """
    A client or target socket: its relay protocol and its fake transport.  Like a reactor,
    L{World.flush} reports connectionLost once the protocol closed or aborted its transport.
    """

    def __init__(self, protocol: Any, transport: LocalTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self.reported = False

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def eof(self) -> None:
        self.protocol.readConnectionLost()

    def lost(self, reason: Failure | None = None) -> None:
        """The socket is gone (the peer closed or reset it, or we did): connectionLost, once."""
        if self.reported:
            return
        self.reported = True
        self.transport.connected = False
        self.protocol.connectionLost(reason or Failure(ConnectionDone()))

    def reap(self) -> bool:
        """Report connectionLost if the transport was closed locally; True if it did."""
        if self.reported or not self.transport.disconnecting:
            return False
        self.lost(Failure(ConnectionAborted() if self.transport.aborted else ConnectionDone()))
        return True

    def value(self) -> bytes:
        return self.transport.value()


class World:
    """
    One hub and any number of agents on a shared L{MemoryReactorClock}.

    Autobahn schedules its timers through txaio's configured loop; the test points that loop
    at the same clock (restored afterwards), so nothing touches the global reactor.
    """

    def __init__(self, case: SynchronousTestCase, hub: dict[str, Any] | None = None) -> None:
        self.case = case
        self.clock = MemoryReactorClock()
        self.clock.advance(1_000_000)
        case.patch(txaio.config, "loop", self.clock)
        self.log: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.log.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.log.append)
        self.hub: HubService = make_hub_service(parse_hub_config(hub or hub_data(), "hub.yaml"),
                                                reactor=self.clock)
        self.hub.startService()
        self.pumps: list[iosim.IOPump] = []
        self.agents: list[AgentService] = []
        self.agent_protocols: list[AgentTunnelProtocol] = []
        self.sockets: list[Socket] = []
        self._taken: set[int] = set()
        case.addCleanup(self.stop)

    # -- plumbing ------------------------------------------------------------------------------

    def events(self, name: str) -> list[dict[str, Any]]:
        """Captured log events whose C{event} key is C{name}."""
        return [e for e in self.log if e.get("event") == name]

    def metric(self, name: str, **labels: str) -> float | None:
        return self.hub.metrics.registry.get_sample_value(name, labels)

    def take_dial(self, port: int) -> tuple[str, int, Any]:
        """The oldest connection attempt to C{port} not handled yet: (host, port, factory)."""
        for i, (host, p, factory, _timeout, _bind) in enumerate(self.clock.tcpClients):
            if p == port and i not in self._taken:
                self._taken.add(i)
                return host, p, factory
        raise AssertionError(f"no pending connection attempt to port {port}")

    def pending_dials(self, port: int) -> int:
        return sum(1 for i, c in enumerate(self.clock.tcpClients)
                   if c[1] == port and i not in self._taken)

    def flush(self) -> None:
        """
        Pump every tunnel until all are quiet (this also runs calls due now), and report lost
        connections for sockets that were closed meanwhile.
        """
        for _ in range(100):
            moved = False
            for pump in self.pumps:
                moved = pump.flush() or moved
            for sock in self.sockets:
                moved = sock.reap() or moved
            if not moved:
                return
        raise AssertionError("tunnels never went quiet")

    def connect_http(self, client: Protocol) -> tuple[iosim.IOPump, RecordingFakeTransport]:
        """Connect any client protocol to the hub's web port; returns the pump and server side."""
        site = self.hub.web.factory
        server = site.buildProtocol(IPv4Address("TCP", "192.0.2.10", 50000))
        server_transport = RecordingFakeTransport(server, isServer=True)
        client_transport = iosim.FakeTransport(client, isServer=False)
        pump = iosim.connect(server, server_transport, client, client_transport,
                             greet=False, clock=self.clock)
        self.pumps.append(pump)
        return pump, server_transport

    # -- agents --------------------------------------------------------------------------------

    def start_agent(self, data: dict[str, Any] | None = None) -> AgentService:
        """Build and start an agent; its first dial is pending (see L{dial_hub})."""
        agent = make_agent_service(parse_agent_config(data or agent_data(), "agent.yaml", {}),
                                   reactor=self.clock)
        protocols = self.agent_protocols

        class Spy(AgentTunnelProtocol):
            def __init__(self) -> None:
                AgentTunnelProtocol.__init__(self)
                protocols.append(self)

        agent.tunnel_factory.protocol = Spy
        agent.startService()
        self.agents.append(agent)
        return agent

    def dial_hub(self) -> RecordingFakeTransport:
        """Complete the agent's pending dial to the hub in memory and flush the handshake."""
        host, port, factory = self.take_dial(HUB_PORT)
        client = factory.buildProtocol(IPv4Address("TCP", host, port))
        _, server_transport = self.connect_http(client)
        self.flush()
        return server_transport

    def agent_tunnel(self, agent: AgentService | None = None) -> AgentTunnelProtocol:
        """The agent's tunnel protocol object (last one built for it)."""
        return self.agent_protocols[-1] if agent is None else self.agent_protocols[
            self.agents.index(agent)]

    # -- streams -------------------------------------------------------------------------------

    def client(self, host: str = "10.0.0.5", port: int = 40000) -> Socket:
        """A client connecting to the hub's listener from C{host}."""
        addr = IPv4Address("TCP", host, port)
        relay = self.hub.listeners[0].factory.buildProtocol(addr)
        transport = LocalTransport(addr)
        relay.makeConnection(transport)
        sock = Socket(relay, transport)
        self.sockets.append(sock)
        return sock

    def target(self) -> Socket:
        """Accept the agent's pending dial to the target."""
        host, port, factory = self.take_dial(TARGET_PORT)
        addr = IPv4Address("TCP", host, port)
        protocol = factory.buildProtocol(addr)
        transport = LocalTransport(addr)
        protocol.makeConnection(transport)
        sock = Socket(protocol, transport)
        self.sockets.append(sock)
        return sock

    def refuse_target(self) -> None:
        """Fail the agent's pending dial to the target: connection refused."""
        host, port, factory = self.take_dial(TARGET_PORT)
        connector = next(c for c in self.clock.connectors if c.getDestination().port == port)
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        # HostnameEndpoint reports the failure when its attempt loop next runs.
        self.clock.advance(0.3)

    def stream(self) -> tuple[Socket, Socket]:
        """A client connected all the way to a target."""
        client = self.client()
        self.flush()
        target = self.target()
        self.flush()
        return client, target

    # -- teardown ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every agent and the hub, moving time until all of them finished."""
        done: list[object] = []
        for service in [*self.agents, self.hub]:
            if service.running:
                service.stopService().addBoth(done.append)
            else:
                done.append(None)
        for _ in range(200):
            self.flush()
            if len(done) == len(self.agents) + 1:
                break
            self.clock.advance(0.1)
        failures = [d for d in done if isinstance(d, Failure)]
        if failures:
            failures[0].raiseException()
        # AgentService.stopService leaves its 3 s close timeout behind (see
        # ShutdownTests.test_agent_stop_leaves_no_delayed_calls); let it expire, then nothing
        # may be left on the clock.
        self.clock.advance(3)
        self.flush()
        self.case.assertEqual(self.clock.getDelayedCalls(), [])


# -- raw clients for what the real agent never does --------------------------------------------


class RawHTTPClient(Protocol):
    """Sends one hand-written HTTP request and keeps the response bytes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.response = b""
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.response += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True


def upgrade_request(token: str | None, protocol: str | None = wire.SUBPROTOCOL) -> bytes:
    lines = [
        b"GET /tunnel HTTP/1.1",
        b"Host: 127.0.0.1:8765",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
    ]
    if protocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + protocol.encode())
    if token is not None:
        lines.append(b"Authorization: Bearer " + token.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


class SilentClient(WebSocketClientProtocol):
    """A WebSocket client that upgrades correctly and then never sends HELLO (or sends junk)."""

    opened = False
    close_info: tuple[bool, int | None, str | None] | None = None
    on_open: Callable[[WebSocketClientProtocol], None] | None = None
    received: list[bytes]

    def onOpen(self) -> None:
        self.opened = True
        self.received = []
        if self.on_open is not None:
            self.on_open(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_info = (wasClean, code, reason)


def silent_client(token: str = TOKENS["agent-1"],
                  on_open: Callable[[WebSocketClientProtocol], None] | None = None
                  ) -> SilentClient:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{HUB_PORT}/tunnel",
                                     protocols=[wire.SUBPROTOCOL],
                                     headers={"Authorization": f"Bearer {token}"})
    factory.protocol = SilentClient
    client = factory.buildProtocol(None)
    client.on_open = on_open
    return client


# -- tests -------------------------------------------------------------------------------------


def hello_sender(agent_id: str, connectors: tuple[str, ...] = ("addomain",)
                 ) -> Callable[[WebSocketClientProtocol], None]:
    """An on_open hook that sends the HELLO a real agent would, with the given contents."""
    def send(client: WebSocketClientProtocol) -> None:
        client.sendMessage(wire.encode(wire.Hello(agent_id, connectors, "test")), isBinary=True)
    return send


class HandshakeTests(SynchronousTestCase):
    def test_agent_connects_and_registers(self) -> None:
        """
        The agent's dial upgrades with subprotocol nowconnect.v1 (HTTP 101), sends HELLO, gets
        WELCOME, and the hub registers it: readiness, agents_connected, agent_connected and
        the agent's "connection open" line all follow.
        """
        w = World(self)
        self.assertEqual(w.hub.connectors_without_agent(), ["addomain"])
        agent = w.start_agent()
        self.assertEqual(len(w.events("connecting_to_cloud")), 1)
        server = w.dial_hub()
        response = server.all_written()
        self.assertTrue(response.startswith(b"HTTP/1.1 101"), response[:60])
        self.assertIn(b"Sec-WebSocket-Protocol: nowconnect.v1", response)
        self.assertEqual(w.hub.connectors_without_agent(), [])
        self.assertIsNotNone(agent.tunnel)
        (connected,) = w.events("agent_connected")
        self.assertEqual((connected["agent_id"], connected["connectors"]),
                         ("agent-1", ["addomain"]))
        self.assertEqual(len(w.events("tunnel_open")), 1)
        self.assertEqual(w.metric("nowconnect_agents_connected", connector="addomain"), 1.0)
        self.assertEqual(w.metric("nowconnect_tunnel_connects_total", agent_id="agent-1"), 1.0)

    def test_welcome_carries_the_limits(self) -> None:
        """The hub answers a valid HELLO with one WELCOME holding its window and max frame."""
        w = World(self)
        client = silent_client(on_open=hello_sender("agent-1"))
        w.connect_http(client)
        w.flush()
        self.assertEqual(len(client.received), 1)
        self.assertEqual(wire.decode_message(client.received[0], wire.MAX_CONTROL_PAYLOAD),
                         [wire.Welcome(WINDOW, 16384)])
        self.assertEqual(w.hub.connectors_without_agent(), [])

    def test_wrong_token_refused_before_upgrade(self) -> None:
        """
        A wrong token gets HTTP 403 and no upgrade: the hub logs agent_rejected (bad token),
        counts it, and registers nothing.
        """
        w = World(self)
        client = RawHTTPClient(upgrade_request(token="not-the-right-token"))
        _, server = w.connect_http(client)
        w.flush()
        self.assertTrue(client.response.startswith(b"HTTP/1.1 403"), client.response[:60])
        self.assertNotIn(b"101 Switching", server.all_written())
        self.assertTrue(client.closed)
        (rejected,) = w.events("agent_rejected")
        self.assertEqual(rejected["reason"], "bad token")
        self.assertEqual(w.metric("nowconnect_agent_rejections_total", reason="bad_token"), 1.0)
        self.assertEqual(w.hub.connectors_without_agent(), ["addomain"])

    def test_agent_refused_at_upgrade_retries_cleanly(self) -> None:
        """
        An agent whose token is refused fails that attempt without an error escaping the
        reactor, logs tunnel_failed (not "connection open"), and dials again after backoff.
        """
        w = World(self)
        agent = w.start_agent(agent_data(token="not-the-right-token"))
        w.dial_hub()
        self.assertIsNone(agent.tunnel)
        self.assertEqual(len(w.events("tunnel_failed")), 1)
        self.assertEqual(w.events("tunnel_open"), [])
        self.assertEqual(w.pending_dials(HUB_PORT), 0)
        w.clock.advance(61)
        self.assertEqual(w.pending_dials(HUB_PORT), 1)

    def test_missing_token_is_401(self) -> None:
        """An upgrade without a bearer token gets HTTP 401."""
        w = World(self)
        client = RawHTTPClient(upgrade_request(token=None))
        w.connect_http(client)
        w.flush()
        self.assertTrue(client.response.startswith(b"HTTP/1.1 401"), client.response[:60])
        self.assertEqual(w.events("agent_rejected")[0]["reason"], "missing bearer token")

    def test_missing_subprotocol_is_400(self) -> None:
        """An upgrade that does not offer nowconnect.v1 gets HTTP 400, whatever the token."""
        w = World(self)
        client = RawHTTPClient(upgrade_request(token=TOKENS["agent-1"], protocol=None))
        w.connect_http(client)
        w.flush()
        self.assertTrue(client.response.startswith(b"HTTP/1.1 400"), client.response[:60])
        self.assertEqual(w.events("agent_rejected")[0]["reason"], "missing subprotocol")

    def test_agent_id_not_matching_token(self) -> None:
        """
        A HELLO whose agent id is not the one the token belongs to is refused: the tunnel is
        closed with the rejected code and the reason, agent_rejected is logged, nothing is
        registered.
        """
        w = World(self)
        client = silent_client(TOKENS["agent-1"], on_open=hello_sender("agent-2"))
        w.connect_http(client)
        w.flush()
        assert client.close_info is not None
        self.assertEqual(client.close_info[1:], (
            CLOSE_REJECTED, "agent id 'agent-2' does not match its token"))
        (rejected,) = w.events("agent_rejected")
        self.assertEqual((rejected["agent_id"], rejected["reason"]),
                         ("agent-2", "agent id 'agent-2' does not match its token"))
        self.assertEqual(w.hub.connectors_without_agent(), ["addomain"])
        self.assertEqual(w.events("agent_connected"), [])

    def test_undeclared_connector_refused(self) -> None:
        """A HELLO naming a connector the agent's token does not allow is refused with reason."""
        w = World(self)
        client = silent_client(on_open=hello_sender("agent-1", ("addomain", "payroll")))
        w.connect_http(client)
        w.flush()
        assert client.close_info is not None
        self.assertEqual(client.close_info[1:],
                         (CLOSE_REJECTED, "not authorized for connectors payroll"))
        self.assertEqual(w.events("agent_rejected")[0]["reason"],
                         "not authorized for connectors payroll")
        self.assertEqual(
            w.metric("nowconnect_agent_rejections_total", reason="unauthorized_connector"), 1.0)
        self.assertEqual(w.hub.connectors_without_agent(), ["addomain"])

    def test_real_agent_with_wrong_id_is_refused(self) -> None:
        """The real agent, misconfigured with another agent's token, is not registered."""
        w = World(self)
        w.start_agent(agent_data("agent-2", token=TOKENS["agent-1"]))
        w.dial_hub()
        self.assertEqual(w.agent_tunnel().remoteCloseCode, CLOSE_REJECTED)
        self.assertIn("does not match its token", w.agent_tunnel().remoteCloseReason)
        self.assertEqual(w.hub.connectors_without_agent(), ["addomain"])

    def test_refused_hello_gets_no_welcome(self) -> None:
        """A refused HELLO is answered by the close alone, never by WELCOME."""
        w = World(self)
        client = silent_client(TOKENS["agent-1"], on_open=hello_sender("agent-2"))
        w.connect_http(client)
        w.flush()
        self.assertIsNotNone(client.close_info)
        self.assertEqual(client.received, [])

    def test_rejection_reasons_labelled_precisely(self) -> None:
        """
        agent_rejections counts an agent-id mismatch as agent_id_mismatch and a missing
        token as missing_token, not as bad_token.
        """
        w = World(self)
        w.connect_http(silent_client(TOKENS["agent-1"], on_open=hello_sender("agent-2")))
        w.connect_http(RawHTTPClient(upgrade_request(token=None)))
        w.flush()
        name = "nowconnect_agent_rejections_total"
        self.assertEqual(
            (w.metric(name, reason="agent_id_mismatch"), w.metric(name, reason="missing_token"),
             w.metric(name, reason="bad_token")),
            (1.0, 1.0, None),
        )

    def test_no_hello_in_time(self) -> None:
        """
        A tunnel that upgrades but sends no HELLO within handshake_timeout is closed (handshake
        timeout), and only then; agent_rejected names the reason.
        """
        w = World(self)
        client = silent_client()
        w.connect_http(client)
        w.flush()
        self.assertTrue(client.opened)
        w.clock.advance(HANDSHAKE_TIMEOUT - 0.5)
        w.flush()
        self.assertIsNone(client.close_info)
        w.clock.advance(0.5)
        w.flush()
        assert client.close_info is not None
        self.assertEqual(client.close_info[1:], (CLOSE_HANDSHAKE_TIMEOUT, "no HELLO in time"))
        self.assertEqual(w.events("agent_rejected")[0]["reason"], "no HELLO in time")
        self.assertEqual(
            w.metric("nowconnect_agent_rejections_total", reason="handshake_timeout"), 1.0)

    def test_first_message_not_hello(self) -> None:
        """A first message that is not HELLO closes the tunnel as a protocol error."""
        w = World(self)
        client = silent_client(on_open=lambda c: c.sendMessage(
            wire.encode(wire.Window(1, 10)), isBinary=True))
        w.connect_http(client)
        w.flush()
        assert client.close_info is not None
        self.assertEqual(client.close_info[1], CLOSE_PROTOCOL_ERROR)
        (error,) = w.events("tunnel_protocol_error")
        self.assertEqual(error["reason"], "first message must be a single HELLO")
        self.assertEqual(client.received, [])  # no WELCOME


class StreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.w = World(self)
        self.agent = self.w.start_agent()
        self.w.dial_hub()

    def test_bytes_both_ways_and_half_close(self) -> None:
        """
        A client's bytes reach the target and the answer comes back; the client's EOF becomes
        the target's half-close, the target's EOF the client's, and then both sockets are
        closed and the stream is gone on both sides, logged as outcome=fin.
        """
        w = self.w
        client, target = w.stream()
        client.send(b"\x30\x0c bind request")
        w.flush()
        self.assertEqual(target.value(), b"\x30\x0c bind request")
        target.send(b"\x30\x0c bind response")
        w.flush()
        self.assertEqual(client.value(), b"\x30\x0c bind response")

        client.eof()
        w.flush()
        self.assertTrue(target.transport.write_closed)
        self.assertFalse(target.transport.disconnecting)
        self.assertEqual(w.hub.active_streams(), 1)
        target.send(b"last words")
        w.flush()
        self.assertTrue(client.value().endswith(b"last words"))
        target.eof()
        w.flush()
        self.assertTrue(client.transport.write_closed)
        self.assertTrue(client.transport.disconnecting and target.transport.disconnecting)
        self.assertFalse(client.transport.aborted or target.transport.aborted)
        self.assertEqual((w.hub.active_streams(), self.agent.active_streams()), (0, 0))
        self.assertTrue(client.reported and target.reported)
        closed = [e for e in w.events("connection_closed") if e["log_namespace"] ==
                  "nowconnect.hub"]
        self.assertEqual([e["outcome"] for e in closed], ["fin"])
        self.assertEqual((closed[0]["c2a"], closed[0]["a2c"]), (15, 26))
        self.assertEqual(w.metric("nowconnect_tcp_bytes_total", direction="c2a",
                                  connector="addomain"), 15.0)
        self.assertEqual(w.metric("nowconnect_tcp_active_connections", connector="addomain"),
                         0.0)

    def test_optimistic_open(self) -> None:
        """Bytes a client sends before the target connects are delivered when it does."""
        w = self.w
        client = w.client()
        client.send(b"early query")
        w.flush()
        target = w.target()
        self.assertEqual(target.value(), b"early query")

    def test_target_refused_aborts_client(self) -> None:
        """A refused target dial resets the stream: the client is aborted, counted by reason."""
        w = self.w
        client = w.client()
        w.flush()
        w.refuse_target()
        w.flush()
        self.assertTrue(client.transport.aborted)
        self.assertEqual(w.hub.active_streams(), 0)
        self.assertEqual(w.metric("nowconnect_tcp_open_failures_total", connector="addomain",
                                  reason="target_refused"), 1.0)
        self.assertEqual(len(w.events("target_failed")), 1)

    def test_client_reset_aborts_target(self) -> None:
        """A client that vanishes mid-stream makes the agent abort its target."""
        w = self.w
        client, target = w.stream()
        client.lost(Failure(ConnectionLost("reset by peer")))
        w.flush()
        self.assertTrue(target.transport.aborted)
        self.assertEqual(self.agent.active_streams(), 0)

    def test_open_timeout(self) -> None:
        """A stream whose target never answers is reset after open_timeout."""
        w = self.w
        client = w.client()
        w.flush()
        w.clock.advance(14.9)
        self.assertFalse(client.transport.aborted)
        w.clock.advance(0.2)
        w.flush()
        self.assertTrue(client.transport.aborted)
        self.assertEqual(self.agent.active_streams(), 0)
        self.assertEqual(w.metric("nowconnect_tcp_open_failures_total", connector="addomain",
                                  reason="open_timeout"), 1.0)
        # The agent's dial, finishing late, finds the stream gone and aborts the target.
        late = w.target()
        self.assertTrue(late.transport.aborted)

    def test_backpressure_through_the_tunnel(self) -> None:
        """
        A target whose socket backs up stops the agent's grants, so once a window is in
        flight the hub pauses reading its client; when the target drains, reading resumes.
        """
        w = self.w
        client, target = w.stream()
        target.transport.producer.pauseProducing()  # the target's write buffer is full
        client.send(b"a" * (WINDOW - 1))
        w.flush()
        self.assertEqual(client.transport.producerState, "producing")
        client.send(b"b" * 10)
        w.flush()
        self.assertEqual(client.transport.producerState, "paused")
        self.assertEqual(len(target.value()), WINDOW)
        target.transport.producer.resumeProducing()
        w.flush()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(len(target.value()), WINDOW + 9)

    def test_no_agent(self) -> None:
        """Without an agent for the connector a client is aborted; no_agent_for_connector logged."""
        w = World(self)
        client = w.client()
        self.assertTrue(client.transport.aborted)
        self.assertEqual(len(w.events("no_agent_for_connector")), 1)
        self.assertEqual(w.metric("nowconnect_tcp_open_failures_total", connector="addomain",
                                  reason="no_agent"), 1.0)

    def test_cidr_blocked(self) -> None:
        """A client outside allow_cidrs is aborted before any stream is opened."""
        w = self.w
        client = w.client(host="192.168.1.1")
        self.assertTrue(client.transport.aborted)
        self.assertEqual(len(w.events("cidr_blocked")), 1)
        self.assertEqual(w.hub.active_streams(), 0)

    def test_tunnel_lost_aborts_streams_and_agent_redials(self) -> None:
        """
        Losing the tunnel resets every stream (clients and targets aborted), the hub drops the
        agent from the registry, and the agent dials again after its backoff.
        """
        w = self.w
        (c1, t1), (c2, t2) = w.stream(), w.stream()
        tunnel = w.agent_tunnel()
        tunnel.transport.loseConnection()
        w.flush()
        for sock in (c1, t1, c2, t2):
            self.assertTrue(sock.transport.aborted)
        self.assertEqual(w.hub.connectors_without_agent(), ["addomain"])
        self.assertEqual(len(w.events("agent_disconnected")), 1)
        self.assertEqual(w.pending_dials(HUB_PORT), 0)
        w.clock.advance(61)
        self.assertEqual(w.pending_dials(HUB_PORT), 1)
        w.dial_hub()
        self.assertEqual(w.hub.connectors_without_agent(), [])

    def test_agent_forgets_lost_tunnel(self) -> None:
        """After its tunnel is lost the agent holds no tunnel (and so reports itself unready)."""
        w = self.w
        w.agent_tunnel().transport.loseConnection()
        w.flush()
        self.assertIsNone(self.agent.tunnel)


class IsolationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.w = World(self)
        self.good = self.w.start_agent(agent_data("agent-1"))
        self.w.dial_hub()
        self.bad = self.w.start_agent(agent_data("agent-2"))
        self.w.dial_hub()
        # Least-loaded placement puts one stream on each tunnel.
        self.first = self.w.stream()
        self.second = self.w.stream()
        self.assertEqual((self.good.active_streams(), self.bad.active_streams()), (1, 1))

    def assert_only_bad_tunnel_closed(self, reason: str) -> None:
        w = self.w
        (error,) = w.events("tunnel_protocol_error")
        self.assertEqual((error["agent"], error["reason"]), ("agent-2", reason))
        bad_tunnel = w.agent_tunnel(self.bad)
        self.assertEqual(bad_tunnel.remoteCloseCode, CLOSE_PROTOCOL_ERROR)
        self.assertIsNone(bad_tunnel.mux)
        # The bad tunnel's stream was reset; the good one carries on.
        self.assertTrue(self.second[0].transport.aborted)
        self.assertTrue(self.second[1].transport.aborted)
        client, target = self.first
        client.send(b"still here")
        w.flush()
        self.assertEqual(target.value(), b"still here")
        self.assertFalse(client.transport.aborted)
        self.assertEqual(w.hub.connectors_without_agent(), [])
        self.assertEqual(w.hub.active_streams(), 1)
        closed = w.events("agent_disconnected")
        self.assertEqual([e["agent_id"] for e in closed], ["agent-2"])

    def test_malformed_frame_closes_only_that_tunnel(self) -> None:
        """
        An unknown frame type after HELLO closes that tunnel only, logging
        tunnel_protocol_error; other tunnels and their streams are untouched.
        """
        self.w.agent_tunnel(self.bad).sendMessage(b"\x63" + b"\x00" * 8, isBinary=True)
        self.w.flush()
        self.assert_only_bad_tunnel_closed("unknown frame type 99")

    def test_frame_for_unknown_stream_closes_only_that_tunnel(self) -> None:
        """A well-formed frame for a stream never opened is a protocol error for that tunnel."""
        self.w.agent_tunnel(self.bad).sendMessage(wire.encode(wire.Fin(99)), isBinary=True)
        self.w.flush()
        self.assert_only_bad_tunnel_closed("frame for unknown stream 99")

    def test_protocol_error_disconnect_labelled(self) -> None:
        """A tunnel closed for a protocol error counts as reason=protocol_error."""
        self.w.agent_tunnel(self.bad).sendMessage(b"\x63" + b"\x00" * 8, isBinary=True)
        self.w.flush()
        self.assertEqual(self.w.metric("nowconnect_tunnel_disconnects_total",
                                       agent_id="agent-2", reason="protocol_error"), 1.0)

    def test_text_message_closes_only_that_tunnel(self) -> None:
        """A text message on the tunnel is a protocol error."""
        self.w.agent_tunnel(self.bad).sendMessage(b"hello", isBinary=False)
        self.w.flush()
        self.assert_only_bad_tunnel_closed("text message on the tunnel")

    def test_truncated_message_closes_only_that_tunnel(self) -> None:
        """A message ending in the middle of a frame is a protocol error."""
        self.w.agent_tunnel(self.bad).sendMessage(wire.encode(wire.Fin(2))[:5], isBinary=True)
        self.w.flush()
        self.assert_only_bad_tunnel_closed("message ends in the middle of a frame")


class ShutdownTests(SynchronousTestCase):
    def test_hub_stop_resets_streams_after_drain(self) -> None:
        """
        Stopping the hub stops accepting, waits drain_seconds for open streams, then resets
        them (client and target aborted) and closes the tunnels.
        """
        w = World(self)
        w.start_agent()
        w.dial_hub()
        client, target = w.stream()
        done: list[object] = []
        w.hub.stopService().addBoth(done.append)
        self.assertEqual(len(w.events("drain_started")), 1)
        w.clock.advance(0.5)
        w.flush()
        self.assertEqual(done, [])
        self.assertFalse(client.transport.aborted)
        for _ in range(10):
            w.clock.advance(0.1)
            w.flush()
        self.assertEqual(done, [None])
        self.assertTrue(client.transport.aborted)
        self.assertTrue(target.transport.aborted)
        self.assertEqual(w.events("drain_finished")[0]["reset"], 1)

    def test_hub_stop_without_streams_is_immediate(self) -> None:
        """With no open streams the hub stops at once and closes every tunnel (going away)."""
        w = World(self)
        w.start_agent()
        w.dial_hub()
        done: list[object] = []
        w.hub.stopService().addBoth(done.append)
        w.flush()
        self.assertEqual(done, [None])
        self.assertEqual(w.agent_tunnel().remoteCloseCode, CLOSE_GOING_AWAY)

    def test_agent_stop_leaves_no_delayed_calls(self) -> None:
        """
        Stopping the agent closes its tunnel and finishes with nothing scheduled on its clock.
        """
        w = World(self)
        agent = w.start_agent()
        w.dial_hub()
        done: list[object] = []
        agent.stopService().addBoth(done.append)
        w.flush()
        self.assertEqual(done, [None])
        self.assertEqual(w.agent_tunnel().localCloseCode, CLOSE_GOING_AWAY)
        self.assertEqual(w.hub.connectors_without_agent(), ["addomain"])
        w.hub.stopService()
        w.flush()
        self.assertEqual(w.clock.getDelayedCalls(), [])
