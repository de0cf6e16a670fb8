"""
The tunnel over TLS, end to end with real twistd processes: the hub serves `/tunnel` on an
`ssl:` endpoint; the agent dials `wss://`, verifies the chain against `ca_file` and the hostname
with service-identity, and sends its token only to a hub that passes both.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import pytest

from harness import HOST, Deployment, EchoServer
from pki import make_ca


def _tls_hub(tmp_path: Path, echo: EchoServer, *, server_names: list[str],
             agent_ca: Path | None = None, hub_name: str = "localhost") -> tuple[Deployment, Path]:
    ca = make_ca(tmp_path / "pki")
    leaf = ca.issue("hub", dns=server_names, ips=[HOST] if HOST in server_names else [])
    listen = f"ssl:port=0:interface={HOST}:privateKey={leaf.key}:certKey={leaf.cert}"
    dep = Deployment(
        tmp_path / "dep", {"echo": (HOST, echo.port)},
        hub_extra={"listen": listen},
        agent_extra={"hub_url": f"wss://{hub_name}:{{web_port}}/tunnel",
                     "ca_file": str(agent_ca or ca.cert)},
    )
    return dep, ca.cert


def _round_trip(port: int, payload: bytes) -> bytes:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_wss_with_verified_hub(tmp_path: Path) -> None:
    """A wss:// agent that trusts the hub's CA connects, and traffic flows through the tunnel."""
    with EchoServer("echo") as echo:
        dep, ca_cert = _tls_hub(tmp_path, echo, server_names=["localhost"])
        with dep:
            dep.start_hub()
            dep.start_agent()
            # Inside TLS the agent's frames go unmasked, by agreement in the upgrade.
            [connected] = dep.hub_events("agent_connected")
            assert connected["frame_masking"] == "off"
            payload = os.urandom(3 * 1024 * 1024)
            assert _round_trip(dep.listener_port["echo"], payload) == payload
            # /healthz answers over TLS on the same port, verified with the same CA.
            ctx = ssl.create_default_context(cafile=str(ca_cert))
            with socket.create_connection((HOST, dep.web_port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                              b"Connection: close\r\n\r\n")
                    reply = b""
                    while chunk := s.recv(4096):
                        reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
            assert b'{"status": "ok"}' in reply


@pytest.mark.parametrize("case", ["untrusted_ca", "wrong_hostname"])
def test_agent_refuses_unverified_hub(tmp_path: Path, case: str) -> None:
    """
    An agent facing a hub whose certificate it cannot verify (unknown CA, or a name that does
    not match) never completes the upgrade: no token reaches the hub, the failure is logged
    with a reason, and the agent keeps retrying.
    """
    with EchoServer("echo") as echo:
        if case == "untrusted_ca":
            other = make_ca(tmp_path / "other", name="Some Other CA")
            dep, _ = _tls_hub(tmp_path, echo, server_names=["localhost"], agent_ca=other.cert)
        else:
            dep, _ = _tls_hub(tmp_path, echo, server_names=["hub.example.org"])
        with dep:
            dep.start_hub()
            dep.start_agent(wait_connected=False)
            dep.wait_for(lambda: len(dep.agent_events("tunnel_failed")) >= 2, 15,
                         "two failed attempts logged by the agent")
            assert dep.hub_events("agent_connected") == []
            # The TLS handshake failed before any HTTP: the hub never saw a token to reject.
            assert dep.hub_events("agent_rejected") == []
            assert dep.token not in dep.agent_log_text() + dep.hub_log_text()
            assert len(dep.agent_events("connecting_to_cloud")) >= 2


def test_plain_ws_keeps_masking(tmp_path: Path) -> None:
    """Over plain ws:// the agent's frames stay masked (RFC 6455), whatever it would prefer."""
    with EchoServer("echo") as echo, Deployment(tmp_path, {"echo": (HOST, echo.port)}) as dep:
        dep.start_hub()
        dep.start_agent()
        [connected] = dep.hub_events("agent_connected")
        assert connected["frame_masking"] == "on"
        assert _round_trip(dep.listener_port["echo"], b"masked" * 1000) == b"masked" * 1000
