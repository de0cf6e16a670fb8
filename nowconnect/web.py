"""
The HTTP side of one port: C{/tunnel} (the WebSocket), C{/healthz}, C{/readyz} and C{/metrics}.

The hub serves all four on its C{listen} endpoint; the agent serves the health and metrics
routes on C{metrics_listen} when set.
"""
# -*- test-case-name: tests.test_web -*-

from __future__ import annotations

import ipaddress
import json
from typing import Any, Callable, Sequence, cast

from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site

from nowconnect.metrics import CONTENT_TYPE_LATEST, Metrics

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_allowed(host: str, networks: Sequence[Network] | None) -> bool:
    """Is C{host} inside one of C{networks}?  None means no restriction."""
    if networks is None:
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        forms.append(addr.ipv4_mapped)
    return any(form in net for form in forms for net in networks)


def _json(request: IRequest, code: int, body: object) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode("utf-8") + b"\n"


class WebApp:
    """
    Klein routes.  C{unready} returns the connectors that have no agent (empty when ready);
    C{tunnel} is the WebSocket resource, absent on the agent.
    """

    app = Klein()

    def __init__(
        self,
        metrics: Metrics,
        unready: Callable[[], list[str]] | None = None,
        tunnel: IResource | None = None,
        metrics_allow: Sequence[Network] | None = None,
    ) -> None:
        self._metrics = metrics
        self._unready = unready
        self._tunnel = tunnel
        self._metrics_allow = metrics_allow

    def _forbidden(self, request: IRequest) -> bytes | None:
        if address_allowed(request.getClientAddress().host, self._metrics_allow):
            return None
        return _json(request, 403, {"error": "forbidden"})

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: IRequest) -> bytes:
        return _json(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET", "HEAD"])
    def readyz(self, request: IRequest) -> bytes:
        denied = self._forbidden(request)
        if denied is not None:
            return denied
        missing = self._unready() if self._unready is not None else []
        if missing:
            return _json(request, 503, {"status": "unready", "connectors_without_agent": missing})
        return _json(request, 200, {"status": "ready"})

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: IRequest) -> bytes:
        denied = self._forbidden(request)
        if denied is not None:
            return denied
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._metrics.render()

    @app.route("/tunnel", branch=False)
    def tunnel(self, request: IRequest) -> IResource | bytes:
        if self._tunnel is None:
            return _json(request, 404, {"error": "no tunnel here"})
        # The upgraded connection is the tunnel's now: Twisted Web's idle timeout must not
        # fire on a transport it handed over.
        cast(Any, request).channel.setTimeout(None)
        return self._tunnel

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: object) -> bytes:
        code = getattr(getattr(failure, "value", None), "code", 500)
        code = code if isinstance(code, int) and 400 <= code < 600 else 500
        return _json(request, code, {"error": "not found" if code == 404 else "error"})

    def site(self, reactor: Any) -> Site:
        site = Site(self.app.resource(), timeout=30, reactor=reactor)
        site.noisy = False
        site.displayTracebacks = False
        # One access-log line per scrape or probe is noise; requests that matter log events.
        site.log = lambda request: None  # type: ignore[method-assign]
        return site
