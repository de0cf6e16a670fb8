#!/usr/bin/env python
"""
NowConnect tunnel benchmark: DIRECT (client -> target) against TUNNEL (client -> hub listener ->
WebSocket -> agent -> target), in one run, on loopback.

    python bench/tunnel_bench.py [--quick] [--json out.json] [--only bulk,latency,connrate]
                                 [--profile DIR]

It starts three real processes: a target server (this file with ``--serve-target``: echo, sink
and source on ephemeral ports, plain blocking sockets and a thread per connection), and the hub
and the agent as ``twistd --nodaemon --pidfile= --logger nowconnect.logs.observer
nowconnect-hub|nowconnect-agent --config ...`` with ``NC_LOG_FORMAT=json``.  Real ports come from
the hub's JSON log (``web_started``, ``listener_started``); measuring starts after
``agent_connected``.  The client is this process: raw sockets, 1 MiB reads, threads only for
parallel bulk streams, a selector loop for concurrency.  See bench/README.md for what each figure
means.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import platform
import secrets
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

MiB = 1 << 20
MB = 1_000_000
CHUNK = MiB
HEADER = struct.Struct("!Q")
RTT_SIZE = 200
CONN_MSG = b"ping-nowconnect!"  # 16 bytes

# --------------------------------------------------------------------------------------------
# Target server (runs in its own process: ``tunnel_bench.py --serve-target``)
# --------------------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _echo_loop(listener: socket.socket) -> None:
    """
    Echo for every connection in one epoll loop: small messages and many short connections
    cost no thread start-up and no GIL hand-over.
    """
    listener.setblocking(False)
    lfd = listener.fileno()
    ep = select.epoll()
    ep.register(lfd, select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    pending: dict[int, bytes] = {}

    def drop(fd: int) -> None:
        ep.unregister(fd)
        conns.pop(fd).close()
        pending.pop(fd, None)

    while True:
        for fd, ev in ep.poll():
            if fd == lfd:
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[sock.fileno()] = sock
                    ep.register(sock.fileno(), select.EPOLLIN)
                continue
            sock = conns[fd]
            try:
                if fd in pending:  # waiting for EPOLLOUT; reading is paused
                    data = pending.pop(fd)
                else:
                    data = sock.recv(262144)
                    if not data:
                        drop(fd)
                        continue
                n = sock.send(data)
            except BlockingIOError:
                continue
            except OSError:
                drop(fd)
                continue
            if n < len(data):
                pending[fd] = data[n:]
                ep.modify(fd, select.EPOLLOUT)
            elif ev & select.EPOLLOUT:
                ep.modify(fd, select.EPOLLIN)


def _serve_sink(sock: socket.socket) -> None:
    """Read and discard until EOF, then answer the byte count (8 bytes, big-endian)."""
    buf = bytearray(CHUNK)
    total = 0
    while True:
        n = sock.recv_into(buf)
        if not n:
            break
        total += n
    sock.sendall(HEADER.pack(total))
    sock.shutdown(socket.SHUT_WR)


def _serve_source(sock: socket.socket) -> None:
    """Read an 8-byte count N, send N bytes, half-close, wait for the client's EOF."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    (n,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    chunk = memoryview(bytes(CHUNK))
    while n > 0:
        k = min(n, CHUNK)
        sock.sendall(chunk[:k])
        n -= k
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass


def _handle(handler: Callable[[socket.socket], None], sock: socket.socket) -> None:
    try:
        handler(sock)
    except OSError:
        pass
    finally:
        sock.close()


def _accept_loop(listener: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=_handle, args=(handler, sock), daemon=True).start()


def serve_target() -> None:
    ports = {}
    for name in ("echo", "sink", "source"):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        ports[name] = listener.getsockname()[1]
        if name == "echo":
            threading.Thread(target=_echo_loop, args=(listener,), daemon=True).start()
        else:  # few connections, large transfers: a thread each, blocking 1 MiB calls
            handler = _serve_sink if name == "sink" else _serve_source
            threading.Thread(target=_accept_loop, args=(listener, handler), daemon=True).start()
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        sys.stdin.read()  # exit when the benchmark goes away
    except KeyboardInterrupt:
        pass
    os._exit(0)


# --------------------------------------------------------------------------------------------
# Process accounting (/proc)
# --------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, sys) CPU seconds of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, own processes)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine_times() -> dict[str, float]:
    """
    CPU seconds since boot, all CPUs (/proc/stat): C{busy} is task time (user, nice, system),
    C{softirq} interrupt time (on loopback, most of it is the TCP stack moving our bytes),
    C{steal} time the hypervisor gave to others.
    """
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return {"busy": (user + nice + system) / CLK_TCK, "softirq": (irq + softirq) / CLK_TCK,
            "steal": steal / CLK_TCK}


def machine_busy() -> float:
    t = machine_times()
    return t["busy"] + t["softirq"]


def _ksoftirqd_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().startswith("ksoftirqd/"):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


KSOFTIRQD = _ksoftirqd_pids() if sys.platform == "linux" else []


def _ksoftirqd_cpu() -> float:
    total = 0.0
    for pid in KSOFTIRQD:
        try:
            total += sum(cpu_seconds(pid))
        except OSError:
            pass
    return total


def wait_quiet(limit: float, threshold: float = 0.15, window: float = 0.5) -> float:
    """
    Wait (up to C{limit} seconds) for a C{window} in which the whole machine used less than
    C{threshold} of one core: other work on a 2-core box skews every figure.  Call it while our
    own processes are idle.  Returns the seconds waited.
    """
    if limit <= 0:
        return 0.0
    t0 = time.monotonic()
    while True:
        b0 = machine_busy()
        time.sleep(window)
        if (machine_busy() - b0) / window < threshold or time.monotonic() - t0 >= limit:
            return round(time.monotonic() - t0, 1)


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


class Meter:
    """CPU and peak RSS of the hub, the agent, the target and this client over one measurement."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.procs = procs

    def __enter__(self) -> Meter:
        self.hwm_reset = all(reset_peak_rss(pid) for pid in self.procs.values())
        self.cpu0 = {name: cpu_seconds(pid) for name, pid in self.procs.items()}
        self.client0 = self_cpu()
        self.machine0 = machine_times()
        self.ksoftirqd0 = _ksoftirqd_cpu()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, pid in self.procs.items():
            u1, s1 = cpu_seconds(pid)
            u0, s0 = self.cpu0[name]
            out[name] = {
                "user_s": round(u1 - u0, 3),
                "sys_s": round(s1 - s0, 3),
                "cpu_s": round(u1 - u0 + s1 - s0, 3),
                "peak_rss_kib": status_kib(pid, "VmHWM"),
                "rss_kib": status_kib(pid, "VmRSS"),
            }
        out["client"] = {"cpu_s": round(self_cpu() - self.client0, 3)}
        elapsed = time.monotonic() - self.t0
        ours = sum(v["cpu_s"] for v in out.values())
        now = machine_times()
        delta = {k: now[k] - self.machine0[k] for k in now}
        ksoftirqd = _ksoftirqd_cpu() - self.ksoftirqd0

        def share(seconds: float) -> dict[str, float]:
            seconds = max(0.0, seconds)
            return {"cpu_s": round(seconds, 3), "pct_of_core": round(100 * seconds / elapsed, 1)}

        # The kernel's network work (softirq, in interrupt context or in ksoftirqd) is largely
        # our traffic on loopback; whatever else was busy is other users' work.
        out["softirq"] = share(delta["softirq"] + ksoftirqd)
        out["foreign"] = share(delta["busy"] - ours - ksoftirqd)
        out["steal"] = share(delta["steal"])
        out["peak_rss_is_per_phase"] = self.hwm_reset
        return out


def wait_idle(pids: list[int], settle: float = 0.3, limit: float = 5.0) -> None:
    """Wait until none of C{pids} has used CPU for C{settle} seconds (teardown has finished)."""
    end = time.monotonic() + limit
    last = [sum(cpu_seconds(p)) for p in pids]
    quiet_since = time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.05)
        now = [sum(cpu_seconds(p)) for p in pids]
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            return


# --------------------------------------------------------------------------------------------
# Client workloads
# --------------------------------------------------------------------------------------------

ADDR = "127.0.0.1"


def connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect((ADDR, port))
    return sock


def _c2a_stream(port: int, n: int) -> None:
    sock = connect(port)
    try:
        chunk = memoryview(bytes(CHUNK))
        left = n
        while left > 0:
            k = min(left, CHUNK)
            sock.sendall(chunk[:k])
            left -= k
        sock.shutdown(socket.SHUT_WR)
        (got,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
        if got != n:
            raise RuntimeError(f"sink counted {got} bytes, sent {n}")
    finally:
        sock.close()


def _a2c_stream(port: int, n: int) -> None:
    sock = connect(port)
    try:
        sock.sendall(HEADER.pack(n))
        buf = bytearray(CHUNK)
        got = 0
        while True:
            k = sock.recv_into(buf)
            if not k:
                break
            got += k
        if got != n:
            raise RuntimeError(f"source sent {got} bytes, expected {n}")
    finally:
        sock.close()


def bulk(port: int, total: int, streams: int, fn: Callable[[int, int], None]) -> dict[str, Any]:
    per = total // streams
    errors: list[BaseException] = []
    barrier = threading.Barrier(streams + 1)

    def run() -> None:
        barrier.wait()
        try:
            fn(port, per)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"bulk transfer failed: {errors[0]!r}")
    moved = per * streams
    return {"bytes": moved, "seconds": round(elapsed, 4), "MB_s": round(moved / elapsed / MB, 1),
            "streams": streams}


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)

    def pct(p: float) -> float:
        return round(s[min(len(s) - 1, int(p / 100 * len(s)))] / 1000, 1)

    return {"p50_us": pct(50), "p90_us": pct(90), "p99_us": pct(99),
            "mean_us": round(sum(s) / len(s) / 1000, 1), "max_us": round(s[-1] / 1000, 1),
            "samples": len(s)}


def _roundtrip(sock: socket.socket, msg: bytes) -> None:
    sock.sendall(msg)
    got = 0
    while got < len(msg):
        k = len(sock.recv(65536))
        if not k:
            raise ConnectionError("echo closed")
        got += k


def rtt_sequential(port: int, count: int, warmup: int = 50) -> dict[str, Any]:
    msg = b"x" * RTT_SIZE
    sock = connect(port)
    try:
        for _ in range(warmup):
            _roundtrip(sock, msg)
        lat = []
        clock = time.perf_counter_ns
        t0 = clock()
        for _ in range(count):
            t = clock()
            _roundtrip(sock, msg)
            lat.append(clock() - t)
        elapsed = (clock() - t0) / 1e9
    finally:
        sock.close()
    return {**_percentiles(lat), "rtt_s": round(count / elapsed), "seconds": round(elapsed, 3)}


def rtt_concurrent(port: int, conns: int, per_conn: int, warmup: int = 5) -> dict[str, Any]:
    """C{conns} connections, each doing C{per_conn} sequential round trips, all at once."""
    msg = b"x" * RTT_SIZE
    socks = [connect(port) for _ in range(conns)]
    try:
        for sock in socks:
            for _ in range(warmup):
                _roundtrip(sock, msg)
        sel = selectors.DefaultSelector()
        clock = time.perf_counter_ns
        lat: list[int] = []
        t0 = clock()
        for sock in socks:
            sock.setblocking(False)
            state = [per_conn, 0, clock()]  # round trips left, bytes of the reply, sent at
            sock.send(msg)
            sel.register(sock, selectors.EVENT_READ, state)
        active = conns
        while active:
            events = sel.select(timeout=10)
            if not events:
                raise RuntimeError("concurrent round trips stalled for 10 s")
            for key, _ in events:
                sock, state = key.fileobj, key.data
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("echo closed")
                state[1] += len(data)
                if state[1] >= RTT_SIZE:
                    now = clock()
                    lat.append(now - state[2])
                    state[0] -= 1
                    state[1] -= RTT_SIZE
                    if state[0]:
                        state[2] = now
                        sock.send(msg)
                    else:
                        sel.unregister(sock)
                        active -= 1
        elapsed = (clock() - t0) / 1e9
        sel.close()
    finally:
        for sock in socks:
            sock.close()
    return {**_percentiles(lat), "rtt_s": round(len(lat) / elapsed), "connections": conns,
            "seconds": round(elapsed, 3)}


def connrate_sequential(port: int, count: int, max_seconds: float) -> dict[str, Any]:
    """connect + one 16-byte round trip + close, one after the other."""
    clock = time.perf_counter_ns
    lat = []
    deadline = time.monotonic() + max_seconds
    t0 = clock()
    for _ in range(count):
        t = clock()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((ADDR, port))
        _roundtrip(sock, CONN_MSG)
        sock.close()
        lat.append(clock() - t)
        if time.monotonic() > deadline:
            break
    elapsed = (clock() - t0) / 1e9
    p = _percentiles(lat)
    return {"conn_s": round(len(lat) / elapsed), "connections": len(lat),
            "seconds": round(elapsed, 3), "p50_us": p["p50_us"], "p99_us": p["p99_us"]}


def connrate_parallel(port: int, workers: int, count: int, max_seconds: float) -> dict[str, Any]:
    """C{workers} connections in flight at all times (a selector loop), C{count} in all."""
    sel = selectors.DefaultSelector()
    started = done = errors = 0
    deadline = time.monotonic() + max_seconds
    clock = time.perf_counter_ns
    lat: list[int] = []

    def start() -> None:
        nonlocal started
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((ADDR, port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(err, os.strerror(err))
        sel.register(sock, selectors.EVENT_WRITE, [False, 0, clock()])
        started += 1

    def finish(sock: socket.socket, ok: bool) -> None:
        nonlocal done, errors
        sel.unregister(sock)
        sock.close()
        if ok:
            done += 1
        else:
            errors += 1
        if started < count and time.monotonic() < deadline:
            start()

    t0 = clock()
    for _ in range(min(workers, count)):
        start()
    while done + errors < started:
        events = sel.select(timeout=10)
        if not events:
            raise RuntimeError(f"connection rate stalled for 10 s ({started - done - errors} open)")
        for key, _ in events:
            sock, state = key.fileobj, key.data
            if not state[0]:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    finish(sock, False)
                    continue
                sock.send(CONN_MSG)
                state[0] = True
                sel.modify(sock, selectors.EVENT_READ, state)
                continue
            try:
                data = sock.recv(4096)
            except OSError:
                finish(sock, False)
                continue
            if not data:
                finish(sock, False)
                continue
            state[1] += len(data)
            if state[1] >= len(CONN_MSG):
                lat.append(clock() - state[2])
                finish(sock, True)
    elapsed = (clock() - t0) / 1e9
    sel.close()
    p = _percentiles(lat) if lat else {"p50_us": 0.0, "p99_us": 0.0}
    return {"conn_s": round(done / elapsed), "connections": done, "errors": errors,
            "workers": workers, "seconds": round(elapsed, 3), "p50_us": p["p50_us"],
            "p99_us": p["p99_us"]}


# --------------------------------------------------------------------------------------------
# Hub, agent and target processes
# --------------------------------------------------------------------------------------------


class LogTail:
    """Follows a JSON-lines log file written by a child process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.partial = b""
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        new = []
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return new
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            try:
                new.append(json.loads(line))
            except ValueError:
                new.append({"event": "(not json)", "message": line.decode(errors="replace")})
        self.events.extend(new)
        return new

    def wait_for(self, proc: subprocess.Popen[bytes], pred: Callable[[dict[str, Any]], bool],
                 what: str, timeout: float = 30.0) -> dict[str, Any]:
        for ev in self.events:
            if pred(ev):
                return ev
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for ev in self.poll():
                if pred(ev):
                    return ev
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        tail = self.path.read_text(errors="replace")[-4000:] if self.path.exists() else ""
        raise RuntimeError(f"timed out waiting for {what} in {self.path}:\n{tail}")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the benchmark dies, however it dies."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Rig:
    """Target, hub and agent processes, started in that order and stopped in reverse."""

    def __init__(self, workdir: Path, twistd: str) -> None:
        self.workdir = workdir
        self.twistd = twistd
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.target_ports: dict[str, int] = {}
        self.hub_ports: dict[str, int] = {}

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def start(self) -> None:
        target = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-target"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  preexec_fn=_die_with_parent)
        self.procs["target"] = target
        assert target.stdout is not None
        self.target_ports = json.loads(target.stdout.readline())

        token = secrets.token_urlsafe(24)
        connectors = list(self.target_ports)
        hub_yaml = self.workdir / "hub.yaml"
        hub_yaml.write_text(json.dumps({  # JSON is YAML
            "listen": "tcp:0:interface=127.0.0.1",
            "listeners": [{"connector": c, "bind": "127.0.0.1", "port": 0} for c in connectors],
            "agents": [{"id": "bench-agent",
                        "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                        "connectors": connectors}],
            "drain_seconds": 1.0,
        }, indent=2))
        env = {**os.environ, "NC_LOG_FORMAT": "json"}
        for var in ("NC_HUB_URL", "NC_AGENT_ID", "NC_AGENT_TOKEN", "NC_AGENT_TOKEN_FILE",
                    "NC_CONNECTORS"):
            env.pop(var, None)
        hub_log = self.workdir / "hub.log"
        self.procs["hub"] = self._twistd("nowconnect-hub", hub_yaml, hub_log, env)
        hub_tail = LogTail(hub_log)
        web = hub_tail.wait_for(self.procs["hub"], lambda e: e.get("event") == "web_started",
                                "web_started")
        for c in connectors:
            ev = hub_tail.wait_for(
                self.procs["hub"],
                lambda e, c=c: e.get("event") == "listener_started" and e.get("connector") == c,
                f"listener_started for {c}")
            self.hub_ports[c] = int(ev["port"])

        agent_yaml = self.workdir / "agent.yaml"
        agent_yaml.write_text(json.dumps({
            "hub_url": f"ws://127.0.0.1:{int(web['port'])}/tunnel",
            "agent_id": "bench-agent",
            "token": token,
            "connectors": {c: f"127.0.0.1:{p}" for c, p in self.target_ports.items()},
            "drain_seconds": 1.0,
        }, indent=2))
        agent_yaml.chmod(0o600)
        self.procs["agent"] = self._twistd("nowconnect-agent", agent_yaml,
                                           self.workdir / "agent.log", env)
        hub_tail.wait_for(self.procs["hub"], lambda e: e.get("event") == "agent_connected",
                          "agent_connected")

    def _twistd(self, plugin: str, config: Path, log: Path,
                env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = open(log, "wb")
        try:
            return subprocess.Popen(
                [self.twistd, "--nodaemon", "--pidfile=", "--logger", "nowconnect.logs.observer",
                 plugin, "--config", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, env=env, preexec_fn=_die_with_parent)
        finally:
            out.close()

    def stop(self) -> None:
        for name in ("agent", "hub", "target"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.workdir}")


# --------------------------------------------------------------------------------------------
# Profiling (optional): py-spy on the hub and the agent during chosen tunnel measurements
# --------------------------------------------------------------------------------------------

#: Other processes' CPU (% of one core) during a run above which the run is done again...
CLEAN_PCT = 10.0
#: ... at most this many extra times per run ...
MAX_RETRIES = 2
#: ... and while the benchmark has lost less than this many seconds in all to waiting for a
#: quiet machine and to runs done again.
CONTENTION_BUDGET = 90.0

PROFILED = ("rtt_1conn", "connrate_sequential", "connrate_parallel", "bulk_c2a_1", "bulk_a2c_1")


class Profiler:
    def __init__(self, outdir: Path, pyspy: str, rate: int) -> None:
        self.outdir = outdir
        self.pyspy = pyspy
        self.rate = rate
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, pids: dict[str, int]) -> None:
        for proc_name in ("hub", "agent"):
            out = self.outdir / f"{name}-{proc_name}.txt"
            self.running.append(subprocess.Popen(
                [self.pyspy, "record", "--pid", str(pids[proc_name]), "--rate", str(self.rate),
                 "--format", "raw", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # let py-spy attach

    def stop(self) -> None:
        for proc in self.running:
            proc.send_signal(signal.SIGINT)
        for proc in self.running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.running = []


def _frame_name(frame: str, line: bool = False) -> str:
    """C{"Cls.func (path/to/module.py:123)"} -> C{"Cls.func (module path tail)"}."""
    name, _, where = frame.partition(" (")
    path, _, lineno = where.rstrip(")").rpartition(":")
    for marker in ("site-packages/", "/work/main/", "python3.11/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path}:{lineno})" if line else f"{name} ({path})"


def _epoll_wait_line() -> str:
    """The C{doPoll} frame that means "blocked in epoll_wait": idle, not work."""
    try:
        from twisted.internet import epollreactor
        src = Path(epollreactor.__file__).read_text().splitlines()
        for i, text in enumerate(src, 1):
            if "self._poller.poll(" in text:
                return f"EPollReactor.doPoll (twisted/internet/epollreactor.py:{i})"
    except (ImportError, OSError):
        pass
    return "EPollReactor.doPoll (twisted/internet/epollreactor.py:227)"


#: Leaf frames that only wrap a system call: named with their caller, e.g. "untilConcludes <-
#: Connection.writeSomeData" is the send() of a TCP write.
_WRAPPERS = ("untilConcludes (", "_PollLikeMixin._doReadOrWrite (", "callWithContext (")
#: Dispatch frames every busy sample goes through; left out of the inclusive ranking.
_DISPATCH = ("ReactorBase.run (", "ReactorBase.mainLoop (", "EPollReactor.doPoll (",
             "callWithLogger (", "callWithContext (", "ThreadedContextTracker.callWithContext (",
             "ContextTracker.callWithContext (", "_PollLikeMixin._doReadOrWrite (",
             "ReactorBase.runUntilCurrent (")


def summarize_profile(path: Path, top: int = 10) -> dict[str, Any]:
    """
    Hot spots from a py-spy raw (collapsed) file: the reactor thread's samples, less the ones
    blocked in epoll_wait (py-spy's idle detection does not work in every container); samples in
    other threads (Twisted's thread pool, e.g. getaddrinfo) are counted apart.
    """
    idle_leaf = _epoll_wait_line()
    self_counts: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    busy = idle = pool_busy = 0
    if not path.exists():
        return {"busy_samples": 0, "self": [], "inclusive": [], "nowconnect": []}
    for text in path.read_text(errors="replace").splitlines():
        stack, _, count = text.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if " (" in f]
        if not frames:
            continue
        leaf = _frame_name(frames[-1], line=True)
        if not frames[0].startswith("<module> (twistd"):  # a thread-pool thread
            if not leaf.startswith(("Condition.wait (", "Queue.get (")):
                pool_busy += n
            continue
        if leaf == idle_leaf:
            idle += n
            continue
        busy += n
        names = [_frame_name(f) for f in frames]
        key = names[-1]
        if key.startswith(_WRAPPERS) and len(names) > 1:
            key = f"{key.split(' (')[0]} <- {names[-2]}"
        self_counts[key] += n
        for name in set(names):
            if name.startswith(_DISPATCH) or "/" not in name or "scripts/" in name \
                    or "application/" in name or name.startswith("<module>"):
                continue
            incl[name] += n
            if "nowconnect/" in name:
                ours[name] += n

    def rows(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * c / busy, 1)] for name, c in counter.most_common(top)]

    total = busy + idle
    return {
        "busy_samples": busy,
        "idle_pct": round(100 * idle / total, 1) if total else 0.0,
        "threadpool_busy_samples": pool_busy,
        "self": rows(self_counts) if busy else [],
        "inclusive": rows(incl) if busy else [],
        "nowconnect": rows(ours) if busy else [],
    }


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    commit = ""
    try:
        here = Path(__file__).resolve().parent.parent
        git = ["git", "--no-optional-locks", "-C", str(here)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "--", "nowconnect", "twisted"],
                                 capture_output=True, text=True, timeout=5).stdout.strip()
        if commit and changed:
            commit += " (nowconnect/ modified)"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import nowconnect
        source = os.path.dirname(os.path.dirname(os.path.abspath(nowconnect.__file__)))
    except ImportError:
        source = ""
    return {
        "nowconnect_source": source,
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": version("Twisted"),
        "autobahn": version("autobahn"),
        "nowconnect": version("nowconnect"),
        "commit": commit,
    }


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"bulk_bytes": 256 * MiB, "rtt_seq": 1000, "rtt_conc_per_conn": 60,
                "conn_seq": 500, "conn_par": 1500, "conn_seconds": 5.0}
    return {"bulk_bytes": 512 * MiB, "rtt_seq": 3000, "rtt_conc_per_conn": 150,
            "conn_seq": 1500, "conn_par": 5000, "conn_seconds": 10.0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    p = plan(args.quick)
    order = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(order) - {"latency", "connrate", "bulk"}
    if unknown or not order:
        raise SystemExit(f"--only: unknown phase(s) {sorted(unknown)}; use latency,connrate,bulk")
    workdir = Path(tempfile.mkdtemp(prefix="ncbench-"))
    rig = Rig(workdir, args.twistd)
    profiler = None
    if args.profile:
        outdir = Path(args.profile)
        outdir.mkdir(parents=True, exist_ok=True)
        bindir = os.path.dirname(sys.executable)
        pyspy = shutil.which("py-spy", path=bindir) or shutil.which("py-spy")
        if not pyspy:
            raise SystemExit("--profile needs py-spy (pip install py-spy)")
        profiler = Profiler(outdir, pyspy, args.profile_rate)
    results: dict[str, Any] = {}
    overall_peak: dict[str, int] = {}
    contention = {"s": 0.0, "retries": 0}

    def quiet(limit: float) -> None:
        contention["s"] += wait_quiet(min(limit, CONTENTION_BUDGET - contention["s"]))
    repeat = args.repeat or (1 if args.quick else 3)
    t_start = time.monotonic()
    try:
        rig.start()
        pids = rig.pids()
        tunnel_pids = [pids["hub"], pids["agent"]]
        say(f"rig up in {workdir}: target {rig.target_ports}, hub {rig.hub_ports}, "
            f"pids {pids}")

        # Sanity: one exchange of each kind through the tunnel.
        rtt_sequential(rig.hub_ports["echo"], 10, warmup=1)
        _c2a_stream(rig.hub_ports["sink"], 100_000)
        _a2c_stream(rig.hub_ports["source"], 100_000)
        wait_idle(tunnel_pids)
        overall_peak.update({name: status_kib(pid, "VmHWM") for name, pid in pids.items()})

        def one_tunnel_run(name: str, fn: Callable[[int], dict[str, Any]], port: int,
                           units: Callable[[dict[str, Any]], dict[str, Any]],
                           profile: bool) -> dict[str, Any]:
            wait_idle(tunnel_pids)
            quiet(args.wait_quiet)
            if profile:
                assert profiler is not None
                profiler.start(name, pids)
            try:
                with Meter(pids) as meter:
                    res = fn(port)
                    wait_idle(tunnel_pids)  # teardown work counts too
                    res["procs"] = meter.finish()
            finally:
                if profile:
                    assert profiler is not None
                    profiler.stop()
            for proc in ("hub", "agent"):
                cpu = res["procs"][proc]["cpu_s"]
                res["procs"][proc]["cpu_per_unit"] = {
                    u: round(cpu * scale / amount, 2) if amount else None
                    for u, (amount, scale) in units(res).items()}
                res["procs"][proc]["cpu_pct_of_core"] = round(100 * cpu / res["seconds"], 1)
            for proc, rss in res["procs"].items():
                if isinstance(rss, dict) and "peak_rss_kib" in rss:
                    overall_peak[proc] = max(overall_peak.get(proc, 0), rss["peak_rss_kib"])
            return res

        def measure(name: str, service: str, fn: Callable[[int], dict[str, Any]],
                    units: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
            """Direct and tunnel, interleaved, C{repeat} times; keep the median run of each."""
            key = HEADLINE[name]
            runs: dict[str, list[dict[str, Any]]] = {"direct": [], "tunnel": []}
            for i in range(repeat):
                attempts: list[tuple[float, dict[str, Any], dict[str, Any]]] = []
                while True:
                    wait_idle(tunnel_pids)
                    quiet(args.wait_quiet)
                    t0 = time.monotonic()
                    with Meter({"target": pids["target"]}) as meter:
                        direct = fn(rig.target_ports[service])
                        direct["procs"] = meter.finish()
                    profiled = profiler is not None and name in PROFILED and i == 0
                    tunnel = one_tunnel_run(name, fn, rig.hub_ports[service], units,
                                            profile=profiled)
                    rig.check_alive()
                    foreign = max(direct["procs"]["foreign"]["pct_of_core"],
                                  tunnel["procs"]["foreign"]["pct_of_core"])
                    attempts.append((foreign, direct, tunnel))
                    # (py-spy itself counts as other load: a profiled run is not repeated.)
                    if foreign < CLEAN_PCT or profiled or len(attempts) > MAX_RETRIES \
                            or contention["s"] >= CONTENTION_BUDGET:
                        break
                    # Other work on the machine skewed this run: do it again.
                    contention["s"] += time.monotonic() - t0
                    contention["retries"] += 1
                    say(f"{name}: other load {foreign:.0f}% of a core, running it again")
                foreign, direct, tunnel = min(attempts, key=lambda a: a[0])
                runs["direct"].append(direct)
                runs["tunnel"].append(tunnel)
            entry = {}
            for path, rs in runs.items():
                median = sorted(rs, key=lambda r: r[key])[len(rs) // 2]
                entry[path] = {**median, "runs": [r[key] for r in rs]}
            results[name] = entry
            say(f"{name}: {summary_line(entry)}")

        def per_mb(r: dict[str, Any]) -> dict[str, Any]:
            return {"ms_per_MB": (r["bytes"] / MB, 1000)}

        def per_rtt(r: dict[str, Any]) -> dict[str, Any]:
            return {"us_per_rtt": (r["samples"], 1e6)}

        def per_conn(r: dict[str, Any]) -> dict[str, Any]:
            return {"us_per_conn": (r["connections"], 1e6)}

        def bulk_of(streams: int, fn: Callable[[int, int], None]) -> Callable[[int], Any]:
            return lambda port: bulk(port, p["bulk_bytes"], streams, fn)

        phases: dict[str, Callable[[], None]] = {
            "latency": lambda: (
                measure("rtt_1conn", "echo",
                        lambda port: rtt_sequential(port, p["rtt_seq"]), per_rtt),
                measure("rtt_32conn", "echo",
                        lambda port: rtt_concurrent(port, 32, p["rtt_conc_per_conn"]), per_rtt)),
            "connrate": lambda: (
                measure("connrate_sequential", "echo",
                        lambda port: connrate_sequential(port, p["conn_seq"], p["conn_seconds"]),
                        per_conn),
                measure("connrate_parallel", "echo",
                        lambda port: connrate_parallel(port, 32, p["conn_par"],
                                                       p["conn_seconds"]), per_conn)),
            "bulk": lambda: (
                measure("bulk_c2a_1", "sink", bulk_of(1, _c2a_stream), per_mb),
                measure("bulk_c2a_4", "sink", bulk_of(4, _c2a_stream), per_mb),
                measure("bulk_a2c_1", "source", bulk_of(1, _a2c_stream), per_mb),
                measure("bulk_a2c_4", "source", bulk_of(4, _a2c_stream), per_mb)),
        }
        for phase in order:
            phases[phase]()

        for name, pid in pids.items():
            overall_peak[name] = max(overall_peak.get(name, 0), status_kib(pid, "VmHWM"))
        rss_final = {name: status_kib(pid, "VmRSS") for name, pid in pids.items()}
    finally:
        if profiler:
            profiler.stop()
        rig.stop()
    profile = {}
    if profiler:
        for name in PROFILED:
            for proc in ("hub", "agent"):
                f = profiler.outdir / f"{name}-{proc}.txt"
                if f.exists():
                    profile[f"{name}/{proc}"] = summarize_profile(f)
                    profile[f"{name}/{proc}"]["raw_file"] = str(f)
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(["python", *sys.argv]),
        "note": args.note,
        "machine": machine_info(),
        "plan": p,
        "order": order,
        "wall_seconds": round(time.monotonic() - t_start, 1),
        "results": results,
        "repeat": repeat,
        "contention": {"seconds_lost": round(contention["s"], 1),
                       "runs_retried": contention["retries"]},
        "peak_rss_kib": overall_peak,
        "rss_kib_final": rss_final,
        "workdir": str(workdir),
    }
    if profile:
        out["profile"] = profile
    if not args.keep_tmp:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summary_line(entry: dict[str, Any]) -> str:
    d, t = entry["direct"], entry["tunnel"]
    for key in ("MB_s", "conn_s", "p50_us"):
        if key in d:
            extra = ""
            if key == "p50_us":
                extra = f" p99 {d['p99_us']} -> {t['p99_us']}"
            procs = t["procs"]
            return (f"{key} direct {d[key]} tunnel {t[key]}{extra}  "
                    f"hub {procs['hub']['cpu_s']} s CPU, agent {procs['agent']['cpu_s']} s CPU")
    return ""


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

ROWS = [
    # (result, key, label, unit, higher is better)
    ("bulk_c2a_1", "MB_s", "Bulk c2a (client→target), 1 stream", "MB/s", True),
    ("bulk_c2a_4", "MB_s", "Bulk c2a, 4 parallel streams (sum)", "MB/s", True),
    ("bulk_a2c_1", "MB_s", "Bulk a2c (target→client), 1 stream", "MB/s", True),
    ("bulk_a2c_4", "MB_s", "Bulk a2c, 4 parallel streams (sum)", "MB/s", True),
    ("rtt_1conn", "p50_us", "RTT 200 B, 1 connection, p50", "µs", False),
    ("rtt_1conn", "p99_us", "RTT 200 B, 1 connection, p99", "µs", False),
    ("rtt_1conn", "rtt_s", "Round trips/s, 1 connection", "1/s", True),
    ("rtt_32conn", "p50_us", "RTT 200 B, 32 concurrent connections, p50", "µs", False),
    ("rtt_32conn", "p99_us", "RTT 200 B, 32 concurrent connections, p99", "µs", False),
    ("rtt_32conn", "rtt_s", "Round trips/s, 32 connections (sum)", "1/s", True),
    ("connrate_sequential", "conn_s", "Connections/s, sequential (connect+16 B RTT+close)",
     "conn/s", True),
    ("connrate_parallel", "conn_s", "Connections/s, 32 parallel workers", "conn/s", True),
]

#: The figure each measurement's median run is chosen by.
HEADLINE = {"bulk_c2a_1": "MB_s", "bulk_c2a_4": "MB_s", "bulk_a2c_1": "MB_s", "bulk_a2c_4": "MB_s",
            "rtt_1conn": "p50_us", "rtt_32conn": "p50_us", "connrate_sequential": "conn_s",
            "connrate_parallel": "conn_s"}

COST_ROWS = [
    ("bulk_c2a_1", "ms_per_MB", "Bulk c2a, 1 stream"),
    ("bulk_c2a_4", "ms_per_MB", "Bulk c2a, 4 streams"),
    ("bulk_a2c_1", "ms_per_MB", "Bulk a2c, 1 stream"),
    ("bulk_a2c_4", "ms_per_MB", "Bulk a2c, 4 streams"),
    ("rtt_1conn", "us_per_rtt", "RTT, 1 connection"),
    ("rtt_32conn", "us_per_rtt", "RTT, 32 connections"),
    ("connrate_sequential", "us_per_conn", "Connections, sequential"),
    ("connrate_parallel", "us_per_conn", "Connections, 32 parallel"),
]

UNIT_LABEL = {"ms_per_MB": "ms CPU / MB", "us_per_rtt": "µs CPU / round trip",
              "us_per_conn": "µs CPU / connection"}


def _fmt(v: float) -> str:
    if isinstance(v, float) and v < 100:
        return f"{v:.1f}"
    return f"{v:,.0f}"


def render(out: dict[str, Any]) -> str:
    res = out["results"]
    lines = [f"| Measurement | Unit | Direct | Tunnel | Tunnel ÷ direct "
             f"| Tunnel, {out['repeat']} runs (min–max) |",
             "|---|---|---:|---:|---:|---:|"]
    for name, key, label, unit, _ in ROWS:
        if name not in res:
            continue
        d, t = res[name]["direct"][key], res[name]["tunnel"][key]
        ratio = f"{t / d:.2f}×" if d else "n/a"
        runs = res[name]["tunnel"]["runs"]
        spread = f"{_fmt(min(runs))}–{_fmt(max(runs))}" if key == HEADLINE[name] else ""
        lines.append(f"| {label} | {unit} | {_fmt(d)} | {_fmt(t)} | {ratio} | {spread} |")
    lines += ["", "Tunnel cost (hub and agent processes, user+sys from /proc/PID/stat; "
              "% = share of one core during the measurement; peak RSS over the measurement):", "",
              "| Measurement | Unit | Hub CPU | Agent CPU | Hub % core | Agent % core "
              "| Client+target % core | Kernel softirq % core | Other load % core "
              "| Hub peak RSS | Agent peak RSS |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, unit, label in COST_ROWS:
        if name not in res:
            continue
        t = res[name]["tunnel"]
        hub, agent = t["procs"]["hub"], t["procs"]["agent"]
        other = 100 * (t["procs"]["target"]["cpu_s"] + t["procs"]["client"]["cpu_s"]) / t["seconds"]
        foreign = t["procs"]["foreign"]["pct_of_core"]
        lines.append(
            f"| {label} | {UNIT_LABEL[unit]} | {hub['cpu_per_unit'][unit]} "
            f"| {agent['cpu_per_unit'][unit]} | {hub['cpu_pct_of_core']} "
            f"| {agent['cpu_pct_of_core']} | {other:.0f} "
            f"| {t['procs']['softirq']['pct_of_core']:.0f} | {foreign:.0f} "
            f"| {hub['peak_rss_kib'] / 1024:.1f} MiB | {agent['peak_rss_kib'] / 1024:.1f} MiB |")
    m = out["machine"]
    foreign = [(r["tunnel"]["procs"]["foreign"]["pct_of_core"], name) for name, r in res.items()]
    if foreign and max(foreign)[0] >= 10:
        lines += ["", f"WARNING: other processes used up to {max(foreign)[0]:.0f}% of a core "
                  f"during a tunnel run ({max(foreign)[1]}): figures are skewed."]
    steal = [(r["tunnel"]["procs"]["steal"]["pct_of_core"], name) for name, r in res.items()]
    if steal and max(steal)[0] >= 10:
        lines += ["", f"WARNING: the hypervisor stole up to {max(steal)[0]:.0f}% of a core "
                  f"during a tunnel run ({max(steal)[1]}): figures are skewed."]
    c = out["contention"]
    if c["runs_retried"] or c["seconds_lost"] > 1:
        lines += ["", f"Other load on the machine: {c['runs_retried']} run(s) done again, "
                  f"{c['seconds_lost']} s lost waiting or repeating."]
    lines += ["", f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, "
              f"Python {m['python']}, Twisted {m['twisted']}, Autobahn {m['autobahn']}, "
              f"nowconnect {m['nowconnect']} @ {m['commit'] or '?'} "
              f"from {m['nowconnect_source']}; wall time {out['wall_seconds']} s."]
    if out["note"]:
        lines.append(f"Note: {out['note']}")
    return "\n".join(lines)


def render_profile(out: dict[str, Any]) -> str:
    lines = ["", "Profiles (py-spy, reactor thread, % of busy samples; figures of a profiled run "
             "are perturbed):"]
    for key, prof in out.get("profile", {}).items():
        lines.append(f"\n### {key}: {prof['busy_samples']} busy samples, reactor idle "
                     f"{prof['idle_pct']}%, thread-pool busy samples "
                     f"{prof['threadpool_busy_samples']}\n")
        for title, field in (("Self time", "self"), ("Inclusive (library and project)",
                                                     "inclusive"),
                             ("Inclusive, nowconnect only", "nowconnect")):
            lines.append(f"{title}:")
            lines.extend(f"  {pct:5.1f}%  {name}" for name, pct in prof[field])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="256 MiB bulk transfers and fewer round trips/connections")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--only", metavar="LIST", default="latency,connrate,bulk",
                        help="phases to run, in this order (default: %(default)s)")
    parser.add_argument("--profile", metavar="DIR",
                        help="run py-spy on hub and agent during " + ", ".join(PROFILED)
                        + " (tunnel side) and summarise hot spots; perturbs the figures")
    parser.add_argument("--repeat", type=int, default=0,
                        help="runs of each measurement, median reported (default 3, --quick 1)")
    parser.add_argument("--wait-quiet", type=float, default=10.0, metavar="SECONDS",
                        help="before each run wait up to this long for the machine to be idle "
                        "(default %%(default)s; 0: don't wait). Runs during which other "
                        "processes used more than %d%%%% of a core are done again, up to %d times; "
                        "waits and repeats stop after %d s in all"
                        % (CLEAN_PCT, MAX_RETRIES, CONTENTION_BUDGET))
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument("--twistd", default=shutil.which("twistd", path=os.path.dirname(
        sys.executable)) or shutil.which("twistd") or "twistd", help="twistd executable")
    parser.add_argument("--note", default="",
                        help="free text stored with the results (e.g. which snapshot ran)")
    parser.add_argument("--keep-tmp", action="store_true",
                        help="keep the temp dir with configs and hub/agent logs")
    parser.add_argument("--serve-target", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_target:
        serve_target()
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the rig is stopped
    out = run(args)
    print(render(out))
    if "profile" in out:
        print(render_profile(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
