"""Tests of the private slapd fixtures themselves (no tunnel involved)."""

from __future__ import annotations

import socket
import ssl
import stat
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from ldap3 import ALL, MODIFY_ADD, MODIFY_DELETE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPSocketOpenError, LDAPStartTLSError

import pki
import slapd as slapd_lib
from slapd import BULK_ENTRIES, Slapd

B = slapd_lib.BASE_DN
PEOPLE = f"ou=people,{B}"
BULK = f"ou=bulk,{B}"
STAFF = f"cn=staff,ou=groups,{B}"
CAROL = f"uid=carol,{PEOPLE}"
PAGED_RESULTS = "1.2.840.113556.1.4.319"  # simple paged results control (RFC 2696)
BULK_UIDS = {f"user{i:05d}" for i in range(1, BULK_ENTRIES + 1)}


def tls_config(ca_file=None) -> Tls:
    """Client TLS settings that verify the server; ca_file=None means the system CA store."""
    return Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca_file) if ca_file else None)


@contextmanager
def connect(*args, **kwargs) -> Iterator[Connection]:
    """An ldap3 Connection that is always unbound afterwards (no ResourceWarning leaks)."""
    conn = Connection(*args, **kwargs)
    try:
        yield conn
    finally:
        conn.unbind()


def admin(server: Slapd):
    return connect(server.url, server.admin_dn, server.admin_password, auto_bind=True)


# --- plain LDAP --------------------------------------------------------------------------


def test_anonymous_bind_and_search(slapd: Slapd) -> None:
    """An anonymous client reads the root DSE and finds alice, bob and carol; userPassword
    stays hidden from it."""
    with connect(Server(slapd.url, get_info=ALL), auto_bind=True) as conn:
        assert conn.server.info.naming_contexts == [B]
        assert conn.search(PEOPLE, "(objectClass=inetOrgPerson)",
                           attributes=["uid", "userPassword"])
        assert sorted(e.uid.value for e in conn.entries) == ["alice", "bob", "carol"]
        assert all(not e.userPassword.values for e in conn.entries)


def test_admin_bind(slapd: Slapd) -> None:
    """The admin DN binds with its password (whoami names it); a wrong password gives 49."""
    with admin(slapd) as conn:
        assert conn.extend.standard.who_am_i() == f"dn:{slapd.admin_dn}"
    with connect(slapd.url, slapd.admin_dn, "wrong") as bad:
        assert not bad.bind() and bad.result["result"] == 49  # invalidCredentials


def test_group_member_result_codes(slapd_factory) -> None:
    """On a fresh server: adding a member twice gives 20 (attributeOrValueExists) and deleting
    an absent member gives 16 (noSuchAttribute)."""
    with admin(slapd_factory()) as conn:
        assert conn.modify(STAFF, {"member": [(MODIFY_ADD, [CAROL])]})
        assert not conn.modify(STAFF, {"member": [(MODIFY_ADD, [CAROL])]})
        assert conn.result["result"] == 20, conn.result
        assert conn.modify(STAFF, {"member": [(MODIFY_DELETE, [CAROL])]})
        assert not conn.modify(STAFF, {"member": [(MODIFY_DELETE, [CAROL])]})
        assert conn.result["result"] == 16, conn.result


# --- bulk data and size limits ---------------------------------------------------------------


def test_unpaged_search_returns_all_bulk_entries(slapd: Slapd) -> None:
    """An anonymous (so size-limited, unlike the rootdn) unpaged search of ou=bulk returns all
    6,000 entries with result 0: olcSizeLimit is unlimited, not slapd's default 500."""
    with connect(slapd.url, auto_bind=True) as conn:
        assert conn.search(BULK, "(objectClass=inetOrgPerson)", attributes=["uid"])
        assert conn.result["result"] == 0
        assert len(conn.response) == BULK_ENTRIES
        assert {e["attributes"]["uid"][0] for e in conn.response} == BULK_UIDS


def test_paged_search_returns_same_set(slapd: Slapd) -> None:
    """A paged search (page size 500) returns the same 6,000 entries, in pages of at most
    500 (12 pages), and ldap3's extend.standard.paged_search agrees."""
    with connect(slapd.url, auto_bind=True) as conn:
        uids: set[str] = set()
        pages, cookie = 0, None
        while True:
            assert conn.search(
                BULK, "(objectClass=inetOrgPerson)", attributes=["uid"],
                paged_size=500, paged_cookie=cookie,
            )  # fmt: skip
            assert 0 < len(conn.response) <= 500
            uids.update(e["attributes"]["uid"][0] for e in conn.response)
            pages += 1
            cookie = conn.result["controls"][PAGED_RESULTS]["value"]["cookie"]
            if not cookie:
                break
        assert pages == BULK_ENTRIES // 500
        assert uids == BULK_UIDS

        entries = conn.extend.standard.paged_search(
            BULK, "(objectClass=inetOrgPerson)", attributes=["uid"], paged_size=500, generator=True
        )
        assert {e["attributes"]["uid"][0] for e in entries} == BULK_UIDS


# --- TLS ---------------------------------------------------------------------------------


def test_ldaps_verifies_with_test_ca(slapd: Slapd) -> None:
    """LDAPS on ldaps_url works when the client verifies the server against ca_file
    (certificate and 127.0.0.1 hostname check)."""
    server = Server(slapd.ldaps_url, use_ssl=True, tls=tls_config(slapd.ca_file))
    with connect(server, slapd.admin_dn, slapd.admin_password, auto_bind=True) as conn:
        assert isinstance(conn.socket, ssl.SSLSocket)
        assert conn.extend.standard.who_am_i() == f"dn:{slapd.admin_dn}"
        assert conn.search(PEOPLE, "(uid=alice)") and len(conn.entries) == 1


@pytest.mark.parametrize("trust", ["system store", "other CA"])
def test_ldaps_rejects_unknown_ca(slapd: Slapd, tmp_path, trust: str) -> None:
    """LDAPS fails certificate verification when the client does not trust the test CA
    (system CA store, or another CA)."""
    ca_file = pki.make_ca(tmp_path, "Other CA").cert if trust == "other CA" else None
    server = Server(slapd.ldaps_url, use_ssl=True, tls=tls_config(ca_file), connect_timeout=5)
    with connect(server) as conn:
        with pytest.raises(LDAPSocketOpenError, match="(?i)certificate verify failed"):
            conn.open()


def test_starttls(slapd: Slapd) -> None:
    """StartTLS on the plain url upgrades the connection, verified against ca_file, and
    the admin bind then works over it."""
    server = Server(slapd.url, tls=tls_config(slapd.ca_file))
    with connect(server, slapd.admin_dn, slapd.admin_password) as conn:
        conn.open()
        assert not isinstance(conn.socket, ssl.SSLSocket)
        assert conn.start_tls() and conn.tls_started
        assert isinstance(conn.socket, ssl.SSLSocket)
        assert conn.bind()
        assert conn.extend.standard.who_am_i() == f"dn:{slapd.admin_dn}"


def test_plain_instance_has_no_tls(slapd_factory) -> None:
    """Without tls the config keeps its TLS lines commented out: no LDAPS port, no CA,
    and StartTLS is refused."""
    server = slapd_factory()
    assert server.ldaps_url is None and server.ldaps_port is None and server.ca_file is None
    with connect(server.url, auto_bind=True) as conn:
        with pytest.raises(LDAPStartTLSError, match="protocolError"):  # "TLS not configured"
            conn.start_tls()


def test_tls_with_given_ca(slapd_factory, tmp_path) -> None:
    """tls=<pki.CA> issues the server certificate from that CA (e.g. one shared with the
    tunnel's TLS tests): ca_file is that CA and LDAPS verifies against it."""
    ca = pki.make_ca(tmp_path / "shared")
    server = slapd_factory(tls=ca)
    assert server.ca_file == ca.cert
    tls = Server(server.ldaps_url, use_ssl=True, tls=tls_config(ca.cert))
    with connect(tls, auto_bind=True) as conn:
        assert conn.extend.standard.who_am_i() is None  # anonymous


# --- the library itself ------------------------------------------------------------------


def test_pki_files(tmp_path) -> None:
    """make_ca/issue write PEM files with keys mode 0600, SANs with the given DNS names and
    IPs, and serverAuth or clientAuth usage."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca = pki.make_ca(tmp_path)
    hub = ca.issue("hub", dns=["localhost"], ips=["127.0.0.1"])
    agent = ca.issue("agent 1", dns=[], client=True)
    for key in (ca.key, hub.key, agent.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(hub.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    client = x509.load_pem_x509_certificate(agent.cert.read_bytes())
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert len(x509.load_pem_x509_certificates(hub.chain.read_bytes())) == 2
    # The standard library verifies the chain and hostname (strict in 3.13+).
    ctx = ssl.create_default_context(cafile=str(hub.ca_cert))
    ctx.load_cert_chain(hub.chain, hub.key)


def test_stop_is_clean(slapd_factory) -> None:
    """stop() ends slapd with exit code 0, removes its pid file and closes the port;
    a second stop() is harmless."""
    server = slapd_factory()
    pid_file = server.directory / "slapd.pid"
    assert server.running and pid_file.exists()
    port = server.port
    assert server.stop() == 0
    assert not pid_file.exists() and not server.running
    with pytest.raises(OSError):
        socket.create_connection((server.host, port), timeout=1).close()
    assert server.stop() is None


def test_retries_when_port_taken(slapd_factory, monkeypatch) -> None:
    """If the chosen port is taken before slapd binds it ('Address already in use'),
    start() retries on a new port instead of failing (or talking to the squatter)."""
    with socket.socket() as squatter:
        squatter.bind((slapd_lib.HOST, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        handed_out: list[int] = []
        real_free_port = slapd_lib._free_port

        def free_port() -> int:  # first the taken port, then real free ones
            handed_out.append(real_free_port() if handed_out else taken)
            return handed_out[-1]

        monkeypatch.setattr(slapd_lib, "_free_port", free_port)
        server = slapd_factory()
        assert handed_out[0] == taken and server.port == handed_out[1] != taken
        with connect(server.url, auto_bind=True) as conn:  # really slapd, not the squatter
            assert conn.search(PEOPLE, "(uid=bob)") and len(conn.entries) == 1


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [("true", pytest.fail.Exception), (None, pytest.skip.Exception)],
)
def test_require_slapd_when_missing(monkeypatch, tmp_path, ci, outcome) -> None:
    """require_slapd() fails under CI=true and skips otherwise when slapd is not installed,
    and the message gives the apt-get command."""
    monkeypatch.setattr(slapd_lib, "SBIN", tmp_path)  # an empty dir: no slapd, no slapadd
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="apt-get install .*slapd ldap-utils"):
        slapd_lib.require_slapd()


@pytest.mark.skipif(not (slapd_lib.SBIN / "slapd").is_file(), reason="slapd not installed")
def test_require_slapd_when_installed(monkeypatch) -> None:
    """require_slapd() does nothing when slapd and slapadd are present, even under CI=true."""
    monkeypatch.setenv("CI", "true")
    assert slapd_lib.require_slapd() is None
