"""
End-to-end tests of the tunnel: a real hub and agent (C{twistd} processes), real targets in
subprocesses and plain blocking sockets as clients, all on 127.0.0.1 with ephemeral ports.

Every wait is bounded; every test that opens a client waits for the hub to see it closed
(C{nowconnect_tcp_active_connections} back to 0) before it finishes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import (
    Deployment,
    EchoServer,
    deterministic_chunks,
    deterministic_digest,
    free_port,
    read_until_closed,
    run_twistd,
    start_echo_server,
    wait_closed,
)

HOST = "127.0.0.1"
MiB = 1 << 20

CONNECTIONS = "nowconnect_tcp_connections_total"
BYTES = "nowconnect_tcp_bytes_total"
ACTIVE = "nowconnect_tcp_active_connections"
OPEN_FAILURES = "nowconnect_tcp_open_failures_total"
CLOSE_EVENTS = "nowconnect_tcp_close_events_total"
AGENTS = "nowconnect_agents_connected"


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, EchoServer]]:
    """The targets the shared deployment's agent dials, one subprocess each."""
    workdir = tmp_path_factory.mktemp("targets")
    servers = {
        "echo": start_echo_server("echo", workdir=workdir),
        "digest": start_echo_server("digest", workdir=workdir),
        "source": start_echo_server("source", 1 << 40, workdir=workdir),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory,
           targets: dict[str, EchoServer]) -> Iterator[Deployment]:
    """
    One hub + agent for the tests that leave it usable: connectors echo, digest, source (an
    endless sender) and refused (a port nobody listens on).
    """
    refused_port = free_port()  # closed again at once: connecting there is refused
    conns = {name: (HOST, server.port) for name, server in targets.items()}
    conns["refused"] = (HOST, refused_port)
    with Deployment(tmp_path_factory.mktemp("shared"), conns) as d:
        d.start_hub()
        d.start_agent()
        yield d


@pytest.fixture
def up(shared: Deployment) -> Deployment:
    """The shared deployment with its hub and agent running and the agent registered."""
    if not shared.hub_running():
        shared.start_hub()
    if not shared.agent_running():
        shared.start_agent()
    shared.wait_for(lambda: shared.metric(AGENTS, connector="echo") == 1, 15,
                    "the agent registered for echo")
    return shared


def connect(d: Deployment, connector: str, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection((HOST, d.listener_port[connector]), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def open_and_read(d: Deployment, connector: str, send: bytes = b"",
                  timeout: float = 5) -> tuple[bytes, str, float]:
    """
    Connect, optionally send, read until the hub closes: (data, "eof"|"reset"|"timeout",
    seconds from connect).  A reset that wins the race with connect() counts as "reset".
    """
    start = time.monotonic()
    try:
        sock = connect(d, connector, timeout=timeout)
    except ConnectionResetError:
        return b"", "reset", time.monotonic() - start
    with sock:
        if send:
            try:
                sock.sendall(send)
            except OSError:
                pass
        data, how = read_until_closed(sock, timeout)
    return data, how, time.monotonic() - start


def wait_idle(d: Deployment, connector: str, timeout: float = 10) -> None:
    """Wait until the hub has no open stream for C{connector} (server-side disconnects done)."""
    d.wait_for(lambda: d.metric(ACTIVE, connector=connector) == 0, timeout,
               f"no active {connector} connection on the hub")


def send_all_then_eof(
    sock: socket.socket, chunks: Iterator[bytes], errors: list[BaseException]
) -> None:
    try:
        for chunk in chunks:
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
    except BaseException as e:  # reported by the reading thread's assertions
        errors.append(e)


def digest_until_eof(sock: socket.socket, timeout: float) -> tuple[int, str, str]:
    """Read to EOF without keeping the bytes: (count, sha256 hex, how it ended)."""
    h = hashlib.sha256()
    count = 0
    deadline = time.monotonic() + timeout
    buf = bytearray(1 << 20)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return count, h.hexdigest(), "timeout"
        sock.settimeout(left)
        try:
            n = sock.recv_into(buf)
        except socket.timeout:
            return count, h.hexdigest(), "timeout"
        except ConnectionResetError:
            return count, h.hexdigest(), "reset"
        if n == 0:
            return count, h.hexdigest(), "eof"
        h.update(memoryview(buf)[:n])
        count += n


# -- data ------------------------------------------------------------------------------------------

def test_64mib_echo_is_byte_exact(up: Deployment) -> None:
    """64 MiB written through the hub listener come back from the echo target byte for byte."""
    total = 64 * MiB
    expected = deterministic_digest(total, seed=64)
    sock = connect(up, "echo", timeout=60)
    errors: list[BaseException] = []
    writer = threading.Thread(target=send_all_then_eof,
                              args=(sock, deterministic_chunks(total, seed=64, chunk=256 * 1024),
                                    errors), daemon=True)
    writer.start()
    count, digest, how = digest_until_eof(sock, timeout=60)
    writer.join(10)
    sock.close()
    assert not errors and not writer.is_alive(), errors
    assert (count, how) == (total, "eof")
    assert digest == expected
    wait_idle(up, "echo")


def test_200_concurrent_connections_each_get_their_own_echo(up: Deployment) -> None:
    """200 connections open at once, each with distinct data, each get exactly their own echo."""
    import selectors

    n = 200
    before = up.metric(CONNECTIONS, connector="echo")
    socks = [connect(up, "echo") for _ in range(n)]
    payloads = [f"conn {i:04d} ".encode() + os.urandom(2000 + 97 * i) for i in range(n)]
    received = [bytearray() for _ in range(n)]
    sel = selectors.DefaultSelector()
    pending_out = {i: memoryview(p) for i, p in enumerate(payloads)}
    for i, sock in enumerate(socks):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
    open_count = n
    deadline = time.monotonic() + 30
    while open_count and time.monotonic() < deadline:
        for key, events in sel.select(timeout=1):
            i, sock = key.data, key.fileobj
            assert isinstance(sock, socket.socket)
            if events & selectors.EVENT_WRITE and i in pending_out:
                view = pending_out[i]
                sent = sock.send(view[:65536])
                if sent == len(view):
                    del pending_out[i]
                    sock.shutdown(socket.SHUT_WR)
                    sel.modify(sock, selectors.EVENT_READ, i)
                else:
                    pending_out[i] = view[sent:]
            if events & selectors.EVENT_READ:
                data = sock.recv(65536)
                if data:
                    received[i] += data
                else:
                    sel.unregister(sock)
                    open_count -= 1
    sel.close()
    for sock in socks:
        sock.close()
    assert open_count == 0, f"{open_count} connections did not end within 30 s"
    mismatched = [i for i in range(n) if bytes(received[i]) != payloads[i]]
    assert mismatched == []
    wait_idle(up, "echo")
    assert up.metric(CONNECTIONS, connector="echo") - before == n


def test_half_close_client_still_receives_the_whole_reply(
        up: Deployment, targets: dict[str, EchoServer]) -> None:
    """
    After the client's shutdown(SHUT_WR) the target sees EOF (after all 3 MiB, more than the
    credit window) and the reply it then sends reaches the client in full, followed by EOF.
    """
    data_len = 3 * MiB + 12345
    seen = len(targets["digest"].conn_events())
    fin_before = up.metric(CLOSE_EVENTS, connector="digest", event="FIN_RECV")
    sock = connect(up, "digest")
    errors: list[BaseException] = []
    writer = threading.Thread(target=send_all_then_eof,
                              args=(sock, deterministic_chunks(data_len, seed=3), errors),
                              daemon=True)
    writer.start()
    reply, how = read_until_closed(sock, timeout=20)
    writer.join(5)
    sock.close()
    assert not errors, errors
    assert how == "eof"
    assert reply == f"{deterministic_digest(data_len, seed=3)} {data_len}\n".encode()
    wait_idle(up, "digest")
    ends = targets["digest"].conn_events()[seen:]
    assert [(e["received"], e["eof"]) for e in ends] == [(data_len, True)]
    # The target's own close came back as FIN, not as a reset.
    assert up.metric(CLOSE_EVENTS, connector="digest", event="FIN_RECV") - fin_before == 1


# -- failures --------------------------------------------------------------------------------------

def test_target_refused_closes_client_promptly_and_counts(up: Deployment) -> None:
    """
    A stream whose target refuses the connection closes its client within 2 s, counts one
    open failure with reason target_refused and one RST received by the hub.
    """
    failures = up.metric(OPEN_FAILURES, connector="refused", reason="target_refused")
    rsts = up.metric(CLOSE_EVENTS, connector="refused", event="RST_RECV")
    data, how, elapsed = open_and_read(up, "refused", b"optimistic bytes")
    assert data == b""
    assert how in ("eof", "reset") and elapsed < 2, (how, elapsed)
    wait_idle(up, "refused")
    up.wait_for(lambda: up.metric(OPEN_FAILURES, connector="refused",
                                  reason="target_refused") - failures == 1,
                5, "open failure target_refused counted once")
    assert up.metric(CLOSE_EVENTS, connector="refused", event="RST_RECV") - rsts == 1
    assert any(e.get("reason", "") and e.get("connector") == "refused"
               for e in up.agent_events("target_failed"))


def test_agent_killed_mid_transfer_closes_every_client(up: Deployment) -> None:
    """
    SIGKILL of the agent while five streams are moving data: the hub sees the tunnel's TCP
    connection drop and closes every client within 2 s; the agent is restarted afterwards.
    """
    socks = [connect(up, "source") for _ in range(5)]
    for sock in socks:
        got = 0
        while got < 256 * 1024:  # data is flowing on every stream
            chunk = sock.recv(65536)
            assert chunk, "source stream ended early"
            got += len(chunk)
    disconnected = len(up.hub_events("agent_disconnected"))
    up.stop_agent(signal.SIGKILL)
    killed = time.monotonic()
    outcomes = [wait_closed(sock, max(0.0, killed + 2 - time.monotonic())) for sock in socks]
    elapsed = time.monotonic() - killed
    for sock in socks:
        sock.close()
    assert outcomes.count("timeout") == 0, (outcomes, elapsed)
    assert len(up.hub_events("agent_disconnected")) > disconnected
    wait_idle(up, "source")
    assert up.metric(AGENTS, connector="source") == 0


def test_hub_restart_agent_reconnects_and_traffic_flows(up: Deployment) -> None:
    """
    The hub is stopped with SIGTERM and started again on the same ports: the agent reconnects
    by itself (agent_connected logged again) and a new connection is echoed.
    """
    port = up.listener_port["echo"]
    connected = len(up.hub_events("agent_connected"))
    up.stop_hub(signal.SIGTERM)
    up.start_hub()
    assert up.listener_port["echo"] == port
    up.wait_for(lambda: len(up.hub_events("agent_connected")) > connected, 10,
                "agent_connected after the hub restart")
    assert up.agent_running()
    sock = connect(up, "echo")
    sock.sendall(b"after restart")
    sock.shutdown(socket.SHUT_WR)
    data, how = read_until_closed(sock, timeout=5)
    sock.close()
    assert (data, how) == (b"after restart", "eof")
    wait_idle(up, "echo")


# -- counters --------------------------------------------------------------------------------------

def test_counters_exact_deltas_for_a_known_transfer(up: Deployment) -> None:
    """
    One connection sending 100,000 bytes to the digest target and receiving its reply moves
    connections_total by 1, c2a by exactly the bytes sent and a2c by exactly the bytes received,
    and the hub's connection_closed line carries the same numbers.
    """
    def snapshot() -> tuple[float, float, float]:
        return (up.metric(CONNECTIONS, connector="digest"),
                up.metric(BYTES, connector="digest", direction="c2a"),
                up.metric(BYTES, connector="digest", direction="a2c"))

    before = snapshot()
    closed = len(up.hub_events("connection_closed"))
    payload = os.urandom(100_000)
    sock = connect(up, "digest")
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    reply, how = read_until_closed(sock, timeout=5)
    sock.close()
    assert how == "eof" and reply.endswith(b" 100000\n")
    wait_idle(up, "digest")
    after = snapshot()
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (
        1, len(payload), len(reply))
    lines = [e for e in up.hub_events("connection_closed")[closed:] if e["connector"] == "digest"]
    assert [(e["c2a"], e["a2c"], e["outcome"]) for e in lines] == [
        (len(payload), len(reply), "fin")]


def test_agent_connection_closed_log_uses_the_same_directions(up: Deployment) -> None:
    """
    The agent's connection_closed line names directions like the hub's and the metrics:
    c2a = bytes from the client, a2c = bytes to it.
    """
    closed = len(up.agent_events("connection_closed"))
    payload = os.urandom(50_000)
    sock = connect(up, "digest")
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    reply, how = read_until_closed(sock, timeout=5)
    sock.close()
    assert how == "eof"
    wait_idle(up, "digest")
    up.wait_for(lambda: len(up.agent_events("connection_closed")) > closed, 5,
                "connection_closed on the agent")
    line = up.agent_events("connection_closed")[closed]
    assert (line["c2a"], line["a2c"]) == (len(payload), len(reply))


# -- hub without an agent: health, readiness, no agent ---------------------------------------------

@pytest.fixture(scope="module")
def lonely(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A hub whose agent is not running (tests that start it stop it again)."""
    echo = start_echo_server("echo", workdir=tmp_path_factory.mktemp("lonely-target"))
    with Deployment(tmp_path_factory.mktemp("lonely"), {"svc": (HOST, echo.port)}) as d:
        d.start_hub()
        yield d
    echo.stop()


def test_no_agent_closes_client_within_1s(lonely: Deployment) -> None:
    """A client of a connector no agent serves is closed within 1 s; no_agent_for_connector."""
    assert not lonely.agent_running()
    logged = len(lonely.hub_events("no_agent_for_connector"))
    failures = lonely.metric(OPEN_FAILURES, connector="svc", reason="no_agent")
    data, how, elapsed = open_and_read(lonely, "svc", timeout=3)
    assert data == b"" and how in ("eof", "reset") and elapsed < 1, (how, elapsed)
    lonely.wait_for(lambda: len(lonely.hub_events("no_agent_for_connector")) > logged, 5,
                    "no_agent_for_connector logged")
    event = lonely.hub_events("no_agent_for_connector")[logged]
    assert event["connector"] == "svc"
    assert lonely.metric(OPEN_FAILURES, connector="svc", reason="no_agent") - failures == 1


def test_healthz_and_readyz(lonely: Deployment) -> None:
    """/healthz is 200 {"status": "ok"} always; /readyz is 503 until the agent is in, then 200."""
    import json

    status, body = lonely.http_get("/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, body = lonely.http_get("/readyz")
    assert status == 503 and json.loads(body)["connectors_without_agent"] == ["svc"]
    lonely.start_agent()
    try:
        lonely.wait_for(lambda: lonely.http_get("/readyz")[0] == 200, 5, "/readyz 200")
        status, body = lonely.http_get("/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
    finally:
        lonely.stop_agent()
    lonely.wait_for(lambda: lonely.http_get("/readyz")[0] == 503, 5,
                    "/readyz 503 again once the agent left")


# -- policy: tokens and CIDRs ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, EchoServer]]:
    """A hub whose only listener allows 10.0.0.0/8 (so never 127.0.0.1); agent not running."""
    echo = start_echo_server("echo", workdir=tmp_path_factory.mktemp("restricted-target"))
    with Deployment(tmp_path_factory.mktemp("restricted"), {"ldap": (HOST, echo.port)},
                    allow_cidrs=["10.0.0.0/8"]) as d:
        d.start_hub()
        yield d, echo
    echo.stop()


def test_wrong_token_is_refused_and_never_logged(tmp_path: Path) -> None:
    """
    An agent with a wrong token is refused (agent_rejected), never registered, keeps retrying;
    neither the wrong nor the right token appears anywhere in either process's output.
    """
    wrong = "wrong-" + os.urandom(12).hex()
    with Deployment(tmp_path, {"ldap": (HOST, free_port())}) as d:
        d.start_hub()
        d.start_agent(wait_connected=False, token=wrong)
        try:
            d.wait_for(lambda: len(d.hub_events("agent_rejected")) >= 3, 10,
                       "three rejected attempts (the agent keeps retrying)")
            assert d.agent_running()
        finally:
            d.stop_agent()
        # Later attempts may be refused by the per-address auth backoff instead.
        assert [e["reason"] for e in d.hub_events("agent_rejected")[:3]] == ["bad token"] * 3
        assert d.hub_events("agent_connected") == []
        assert d.metric(AGENTS, connector="ldap") == 0
        for text in (d.hub_log_text(), d.agent_log_text()):
            assert wrong not in text
            assert d.token not in text


def test_cidr_blocked_client_gets_nothing_and_agent_sees_nothing(
        restricted: tuple[Deployment, EchoServer]) -> None:
    """
    A client outside allow_cidrs is closed without a byte; cidr_blocked is logged and counted;
    no stream reaches the agent (no connection_open there) nor the target.
    """
    d, echo = restricted
    d.start_agent()
    try:
        blocked = len(d.hub_events("cidr_blocked"))
        failures = d.metric(OPEN_FAILURES, connector="ldap", reason="cidr_blocked")
        data, how, _ = open_and_read(d, "ldap", b"hello?", timeout=3)
        assert data == b"" and how in ("eof", "reset")
        d.wait_for(lambda: len(d.hub_events("cidr_blocked")) > blocked, 5, "cidr_blocked logged")
        assert d.hub_events("cidr_blocked")[blocked]["connector"] == "ldap"
        assert d.metric(OPEN_FAILURES, connector="ldap", reason="cidr_blocked") - failures == 1
        assert d.metric(CONNECTIONS, connector="ldap") == 0
        assert d.hub_events("connection_open") == []
        assert d.agent_events("connection_open") == []
        assert echo.conn_events() == []
    finally:
        d.stop_agent()


# -- bad configuration -----------------------------------------------------------------------------

def _valid_hub_config(port: int = 0) -> dict[str, Any]:
    return {
        "listen": f"tcp:port=0:interface={HOST}",
        "listeners": [{"connector": "svc", "bind": HOST, "port": port}],
        "agents": [{"id": "a", "token_sha256": hashlib.sha256(b"t").hexdigest(),
                    "connectors": ["svc"]}],
    }


def test_bad_config_unknown_key_exits_with_one_clear_line(tmp_path: Path) -> None:
    """An unknown key: twistd exits non-zero within seconds; one line names the file and key."""
    cfg = _valid_hub_config()
    cfg["listeners"][0]["alow_cidrs"] = ["10.0.0.0/8"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start = time.monotonic()
    rc, out = run_twistd("nowconnect-hub", path, timeout=15, cwd=tmp_path)
    assert rc != 0 and time.monotonic() - start < 10, out
    lines = [line for line in out.splitlines()
             if str(path) in line and "listeners[0].alow_cidrs" in line]
    assert len(lines) == 1, out
    assert "unknown key" in lines[0]
    assert "Traceback" not in out


def test_bad_config_port_in_use_exits_with_one_clear_line(tmp_path: Path) -> None:
    """
    A listener port already taken: twistd exits non-zero within seconds with one line naming
    the file, the listener's key and the port, and no traceback.
    """
    with socket.socket() as held:
        held.bind((HOST, 0))
        held.listen()
        port = held.getsockname()[1]
        path = tmp_path / "inuse.yaml"
        path.write_text(yaml.safe_dump(_valid_hub_config(port)))
        start = time.monotonic()
        rc, out = run_twistd("nowconnect-hub", path, timeout=15, cwd=tmp_path)
    assert rc != 0 and time.monotonic() - start < 10, out
    lines = [line for line in out.splitlines()
             if str(path) in line and "listeners[0]" in line and f":{port}" in line]
    assert len(lines) == 1 and "in use" in lines[0], out
    assert "Traceback" not in out, out


# -- bounded memory --------------------------------------------------------------------------------

def test_memory_bounded_while_client_reads_nothing_then_all_arrives(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """
    A target sends 256 MiB to a client that reads nothing: once the transfer stalls, hub and
    agent RSS are each within (initial_window x 1 stream + 32 MiB) of their idle size; when the
    client then reads, all 256 MiB arrive in order (count and sha256).
    """
    total = 256 * MiB
    window = 1 * MiB
    workdir = tmp_path_factory.mktemp("memory")
    source = start_echo_server("source", total, workdir=workdir)
    try:
        with Deployment(workdir / "deployment", {"bulk": (HOST, source.port)},
                        limits={"initial_window": window}) as d:
            d.start_hub()
            d.start_agent()
            idle = {w: d.rss_kib(w) for w in ("hub", "agent")}
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.settimeout(10)
            sock.connect((HOST, d.listener_port["bulk"]))

            last = [-1.0, time.monotonic()]

            def stalled() -> bool:
                moved = d.metric(BYTES, connector="bulk", direction="a2c")
                now = time.monotonic()
                if moved != last[0]:
                    last[:] = [moved, now]
                    return False
                return moved > 0 and now - last[1] >= 1.0

            d.wait_for(stalled, 20, "the a2c counter to stop moving")
            stalled_at = d.metric(BYTES, connector="bulk", direction="a2c")
            peak = {w: d.rss_kib(w) for w in ("hub", "agent")}
            expected = deterministic_digest(total)
            budget_kib = (window + 32 * MiB) // 1024
            growth = {w: peak[w] - idle[w] for w in peak}
            assert stalled_at < total / 4, stalled_at
            assert all(g <= budget_kib for g in growth.values()), (growth, budget_kib)

            count, digest, how = digest_until_eof(sock, timeout=60)
            sock.close()
            assert (count, how) == (total, "eof")
            assert digest == expected
            wait_idle(d, "bulk")
    finally:
        source.stop()
