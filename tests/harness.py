"""
End-to-end harness: a hub and an agent as real C{twistd} processes on 127.0.0.1, and TCP targets
in subprocesses.

Nothing here imports Twisted: the test process stays a plain socket client, free to block.

    with Deployment(tmp_path, {"echo": ("127.0.0.1", echo.port)}) as d:
        d.start_hub()
        d.start_agent()
        sock = socket.create_connection(("127.0.0.1", d.listener_port["echo"]))

Processes run C{twistd --nodaemon --pidfile= --logger nowconnect.logs.observer nowconnect-<x>
--config <file>} with C{NC_LOG_FORMAT=json}; stdout and stderr go to C{<workdir>/<x>.log}
(appended across restarts) and the lines that are JSON objects are the events.  Ports: every
listener and the web port start at 0; after the first start the real ports are written into
the config, so a restarted hub comes back on the same ones.  Every wait is bounded and a timeout
raises C{AssertionError} with the tail of both logs.

This file is also the target server: C{python harness.py serve MODE [ARG]} (see L{_serve}).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Deployment",
    "EchoServer",
    "free_port",
    "start_echo_server",
    "run_twistd",
    "twistd_command",
    "deterministic_chunks",
    "deterministic_digest",
    "read_until_closed",
    "wait_closed",
]

HOST = "127.0.0.1"

#: Short timings so liveness and reconnection happen within a test's budget.
TEST_LIMITS: dict[str, Any] = {"ping_interval": 1.0, "ping_timeout": 3.0, "handshake_timeout": 5.0}
TEST_AGENT: dict[str, Any] = {
    "reconnect_initial_delay": 0.2,
    "reconnect_max_delay": 1.0,
    "ping_interval": 1.0,
    "ping_timeout": 3.0,
    "connect_timeout": 5.0,
    "drain_seconds": 1.0,
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (racy: prefer port 0 where possible)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def twistd_command(plugin: str, config: str | os.PathLike[str]) -> list[str]:
    """The argv that runs C{twistd <plugin> --config <config>} in the foreground, JSON-logging."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "--logger", "nowconnect.logs.observer",
            plugin, "--config", str(config)]


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NC_")}
    env.update(NC_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run_twistd(plugin: str, config: str | os.PathLike[str], timeout: float = 15,
               cwd: str | os.PathLike[str] | None = None) -> tuple[int, str]:
    """
    Run C{twistd <plugin> --config <config>} to completion (for configs that must fail):
    C{(returncode, stdout+stderr)}.  A process still running after C{timeout} is killed and
    C{AssertionError} raised.
    """
    proc = subprocess.Popen(twistd_command(plugin, config), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=_child_env(), cwd=cwd,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"twistd {plugin} still running after {timeout}s:\n"
                             + out.decode("utf-8", "replace")[-3000:]) from None
    return proc.returncode, out.decode("utf-8", "replace")


# -- deterministic data ---------------------------------------------------------------------------

_BLOCK = 1 << 20


def deterministic_chunks(total: int, seed: int = 7, chunk: int = _BLOCK) -> Iterator[bytes]:
    """
    C{total} bytes, as chunks of at most C{chunk}: a seeded random 1 MiB block whose first 8
    bytes are replaced by the block number, so misplaced or repeated blocks change the digest.
    Memory: one block, whatever C{total} is.
    """
    base = random.Random(seed).randbytes(_BLOCK)
    sent, index = 0, 0
    while sent < total:
        block = index.to_bytes(8, "big") + base[8:]
        index += 1
        view = memoryview(block)[: total - sent]
        for off in range(0, len(view), chunk):
            piece = bytes(view[off: off + chunk])
            sent += len(piece)
            yield piece


def deterministic_digest(total: int, seed: int = 7) -> str:
    """sha256 hex of C{deterministic_chunks(total, seed)}."""
    h = hashlib.sha256()
    for piece in deterministic_chunks(total, seed):
        h.update(piece)
    return h.hexdigest()


# -- socket helpers --------------------------------------------------------------------------------

def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """
    Read until EOF, a reset or C{timeout} seconds: C{(data, how)} with how one of
    C{"eof"}, C{"reset"}, C{"timeout"}.
    """
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), "timeout"
        sock.settimeout(left)
        try:
            data = sock.recv(262144)
        except socket.timeout:
            return b"".join(chunks), "timeout"
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            return b"".join(chunks), "reset"
        if not data:
            return b"".join(chunks), "eof"
        chunks.append(data)


def wait_closed(sock: socket.socket, timeout: float) -> str:
    """Discard input until the peer closes: C{"eof"}, C{"reset"} or C{"timeout"}."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        sock.settimeout(left)
        try:
            data = sock.recv(1 << 20)
        except socket.timeout:
            return "timeout"
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            return "reset"
        if not data:
            return "eof"


# -- the hub and the agent -------------------------------------------------------------------------

class _Proc:
    """One twistd process (restartable) and its JSON log, parsed incrementally."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._offset = 0
        self._partial = b""
        self._events: list[dict[str, Any]] = []
        self._lines: list[str] = []

    def start(self, argv: list[str], cwd: Path) -> int:
        """Start; returns the index of the first event this run will log."""
        if self.running():
            raise AssertionError(f"{self.name} is already running")
        self.refresh()
        first = len(self._events)
        out = open(self.log_path, "ab")
        try:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=_child_env(),
                                          cwd=cwd, start_new_session=True)
        finally:
            out.close()
        self.returncode = None
        return first

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise AssertionError(f"{self.name} was never started")
        return self.popen.pid

    def stop(self, sig: int, timeout: float) -> int | None:
        p = self.popen
        if p is None:
            return self.returncode
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
                self.popen, self.returncode = None, p.returncode
                raise AssertionError(
                    f"{self.name} did not exit within {timeout}s of signal {sig}; killed") from None
        self.popen, self.returncode = None, p.returncode
        return p.returncode

    def kill(self) -> None:
        p = self.popen
        if p is not None and p.poll() is None:
            p.kill()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if p is not None:
            self.returncode = p.returncode
        self.popen = None

    def refresh(self) -> None:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self._lines.append(line)
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    self._events.append(obj)

    def events(self, event: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        self.refresh()
        return [e for e in self._events[since:] if event is None or e.get("event") == event]

    def text(self) -> str:
        """The whole log, JSON and non-JSON lines."""
        self.refresh()
        return "\n".join(self._lines + ([self._partial.decode("utf-8", "replace")]
                                        if self._partial else []))

    def tail(self, n: int = 25) -> str:
        self.refresh()
        lines = self._lines[-n:]
        return "\n".join(f"  {line[:400]}" for line in lines) or "  (empty)"


class Deployment:
    """hub + agent as real twistd processes, written configs, JSON logs parsed."""

    def __init__(
        self,
        workdir: Path,
        targets: dict[str, tuple[str, int]],
        *,
        allow_cidrs: list[str] | None = None,
        hub_extra: dict[str, Any] | None = None,
        agent_extra: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        agent_id: str = "agent-1",
        token: str | None = None,
    ) -> None:
        """
        C{targets}: connector -> (host, port) the agent dials; the hub gets one listener per
        connector on 127.0.0.1 and one agent entry serving all of them.  C{allow_cidrs} applies
        to every listener (None: key absent, everyone allowed).  C{limits} is merged over
        L{TEST_LIMITS}.  C{hub_extra} / C{agent_extra} are merged last at the top level of each
        config (an agent C{hub_url} may contain C{{web_port}}).
        """
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.targets = dict(targets)
        self.allow_cidrs = allow_cidrs
        self.hub_extra = dict(hub_extra or {})
        self.agent_extra = dict(agent_extra or {})
        self.limits = {**TEST_LIMITS, **(limits or {})}
        self.agent_id = agent_id
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self.hub_config_path = self.workdir / "hub.yaml"
        self.agent_config_path = self.workdir / "agent.yaml"
        self.web_port: int = 0
        self.listener_port: dict[str, int] = {}
        self._hub = _Proc("hub", self.workdir / "hub.log")
        self._agent = _Proc("agent", self.workdir / "agent.log")

    # -- configs -----------------------------------------------------------------------------

    def hub_config(self) -> dict[str, Any]:
        """The hub config as written by the next L{start_hub}."""
        listeners = []
        for connector in self.targets:
            entry: dict[str, Any] = {"connector": connector, "bind": HOST,
                                     "port": self.listener_port.get(connector, 0)}
            if self.allow_cidrs is not None:
                entry["allow_cidrs"] = list(self.allow_cidrs)
            listeners.append(entry)
        cfg: dict[str, Any] = {
            "listen": f"tcp:port={self.web_port}:interface={HOST}",
            "listeners": listeners,
            "agents": [{
                "id": self.agent_id,
                "token_sha256": hashlib.sha256(self.token.encode()).hexdigest(),
                "connectors": list(self.targets),
            }],
            "drain_seconds": 1.0,
            "limits": dict(self.limits),
        }
        cfg.update(self.hub_extra)
        return cfg

    def agent_config(self, token: str | None = None) -> dict[str, Any]:
        """The agent config as written by the next L{start_agent}."""
        cfg: dict[str, Any] = {
            "hub_url": f"ws://{HOST}:{self.web_port}/tunnel",
            "agent_id": self.agent_id,
            "token": token if token is not None else self.token,
            "connectors": {c: f"{h}:{p}" if ":" not in h else f"[{h}]:{p}"
                           for c, (h, p) in self.targets.items()},
            **TEST_AGENT,
        }
        cfg.update(self.agent_extra)
        if isinstance(cfg.get("hub_url"), str):
            cfg["hub_url"] = cfg["hub_url"].replace("{web_port}", str(self.web_port))
        return cfg

    @staticmethod
    def _write(path: Path, data: dict[str, Any]) -> None:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        path.chmod(0o600)

    # -- processes ---------------------------------------------------------------------------

    @property
    def hub_pid(self) -> int:
        return self._hub.pid

    @property
    def agent_pid(self) -> int:
        return self._agent.pid

    def hub_running(self) -> bool:
        return self._hub.running()

    def agent_running(self) -> bool:
        return self._agent.running()

    def start_hub(self, timeout: float = 15) -> None:
        """Start the hub; return once C{web_started} and every C{listener_started} are logged."""
        self._write(self.hub_config_path, self.hub_config())
        first = self._hub.start(twistd_command("nowconnect-hub", self.hub_config_path),
                                self.workdir)
        wanted = set(self.targets)

        def up() -> bool:
            if not self._hub.running():
                raise AssertionError(f"hub exited (rc={self._hub.popen and self._hub.popen.poll()})"
                                     f" during start-up:\n{self._hub.tail(40)}")
            started = {e.get("connector"): e for e in self._hub.events("listener_started", first)}
            return bool(self._hub.events("web_started", first)) and wanted <= set(started)

        self.wait_for(up, timeout, "hub listening")
        web = self._hub.events("web_started", first)[-1]
        self.web_port = int(web["port"])
        for e in self._hub.events("listener_started", first):
            self.listener_port[e["connector"]] = int(e["port"])
        # A restart comes back on the same ports.
        self._write(self.hub_config_path, self.hub_config())

    def start_agent(self, timeout: float = 15, *, wait_connected: bool = True,
                    token: str | None = None) -> None:
        """Start the agent (C{token} overrides the configured one); wait for C{agent_connected}."""
        if not self.web_port:
            raise AssertionError("start the hub first: the agent needs its port")
        self._write(self.agent_config_path, self.agent_config(token))
        since = len(self._hub.events())
        self._agent.start(twistd_command("nowconnect-agent", self.agent_config_path),
                          self.workdir)
        if not wait_connected:
            return

        def connected() -> bool:
            if not self._agent.running():
                raise AssertionError(f"agent exited during start-up:\n{self._agent.tail(40)}")
            return any(e.get("agent_id") == self.agent_id
                       for e in self._hub.events("agent_connected", since))

        self.wait_for(connected, timeout, "agent_connected in the hub log")

    def stop_agent(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Signal the agent and wait for it to exit (C{.agent_returncode} keeps its status)."""
        self._agent.stop(sig, timeout)

    def stop_hub(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Signal the hub and wait for it to exit (C{.hub_returncode} keeps its status)."""
        self._hub.stop(sig, timeout)

    @property
    def hub_returncode(self) -> int | None:
        return self._hub.returncode

    @property
    def agent_returncode(self) -> int | None:
        return self._agent.returncode

    def close(self) -> None:
        """Kill whatever still runs.  Safe to call twice."""
        self._agent.kill()
        self._hub.kill()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation -------------------------------------------------------------------------

    def http_get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        """GET C{path} on the hub's web port: C{(status, body)}."""
        conn = http.client.HTTPConnection(HOST, self.web_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The hub's /metrics, parsed: (sample name, label set) -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.http_get("/metrics")
        if status != 200:
            raise AssertionError(f"/metrics answered {status}: {body[:200]!r}")
        out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
        return out

    def metric(self, name: str, **labels: str) -> float:
        """
        Sum of the samples called C{name} whose labels include C{labels} (the exact series
        when all its labels are given); 0.0 when there is none.
        """
        want = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and want <= ls)

    def hub_events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The hub's JSON log lines (all runs), optionally only those with C{event}."""
        return self._hub.events(event)

    def agent_events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The agent's JSON log lines (all runs), optionally only those with C{event}."""
        return self._agent.events(event)

    def hub_log_text(self) -> str:
        """The hub's whole output, JSON or not."""
        return self._hub.text()

    def agent_log_text(self) -> str:
        """The agent's whole output, JSON or not."""
        return self._agent.text()

    def logs_tail(self, n: int = 25) -> str:
        return (f"--- hub log tail ---\n{self._hub.tail(n)}\n"
                f"--- agent log tail ---\n{self._agent.tail(n)}")

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll C{predicate} until true; after C{timeout} s raise C{AssertionError(what)}."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            if predicate():
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for: {what}\n"
                                     + self.logs_tail())
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def rss_kib(self, which: str) -> int:
        """VmRSS of C{"hub"} or C{"agent"} in KiB."""
        proc = {"hub": self._hub, "agent": self._agent}[which]
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError(f"no VmRSS for {which}")


# -- targets ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def running(workdir: Path, targets: dict[str, tuple[str, int]],
            **kwargs: Any) -> Iterator[Deployment]:
    """A L{Deployment} with hub and agent started (agent registered), closed afterwards."""
    dep = Deployment(workdir, targets, **kwargs)
    try:
        dep.start_hub()
        dep.start_agent()
        yield dep
    finally:
        dep.close()


class EchoServer:
    """
    A TCP target on 127.0.0.1 in a subprocess (the test process stays free for clients).

    Modes (one thread per connection):
      - C{"echo"}: echo every byte; at EOF half-close back and end.
      - C{"digest"} ("sink then reply"): read to EOF, reply C{b"<sha256 hex> <count>\\n"}, close.
      - C{"source"}: on accept send C{arg} bytes of L{deterministic_chunks} then close; the
        client's bytes are discarded.
      - C{"hold"}: accept and read, never write, until the client closes.
    Every connection's end is printed to the server's stdout log as a JSON line
    (C{{"conn": n, "received": bytes, "eof": true|false, "sent": bytes}}); see L{conn_events}.
    """

    def __init__(self, mode: str = "echo", arg: int = 0, workdir: Path | None = None) -> None:
        self.mode = mode
        self.log_path = (Path(workdir) if workdir else Path(os.environ.get("TMPDIR", "/tmp"))) \
            / f"target-{mode}-{os.getpid()}-{id(self)}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve", mode, str(arg)],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
            start_new_session=True)
        assert self.proc.stdout is not None
        line = _readline_with_timeout(self.proc, 15)
        if not line.startswith(b"port "):
            self.stop()
            raise AssertionError(f"target did not start: {line!r}")
        self.port = int(line.split()[1])
        self._events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read_events, daemon=True)
        self._reader.start()

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self._events.append(json.loads(raw))
            except ValueError:
                pass

    def conn_events(self) -> list[dict[str, Any]]:
        """One dict per finished target-side connection (see the class docstring)."""
        return list(self._events)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        try:
            self.log_path.unlink()
        except OSError:
            pass

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_echo_server(mode: str = "echo", arg: int = 0, workdir: Path | None = None) -> EchoServer:
    """Start a target subprocess (see L{EchoServer}); C{.port} is its port, C{.stop()} ends it."""
    return EchoServer(mode, arg, workdir)


def _readline_with_timeout(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    out: list[bytes] = []
    assert proc.stdout is not None
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    t.start()
    t.join(timeout)
    return out[0] if out else b""


def _serve(mode: str, arg: int) -> None:
    """The target subprocess: listen on 127.0.0.1:0, print C{port N}, serve forever."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((HOST, 0))
    srv.listen(1024)
    print(f"port {srv.getsockname()[1]}", flush=True)
    lock = threading.Lock()
    counter = [0]

    def report(**fields: Any) -> None:
        with lock:
            sys.stdout.write(json.dumps(fields) + "\n")
            sys.stdout.flush()

    def handle(conn: socket.socket, n: int) -> None:
        # Counts are kept as bytes arrive, so a connection reset midway still reports them.
        stats = {"received": 0, "sent": 0, "eof": False}

        def read_to_eof(each: Callable[[bytes], object]) -> None:
            while data := conn.recv(262144):
                stats["received"] += len(data)
                each(data)
            stats["eof"] = True

        def send(data: bytes) -> None:
            conn.sendall(data)
            stats["sent"] += len(data)

        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if mode == "echo":
                read_to_eof(send)
                conn.shutdown(socket.SHUT_WR)
            elif mode == "digest":
                h = hashlib.sha256()
                read_to_eof(h.update)
                send(f"{h.hexdigest()} {stats['received']}\n".encode())
            elif mode == "source":
                for piece in deterministic_chunks(arg):
                    send(piece)
            elif mode == "hold":
                read_to_eof(lambda data: None)
            else:
                raise SystemExit(f"unknown mode {mode}")
        except OSError:
            pass
        finally:
            conn.close()
            report(conn=n, **stats)

    while True:
        conn, _ = srv.accept()
        counter[0] += 1
        threading.Thread(target=handle, args=(conn, counter[0]), daemon=True).start()


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "serve":
    _serve(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
