"""
TLS contexts for the tunnel.  The agent verifies the hub's certificate chain (system trust
store, or C{ca_file}) and its hostname with service-identity before any token is sent; the hub's
TLS side is a Twisted endpoint string (C{ssl:...}) in its C{listen} key.
"""
# -*- test-case-name: tests.test_tls -*-

from __future__ import annotations

from urllib.parse import urlsplit

from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
)

from nowconnect.config import AgentConfig


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def agent_tls_options(config: AgentConfig) -> object:
    """
    Client TLS options for C{wss://} hub URLs: hostname checked by service-identity, chain
    checked against C{ca_file} or the platform trust store, client certificate when set.
    """
    hostname = urlsplit(config.hub_url).hostname or ""
    trust = (
        Certificate.loadPEM(_read(config.ca_file)) if config.ca_file else platformTrust()
    )
    client = None
    if config.client_cert and config.client_key:
        client = PrivateCertificate.loadPEM(
            _read(config.client_cert) + b"\n" + _read(config.client_key)
        )
    return optionsForClientTLS(hostname, trustRoot=trust, clientCertificate=client)
