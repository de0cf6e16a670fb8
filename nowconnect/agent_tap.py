"""``twistd nowconnect-agent --config FILE``: options and assembly only."""
# -*- test-case-name: tests.test_taps -*-

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from nowconnect.config import AgentConfig, ConfigError, load_agent_config


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Agent configuration (YAML); NC_* environment variables override it."]
    ]
    optFlags = [["check", None, "Validate the configuration and exit."]]

    agent_config: AgentConfig

    def postOptions(self) -> None:
        try:
            self.agent_config = load_agent_config(self["config"], os.environ)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["check"]:
            print(f"{self['config'] or 'environment'}: OK")
            raise SystemExit(0)


def makeService(options: Options, reactor: Any = None) -> IService:
    from nowconnect.agent import make_agent_service

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        from nowconnect.shutdown import stop_cleanly_on_sigterm

        reactor = global_reactor
        stop_cleanly_on_sigterm(reactor)
    try:
        return make_agent_service(options.agent_config, reactor)
    except ValueError as e:  # a bad endpoint string in `metrics_listen`
        raise usage.UsageError(f"{options['config']}: metrics_listen: {e}") from None
