"""
C{nowconnect demo}: an echo target, a hub and an agent in one process on 127.0.0.1, checked
with a ping-pong through the hub's listener and the hub's own C{/metrics} counters.

The hub and agent are the real ones (L{make_hub_service}, L{make_agent_service}) with configs
built by L{parse_hub_config} / L{parse_agent_config} from dicts: web port and one listener for
connector C{demo}, one agent with a fresh random token (the hub only gets its SHA-256).  The
agent config ignores the caller's C{NC_*} environment.

Sequence: start echo target, hub, agent; wait until the agent is registered on the hub; scrape
C{/metrics}; three round trips of L{PING_SIZE} bytes through the listener with a real TCP client
in the same reactor; wait until the hub has ended that stream; scrape again; print the
runbook's counters with their deltas and a C{PASS} or C{FAIL} line.  The self-check passes when
every ping came back intact and the deltas are at least 1 connection and the bytes sent and
received each way.  It must finish within L{CHECK_TIMEOUT} seconds.

With C{once} the process exits after the self-check (0 on C{PASS}, 1 otherwise); without it,
it keeps serving until SIGINT or SIGTERM, then stops agent, hub and target and exits 0 (1 if the
self-check failed).  C{port_base} N puts the web port on N and the listener on N+1; the default
is ephemeral ports, and the real addresses are printed either way.

Hidden options for tests and experiments (not in C{--help}; they skip the self-check, so they
cannot be combined with C{--once}):

 - C{--no-agent}: start the hub and echo target only: the connector has no agent
   (C{nowconnect check} then fails at step 2, and clients get C{no_agent_for_connector}).
 - C{--target HOST:PORT}: the agent relays connector C{demo} to HOST:PORT instead of the echo
   target (a real LDAP server, or a closed port to see C{target_failed}).
 - C{--allow-cidr CIDR}: restrict the listener to CIDR (e.g. C{10.0.0.0/8} makes 127.0.0.1 a
   C{cidr_blocked} client).

Logging: stable NowConnect events (those with an C{event} key) at info and above, plus warnings
and errors from anything, in a compact one-line text form on stderr; C{verbose} shows every
event at info and above.  The demo's own report goes to stdout.
"""
# -*- test-case-name: tests.test_cli -*-

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import time
from collections.abc import Callable
from typing import IO, Any, NoReturn, TextIO

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater, react
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    eventAsText,
    globalLogBeginner,
)
from twisted.python.failure import Failure

from nowconnect.check import Scrape, counter_deltas, parse_metrics
from nowconnect.config import parse_agent_config, parse_hub_config
from nowconnect.endpoints import ListenFailed

CONNECTOR = "demo"
HOST = "127.0.0.1"
#: The self-check (agent registration, ping-pong, both scrapes) must finish within this.
CHECK_TIMEOUT = 20.0
ROUNDS = 3
PING_SIZE = 64
#: Drain time on stop for hub and agent: the demo has nothing worth waiting long for.
DRAIN_SECONDS = 1.0


@attrs.frozen
class DemoOptions:
    """The demo's command line; see the module docstring."""

    once: bool = False
    port_base: int | None = None
    verbose: bool = False
    no_agent: bool = False
    target: tuple[str, int] | None = None
    allow_cidr: str | None = None

    @property
    def self_check(self) -> bool:
        return not (self.no_agent or self.target or self.allow_cidr)


# -- logging ----------------------------------------------------------------------------------


def _compact(event: dict[str, Any]) -> str | None:
    """C{HH:MM:SS.mmm LEVEL source text}: one line (plus a traceback for failures)."""
    when = event.get("log_time") or time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"
    level = event.get("log_level", LogLevel.info)
    namespace = str(event.get("log_namespace", "-"))
    source = namespace.removeprefix("nowconnect.")
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    return f"{stamp} {level.name:<5} {source:<5} {text}\n"


def _stable_events_only(event: dict[str, Any]) -> PredicateResult:
    """Our stable events at info+ and anybody's warnings and errors; not library chatter."""
    if event.get("event"):
        return PredicateResult.yes
    if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
        return PredicateResult.yes
    return PredicateResult.no


def demo_log_observer(stream: IO[str], verbose: bool = False) -> ILogObserver:
    """The demo's stderr observer: compact text, filtered (see the module docstring)."""
    predicates = [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)]
    if not verbose:
        predicates.append(_stable_events_only)  # type: ignore[arg-type]
    return FilteringLogObserver(FileLogObserver(stream, _compact), predicates)


# -- the pieces -------------------------------------------------------------------------------


_log = Logger(namespace="nowconnect.demo")


class _Echo(Protocol):
    """The demo's target: writes back what it reads; closes on EOF."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class PingPongError(Exception):
    """The ping-pong did not complete; the message says how far it got."""


class _PingPong(Protocol):
    """Sends C{rounds} pings of C{size} bytes one after another, each after the last echo."""

    def __init__(self, clock: Any, rounds: int, size: int) -> None:
        self._clock = clock
        self._rounds = rounds
        self._size = size
        self._sent = 0
        self._expect = b""
        self._buffer = b""
        self._started = 0.0
        self.rtts: list[float] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self.done: Deferred[_PingPong] = Deferred()
        self._error: str | None = None

    def connectionMade(self) -> None:
        self._ping()

    def _ping(self) -> None:
        self._sent += 1
        head = f"ping {self._sent}/{self._rounds} ".encode("ascii")
        pad = os.urandom(self._size).hex().encode("ascii")
        self._expect = (head + pad)[: self._size - 1] + b"\n"
        self._buffer = b""
        self._started = self._clock.seconds()
        self.bytes_sent += len(self._expect)
        assert self.transport is not None
        self.transport.write(self._expect)

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.bytes_received += len(data)
        self._buffer += data
        if len(self._buffer) < len(self._expect):
            return
        if self._buffer != self._expect:
            self._error = f"round {self._sent}: the echo differs from the ping"
            self.transport.loseConnection()
            return
        self.rtts.append(self._clock.seconds() - self._started)
        if self._sent < self._rounds:
            self._ping()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._error is None and len(self.rtts) < self._rounds:
            self._error = (f"connection lost after {len(self.rtts)} of {self._rounds} round "
                           f"trips: {reason.getErrorMessage()}")
        if self._error is not None:
            self.done.errback(PingPongError(self._error))
        else:
            self.done.callback(self)


@attrs.define
class DemoStack:
    """
    Echo target, hub and agent, started in that order by L{start}; L{stop} stops them in
    reverse and may be called any number of times.
    """

    reactor: Any
    options: DemoOptions
    hub: Any = None
    agent: Any = None
    echo_port: IListeningPort | None = None
    web_port: int = 0
    listener_port: int = 0
    _stopping: Deferred[None] | None = None

    @property
    def web_url(self) -> str:
        return f"http://{HOST}:{self.web_port}"

    @property
    def target(self) -> tuple[str, int]:
        if self.options.target is not None:
            return self.options.target
        assert self.echo_port is not None
        addr = self.echo_port.getHost()
        assert isinstance(addr, IPv4Address)
        return HOST, addr.port

    async def start(self) -> None:
        from nowconnect.hub import make_hub_service

        opts = self.options
        echo = Factory.forProtocol(_Echo)
        echo.noisy = False
        self.echo_port = await TCP4ServerEndpoint(self.reactor, 0, interface=HOST).listen(echo)
        base = opts.port_base
        listener: dict[str, Any] = {"connector": CONNECTOR, "bind": HOST,
                                    "port": 0 if base is None else base + 1}
        if opts.allow_cidr:
            listener["allow_cidrs"] = [opts.allow_cidr]
        token = secrets.token_urlsafe(32)
        hub_config = parse_hub_config({
            "listen": f"tcp:port={0 if base is None else base}:interface={HOST}",
            "listeners": [listener],
            "agents": [{"id": "demo-agent", "connectors": [CONNECTOR],
                        "token_sha256": hashlib.sha256(token.encode("utf-8")).hexdigest()}],
            "drain_seconds": DRAIN_SECONDS,
        }, "demo hub config")
        self.hub = make_hub_service(hub_config, self.reactor)
        try:
            self.hub.privilegedStartService()  # binds; raises ListenFailed with the reason
        except BaseException:  # ListenFailed is a SystemExit: clean up whatever it is
            await self.stop()
            raise
        self.hub.startService()
        self.web_port = self.hub.web_port.getHost().port
        self.listener_port = self.hub.listeners[0].port.getHost().port
        if opts.no_agent:
            return
        from nowconnect.agent import make_agent_service

        host, port = self.target
        agent_config = parse_agent_config({
            "hub_url": f"ws://{HOST}:{self.web_port}/tunnel",
            "agent_id": "demo-agent",
            "token": token,
            "connectors": {CONNECTOR: f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"},
            "reconnect_initial_delay": 0.2,
            "reconnect_max_delay": 2.0,
            "drain_seconds": DRAIN_SECONDS,
        }, "demo agent config", environ={})
        self.agent = make_agent_service(agent_config, self.reactor)
        self.agent.startService()

    def stop(self) -> Deferred[None]:
        """
        Stop agent, hub and target (in that order).  Every call gets its own Deferred that
        fires when that one stop has finished; a failure to stop is logged, not raised.
        """
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
            self._stopping.addErrback(
                lambda f: _log.failure("demo_stop_failed", f, event="demo_stop_failed"))
        waiter: Deferred[None] = Deferred()
        self._stopping.addCallback(lambda _: waiter.callback(None))
        return waiter

    async def _stop(self) -> None:
        if self.agent is not None and self.agent.running:
            await self.agent.stopService()
        if self.hub is not None:
            await self.hub.stopService()
        if self.echo_port is not None:
            await maybeDeferred(self.echo_port.stopListening)

    async def wait_registered(self) -> float:
        """Seconds until the hub has an agent for the connector (polled, 50 ms)."""
        start = self.reactor.seconds()
        while self.hub.connectors_without_agent():
            await deferLater(self.reactor, 0.05, lambda: None)
        return self.reactor.seconds() - start

    async def wait_streams_ended(self, limit: float = 2.0) -> None:
        """Until the hub has no open stream (the ping-pong's ended on both sides), or C{limit}."""
        deadline = self.reactor.seconds() + limit
        while self.hub.active_streams() and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.02, lambda: None)

    async def scrape(self) -> Scrape:
        """GET the hub's /metrics over HTTP, as a user would."""
        from twisted.web.client import Agent

        response = await Agent(self.reactor).request(b"GET", f"{self.web_url}/metrics".encode())
        body = _Body()
        response.deliverBody(body)
        text = await body.done
        if response.code != 200:
            raise PingPongError(f"/metrics answered HTTP {response.code}")
        return parse_metrics(text.decode("utf-8"))

    async def ping_pong(self) -> _PingPong:
        """L{ROUNDS} pings through the hub's listener with a real TCP client."""
        endpoint = TCP4ClientEndpoint(self.reactor, HOST, self.listener_port, timeout=5)
        client = _PingPong(self.reactor, ROUNDS, PING_SIZE)
        await endpoint.connect(_OneProtocol(client))
        return await client.done


class _Body(Protocol):
    """
    Collects a response body.  (C{readBody} would do, but with C{Agent}'s own transport proxy
    it emits a DeprecationWarning about C{abortConnection}, fatal under C{-W error}.)
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        from twisted.web.client import PotentialDataLoss, ResponseDone

        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


class _OneProtocol(Factory):
    """A client factory for one already-built protocol."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


# -- the command ------------------------------------------------------------------------------


class _Report:
    """The demo's stdout lines, flushed at once (a parent process may be reading them)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def __call__(self, text: str = "") -> None:
        self._out.write(text + "\n")
        self._out.flush()


async def _self_check(stack: DemoStack, say: Callable[[str], object],
                      stage: list[str]) -> bool:
    stage[0] = "waiting for the agent to register"
    took = await stack.wait_registered()
    say(f'agent registered for connector "{CONNECTOR}" after {took:.2f} s')
    stage[0] = "reading /metrics before the ping-pong"
    before = await stack.scrape()
    stage[0] = "ping-pong through the listener"
    client = await stack.ping_pong()
    rtts = ", ".join(f"{r * 1000:.1f}" for r in client.rtts)
    say(f"ping-pong: {ROUNDS} round trips of {PING_SIZE} bytes through "
        f"{HOST}:{stack.listener_port}, echoed intact (RTT ms: {rtts})")
    stage[0] = "waiting for the hub to end the stream"
    await stack.wait_streams_ended()
    stage[0] = "reading /metrics after the ping-pong"
    after = await stack.scrape()
    deltas = counter_deltas(before, after, CONNECTOR)
    say("counters (before -> after, delta):")
    for d in deltas:
        say(f"  {d.line()}")
    conns, c2a, a2c = (d.delta for d in deltas)
    ok = conns >= 1 and c2a >= client.bytes_sent and a2c >= client.bytes_received
    if ok:
        say(f"PASS: ping-pong through hub and agent; connections +{conns:g}, "
            f"bytes c2a +{c2a:g}, a2c +{a2c:g}")
    else:
        say(f"FAIL: counters did not move as expected (want connections >= 1, "
            f"c2a >= {client.bytes_sent}, a2c >= {client.bytes_received})")
    return ok


async def run_self_check(stack: DemoStack, say: Callable[[str], object],
                         timeout: float = CHECK_TIMEOUT) -> bool:
    """
    The demo's self-check within C{timeout} seconds: True on PASS.  Every outcome ends with
    one C{PASS:} or C{FAIL:} line from C{say}; a FAIL names the reason and the stage.
    """
    stage = ["starting"]
    d = Deferred.fromCoroutine(_self_check(stack, say, stage))
    d.addTimeout(timeout, stack.reactor)
    try:
        return await d
    except Exception as e:
        if isinstance(e, defer.TimeoutError):
            reason = f"no result within {timeout:g} s"
        elif isinstance(e, defer.CancelledError):
            reason = "interrupted"
        else:
            reason = str(e) or type(e).__name__
        say(f"FAIL: {reason} (while {stage[0]}; see the log lines on stderr)")
        return False


async def _prepare(stack: DemoStack, say: Callable[[str], object]) -> bool:
    """The self-check, or (when a test aid skips it) waiting for the agent: True if fine."""
    options = stack.options
    if options.self_check:
        return await run_self_check(stack, say)
    ok = True
    if not options.no_agent:
        # Clients (and `nowconnect check`) should find the agent there once we say so.
        registered = Deferred.fromCoroutine(stack.wait_registered())
        registered.addTimeout(CHECK_TIMEOUT, stack.reactor)
        try:
            took = await registered
            say(f'agent registered for connector "{CONNECTOR}" after {took:.2f} s')
        except (defer.TimeoutError, defer.CancelledError) as e:
            why = "interrupted" if isinstance(e, defer.CancelledError) else (
                f"the agent did not register within {CHECK_TIMEOUT:g} s")
            say(f"FAIL: {why} (see the log lines on stderr)")
            ok = False
    say("self-check skipped (--no-agent, --target or --allow-cidr): try nowconnect check")
    return ok


async def _demo(reactor: Any, options: DemoOptions, out: TextIO) -> None:
    say = _Report(out)
    stack = DemoStack(reactor, options)
    try:
        await stack.start()
    except (Exception, ListenFailed) as e:  # ListenFailed is a SystemExit (for twistd)
        say(f"FAIL: cannot start the demo: {e}")
        raise SystemExit(1) from None
    reactor.addSystemEventTrigger("before", "shutdown", stack.stop)
    host, port = stack.target
    target = "echo target" if options.target is None else "target"
    parts = "hub and " + target if options.no_agent else "hub, agent and " + target
    say(f"nowconnect demo: {parts} in one process on {HOST}")
    say(f"  web       {stack.web_url}  (/healthz /readyz /metrics; agents dial "
        f"ws://{HOST}:{stack.web_port}/tunnel)")
    via = "(no agent)" if options.no_agent else "agent"
    say(f'  listener  {HOST}:{stack.listener_port}  (connector "{CONNECTOR}" -> {via} -> '
        f"{target} {host}:{port})")
    # Ctrl-C (or SIGTERM) before we are serving: cancel what is under way, stop, exit 1.
    starting = Deferred.fromCoroutine(_prepare(stack, say))
    interrupted: list[bool] = []

    def interrupt() -> None:
        interrupted.append(True)
        starting.cancel()

    trigger = reactor.addSystemEventTrigger("before", "shutdown", interrupt)
    ok = await starting
    if not interrupted:
        reactor.removeSystemEventTrigger(trigger)
    if options.once or interrupted:
        await stack.stop()
        say("stopped")
        raise SystemExit(0 if ok and not interrupted else 1)
    say("try it:")
    say(f"  curl -s {stack.web_url}/metrics | grep ^nowconnect_tcp_")
    say(f"  nowconnect check --hub {stack.web_url} --listener {HOST}:{stack.listener_port} "
        f"--connector {CONNECTOR}")
    say("serving until Ctrl-C")
    stopped: Deferred[None] = Deferred()

    def on_shutdown() -> Deferred[None]:
        def finished(_: object) -> None:
            say("stopped")
            if ok:
                stopped.callback(None)
            else:
                stopped.errback(SystemExit(1))

        return stack.stop().addCallback(finished)

    reactor.addSystemEventTrigger("before", "shutdown", on_shutdown)
    await stopped


def run_demo(options: DemoOptions, out: TextIO | None = None,
             err: IO[str] | None = None) -> NoReturn:
    """Run the demo on the global reactor and exit the process with its status."""
    globalLogBeginner.beginLoggingTo([demo_log_observer(err or sys.stderr, options.verbose)],
                                     redirectStandardIO=False)
    react(_demo, (options, out or sys.stdout))
