"""
Listening and dialling: a listener service that fails start-up when its port cannot be bound
and reports the real port, and the client endpoint for a hub URL.
"""
# -*- test-case-name: tests.test_endpoints -*-

from __future__ import annotations

import ipaddress
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure


class ListenFailed(SystemExit):
    """
    A listener could not be started; the message says which and why.  A C{SystemExit}, so
    twistd prints that one line and exits 1 instead of a traceback.
    """


def tcp_endpoint_string(bind: str, port: int) -> str:
    """A Twisted endpoint string for a TCP listener, IPv6 literals escaped."""
    return f"tcp:port={port}:interface={bind.replace(':', chr(92) + ':')}"


class ListenerService(Service):
    """
    Listens on an endpoint while running.  A failure to listen is raised from
    C{privilegedStartService}, so twistd stops before serving anything; C{on_listening} gets
    the bound port (so port 0 in tests is reported as the real one).
    """

    def __init__(
        self,
        description: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        on_listening: Callable[[IListeningPort], object] | None = None,
    ) -> None:
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self._on_listening = on_listening

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        outcome: list[object] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise ListenFailed(f"{self.description}: endpoint did not listen synchronously")
        result = outcome[0]
        if isinstance(result, Failure):
            raise ListenFailed(f"{self.description}: {result.getErrorMessage()}")
        self.port = result  # type: ignore[assignment]
        if self._on_listening is not None:
            self._on_listening(self.port)  # type: ignore[arg-type]

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        Service.startService(self)

    def stop_accepting(self) -> Deferred[None]:
        """Close the listening socket; open connections are untouched."""
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        d = port.stopListening()
        return d if d is not None else succeed(None)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self.stop_accepting()


def listen_service(
    reactor: object,
    description: str,
    endpoint_string: str,
    factory: IProtocolFactory,
    on_listening: Callable[[IListeningPort], object] | None = None,
) -> ListenerService:
    """A L{ListenerService} from a Twisted endpoint string; a bad string raises ValueError."""
    endpoint = serverFromString(reactor, endpoint_string)
    return ListenerService(description, endpoint, factory, on_listening)


def target_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    The endpoint for a target: an IP literal is dialled directly, a name through
    C{HostnameEndpoint} (resolution in a thread, happy eyeballs).  Skipping the resolver for
    literals saves a thread round trip on every stream.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


def hub_client_endpoint(
    reactor: object,
    hub_url: str,
    tls_options: Any = None,
    timeout: float = 30,
) -> IStreamClientEndpoint:
    """
    The endpoint that reaches the hub of C{hub_url}: TCP for ws://, TLS over TCP for wss://
    (C{tls_options} from L{nowconnect.tls}).
    """
    parts = urlsplit(hub_url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if secure:
        if tls_options is None:
            raise ValueError("wss:// needs TLS options")
        endpoint = wrapClientTLS(tls_options, endpoint)
    return endpoint
