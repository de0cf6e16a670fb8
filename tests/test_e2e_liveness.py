"""
Liveness over real sockets: a tunnel whose agent stops answering pings is dropped by the hub
(its streams reset, the agent reconnects once it runs again), and a target that never answers
a connect becomes a prompt, counted reset of the client.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from harness import HOST, Deployment, EchoServer, read_until_closed


def test_silent_agent_dropped_after_ping_timeout(tmp_path: Path) -> None:
    """
    A frozen agent (SIGSTOP) answers no pings: the hub drops its tunnel after the ping timeout,
    resets the client's stream and counts a ping_timeout disconnect; once the agent runs again
    it reconnects by itself.
    """
    with EchoServer("echo") as echo, Deployment(
        tmp_path, {"echo": (HOST, echo.port)}, limits={"ping_interval": 0.5, "ping_timeout": 1.5}
    ) as dep:
        dep.start_hub()
        dep.start_agent()
        client = socket.create_connection((HOST, dep.listener_port["echo"]), timeout=5)
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"
        os.kill(dep.agent_pid, signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            dep.wait_for(lambda: bool(dep.hub_events("agent_disconnected")), 10,
                         "hub drops the silent tunnel")
            dropped_after = time.monotonic() - frozen
            _, how = read_until_closed(client, 5)
            assert how in ("reset", "eof")
            [gone] = dep.hub_events("agent_disconnected")
            assert "ping" in gone["reason"].lower(), gone
            assert dep.metric("nowconnect_tunnel_disconnects_total", reason="ping_timeout") == 1
            assert dropped_after < 6, dropped_after
        finally:
            os.kill(dep.agent_pid, signal.SIGCONT)
        client.close()
        dep.wait_for(lambda: len(dep.hub_events("agent_connected")) >= 2, 15,
                     "agent back after it runs again")
        with socket.create_connection((HOST, dep.listener_port["echo"]), timeout=5) as again:
            again.sendall(b"pong")
            assert again.recv(16) == b"pong"


def test_target_that_never_answers_times_out(tmp_path: Path) -> None:
    """
    A target whose accept queue is full drops SYNs, so the agent's dial hangs: after the agent's
    connect_timeout the client is reset and open_failures{reason="target_timeout"} counts it.
    """
    with socket.socket() as full:
        full.bind((HOST, 0))
        full.listen(0)
        port = full.getsockname()[1]
        # Fill the accept queue; further SYNs to this port are dropped by the kernel.
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((HOST, port))
            fillers.append(s)
        time.sleep(0.2)
        try:
            with Deployment(tmp_path, {"slow": (HOST, port)},
                            agent_extra={"connect_timeout": 1.0}) as dep:
                dep.start_hub()
                dep.start_agent()
                before = dep.metric("nowconnect_tcp_open_failures_total", connector="slow",
                                    reason="target_timeout")
                started = time.monotonic()
                with socket.create_connection((HOST, dep.listener_port["slow"]), timeout=5) as c:
                    c.sendall(b"hello?")
                    data, how = read_until_closed(c, 8)
                elapsed = time.monotonic() - started
                assert (data, how) == (b"", "reset"), (data, how)
                assert 0.8 < elapsed < 4, elapsed
                dep.wait_for(
                    lambda: dep.metric("nowconnect_tcp_open_failures_total", connector="slow",
                                       reason="target_timeout") == before + 1,
                    5, "target_timeout counted")
                [failed] = dep.agent_events("target_failed")
                assert "in time" in failed["reason"]
        finally:
            for s in fillers:
                s.close()


def test_agent_serves_its_own_metrics(tmp_path: Path) -> None:
    """
    With metrics_listen the agent serves /healthz, /readyz and /metrics itself, and its counters
    move exactly as the traffic says, under the same names as the hub's.
    """
    import http.client

    payload = os.urandom(100_000)
    with EchoServer("echo") as echo, Deployment(
        tmp_path, {"echo": (HOST, echo.port)},
        agent_extra={"metrics_listen": f"tcp:port=0:interface={HOST}"},
    ) as dep:
        dep.start_hub()
        dep.start_agent()
        dep.wait_for(lambda: bool(dep.agent_events("web_started")), 10, "agent web_started")
        port = int(dep.agent_events("web_started")[-1]["port"])

        def get(path: str) -> tuple[int, str]:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                return resp.status, resp.read().decode()
            finally:
                conn.close()

        def metric(text: str, line_start: str) -> float:
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith(line_start))

        assert get("/healthz") == (200, '{"status": "ok"}\n')
        assert get("/readyz")[0] == 200
        before = get("/metrics")[1]
        with socket.create_connection((HOST, dep.listener_port["echo"]), timeout=5) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            data, how = read_until_closed(c, 10)
        assert (len(data), how) == (len(payload), "eof")
        dep.wait_for(lambda: bool(dep.agent_events("connection_closed")), 5, "agent closed it")
        after = get("/metrics")[1]
        name = 'nowconnect_tcp_connections_total{connector="echo"}'
        assert metric(after, name) - metric(before, name) == 1
        for direction in ("c2a", "a2c"):
            name = f'nowconnect_tcp_bytes_total{{connector="echo",direction="{direction}"}}'
            assert metric(after, name) - metric(before, name) == len(payload), direction
