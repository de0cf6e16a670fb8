"""
The agent: keeps a tunnel to the hub up with C{ClientService}, and for every stream the hub
opens dials the target named in its own config and relays bytes.
"""
# -*- test-case-name: tests.test_agent -*-

from __future__ import annotations

import ipaddress
import random
from typing import Any
from urllib.parse import urlsplit

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import error
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nowconnect import logs
from nowconnect.config import AgentConfig
from nowconnect.endpoints import hub_client_endpoint, listen_service, target_endpoint
from nowconnect.metrics import Metrics
from nowconnect.mux import Acceptor, Mux
from nowconnect.observer import StreamObserver
from nowconnect.relay import StreamRelay
from nowconnect.shutdown import drain
from nowconnect.tunnel import AgentTunnelFactory, AgentTunnelProtocol
from nowconnect.web import WebApp
from nowconnect.wire import ResetCode

_log = Logger(namespace="nowconnect.agent")


class TargetRelay(StreamRelay):
    """The agent's socket to a target: attaches to its stream once connected."""

    factory: TargetFactory

    def connectionMade(self) -> None:
        StreamRelay.connectionMade(self)
        mux, stream_id = self.factory.mux, self.factory.stream_id
        if mux.attach(stream_id, self):
            self.bind(mux, stream_id)
        else:
            # The hub reset the stream while we were dialling.
            self.transport.abortConnection()


class TargetFactory(Factory):
    protocol = TargetRelay  # type: ignore[assignment]
    noisy = False

    def __init__(self, mux: Mux, stream_id: int) -> None:
        self.mux = mux
        self.stream_id = stream_id


def classify_dial_failure(failure: Failure) -> tuple[ResetCode, str]:
    """Map a failed target dial onto a reset code and a reason for logs and metrics."""
    if failure.check(error.TimeoutError, error.UserError):
        return ResetCode.target_timeout, "target did not answer in time"
    if failure.check(error.DNSLookupError):
        return ResetCode.target_refused, "target name does not resolve"
    return ResetCode.target_refused, failure.getErrorMessage()


@implementer(IStreamClientEndpoint)
class _AnnouncingEndpoint:
    """Logs "connecting to cloud" on every attempt ClientService makes."""

    def __init__(self, endpoint: IStreamClientEndpoint, url: str) -> None:
        self._endpoint = endpoint
        self._url = url

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        logs.emit(_log, "info", logs.CONNECTING_TO_CLOUD, "url={url}",
                  text=logs.CONNECTING_TO_CLOUD_TEXT, url=self._url)
        return self._endpoint.connect(factory).addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        logs.emit(_log, "warn", logs.AGENT_TUNNEL_FAILED, "url={url} reason={reason}",
                  url=self._url, reason=failure.getErrorMessage())
        return failure


class AgentService(MultiService):
    """
    The whole agent.  Stopping drains: new streams are refused, open ones get
    C{drain_seconds} to finish, then the tunnel closes and the remaining streams reset.
    """

    def __init__(
        self,
        config: AgentConfig,
        reactor: Any,
        metrics: Metrics | None = None,
        tls_options: Any = None,
    ) -> None:
        MultiService.__init__(self)
        self.config = config
        self.clock = reactor
        self.metrics = metrics if metrics is not None else Metrics()
        self.observer = StreamObserver(self.metrics, reactor, _log, hub=False)
        self.tunnel: AgentTunnelProtocol | None = None
        self._draining = False
        #: Tunnels that connected but closed before the hub's WELCOME (refused token, TLS
        #: verification, HELLO refused...).  ClientService resets its own count on every TCP
        #: connect, so without this a hub that refuses us would be retried at the initial delay
        #: forever instead of backing off.
        self._handshake_failures = 0
        self._target_endpoints = {
            t.connector: target_endpoint(reactor, t.host, t.port, config.connect_timeout)
            for t in config.targets
        }
        for target in config.targets:
            self.metrics.declare_connector(target.connector)

        self.tunnel_factory = AgentTunnelFactory(
            config.hub_url,
            config.token,
            config.agent_id,
            config.connectors(),
            clock=reactor,
            observer=self.observer,
            host=self,
            handshake_timeout=config.handshake_timeout,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
        )
        endpoint = _AnnouncingEndpoint(
            hub_client_endpoint(reactor, config.hub_url, tls_options, config.connect_timeout),
            _safe_url(config.hub_url),
        )
        policy = backoffPolicy(
            initialDelay=config.reconnect_initial_delay,
            maxDelay=config.reconnect_max_delay,
            jitter=random.random,
        )
        # No prepareConnection: Twisted's ClientService has no transition for a connection
        # lost while prepareConnection is pending (NoTransition raised out of connectionLost),
        # which is exactly what a refused handshake is.  Readiness is tracked here instead.
        self.client = ClientService(
            endpoint,
            self.tunnel_factory,
            retryPolicy=lambda attempt: policy(max(attempt, self._handshake_failures)),
            clock=reactor,
        )
        self.client.setServiceParent(self)
        if config.metrics_listen:
            web = WebApp(self.metrics, unready=self._unready)
            listen_service(reactor, f"{config.source}: metrics_listen: {config.metrics_listen}",
                           config.metrics_listen, web.site(reactor),
                           self._web_listening).setServiceParent(self)

    def _web_listening(self, port: Any) -> None:
        addr = port.getHost()
        logs.emit(_log, "info", logs.WEB_STARTED, "listen={listen} host={host} port={port}",
                  listen=self.config.metrics_listen, host=getattr(addr, "host", ""),
                  port=getattr(addr, "port", 0))

    def startService(self) -> None:
        for warning in self.config.warnings:
            logs.emit(_log, "warn", logs.CONFIG_WARNING, "warning={warning}", warning=warning)
        host = urlsplit(self.config.hub_url).hostname or ""
        if self.config.hub_url.startswith("ws://") and not _is_loopback(host):
            logs.emit(_log, "warn", logs.INSECURE_HUB_URL,
                      "url={url} advice={advice}", url=_safe_url(self.config.hub_url),
                      advice="use wss:// so the token and traffic are encrypted")
        MultiService.startService(self)

    def _unready(self) -> list[str]:
        return [] if self.tunnel is not None else list(self.config.connectors())

    # -- AgentHost -----------------------------------------------------------------------------

    def tunnel_ready(self, tunnel: AgentTunnelProtocol) -> None:
        self.tunnel = tunnel
        self._handshake_failures = 0
        logs.emit(_log, "info", logs.TUNNEL_OPEN,
                  "url={url} agent_id={agent_id} connectors={connectors}",
                  text=logs.TUNNEL_OPEN_TEXT, url=_safe_url(self.config.hub_url),
                  agent_id=self.config.agent_id, connectors=list(self.config.connectors()))

    def tunnel_closed(self, tunnel: AgentTunnelProtocol, reason: str, was_ready: bool) -> None:
        if self.tunnel is tunnel:
            self.tunnel = None
        if was_ready:
            logs.emit(_log, "warn" if self.running else "info", logs.AGENT_TUNNEL_LOST,
                      "url={url} reason={reason}", url=_safe_url(self.config.hub_url),
                      reason=reason)
        else:
            self._handshake_failures += 1
            logs.emit(_log, "warn", logs.AGENT_TUNNEL_FAILED, "url={url} reason={reason}",
                      url=_safe_url(self.config.hub_url), reason=reason)

    def acceptor_for(self, tunnel: AgentTunnelProtocol) -> Acceptor:
        def accept(stream_id: int, connector: str, client: str) -> None:
            mux = tunnel.mux
            if mux is None:
                return
            if self._draining:
                mux.reject(stream_id, ResetCode.shutdown, "agent stopping")
                return
            endpoint = self._target_endpoints.get(connector)
            if endpoint is None:  # the mux checks declared connectors; belt and braces
                mux.reject(stream_id, ResetCode.unknown_connector, connector)
                return
            d = endpoint.connect(TargetFactory(mux, stream_id))
            d.addErrback(self._dial_failed, mux, stream_id, connector, client)

        return accept

    def _dial_failed(self, failure: Failure, mux: Mux, stream_id: int, connector: str,
                     client: str) -> None:
        code, reason = classify_dial_failure(failure)
        logs.emit(_log, "warn", logs.TARGET_FAILED,
                  "connector={connector} client={client} stream={stream} reason={reason}",
                  connector=connector, client=client, stream=stream_id, reason=reason)
        mux.reject(stream_id, code, reason)

    # -- shutdown ------------------------------------------------------------------------------

    def active_streams(self) -> int:
        tunnel = self.tunnel
        return tunnel.mux.stream_count() if tunnel is not None and tunnel.mux is not None else 0

    @inlineCallbacks
    def stopService(self) -> Any:
        self.running = False
        self._draining = True
        left = yield drain(self.clock, self.active_streams, self.config.drain_seconds, _log)
        tunnel = self.tunnel
        if tunnel is not None:
            closed = tunnel.when_closed()
            tunnel.close("agent stopping")
            closed.addTimeout(3, self.clock)
            yield closed.addErrback(lambda f: None)
        logs.emit(_log, "info", logs.DRAIN_FINISHED, "reset={reset}", reset=left)
        yield MultiService.stopService(self)


def _is_loopback(host: str) -> bool:
    """Only a loopback literal or localhost: a name like 127.0.0.1.example.net is not."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _safe_url(url: str) -> str:
    """The hub URL without any userinfo, which could hold a secret."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc).geturl()


def make_agent_service(
    config: AgentConfig, reactor: Any = None, metrics: Metrics | None = None
) -> AgentService:
    """Assemble an agent from config; C{reactor=None} means the global reactor."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    tls_options = None
    if config.hub_url.startswith("wss://"):
        from nowconnect.tls import agent_tls_options

        tls_options = agent_tls_options(config)
    return AgentService(config, reactor, metrics, tls_options)

