"""Stable log events and the JSON-lines observer."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from nowconnect import logs


class EmitTests(SynchronousTestCase):
    def test_event_name_is_key_and_first_word(self) -> None:
        """emit() puts the name in the `event` key and as the first word of the text."""
        with capturedLogs() as captured:
            logs.emit(Logger(), "warn", logs.CIDR_BLOCKED, "connector={connector} client={client}",
                      connector="addomain", client="192.0.2.7:5555")
        [event] = captured
        self.assertEqual(event["event"], "cidr_blocked")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(formatEvent(event),
                         "cidr_blocked connector=addomain client=192.0.2.7:5555")

    def test_runbook_text(self) -> None:
        """The agent's lifecycle lines read as the users' runbook greps them."""
        with capturedLogs() as captured:
            logs.emit(Logger(), "info", logs.CONNECTING_TO_CLOUD, "url={url}",
                      text=logs.CONNECTING_TO_CLOUD_TEXT, url="ws://hub:8765/tunnel")
        [event] = captured
        self.assertEqual(event["event"], "connecting_to_cloud")
        self.assertTrue(formatEvent(event).startswith("connecting to cloud url="))

    def test_braces_in_values_are_not_formatted(self) -> None:
        """A field value with braces (a hostile client string) is printed, not interpreted."""
        with capturedLogs() as captured:
            logs.emit(Logger(), "info", logs.CONNECTION_OPEN, "client={client}", client="{evil}")
        self.assertEqual(formatEvent(captured[0]), "connection_open client={evil}")


class JsonTests(SynchronousTestCase):
    def test_json_line(self) -> None:
        """The JSON observer writes one object per line with event, level, time and fields."""
        out = io.StringIO()
        observer = logs.json_observer(out)
        log = Logger(observer=observer, namespace="nowconnect.hub")
        logs.emit(log, "info", logs.LISTENER_STARTED, "connector={connector} port={port}",
                  connector="addomain", port=389)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        obj = json.loads(lines[0])
        self.assertEqual(obj["event"], "listener_started")
        self.assertEqual(obj["level"], "info")
        self.assertEqual(obj["connector"], "addomain")
        self.assertEqual(obj["port"], 389)
        self.assertIsInstance(obj["time"], float)
        self.assertEqual(obj["namespace"], "nowconnect.hub")
        self.assertTrue(obj["message"].startswith("listener_started connector=addomain"))

    def test_observer_selected_by_environment(self) -> None:
        """NC_LOG_FORMAT=json selects JSON lines; anything else keeps the text format."""
        import os
        import sys

        self.patch(sys, "stdout", io.StringIO())
        self.patch(os, "environ", {"NC_LOG_FORMAT": "json"})
        Logger(observer=logs.observer()).info("x {y}", event="e", y=1)
        self.assertEqual(json.loads(sys.stdout.getvalue())["event"], "e")
        self.patch(sys, "stdout", io.StringIO())
        self.patch(os, "environ", {})
        Logger(observer=logs.observer()).info("x {y}", event="e", y=1)
        self.assertIn("x 1", sys.stdout.getvalue())


class DocumentedTests(SynchronousTestCase):
    def test_every_event_documented(self) -> None:
        """Every event name constant in logs.py has a row in docs/logging.md."""
        doc = (Path(__file__).parent.parent / "docs" / "logging.md").read_text()
        names = [v for k, v in vars(logs).items()
                 if k.isupper() and isinstance(v, str) and not k.endswith("_TEXT")
                 and re.fullmatch(r"[a-z_]+", v)]
        self.assertGreater(len(names), 15)
        for name in names:
            self.assertIn(f"`{name}`", doc, name)
