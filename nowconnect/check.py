"""
C{nowconnect check}: the users' "ping-pong" runbook as one blocking command.

Four steps, in order, each reported as one C{PASS}, C{FAIL} or C{SKIP} line:

 1. C{healthz}: C{GET <hub>/healthz} answers 200.
 2. C{agent}: C{nowconnect_agents_connected{connector=NAME}} in C{<hub>/metrics} is at least 1.
    This scrape is also the "before" picture for step 4.
 3. C{round_trip}: one client connection through the hub listener.

    - Plain TCP (default): connect, send a probe of about 30 bytes, then read until the probe is
      echoed back, the peer closes or resets, or L{HOLD_SECONDS} (1 s) pass.  It passes when
      the probe came back (an echo target), when any other reply came back, or when the
      connection is still open, not closed or reset, after 1 s (a target that does not answer
      unknown bytes, as slapd does not; a server that closes on them fails: for LDAP, use
      C{--ldap-base}).
      It fails when the connection is refused, times out, or is closed or reset before any
      byte came back.
    - LDAP (C{--ldap-base DN}): an anonymous bind and a base-scope search of C{DN} with
      ldap3.  It passes when the server answered both, whatever the LDAP result codes (they
      are reported: the tunnel carried the traffic either way).

    A failure is diagnosed from what the hub counted meanwhile
    (C{nowconnect_tcp_open_failures{connector,reason}} deltas: C{cidr_blocked}, C{no_agent},
    C{target_refused}, ...); when the hub counted nothing, from what the client saw: closed
    without traffic suggests C{cidr_blocked}, a reset suggests the agent's target refused.
 4. C{counters}: a second scrape; the deltas of C{nowconnect_tcp_connections_total{connector}}
    (at least 1), C{nowconnect_tcp_bytes_total{direction="c2a"}} (at least the bytes sent),
    C{direction="a2c"} (at least the bytes received) and C{nowconnect_tcp_open_seconds_count}
    (at least 1: the agent reported the target connected; a connection merely held open does
    not prove that).  Other clients' traffic in the same interval only adds to the deltas.

A failed step skips the steps that depend on it (2 and later after 1; 3 and 4 after 2); step 4
still prints its deltas after a failed step 3, as a diagnostic.  Plain blocking Python
(C{urllib}, C{socket}): no reactor.  HTTP goes straight to the hub, ignoring C{*_proxy}
environment variables, like the TCP step must; an C{https} hub is verified against the system
CAs or C{--ca-file} (no client certificate is sent, so a mutual-TLS web port fails step 1).
"""
# -*- test-case-name: tests.test_cli -*-

from __future__ import annotations

import json
import math
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import attrs

from nowconnect.config import parse_target

#: A plain-TCP round trip passes if the connection is neither closed nor reset this long.
HOLD_SECONDS = 1.0
#: Exit statuses: every step passed; a step failed; bad arguments or a missing extra.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LDAP_MISSING = "--ldap-base needs ldap3: pip install 'nowconnect[ldap]'"

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
STEP_COUNT = 4


class UsageError(Exception):
    """An argument cannot be used (bad URL or address, ldap3 missing); exit L{EXIT_USAGE}."""


# -- metrics ----------------------------------------------------------------------------------


@attrs.frozen
class Sample:
    """One exposition sample; C{labels} keeps the exposition's label order."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


def series(name: str, labels: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """C{name{k="v",...}} as Prometheus prints it (values are our own, never need escaping)."""
    pairs = labels.items() if isinstance(labels, Mapping) else labels
    inner = ",".join(f'{k}="{v}"' for k, v in pairs)
    return f"{name}{{{inner}}}" if inner else name


class Scrape:
    """The samples of one C{/metrics} answer, looked up by name and labels."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = tuple(samples)

    def matching(self, name: str, **labels: str) -> list[Sample]:
        """Samples called C{name} whose labels include every given C{label=value}."""
        return [s for s in self.samples
                if s.name == name and all(dict(s.labels).get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of the matching samples, or None when there is none."""
        found = self.matching(name, **labels)
        return sum(s.value for s in found) if found else None

    def label_values(self, name: str, label: str) -> list[str]:
        return sorted({dict(s.labels)[label] for s in self.matching(name)
                       if label in dict(s.labels)})


def parse_metrics(text: str) -> Scrape:
    """Parse Prometheus text exposition (prometheus-client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [Sample(s.name, tuple(s.labels.items()), float(s.value))
               for family in text_string_to_metric_families(text) for s in family.samples]
    return Scrape(samples)


CONNECTIONS = "nowconnect_tcp_connections_total"
BYTES = "nowconnect_tcp_bytes_total"
AGENTS = "nowconnect_agents_connected"
OPEN_FAILURES = "nowconnect_tcp_open_failures_total"
TARGET_CONNECTS = "nowconnect_tcp_open_seconds_count"


def runbook_series(connector: str) -> list[tuple[str, dict[str, str]]]:
    """The runbook's three counters for C{connector}, labels in exposition order."""
    return [
        (CONNECTIONS, {"connector": connector}),
        (BYTES, {"direction": "c2a", "connector": connector}),
        (BYTES, {"direction": "a2c", "connector": connector}),
    ]


@attrs.frozen
class Delta:
    """One counter before and after; a missing series counts as 0."""

    series: str
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before

    def line(self) -> str:
        return f"{self.series} {_num(self.before)} -> {_num(self.after)} ({_signed(self.delta)})"

    def as_json(self) -> dict[str, Any]:
        return {"series": self.series, "before": self.before, "after": self.after,
                "delta": self.delta}


def counter_deltas(before: Scrape, after: Scrape, connector: str) -> list[Delta]:
    """Deltas of the runbook's counters: connections, bytes c2a, bytes a2c (in that order)."""
    return [Delta(series(name, labels), before.value(name, **labels) or 0.0,
                  after.value(name, **labels) or 0.0)
            for name, labels in runbook_series(connector)]


def failure_deltas(before: Scrape, after: Scrape, connector: str) -> dict[str, float]:
    """C{reason -> increase} of C{nowconnect_tcp_open_failures_total{connector}}, increases only."""
    out: dict[str, float] = {}
    for reason in after.label_values(OPEN_FAILURES, "reason"):
        grown = ((after.value(OPEN_FAILURES, connector=connector, reason=reason) or 0.0)
                 - (before.value(OPEN_FAILURES, connector=connector, reason=reason) or 0.0))
        if grown > 0:
            out[reason] = grown
    return out


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "-") + _num(abs(value))


# -- diagnosis --------------------------------------------------------------------------------


@attrs.frozen
class Diagnosis:
    """The likely cause of a failure and the log event (and log) that confirms it."""

    cause: str
    look_for: str


def hub_down(hub: str) -> Diagnosis:
    return Diagnosis(
        f"the hub is down or --hub is wrong (nothing answers at {hub}; the hub's web port is "
        "`listen:` in hub.yaml, default 8765)",
        "web_started (hub log: its listen= and port=); is the hub process running?")


def no_agent(connector: str) -> Diagnosis:
    return Diagnosis(
        f"no agent is connected for connector {connector!r}, so the hub refuses its clients",
        f"no_agent_for_connector (hub log); on the agent: NC_CONNECTORS must include "
        f"{connector}, and its log must show \"connecting to cloud\" then \"connection open\" "
        "(agent_rejected in the hub log: token or connector not allowed)")


CIDR_BLOCKED = Diagnosis(
    "the hub refused this client's address: it is outside the listener's allow_cidrs",
    "cidr_blocked (hub log); check allow_cidrs of the listener in hub.yaml")
TARGET_FAILED = Diagnosis(
    "the agent could not connect to its target (refused, unreachable, or a wrong host:port in "
    "the agent's NC_CONNECTORS / connectors:)",
    "target_failed (agent log, with the reason)")
LIMIT = Diagnosis(
    "a hub limit refused the connection (max_connections or max_streams_per_tunnel)",
    "limit_reached (hub log)")
TUNNEL_LOST = Diagnosis(
    "the agent's tunnel dropped while the connection was opening",
    "agent_disconnected (hub log), tunnel_lost (agent log)")
OPEN_TIMEOUT = Diagnosis(
    "the agent did not connect to its target within the hub's open_timeout",
    "target_failed (agent log); the target may be slow or filtered")
UNKNOWN_CONNECTOR = Diagnosis(
    "the agent does not serve this connector although the hub routed to it",
    "tunnel_protocol_error (hub log); compare the agent's NC_CONNECTORS with hub.yaml")
TARGET_CLOSED = Diagnosis(
    "the target closed the connection on the probe (the tunnel opened it: not a hub refusal); "
    "some servers do this with unknown bytes: for LDAP use --ldap-base",
    "connection_closed outcome= (hub log)")

_BY_REASON = {
    "cidr_blocked": CIDR_BLOCKED,
    "target_refused": TARGET_FAILED,
    "target_timeout": TARGET_FAILED,
    "limit": LIMIT,
    "tunnel_lost": TUNNEL_LOST,
    "open_timeout": OPEN_TIMEOUT,
    "unknown_connector": UNKNOWN_CONNECTOR,
}


def diagnose(outcome: str, failures: Mapping[str, float], connector: str,
             target_connected: bool = False) -> Diagnosis:
    """
    Why a client connection through the listener ended badly.

    C{failures} (open-failure reasons the hub counted meanwhile) decides when it is not empty;
    otherwise C{target_connected} (the hub counted the target connected: the target itself
    closed) and then C{outcome} as the client saw it: C{"closed"} without traffic suggests
    C{cidr_blocked}, anything else (C{"reset"}) the agent's target refusing.
    """
    for reason in ("cidr_blocked", "no_agent", "limit", "target_refused", "target_timeout",
                   "open_timeout", "tunnel_lost", "unknown_connector"):
        if failures.get(reason):
            return no_agent(connector) if reason == "no_agent" else _BY_REASON[reason]
    if target_connected:
        return TARGET_CLOSED
    return CIDR_BLOCKED if outcome == "closed" else TARGET_FAILED


# -- probes -----------------------------------------------------------------------------------


@attrs.frozen
class HttpResult:
    """What one GET got: a status and body, or C{kind} (refused, timeout, dns, error)."""

    status: int | None
    body: bytes = b""
    kind: str = "ok"
    error: str = ""


def http_get(url: str, timeout: float, ca_file: str | None = None) -> HttpResult:
    """
    GET C{url} directly (no proxy); HTTP error statuses come back as results.  C{https} URLs
    are verified against the system's CAs, or only C{ca_file}'s when given.
    """
    context = ssl.create_default_context(cafile=ca_file)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=timeout) as response:
            return HttpResult(response.status, response.read())
    except urllib.error.HTTPError as e:
        return HttpResult(e.code, e.read())
    except urllib.error.URLError as e:
        return _http_failure(e.reason)
    except OSError as e:
        return _http_failure(e)


def _http_failure(reason: object) -> HttpResult:
    if isinstance(reason, ConnectionRefusedError):
        return HttpResult(None, kind="refused", error="connection refused")
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return HttpResult(None, kind="timeout", error="timed out")
    if isinstance(reason, ssl.SSLError):
        text = getattr(reason, "verify_message", None) or reason.reason or str(reason)
        return HttpResult(None, kind="tls", error=f"TLS handshake failed ({text})")
    if isinstance(reason, socket.gaierror):
        return HttpResult(None, kind="dns", error=f"cannot resolve host ({reason.strerror})")
    text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    return HttpResult(None, kind="error", error=text)


@attrs.frozen
class Probe:
    """
    One client connection through the listener.  C{outcome}: C{echo}, C{reply}, C{held},
    C{ldap} (passes); C{closed}, C{reset} (the tunnel or target refused); C{refused},
    C{timeout}, C{error} (nothing reached the hub's listener).
    """

    outcome: str
    sent: int = 0
    received: int = 0
    seconds: float = 0.0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in ("echo", "reply", "held", "ldap")


def tcp_probe(host: str, port: int, timeout: float, hold: float = HOLD_SECONDS) -> Probe:
    """Connect, send a short probe and classify what comes back (see the module docstring)."""
    payload = b"nowconnect-check " + os.urandom(6).hex().encode("ascii") + b"\n"
    start = time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return Probe("refused", detail="connection refused")
    except ConnectionResetError:
        # The hub accepted and reset at once: the handshake completed, then the RST arrived
        # before connect() returned (a timeout makes the socket non-blocking underneath).
        return Probe("reset", seconds=time.monotonic() - start)
    except (TimeoutError, socket.timeout):
        return Probe("timeout", detail=f"no TCP answer within {timeout:g} s")
    except OSError as e:
        return Probe("error", detail=e.strerror or str(e))
    got = b""
    outcome = "held"
    with sock:
        try:
            sock.sendall(payload)
            deadline = time.monotonic() + hold
            while not got.startswith(payload):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                try:
                    chunk = sock.recv(65536)
                except (TimeoutError, socket.timeout):
                    break
                if not chunk:
                    outcome = "closed"
                    break
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            outcome = "reset"
        if got:
            outcome = "echo" if got.startswith(payload) else "reply"
        elapsed = time.monotonic() - start
        if outcome in ("echo", "reply", "held"):
            _close_politely(sock)
    return Probe(outcome, len(payload), len(got), elapsed)


def _close_politely(sock: socket.socket, linger: float = 0.5) -> None:
    """Half-close and read to EOF (briefly) so the stream ends with FIN, not a reset."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + linger
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                break
    except OSError:
        pass


def require_ldap3() -> Any:
    """Import ldap3 lazily; L{UsageError} with the install hint when it is missing."""
    try:
        import ldap3
    except ImportError:
        raise UsageError(LDAP_MISSING) from None
    return ldap3


def ldap_probe(host: str, port: int, base: str, timeout: float) -> Probe:
    """An anonymous bind and a base-scope search of C{base} through the listener."""
    ldap3 = require_ldap3()
    from ldap3.core import exceptions as lexc

    start = time.monotonic()
    server = ldap3.Server(host, port=port, get_info=ldap3.NONE, connect_timeout=timeout)
    # ldap3 packs receive_timeout into SO_RCVTIMEO as a C long: whole seconds only.
    conn = ldap3.Connection(server, receive_timeout=max(1, math.ceil(timeout)),
                            raise_exceptions=False)
    try:
        conn.open()
    except lexc.LDAPSocketOpenError as e:
        text = str(e)
        if "refused" in text.lower():
            return Probe("refused", detail="connection refused")
        if "reset" in text.lower():
            return Probe("reset", seconds=time.monotonic() - start)
        if "timed out" in text.lower():
            return Probe("timeout", detail=f"no TCP answer within {timeout:g} s")
        return Probe("error", detail=text)
    try:
        conn.bind()
        bind = _ldap_result(conn.result)
        conn.search(base, "(objectClass=*)", search_scope=ldap3.BASE,
                    attributes=[ldap3.NO_ATTRIBUTES])
        search = _ldap_result(conn.result)
        entries = len(conn.response or [])
    except lexc.LDAPSessionTerminatedByServerError:
        return Probe("closed", seconds=time.monotonic() - start,
                     detail="closed by the far end before the LDAP answer")
    except lexc.LDAPCommunicationError as e:
        reset = "reset" in str(e).lower() or "errno 104" in str(e).lower()
        return Probe("reset" if reset else "closed", seconds=time.monotonic() - start,
                     detail=str(e))
    finally:
        try:
            conn.unbind()
        except Exception:  # the socket may already be gone; nothing to clean up then
            pass
    found = f", {entries} entr{'y' if entries == 1 else 'ies'}" if search == "success" else ""
    note = "" if search == "success" else " (the tunnel works; check the DN and its ACLs)"
    detail = (f"LDAP answered through the tunnel: anonymous bind {bind}; base search of "
              f"{base!r}: {search}{found}{note}")
    return Probe("ldap", seconds=time.monotonic() - start, detail=detail)


def _ldap_result(result: Mapping[str, Any] | None) -> str:
    if not result:
        return "no result"
    return str(result.get("description") or result.get("result"))


# -- the steps --------------------------------------------------------------------------------


@attrs.frozen
class Step:
    """One reported step.  C{cause} and C{look_for} are set on C{FAIL}."""

    number: int
    name: str
    title: str
    status: str
    detail: str
    cause: str | None = None
    look_for: str | None = None
    seconds: float = 0.0
    lines: tuple[str, ...] = ()

    def line(self) -> str:
        text = f"[{self.number}/{STEP_COUNT}] {self.status} {self.title}: {self.detail}"
        if self.status == FAIL and self.cause:
            text += f" -- likely cause: {self.cause}; look for: {self.look_for}"
        return text

    def as_json(self) -> dict[str, Any]:
        return {"step": self.number, "name": self.name, "title": self.title,
                "status": self.status, "detail": self.detail, "cause": self.cause,
                "look_for": self.look_for, "seconds": round(self.seconds, 4)}


@attrs.frozen
class CheckOptions:
    """What to check: C{hub} is the base URL (see L{hub_base_url})."""

    hub: str
    listener_host: str
    listener_port: int
    connector: str
    ldap_base: str | None = None
    timeout: float = 5.0
    hold: float = HOLD_SECONDS
    ca_file: str | None = None

    @property
    def listener(self) -> str:
        host = self.listener_host
        return f"[{host}]:{self.listener_port}" if ":" in host else f"{host}:{self.listener_port}"


@attrs.frozen
class Report:
    options: CheckOptions
    steps: tuple[Step, ...]
    deltas: tuple[Delta, ...] = ()

    @property
    def ok(self) -> bool:
        return all(step.status == PASS for step in self.steps)

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAILED

    def summary(self) -> str:
        if self.ok:
            return f"PASS: all {len(self.steps)} checks passed"
        failed = [s for s in self.steps if s.status == FAIL]
        skipped = sum(1 for s in self.steps if s.status == SKIP)
        names = ", ".join(f"{s.number} ({s.name})" for s in failed)
        return (f"FAIL: step{'s' if len(failed) > 1 else ''} {names} failed"
                + (f"; {skipped} skipped" if skipped else ""))

    def as_json(self) -> dict[str, Any]:
        o = self.options
        return {
            "ok": self.ok, "exit_code": self.exit_code, "hub": o.hub, "listener": o.listener,
            "connector": o.connector, "mode": "ldap" if o.ldap_base else "tcp",
            "steps": [s.as_json() for s in self.steps],
            "counters": [d.as_json() for d in self.deltas],
        }


def hub_base_url(text: str) -> str:
    """
    The hub's base URL from C{--hub}: C{http(s)://HOST:PORT}; a missing scheme means
    C{http}, C{ws(s)://} (an agent's C{NC_HUB_URL}) is mapped to C{http(s)}, and a trailing
    C{/tunnel}, C{/healthz}, C{/readyz} or C{/metrics} is dropped.
    """
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    try:
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        raise UsageError(f"--hub: bad port in {text!r}") from None
    if scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--hub: expected http://HOST:PORT (the hub's web port), got {text!r}")
    path = parts.path.rstrip("/")
    for suffix in ("/tunnel", "/healthz", "/readyz", "/metrics"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def make_options(hub: str, listener: str, connector: str, ldap_base: str | None = None,
                 timeout: float = 5.0, ca_file: str | None = None) -> CheckOptions:
    """Validate the command line's values into L{CheckOptions}; L{UsageError} if unusable."""
    try:
        host, port = parse_target(listener)
    except ValueError as e:
        raise UsageError(f"--listener: {e}") from None
    if timeout <= 0:
        raise UsageError("--timeout must be positive")
    if ldap_base is not None:
        require_ldap3()
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"--ca-file: cannot use {ca_file}: {e}") from None
    return CheckOptions(hub_base_url(hub), host, port, connector, ldap_base, timeout,
                        min(HOLD_SECONDS, timeout), ca_file)


def run_check(options: CheckOptions, on_step: Callable[[Step], object] = lambda s: None,
              clock: Callable[[], float] = time.monotonic) -> Report:
    """Run the four steps; C{on_step} sees each as soon as it is decided."""
    o = options
    steps: list[Step] = []

    def done(step: Step) -> Step:
        steps.append(step)
        on_step(step)
        return step

    def skip(number: int, name: str, title: str, why: str) -> None:
        done(Step(number, name, title, SKIP, why))

    # 1. /healthz
    t0 = clock()
    url = f"{o.hub}/healthz"
    got = http_get(url, o.timeout, o.ca_file)
    health = _health_step(url, got, o)
    done(attrs.evolve(health, seconds=clock() - t0))
    agent_title = f"agent for connector {o.connector!r}"
    trip_title = f"round trip via {o.listener}" + (" (LDAP)" if o.ldap_base else " (TCP)")
    counters_title = "counter deltas"
    if health.status != PASS:
        skip(2, "agent", agent_title, "needs the hub (step 1)")
        skip(3, "round_trip", trip_title, "needs the hub (step 1)")
        skip(4, "counters", counters_title, "needs the hub (step 1)")
        return Report(o, tuple(steps))

    # 2. an agent for the connector; this scrape is also "before" for step 4
    t0 = clock()
    before, agent = _agent_step(o, agent_title)
    done(attrs.evolve(agent, seconds=clock() - t0))
    if agent.status != PASS or before is None:
        skip(3, "round_trip", trip_title, "needs an agent (step 2)")
        skip(4, "counters", counters_title, "needs an agent (step 2)")
        return Report(o, tuple(steps))

    # 3. the round trip
    t0 = clock()
    if o.ldap_base:
        probe = ldap_probe(o.listener_host, o.listener_port, o.ldap_base, o.timeout)
    else:
        probe = tcp_probe(o.listener_host, o.listener_port, o.timeout, o.hold)
    after_got = http_get(f"{o.hub}/metrics", o.timeout, o.ca_file)
    after = _scrape(after_got)
    if after is not None and not probe.ok:
        # The hub counts a refusal before it closes the client's socket, so this scrape
        # normally shows it; one short retry covers a busy hub that has not got there yet.
        if not failure_deltas(before, after, o.connector):
            time.sleep(0.2)
            after = _scrape(http_get(f"{o.hub}/metrics", o.timeout, o.ca_file)) or after
    done(attrs.evolve(_trip_step(o, trip_title, probe, before, after), seconds=clock() - t0))

    # 4. counter deltas
    if after is None:
        done(Step(4, "counters", counters_title, FAIL,
                  f"second /metrics scrape failed ({_http_text(after_got)})",
                  "the hub stopped answering during the check", "hub log around this time"))
        return Report(o, tuple(steps))
    deltas = counter_deltas(before, after, o.connector)
    done(_counters_step(o, counters_title, probe, before, after, deltas))
    return Report(o, tuple(steps), tuple(deltas))


def _http_text(got: HttpResult) -> str:
    return f"HTTP {got.status}" if got.status is not None else got.error


def _health_step(url: str, got: HttpResult, o: CheckOptions) -> Step:
    title = "hub /healthz"
    if got.status == 200:
        body = got.body.decode("utf-8", "replace").strip()
        return Step(1, "healthz", title, PASS, f"{url} answered 200 {body}")
    if got.status is None:
        d = hub_down(o.hub)
        if got.kind == "timeout":
            d = Diagnosis(f"no answer from {o.hub} within {o.timeout:g} s: a firewall drops "
                          "the packets, or --hub names the wrong host", d.look_for)
        elif got.kind == "tls":
            d = Diagnosis(
                "the hub's web port speaks TLS with a certificate this host does not trust "
                "(pass its CA with --ca-file), or plain HTTP was expected (use http://); a hub "
                "with client_ca (mutual TLS) also wants a client certificate, which check does "
                "not send", "tls_cert / client_ca in hub.yaml")
        elif got.kind == "dns":
            d = Diagnosis(f"--hub host does not resolve ({got.error})", d.look_for)
        return Step(1, "healthz", title, FAIL, f"{url}: {got.error}", d.cause, d.look_for)
    return Step(1, "healthz", title, FAIL, f"{url} answered HTTP {got.status}",
                f"--hub does not point at a NowConnect hub's web port ({o.hub})",
                "web_started (hub log: its listen= and port=)")


def _scrape(got: HttpResult) -> Scrape | None:
    if got.status != 200:
        return None
    try:
        return parse_metrics(got.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def _agent_step(o: CheckOptions, title: str) -> tuple[Scrape | None, Step]:
    url = f"{o.hub}/metrics"
    got = http_get(url, o.timeout, o.ca_file)
    if got.status == 403:
        return None, Step(2, "agent", title, FAIL, f"{url} answered 403 forbidden",
                          "this host is outside the hub's metrics_allow_cidrs",
                          "metrics_allow_cidrs in hub.yaml; run the check from an allowed host")
    scrape = _scrape(got)
    if scrape is None:
        why = _http_text(got) if got.status != 200 else "not Prometheus text"
        return None, Step(2, "agent", title, FAIL, f"{url}: {why}",
                          "--hub does not point at a NowConnect hub's web port",
                          "web_started (hub log)")
    name = series(AGENTS, {"connector": o.connector})
    value = scrape.value(AGENTS, connector=o.connector)
    if value is None:
        known = ", ".join(scrape.label_values(AGENTS, "connector")) or "none"
        return scrape, Step(
            2, "agent", title, FAIL, f"the hub has no connector {o.connector!r} (known: {known})",
            "--connector does not match a listener's connector in hub.yaml",
            "listener_started (hub log: connector= bind= port=)")
    if value < 1:
        d = no_agent(o.connector)
        return scrape, Step(2, "agent", title, FAIL, f"{name} {_num(value)}", d.cause, d.look_for)
    return scrape, Step(2, "agent", title, PASS, f"{name} {_num(value)}")


def _trip_step(o: CheckOptions, title: str, probe: Probe, before: Scrape,
               after: Scrape | None) -> Step:
    ms = f"{probe.seconds * 1000:.1f} ms"
    if probe.ok:
        detail = {
            "echo": f"probe of {probe.sent} bytes echoed in {ms}",
            "reply": f"sent {probe.sent} bytes, the target replied {probe.received} bytes",
            "held": (f"sent {probe.sent} bytes; no reply, connection still open after "
                     f"{o.hold:g} s (a non-echo target; step 4 confirms the target connected)"),
            "ldap": f"{probe.detail} ({ms})",
        }[probe.outcome]
        return Step(3, "round_trip", title, PASS, detail)
    if probe.outcome in ("refused", "timeout", "error"):
        why = "nothing listens there" if probe.outcome == "refused" else "it does not answer"
        return Step(3, "round_trip", title, FAIL, f"{o.listener}: {probe.detail}",
                    f"{why}: --listener is wrong, or the hub has no listener on that port",
                    "listener_started (hub log: connector= bind= port=)")
    failures = failure_deltas(before, after, o.connector) if after is not None else {}
    connected = False
    if after is not None:
        grown = ((after.value(TARGET_CONNECTS, connector=o.connector) or 0.0)
                 - (before.value(TARGET_CONNECTS, connector=o.connector) or 0.0))
        connected = grown > 0
    d = diagnose(probe.outcome, failures, o.connector, connected)
    saw = {"closed": "closed", "reset": "reset"}[probe.outcome]
    counted = ", ".join(f"{r} +{_num(n)}" for r, n in sorted(failures.items()))
    detail = f"connection {saw} before any byte came back"
    if probe.detail:
        detail += f" ({probe.detail})"
    if counted:
        detail += f"; hub counted open failures: {counted}"
    return Step(3, "round_trip", title, FAIL, detail, d.cause, d.look_for)


def _counters_step(o: CheckOptions, title: str, probe: Probe, before: Scrape, after: Scrape,
                   deltas: list[Delta]) -> Step:
    conns, c2a, a2c = (d.delta for d in deltas)
    target_before = before.value(TARGET_CONNECTS, connector=o.connector)
    target_after = after.value(TARGET_CONNECTS, connector=o.connector)
    connected = None if target_after is None else target_after - (target_before or 0.0)
    parts = [f"connections {_signed(conns)}", f"bytes c2a {_signed(c2a)}",
             f"a2c {_signed(a2c)}"]
    if connected is not None:
        parts.append(f"target connects {_signed(connected)}")
    detail = ", ".join(parts)
    lines = tuple(d.line() for d in deltas)
    if not probe.ok:
        return Step(4, "counters", title, SKIP, f"{detail} (shown for diagnosis; step 3 failed)",
                    lines=lines)
    want_c2a = probe.sent or 1
    want_a2c = probe.received if o.ldap_base is None else 1
    problem: Diagnosis | None = None
    if conns < 1:
        problem = Diagnosis(
            f"the hub did not count a connection for {o.connector!r}: {o.listener} may be "
            "another connector's listener, or another hub's",
            "listener_started (hub log: connector= port=)")
    elif c2a < want_c2a or a2c < want_a2c:
        problem = Diagnosis(
            f"bytes missing (expected c2a >= {want_c2a}, a2c >= {want_a2c}): one-way traffic",
            "connection_closed c2a= a2c= outcome= (hub log)")
    elif connected is not None and connected < 1:
        problem = Diagnosis(
            "the hub opened a stream but the agent never reported its target connected: "
            "the target is slow, filtered or unreachable",
            "target_failed (agent log)")
    if problem is not None:
        return Step(4, "counters", title, FAIL, detail, problem.cause, problem.look_for,
                    lines=lines)
    return Step(4, "counters", title, PASS, detail, lines=lines)


# -- output -----------------------------------------------------------------------------------


def check_main(options: CheckOptions, out: TextIO, as_json: bool = False) -> int:
    """Run the check, write text lines (as they happen) or one JSON object; the exit status."""

    def show(step: Step) -> None:
        if as_json:
            return
        out.write(step.line() + "\n")
        for line in step.lines:
            out.write(f"      {line}\n")
        out.flush()

    report = run_check(options, show)
    if as_json:
        out.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        out.write(report.summary() + "\n")
    out.flush()
    return report.exit_code
