"""
Real-LDAP validation: OpenLDAP (slapd) carried through a hub and an agent running as real
C{twistd} processes (L{harness.Deployment}).

The ldap3 client only ever talks to the hub's listener for connector C{addomain} (or
C{addomain-ldaps}); the agent dials slapd.  Wherever a test compares with "the same thing done
directly", the direct query goes to slapd's own port, so any difference is the tunnel's.

slapd comes from the session fixture in conftest.py (TLS, seed data, 6,000 entries under
ou=bulk; read-only).  Writes go to a private slapd behind a second deployment.  Under
C{CI=true} a missing slapd fails these tests (L{slapd.require_slapd}); elsewhere it skips them.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ldap3  # the "test" extra; missing, this module errors instead of skipping
import pytest
from ldap3 import BASE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException

import pki
from harness import Deployment, running
from slapd import ADMIN_DN, ADMIN_PASSWORD, BASE_DN, BULK_ENTRIES, Slapd

#: Every ldap3 socket read gives up after this long, so a stuck stream fails instead of hanging.
RECEIVE_TIMEOUT = 5  # whole seconds: ldap3 packs it into SO_RCVTIMEO
CONNECT_TIMEOUT = 5.0
BULK_BASE = f"ou=bulk,{BASE_DN}"
BULK_FILTER = "(objectClass=inetOrgPerson)"
PEOPLE = f"ou=people,{BASE_DN}"
STAFF = f"cn=staff,ou=groups,{BASE_DN}"
USERS = {"alice": "alicepw", "bob": "bobpw", "carol": "carolpw"}


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deployment(slapd: Slapd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Hub + agent for the shared (read-only) slapd: C{addomain} -> LDAP/StartTLS port,
    C{addomain-ldaps} -> LDAPS port."""
    assert slapd.ldaps_port is not None
    with running(tmp_path_factory.mktemp("e2e-ldap"), {
        "addomain": (slapd.host, slapd.port),
        "addomain-ldaps": (slapd.host, slapd.ldaps_port),
    }) as d:
        yield d


@pytest.fixture(scope="module")
def rw_slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """A private, writable slapd (seed data only) for the write-path tests."""
    server = Slapd(tmp_path_factory.mktemp("slapd-rw"))
    server.start()  # require_slapd(): fails under CI=true when slapd is missing
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def rw_deployment(rw_slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Deployment]:
    """Hub + agent whose C{addomain} connector reaches the writable slapd."""
    with running(tmp_path_factory.mktemp("e2e-ldap-rw"),
                   {"addomain": (rw_slapd.host, rw_slapd.port)}) as d:
        yield d


# -- helpers --------------------------------------------------------------------------------------

def hub_server(d: Deployment, connector: str = "addomain", **kw: Any) -> Server:
    """An ldap3 Server for the hub's listener of C{connector} (never slapd itself)."""
    return Server("127.0.0.1", port=d.listener_port[connector], connect_timeout=CONNECT_TIMEOUT,
                  **kw)


def connect(server: Server, user: str | None = None, password: str | None = None,
            **kw: Any) -> Connection:
    """A bound ldap3 connection with bounded reads; raises on a failed bind."""
    return Connection(server, user, password, auto_bind=True, receive_timeout=RECEIVE_TIMEOUT,
                      **kw)


def user_dn(uid: str) -> str:
    return f"uid={uid},{PEOPLE}"


def entries(responses: list[dict[str, Any]]) -> dict[str, dict[str, list[bytes]]]:
    """DN -> raw attribute values (sorted) of the search result entries in C{responses}."""
    out: dict[str, dict[str, list[bytes]]] = {}
    for r in responses:
        if r["type"] != "searchResEntry":
            continue
        assert r["dn"] not in out, f"duplicate entry {r['dn']}"
        out[r["dn"]] = {k.lower(): sorted(v) for k, v in r["raw_attributes"].items()}
    return out


def client_address(conn: Connection) -> str:
    host, port = conn.socket.getsockname()[:2]
    return f"{host}:{port}"


def wait_idle(d: Deployment, connector: str = "addomain", timeout: float = 10) -> None:
    """Wait until the hub has no open stream on C{connector} (server side finished)."""
    d.wait_for(lambda: d.metric("nowconnect_tcp_active_connections", connector=connector) == 0,
               timeout, f"no active {connector} streams on the hub")


class EventsSince:
    """A deployment's hub/agent events logged after this object was made (client ports can
    be reused over a long run, so matching on ``client`` alone could find an older stream)."""

    def __init__(self, d: Deployment) -> None:
        self._d = d
        self._hub = len(d.hub_events())
        self._agent = len(d.agent_events())

    def hub(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self._d.hub_events()[self._hub:] if e.get("event") == event]

    def agent(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self._d.agent_events()[self._agent:] if e.get("event") == event]


def result_of(conn: Connection) -> dict[str, Any]:
    """The parts of ldap3's last result that come from the server."""
    r = conn.result
    return {k: r[k] for k in ("result", "description", "message", "dn")}


# -- read path ------------------------------------------------------------------------------------

def test_anonymous_bind_search(deployment: Deployment, slapd: Slapd) -> None:
    """The runbook's test_anonymous_bind_search through the tunnel: an anonymous bind and a
    base-scope search of dc=example,dc=org return the base entry, and the hub logged the
    stream for this very client socket (so the path really went through the hub)."""
    since = EventsSince(deployment)
    conn = connect(hub_server(deployment))
    try:
        assert conn.bound
        me = client_address(conn)
        assert conn.search(BASE_DN, "(objectClass=*)", BASE, attributes=["*"])
        assert [e.entry_dn for e in conn.entries] == [BASE_DN]
        assert conn.entries[0]["o"].value == "Example Org"
        assert set(conn.entries[0]["objectClass"].values) >= {"dcObject", "organization"}
        assert conn.extend.standard.who_am_i() in (None, "")  # anonymous
    finally:
        conn.unbind()
    deployment.wait_for(
        lambda: any(e.get("client") == me for e in since.hub("connection_closed")),
        10, f"hub connection_closed for client {me}")
    opened = [e for e in since.hub("connection_open") if e.get("client") == me]
    assert [e["connector"] for e in opened] == ["addomain"]


def test_admin_bind(deployment: Deployment) -> None:
    """The admin simple bind works through the tunnel (whoami names the admin and the admin
    reads userPassword, which anonymous cannot); a wrong password comes back as
    invalidCredentials (49), unchanged."""
    conn = connect(hub_server(deployment), ADMIN_DN, ADMIN_PASSWORD)
    try:
        assert conn.extend.standard.who_am_i() == f"dn:{ADMIN_DN}"
        assert conn.search(user_dn("alice"), "(objectClass=*)", BASE, attributes=["userPassword"])
        assert conn.entries[0]["userPassword"].raw_values == [b"alicepw"]
    finally:
        conn.unbind()

    bad = Connection(hub_server(deployment), ADMIN_DN, "wrong", receive_timeout=RECEIVE_TIMEOUT)
    try:
        assert bad.bind() is False
        assert bad.result["result"] == 49
        assert bad.result["description"] == "invalidCredentials"
    finally:
        bad.unbind()


def test_bulk_search_matches_direct(deployment: Deployment, slapd: Slapd) -> None:
    """A 6,000-entry subtree search of ou=bulk through the tunnel, paged (500 per page) and
    unpaged, returns exactly the DNs and raw attribute values that the same searches made
    directly against slapd return."""
    direct = connect(Server(slapd.url, connect_timeout=CONNECT_TIMEOUT))
    tunnelled = connect(hub_server(deployment))
    try:
        paged: dict[str, Any] = {}
        for name, conn in (("direct", direct), ("tunnel", tunnelled)):
            paged[name] = entries(conn.extend.standard.paged_search(
                BULK_BASE, BULK_FILTER, SUBTREE, attributes=["*"], paged_size=500,
                generator=False))
        assert len(paged["direct"]) == BULK_ENTRIES
        assert paged["tunnel"] == paged["direct"]

        unpaged: dict[str, Any] = {}
        for name, conn in (("direct", direct), ("tunnel", tunnelled)):
            assert conn.search(BULK_BASE, BULK_FILTER, SUBTREE, attributes=["*"])
            assert conn.result["result"] == 0
            unpaged[name] = entries(conn.response)
        assert len(unpaged["tunnel"]) == BULK_ENTRIES
        assert unpaged["tunnel"] == unpaged["direct"] == paged["direct"]
        sample = unpaged["tunnel"][f"uid=user04242,{BULK_BASE}"]
        assert sample["employeenumber"] == [b"4242"]
        assert sample["mail"] == [b"user04242@example.org"]
    finally:
        direct.unbind()
        tunnelled.unbind()


def test_fifty_concurrent_clients(deployment: Deployment) -> None:
    """50 threads at once, each on its own tunnelled connection: bind as one of the seed users,
    search its own bulk entry, unbind.  Every thread sees its own identity (whoami) and its own
    entry, so streams neither mix nor drop; the hub carried 50 new addomain connections."""
    n = 50
    wait_idle(deployment)
    before = deployment.metric("nowconnect_tcp_connections_total", connector="addomain")
    barrier = threading.Barrier(n, timeout=30)
    results: dict[int, Any] = {}

    def client(i: int) -> None:
        uid = list(USERS)[i % len(USERS)]
        number = 100 + i
        try:
            barrier.wait()
            conn = connect(hub_server(deployment), user_dn(uid), USERS[uid])
            try:
                whoami = conn.extend.standard.who_am_i()
                conn.search(BULK_BASE, f"(uid=user{number:05d})", SUBTREE,
                            attributes=["employeeNumber", "mail"])
                found = [(e.entry_dn, e["employeeNumber"].value, e["mail"].value)
                         for e in conn.entries]
            finally:
                conn.unbind()
            results[i] = (whoami, found)
        except Exception as e:  # reported below, per thread
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    for i in range(n):
        uid = list(USERS)[i % len(USERS)]
        number = 100 + i
        assert results.get(i) == (
            f"dn:{user_dn(uid)}",
            [(f"uid=user{number:05d},{BULK_BASE}", str(number), f"user{number:05d}@example.org")],
        ), f"client {i}: {results.get(i)!r}"
    wait_idle(deployment)
    after = deployment.metric("nowconnect_tcp_connections_total", connector="addomain")
    assert after - before == n


# -- write path -----------------------------------------------------------------------------------

def test_add_modify_delete(rw_deployment: Deployment) -> None:
    """As admin through the tunnel: add an inetOrgPerson, modify it (replace mail, add a
    description), read back each change, delete it, and find it gone (noSuchObject, 32)."""
    dn = user_dn("dave")
    conn = connect(hub_server(rw_deployment), ADMIN_DN, ADMIN_PASSWORD)
    try:
        assert conn.add(dn, ["inetOrgPerson"], {
            "uid": "dave", "cn": "Dave Dent", "sn": "Dent", "mail": "dave@example.org",
        }), conn.result
        assert conn.search(dn, "(objectClass=*)", BASE, attributes=["cn", "mail"])
        assert conn.entries[0]["mail"].value == "dave@example.org"

        assert conn.modify(dn, {
            "mail": [(ldap3.MODIFY_REPLACE, ["dave.dent@example.org"])],
            "description": [(ldap3.MODIFY_ADD, ["added through the tunnel"])],
        }), conn.result
        assert conn.search(dn, "(objectClass=*)", BASE, attributes=["mail", "description"])
        assert conn.entries[0]["mail"].value == "dave.dent@example.org"
        assert conn.entries[0]["description"].value == "added through the tunnel"

        assert conn.delete(dn), conn.result
        assert conn.search(dn, "(objectClass=*)", BASE) is False
        assert conn.result["result"] == 32  # noSuchObject
    finally:
        conn.unbind()


def test_group_membership_result_codes(rw_deployment: Deployment, rw_slapd: Slapd) -> None:
    """Group member add/remove through the tunnel.  Adding an existing member gives
    typeOrValueExists (20) and removing an absent one noSuchAttribute (16); each failing
    result (code, description, message) is identical to the one slapd gives directly.
    Adding and then removing carol succeed and show in the group."""
    tunnelled = connect(hub_server(rw_deployment), ADMIN_DN, ADMIN_PASSWORD)
    direct = connect(Server(rw_slapd.url, connect_timeout=CONNECT_TIMEOUT),
                     ADMIN_DN, ADMIN_PASSWORD)
    alice, carol = user_dn("alice"), user_dn("carol")

    def members() -> set[str]:
        assert tunnelled.search(STAFF, "(objectClass=*)", BASE, attributes=["member"])
        return set(tunnelled.entries[0]["member"].values)

    try:
        assert members() == {alice, user_dn("bob")}
        for op, member, code, name in (
            (ldap3.MODIFY_ADD, alice, 20, "attributeOrValueExists"),
            (ldap3.MODIFY_DELETE, carol, 16, "noSuchAttribute"),
        ):
            got = {}
            for via, conn in (("tunnel", tunnelled), ("direct", direct)):
                assert conn.modify(STAFF, {"member": [(op, [member])]}) is False
                got[via] = result_of(conn)
            assert got["tunnel"]["result"] == code
            assert got["tunnel"]["description"] == name
            assert got["tunnel"] == got["direct"]

        assert tunnelled.modify(STAFF, {"member": [(ldap3.MODIFY_ADD, [carol])]}), tunnelled.result
        assert carol in members()
        assert tunnelled.modify(STAFF, {"member": [(ldap3.MODIFY_DELETE, [carol])]}), \
            tunnelled.result
        assert carol not in members()
    finally:
        tunnelled.unbind()
        direct.unbind()


# -- TLS: the tunnel is byte-transparent ---------------------------------------------------------

def _slapd_cert_sha256(slapd: Slapd) -> str:
    assert slapd.server_cert is not None
    der = ssl.PEM_cert_to_DER_cert(slapd.server_cert.cert.read_text())
    return hashlib.sha256(der).hexdigest()


def test_ldaps_end_to_end(deployment: Deployment, slapd: Slapd, tmp_path: Path) -> None:
    """LDAPS through connector addomain-ldaps (agent target: slapd's ldaps port).  The client
    verifies slapd's certificate against the fixture's CA and checks the host name against the
    cert's 127.0.0.1 IP SAN; the certificate it sees is byte-for-byte slapd's.  A client that
    trusts another CA, or expects another name, is refused: the hub only relays bytes, TLS is
    end to end between client and slapd."""
    assert slapd.ca_file is not None
    port = deployment.listener_port["addomain-ldaps"]
    tls = Tls(ca_certs_file=str(slapd.ca_file), validate=ssl.CERT_REQUIRED,
              version=ssl.PROTOCOL_TLS_CLIENT)
    conn = connect(hub_server(deployment, "addomain-ldaps", use_ssl=True, tls=tls),
                   ADMIN_DN, ADMIN_PASSWORD)
    try:
        assert isinstance(conn.socket, ssl.SSLSocket)
        assert hashlib.sha256(conn.socket.getpeercert(binary_form=True)).hexdigest() \
            == _slapd_cert_sha256(slapd)
        assert conn.extend.standard.who_am_i() == f"dn:{ADMIN_DN}"
        assert conn.search(BASE_DN, "(objectClass=*)", BASE)
        assert conn.entries[0].entry_dn == BASE_DN
    finally:
        conn.unbind()

    # Hostname verification by the standard library, with the name the cert has and without.
    ctx = ssl.create_default_context(cafile=str(slapd.ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls_sock:
            assert tls_sock.getpeercert()["subjectAltName"]
    with socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT) as raw:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            ctx.wrap_socket(raw, server_hostname="not-slapd.example.org")

    # A different CA: verification fails, so the chain really is checked.
    other = pki.make_ca(tmp_path / "other-ca")
    bad_tls = Tls(ca_certs_file=str(other.cert), validate=ssl.CERT_REQUIRED,
                  version=ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(LDAPException, match="(?i)certificate verify failed"):
        connect(hub_server(deployment, "addomain-ldaps", use_ssl=True, tls=bad_tls))


def test_starttls_through_plain_connector(deployment: Deployment, slapd: Slapd) -> None:
    """StartTLS on the plain addomain connector: the extended operation, the TLS handshake
    (slapd's certificate, verified with the fixture CA and the 127.0.0.1 IP SAN) and then an
    admin bind and search all pass through the tunnel."""
    assert slapd.ca_file is not None
    tls = Tls(ca_certs_file=str(slapd.ca_file), validate=ssl.CERT_REQUIRED,
              version=ssl.PROTOCOL_TLS_CLIENT)
    conn = Connection(hub_server(deployment, tls=tls), ADMIN_DN, ADMIN_PASSWORD,
                      receive_timeout=RECEIVE_TIMEOUT)
    try:
        conn.open()
        assert conn.start_tls(), conn.result
        assert conn.tls_started
        assert hashlib.sha256(conn.socket.getpeercert(binary_form=True)).hexdigest() \
            == _slapd_cert_sha256(slapd)
        assert conn.bind(), conn.result
        assert conn.extend.standard.who_am_i() == f"dn:{ADMIN_DN}"
        assert conn.search(user_dn("bob"), "(objectClass=*)", BASE, attributes=["mail"])
        assert conn.entries[0]["mail"].value == "bob@example.org"
    finally:
        conn.unbind()


# -- agent restart --------------------------------------------------------------------------------

class _SearchLoop:
    """Background searches through the hub, one fresh connection every few, recording
    each operation's outcome and duration until stopped."""

    def __init__(self, d: Deployment) -> None:
        self._d = d
        #: (start, seconds, "ok" | "error" | "wrong", info) per operation
        self.outcomes: list[tuple[float, float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _SearchLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "search loop hung"

    def _run(self) -> None:
        conn: Connection | None = None
        i = 0
        while not self._stop.is_set():
            i += 1
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = connect(hub_server(self._d))
                number = 1 + i % BULK_ENTRIES
                conn.search(BULK_BASE, f"(uid=user{number:05d})", SUBTREE,
                            attributes=["employeeNumber"])
                if conn.result["result"] != 0 or [e["employeeNumber"].value
                                                  for e in conn.entries] != [str(number)]:
                    raise AssertionError(f"wrong result {conn.result} {conn.entries}")
                self.outcomes.append((t0, time.monotonic() - t0, "ok", ""))
                if i % 10 == 0:  # mix long-lived connections with fresh ones
                    conn.unbind()
                    conn = None
            except AssertionError as e:  # a wrong answer: recorded, the test fails on it
                self.outcomes.append((t0, time.monotonic() - t0, "wrong", str(e)))
            except LDAPException as e:
                self.outcomes.append((t0, time.monotonic() - t0, "error",
                                      f"{type(e).__name__}: {e}"))
                try:
                    if conn is not None:
                        conn.unbind()
                except LDAPException:
                    pass
                conn = None
                time.sleep(0.05)
            time.sleep(0.01)
        if conn is not None:
            try:
                conn.unbind()
            except LDAPException:
                pass

    def count(self, kind: str, after: float = 0.0) -> int:
        return sum(1 for t, _, k, _ in self.outcomes if k == kind and t >= after)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_agent_restart_during_searches(deployment: Deployment, sig: int) -> None:
    """The agent stops (SIGTERM: drains 1 s then closes; SIGKILL: dies) and restarts while a
    client runs searches through the hub.  Operations caught in flight or made while no agent
    is connected fail with an ldap3 exception (connection reset or closed), never hang and never
    return a wrong entry; once the agent has re-registered, new binds and searches succeed.
    The whole cycle is bounded in time."""
    started = time.monotonic()
    no_agent_before = len(deployment.hub_events("no_agent_for_connector"))
    with _SearchLoop(deployment) as loop:
        deployment.wait_for(lambda: loop.count("ok") >= 20, 10, "searches before the restart")
        down_at = time.monotonic()
        deployment.stop_agent(sig)
        deployment.wait_for(lambda: loop.count("error", after=down_at) >= 1, 10,
                            "an operation failing while the agent is down")
        deployment.start_agent()
        up_at = time.monotonic()
        deployment.wait_for(lambda: loop.count("ok", after=up_at) >= 20, 10,
                            "searches succeeding after the restart")
    elapsed = time.monotonic() - started

    assert not [o for o in loop.outcomes if o[2] == "wrong"]
    errors = [o for o in loop.outcomes if o[2] == "error"]
    assert errors, "no operation failed: the agent was never really down"
    for _, seconds, _, info in errors:
        # A clean failure: the hub reset/closed the socket; not ldap3's receive timeout.
        assert seconds < RECEIVE_TIMEOUT - 1, f"slow failure ({seconds:.2f}s): {info}"
        assert "timed out" not in info and "timeout" not in info.lower(), info
    assert all(o[1] < RECEIVE_TIMEOUT for o in loop.outcomes)
    # Every failure was still running when the agent was stopped (in flight) or started
    # while it was away; once the agent was back, nothing failed.
    assert all(t0 + seconds >= down_at and t0 <= up_at for t0, seconds, *_ in errors), errors
    # New connections made while the agent was away were refused with the runbook's signature.
    assert len(deployment.hub_events("no_agent_for_connector")) > no_agent_before
    assert elapsed < 30

    # A fresh bind + search once the agent is back.
    conn = connect(hub_server(deployment), user_dn("carol"), USERS["carol"])
    try:
        assert conn.extend.standard.who_am_i() == f"dn:{user_dn('carol')}"
    finally:
        conn.unbind()


# -- metrics --------------------------------------------------------------------------------------

def _ldap_session(d: Deployment, n: int) -> list[str]:
    """n connections, each bind + base search + bulk search + unbind; their client addresses."""
    clients = []
    for i in range(n):
        conn = connect(hub_server(d))
        try:
            clients.append(client_address(conn))
            assert conn.search(BASE_DN, "(objectClass=*)", BASE)
            assert conn.search(BULK_BASE, f"(uid=user{i + 1:05d})", SUBTREE, attributes=["*"])
            assert len(conn.entries) == 1
        finally:
            conn.unbind()
    return clients


def test_metrics_after_known_session(deployment: Deployment) -> None:
    """After a known LDAP session of 3 connections, nowconnect_tcp_connections_total for
    addomain rose by exactly 3, both nowconnect_tcp_bytes_total directions rose, the byte
    deltas equal the sums the hub logged in connection_closed for those 3 streams, and the
    ldaps connector's counters did not move."""
    wait_idle(deployment)
    m = deployment.metric
    names = [("nowconnect_tcp_connections_total", {}),
             ("nowconnect_tcp_bytes_total", {"direction": "c2a"}),
             ("nowconnect_tcp_bytes_total", {"direction": "a2c"})]
    before = {(n, c, tuple(ls.items())): m(n, connector=c, **ls)
              for n, ls in names for c in ("addomain", "addomain-ldaps")}

    since = EventsSince(deployment)
    clients = _ldap_session(deployment, 3)
    wait_idle(deployment)

    def closed() -> list[dict[str, Any]]:
        return [e for e in since.hub("connection_closed") if e.get("client") in clients]

    deployment.wait_for(lambda: len(closed()) == 3, 10, "connection_closed for the 3 clients")
    after = {k: m(k[0], connector=k[1], **dict(k[2])) for k in before}
    delta = {k: after[k] - before[k] for k in before}

    assert delta[("nowconnect_tcp_connections_total", "addomain", ())] == 3
    c2a = delta[("nowconnect_tcp_bytes_total", "addomain", (("direction", "c2a"),))]
    a2c = delta[("nowconnect_tcp_bytes_total", "addomain", (("direction", "a2c"),))]
    assert c2a > 0 and a2c > 0
    assert c2a == sum(e["c2a"] for e in closed())
    assert a2c == sum(e["a2c"] for e in closed())
    assert a2c > c2a  # the answers (entries) are larger than the requests
    assert all(e["outcome"] == "fin" for e in closed())
    assert all(v == 0 for k, v in delta.items() if k[1] == "addomain-ldaps")


def test_agent_connection_closed_bytes_match_hub(deployment: Deployment) -> None:
    """For one LDAP connection, the agent's connection_closed event reports the same c2a
    (client to agent) and a2c (agent to client) byte counts as the hub's event for the same
    stream: both sides name directions the same way, as docs and metrics do.  (Regression:
    the agent used to log them swapped, c2a=<bytes from the target>.)"""
    wait_idle(deployment)
    since = EventsSince(deployment)
    (client,) = _ldap_session(deployment, 1)

    def event(events: Callable[[str], list[dict[str, Any]]]) -> dict[str, Any] | None:
        found = [e for e in events("connection_closed") if e.get("client") == client]
        return found[-1] if found else None

    deployment.wait_for(lambda: event(since.hub) is not None
                        and event(since.agent) is not None, 10,
                        "connection_closed on hub and agent")
    hub, agent = event(since.hub), event(since.agent)
    assert hub is not None and agent is not None
    assert hub["stream"] == agent["stream"]
    assert hub["c2a"] < hub["a2c"]  # sanity: a search answer outweighs the request
    assert (agent["c2a"], agent["a2c"]) == (hub["c2a"], hub["a2c"])
