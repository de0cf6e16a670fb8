"""``twistd nowconnect-agent --config FILE``: options and assembly only."""
# -*- test-case-name: tests.test_assembly -*-

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService

from nowconnect.config import AgentConfig, load_agent_config
from nowconnect.tap import ConfigOptions, build_service


class Options(ConfigOptions):
    optParameters = [
        ["config", "c", None, "Agent configuration (YAML); NC_* environment variables override it."]
    ]

    def load(self, path: str | None) -> AgentConfig:
        return load_agent_config(path, os.environ)


def makeService(options: Options, reactor: Any = None) -> IService:
    from nowconnect.agent import make_agent_service

    return build_service(options, reactor, make_agent_service, "metrics_listen")
