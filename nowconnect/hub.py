"""
The hub: agent registry, connector listeners with their CIDR policy, and the service that
assembles them with the web port.
"""
# -*- test-case-name: tests.test_hub -*-

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.websocket.types import ConnectionDeny
from twisted.application.service import MultiService
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.protocols.tls import TLSMemoryBIOFactory

from nowconnect import logs, wire
from nowconnect.config import AgentAuth, HubConfig, ListenerConfig
from nowconnect.endpoints import ListenerService, listen_service, tcp_endpoint_string
from nowconnect.metrics import Metrics
from nowconnect.observer import StreamObserver
from nowconnect.relay import StreamRelay
from nowconnect.shutdown import drain
from nowconnect.stream import Phase
from nowconnect.throttle import AuthThrottle
from nowconnect.tls import certificate_names, hub_tls_options
from nowconnect.tunnel import HubTunnelFactory, HubTunnelProtocol, Rejected
from nowconnect.web import WebApp

_log = Logger(namespace="nowconnect.hub")


class Registry:
    """
    Connector -> the live tunnels serving it.  Several tunnels per connector (several agents,
    or one agent id connected twice) are normal; new streams go to the least-loaded one.
    """

    def __init__(self, metrics: Metrics, max_streams: int) -> None:
        self._metrics = metrics
        self._max_streams = max_streams
        self._by_connector: dict[str, list[HubTunnelProtocol]] = {}

    def add(self, tunnel: HubTunnelProtocol, connectors: tuple[str, ...]) -> None:
        for connector in connectors:
            self._by_connector.setdefault(connector, []).append(tunnel)
            self._metrics.child(self._metrics.agents_connected, connector).inc()

    def remove(self, tunnel: HubTunnelProtocol, connectors: tuple[str, ...]) -> None:
        for connector in connectors:
            tunnels = self._by_connector.get(connector, [])
            if tunnel in tunnels:
                tunnels.remove(tunnel)
                self._metrics.child(self._metrics.agents_connected, connector).dec()

    def tunnels(self, connector: str) -> list[HubTunnelProtocol]:
        return list(self._by_connector.get(connector, ()))

    def all_tunnels(self) -> list[HubTunnelProtocol]:
        seen: dict[int, HubTunnelProtocol] = {}
        for tunnels in self._by_connector.values():
            for t in tunnels:
                seen[id(t)] = t
        return list(seen.values())

    def pick(self, connector: str) -> tuple[HubTunnelProtocol | None, bool]:
        """
        The least-loaded tunnel for C{connector}, and whether any tunnel exists at all
        (False means "no agent"; (None, True) means every tunnel is at its stream limit).
        """
        best: HubTunnelProtocol | None = None
        best_load = 0
        tunnels = self._by_connector.get(connector)
        if not tunnels:
            return None, False
        for tunnel in tunnels:
            mux = tunnel.mux
            if mux is None:
                continue
            load = mux.stream_count()
            if load >= self._max_streams:
                continue
            if best is None or load < best_load:
                best, best_load = tunnel, load
        return best, True


class ClientRelay(TimeoutMixin, StreamRelay):
    """
    A client of a hub listener: policy checks, then one stream on the chosen tunnel.  A stream
    with no bytes either way for C{idle_timeout} is reset (the default is above AD's 900 s, so
    the directory closes idle LDAP connections first).
    """

    factory: ClientFactory
    _open_timer: Any = None

    def connectionMade(self) -> None:
        f = self.factory
        hub, listener = f.hub, f.listener
        peer = self.transport.getPeer()
        client = f"{peer.host}:{peer.port}"
        connector = listener.connector
        m = hub.metrics
        if not hub.client_allowed(listener, peer.host):
            m.child(m.open_failures, connector, "cidr_blocked").inc()
            logs.emit(_log, "warn", logs.CIDR_BLOCKED, "connector={connector} client={client}",
                      connector=connector, client=client)
            self.transport.abortConnection()
            return
        if f.active >= listener.max_connections:
            m.child(m.open_failures, connector, "limit").inc()
            m.child(m.limit_hits, "listener_connections").inc()
            logs.emit(_log, "warn", logs.LIMIT_REACHED,
                      "limit={limit} connector={connector} client={client}",
                      limit="listener_connections", connector=connector, client=client)
            self.transport.abortConnection()
            return
        tunnel, any_agent = hub.registry.pick(connector)
        if tunnel is None or tunnel.mux is None:
            reason = "limit" if any_agent else "no_agent"
            m.child(m.open_failures, connector, reason).inc()
            if any_agent:
                m.child(m.limit_hits, "streams_per_tunnel").inc()
                logs.emit(_log, "warn", logs.LIMIT_REACHED,
                          "limit={limit} connector={connector} client={client}",
                          limit="streams_per_tunnel", connector=connector, client=client)
            else:
                logs.emit(_log, "warn", logs.NO_AGENT_FOR_CONNECTOR,
                          "connector={connector} client={client}",
                          connector=connector, client=client)
            self.transport.abortConnection()
            return
        f.active += 1
        self._counted = True
        StreamRelay.connectionMade(self)
        mux = tunnel.mux
        self.bind(mux, mux.open_stream(connector, client, self))
        self._open_timer = hub.clock.callLater(hub.config.limits.open_timeout, self._open_timeout)
        idle = hub.config.limits.idle_timeout
        if idle > 0:
            self.callLater = hub.clock.callLater  # type: ignore[method-assign]
            self.setTimeout(idle)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        StreamRelay.dataReceived(self, data)

    def write(self, data: bytes) -> None:
        self.resetTimeout()
        StreamRelay.write(self, data)

    def timeoutConnection(self) -> None:
        mux = self.mux
        if mux is not None:
            self.factory.hub.metrics.child(self.factory.hub.metrics.limit_hits,
                                           "idle_timeout").inc()
            mux.reset(self.stream_id, wire.ResetCode.idle_timeout, "stream idle")

    def _open_timeout(self) -> None:
        self._open_timer = None
        mux = self.mux
        if mux is None:
            return
        stream = mux.stream(self.stream_id)
        if stream is not None and stream.phase is Phase.CONNECTING:
            mux.reset(self.stream_id, wire.ResetCode.open_timeout, "agent did not connect in time")

    def connectionLost(self, reason: Any = None) -> None:
        self.setTimeout(None)
        if self._open_timer is not None and self._open_timer.active():
            self._open_timer.cancel()
        self._open_timer = None
        if getattr(self, "_counted", False):
            self.factory.active -= 1
            self._counted = False
        if reason is None:
            StreamRelay.connectionLost(self)
        else:
            StreamRelay.connectionLost(self, reason)


class ClientFactory(Factory):
    protocol = ClientRelay  # type: ignore[assignment]
    noisy = False

    def __init__(self, hub: HubService, listener: ListenerConfig) -> None:
        self.hub = hub
        self.listener = listener
        self.active = 0


class HubService(MultiService):
    """
    The whole hub: the web port (tunnel, health, metrics) and one listener per configured
    connector.  Stopping drains: listeners close first, open streams get C{drain_seconds} to
    finish, the rest are reset, then tunnels close.
    """

    def __init__(self, config: HubConfig, reactor: Any, metrics: Metrics | None = None) -> None:
        MultiService.__init__(self)
        self.config = config
        self.clock = reactor
        self.metrics = metrics if metrics is not None else Metrics()
        self.registry = Registry(self.metrics, config.limits.max_streams_per_tunnel)
        self.observer = StreamObserver(self.metrics, reactor, _log, hub=True)
        self.initial_window = config.limits.initial_window
        self.max_frame = config.limits.max_frame
        self.max_pending = config.limits.max_pending_bytes_per_tunnel
        self.handshake_timeout = config.limits.handshake_timeout
        self._cidr_cache: OrderedDict[tuple[int, str], bool] = OrderedDict()
        self._throttle = AuthThrottle(config.limits.auth_failures_before_backoff,
                                      config.limits.auth_backoff_max)
        self.listeners: list[ListenerService] = []
        self.web_port: IListeningPort | None = None
        self._tunnel_agents: dict[int, tuple[str, tuple[str, ...]]] = {}

        for connector in config.connectors():
            self.metrics.declare_connector(connector)

        tunnel_factory = HubTunnelFactory(self, config.limits.ping_interval,
                                          config.limits.ping_timeout)
        web = WebApp(
            self.metrics,
            unready=self.connectors_without_agent,
            tunnel=WebSocketResource(tunnel_factory),
            metrics_allow=config.metrics_allow_cidrs,
        )
        site: Any = web.site(reactor)
        if config.tls_cert is not None and config.tls_key is not None:
            site = TLSMemoryBIOFactory(
                hub_tls_options(config.tls_cert, config.tls_key, config.client_ca), False, site
            )
        self.web = listen_service(reactor, f"{config.source}: listen: {config.listen}",
                                  config.listen, site,
                                  self._web_listening)
        self.web.setServiceParent(self)
        for index, listener in enumerate(config.listeners):
            svc = listen_service(
                reactor,
                f"{config.source}: listeners[{index}]: {listener.connector} on "
                f"{listener.bind}:{listener.port}",
                tcp_endpoint_string(listener.bind, listener.port),
                ClientFactory(self, listener),
                functools.partial(self._listener_started, listener),
            )
            svc.setServiceParent(self)
            self.listeners.append(svc)

    # -- start-up ------------------------------------------------------------------------------

    def _web_listening(self, port: IListeningPort) -> None:
        self.web_port = port
        addr = port.getHost()
        logs.emit(_log, "info", logs.WEB_STARTED, "listen={listen} host={host} port={port}",
                  listen=self.config.listen, host=getattr(addr, "host", ""),
                  port=getattr(addr, "port", 0))

    def _listener_started(self, listener: ListenerConfig, port: IListeningPort) -> None:
        addr = port.getHost()
        logs.emit(
            _log, "info", logs.LISTENER_STARTED,
            "connector={connector} bind={bind} port={port} allow_cidrs={allow_cidrs}",
            connector=listener.connector, bind=listener.bind, port=getattr(addr, "port", 0),
            allow_cidrs=(
                "any" if listener.allow_all else ",".join(str(n) for n in listener.allow_cidrs)
            ),
        )

    # -- policy --------------------------------------------------------------------------------

    def client_allowed(self, listener: ListenerConfig, host: str) -> bool:
        """CIDR verdict, cached per (listener, address): bounded, since clients repeat."""
        if listener.allow_all:
            return True
        key = (id(listener), host)
        verdict = self._cidr_cache.get(key)
        if verdict is None:
            verdict = listener.allows(host)
            self._cidr_cache[key] = verdict
            if len(self._cidr_cache) > 4096:
                self._cidr_cache.popitem(last=False)
        return verdict

    def connectors_without_agent(self) -> list[str]:
        return [c for c in self.config.connectors() if not self.registry.tunnels(c)]

    # -- HubHost (the tunnel protocol's view of the hub) ---------------------------------------

    def authenticate(self, authorization: str | None, peer: str,
                     certificate: Any = None) -> AgentAuth:
        """
        The agent whose token the C{Authorization} header carries.  Every configured token is
        compared, in constant time, so timing says nothing about which one almost matched.
        Failures per source address back off (429 while blocked).  With mutual TLS an agent
        that has a C{cert_identity} must also present a certificate naming it.
        """
        host = peer.rpartition(":")[0] or peer
        now = self.clock.seconds()
        wait = self._throttle.blocked_for(host, now)
        if wait > 0:
            self.metrics.child(self.metrics.limit_hits, "auth_failures").inc()
            if self._throttle.should_log_block(host):
                self._reject(peer, "", f"rate limited for {wait:.0f}s after repeated failures",
                             "rate_limited")
            raise ConnectionDeny(429, "too many failed attempts; retry later")
        token = ""
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer":
                token = value.strip()
        if not token:
            self._auth_failed(host, peer, "missing bearer token", "missing_token")
            raise ConnectionDeny(401, "bearer token required")
        found: AgentAuth | None = None
        for agent in self.config.agents:
            if agent.token_matches(token) and found is None:
                found = agent
        if found is None:
            self._auth_failed(host, peer, "bad token", "bad_token")
            raise ConnectionDeny(403, "token refused")
        if found.cert_identity is not None and not certificate_names(
            certificate, found.cert_identity
        ):
            self._auth_failed(host, peer, f"client certificate does not name {found.id}",
                              "certificate_mismatch")
            raise ConnectionDeny(403, "client certificate refused")
        self._throttle.succeeded(host)
        return found

    def _auth_failed(self, host: str, peer: str, reason: str, label: str) -> None:
        self._reject(peer, "", reason, label)
        self._throttle.failed(host, self.clock.seconds())

    def tunnel_ready(self, tunnel: HubTunnelProtocol, hello: wire.Hello) -> None:
        auth: AgentAuth = tunnel.auth
        if hello.agent_id != auth.id:
            raise Rejected(f"agent id {hello.agent_id!r} does not match its token",
                           "agent_id_mismatch")
        if hello.protocol != wire.PROTOCOL_VERSION:
            raise Rejected(f"unsupported protocol version {hello.protocol}", "bad_version")
        undeclared = sorted(set(hello.connectors) - set(auth.connectors))
        if undeclared:
            raise Rejected(f"not authorized for connectors {','.join(undeclared)}",
                           "unauthorized_connector")
        if not hello.connectors:
            raise Rejected("HELLO declares no connectors", "no_connectors")
        connectors = tuple(
            dict.fromkeys(c for c in hello.connectors if c in self.config.connectors())
        )
        if auth.exclusive:
            for other in self.registry.all_tunnels():
                if other is not tunnel and self._tunnel_agents.get(id(other), ("",))[0] == auth.id:
                    other.close("replaced by a newer tunnel of the same agent")
        self.registry.add(tunnel, connectors)
        self._tunnel_agents[id(tunnel)] = (auth.id, connectors)
        self.metrics.child(self.metrics.tunnel_connects, auth.id).inc()
        logs.emit(
            _log, "info", logs.AGENT_CONNECTED,
            "agent_id={agent_id} connectors={connectors} peer={peer} version={version} "
            "frame_masking={frame_masking}",
            agent_id=auth.id, connectors=list(connectors), peer=tunnel.peer_text,
            version=hello.version, frame_masking=tunnel.frame_masking,
        )

    def tunnel_closed(self, tunnel: HubTunnelProtocol, reason: str, label: str) -> None:
        agent_id, connectors = self._tunnel_agents.pop(id(tunnel), ("", ()))
        self.registry.remove(tunnel, connectors)
        self.metrics.child(self.metrics.tunnel_disconnects, agent_id, label).inc()
        logs.emit(
            _log, "info", logs.AGENT_DISCONNECTED,
            "agent_id={agent_id} connectors={connectors} peer={peer} reason={reason}",
            agent_id=agent_id, connectors=list(connectors), peer=tunnel.peer_text, reason=reason,
        )

    def tunnel_rejected(self, peer: str, agent_id: str, reason: str, label: str) -> None:
        self._reject(peer, agent_id, reason, label)

    def _reject(self, peer: str, agent_id: str, reason: str, label: str) -> None:
        self.metrics.child(self.metrics.agent_rejections, label).inc()
        logs.emit(_log, "warn", logs.AGENT_REJECTED,
                  "peer={peer} agent_id={agent_id} reason={reason}",
                  peer=peer, agent_id=agent_id, reason=reason)

    # -- shutdown ------------------------------------------------------------------------------

    def active_streams(self) -> int:
        return sum(t.mux.stream_count() for t in self.registry.all_tunnels() if t.mux is not None)

    @inlineCallbacks
    def stopService(self) -> Any:
        self.running = False
        yield DeferredList([svc.stop_accepting() for svc in self.listeners])
        left = yield drain(self.clock, self.active_streams, self.config.drain_seconds, _log)
        for tunnel in self.registry.all_tunnels():
            try:
                if tunnel.mux is not None:
                    for stream in tunnel.mux.streams():
                        tunnel.mux.reset(stream.stream_id, wire.ResetCode.shutdown,
                                         "hub stopping")
                tunnel.close("hub stopping")
            except Exception:
                _log.failure("tunnel_error while closing a tunnel at shutdown",
                             event=logs.TUNNEL_ERROR)
        logs.emit(_log, "info", logs.DRAIN_FINISHED, "reset={reset}", reset=left)
        yield MultiService.stopService(self)


def make_hub_service(
    config: HubConfig, reactor: Any = None, metrics: Metrics | None = None
) -> HubService:
    """Assemble a hub from config; C{reactor=None} means the global reactor."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return HubService(config, reactor, metrics)
