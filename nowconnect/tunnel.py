"""
Thin Autobahn glue: the hub's and the agent's end of one tunnel.

Bytes in go to L{wire.decode_message} and then to the L{mux.Mux}; frames out are collected from
the mux once per reactor turn and sent as one binary message.  Everything else (who may connect,
what a stream does) lives in the hub, the agent and the mux.  Every Autobahn callback catches
its own exceptions, logs them and closes only this tunnel.
"""
# -*- test-case-name: tests.test_tunnel -*-

from __future__ import annotations

from typing import Any, Callable, Protocol

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest, ConnectionResponse
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
)
from twisted.logger import Logger
from zope.interface import implementer

from nowconnect import __version__, logs, wire
from nowconnect.fastwrite import write_through
from nowconnect.mux import AGENT, HUB, Acceptor, Mux, MuxObserver

#: WebSocket close codes.  An endpoint may only send 1000 or 3000-4999 (RFC 6455 section 7.4;
#: Autobahn enforces it), so ours live in the private 4000 range.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 4000
CLOSE_REJECTED = 4001
CLOSE_HANDSHAKE_TIMEOUT = 4002
CLOSE_PROTOCOL_ERROR = 4003
CLOSE_INTERNAL = 4004

#: Client-frame masking (RFC 6455 section 5.3) keeps a plaintext WebSocket's payload from
#: poisoning intermediaries' caches.  Inside TLS no intermediary sees the bytes, and masking
#: costs the agent->hub direction about a third of its throughput, so an agent on wss:// asks
#: to skip it and a hub serving TLS agrees in the upgrade response.  Plain ws:// always masks.
MASKING_HEADER = "NowConnect-Frame-Masking"

#: Closed label values for C{nowconnect_tunnel_disconnects_total{reason}}.
CLOSE_LABELS = {
    CLOSE_GOING_AWAY: "shutdown",
    CLOSE_REJECTED: "rejected",
    CLOSE_HANDSHAKE_TIMEOUT: "handshake_timeout",
    CLOSE_PROTOCOL_ERROR: "protocol_error",
    CLOSE_INTERNAL: "internal_error",
}


class Rejected(Exception):
    """
    The hub refuses this agent's HELLO; the message is the logged and sent reason, C{label}
    the closed-set value for metrics.
    """

    def __init__(self, reason: str, label: str) -> None:
        Exception.__init__(self, reason)
        self.label = label


def _common_options(factory: WebSocketServerFactory | WebSocketClientFactory, max_message: int,
                    ping_interval: float, ping_timeout: float) -> None:
    # Binary frames only: no compression, no UTF-8 validation, no auto-fragmentation.
    factory.setProtocolOptions(
        utf8validateIncoming=False,
        autoFragmentSize=0,
        maxFramePayloadSize=max_message,
        maxMessagePayloadSize=max_message,
        autoPingInterval=ping_interval,
        autoPingTimeout=ping_timeout,
        tcpNoDelay=True,
        closeHandshakeTimeout=2,
    )


@implementer(IPushProducer)
class _LinkProducer:
    """Registered on the tunnel's transport: its write buffer pausing pauses every stream."""

    def __init__(self, mux_of: Callable[[], Mux | None]) -> None:
        self._mux_of = mux_of

    def pauseProducing(self) -> None:
        mux = self._mux_of()
        if mux is not None:
            mux.link_paused()

    def resumeProducing(self) -> None:
        mux = self._mux_of()
        if mux is not None:
            mux.link_resumed()

    def stopProducing(self) -> None:
        pass


class _TunnelMixin:
    """What both ends share: batching output per reactor turn and failing one tunnel."""

    _log = Logger()
    mux: Mux | None = None
    _flush_call: IDelayedCall | None = None
    _closing_reason: str = ""
    _closing_code: int = 0

    # Provided by the Autobahn protocol classes.
    transport: Any
    sendMessage: Callable[..., None]
    sendClose: Callable[..., None]
    beginMessage: Callable[..., None]
    beginMessageFrame: Callable[[int], None]
    sendMessageFrameData: Callable[..., Any]
    endMessage: Callable[[], None]
    send_queue: Any

    def _clock(self) -> Any:
        raise NotImplementedError

    def _wake(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._clock().callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        if self.mux is None:
            return
        for chunks in self.mux.take_output_chunks():
            if len(chunks) == 1:
                self.sendMessage(chunks[0], isBinary=True)
                continue
            # Autobahn's streaming API writes each chunk as it is (masked on the agent): large
            # payloads reach the transport without being joined into one message first.
            self.beginMessage(isBinary=True)
            self.beginMessageFrame(sum(len(c) for c in chunks))
            for chunk in chunks:
                self.sendMessageFrameData(chunk)
            self.endMessage()

    # Receiving.  Autobahn's frame hooks, not onMessage: DATA frames are decoded as the bytes
    # arrive, with no join of the whole message and no Deferred per message.  Only the first
    # message (HELLO or WELCOME, small) is collected whole.

    _binary = True
    _decoder: wire.FrameDecoder | None = None
    _handshake_chunks: list[bytes]
    _handshake_size = 0
    failedByMe: bool

    def _awaiting_handshake(self) -> bool:
        raise NotImplementedError

    def _handshake(self, payload: bytes) -> None:
        raise NotImplementedError

    def _log_protocol_error(self, reason: str) -> None:
        raise NotImplementedError

    def onMessageBegin(self, isBinary: bool) -> None:
        # Autobahn's bookkeeping (message size limits) runs in its own onMessageBegin.
        super().onMessageBegin(isBinary)  # type: ignore[misc]
        self._binary = isBinary
        self._handshake_chunks = []
        self._handshake_size = 0

    def onMessageFrameData(self, payload: bytes) -> None:
        if self.failedByMe or self._closing_reason:
            return
        self._guarded(self._frame_data, payload)

    def _frame_data(self, payload: bytes) -> None:
        if not self._binary:
            raise wire.ProtocolError("text message on the tunnel")
        mux = self.mux
        if mux is not None and self._decoder is not None:
            mux.receive(self._decoder.feed(payload))
        elif self._awaiting_handshake():
            self._handshake_size += len(payload)
            if self._handshake_size > wire.HEADER_SIZE + wire.MAX_CONTROL_PAYLOAD:
                raise wire.ProtocolError("handshake message too long")
            self._handshake_chunks.append(payload)

    def onMessageEnd(self) -> None:
        if self.failedByMe or self._closing_reason:
            return
        self._guarded(self._message_end, b"")

    def _message_end(self, _: bytes) -> None:
        if not self._binary:
            raise wire.ProtocolError("text message on the tunnel")
        if self.mux is not None and self._decoder is not None:
            if self._decoder.pending():
                raise wire.ProtocolError("message ends in the middle of a frame")
        elif self._awaiting_handshake():
            chunks, self._handshake_chunks = self._handshake_chunks, []
            self._handshake(b"".join(chunks))
            if self.mux is not None:
                self._decoder = wire.FrameDecoder(self.mux.max_frame)

    def _guarded(self, step: Callable[[bytes], None], payload: bytes) -> None:
        """Run one receive step; a protocol error or a bug closes this tunnel only."""
        try:
            step(payload)
        except wire.ProtocolError as e:
            self._log_protocol_error(str(e))
            self._fail(CLOSE_PROTOCOL_ERROR, str(e))
        except Exception:
            self._log.failure("tunnel_error while receiving", event=logs.TUNNEL_ERROR)
            self._fail(CLOSE_INTERNAL, "internal error")

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Autobahn's own queue (sync sends, chopping) keeps its path; everything else goes
        # straight to the socket when nothing is queued (see nowconnect.fastwrite).
        if sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
        else:
            write_through(self.transport, data)

    def _register_link_producer(self) -> None:
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        if getattr(transport, "producer", None) is not None:
            # Twisted Web's HTTPChannel registered itself before Autobahn took the transport.
            transport.unregisterProducer()
        transport.registerProducer(_LinkProducer(lambda: self.mux), True)

    _handshake_timer: IDelayedCall | None = None

    def _start_handshake_timer(self, seconds: float, on_timeout: Callable[[], None]) -> None:
        """The peer must finish HELLO/WELCOME within C{seconds}."""
        self._handshake_timer = self._clock().callLater(seconds, on_timeout)

    def _stop_handshake_timer(self) -> None:
        timer, self._handshake_timer = self._handshake_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _fail(self, code: int, reason: str) -> None:
        """Close this tunnel; its streams are reset when the close completes."""
        if not self._closing_reason:
            self._closing_reason = reason
            self._closing_code = code
        self.sendClose(code, reason[:120])

    def _close_label(self, was_clean: bool, peer_code: int | None) -> str:
        """Why this tunnel ended, as a closed-set metrics label."""
        if self._closing_code:
            return CLOSE_LABELS.get(self._closing_code, "other")
        if "ping timeout" in (getattr(self, "wasNotCleanReason", None) or ""):
            return "ping_timeout"
        if peer_code == CLOSE_GOING_AWAY:
            return "peer_shutdown"
        if peer_code in CLOSE_LABELS:
            return "peer_" + CLOSE_LABELS[peer_code]
        return "closed_by_peer" if was_clean else "connection_lost"

    def close(self, reason: str) -> None:
        """Close this tunnel on purpose (shutdown): the peer sees a going-away close."""
        self._flush()  # RSTs queued for this turn go out before the close frame
        self._fail(CLOSE_GOING_AWAY, reason)

    def _drop_mux(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        mux, self.mux = self.mux, None
        if mux is not None:
            mux.close_all()


class HubHost(Protocol):
    """What the hub's tunnel protocol needs from the hub."""

    clock: Any
    initial_window: int
    max_frame: int
    max_pending: int
    handshake_timeout: float

    @property
    def observer(self) -> MuxObserver: ...

    def authenticate(self, authorization: str | None, peer: str, certificate: Any) -> Any: ...

    def tunnel_ready(self, tunnel: HubTunnelProtocol, hello: wire.Hello) -> None: ...

    def tunnel_closed(self, tunnel: HubTunnelProtocol, reason: str, label: str) -> None: ...

    def tunnel_rejected(self, peer: str, agent_id: str, reason: str, label: str) -> None: ...


class HubTunnelProtocol(_TunnelMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """The hub's end: authenticates the upgrade, waits for HELLO, then runs the mux."""

    factory: HubTunnelFactory
    auth: Any = None
    frame_masking = "on"
    hello: wire.Hello | None = None
    peer_text: str = ""
    _registered = False

    def _clock(self) -> Any:
        return self.factory.host.clock

    def onConnect(self, request: ConnectionRequest) -> str:
        self.peer_text = _peer_text(self.transport)
        if wire.SUBPROTOCOL not in request.protocols:
            self.factory.host.tunnel_rejected(self.peer_text, "", "missing subprotocol",
                                              "bad_subprotocol")
            raise ConnectionDeny(400, f"subprotocol {wire.SUBPROTOCOL} required")
        try:
            self.auth = self.factory.host.authenticate(
                request.headers.get("authorization"),
                self.peer_text,
                _peer_certificate(self.transport),
            )
        except ConnectionDeny:
            raise
        except Exception:
            self._log.failure("tunnel_error during authentication", event=logs.TUNNEL_ERROR)
            raise ConnectionDeny(500, "internal error") from None
        if (request.headers.get(MASKING_HEADER.lower()) == "off"
                and ISSLTransport.providedBy(self.transport)):
            self.requireMaskedClientFrames = False
            self.frame_masking = "off"
            return wire.SUBPROTOCOL, {MASKING_HEADER: "off"}  # type: ignore[return-value]
        return wire.SUBPROTOCOL

    def onOpen(self) -> None:
        try:
            self._register_link_producer()
            host = self.factory.host
            self._start_handshake_timer(host.handshake_timeout, self._hello_timeout)
        except Exception:
            self._log.failure("tunnel_error in onOpen", event=logs.TUNNEL_ERROR)
            self._fail(CLOSE_INTERNAL, "internal error")

    def _hello_timeout(self) -> None:
        self._handshake_timer = None
        self.factory.host.tunnel_rejected(self.peer_text, "", "no HELLO in time",
                                          "handshake_timeout")
        self._fail(CLOSE_HANDSHAKE_TIMEOUT, "no HELLO in time")

    def _awaiting_handshake(self) -> bool:
        return self.hello is None

    def _handshake(self, payload: bytes) -> None:
        self._on_hello(payload)

    def _log_protocol_error(self, reason: str) -> None:
        logs.emit(
            self._log, "warn", logs.TUNNEL_PROTOCOL_ERROR,
            "agent={agent} peer={peer} reason={reason}",
            agent=self.hello.agent_id if self.hello else "", peer=self.peer_text, reason=reason,
        )

    def _on_hello(self, payload: bytes) -> None:
        host = self.factory.host
        frames = wire.decode_message(payload, wire.MAX_CONTROL_PAYLOAD)
        if len(frames) != 1 or not isinstance(frames[0], wire.Hello):
            raise wire.ProtocolError("first message must be a single HELLO")
        hello = frames[0]
        self._stop_handshake_timer()
        self.hello = hello
        self.mux = Mux(
            HUB,
            window=host.initial_window,
            max_frame=host.max_frame,
            clock=host.clock,
            wake=self._wake,
            observer=host.observer,
            max_pending=host.max_pending,
        )
        try:
            host.tunnel_ready(self, hello)
        except Rejected as e:
            # Refused before WELCOME: the agent never sees itself as connected, so its
            # reconnect backoff keeps growing.
            self.mux = None
            host.tunnel_rejected(self.peer_text, hello.agent_id, str(e), e.label)
            self._fail(CLOSE_REJECTED, str(e))
            return
        self._registered = True
        # Registered and welcomed in the same turn: any OPEN goes out after WELCOME.
        self.sendMessage(
            wire.encode(wire.Welcome(host.initial_window, host.max_frame)), isBinary=True
        )

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        try:
            self._stop_handshake_timer()
            self._drop_mux()
            if self._registered:
                self._registered = False
                why = self._closing_reason or reason or getattr(self, "wasNotCleanReason", "")
                self.factory.host.tunnel_closed(self, why or "closed",
                                                self._close_label(wasClean, code))
        except Exception:
            self._log.failure("tunnel_error in onClose", event=logs.TUNNEL_ERROR)


class HubTunnelFactory(WebSocketServerFactory):
    protocol = HubTunnelProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, host: HubHost, ping_interval: float, ping_timeout: float) -> None:
        WebSocketServerFactory.__init__(self, protocols=[wire.SUBPROTOCOL],
                                        server=f"NowConnect/{__version__}")
        self.host = host
        _common_options(self, 2 * (4 * 1024 * 1024 + host.max_frame), ping_interval,
                        ping_timeout)
        # webStatus off: a plain GET must not get Autobahn's status page (it names versions
        # and follows ?redirect=, an open redirect); it gets 426 Upgrade Required.
        self.setProtocolOptions(openHandshakeTimeout=host.handshake_timeout,
                                requireMaskedClientFrames=True, webStatus=False)


class AgentTunnelProtocol(_TunnelMixin, WebSocketClientProtocol):  # type: ignore[misc]
    """
    The agent's end: sends HELLO, waits for WELCOME, then runs the mux.  L{when_ready} fires
    once the hub has welcomed us (ClientService's prepareConnection), or fails if the tunnel
    closes first.
    """

    factory: AgentTunnelFactory

    def __init__(self) -> None:
        WebSocketClientProtocol.__init__(self)
        self._ready: Deferred[AgentTunnelProtocol] = Deferred()
        self._closed: Deferred[None] = Deferred()
        self._is_ready = False

    def _clock(self) -> Any:
        return self.factory.clock

    def when_ready(self) -> Deferred[AgentTunnelProtocol]:
        return self._ready

    def when_closed(self) -> Deferred[None]:
        return self._closed

    def onConnect(self, response: ConnectionResponse) -> None:
        if response.protocol != wire.SUBPROTOCOL:
            raise Exception(f"hub did not accept subprotocol {wire.SUBPROTOCOL}")
        if (response.headers.get(MASKING_HEADER.lower()) == "off"
                and ISSLTransport.providedBy(self.transport)):
            self.maskClientFrames = False

    def onOpen(self) -> None:
        try:
            self._register_link_producer()
            f = self.factory
            hello = wire.Hello(f.agent_id, f.connectors, __version__)
            self.sendMessage(wire.encode(hello), isBinary=True)
            self._start_handshake_timer(f.handshake_timeout, self._welcome_timeout)
        except Exception:
            self._log.failure("tunnel_error in onOpen", event=logs.TUNNEL_ERROR)
            self._fail(CLOSE_INTERNAL, "internal error")

    def _welcome_timeout(self) -> None:
        self._handshake_timer = None
        self._fail(CLOSE_HANDSHAKE_TIMEOUT, "no WELCOME in time")

    def _awaiting_handshake(self) -> bool:
        return not self._is_ready

    def _handshake(self, payload: bytes) -> None:
        self._on_welcome(payload)

    def _log_protocol_error(self, reason: str) -> None:
        logs.emit(self._log, "warn", logs.TUNNEL_PROTOCOL_ERROR, "hub={hub} reason={reason}",
                  hub=self.factory.url, reason=reason)

    def _on_welcome(self, payload: bytes) -> None:
        frames = wire.decode_message(payload, wire.MAX_CONTROL_PAYLOAD)
        if len(frames) != 1 or not isinstance(frames[0], wire.Welcome):
            raise wire.ProtocolError("first message from the hub must be a single WELCOME")
        welcome = frames[0]
        self._stop_handshake_timer()
        f = self.factory
        self.mux = Mux(
            AGENT,
            window=welcome.initial_window,
            max_frame=welcome.max_frame,
            clock=f.clock,
            wake=self._wake,
            observer=f.observer,
            acceptor=f.acceptor_for(self),
            connectors=frozenset(f.connectors),
            max_pending=f.max_pending,
        )
        self._is_ready = True
        f.tunnel_ready(self)
        self._ready.callback(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        try:
            self._stop_handshake_timer()
            self._drop_mux()
            why = self._closing_reason or reason or getattr(self, "wasNotCleanReason", "") or ""
            if not self._is_ready:
                self._ready.errback(ConnectionError(f"tunnel closed before WELCOME: {why}"))
                self._ready.addErrback(lambda f: None)
                why = f"closed before WELCOME: {why or 'closed'}"
            self.factory.tunnel_closed(self, why or "closed", self._is_ready)
            self._closed.callback(None)
        except Exception:
            self._log.failure("tunnel_error in onClose", event=logs.TUNNEL_ERROR)


class AgentHost(Protocol):
    def tunnel_ready(self, tunnel: AgentTunnelProtocol) -> None: ...

    def tunnel_closed(self, tunnel: AgentTunnelProtocol, reason: str, was_ready: bool) -> None:
        ...

    def acceptor_for(self, tunnel: AgentTunnelProtocol) -> Acceptor: ...


class AgentTunnelFactory(WebSocketClientFactory):
    protocol = AgentTunnelProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        url: str,
        token: str,
        agent_id: str,
        connectors: tuple[str, ...],
        *,
        clock: Any,
        observer: MuxObserver,
        host: AgentHost,
        handshake_timeout: float = 10.0,
        ping_interval: float = 15.0,
        ping_timeout: float = 45.0,
        always_mask: bool = False,
        max_pending: int = 256 * 1024 * 1024,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        if url.startswith("wss://") and not always_mask:
            headers[MASKING_HEADER] = "off"
        WebSocketClientFactory.__init__(
            self,
            url,
            protocols=[wire.SUBPROTOCOL],
            headers=headers,
            useragent=f"NowConnect-agent/{__version__}",
        )
        self.agent_id = agent_id
        self.connectors = connectors
        self.clock = clock
        self.observer = observer
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self._host = host
        _common_options(self, 64 * 1024 * 1024, ping_interval, ping_timeout)
        # Masking stays on until the hub agrees to drop it (onConnect).
        self.setProtocolOptions(openHandshakeTimeout=handshake_timeout, maskClientFrames=True)

    def __repr__(self) -> str:
        # Autobahn's default repr would include the headers, and so the token.
        return f"<AgentTunnelFactory {self.url} agent={self.agent_id}>"

    def acceptor_for(self, tunnel: AgentTunnelProtocol) -> Acceptor:
        return self._host.acceptor_for(tunnel)

    def tunnel_ready(self, tunnel: AgentTunnelProtocol) -> None:
        self._host.tunnel_ready(tunnel)

    def tunnel_closed(self, tunnel: AgentTunnelProtocol, reason: str, was_ready: bool) -> None:
        self._host.tunnel_closed(tunnel, reason, was_ready)


def _peer_text(transport: Any) -> str:
    try:
        peer = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "unknown"


def _peer_certificate(transport: Any) -> Any:
    """The TLS client certificate of the tunnel's connection, or None (plain TCP, none sent)."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        return get()
    except Exception:
        return None
