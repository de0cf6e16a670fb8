#!/usr/bin/env python
"""
LDAP through NowConnect: bind + search round trips per second and their latency, DIRECT
(client -> slapd) against TUNNEL (client -> hub listener -> WebSocket -> agent -> slapd).

    python bench/ldap_bench.py [--duration 5] [--warmup 1] [--concurrency 1,32]
                               [--clients raw,ldap3] [--modes reuse,connect]
                               [--entries 1000] [--json out.json]

One round trip is a simple bind as uid=alice followed by a subtree search of ou=bulk for one
random ``(uid=userNNNNN)`` entry (cn, mail), which must return exactly that entry.  Two modes:

* ``reuse``: each client keeps one connection and repeats bind + search on it (a pooled client);
* ``connect``: each round trip is a new TCP connection: connect, bind, search, unbind, close
  (short-lived clients; this also exercises the tunnel's stream open/close).

Two clients:

* ``ldap3``: the real library, as applications use it (SYNC strategy, ``get_info=NONE``).
  ldap3 spends ~0.5-1 ms of Python CPU per operation, so it measures the client as much as
  the path;
* ``raw``: the same LDAP PDUs BER-encoded by hand and sent on a plain socket, replies parsed
  only enough to check result codes and the entry: a client that costs almost nothing, so the
  figure is the path's.  Like ldap3 it waits for the bind's answer before sending the search
  (two exchanges per round trip, no pipelining).

Concurrency N means N client *processes* (multiprocessing, fork), each one connection at a time,
so the GIL is never the limit.  slapd (from ``tests/slapd.py``: a private instance with
``--entries`` bulk entries) and the hub and agent (``tests/harness.py``: real ``twistd``
processes, JSON logs, ephemeral ports) run on the same machine, so with few cores the clients,
slapd, hub and agent share them: the CPU seconds each used per round trip are reported too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from harness import Deployment  # noqa: E402
from slapd import BASE_DN, Slapd, bulk_ldif  # noqa: E402

BIND_DN = f"uid=alice,ou=people,{BASE_DN}"
BIND_PW = "alicepw"
BULK = f"ou=bulk,{BASE_DN}"
ATTRS = ("cn", "mail")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- a minimal BER/LDAP client ---------------------------------------------------------------

def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _len(len(content)) + content


def _int(tag: int, value: int) -> bytes:
    return _tlv(tag, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def _str(value: str, tag: int = 0x04) -> bytes:
    return _tlv(tag, value.encode())


def _message(msgid: int, op: bytes) -> bytes:
    return _tlv(0x30, _int(0x02, msgid) + op)


def bind_pdu(msgid: int) -> bytes:
    """BindRequest [APPLICATION 0]: version 3, name, simple [0] password."""
    return _message(msgid, _tlv(0x60, _int(0x02, 3) + _str(BIND_DN) + _str(BIND_PW, 0x80)))


def search_pdu(msgid: int, uid: str) -> bytes:
    """SearchRequest [APPLICATION 3]: subtree of ou=bulk, (uid=...) equalityMatch [3]."""
    body = (_str(BULK) + _tlv(0x0A, b"\x02") + _tlv(0x0A, b"\x00") + _int(0x02, 0)
            + _int(0x02, 0) + _tlv(0x01, b"\x00")
            + _tlv(0xA3, _str("uid") + _str(uid))
            + _tlv(0x30, b"".join(_str(a) for a in ATTRS)))
    return _message(msgid, _tlv(0x63, body))


UNBIND = _message(99, b"\x42\x00")


class RawConn:
    """One LDAP connection with pre-encoded requests; replies are checked, not decoded."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.bind = bind_pdu(1)

    def _message(self) -> tuple[int, bytes]:
        """(protocolOp tag, whole message) of the next LDAPMessage."""
        while True:
            if len(self.buf) >= 2:
                first = self.buf[1]
                if first < 0x80:
                    hdr, length = 2, first
                else:
                    n = first & 0x7F
                    hdr = 2 + n
                    length = int.from_bytes(self.buf[2:hdr], "big") if len(self.buf) >= hdr else -1
                if length >= 0 and len(self.buf) >= hdr + length:
                    msg, self.buf = self.buf[:hdr + length], self.buf[hdr + length:]
                    # skip messageID (INTEGER, short) to the protocolOp tag
                    id_len = msg[hdr + 1]
                    return msg[hdr + 2 + id_len], msg
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by peer")
            self.buf += data

    @staticmethod
    def _result_code(msg: bytes, tag: int) -> int:
        i = msg.index(bytes([tag]))  # protocolOp; its first element is ENUMERATED resultCode
        i += 2 if msg[i + 1] < 0x80 else 2 + (msg[i + 1] & 0x7F)
        assert msg[i] == 0x0A, msg
        return msg[i + 2]

    def round_trip(self, number: int) -> None:
        uid = f"user{number:05d}"
        # Two exchanges, like ldap3 (and most clients): the search goes out after the bind's
        # answer.  Pipelining both in one write would hide one round trip through the tunnel.
        self.sock.sendall(self.bind)
        tag, msg = self._message()
        if tag != 0x61 or self._result_code(msg, 0x61) != 0:
            raise AssertionError(f"bind failed: {msg!r}")
        self.sock.sendall(search_pdu(2, uid))
        found = 0
        while True:
            tag, msg = self._message()
            if tag == 0x64:
                if f"uid={uid},".encode() not in msg:
                    raise AssertionError(f"wrong entry for {uid}: {msg[:80]!r}")
                found += 1
            elif tag == 0x65:
                if self._result_code(msg, 0x65) != 0 or found != 1:
                    raise AssertionError(f"search for {uid}: {found} entries, {msg!r}")
                return

    def close(self, unbind: bool = True) -> None:
        try:
            if unbind:
                self.sock.sendall(UNBIND)
        finally:
            self.sock.close()


class Ldap3Conn:
    """The same round trip with ldap3."""

    def __init__(self, host: str, port: int) -> None:
        import ldap3

        self.ldap3 = ldap3
        server = ldap3.Server(host, port=port, get_info=ldap3.NONE, connect_timeout=10)
        self.conn = ldap3.Connection(server, BIND_DN, BIND_PW, receive_timeout=10)
        self.conn.open()

    def round_trip(self, number: int) -> None:
        uid = f"user{number:05d}"
        if not self.conn.bind():
            raise AssertionError(f"bind failed: {self.conn.result}")
        self.conn.search(BULK, f"(uid={uid})", self.ldap3.SUBTREE, attributes=list(ATTRS))
        dns = [r["dn"] for r in self.conn.response if r["type"] == "searchResEntry"]
        if dns != [f"uid={uid},{BULK}"]:
            raise AssertionError(f"search for {uid}: {dns} {self.conn.result}")

    def close(self, unbind: bool = True) -> None:
        self.conn.unbind()


CLIENTS = {"raw": RawConn, "ldap3": Ldap3Conn}


# -- workers ---------------------------------------------------------------------------------

def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One client process: round trips from start to end (wall clock); latencies after warmup."""
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)  # ldap3 + pyasn1 on import
    cls = CLIENTS[job["client"]]
    rnd = random.Random(job["seed"])
    host, port, entries = job["host"], job["port"], job["entries"]
    record_from, end = job["record_from"], job["end"]
    latencies: list[float] = []
    errors = 0
    conn = None
    while time.time() < job["start"]:
        time.sleep(0.001)
    cpu0 = time.process_time()
    while True:
        t0 = time.time()
        if t0 >= end:
            break
        try:
            if conn is None:
                conn = cls(host, port)
            conn.round_trip(rnd.randint(1, entries))
            if job["mode"] == "connect":
                conn.close()
                conn = None
        except (OSError, AssertionError, Exception):  # counted, never fatal
            errors += 1
            if conn is not None:
                try:
                    conn.close(unbind=False)
                except Exception:
                    pass
            conn = None
            continue
        t1 = time.time()
        if t0 >= record_from:
            latencies.append(t1 - t0)
    if conn is not None:
        conn.close()
    return {"latencies": latencies, "errors": errors, "cpu": time.process_time() - cpu0}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def run_cell(pool: Any, host: str, port: int, client: str, mode: str, n: int,
             args: argparse.Namespace, pids: dict[str, int]) -> dict[str, Any]:
    start = time.time() + 0.3
    jobs = [{"client": client, "mode": mode, "host": host, "port": port, "entries": args.entries,
             "seed": i * 7919 + n, "start": start, "record_from": start + args.warmup,
             "end": start + args.warmup + args.duration} for i in range(n)]
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    results = pool.map(worker, jobs, chunksize=1)
    cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    lat = sorted(x for r in results for x in r["latencies"])
    errors = sum(r["errors"] for r in results)
    total_time = args.warmup + args.duration
    ops = len(lat)
    cell: dict[str, Any] = {
        "client": client, "mode": mode, "concurrency": n, "round_trips": ops, "errors": errors,
        "per_second": ops / args.duration,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
        "mean_ms": 1000 * statistics.fmean(lat) if lat else None,
        # CPU per recorded round trip over the whole window (warmup included: rough, same for all)
        "cpu_ms_per_rt": {name: 1000 * (cpu1[name] - cpu0[name]) / max(1, ops) * args.duration
                          / total_time for name in pids},
        "client_cpu_ms_per_rt": 1000 * sum(r["cpu"] for r in results) / max(1, ops)
        * args.duration / total_time,
    }
    return cell


# -- main ------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024 // 1024} GiB"
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    return {"cpus": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "twisted": version("twisted"),
            "autobahn": version("autobahn"), "ldap3": version("ldap3"),
            "nowconnect": version("nowconnect")}


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def table(cells: list[dict[str, Any]]) -> str:
    rows = ["| client | mode | clients | path | round trips/s | p50 ms | p99 ms | errors | "
            "CPU ms/rt hub | agent | slapd | clients |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        cpu = c["cpu_ms_per_rt"]
        rows.append(
            f"| {c['client']} | {c['mode']} | {c['concurrency']} | {c['path']} | "
            f"{c['per_second']:,.0f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | {c['errors']} | "
            f"{cpu.get('hub', 0):.2f} | {cpu.get('agent', 0):.2f} | {cpu['slapd']:.2f} | "
            f"{c['client_cpu_ms_per_rt']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds first")
    p.add_argument("--concurrency", default="1,32", help="client process counts, e.g. 1,32")
    p.add_argument("--clients", default="raw,ldap3", help="raw and/or ldap3")
    p.add_argument("--modes", default="reuse,connect", help="reuse and/or connect")
    p.add_argument("--paths", default="direct,tunnel", help="direct and/or tunnel")
    p.add_argument("--entries", type=int, default=1000, help="bulk entries in slapd")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    args = p.parse_args(argv)
    concurrency = [int(x) for x in args.concurrency.split(",")]

    load_before = loadavg()
    work = Path(tempfile.mkdtemp(prefix="ldap-bench-"))
    slapd = Slapd(work / "slapd", extra_ldif=[bulk_ldif(args.entries)]).start()
    d = Deployment(work / "nc", {"addomain": (slapd.host, slapd.port)})
    cells: list[dict[str, Any]] = []
    try:
        d.start_hub()
        d.start_agent()
        assert slapd.process is not None
        pids = {"hub": d.hub_pid, "agent": d.agent_pid, "slapd": slapd.process.pid}
        targets = {"direct": (slapd.host, slapd.port),
                   "tunnel": ("127.0.0.1", d.listener_port["addomain"])}
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(max(concurrency)) as pool:
            for client in args.clients.split(","):
                for mode in args.modes.split(","):
                    for n in concurrency:
                        for path in args.paths.split(","):
                            host, port = targets[path]
                            cell = run_cell(pool, host, port, client, mode, n, args,
                                            pids if path == "tunnel" else {"slapd": pids["slapd"]})
                            cell["path"] = path
                            cells.append(cell)
                            print(f"{client:5} {mode:7} x{n:<3} {path:6} "
                                  f"{cell['per_second']:8.0f}/s p50 {cell['p50_ms']:.2f} ms "
                                  f"p99 {cell['p99_ms']:.2f} ms errors {cell['errors']}",
                                  file=sys.stderr, flush=True)
    finally:
        d.close()
        slapd.stop()
    info = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "loadavg_before": load_before, "loadavg_after": loadavg(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "duration": args.duration, "warmup": args.warmup, "entries": args.entries,
            "cells": cells}
    print(json.dumps(info["machine"]))
    print(f"load average before {load_before}, after {info['loadavg_after']} "
          "(other work on the machine skews every figure: compare within one run)")
    print(table(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
