"""
Assembly: the twistd plugins, C{--config} parsing and C{makeService}, the services they build
on a L{MemoryReactorClock}, and the agent's reconnect backoff driven by C{clock.advance}.

Every test that starts a service stops it and ends with nothing left on the clock.
"""
# -*- test-case-name: tests.test_assembly -*-

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tempfile
from typing import Any

import yaml
from twisted.application.service import IService, IServiceMaker
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nowconnect import agent_tap, hub_tap
from nowconnect.agent import make_agent_service
from nowconnect.config import parse_agent_config

TOKEN = "assembly-test-token"

HUB_CONFIG: dict[str, Any] = {
    "listen": "tcp:8765:interface=127.0.0.1",
    "listeners": [
        {"connector": "addomain", "bind": "127.0.0.1", "port": 1389},
        {"connector": "ldaps", "bind": "::1", "port": 1636, "allow_cidrs": ["::1/128"]},
    ],
    "agents": [{"id": "agent-1", "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                "connectors": ["addomain", "ldaps"]}],
}

AGENT_CONFIG: dict[str, Any] = {
    "hub_url": "ws://127.0.0.1:8765/tunnel",
    "agent_id": "agent-1",
    "token": TOKEN,
    "connectors": {"addomain": "127.0.0.1:389"},
    "reconnect_initial_delay": 1.0,
    "reconnect_max_delay": 8.0,
}


class AssemblyCase(SynchronousTestCase):
    """Helpers: config files in a temporary directory and captured log events."""

    def setUp(self) -> None:
        self.log: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.log.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.log.append)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e.get("event") == name]

    def temp_path(self, name: str) -> str:
        """A path in a fresh temporary directory, removed after the test (trial's mktemp()
        would create it under the current directory, i.e. inside the checkout)."""
        directory = tempfile.mkdtemp(prefix="nowconnect-assembly-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        return os.path.join(directory, name)

    def write_config(self, data: object, name: str = "config.yaml") -> str:
        path = self.temp_path(name)
        with open(path, "w") as f:
            if isinstance(data, str):
                f.write(data)
            else:
                yaml.safe_dump(data, f)
        return path

    def stop(self, service: IService, clock: MemoryReactorClock) -> None:
        """Stop C{service}, moving time as its drain needs, and check nothing is left behind."""
        done: list[object] = []
        service.stopService().addBoth(done.append)
        for _ in range(200):
            if done:
                break
            clock.advance(0.1)
        self.assertEqual(done, [None])
        self.assertEqual(clock.getDelayedCalls(), [])


class PluginTests(SynchronousTestCase):
    def test_both_tapnames_are_found(self) -> None:
        """getPlugins(IServiceMaker) finds nowconnect-hub and nowconnect-agent, with our taps."""
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("nowconnect-hub", makers)
        self.assertIn("nowconnect-agent", makers)
        self.assertIs(makers["nowconnect-hub"].options, hub_tap.Options)
        self.assertIs(makers["nowconnect-agent"].options, agent_tap.Options)
        self.assertTrue(makers["nowconnect-hub"].description)


class HubAssemblyTests(AssemblyCase):
    def make(self, data: object = HUB_CONFIG) -> tuple[IService, MemoryReactorClock, str]:
        path = self.write_config(data)
        options = hub_tap.Options()
        options.parseOptions(["--config", path])
        clock = MemoryReactorClock()
        return hub_tap.makeService(options, reactor=clock), clock, path

    def test_listeners(self) -> None:
        """
        Starting the hub listens on the web port and on every listener, each on its configured
        interface and port, and logs web_started and listener_started with the real ports.
        """
        service, clock, _ = self.make()
        self.assertEqual(clock.tcpServers, [])
        service.startService()
        listening = [(port, interface) for port, _f, _backlog, interface in clock.tcpServers]
        self.assertEqual(listening, [(8765, "127.0.0.1"), (1389, "127.0.0.1"), (1636, "::1")])
        self.assertEqual([e["port"] for e in self.events("listener_started")], [1389, 1636])
        self.assertEqual([e["connector"] for e in self.events("listener_started")],
                         ["addomain", "ldaps"])
        self.assertEqual(self.events("listener_started")[1]["allow_cidrs"], "::1/128")
        self.assertEqual(len(self.events("web_started")), 1)
        self.stop(service, clock)

    def test_stop_closes_listeners(self) -> None:
        """Stopping the hub stops every listener and leaves no delayed calls."""
        service, clock, _ = self.make()
        service.startService()
        self.stop(service, clock)
        self.assertFalse(service.running)
        self.assertEqual([svc.port for svc in service.listeners], [None, None])  # type: ignore[attr-defined]
        self.assertEqual(len(self.events("drain_finished")), 1)

    def test_bad_config_names_file_and_key(self) -> None:
        """A config error is a UsageError that names the file and the offending key."""
        bad = dict(HUB_CONFIG, listeners=[{"connector": "addomain", "port": "389"}])
        path = self.write_config(bad)
        with self.assertRaises(usage.UsageError) as cm:
            hub_tap.Options().parseOptions(["--config", path])
        message = str(cm.exception)
        self.assertIn(path, message)
        self.assertIn("listeners[0].port", message)

    def test_unknown_key(self) -> None:
        """An unknown key is refused by name."""
        path = self.write_config(dict(HUB_CONFIG, listn="tcp:1"))
        with self.assertRaises(usage.UsageError) as cm:
            hub_tap.Options().parseOptions(["--config", path])
        self.assertIn(f"{path}: listn: unknown key", str(cm.exception))

    def test_missing_file(self) -> None:
        """A missing config file is a UsageError naming it."""
        path = self.temp_path("missing.yaml")
        with self.assertRaises(usage.UsageError) as cm:
            hub_tap.Options().parseOptions(["--config", path])
        self.assertIn(path, str(cm.exception))

    def test_bad_listen_endpoint(self) -> None:
        """An endpoint string Twisted cannot parse is a UsageError naming file and listen."""
        service_data = dict(HUB_CONFIG, listen="nosuchendpoint:8765")
        path = self.write_config(service_data)
        options = hub_tap.Options()
        options.parseOptions(["--config", path])
        with self.assertRaises(usage.UsageError) as cm:
            hub_tap.makeService(options, reactor=MemoryReactorClock())
        self.assertIn(f"{path}: listen:", str(cm.exception))

    def test_check_flag(self) -> None:
        """--check validates the file, prints OK and exits 0 without building anything."""
        path = self.write_config(HUB_CONFIG)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as cm:
            hub_tap.Options().parseOptions(["--config", path, "--check"])
        self.assertEqual(cm.exception.code, 0)
        self.assertEqual(out.getvalue(), f"{path}: OK\n")

    def test_web_site_uses_injected_reactor(self) -> None:
        """The web port's Site schedules its timeouts on the reactor the hub was given."""
        service, clock, _ = self.make()
        service.startService()
        site = clock.tcpServers[0][1]
        self.addCleanup(self.stop, service, clock)
        self.assertIs(site.reactor, clock)


class AgentAssemblyTests(AssemblyCase):
    def make(self, **overrides: Any) -> tuple[Any, MemoryReactorClock]:
        clock = MemoryReactorClock()
        config = parse_agent_config(dict(AGENT_CONFIG, **overrides), "agent.yaml", {})
        return make_agent_service(config, reactor=clock), clock

    def fail_last_attempt(self, clock: MemoryReactorClock) -> float:
        """
        Refuse the agent's latest dial; return the delay ClientService then waits before
        the next attempt.
        """
        _host, _port, factory, _timeout, _bind = clock.tcpClients[-1]
        factory.clientConnectionFailed(clock.connectors[-1], Failure(ConnectionRefusedError()))
        clock.advance(0.3)  # HostnameEndpoint reports the failure on its next attempt tick
        (retry,) = clock.getDelayedCalls()
        return retry.getTime() - clock.seconds()

    def test_start_dials_the_hub(self) -> None:
        """Starting the agent dials the hub's host and port at once and logs it."""
        agent, clock = self.make()
        self.assertEqual(clock.tcpClients, [])
        agent.startService()
        self.assertEqual([(h, p) for h, p, *_ in clock.tcpClients], [("127.0.0.1", 8765)])
        self.assertEqual(len(self.events("connecting_to_cloud")), 1)
        self.assertEqual(self.events("connecting_to_cloud")[0]["url"],
                         "ws://127.0.0.1:8765/tunnel")
        self.stop(agent, clock)

    def test_backoff_grows_and_is_capped(self) -> None:
        """
        Refused dials are retried after delays that grow by 1.5x from reconnect_initial_delay
        and stop growing at reconnect_max_delay (each plus up to 1 s of jitter); every retry
        is a new dial that logs connecting_to_cloud.
        """
        agent, clock = self.make()
        agent.startService()
        delays = []
        for attempt in range(1, 9):
            delay = self.fail_last_attempt(clock)
            delays.append(delay)
            base = min(1.0 * 1.5**attempt, 8.0)
            self.assertTrue(base <= delay < base + 1.0, (attempt, delay, base))
            dials = len(clock.tcpClients)
            clock.advance(delay - 0.01)
            self.assertEqual(len(clock.tcpClients), dials)
            clock.advance(0.02)
            self.assertEqual(len(clock.tcpClients), dials + 1)
        self.assertTrue(all(d < 9.0 for d in delays))
        self.assertEqual(len(self.events("connecting_to_cloud")), 9)
        self.stop(agent, clock)

    def test_stop_while_waiting_to_retry(self) -> None:
        """Stopping between attempts cancels the pending retry; nothing is left on the clock."""
        agent, clock = self.make()
        agent.startService()
        self.fail_last_attempt(clock)
        self.stop(agent, clock)
        dials = len(clock.tcpClients)
        clock.advance(100)
        self.assertEqual(len(clock.tcpClients), dials)

    def test_stop_while_dialling(self) -> None:
        """Stopping during a dial cancels it; nothing is left on the clock."""
        agent, clock = self.make()
        agent.startService()
        self.stop(agent, clock)

    def test_tap_with_metrics_listen(self) -> None:
        """
        agent_tap builds the agent from --config; metrics_listen adds a web port on the
        configured interface.
        """
        path = self.write_config(dict(AGENT_CONFIG,
                                      metrics_listen="tcp:9765:interface=127.0.0.1"))
        options = agent_tap.Options()
        options.parseOptions(["--config", path])
        clock = MemoryReactorClock()
        agent = agent_tap.makeService(options, reactor=clock)
        agent.startService()
        self.assertEqual([(p, i) for p, _f, _b, i in clock.tcpServers], [(9765, "127.0.0.1")])
        self.assertEqual(len(clock.tcpClients), 1)
        self.stop(agent, clock)

    def test_bad_agent_config_names_file_and_key(self) -> None:
        """An agent config error is a UsageError naming the file and key, never the token."""
        path = self.write_config(dict(AGENT_CONFIG, hub_url="http://hub:8765"))
        with self.assertRaises(usage.UsageError) as cm:
            agent_tap.Options().parseOptions(["--config", path])
        message = str(cm.exception)
        self.assertIn(f"{path}: hub_url:", message)
        self.assertNotIn(TOKEN, message)

    def test_bad_metrics_listen(self) -> None:
        """An unparseable metrics_listen endpoint is a UsageError naming file and key."""
        path = self.write_config(dict(AGENT_CONFIG, metrics_listen="nosuchendpoint:1"))
        options = agent_tap.Options()
        options.parseOptions(["--config", path])
        with self.assertRaises(usage.UsageError) as cm:
            agent_tap.makeService(options, reactor=MemoryReactorClock())
        self.assertIn(f"{path}: metrics_listen:", str(cm.exception))
