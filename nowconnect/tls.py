"""
TLS contexts for the tunnel.  The agent verifies the hub's certificate chain (system trust
store, or C{ca_file}) and its hostname with service-identity before any token is sent; the hub's
TLS side is a Twisted endpoint string (C{ssl:...}) in its C{listen} key.
"""
# -*- test-case-name: tests.test_tls -*-

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
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


def hub_tls_options(cert: str, key: str, client_ca: str | None) -> CertificateOptions:
    """
    Server TLS for the hub's port.  With C{client_ca}, a client certificate signed by it is
    mandatory: the handshake fails without one, before any HTTP.
    """
    private = PrivateCertificate.loadPEM(_read(cert) + b"\n" + _read(key))
    if client_ca is None:
        return private.options()
    return private.options(Certificate.loadPEM(_read(client_ca)))


def certificate_names(certificate: Any, identity: str) -> bool:
    """
    Does the peer certificate (pyOpenSSL X509, or None) name C{identity}: a DNS name in its
    subjectAltName, or else its subject CN?  Compared case-insensitively, no wildcards.
    """
    if certificate is None:
        return False
    cert = certificate.to_cryptography()
    wanted = identity.lower()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(a.value).lower()
                 for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return wanted in names
