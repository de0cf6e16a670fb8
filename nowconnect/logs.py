"""
Stable log event names and the JSON-lines observer.

Every event is emitted with its name as the first word of a constant format string *and* as
the ``event`` key, so runbooks can grep the text and log shippers can filter on the key.
``docs/logging.md`` lists every event and its fields.
"""
# -*- test-case-name: tests.test_logs -*-

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    formatEvent,
    textFileLogObserver,
)

# Hub
LISTENER_STARTED = "listener_started"
WEB_STARTED = "web_started"
AGENT_CONNECTED = "agent_connected"
AGENT_DISCONNECTED = "agent_disconnected"
AGENT_REJECTED = "agent_rejected"
CONNECTION_OPEN = "connection_open"
CONNECTION_CLOSED = "connection_closed"
NO_AGENT_FOR_CONNECTOR = "no_agent_for_connector"
CIDR_BLOCKED = "cidr_blocked"
LIMIT_REACHED = "limit_reached"
TUNNEL_PROTOCOL_ERROR = "tunnel_protocol_error"
TUNNEL_ERROR = "tunnel_error"
DRAIN_STARTED = "drain_started"
DRAIN_FINISHED = "drain_finished"
# Agent
#: The agent's two lifecycle lines keep the words the users' runbook greps for.
CONNECTING_TO_CLOUD = "connecting_to_cloud"
CONNECTING_TO_CLOUD_TEXT = "connecting to cloud"
TUNNEL_OPEN = "tunnel_open"
TUNNEL_OPEN_TEXT = "connection open"
AGENT_TUNNEL_LOST = "tunnel_lost"
AGENT_TUNNEL_FAILED = "tunnel_failed"
TARGET_FAILED = "target_failed"
CONFIG_WARNING = "config_warning"
INSECURE_HUB_URL = "insecure_hub_url"

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


def emit(
    log: Logger, level: str, event: str, fields: str = "", *, text: str = "", **kw: Any
) -> None:
    """
    Emit one stable event.  C{fields} is the constant key=value part of the format string,
    e.g. C{"connector={connector} peer={peer}"}; C{kw} fills it.  The line starts with the
    event name, or with C{text} where the runbook greps for words rather than a name.
    """
    fmt = (text or event).replace("{", "{{").replace("}", "}}")
    if fields:
        fmt = fmt + " " + fields
    log.emit(LEVELS[level], fmt, event=event, **kw)


_JSON_SKIP = frozenset(
    {
        "log_logger",
        "log_source",
        "log_format",
        "log_level",
        "log_time",
        "log_namespace",
        "log_failure",
        "log_io",
        "log_trace",
        "log_text",
        "log_flattened",
        "log_system",
        "message",
        "format",
        "isError",
        "system",
        "time",
    }
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def json_line(event: dict[str, Any]) -> str:
    """One log event as a JSON object: event, level, time, message, then the fields."""
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": level.name if level is not None else "info",
        "event": event.get("event") or event.get("log_namespace", ""),
        "message": formatEvent(event),
        "namespace": event.get("log_namespace"),
    }
    for key, value in event.items():
        if key in _JSON_SKIP or key in out or key.startswith("log_"):
            continue
        out[key] = _jsonable(value)
    failure = event.get("log_failure")
    if failure is not None:
        out["failure"] = failure.getTraceback()
    return json.dumps(out, sort_keys=False) + "\n"


def json_observer(stream: IO[str]) -> ILogObserver:
    """A JSON-lines observer for log shippers: one object per line."""
    return FileLogObserver(stream, json_line)


def observer() -> ILogObserver:
    """
    twistd ``--logger nowconnect.logs.observer``: JSON lines when ``NC_LOG_FORMAT=json``,
    Twisted's text format otherwise; always to stdout (systemd's journal collects it).
    """
    if os.environ.get("NC_LOG_FORMAT", "text").lower() == "json":
        return json_observer(sys.stdout)
    return textFileLogObserver(sys.stdout)
