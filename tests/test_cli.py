"""
The C{nowconnect} console command: C{demo} (hub, agent and echo target in one process, run as
a real subprocess) and C{check} (the runbook's ping-pong, run in-process against demos and as a
subprocess), plus the pure pieces of C{nowconnect.check} and the demo's log filter.

Every port is ephemeral (or a free pair for C{--port-base}), every wait is bounded, and every
demo process is interrupted or killed at teardown.
"""
# -*- test-case-name: tests.test_cli -*-

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from nowconnect import __version__, check, cli
from nowconnect.demo import DemoOptions, DemoStack, demo_log_observer, run_self_check
from nowconnect.metrics import Metrics

HOST = "127.0.0.1"
NOWCONNECT = [sys.executable, "-m", "nowconnect.cli"]
DELTA_LINE = re.compile(r"^\s+(nowconnect_tcp_\S+) (\d+) -> (\d+) \(\+(\d+)\)$", re.M)


# -- helpers ----------------------------------------------------------------------------------


def free_port_pair() -> int:
    """
    A port N on 127.0.0.1 such that N and N+1 can be listened on right now (racy; callers
    retry).  Probes use SO_REUSEADDR as Twisted's listeners do, so ports in TIME_WAIT count
    as free; candidates stay bound during the search so the kernel offers new ones.
    """
    held: list[socket.socket] = []
    try:
        for _ in range(100):
            a = socket.socket()
            held.append(a)
            a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            a.bind((HOST, 0))
            n = int(a.getsockname()[1])
            if n >= 65535:
                continue
            with socket.socket() as b:
                b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    b.bind((HOST, n + 1))
                except OSError:
                    continue
                return n
    finally:
        for sock in held:
            sock.close()
    raise AssertionError("no free pair of adjacent ports")


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NC_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class DemoProcess:
    """
    C{nowconnect demo ...} as a subprocess: stdout is read line by line in a thread (so waits
    are bounded), stderr goes to a file.
    """

    def __init__(self, args: list[str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "w")
        self.proc = subprocess.Popen(
            [*NOWCONNECT, "demo", *args], stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, env=_env())
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def stdout(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first stdout line matching C{pattern}; AssertionError with both outputs if none."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    m = regex.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"demo printed no line matching {pattern!r} "
                        f"(exit {self.proc.poll()})\n--- stdout\n{self.stdout}\n"
                        f"--- stderr\n{self.stderr}")
                self._cond.wait(min(left, 0.2))

    def addresses(self) -> tuple[str, str]:
        """(hub web URL, listener HOST:PORT) as the demo printed them."""
        web = self.wait_for(r"^  web\s+(http://\S+)").group(1)
        listener = self.wait_for(r"^  listener\s+(\S+)").group(1)
        return web, listener

    def interrupt(self, timeout: float = 15.0) -> int:
        """SIGINT, as Ctrl-C would; the exit status."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Callable[..., DemoProcess]]:
    """Start serving demos (C{start_demo("--no-agent")}), ready for clients; killed at the end."""
    demos: list[DemoProcess] = []

    def start(*args: str) -> DemoProcess:
        demo = DemoProcess(list(args), tmp_path / f"demo-{len(demos)}.stderr")
        demos.append(demo)
        demo.wait_for(r"^serving until Ctrl-C")
        return demo

    yield start
    for demo in demos:
        demo.close()


@pytest.fixture(scope="module")
def serving_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    """One C{nowconnect demo --port-base N} for the module's passing checks."""
    directory = tmp_path_factory.mktemp("demo")
    for attempt in range(3):
        base = free_port_pair()
        demo = DemoProcess(["--port-base", str(base)], directory / f"serving-{attempt}.stderr")
        try:
            demo.wait_for(r"^serving until Ctrl-C|^FAIL")
        except AssertionError:
            demo.close()
            raise
        if "serving until Ctrl-C" in demo.stdout:
            break
        demo.close()  # the pair was taken meanwhile: try another
    else:
        raise AssertionError(f"demo did not start:\n{demo.stdout}\n{demo.stderr}")
    yield demo
    demo.close()


def run_check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """C{nowconnect check ARGS} in this process: (exit status, stdout, stderr)."""
    code = cli.main(["check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def step_lines(output: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^\[(\d)/4\] .*$", output, re.M)}


# -- the command line -------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """C{nowconnect --version} prints the package version and exits 0."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"nowconnect {__version__}"


def test_help_lists_commands_and_hides_test_aids(capsys: pytest.CaptureFixture[str]) -> None:
    """C{--help} names both commands; C{demo --help} documents its options but not the hidden
    test aids; C{check --help} documents the four steps and every option."""
    for argv in (["--help"], ["demo", "--help"], ["check", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    top, demo, chk = out.split("usage: ")[1:]
    assert "demo" in top and "check" in top
    assert "--once" in demo and "--port-base" in demo
    for hidden in ("--no-agent", "--target", "--allow-cidr"):
        assert hidden not in demo
    for option in ("--hub", "--listener", "--connector", "--ldap-base", "--timeout", "--json"):
        assert option in chk
    assert "no_agent" not in chk  # the help stays about steps, not internals
    assert "1 hub /healthz" in chk


def test_console_script_is_declared() -> None:
    """The installed distribution declares C{nowconnect = nowconnect.cli:main}."""
    [ep] = [e for e in metadata.entry_points(group="console_scripts") if e.name == "nowconnect"]
    assert ep.value == "nowconnect.cli:main"
    assert ep.load() is cli.main


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """Unusable arguments exit 2 with a message: a bad listener, a bad hub URL, a missing
    subcommand, C{--once} combined with a test aid."""
    code, _, err = run_check(capsys, "--hub", "http://h:1", "--listener", "nohostport",
                             "--connector", "x")
    assert code == 2 and "--listener" in err
    code, _, err = run_check(capsys, "--hub", "ftp://h:1", "--listener", "h:1", "--connector", "x")
    assert code == 2 and "--hub" in err
    for argv in ([], ["demo", "--once", "--no-agent"], ["demo", "--port-base", "65535"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def test_ldap_base_without_ldap3(capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """C{--ldap-base} without ldap3 installed exits 2 and names the extra to install, before
    touching the network."""
    monkeypatch.setitem(sys.modules, "ldap3", None)
    code, out, err = run_check(capsys, "--hub", f"http://{HOST}:{closed_port()}",
                               "--listener", f"{HOST}:1", "--connector", "x",
                               "--ldap-base", "dc=example,dc=org")
    assert code == 2
    assert "pip install 'nowconnect[ldap]'" in err
    assert out == ""


# -- nowconnect demo (subprocesses) -----------------------------------------------------------


def test_demo_once_passes_with_positive_deltas() -> None:
    """C{nowconnect demo --once} exits 0 within 30 s, prints PASS and the three runbook counters
    with positive deltas; stderr carries our stable events, not Twisted's chatter."""
    started = time.monotonic()
    done = subprocess.run([*NOWCONNECT, "demo", "--once"], capture_output=True, text=True,
                          timeout=30, env=_env())
    assert time.monotonic() - started < 30
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^PASS: ", done.stdout, re.M), done.stdout
    deltas = {m.group(1): int(m.group(4)) for m in DELTA_LINE.finditer(done.stdout)}
    assert set(deltas) == {
        'nowconnect_tcp_connections_total{connector="demo"}',
        'nowconnect_tcp_bytes_total{direction="c2a",connector="demo"}',
        'nowconnect_tcp_bytes_total{direction="a2c",connector="demo"}',
    }
    assert all(d > 0 for d in deltas.values()), deltas
    for event in ("listener_started", "agent_connected", "connecting to cloud",
                  "connection_open", "connection_closed"):
        assert event in done.stderr
    for noise in ("Starting factory", "Site starting", "Stopping factory", "HTTP11Client"):
        assert noise not in done.stderr


def test_demo_serves_until_sigint(start_demo: Callable[..., DemoProcess]) -> None:
    """Without C{--once} the demo keeps serving (its /healthz answers) until SIGINT, then stops
    its services (the web port closes) and exits 0."""
    demo = start_demo()
    web, _ = demo.addresses()
    time.sleep(0.5)
    assert demo.proc.poll() is None
    with urllib.request.urlopen(f"{web}/healthz", timeout=5) as response:
        assert response.status == 200
    assert demo.interrupt() == 0
    assert demo.lines[-1] == "stopped"
    assert "drain_finished" in demo.stderr
    port = int(web.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=2).close()


def test_demo_port_base_in_use_fails(tmp_path: Path) -> None:
    """C{--port-base} on a port already in use fails at once with exit 1 and the bind error."""
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run([*NOWCONNECT, "demo", "--once", "--port-base", str(port)],
                              capture_output=True, text=True, timeout=30, env=_env())
    assert done.returncode == 1
    assert "FAIL: cannot start the demo" in done.stdout
    assert "in use" in done.stdout


# -- nowconnect check against demos -----------------------------------------------------------


def test_check_passes_against_demo(serving_demo: DemoProcess,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Against a serving demo every step passes (the echo target echoes the probe), the deltas
    are printed, and the exit status is 0."""
    web, listener = serving_demo.addresses()
    code, out, _ = run_check(capsys, "--hub", web, "--listener", listener, "--connector", "demo")
    assert code == 0, out
    lines = step_lines(out)
    assert sorted(lines) == [1, 2, 3, 4]
    assert all(" PASS " in line for line in lines.values()), out
    assert "echoed" in lines[3]
    deltas = {m.group(1): int(m.group(4)) for m in DELTA_LINE.finditer(out)}
    assert len(deltas) == 3 and all(d > 0 for d in deltas.values())
    assert out.rstrip().endswith("PASS: all 4 checks passed")


def test_check_as_subprocess_with_json(serving_demo: DemoProcess) -> None:
    """The real command with C{--json} prints one JSON object: ok, four passing steps and the
    counter deltas; exit 0.  A ws:// hub URL (an agent's NC_HUB_URL) is accepted."""
    web, listener = serving_demo.addresses()
    hub = web.replace("http://", "ws://") + "/tunnel"
    done = subprocess.run([*NOWCONNECT, "check", "--hub", hub, "--listener", listener,
                           "--connector", "demo", "--json"],
                          capture_output=True, text=True, timeout=30, env=_env())
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["exit_code"] == 0
    assert report["hub"] == web
    assert [s["status"] for s in report["steps"]] == ["PASS"] * 4
    assert [s["name"] for s in report["steps"]] == ["healthz", "agent", "round_trip", "counters"]
    assert [c["delta"] > 0 for c in report["counters"]] == [True, True, True]


def test_check_unknown_connector(serving_demo: DemoProcess,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A connector the hub does not have fails step 2, naming the hub's connectors."""
    web, listener = serving_demo.addresses()
    code, out, _ = run_check(capsys, "--hub", web, "--listener", listener, "--connector", "nope")
    assert code == 1
    line = step_lines(out)[2]
    assert "FAIL" in line and "(known: demo)" in line and "listener_started" in line


def test_check_no_agent(start_demo: Callable[..., DemoProcess],
                        capsys: pytest.CaptureFixture[str]) -> None:
    """A hub whose connector has no agent (C{demo --no-agent}) fails step 2 with the
    C{no_agent_for_connector} hint and the agent-side things to check; 3 and 4 are skipped."""
    web, listener = start_demo("--no-agent").addresses()
    code, out, _ = run_check(capsys, "--hub", web, "--listener", listener, "--connector", "demo")
    assert code == 1
    lines = step_lines(out)
    assert lines[1].startswith("[1/4] PASS")
    assert lines[2].startswith("[2/4] FAIL")
    for hint in ("no_agent_for_connector", "NC_CONNECTORS", "connecting to cloud"):
        assert hint in lines[2]
    assert lines[3].startswith("[3/4] SKIP") and lines[4].startswith("[4/4] SKIP")


def test_check_hub_down(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing on the hub port: step 1 fails with "connection refused" and the hub-down hint,
    the rest is skipped, exit 1; with C{--json} the same as one parseable object."""
    hub = f"http://{HOST}:{closed_port()}"
    code, out, _ = run_check(capsys, "--hub", hub, "--listener", f"{HOST}:1", "--connector", "x")
    assert code == 1
    line = step_lines(out)[1]
    assert "FAIL" in line and "connection refused" in line
    assert "hub is down or --hub is wrong" in line and "web_started" in line
    code, out, _ = run_check(capsys, "--hub", hub, "--listener", f"{HOST}:1", "--connector", "x",
                             "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert [s["status"] for s in report["steps"]] == ["FAIL", "SKIP", "SKIP", "SKIP"]
    assert "hub is down" in report["steps"][0]["cause"]


def test_check_cidr_blocked(start_demo: Callable[..., DemoProcess],
                            capsys: pytest.CaptureFixture[str]) -> None:
    """A listener whose allow_cidrs exclude the client fails step 3 with the C{cidr_blocked}
    hint, diagnosed from the hub's open-failure counter."""
    web, listener = start_demo("--allow-cidr", "10.0.0.0/8").addresses()
    code, out, _ = run_check(capsys, "--hub", web, "--listener", listener, "--connector", "demo")
    assert code == 1
    line = step_lines(out)[3]
    assert "FAIL" in line and "cidr_blocked" in line and "allow_cidrs" in line


def test_check_target_refused(start_demo: Callable[..., DemoProcess],
                              capsys: pytest.CaptureFixture[str]) -> None:
    """An agent whose target refuses fails step 3 with the C{target_failed} (agent log) hint;
    step 4 still shows the deltas (one connection, no a2c bytes)."""
    web, listener = start_demo("--target", f"{HOST}:{closed_port()}").addresses()
    code, out, _ = run_check(capsys, "--hub", web, "--listener", listener, "--connector", "demo")
    assert code == 1
    lines = step_lines(out)
    assert "FAIL" in lines[3] and "target_failed" in lines[3] and "target_refused +1" in lines[3]
    assert lines[4].startswith("[4/4] SKIP") and "connections +1" in lines[4]


def test_check_ldap_through_demo(start_demo: Callable[..., DemoProcess], slapd: Any,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """With C{--ldap-base} the round trip is an anonymous bind and base search through the
    tunnel to a real slapd; every step passes and both byte counters move."""
    web, listener = start_demo("--target", f"{HOST}:{slapd.port}").addresses()
    code, out, _ = run_check(capsys, "--hub", web, "--listener", listener, "--connector", "demo",
                             "--ldap-base", "dc=example,dc=org")
    assert code == 0, out
    lines = step_lines(out)
    assert "anonymous bind success" in lines[3] and "1 entry" in lines[3]
    deltas = {m.group(1): int(m.group(4)) for m in DELTA_LINE.finditer(out)}
    assert all(d > 0 for d in deltas.values()), out


def test_check_https_hub_needs_its_ca(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """An https:// hub whose certificate comes from a private CA fails step 1 with the
    --ca-file hint; with C{--ca-file} step 1 passes (this stand-in is no hub: step 2 fails)."""
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pki import make_ca

    leaf = make_ca(tmp_path).issue("hub", dns=["localhost"], ips=[HOST])

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/healthz"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}' if ok else b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(leaf.cert), str(leaf.key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub = f"https://{HOST}:{server.server_address[1]}"
    try:
        code, out, _ = run_check(capsys, "--hub", hub, "--listener", f"{HOST}:1",
                                 "--connector", "x", "--timeout", "5")
        assert code == 1
        assert "TLS handshake failed" in step_lines(out)[1] and "--ca-file" in step_lines(out)[1]
        code, out, _ = run_check(capsys, "--hub", hub, "--listener", f"{HOST}:1",
                                 "--connector", "x", "--ca-file", str(leaf.ca_cert))
        lines = step_lines(out)
        assert lines[1].startswith("[1/4] PASS") and "HTTP 404" in lines[2]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- pure pieces of nowconnect.check ----------------------------------------------------------


def test_parse_metrics_and_deltas() -> None:
    """Deltas of the runbook counters from real exposition text, printed in exposition label
    order; a series absent before counts from 0; open-failure deltas list increases only."""
    m = Metrics()
    m.declare_connector("x")
    before = check.parse_metrics(m.render().decode())
    m.connections.labels("x").inc()
    m.bytes.labels("c2a", "x").inc(30)
    m.open_failures.labels("x", "target_refused").inc()
    after = check.parse_metrics(m.render().decode())
    deltas = check.counter_deltas(before, after, "x")
    assert [d.delta for d in deltas] == [1, 30, 0]
    assert deltas[1].line() == (
        'nowconnect_tcp_bytes_total{direction="c2a",connector="x"} 0 -> 30 (+30)')
    assert check.failure_deltas(before, after, "x") == {"target_refused": 1}
    assert after.value(check.AGENTS, connector="x") == 0
    assert after.value(check.AGENTS, connector="y") is None


@pytest.mark.parametrize("outcome, failures, connected, event", [
    ("reset", {"cidr_blocked": 1}, False, "cidr_blocked"),
    ("closed", {"target_refused": 1}, False, "target_failed"),
    ("reset", {"no_agent": 1}, False, "no_agent_for_connector"),
    ("reset", {"limit": 2}, False, "limit_reached"),
    ("reset", {}, True, "connection_closed"),
    ("closed", {}, False, "cidr_blocked"),
    ("reset", {}, False, "target_failed"),
])
def test_diagnose(outcome: str, failures: dict[str, float], connected: bool, event: str) -> None:
    """The hub's open-failure counters decide the cause; without them, a target that connected
    closed it itself, else closed-without-traffic points at cidr_blocked and a reset at the
    agent's target."""
    d = check.diagnose(outcome, failures, "x", connected)
    assert event in d.look_for


@pytest.mark.parametrize("given, base", [
    ("http://hub:8765", "http://hub:8765"),
    ("hub:8765", "http://hub:8765"),
    ("http://hub:8765/", "http://hub:8765"),
    ("http://hub:8765/metrics", "http://hub:8765"),
    ("ws://hub:8765/tunnel", "http://hub:8765"),
    ("wss://hub.example.com/tunnel", "https://hub.example.com"),
    ("https://lb.example.com/nc/healthz", "https://lb.example.com/nc"),
])
def test_hub_base_url(given: str, base: str) -> None:
    """C{--hub} accepts a base URL, a bare host:port, an agent's ws(s) URL or an endpoint URL."""
    assert check.hub_base_url(given) == base


class _Server:
    """A one-connection TCP server in a thread doing C{behave(conn)}."""

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, args=(behave,), daemon=True)
        self._thread.start()

    def _serve(self, behave: Callable[[socket.socket], None]) -> None:
        conn, _ = self.sock.accept()
        with conn:
            behave(conn)

    def close(self) -> None:
        self._thread.join(5)
        self.sock.close()


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def _reply(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"hello\n")
    conn.recv(65536)


def _silent(conn: socket.socket) -> None:
    conn.settimeout(5)
    while conn.recv(65536):
        pass


def _close(conn: socket.socket) -> None:
    conn.recv(65536)


def _reset(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


@pytest.mark.parametrize("behave, outcome", [
    (_echo, "echo"), (_reply, "reply"), (_silent, "held"), (_close, "closed"),
    (_reset, "reset"),
])
def test_tcp_probe_outcomes(behave: Callable[[socket.socket], None], outcome: str) -> None:
    """The plain-TCP round trip: echo, another reply and a connection held open pass; a close
    or a reset before any byte came back fail."""
    server = _Server(behave)
    try:
        probe = check.tcp_probe(HOST, server.port, timeout=5, hold=0.3)
    finally:
        server.close()
    assert probe.outcome == outcome
    assert probe.ok == (outcome in ("echo", "reply", "held"))
    assert probe.sent > 0


def test_tcp_probe_refused() -> None:
    """A port nobody listens on is C{refused}: a listener problem, not a tunnel one."""
    assert check.tcp_probe(HOST, closed_port(), timeout=2).outcome == "refused"


def test_fail_line_names_cause_and_event() -> None:
    """A FAIL step's one line carries the detail, the likely cause and what to look for."""
    step = check.Step(3, "round_trip", "round trip", check.FAIL, "reset",
                      check.CIDR_BLOCKED.cause, check.CIDR_BLOCKED.look_for)
    assert step.line() == (f"[3/4] FAIL round trip: reset -- likely cause: "
                           f"{check.CIDR_BLOCKED.cause}; look for: {check.CIDR_BLOCKED.look_for}")


# -- the demo's pieces in process -------------------------------------------------------------


def _log_lines(verbose: bool) -> str:
    stream = io.StringIO()
    observer = demo_log_observer(stream, verbose)
    for event in (
        {"log_level": LogLevel.info, "log_format": "Starting factory {f}", "f": "x",
         "log_namespace": "twisted.internet.protocol", "log_time": time.time()},
        {"log_level": LogLevel.info, "log_format": "agent_connected agent_id={agent_id}",
         "event": "agent_connected", "agent_id": "a1", "log_namespace": "nowconnect.hub",
         "log_time": time.time()},
        {"log_level": LogLevel.debug, "log_format": "debug_thing", "event": "debug_thing",
         "log_namespace": "nowconnect.hub", "log_time": time.time()},
        {"log_level": LogLevel.error, "log_format": "library trouble",
         "log_namespace": "autobahn", "log_time": time.time()},
    ):
        observer(event)
    return stream.getvalue()


def test_demo_log_filter() -> None:
    """By default stderr gets our stable events at info and above plus anybody's errors, in one
    compact line each; C{verbose} adds other libraries' info lines, never debug."""
    quiet = _log_lines(False)
    assert "hub   agent_connected agent_id=a1" in quiet
    assert "library trouble" in quiet
    assert "Starting factory" not in quiet and "debug_thing" not in quiet
    assert len(quiet.splitlines()) == 2
    loud = _log_lines(True)
    assert "Starting factory x" in loud and "debug_thing" not in loud


class SelfCheckTests(TestCase):
    """The demo's self-check on the real reactor, in this process: its FAIL paths."""

    def _stack(self, options: DemoOptions) -> DemoStack:
        from twisted.internet import reactor

        stack = DemoStack(reactor, options)
        self.addCleanup(stack.stop)
        return stack

    async def _self_check(self, options: DemoOptions,
                          timeout: float) -> tuple[bool, list[str]]:
        stack = self._stack(options)
        await stack.start()
        said: list[str] = []
        ok = await run_self_check(stack, said.append, timeout)
        return ok, said

    def test_fails_with_stage_when_no_agent_registers(self) -> Any:
        """Without an agent the self-check gives up after its timeout, naming the stage."""
        async def go() -> None:
            ok, said = await self._self_check(DemoOptions(no_agent=True), timeout=0.5)
            self.assertFalse(ok)
            self.assertEqual(said, ["FAIL: no result within 0.5 s (while waiting for the agent "
                                    "to register; see the log lines on stderr)"])
        return ensureDeferred(go())

    def test_interrupt_fails_the_self_check(self) -> Any:
        """Cancelling the self-check (what Ctrl-C does before the demo serves) ends it with
        a FAIL line naming the interruption and the stage, not an unhandled error."""
        async def go() -> None:
            from twisted.internet import reactor
            from twisted.internet.defer import Deferred

            stack = self._stack(DemoOptions(no_agent=True))
            await stack.start()
            said: list[str] = []
            check = Deferred.fromCoroutine(run_self_check(stack, said.append, 20))
            reactor.callLater(0.2, check.cancel)
            self.assertFalse(await check)
            self.assertEqual(said, ["FAIL: interrupted (while waiting for the agent to "
                                    "register; see the log lines on stderr)"])
        return ensureDeferred(go())

    def test_fails_with_reason_when_the_ping_pong_breaks(self) -> Any:
        """When the agent's target refuses, the ping-pong fails at once with the reason."""
        async def go() -> None:
            ok, said = await self._self_check(DemoOptions(target=(HOST, closed_port())), timeout=10)
            self.assertFalse(ok)
            self.assertTrue(said[-1].startswith(
                "FAIL: connection lost after 0 of 3 round trips"), said)
            self.assertIn("while ping-pong through the listener", said[-1])
        return ensureDeferred(go())
