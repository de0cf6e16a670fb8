"""
Graceful stop with real processes: SIGTERM makes the hub stop accepting, lets open streams
finish for `drain_seconds`, resets what is left and exits 0; the agent likewise.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

from harness import HOST, Deployment, EchoServer, wait_closed


def _echo_once(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _sigterm_in_background(stop: object) -> threading.Thread:
    t = threading.Thread(target=stop, daemon=True)
    t.start()
    return t


def test_hub_drains_then_exits(tmp_path: Path) -> None:
    """
    During the hub's drain an open stream keeps working and new clients are refused; once the
    stream ends the hub exits 0 without waiting out the whole drain period.
    """
    with EchoServer("echo") as echo, Deployment(
        tmp_path, {"echo": (HOST, echo.port)}, hub_extra={"drain_seconds": 20}
    ) as dep:
        dep.start_hub()
        dep.start_agent()
        port = dep.listener_port["echo"]
        client = socket.create_connection((HOST, port), timeout=5)
        assert _echo_once(client, b"before") == b"before"
        stopper = _sigterm_in_background(lambda: dep.stop_hub(signal.SIGTERM, timeout=30))
        dep.wait_for(lambda: bool(dep.hub_events("drain_started")), 10, "drain_started")
        # The listener is closed: a new client is refused.
        dep.wait_for(lambda: _refused(port), 5, "listener closed during drain")
        # The open stream still relays.
        assert _echo_once(client, b"during drain") == b"during drain"
        started = time.monotonic()
        client.close()
        stopper.join(15)
        assert not stopper.is_alive()
        assert dep.hub_returncode == 0
        assert time.monotonic() - started < 10
        [finished] = dep.hub_events("drain_finished")
        assert finished["reset"] == 0


def test_hub_resets_streams_left_after_drain(tmp_path: Path) -> None:
    """A stream still open when drain_seconds runs out is reset, and the hub exits 0."""
    with EchoServer("echo") as echo, Deployment(
        tmp_path, {"echo": (HOST, echo.port)}, hub_extra={"drain_seconds": 1}
    ) as dep:
        dep.start_hub()
        dep.start_agent()
        client = socket.create_connection((HOST, dep.listener_port["echo"]), timeout=5)
        assert _echo_once(client, b"hello") == b"hello"
        dep.stop_hub(signal.SIGTERM, timeout=15)
        assert dep.hub_returncode == 0
        assert wait_closed(client, 5) in ("reset", "eof")
        client.close()
        [finished] = dep.hub_events("drain_finished")
        assert finished["reset"] == 1


def test_agent_drains_then_exits(tmp_path: Path) -> None:
    """SIGTERM on the agent: its open stream keeps working until it ends, then it exits 0."""
    with EchoServer("echo") as echo, Deployment(
        tmp_path, {"echo": (HOST, echo.port)}, agent_extra={"drain_seconds": 20}
    ) as dep:
        dep.start_hub()
        dep.start_agent()
        client = socket.create_connection((HOST, dep.listener_port["echo"]), timeout=5)
        assert _echo_once(client, b"before") == b"before"
        stopper = _sigterm_in_background(lambda: dep.stop_agent(signal.SIGTERM, timeout=30))
        dep.wait_for(lambda: bool(dep.agent_events("drain_started")), 10, "agent drain_started")
        assert _echo_once(client, b"during drain") == b"during drain"
        client.close()
        stopper.join(15)
        assert not stopper.is_alive()
        assert dep.agent_returncode == 0
        dep.wait_for(lambda: bool(dep.hub_events("agent_disconnected")), 10, "agent_disconnected")


def _refused(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return True
    return False
