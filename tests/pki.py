"""Throwaway PKI for tests: a test CA and leaf certificates, generated at run time.

Nothing here is ever committed: every key is made fresh (EC P-256) in a temporary
directory. Used by the slapd fixture (LDAPS / StartTLS) and by the tunnel's TLS tests
(hub server certificate for ``localhost``/``127.0.0.1``, client certificates for mTLS)::

    ca = make_ca(tmp_path)
    hub = ca.issue("hub", dns=["localhost"], ips=["127.0.0.1"])
    agent = ca.issue("agent-1", dns=[], client=True)
    # hub.cert, hub.key, hub.chain, hub.ca_cert are PEM files; keys are mode 0600.

Every file is PEM; private keys are unencrypted PKCS#8 (``BEGIN PRIVATE KEY``), which
OpenSSL, GnuTLS (Debian's slapd), pyOpenSSL/Twisted and :mod:`ssl` all read.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA", "LeafFiles", "make_ca"]

#: Validity of every certificate: from a little in the past (clock skew) to 30 days ahead.
_BACKDATE = _dt.timedelta(minutes=5)
_LIFETIME = _dt.timedelta(days=30)


@dataclass(frozen=True)
class LeafFiles:
    """PEM files of one issued certificate."""

    cert: Path
    """The leaf certificate alone."""
    key: Path
    """Its private key (PKCS#8, unencrypted, mode 0600)."""
    chain: Path
    """Leaf certificate followed by the CA certificate (what a server should send)."""
    ca_cert: Path
    """The issuing CA's certificate (the trust anchor to verify this leaf)."""


@dataclass
class CA:
    """A self-signed test CA that can issue server and client certificates.

    ``cert``/``key`` are its PEM files in ``directory``. Build one with :func:`make_ca`.
    """

    directory: Path
    cert: Path
    key: Path
    certificate: x509.Certificate = field(repr=False)
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)

    def issue(
        self,
        name: str,
        dns: Sequence[str],
        ips: Sequence[str] = (),
        client: bool = False,
    ) -> LeafFiles:
        """Issue a leaf certificate with CN ``name`` and write ``<name>.crt/.key/-chain.pem``.

        ``dns`` and ``ips`` become the subjectAltName (DNS names and IP addresses, e.g.
        ``["localhost"]`` and ``["127.0.0.1"]``); hostname checks use only the SAN.
        ``client=False`` gives a TLS server certificate (EKU serverAuth),
        ``client=True`` a client certificate for mTLS (EKU clientAuth).
        Issuing the same ``name`` again overwrites the files.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        eku = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            _builder(_name(name), self.certificate.subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.private_key, hashes.SHA256())

        stem = _file_stem(name)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        ca_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        files = LeafFiles(
            cert=self.directory / f"{stem}.crt",
            key=self.directory / f"{stem}.key",
            chain=self.directory / f"{stem}-chain.pem",
            ca_cert=self.cert,
        )
        _write_key(files.key, key)
        files.cert.write_bytes(cert_pem)
        files.chain.write_bytes(cert_pem + ca_pem)
        return files


def make_ca(tmpdir: Path, name: str = "NowConnect Test CA") -> CA:
    """Create a CA (EC P-256, 30 days) and write ``ca.crt`` and ``ca.key`` (0600) in ``tmpdir``.

    ``tmpdir`` is created if needed. Leaf files issued later go to the same directory.
    """
    directory = Path(tmpdir)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    cert = (
        _builder(subject, subject, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    ca = CA(directory, directory / "ca.crt", directory / "ca.key", cert, key)
    _write_key(ca.key, key)
    ca.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca


# --- helpers -----------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "NowConnect tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    """Common part of CA and leaf: names, serial, validity, subject key identifier."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _LIFETIME)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _key_usage(
    digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM; the file is created (or reset to) 0600."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # in case the file already existed with wider mode
        f.write(pem)


def _file_stem(name: str) -> str:
    """A safe file name for a certificate name ("NowConnect hub" -> "NowConnect_hub")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "leaf"
