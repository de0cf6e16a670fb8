"""
Security end to end: real C{twistd} hubs and agents on 127.0.0.1, plain blocking sockets and a
raw WebSocket client (L{wsclient}) playing the attacker.

What is checked, section by section:
  - mutual TLS: only agents with a client certificate from C{client_ca} complete the TLS
    handshake, and C{cert_identity} binds an agent entry to the name in that certificate;
  - the per-address backoff after failed authentications (403, then 429; logged once per
    block; tokens never logged);
  - a rogue agent with a valid token sending every kind of malformed or forbidden input:
    only its own tunnel closes, with a logged reason, while an honest stream keeps flowing
    byte-exact; junk and idle connections do not starve C{/healthz};
  - the connection, stream and idle limits, C{metrics_allow_cidrs}, C{exclusive} agents;
  - the agent's warning for a plain C{ws://} hub URL that is not loopback (in process, on a
    memory reactor: nothing leaves the box).

Every wait is bounded.  Each class owns its deployment (class-scoped fixtures), so processes
end when the class does.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import wsclient
from harness import HOST, Deployment, EchoServer, deterministic_chunks, read_until_closed
from nowconnect import wire
from pki import CA, make_ca

ACTIVE = "nowconnect_tcp_active_connections"
AGENTS = "nowconnect_agents_connected"
LIMIT_HITS = "nowconnect_limit_hits_total"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoServer]:
    """One echo target for the whole module."""
    with EchoServer("echo", workdir=tmp_path_factory.mktemp("echo")) as server:
        yield server


def second_agent(dep: Deployment, workdir: Path, agent_id: str, token: str,
                 **agent_extra: Any) -> Deployment:
    """
    Another agent process for C{dep}'s hub: a L{Deployment} whose own hub is never started, so
    only its C{start_agent(wait_connected=False)} and agent log are used.  Close it when done.
    """
    other = Deployment(workdir, dep.targets, agent_id=agent_id, token=token,
                       agent_extra={**dep.agent_extra, **agent_extra})
    other.web_port = dep.web_port
    return other


def hub_events_for(dep: Deployment, event: str, **fields: Any) -> list[dict[str, Any]]:
    """The hub's C{event} lines whose fields include C{fields}."""
    return [e for e in dep.hub_events(event)
            if all(e.get(k) == v for k, v in fields.items())]


def connect(port: int, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def echo_round_trip(sock: socket.socket, payload: bytes, timeout: float = 5) -> bytes:
    """Send C{payload} and read back as many bytes (less if the connection ends first)."""
    sock.settimeout(timeout)
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(len(payload) - len(got))
        if not chunk:
            break
        got += chunk
    return got


def refused(port: int, timeout: float = 5) -> str:
    """
    Connect, send a byte and wait: how the hub ended the connection (C{"reset"} or
    C{"eof"}), or C{"timeout"} if it kept it open.
    """
    try:
        sock = connect(port, timeout)
    except ConnectionError:
        return "reset"
    with sock:
        try:
            sock.sendall(b"x")
        except OSError:
            return "reset"
        data, how = read_until_closed(sock, timeout)
    assert data == b"", "a refused client must get nothing back"
    return how


def wait_idle(dep: Deployment, connector: str, timeout: float = 10) -> None:
    dep.wait_for(lambda: dep.metric(ACTIVE, connector=connector) == 0, timeout,
                 f"no open stream for {connector}")


# -- mutual TLS ------------------------------------------------------------------------------------

@dataclass
class MTLS:
    dep: Deployment
    ca: CA
    base: Path
    tokens: dict[str, str]


@pytest.fixture(scope="class")
def mtls(tmp_path_factory: pytest.TempPathFactory, echo: EchoServer) -> Iterator[MTLS]:
    base = tmp_path_factory.mktemp("mtls")
    ca = make_ca(base / "pki")
    hub = ca.issue("hub", dns=["localhost"], ips=[HOST])
    agent1 = ca.issue("agent-1", dns=["agent-1.test"], client=True)
    tokens = {name: secrets.token_urlsafe(24) for name in ("agent-1", "agent-2", "agent-3")}
    agents = [
        {"id": "agent-1", "token_sha256": sha(tokens["agent-1"]), "connectors": ["echo"],
         "cert_identity": "agent-1.test"},
        {"id": "agent-2", "token_sha256": sha(tokens["agent-2"]), "connectors": ["echo"],
         "cert_identity": "agent-2.test"},
        {"id": "agent-3", "token_sha256": sha(tokens["agent-3"]), "connectors": ["echo"]},
    ]
    dep = Deployment(
        base / "dep", {"echo": (HOST, echo.port)}, token=tokens["agent-1"],
        # Rejections here must not lock 127.0.0.1 out (that is tested separately).
        limits={"auth_failures_before_backoff": 1000},
        hub_extra={"tls_cert": str(hub.chain), "tls_key": str(hub.key),
                   "client_ca": str(ca.cert), "agents": agents},
        agent_extra={"hub_url": "wss://localhost:{web_port}/tunnel", "ca_file": str(ca.cert),
                     "client_cert": str(agent1.cert), "client_key": str(agent1.key)},
    )
    with dep:
        dep.start_hub()
        dep.start_agent()
        yield MTLS(dep, ca, base, tokens)


class TestMutualTLS:
    """
    One hub serving C{/tunnel} over TLS that requires a client certificate from C{client_ca}.
    Agents: agent-1 (the harness agent, C{cert_identity: agent-1.test}), agent-2
    (C{cert_identity: agent-2.test}) and agent-3 (no identity pinned).
    """

    def test_agent_with_client_cert_carries_traffic(self, mtls: MTLS) -> None:
        """
        An agent presenting a certificate from C{client_ca} that names its C{cert_identity}
        connects over wss:// and carries traffic; the same port's /healthz answers a TLS
        client that presents a certificate, and refuses the TLS handshake of one that does not.
        """
        dep = mtls.dep
        assert hub_events_for(dep, "agent_connected", agent_id="agent-1")
        payload = os.urandom(200_000)
        with connect(dep.listener_port["echo"]) as sock:
            assert echo_round_trip(sock, payload) == payload

        leaf = mtls.ca.issue("prober", dns=["prober.test"], client=True)
        ctx = ssl.create_default_context(cafile=str(mtls.ca.cert))
        ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
        request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        with socket.create_connection((HOST, dep.web_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(request)
                reply, _ = read_until_closed(s, 5)
        assert reply.startswith(b"HTTP/1.1 200")

        bare = ssl.create_default_context(cafile=str(mtls.ca.cert))
        with socket.create_connection((HOST, dep.web_port), timeout=5) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                with bare.wrap_socket(raw, server_hostname="localhost") as s:
                    # TLS 1.3: the client's side completes first; the refusal comes on read.
                    s.sendall(request)
                    if not s.recv(4096):
                        raise ConnectionResetError("closed without a reply")

    @pytest.mark.parametrize("case", ["no_client_cert", "foreign_ca"])
    def test_agent_without_valid_client_cert_fails_in_tls(self, mtls: MTLS, case: str) -> None:
        """
        An agent with the right token but no client certificate (or one from another CA)
        fails the TLS handshake: its token never reaches the hub's authentication (no
        C{agent_rejected}, no C{agent_connected}) and it keeps retrying.
        """
        dep = mtls.dep
        rejected_before = len(dep.hub_events("agent_rejected"))
        with second_agent(dep, mtls.base / f"agent3-{case}", "agent-3",
                          mtls.tokens["agent-3"]) as a3:
            if case == "foreign_ca":
                other = make_ca(mtls.base / "foreign", name="Foreign CA")
                leaf = other.issue("agent-3", dns=["agent-3.test"], client=True)
                a3.agent_extra.update(client_cert=str(leaf.cert), client_key=str(leaf.key))
            else:
                del a3.agent_extra["client_cert"], a3.agent_extra["client_key"]
            a3.start_agent(wait_connected=False)
            a3.wait_for(lambda: len(a3.agent_events("tunnel_failed")) >= 2, 15,
                        "two failed tunnel attempts")
            a3.stop_agent()
        assert hub_events_for(dep, "agent_connected", agent_id="agent-3") == []
        assert len(dep.hub_events("agent_rejected")) == rejected_before
        assert mtls.tokens["agent-3"] not in a3.agent_log_text() + dep.hub_log_text()

    def test_cert_identity_mismatch_is_rejected(self, mtls: MTLS) -> None:
        """
        agent-2's entry pins C{cert_identity: agent-2.test}; an agent with agent-2's token
        but a (CA-signed) certificate for another name is refused at the upgrade, and the
        logged reason names the client certificate.
        """
        dep = mtls.dep
        leaf = mtls.ca.issue("impostor", dns=["impostor.test"], client=True)
        with second_agent(dep, mtls.base / "impostor", "agent-2", mtls.tokens["agent-2"],
                          client_cert=str(leaf.cert), client_key=str(leaf.key)) as a2:
            a2.start_agent(wait_connected=False)
            dep.wait_for(lambda: any("client certificate" in e.get("reason", "")
                                     for e in dep.hub_events("agent_rejected")), 15,
                         "agent_rejected naming the client certificate")
            a2.wait_for(lambda: bool(a2.agent_events("tunnel_failed")), 10, "tunnel_failed")
            a2.stop_agent()
        assert hub_events_for(dep, "agent_connected", agent_id="agent-2") == []
        assert mtls.tokens["agent-2"] not in dep.hub_log_text()

    def test_cert_identity_match_connects(self, mtls: MTLS) -> None:
        """With a certificate naming agent-2.test, agent-2 connects and streams reach it."""
        dep = mtls.dep
        leaf = mtls.ca.issue("agent-2", dns=["agent-2.test"], client=True)
        with second_agent(dep, mtls.base / "agent2", "agent-2", mtls.tokens["agent-2"],
                          client_cert=str(leaf.cert), client_key=str(leaf.key)) as a2:
            a2.start_agent(wait_connected=False)
            dep.wait_for(lambda: bool(hub_events_for(dep, "agent_connected", agent_id="agent-2")),
                         15, "agent-2 connected")
            # Two tunnels serve echo now; two concurrent clients both get their echo.
            socks = [connect(dep.listener_port["echo"]) for _ in range(2)]
            try:
                for s in socks:
                    assert echo_round_trip(s, b"both tunnels" * 100) == b"both tunnels" * 100
            finally:
                for s in socks:
                    s.close()
            a2.stop_agent()


# -- authentication backoff ----------------------------------------------------------------------

def upgrade_status(dep: Deployment, token: str | None) -> int:
    """Status of one upgrade attempt (the connection is closed again at once)."""
    ws, status = wsclient.upgrade(HOST, dep.web_port, token=token)
    if ws is not None:
        ws.close()
    return status


def rate_limited(dep: Deployment) -> list[dict[str, Any]]:
    return [e for e in dep.hub_events("agent_rejected") if "rate limited" in e.get("reason", "")]


class TestAuthBackoff:
    """Per-address backoff after failed authentications (hub only; the client is wsclient)."""

    @pytest.fixture
    def hub(self, tmp_path: Path, echo: EchoServer) -> Iterator[Deployment]:
        with Deployment(tmp_path, {"echo": (HOST, echo.port)},
                        limits={"auth_failures_before_backoff": 2,
                                "auth_backoff_max": 5}) as dep:
            dep.start_hub()
            yield dep

    def test_wrong_tokens_get_403_then_429_logged_once_per_block(self, hub: Deployment) -> None:
        """
        Wrong tokens from one address get 403 until the burst is spent, then 429 (even the
        right token) while the block lasts; each block is logged once, not per attempt; after
        the block the right token upgrades; no token ever appears in the hub's log.
        """
        wrong = [secrets.token_urlsafe(24) for _ in range(12)]
        statuses: list[int] = []
        for token in wrong[:6]:
            statuses.append(upgrade_status(hub, token))
            if statuses[-1] == 429:
                break
        first_block = statuses.index(429) if 429 in statuses else -1
        assert first_block == 2, statuses
        assert set(statuses[:first_block]) == {403}
        assert [upgrade_status(hub, t) for t in wrong[6:11]] == [429] * 5
        assert upgrade_status(hub, hub.token) == 429, "a blocked address is blocked for everyone"
        hub.wait_for(lambda: len(rate_limited(hub)) >= 1, 5, "the block logged")
        assert len(rate_limited(hub)) == 1, "one log line per block, not per attempt"

        time.sleep(1.3)  # the first block is 1 s
        assert upgrade_status(hub, wrong[11]) == 403  # the next failure starts a 2 s block
        assert upgrade_status(hub, wrong[0]) == 429
        hub.wait_for(lambda: len(rate_limited(hub)) >= 2, 5, "the second block logged")
        assert len(rate_limited(hub)) == 2

        time.sleep(2.3)
        ws, status = wsclient.upgrade(HOST, hub.web_port, token=hub.token)
        assert status == 101 and ws is not None
        with ws:
            peer = "%s:%d" % ws.sock.getsockname()[:2]
            ws.send_binary(wire.encode(wire.Hello(hub.agent_id, ("echo",), "test")))
            welcome = wire.decode_message(ws.recv_message(5).payload, wire.MAX_CONTROL_PAYLOAD)
            assert isinstance(welcome[0], wire.Welcome)
            hub.wait_for(lambda: bool(hub_events_for(hub, "agent_connected", peer=peer)), 5,
                         "agent_connected for the raw client")
            ws.send_close()
            ws.wait_closed(5)
        assert hub.metric(LIMIT_HITS, limit="auth_failures") >= 7
        log = hub.hub_log_text()
        for token in wrong + [hub.token]:
            assert token not in log

    def test_backoff_starts_after_the_configured_failures(self, hub: Deployment) -> None:
        """With C{auth_failures_before_backoff: 2}, two wrong tokens; the third try is 429."""
        statuses = [upgrade_status(hub, secrets.token_urlsafe(16)) for _ in range(3)]
        assert statuses == [403, 403, 429]


# -- hostile input from a rogue agent -----------------------------------------------------------

ROGUE = "rogue"


class HonestStream:
    """
    A client streaming deterministic bytes through the echo listener without pause, checking
    the echo against the same sequence as it arrives.  L{finish} half-closes and waits for
    the echo's EOF.
    """

    CHUNK = 16384

    def __init__(self, port: int) -> None:
        self.sock = connect(port, timeout=15)
        self.sent = 0
        self.received = 0
        self.error: str | None = None
        self.eof = False
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._sender.start()
        self._receiver.start()

    def _send(self) -> None:
        try:
            for piece in deterministic_chunks(1 << 40, seed=11, chunk=self.CHUNK):
                if self._stop.is_set():
                    break
                self.sock.sendall(piece)
                self.sent += len(piece)
                time.sleep(0.01)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.error = self.error or f"send failed after {self.sent} bytes: {e}"

    def _receive(self) -> None:
        expected = deterministic_chunks(1 << 40, seed=11, chunk=self.CHUNK)
        pending = bytearray()
        try:
            while True:
                data = self.sock.recv(262144)
                if not data:
                    self.eof = True
                    return
                while len(pending) < len(data):
                    pending += next(expected)
                if pending[: len(data)] != data:
                    self.error = f"echo differs within bytes {self.received}..+{len(data)}"
                    return
                del pending[: len(data)]
                self.received += len(data)
        except OSError as e:
            self.error = self.error or f"receive failed after {self.received} bytes: {e}"

    def assert_flowing(self, since: int, timeout: float = 5) -> None:
        """At least 64 KiB more have come back, correct, since C{since}."""
        deadline = time.monotonic() + timeout
        while self.received < since + 65536 and self.error is None:
            assert time.monotonic() < deadline, (
                f"honest stream stalled at {self.received} bytes (since {since})")
            time.sleep(0.02)
        assert self.error is None, self.error

    def finish(self, timeout: float = 15) -> None:
        self._stop.set()
        self._sender.join(timeout)
        self._receiver.join(timeout)
        self.sock.close()


@dataclass(frozen=True)
class Hostile:
    """One kind of bad input from an agent that holds a valid token."""

    name: str
    send: Callable[[wsclient.WebSocketClient], None]
    event: str
    reason: str          # a substring of the logged reason
    code: int | None     # the close code, or None: the connection is dropped without one
    hello: bool = True   # complete HELLO/WELCOME first


def _binary(payload: bytes) -> Callable[[wsclient.WebSocketClient], None]:
    return lambda ws: ws.send_binary(payload)


def _header(ftype: int, stream_id: int, length: int) -> bytes:
    return wire.HEADER.pack(ftype, stream_id, length)


F = wire.FrameType
P_ERR, REJ, DISC = "tunnel_protocol_error", "agent_rejected", "agent_disconnected"
HOSTILE = [
    Hostile("truncated_frame", _binary(_header(F.DATA, 1, 100) + b"x" * 10), P_ERR,
            "middle of a frame", 4003),
    Hostile("truncated_header", _binary(b"\x05\x00\x00"), P_ERR, "middle of a frame", 4003),
    Hostile("data_over_max_frame", _binary(_header(F.DATA, 1, 262145) + b"\0" * 262145), P_ERR,
            "exceeds max", 4003),
    Hostile("unknown_frame_type", _binary(_header(99, 1, 0)), P_ERR, "unknown frame type 99",
            4003),
    Hostile("open_to_hub", _binary(wire.encode(wire.Open(1, "decoy", "192.0.2.9:1"))), P_ERR,
            "OPEN sent to the hub", 4003),
    Hostile("welcome_to_hub", _binary(wire.encode(wire.Welcome(65536, 16384))), P_ERR,
            "WELCOME after the handshake", 4003),
    Hostile("second_hello", _binary(wire.encode(wire.Hello(ROGUE, ("decoy",), "x"))), P_ERR,
            "HELLO after the handshake", 4003),
    # CONNECTED does go agent -> hub; for a stream the hub never opened it is a lie.
    Hostile("connected_unknown_stream", _binary(wire.encode(wire.Connected(1))), P_ERR,
            "unknown stream 1", 4003),
    Hostile("data_unknown_stream", _binary(wire.encode(wire.Data(7, b"hi"))), P_ERR,
            "unknown stream 7", 4003),
    Hostile("window_unknown_stream", _binary(wire.encode(wire.Window(3, 1 << 20))), P_ERR,
            "unknown stream 3", 4003),
    Hostile("rst_unknown_code", _binary(_header(F.RST, 1, 1) + b"\xc8"), P_ERR,
            "unknown code 200", 4003),
    Hostile("open_flood", _binary(b"".join(wire.encode(wire.Open(i, "decoy", "192.0.2.9:1"))
                                           for i in range(1, 1001))), P_ERR,
            "OPEN sent to the hub", 4003),
    Hostile("text_message", lambda ws: ws.send_text("hello hub"), P_ERR,
            "text message on the tunnel", 4003),
    # Below the tunnel protocol: RFC 6455 violations Autobahn refuses by dropping the TCP
    # connection (the hub still logs the tunnel's end with the reason).
    Hostile("unmasked_frame", lambda ws: ws.send_binary(b"\x05", mask=False), DISC,
            "unmasked client-to-server frame", None),
    Hostile("ws_frame_of_1_tib",
            lambda ws: ws.send_raw(bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 40) + b"mask"),
            DISC, "exceeds payload limit", None),
    # Before or instead of a valid HELLO.
    Hostile("hello_unauthorized_connector",
            _binary(wire.encode(wire.Hello(ROGUE, ("echo",), "x"))), REJ,
            "not authorized for connectors echo", 4001, hello=False),
    Hostile("hello_impersonates_agent_1",
            _binary(wire.encode(wire.Hello("agent-1", ("decoy",), "x"))), REJ,
            "does not match its token", 4001, hello=False),
    Hostile("hello_future_protocol",
            _binary(wire.encode(wire.Hello(ROGUE, ("decoy",), "x", protocol=2))), REJ,
            "unsupported protocol version 2", 4001, hello=False),
    Hostile("hello_not_json", _binary(_header(F.HELLO, 0, 5) + b"{{{{{"), P_ERR,
            "HELLO is not JSON", 4003, hello=False),
    Hostile("hello_too_long", _binary(_header(F.HELLO, 0, 70000) + b" " * 70000), P_ERR,
            "too long", 4003, hello=False),
    Hostile("data_before_hello", _binary(wire.encode(wire.Data(1, b"x"))), P_ERR,
            "first message must be a single HELLO", 4003, hello=False),
    Hostile("no_hello", lambda ws: None, REJ, "no HELLO in time", 4002, hello=False),
]


def rogue_upgrade(dep: Deployment, token: str, *, hello: bool) -> wsclient.WebSocketClient:
    """A raw tunnel with the rogue token; with C{hello}, HELLO sent and WELCOME received."""
    ws, status = wsclient.upgrade(HOST, dep.web_port, token=token)
    assert status == 101 and ws is not None, status
    if hello:
        ws.send_binary(wire.encode(wire.Hello(ROGUE, ("decoy",), "rogue/1")))
        frames = wire.decode_message(ws.recv_message(5).payload, wire.MAX_CONTROL_PAYLOAD)
        assert isinstance(frames[0], wire.Welcome), frames
    return ws


@dataclass
class Arena:
    dep: Deployment
    rogue_token: str
    honest: HonestStream
    base: Path


@pytest.fixture(scope="class")
def arena(tmp_path_factory: pytest.TempPathFactory,
          echo: EchoServer) -> Iterator[Arena]:
    base = tmp_path_factory.mktemp("hostile")
    token, rogue_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    targets = {"echo": (HOST, echo.port), "decoy": (HOST, echo.port)}
    agents = [{"id": "agent-1", "token_sha256": sha(token), "connectors": ["echo", "decoy"]},
              {"id": ROGUE, "token_sha256": sha(rogue_token), "connectors": ["decoy"]}]
    with Deployment(base / "dep", targets, token=token, limits={"handshake_timeout": 2},
                    hub_extra={"agents": agents}) as dep:
        dep.start_hub()
        dep.start_agent()
        honest = HonestStream(dep.listener_port["echo"])
        try:
            honest.assert_flowing(0)
            yield Arena(dep, rogue_token, honest, base)
        finally:
            honest.finish(5)


class TestHostileInput:
    """
    One hub with the honest harness agent (agent-1: connectors echo and decoy) and a second
    agent entry, "rogue" (decoy only), whose token the attacker holds.  An honest client
    streams through the echo listener for the whole class; every hostile tunnel must close
    alone while that stream keeps flowing.
    """

    @pytest.mark.parametrize("case", HOSTILE, ids=[h.name for h in HOSTILE])
    def test_hostile_input_closes_only_that_tunnel(self, arena: Arena, case: Hostile) -> None:
        """
        The rogue's tunnel is closed (its close code, or dropped) and the hub logs the event
        with the reason for that very connection; the honest stream keeps flowing.
        """
        dep, since = arena.dep, arena.honest.received
        with rogue_upgrade(dep, arena.rogue_token, hello=case.hello) as ws:
            peer = "%s:%d" % ws.sock.getsockname()[:2]
            try:
                case.send(ws)
            except OSError:
                pass  # the hub may close before it has read everything
            if case.event == REJ:
                # Refused at HELLO: the close comes first, no WELCOME before it.
                first = ws.recv_message(8)
                assert first.opcode == wsclient.OP_CLOSE, first
                closed = wsclient.parse_close(first.payload)
            else:
                closed = ws.wait_closed(8)
        if case.code is None:
            assert closed.code is None, closed
        else:
            assert closed.code == case.code, closed
        dep.wait_for(lambda: bool(hub_events_for(dep, case.event, peer=peer)), 5,
                     f"{case.event} for {peer}")
        reason = hub_events_for(dep, case.event, peer=peer)[-1]["reason"]
        assert case.reason in reason
        assert arena.rogue_token not in dep.hub_log_text()
        arena.honest.assert_flowing(since)
        assert dep.hub_running()

    def test_refused_upgrades(self, arena: Arena) -> None:
        """
        Without a bearer token (or with another scheme) the upgrade gets 401, without the
        nowconnect.v1 subprotocol 400: nothing is upgraded and no token is logged.
        """
        dep = arena.dep
        assert upgrade_status(dep, None) == 401
        ws, status = wsclient.upgrade(HOST, dep.web_port, token=arena.rogue_token,
                                      headers={"Authorization": f"Basic {arena.rogue_token}"})
        assert (ws, status) == (None, 401)
        ws, status = wsclient.upgrade(HOST, dep.web_port, token=arena.rogue_token,
                                      protocols=("chat",))
        assert (ws, status) == (None, 400)
        ws, status = wsclient.upgrade(HOST, dep.web_port, token=arena.rogue_token, protocols=())
        assert (ws, status) == (None, 400)
        # A success from this address forgets the failures above.
        rogue_upgrade(dep, arena.rogue_token, hello=True).close()
        assert arena.rogue_token not in dep.hub_log_text()

    def test_junk_and_idle_connections_do_not_stop_healthz(self, arena: Arena) -> None:
        """
        With 500 idle TCP connections and several junk or half-sent requests on the tunnel
        port, /healthz still answers 200 within a second, new tunnels are still accepted, the
        non-HTTP junk is answered and closed, and the honest stream keeps flowing.
        """
        dep, since = arena.dep, arena.honest.received
        idle: list[socket.socket] = []
        junk: dict[str, socket.socket] = {}
        try:
            for _ in range(500):
                idle.append(socket.create_connection((HOST, dep.web_port), timeout=5))
            payloads = {
                # A TLS ClientHello to the plain port is just an unfinished line to HTTP.
                "tls_hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x01" * 500,
                "random": os.urandom(4096) + b"\r\n\r\n",
                "zeros": b"\0" * 20000,
                "bad_request_line": b"HELLO THERE\r\n\r\n",
                "half_headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",
                "huge_header": b"GET /healthz HTTP/1.1\r\nX-A: " + b"a" * 200_000,
            }
            for name, data in payloads.items():
                s = socket.create_connection((HOST, dep.web_port), timeout=5)
                with contextlib.suppress(OSError):
                    s.sendall(data)
                junk[name] = s
            start = time.monotonic()
            status, body = dep.http_get("/healthz", timeout=2)
            elapsed = time.monotonic() - start
            assert (status, body) == (200, b'{"status": "ok"}\n')
            assert elapsed < 1.0, f"/healthz took {elapsed:.2f}s"
            rogue_upgrade(dep, arena.rogue_token, hello=True).close()
            for name in ("random", "zeros", "bad_request_line", "huge_header"):
                _, how = read_until_closed(junk[name], 5)
                assert how in ("eof", "reset"), f"{name}: connection still open"
            arena.honest.assert_flowing(since)
        finally:
            for s in idle + list(junk.values()):
                s.close()
        status, _ = dep.http_get("/healthz", timeout=2)
        assert status == 200

    def test_tunnel_path_is_not_an_open_redirect(self, arena: Arena) -> None:
        """
        A GET on /tunnel without an upgrade is refused (4xx): no 3xx to a foreign URL, no
        page naming the WebSocket library and its version.
        """
        for path in ("/tunnel?redirect=https%3A%2F%2Fevil.example%2Flogin",
                     "/tunnel?redirect=https%3A%2F%2Fevil.example%2F&after=0", "/tunnel"):
            conn = http.client.HTTPConnection(HOST, arena.dep.web_port, timeout=5)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
            finally:
                conn.close()
            assert 400 <= resp.status < 500, (path, resp.status, resp.getheader("Location"))
            assert b"evil.example" not in body and b"Autobahn" not in body, path

    def test_refused_agent_never_reports_connection_open(self, arena: Arena) -> None:
        """
        A real agent holding the rogue token but declaring a connector it may not serve is
        refused at HELLO, before any WELCOME: it never logs "connection open" (the runbook's
        success line) and keeps retrying.
        """
        dep = arena.dep
        before = len(hub_events_for(dep, "agent_rejected", agent_id=ROGUE))
        with second_agent(dep, arena.base / "refused", ROGUE, arena.rogue_token,
                          connectors={"echo": f"{HOST}:1"}) as agent:
            agent.start_agent(wait_connected=False)
            dep.wait_for(lambda: len(hub_events_for(dep, "agent_rejected", agent_id=ROGUE))
                         >= before + 2, 10, "the rogue agent refused twice")
            assert len(agent.agent_events("connecting_to_cloud")) >= 2
            agent.stop_agent()
        assert agent.agent_events("tunnel_open") == []

    def test_honest_stream_ends_byte_exact(self, arena: Arena) -> None:
        """
        After every hostile tunnel above, the honest stream half-closes and gets back exactly
        what it sent; its agent was never disconnected.
        """
        honest, dep = arena.honest, arena.dep
        honest.assert_flowing(honest.received)
        honest.finish()
        assert honest.error is None, honest.error
        assert honest.eof and honest.received == honest.sent > 1 << 20
        assert hub_events_for(dep, "agent_disconnected", agent_id="agent-1") == []
        assert dep.agent_events("tunnel_lost") == []
        wait_idle(dep, "echo")


# -- limits ----------------------------------------------------------------------------------------

class TestLimits:
    """Each limit on its own hub: the excess is refused and counted, the rest keep working."""

    def _deployment(self, tmp_path: Path, echo: EchoServer, **kw: Any) -> Deployment:
        return Deployment(tmp_path, {"echo": (HOST, echo.port)}, **kw)

    def _limit_refuses_the_excess(self, dep: Deployment, allowed: int, limit: str) -> None:
        port = dep.listener_port["echo"]
        socks = [connect(port) for _ in range(allowed)]
        try:
            for i, s in enumerate(socks):
                assert echo_round_trip(s, b"hello %d" % i) == b"hello %d" % i
            assert dep.metric(LIMIT_HITS, limit=limit) == 0
            assert refused(port) in ("reset", "eof")
            dep.wait_for(lambda: dep.metric(LIMIT_HITS, limit=limit) == 1, 5,
                         f"limit_hits{{limit={limit}}} == 1")
            assert [e["limit"] for e in dep.hub_events("limit_reached")] == [limit]
            for i, s in enumerate(socks):
                assert echo_round_trip(s, b"still %d" % i) == b"still %d" % i
            # A slot freed is a slot usable again.  The hub closing our socket (EOF) comes
            # after it forgot the connection.
            socks[0].shutdown(socket.SHUT_WR)
            assert read_until_closed(socks[0], 5)[1] == "eof"
        finally:
            socks[0].close()
        wait_for_active(dep, allowed - 1)
        with connect(port) as s:
            assert echo_round_trip(s, b"again") == b"again"
        for s in socks[1:]:
            s.close()
        wait_idle(dep, "echo")

    def test_listener_max_connections(self, tmp_path: Path, echo: EchoServer) -> None:
        """
        C{listeners[].max_connections: 3}: a 4th concurrent client is closed at once and
        counted as C{limit_hits{limit="listener_connections"}}; the 3 keep working.
        """
        listeners = [{"connector": "echo", "bind": HOST, "port": 0, "max_connections": 3}]
        with self._deployment(tmp_path, echo, hub_extra={"listeners": listeners}) as dep:
            dep.start_hub()
            dep.start_agent()
            self._limit_refuses_the_excess(dep, 3, "listener_connections")

    def test_max_streams_per_tunnel(self, tmp_path: Path, echo: EchoServer) -> None:
        """
        C{limits.max_streams_per_tunnel: 2}: a 3rd concurrent client is closed at once and
        counted as C{limit_hits{limit="streams_per_tunnel"}}; the 2 keep working.
        """
        with self._deployment(tmp_path, echo, limits={"max_streams_per_tunnel": 2}) as dep:
            dep.start_hub()
            dep.start_agent()
            self._limit_refuses_the_excess(dep, 2, "streams_per_tunnel")

    def test_idle_timeout_resets_idle_stream_only(self, tmp_path: Path,
                                                  echo: EchoServer) -> None:
        """
        C{limits.idle_timeout: 1}: a stream with no bytes either way is reset after about a
        second and counted as C{limit_hits{limit="idle_timeout"}}; a stream that keeps
        talking (every 0.2 s) stays open past that.
        """
        with self._deployment(tmp_path, echo, limits={"idle_timeout": 1}) as dep:
            dep.start_hub()
            dep.start_agent()
            port = dep.listener_port["echo"]
            with connect(port) as quiet, connect(port) as busy:
                assert echo_round_trip(quiet, b"q") == b"q"
                assert echo_round_trip(busy, b"b") == b"b"
                start = time.monotonic()
                ended: list[tuple[str, float]] = []

                def watch() -> None:
                    _, how = read_until_closed(quiet, 6)
                    ended.append((how, time.monotonic() - start))

                watcher = threading.Thread(target=watch, daemon=True)
                watcher.start()
                while time.monotonic() - start < 2.5:
                    assert echo_round_trip(busy, b"tick") == b"tick"
                    time.sleep(0.2)
                watcher.join(5)
                assert ended and ended[0][0] in ("reset", "eof"), ended
                assert 0.8 <= ended[0][1] <= 2.5, ended
                assert echo_round_trip(busy, b"alive") == b"alive"
                assert dep.metric(LIMIT_HITS, limit="idle_timeout") == 1
            wait_idle(dep, "echo")


def wait_for_active(dep: Deployment, n: int) -> None:
    dep.wait_for(lambda: dep.metric(ACTIVE, connector="echo") == n, 10, f"{n} open streams")


# -- metrics_allow_cidrs ---------------------------------------------------------------------------

def test_metrics_allow_cidrs(tmp_path: Path, echo: EchoServer) -> None:
    """
    C{metrics_allow_cidrs: [10.0.0.0/8]}: /metrics and /readyz answer 403 to 127.0.0.1, also
    when the request claims another address in X-Forwarded-For / X-Real-IP; /healthz still
    answers 200.
    """
    with Deployment(tmp_path, {"echo": (HOST, echo.port)},
                    hub_extra={"metrics_allow_cidrs": ["10.0.0.0/8"]}) as dep:
        dep.start_hub()
        assert dep.http_get("/healthz") == (200, b'{"status": "ok"}\n')
        for path in ("/metrics", "/readyz", "//metrics", "/metrics?format=text"):
            status, body = dep.http_get(path)
            assert (status, body) == (403, b'{"error": "forbidden"}\n'), path
        conn = http.client.HTTPConnection(HOST, dep.web_port, timeout=5)
        try:
            conn.request("GET", "/metrics", headers={"X-Forwarded-For": "10.1.2.3",
                                                     "X-Real-IP": "10.1.2.3",
                                                     "Forwarded": "for=10.1.2.3"})
            resp = conn.getresponse()
            assert resp.status == 403 and b"nowconnect_" not in resp.read()
        finally:
            conn.close()


# -- exclusive agents ------------------------------------------------------------------------------

@pytest.fixture(scope="class")
def exclusive_hub(tmp_path_factory: pytest.TempPathFactory,
        echo: EchoServer) -> Iterator[tuple[Deployment, Path, str]]:
    base = tmp_path_factory.mktemp("exclusive")
    token1, token2 = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    agents = [{"id": "agent-1", "token_sha256": sha(token1), "connectors": ["one"],
               "exclusive": True},
              {"id": "agent-2", "token_sha256": sha(token2), "connectors": ["two"]}]
    with Deployment(base / "dep", {"one": (HOST, echo.port), "two": (HOST, echo.port)},
                    token=token1, hub_extra={"agents": agents},
                    agent_extra={"connectors": {"one": f"{HOST}:{echo.port}"}}) as dep:
        dep.start_hub()
        yield dep, base, token2


class TestExclusive:
    """
    One hub: agent-1 (C{exclusive: true}, connector one) and agent-2 (not exclusive,
    connector two); extra agent processes reuse their ids and tokens.
    """

    def test_exclusive_agent_is_replaced(
            self, exclusive_hub: tuple[Deployment, Path, str]) -> None:
        """
        A second agent-1 process replaces the first: the first's tunnel is closed with a
        reason saying so, and one tunnel serves the connector afterwards.
        """
        dep, base, _ = exclusive_hub
        dep.start_agent()
        assert dep.metric(AGENTS, connector="one") == 1
        with second_agent(dep, base / "agent1b", "agent-1", dep.token) as newer:
            newer.start_agent(wait_connected=False)
            dep.wait_for(lambda: any("replaced" in e.get("reason", "")
                                     for e in dep.agent_events("tunnel_lost")), 15,
                         "the first agent's tunnel closed as replaced")
            # The first agent would reconnect and replace the newer one in turn: stop it.
            dep.stop_agent()
            dep.wait_for(lambda: dep.metric(AGENTS, connector="one") == 1
                         and bool(newer.agent_events("tunnel_open")), 15,
                         "the newer agent-1 serving one alone")
            assert any("replaced" in e.get("reason", "")
                       for e in hub_events_for(dep, "agent_disconnected", agent_id="agent-1"))
            newer.stop_agent()

    def test_non_exclusive_agents_coexist(
            self, exclusive_hub: tuple[Deployment, Path, str]) -> None:
        """Two agent-2 processes (not exclusive) both stay connected: agents_connected == 2."""
        dep, base, token2 = exclusive_hub
        conns = {"connectors": {"two": dep.agent_config()["connectors"]["one"]}}
        with second_agent(dep, base / "agent2a", "agent-2", token2, **conns) as a, \
                second_agent(dep, base / "agent2b", "agent-2", token2, **conns) as b:
            a.start_agent(wait_connected=False)
            b.start_agent(wait_connected=False)
            dep.wait_for(lambda: dep.metric(AGENTS, connector="two") == 2, 15,
                         "two agent-2 tunnels")
            time.sleep(1.5)  # several ping intervals: nobody replaced anybody
            assert dep.metric(AGENTS, connector="two") == 2
            assert a.agent_events("tunnel_lost") == b.agent_events("tunnel_lost") == []
            a.stop_agent()
            b.stop_agent()


# -- insecure hub URL (in process, memory reactor: nothing is sent anywhere) --------------------

def _agent_events_at_start(hub_url: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """
    Start and stop an L{AgentService} for C{hub_url} on a L{MemoryReactorClock}: the log events
    it emitted and the TCP connections it asked the (fake) reactor for.
    """
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import globalLogPublisher

    from nowconnect.agent import make_agent_service
    from nowconnect.config import parse_agent_config

    config = parse_agent_config({"hub_url": hub_url, "agent_id": "a1", "token": "secret-token-1",
                                 "connectors": {"ldap": "127.0.0.1:389"}}, "agent.yaml", {})
    clock = MemoryReactorClock()
    events: list[dict[str, Any]] = []
    observer: Any = events.append  # an ILogObserver: any callable taking the event dict
    globalLogPublisher.addObserver(observer)
    try:
        agent = make_agent_service(config, reactor=clock)
        agent.startService()
        agent.stopService()
        clock.advance(10)
    finally:
        globalLogPublisher.removeObserver(observer)
    return events, list(clock.tcpClients)


@pytest.mark.parametrize("url,warned", [
    ("ws://192.0.2.1:9/tunnel", True),
    ("ws://10.1.2.3:8765/tunnel", True),
    ("ws://127.0.0.1:8765/tunnel", False),
    ("ws://localhost:8765/tunnel", False),
    ("ws://[::1]:8765/tunnel", False),
    ("wss://192.0.2.1:443/tunnel", False),
    ("ws://127.0.0.1.example.net:8765/tunnel", True),
])
def test_insecure_hub_url_warning(url: str, warned: bool) -> None:
    """
    A plain ws:// hub URL that is not loopback logs C{insecure_hub_url} at start (with the
    URL, never the token); loopback and wss:// do not.  The agent only ever dials the memory
    reactor (whose resolver answers 127.0.0.1), so nothing leaves the box.
    """
    events, dials = _agent_events_at_start(url)
    insecure = [e for e in events if e.get("event") == "insecure_hub_url"]
    assert bool(insecure) == warned, insecure
    if warned:
        assert insecure[0]["url"] == url
        assert "wss://" in insecure[0]["advice"]
    assert not any("secret-token-1" in repr(e) for e in events)
    # Only the memory reactor was asked to connect (its resolver answers 127.0.0.1 for all).
    assert all(host == "127.0.0.1" for host, *_ in dials)
